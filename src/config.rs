//! Configuration: layered, typed, validated once at start.
//!
//! Layers, later wins: the built-in defaults (`config/default.toml`, compiled in), that file on
//! disk when present, `--config FILE`, the conventional shortcuts `KLARIFY_ACCESS_KEY` and
//! `DATABASE_URL`, then `KLARIFY_SYNC__<SECTION>__<KEY>`. Secrets are held in `SecretString`, so
//! `Debug` output of the settings cannot show them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::klarify::ClientSettings;
use crate::schedule::{self, Cron};
use crate::sync::SyncOptions;

const BUILT_IN: &str = include_str!("../config/default.toml");
const ON_DISK: &str = "config/default.toml";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://klarify.db";
pub const DEMO_DATABASE_URL: &str = "sqlite://klarify-demo.db";

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub klarify: KlarifySettings,
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub schedule: ScheduleSettings,
    pub sync: SyncSettings,
    pub health: HealthSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KlarifySettings {
    pub base_url: Url,
    pub access_key: Option<SecretString>,
    pub page_size: u32,
    pub request_timeout_secs: u64,
    pub max_attempts: usize,
    pub retry_base_delay_ms: u64,
    pub retry_max_delay_secs: u64,
    pub max_body_bytes: usize,
    pub concurrency: usize,
    pub max_requests_per_second: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// Unset means "the default for the mode": `--demo` keeps its own file.
    pub url: Option<SecretString>,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScheduleSettings {
    pub cron: Cron,
    /// When to run a full reconciliation; written `""` for never.
    #[serde(deserialize_with = "schedule::optional")]
    pub backfill_cron: Option<Cron>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SyncSettings {
    pub overlap_secs: u64,
    pub max_delete_share: f64,
    pub tie_group_rounds: u32,
    pub tie_group_page_size: u32,
    pub max_future_skew_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HealthSettings {
    pub max_staleness_secs: u64,
    pub max_unproven_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: `{key}` {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// A TOML syntax error quotes the offending line, which may be the one holding the database
/// password: keep the position and the complaint, drop the quote.
fn without_quoted_lines(error: config::ConfigError) -> config::ConfigError {
    match error {
        config::ConfigError::FileParse { uri, cause } => {
            let text = cause.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let position = lines.next().unwrap_or_default().to_owned();
            // The quote is the lines with a `|` gutter, and the caret under it.
            let complaint = lines.rfind(|l| !l.contains('|') && !l.starts_with('^'));
            config::ConfigError::FileParse {
                uri,
                cause: match complaint {
                    Some(complaint) => format!("{position}: {complaint}"),
                    None => position,
                }
                .into(),
            }
        }
        other => other,
    }
}

/// The keys whose values are parsed as they are read (cron expressions).
const PARSED_KEYS: [&str; 2] = ["schedule.cron", "schedule.backfill_cron"];

/// serde reports a value that does not parse as "REASON for key `KEY`"; this shows it key first,
/// as [`Settings::validate`] shows what it refuses.
fn key_first(error: config::ConfigError) -> ConfigError {
    if let config::ConfigError::At {
        error: inner,
        key: Some(key),
        ..
    } = &error
    {
        if let (config::ConfigError::Message(reason), Some(key)) =
            (&**inner, PARSED_KEYS.iter().find(|k| *k == key))
        {
            return invalid(key, reason.clone());
        }
    }
    error.into()
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl Settings {
    /// Loads every layer. `env` is the process environment, passed in so tests need not touch
    /// the real one.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut builder = Config::builder().add_source(File::from_str(BUILT_IN, FileFormat::Toml));
        builder = builder.add_source(File::new(ON_DISK, FileFormat::Toml).required(false));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let shortcuts: HashMap<String, String> = [
            ("KLARIFY_ACCESS_KEY", "KLARIFY__ACCESS_KEY"),
            ("DATABASE_URL", "DATABASE__URL"),
        ]
        .into_iter()
        .filter_map(|(from, to)| env.get(from).map(|v| (to.to_owned(), v.clone())))
        .collect();
        let settings: Settings = builder
            .add_source(
                Environment::default()
                    .separator("__")
                    .source(Some(shortcuts)),
            )
            .add_source(
                Environment::with_prefix("KLARIFY_SYNC")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env.clone())),
            )
            .build()
            .map_err(without_quoted_lines)?
            .try_deserialize()
            .map_err(key_first)?;
        settings.with_key_file(env)
    }

    /// The container-secrets convention: the key in a file named by `KLARIFY_ACCESS_KEY_FILE`.
    fn with_key_file(mut self, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        if self.klarify.access_key.is_none() {
            if let Some(path) = env.get("KLARIFY_ACCESS_KEY_FILE") {
                let key = read_key_file(Path::new(path)).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                self.klarify.access_key = Some(key.trim().to_owned().into());
            }
        }
        Ok(self)
    }

    /// Checks what types alone cannot; `needs_key` is false only for `--demo`.
    pub fn validate(&self, needs_key: bool) -> Result<(), ConfigError> {
        let k = &self.klarify;
        if !matches!(k.base_url.scheme(), "https" | "http") {
            return Err(invalid("klarify.base_url", "must be an https:// URL"));
        }
        if k.base_url.scheme() == "http" && !is_loopback(&k.base_url) {
            return Err(invalid(
                "klarify.base_url",
                "must be https: plain http would send the access key in clear text (allowed only to 127.0.0.0/8, ::1 and localhost)",
            ));
        }
        if needs_key
            && k.access_key
                .as_ref()
                .is_none_or(|s| s.expose_secret().trim().is_empty())
        {
            return Err(invalid(
                "klarify.access_key",
                "is not set: set KLARIFY_ACCESS_KEY (or KLARIFY_ACCESS_KEY_FILE) to the key generated under Settings -> Integrations in Klarify",
            ));
        }
        if !(1..=1000).contains(&k.page_size) {
            return Err(invalid(
                "klarify.page_size",
                "must be between 1 and 1000 (Klarify advises 100)",
            ));
        }
        if k.max_attempts == 0 {
            return Err(invalid("klarify.max_attempts", "must be at least 1"));
        }
        if k.request_timeout_secs == 0 {
            return Err(invalid(
                "klarify.request_timeout_secs",
                "must be at least 1",
            ));
        }
        if k.max_body_bytes < 1024 {
            return Err(invalid("klarify.max_body_bytes", "must be at least 1024"));
        }
        if !(1..=64).contains(&k.concurrency) {
            return Err(invalid("klarify.concurrency", "must be between 1 and 64"));
        }
        if k.max_requests_per_second == 0 {
            return Err(invalid(
                "klarify.max_requests_per_second",
                "must be at least 1",
            ));
        }
        if let Some(url) = &self.database.url {
            if database_kind(url.expose_secret())? == DatabaseKind::Postgres {
                check_postgres_parameters(url.expose_secret())?;
            }
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.sync.max_delete_share) {
            return Err(invalid("sync.max_delete_share", "must be between 0 and 1"));
        }
        if self.sync.tie_group_rounds == 0 {
            return Err(invalid("sync.tie_group_rounds", "must be at least 1"));
        }
        // Past the overlap, an edit made just after a pass could fall below where the next one
        // starts reading.
        if self.sync.max_future_skew_secs > self.sync.overlap_secs {
            return Err(invalid(
                "sync.max_future_skew_secs",
                "must not exceed sync.overlap_secs",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| invalid("log.filter", e.to_string()))?;
        Ok(())
    }

    /// The database URL for this mode.
    pub fn database_url(&self, demo: bool) -> SecretString {
        self.database.url.clone().unwrap_or_else(|| {
            if demo {
                DEMO_DATABASE_URL
            } else {
                DEFAULT_DATABASE_URL
            }
            .into()
        })
    }

    pub fn sync_options(&self) -> SyncOptions {
        let s = &self.sync;
        SyncOptions {
            overlap: Duration::from_secs(s.overlap_secs),
            max_delete_share: s.max_delete_share,
            tie_group_rounds: s.tie_group_rounds,
            tie_group_page_size: s.tie_group_page_size,
            max_future_skew: Duration::from_secs(s.max_future_skew_secs),
        }
    }

    pub fn client_settings(&self) -> ClientSettings {
        let k = &self.klarify;
        ClientSettings {
            base_url: k.base_url.clone(),
            access_key: k
                .access_key
                .clone()
                .unwrap_or_else(|| SecretString::from("")),
            page_size: k.page_size,
            request_timeout: Duration::from_secs(k.request_timeout_secs),
            max_attempts: k.max_attempts,
            retry_base_delay: Duration::from_millis(k.retry_base_delay_ms),
            retry_max_delay: Duration::from_secs(k.retry_max_delay_secs),
            max_body_bytes: k.max_body_bytes,
            concurrency: k.concurrency,
            max_requests_per_second: k.max_requests_per_second,
        }
    }
}

/// A key file larger than this is not a key file.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Reads a key file, which must be a regular file of at most [`MAX_KEY_FILE_BYTES`]: reading a
/// FIFO would block start-up until someone writes to it, and `/dev/zero` would fill memory. The
/// file is opened without blocking and its type checked on the open descriptor, so swapping the
/// path for something else between a check and the read changes nothing.
fn read_key_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let not_a_key = |what: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}; KLARIFY_ACCESS_KEY_FILE must name a regular file of at most {MAX_KEY_FILE_BYTES} bytes holding the key"),
        )
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        let kind = meta.file_type();
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(not_a_key(what.to_owned()));
    }
    let mut key = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1).read_to_string(&mut key)?;
    if key.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(not_a_key("larger than a key".to_owned()));
    }
    Ok(key)
}

/// The two backends, told apart by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite,
    Postgres,
}

/// The query parameters of a database URL whose values are not secret, so messages may show
/// them: what sqlx 0.8's PostgreSQL (`sqlx-postgres` options/parse.rs) and SQLite drivers
/// understand, less `password`. Everything else is redacted.
const SHOWN_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "application_name",
    "options",
    "mode",
    "cache",
    "immutable",
    "vfs",
];

/// Whether a (decoded) query parameter of a database URL may be shown; `options[NAME]` sets a
/// server option, like `options`.
pub fn url_parameter_is_shown(key: &str) -> bool {
    SHOWN_URL_PARAMETERS.contains(&key) || (key.starts_with("options[") && key.ends_with(']'))
}

/// sqlx's PostgreSQL driver logs the value of a parameter it does not know (at WARN, so with
/// the default filter) before connecting: a `sslpassword=...` would be written to the log.
/// Refusing unknown parameters at start, naming only the key, keeps their values out.
fn check_postgres_parameters(url: &str) -> Result<(), ConfigError> {
    let Ok(parsed) = Url::parse(url) else {
        return Err(invalid(
            "database.url",
            "is not a valid URL (e.g. postgres://user@host/db?sslmode=verify-full)",
        ));
    };
    for (key, _) in parsed.query_pairs() {
        if key != "password" && !url_parameter_is_shown(&key) {
            return Err(invalid(
                "database.url",
                format!(
                    "has the query parameter `{key}`, which the PostgreSQL driver does not support (it would be ignored); remove it"
                ),
            ));
        }
    }
    Ok(())
}

pub fn database_kind(url: &str) -> Result<DatabaseKind, ConfigError> {
    if url.starts_with("sqlite:") {
        Ok(DatabaseKind::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(DatabaseKind::Postgres)
    } else {
        Err(invalid(
            "database.url",
            "must start with sqlite: or postgres:// (e.g. sqlite://klarify.db)",
        ))
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load(None, &env(pairs))
    }

    #[test]
    fn defaults_are_the_contracts() {
        let s = load(&[]).unwrap();
        assert_eq!(
            s.klarify.base_url.as_str(),
            "https://integration.klarify.biz/"
        );
        assert_eq!(s.klarify.page_size, 100);
        assert_eq!(s.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.database_url(false).expose_secret(), "sqlite://klarify.db");
        assert_eq!(
            s.database_url(true).expose_secret(),
            "sqlite://klarify-demo.db"
        );
        assert!(s.klarify.access_key.is_none());
        s.validate(false).unwrap();
    }

    #[test]
    fn environment_overrides_and_full_names_beat_shortcuts() {
        let s = load(&[
            ("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", "50"),
            ("KLARIFY_SYNC__HTTP__LISTEN", "0.0.0.0:9000"),
            ("KLARIFY_ACCESS_KEY", "short"),
            ("DATABASE_URL", "postgres://u:p@h/db"),
            ("KLARIFY_SYNC__DATABASE__URL", "sqlite://full.db"),
        ])
        .unwrap();
        assert_eq!(s.klarify.page_size, 50);
        assert_eq!(s.http.listen.port(), 9000);
        assert_eq!(
            s.klarify.access_key.as_ref().unwrap().expose_secret(),
            "short"
        );
        assert_eq!(s.database_url(false).expose_secret(), "sqlite://full.db");
    }

    #[test]
    fn a_config_file_layers_under_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.toml");
        std::fs::write(
            &path,
            "[klarify]\npage_size = 20\n[schedule]\ncron = \"*/10 * * * *\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), &env(&[])).unwrap();
        assert_eq!(s.klarify.page_size, 20);
        assert_eq!(s.schedule.cron, "*/10 * * * *".parse().unwrap());
        let s = Settings::load(
            Some(&path),
            &env(&[("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", "30")]),
        )
        .unwrap();
        assert_eq!(s.klarify.page_size, 30);
        let missing = Settings::load(Some(&dir.path().join("nope.toml")), &env(&[])).unwrap_err();
        assert!(missing.to_string().contains("nope.toml"), "{missing}");
    }

    /// A typo on the line that holds a password: the error says where, without quoting it.
    #[test]
    fn a_syntax_error_does_not_quote_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.toml");
        std::fs::write(&path, "[database]\nurl = \"postgres://u:hunter2@h/db\n").unwrap();
        let err = Settings::load(Some(&path), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(
            err.contains("line 2") && err.contains("extra.toml"),
            "{err}"
        );
    }

    #[test]
    fn the_key_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "from-file\n").unwrap();
        let s = load(&[("KLARIFY_ACCESS_KEY_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(s.klarify.access_key.unwrap().expose_secret(), "from-file");
    }

    /// A FIFO (which would block start-up), a device (endless), a directory and an oversized
    /// file are each refused with an error that names the variable, without hanging.
    #[test]
    fn the_key_file_must_be_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo only reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let big = dir.path().join("big");
        std::fs::write(&big, "k".repeat(5000)).unwrap();
        for path in [fifo, "/dev/zero".into(), dir.path().to_owned(), big] {
            let shown = path.display().to_string();
            let (done, result) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = done.send(load(&[("KLARIFY_ACCESS_KEY_FILE", shown.as_str())]).map(|_| ()));
            });
            let err = result
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("reading {} did not return", path.display()))
                .unwrap_err()
                .to_string();
            assert!(err.contains("KLARIFY_ACCESS_KEY_FILE"), "{err}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", "lots")], "page_size"),
            (
                &[("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", "0")],
                "klarify.page_size",
            ),
            (
                &[("KLARIFY_SYNC__KLARIFY__CONCURRENCY", "0")],
                "klarify.concurrency",
            ),
            (
                &[("KLARIFY_SYNC__KLARIFY__CONCURRENCY", "65")],
                "klarify.concurrency",
            ),
            (
                &[("KLARIFY_SYNC__KLARIFY__MAX_REQUESTS_PER_SECOND", "0")],
                "klarify.max_requests_per_second",
            ),
            (
                &[("KLARIFY_SYNC__KLARIFY__BASE_URL", "http://klarify.example")],
                "klarify.base_url",
            ),
            (
                &[("KLARIFY_SYNC__KLARIFY__BASE_URL", "not a url")],
                "base_url",
            ),
            (&[("DATABASE_URL", "mysql://x")], "database.url"),
            (
                &[("DATABASE_URL", "postgres://u@h/db?sslpassword=x")],
                "`sslpassword`",
            ),
            (
                &[("KLARIFY_SYNC__SCHEDULE__CRON", "every now and then")],
                "schedule.cron",
            ),
            (&[("KLARIFY_SYNC__HTTP__LISTEN", "port 80")], "listen"),
            (
                &[("KLARIFY_SYNC__SYNC__MAX_DELETE_SHARE", "2")],
                "sync.max_delete_share",
            ),
            (&[("KLARIFY_SYNC__LOG__FORMAT", "xml")], "format"),
        ];
        for (pairs, key) in cases {
            let mut pairs = pairs.to_vec();
            pairs.push(("KLARIFY_ACCESS_KEY", "k"));
            let err = load(&pairs)
                .and_then(|s| s.validate(true))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{pairs:?}: {err}");
        }
    }

    /// Schedules are parsed as they are read; one that does not parse is shown key first, like
    /// every other refused value.
    #[test]
    fn schedules_are_parsed_as_read() {
        let backfill = |pairs: &[(&str, &str)]| load(pairs).map(|s| s.schedule.backfill_cron);
        assert_eq!(
            backfill(&[]).unwrap(),
            Some("0 30 3 * * *".parse().unwrap())
        );
        let off = [("KLARIFY_SYNC__SCHEDULE__BACKFILL_CRON", "")];
        assert_eq!(backfill(&off).unwrap(), None);
        let bad = [("KLARIFY_SYNC__SCHEDULE__BACKFILL_CRON", "sometimes")];
        assert_eq!(
            backfill(&bad).unwrap_err().to_string(),
            "configuration: `schedule.backfill_cron` \"sometimes\" is not a cron expression: expected 5 fields (minute hour day month weekday) or 6 (with seconds first), e.g. \"*/5 * * * *\""
        );
    }

    #[test]
    fn the_key_is_required_except_for_the_demo() {
        let s = load(&[]).unwrap();
        let err = s.validate(true).unwrap_err().to_string();
        assert!(err.contains("KLARIFY_ACCESS_KEY"), "{err}");
        s.validate(false).unwrap();
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:1234",
            "http://localhost:1",
            "http://[::1]:80",
            "https://x.example",
        ] {
            let s = load(&[
                ("KLARIFY_SYNC__KLARIFY__BASE_URL", ok),
                ("KLARIFY_ACCESS_KEY", "k"),
            ])
            .unwrap();
            s.validate(true).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "http://10.0.0.1",
            "http://localhost.evil.example",
            "ftp://127.0.0.1",
        ] {
            let s = load(&[
                ("KLARIFY_SYNC__KLARIFY__BASE_URL", bad),
                ("KLARIFY_ACCESS_KEY", "k"),
            ])
            .unwrap();
            assert!(s.validate(true).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let s = load(&[
            ("KLARIFY_ACCESS_KEY", "super-secret-key"),
            ("DATABASE_URL", "postgres://user:hunter2@db/x"),
        ])
        .unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("super-secret-key") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
