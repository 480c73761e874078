//! The `klarify-sync` binary as users run it, in a subprocess: a fake Klarify for it to read, its
//! environment, runs to completion, and daemons whose log lines are collected as they come.
//!
//! No output of the binary may show a secret: every run and every log line is checked for
//! [`ACCESS_KEY`] and [`DB_PASSWORD`].

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klarify_fake::{FakeKlarify, FakeOptions, Organisation};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::{database, scalar, Backend};

pub const PROGRAM: &str = env!("CARGO_BIN_EXE_klarify-sync");

/// The access key of [`fake`], which [`Vars::new`] gives the binary.
pub const ACCESS_KEY: &str = "sekrit-key-4711";
/// A database password for tests to put in URLs.
pub const DB_PASSWORD: &str = "db-pw-5150";
const SECRETS: [&str; 2] = [ACCESS_KEY, DB_PASSWORD];

/// What the daemon logs once it serves HTTP, with the address in `addr`.
const SERVING: &str = "serving /healthz, /readyz and /metrics";

/// A fake Klarify behind [`ACCESS_KEY`], serving `items` procedures generated from `seed` (which
/// also picks what churn changes), each answer `latency` late.
pub async fn fake(seed: u64, items: usize, latency: Duration) -> FakeKlarify {
    let opts = FakeOptions {
        access_key: ACCESS_KEY.into(),
        latency,
        seed,
        ..FakeOptions::default()
    };
    FakeKlarify::start(Organisation::generate(seed, items), opts)
        .await
        .unwrap()
}

pub fn assert_no_secret_in(text: &str) {
    assert!(
        !SECRETS.iter().any(|s| text.contains(s)),
        "a secret shows in: {text}"
    );
}

/// The whole environment of the binary: nothing is inherited from the test's.
#[derive(Clone, Default)]
pub struct Vars(Vec<(String, String)>);

impl Vars {
    /// Only `DATABASE_URL`: enough for the modes that read the mirror.
    pub fn with_database(url: &str) -> Self {
        let mut vars = Self::default();
        vars.set("DATABASE_URL", url);
        vars
    }

    /// Pointed at `fake` (with [`ACCESS_KEY`]) and `database_url`, retrying without waiting, its
    /// HTTP endpoints on a free port.
    pub fn new(fake: &FakeKlarify, database_url: &str) -> Self {
        let mut vars = Self::with_database(database_url);
        vars.set("KLARIFY_SYNC__KLARIFY__BASE_URL", &fake.base_url())
            .set("KLARIFY_ACCESS_KEY", ACCESS_KEY)
            .set("KLARIFY_SYNC__KLARIFY__RETRY_BASE_DELAY_MS", "1")
            .set("KLARIFY_SYNC__KLARIFY__RETRY_MAX_DELAY_SECS", "0")
            .set("KLARIFY_SYNC__HTTP__LISTEN", "127.0.0.1:0");
        vars
    }

    /// Sets `key`, replacing any value it had.
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.remove(key);
        self.0.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.0.retain(|(k, _)| k != key);
        self
    }

    /// The binary with these variables only, in `cwd`, its stdin empty, its output piped, killed
    /// when dropped.
    pub fn command(&self, cwd: &Path, args: &[&str]) -> Command {
        self.command_of(Path::new(PROGRAM), cwd, args)
    }

    /// [`Vars::command`] of another program: a copy of the binary, or a shell that runs it.
    pub fn command_of(&self, program: &Path, cwd: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command
            .env_clear()
            .envs(self.0.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs the binary to completion in an empty working directory.
    pub async fn run(&self, args: &[&str]) -> Output {
        let cwd = tempfile::tempdir().unwrap();
        run(self.command(cwd.path(), args)).await
    }
}

/// What a run of the binary printed, and how it ended.
pub struct Output {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` to completion, capturing what it prints to pipes.
pub async fn run(mut command: Command) -> Output {
    // Not `Command::output`, which pipes stdout and stderr whatever the command says.
    let child = command.spawn().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("klarify-sync did not finish within 180 s")
        .unwrap();
    let out = Output {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_no_secret_in(&out.stdout);
    assert_no_secret_in(&out.stderr);
    out
}

/// `klarify-sync ARGS` against a database that holds no mirror (a missing SQLite file, an empty
/// PostgreSQL database) says so in one line, prints nothing else and creates nothing.
pub async fn assert_refused_without_a_mirror(backend: Backend, args: &[&str]) {
    use secrecy::ExposeSecret;
    let (url, dir) = database(backend).await;
    let out = Vars::with_database(url.expose_secret()).run(args).await;
    assert!(!out.ok, "{args:?} succeeded: {}", out.stdout);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("there is no klarify-sync mirror at")
            && out.stderr.contains("klarify-sync --once"),
        "{}",
        out.stderr
    );
    match dir {
        Some(dir) => assert!(
            !dir.path().join("mirror.db").exists(),
            "{args:?} created the SQLite file"
        ),
        None => {
            let tables = scalar(
                &url,
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
            )
            .await;
            assert_eq!(tables, 0, "{args:?} created tables");
        }
    }
}

/// A running daemon (or demo): its JSON log lines, read as they come, and its HTTP address.
/// It must keep running until [`Daemon::terminate`].
pub struct Daemon {
    child: Child,
    /// Said by every failure, as the scenario's name.
    what: String,
    log: Arc<Mutex<Log>>,
    stdout: JoinHandle<()>,
    stderr: JoinHandle<String>,
    /// How many lines of each message [`Daemon::wait_for`] has returned.
    waited: HashMap<String, usize>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub addr: String,
}

#[derive(Default)]
struct Log {
    lines: Vec<Value>,
    /// The first line that showed a secret.
    leak: Option<String>,
}

impl Daemon {
    /// Starts `command` with JSON logs and waits until it serves HTTP.
    pub async fn start(mut command: Command, what: &str) -> Self {
        command
            .env("KLARIFY_SYNC__LOG__FORMAT", "json")
            .stdout(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let stdout = tokio::spawn({
            let log = log.clone();
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock().unwrap();
                    if SECRETS.iter().any(|s| line.contains(s)) {
                        log.leak.get_or_insert(line.clone());
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        log.lines.push(v);
                    }
                }
            }
        });
        let mut pipe = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s).await;
            s
        });
        let mut daemon = Self {
            child,
            what: what.to_owned(),
            log,
            stdout,
            stderr,
            waited: HashMap::new(),
            addr: String::new(),
        };
        let serving = daemon.wait_for(SERVING).await;
        daemon.addr = serving["addr"].as_str().unwrap().to_owned();
        daemon
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The log lines so far that `accept` likes.
    pub fn logged(&self, accept: impl Fn(&Value) -> bool) -> Vec<Value> {
        let log = self.log.lock().unwrap();
        log.lines.iter().filter(|v| accept(v)).cloned().collect()
    }

    pub fn count(&self, message: &str) -> usize {
        self.logged(|v| v["message"] == message).len()
    }

    /// Waits for the next log line with `message` (the first not returned before) and returns it.
    pub async fn wait_for(&mut self, message: &str) -> Value {
        let n = self.waited.entry(message.to_owned()).or_default();
        *n += 1;
        let n = *n;
        let deadline = Deadline::after(Duration::from_secs(60));
        loop {
            if let Some(v) = self
                .logged(|v| v["message"] == message)
                .into_iter()
                .nth(n - 1)
            {
                return v;
            }
            let awaited = format!("{message:?} (#{n})");
            self.keep_waiting(&deadline, Duration::from_millis(20), &awaited)
                .await;
        }
    }

    /// Waits, while the daemon runs, until `fake` has answered `n` requests.
    pub async fn wait_for_requests(&mut self, fake: &FakeKlarify, n: u64, within: Duration) {
        let deadline = Deadline::after(within);
        let awaited = format!("request {n} to the fake");
        while fake.requests() < n {
            self.keep_waiting(&deadline, Duration::from_millis(2), &awaited)
                .await;
        }
    }

    /// Between two looks: fails if the daemon has stopped or the deadline has passed, else waits
    /// `pause`.
    async fn keep_waiting(&mut self, deadline: &Deadline, pause: Duration, awaited: &str) {
        self.assert_running().await;
        assert!(
            Instant::now() < deadline.at,
            "{}: still waiting for {awaited} after {:?}",
            self.what,
            deadline.within
        );
        tokio::time::sleep(pause).await;
    }

    /// Fails if a secret was logged or the daemon has exited.
    async fn assert_running(&mut self) {
        self.assert_no_secret_logged();
        if let Some(status) = self.child.try_wait().unwrap() {
            let stderr = (&mut self.stderr).await.unwrap_or_default();
            panic!(
                "{}: the daemon exited ({status}) instead of waiting and retrying: {stderr}",
                self.what
            );
        }
    }

    fn assert_no_secret_logged(&self) {
        if let Some(line) = &self.log.lock().unwrap().leak {
            panic!("{}: a secret was logged: {line}", self.what);
        }
    }

    /// GETs `path`, giving the status and the body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::Client::new()
            .get(format!("http://{}{path}", self.addr))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Polls `/readyz` until `accept` likes the answer (the body as JSON, or as a string when it
    /// is none); returns it.
    pub async fn wait_ready(
        &mut self,
        accept: impl Fn(u16, &Value) -> bool,
        within: Duration,
    ) -> (u16, Value) {
        let deadline = Deadline::after(within);
        loop {
            let (status, text) = self.get("/readyz").await;
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            if accept(status, &body) {
                return (status, body);
            }
            let awaited = format!("another answer than {status} {body} from /readyz");
            self.keep_waiting(&deadline, Duration::from_millis(100), &awaited)
                .await;
        }
    }

    /// Sends SIGTERM; the daemon exits 0 `within` that time, having logged no secret.
    pub async fn terminate(mut self, within: Duration) {
        self.assert_running().await;
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: no exit within {within:?} of SIGTERM", self.what))
            .unwrap();
        // Its last lines, read to the end of the pipe.
        let _ = (&mut self.stdout).await;
        self.assert_no_secret_logged();
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        assert!(
            status.success(),
            "{}: exit status {status} after SIGTERM: {stderr}",
            self.what
        );
    }
}

struct Deadline {
    at: Instant,
    within: Duration,
}

impl Deadline {
    fn after(within: Duration) -> Self {
        Self {
            at: Instant::now() + within,
            within,
        }
    }
}
