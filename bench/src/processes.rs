//! The processes the bench measures and steers: `fake-klarify`, and klarify-sync binaries run
//! as users run them, so that wall time and peak memory are the whole process's.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

/// The access key the fake expects and klarify-sync and the oracle send.
pub const KEY: &str = "test-key";

/// A file beside the bench in its target directory.
pub fn beside_bench(name: &str) -> anyhow::Result<PathBuf> {
    let bench = std::env::current_exe().context("cannot find the bench's own path")?;
    Ok(bench.with_file_name(name))
}

/// `fake-klarify` as a child, steered through its stdin.
pub struct Fake {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub url: String,
}

impl Fake {
    pub fn start(path: &Path, procedures: usize, latency_ms: u64) -> anyhow::Result<Self> {
        let mut child = Command::new(path)
            .args(["--procedures", &procedures.to_string()])
            .args(["--latency-ms", &latency_ms.to_string()])
            .args(["--key", KEY])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (cargo build --release --bins)",
                    path.display()
                )
            })?;
        let stdin = child.stdin.take().context("the fake's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the fake's stdout")?);
        let mut fake = Fake {
            child,
            stdin,
            stdout,
            url: String::new(),
        };
        fake.url = fake.line()?;
        Ok(fake)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("cannot read from fake-klarify")?;
        ensure!(
            !line.is_empty(),
            "fake-klarify ended early; its error is above"
        );
        Ok(line.trim().to_owned())
    }

    pub fn ask(&mut self, command: &str) -> anyhow::Result<String> {
        writeln!(self.stdin, "{command}").context("cannot steer fake-klarify")?;
        self.line()
    }

    pub fn requests(&mut self) -> anyhow::Result<u64> {
        let answer = self.ask("requests")?;
        answer
            .strip_prefix("requests ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("fake-klarify answered {answer:?} to `requests`"))
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A klarify-sync binary to measure, and what the table calls it.
#[derive(Debug, Clone)]
pub struct Binary {
    pub label: String,
    pub path: PathBuf,
}

impl Binary {
    /// `LABEL=PATH`, or `PATH` labelled by its directory's name (`base/klarify-sync` is `base`).
    pub fn parse(arg: &str) -> Result<Self, String> {
        let (label, path) = match arg.split_once('=') {
            Some((label, path)) if !label.is_empty() => (Some(label), PathBuf::from(path)),
            _ => (None, PathBuf::from(arg)),
        };
        if !path.is_file() {
            return Err(format!("no klarify-sync binary at {}", path.display()));
        }
        let label = label.map(str::to_owned).unwrap_or_else(|| {
            path.parent()
                .and_then(Path::file_name)
                .map_or_else(|| arg.to_owned(), |d| d.to_string_lossy().into_owned())
        });
        Ok(Binary { label, path })
    }
}

pub struct Measured {
    pub wall: Duration,
    pub peak_rss_mib: f64,
}

/// How klarify-sync is configured for a run against `fake`.
pub struct Settings<'a> {
    pub fake_url: &'a str,
    pub database_url: &'a str,
    pub page_size: u32,
    pub concurrency: usize,
    pub max_requests_per_second: u32,
}

/// Runs `binary` to completion and measures it with `wait4`, which reports the child's own
/// peak resident set size. (`wait4` reaps the child, so `Child::wait` is never called.)
#[allow(clippy::zombie_processes)]
pub fn sync(binary: &Binary, settings: &Settings, args: &[&str]) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let child = Command::new(&binary.path)
        .args(args)
        .env("KLARIFY_SYNC__KLARIFY__BASE_URL", settings.fake_url)
        .env("KLARIFY_ACCESS_KEY", KEY)
        .env(
            "KLARIFY_SYNC__KLARIFY__PAGE_SIZE",
            settings.page_size.to_string(),
        )
        .env(
            "KLARIFY_SYNC__KLARIFY__CONCURRENCY",
            settings.concurrency.to_string(),
        )
        .env(
            "KLARIFY_SYNC__KLARIFY__MAX_REQUESTS_PER_SECOND",
            settings.max_requests_per_second.to_string(),
        )
        .env("DATABASE_URL", settings.database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.path.display()))?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers to live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid <= 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!(
            "{} {} failed (wait status {status}); its error is above",
            binary.path.display(),
            args.join(" ")
        );
    }
    Ok(Measured {
        wall: started.elapsed(),
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    })
}

/// Rows written by the newest pass, from `sync_runs`, as `binary` reports them.
pub fn written(binary: &Binary, database_url: &str) -> anyhow::Result<u64> {
    let out = Command::new(&binary.path)
        .args(["status", "--json", "--passes", "1"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "off")
        .output()
        .with_context(|| format!("cannot start {}", binary.path.display()))?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{} status --json printed no JSON: {}",
            binary.path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let run = &status["recent_runs"][0];
    match (run["inserted"].as_u64(), run["updated"].as_u64()) {
        (Some(inserted), Some(updated)) => Ok(inserted + updated),
        _ => bail!("{} status --json shows no last pass", binary.path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_is_labelled_as_asked_or_by_its_directory() {
        let dir = std::env::temp_dir().join(format!("bench-label-{}", std::process::id()));
        let base = dir.join("base");
        std::fs::create_dir_all(&base).unwrap();
        let path = base.join("klarify-sync");
        std::fs::write(&path, "").unwrap();
        let shown = path.display().to_string();

        let by_dir = Binary::parse(&shown).unwrap();
        assert_eq!((by_dir.label.as_str(), &by_dir.path), ("base", &path));
        let named = Binary::parse(&format!("today={shown}")).unwrap();
        assert_eq!((named.label.as_str(), &named.path), ("today", &path));
        let error = Binary::parse(&format!("new={}", dir.join("nothing").display())).unwrap_err();
        assert!(error.starts_with("no klarify-sync binary at "), "{error}");

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
