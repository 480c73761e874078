//! The binary as users run it: modes, exit codes, one-line errors, signals, and secrets that
//! never show.

mod common;

use std::os::fd::FromRawFd;
use std::path::Path;
use std::time::Duration;

use common::binary::{self, fake, Daemon, Vars, ACCESS_KEY, DB_PASSWORD};
use common::{assert_same, source_of};
use klarify_fake::{FakeKlarify, Fault};

/// The binary with a clean environment pointing at `fake` and a SQLite file in `dir`.
fn env_for(fake: &FakeKlarify, dir: &tempfile::TempDir) -> Vars {
    let mut vars = Vars::new(fake, &common::sqlite_url(dir.path()));
    vars.set("RUST_LOG", "trace");
    vars
}

async fn mirror(dir: &tempfile::TempDir) -> Vec<klarify_sync::klarify::Procedure> {
    common::mirror_at(&common::sqlite_url(dir.path())).await
}

/// How long a daemon may take to stop after SIGTERM.
const STOPS_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn once_and_backfill_mirror_the_source_and_exit_zero() {
    let fake = fake(21, 150, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let out = env_for(&fake, &dir).run(&["--once"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert_same(&mirror(&dir).await, &source_of(&fake));
    assert!(out.stdout.contains("sync pass succeeded"), "{}", out.stdout);

    let victim = source_of(&fake)[0].id.clone();
    fake.delete(&victim);
    let out = env_for(&fake, &dir).run(&["--backfill"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert_same(&mirror(&dir).await, &source_of(&fake));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_key_is_one_line_and_one_request() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(&fake, &dir);
    env.set("KLARIFY_ACCESS_KEY", "wrong-but-also-secret");
    let out = env.run(&["--once"]).await;
    assert!(!out.ok);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("rejected the access key (HTTP 404)"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("KLARIFY_ACCESS_KEY"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("wrong-but-also-secret")
            && !out.stdout.contains("wrong-but-also-secret")
    );
    assert_eq!(fake.requests(), 1, "no retry storm");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_configuration_ends_before_any_request() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("KLARIFY_ACCESS_KEY", None, "klarify.access_key"),
        (
            "KLARIFY_SYNC__KLARIFY__PAGE_SIZE",
            Some("many"),
            "page_size",
        ),
        (
            "KLARIFY_SYNC__KLARIFY__BASE_URL",
            Some("http://klarify.example.com"),
            "must be https",
        ),
        ("DATABASE_URL", Some("mysql://db"), "database.url"),
        (
            "KLARIFY_SYNC__SCHEDULE__CRON",
            Some("sometimes"),
            "schedule.cron",
        ),
    ];
    for (key, value, expected) in cases {
        let mut env = env_for(&fake, &dir);
        match value {
            Some(v) => env.set(key, v),
            None => env.remove(key),
        };
        for mode in [&["--once"][..], &[]] {
            let out = env.run(mode).await;
            assert!(!out.ok, "{key}: accepted");
            assert_eq!(out.stderr.lines().count(), 1, "{key}: {}", out.stderr);
            assert!(out.stderr.contains(expected), "{key}: {}", out.stderr);
        }
    }
    assert_eq!(fake.requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_database_is_one_line_without_its_password() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(&fake, &dir);
    env.set(
        "DATABASE_URL",
        "postgres://mirror:hunter2-pw@127.0.0.1:1/mirror",
    );
    let out = env.run(&["--once"]).await;
    assert!(!out.ok);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("cannot open the database postgres://mirror:***@127.0.0.1:1/mirror"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("hunter2-pw") && !out.stdout.contains("hunter2-pw"));
}

#[tokio::test(flavor = "multi_thread")]
async fn api_failures_after_retries_are_one_line_and_keep_the_key_secret() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    fake.inject(
        Fault::Status {
            status: 500,
            retry_after_secs: None,
        },
        100,
    );
    let out = env_for(&fake, &dir).run(&["--once"]).await;
    assert!(!out.ok);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("HTTP 500 6 time(s)"), "{}", out.stderr);
    assert_eq!(fake.requests(), 6, "bounded attempts");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_serves_health_and_metrics_and_stops_cleanly_on_sigterm() {
    let fake = fake(21, 120, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let command = env_for(&fake, &dir).command(dir.path(), &[]);
    let mut daemon = Daemon::start(command, "the daemon").await;
    let scheduled = daemon.wait_for("scheduled").await;
    assert_eq!(scheduled["cron"], "0 */5 * * * *");
    assert!(
        scheduled["next"]
            .as_str()
            .is_some_and(|n| n.ends_with("UTC")),
        "{scheduled}"
    );
    daemon.wait_for("sync pass succeeded").await;

    assert_eq!(daemon.get("/healthz").await.0, 200);
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = daemon.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"klarify_sync_passes_total{mode="incremental",outcome="succeeded"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"klarify_sync_procedures_total{change="inserted"} 120"#),
        "{metrics}"
    );
    for statement in ["existing", "upsert_procedures", "insert_lanes", "commit"] {
        let count = format!(
            r#"klarify_sync_db_statement_duration_seconds_count{{statement="{statement}"}} "#
        );
        assert!(metrics.contains(&count), "no {count}in {metrics}");
    }
    assert!(!metrics.contains(ACCESS_KEY));
    // .ci/run checks the exposition format with `promtool check metrics`.
    std::fs::write(
        concat!(env!("CARGO_TARGET_TMPDIR"), "/metrics.prom"),
        &metrics,
    )
    .unwrap();
    assert_same(&mirror(&dir).await, &source_of(&fake));

    daemon.terminate(STOPS_WITHIN).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_reports_a_rejected_key_in_readyz_and_keeps_running() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(&fake, &dir);
    env.set("KLARIFY_ACCESS_KEY", "not-the-key");
    let command = env.command(dir.path(), &[]);
    let mut daemon = Daemon::start(command, "a daemon with a rejected key").await;
    daemon.wait_for("sync pass failed").await;
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 503);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["reason"], "key_rejected", "{body}");
    assert!(!body.to_string().contains("not-the-key"));
    assert_eq!(daemon.get("/healthz").await.0, 200, "alive, just not ready");
    daemon.terminate(STOPS_WITHIN).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_runs_without_a_key_or_network() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = Vars::with_database(&common::sqlite_url(dir.path()));
    env.set("KLARIFY_SYNC__HTTP__LISTEN", "127.0.0.1:0");
    let mut demo = Daemon::start(env.command(dir.path(), &["--demo"]), "the demo").await;
    demo.wait_for("sync pass succeeded").await;
    assert_eq!(demo.get("/readyz").await.0, 200);
    assert!(mirror(&dir).await.len() >= 250);
    demo.terminate(STOPS_WITHIN).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_the_watermark_counts_and_passes() {
    let fake = fake(21, 40, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    assert!(env_for(&fake, &dir).run(&["--backfill"]).await.ok);
    let out = env_for(&fake, &dir).run(&["status", "--json"]).await;
    assert!(out.ok, "{}", out.stderr);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(status["live_procedures"], 40);
    assert_eq!(status["recent_runs"][0]["mode"], "backfill");
    assert_eq!(status["recent_runs"][0]["outcome"], "succeeded");
    assert_eq!(status["recent_runs"][0]["inserted"], 40);
    let newest = source_of(&fake).iter().map(|p| p.updated_at).max().unwrap();
    assert_eq!(
        status["watermark"],
        klarify_sync::klarify::format_instant(newest)
    );

    let out = env_for(&fake, &dir).run(&["status"]).await;
    assert!(out.stdout.contains("40 live, 0 deleted"), "{}", out.stdout);
    assert!(out.stdout.contains("backfill succeeded"), "{}", out.stdout);
}

on_both_backends!(status_without_a_mirror_is_one_line_and_creates_nothing);

async fn status_without_a_mirror_is_one_line_and_creates_nothing(backend: common::Backend) {
    for args in [&["status"][..], &["status", "--json"]] {
        binary::assert_refused_without_a_mirror(backend, args).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_shows_progress_only_on_a_terminal() {
    let fake = fake(21, 300, Duration::from_millis(150)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(&fake, &dir);
    env.set("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", "50");
    env.set("RUST_LOG", "warn");
    let piped = env.run(&["--backfill"]).await;
    assert!(
        piped.ok && !piped.stdout.contains("procedures") && piped.stderr.is_empty(),
        "{}{}",
        piped.stdout,
        piped.stderr
    );

    // `script` gives the binary a pseudo-terminal, as a person's shell would.
    let command = format!("{} --backfill", binary::PROGRAM);
    let terminal = run_in_terminal(&env, &command).await;
    assert!(terminal.contains("/300 procedures"), "{terminal}");
}

async fn run_in_terminal(env: &Vars, command: &str) -> String {
    let cwd = tempfile::tempdir().unwrap();
    let args = ["-qec", command, "/dev/null"];
    let mut script = env.command_of(Path::new("script"), cwd.path(), &args);
    script.env("TERM", "xterm");
    let out = binary::run(script).await;
    assert!(out.ok, "`script` (util-linux) runs: {}", out.stderr);
    out.stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn every_log_line_of_a_pass_carries_its_run_id_and_filters_apply() {
    let fake = fake(21, 60, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    fake.inject(
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        2,
    );
    let mut env = env_for(&fake, &dir);
    env.set("KLARIFY_SYNC__LOG__FORMAT", "json");
    env.set("RUST_LOG", "klarify_sync=info");
    let out = env.run(&["--once"]).await;
    assert!(out.ok, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let retries: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "Klarify request failed; retrying")
        .collect();
    assert_eq!(retries.len(), 2, "{}", out.stdout);
    let done = lines
        .iter()
        .find(|l| l["message"] == "sync pass succeeded")
        .expect("the pass's line");
    for line in retries {
        assert_eq!(line["span"]["run"], 1, "no run id: {line}");
        assert_eq!(line["span"]["mode"], "incremental", "{line}");
    }
    assert_eq!(
        (&done["run"], &done["mode"], &done["inserted"]),
        (&1.into(), &"incremental".into(), &60.into())
    );
    assert!(
        done["watermark"].is_string() && done["duration_ms"].is_u64() && done["pages"].is_u64()
    );

    // The filter comes from log.filter when RUST_LOG is unset.
    env.remove("RUST_LOG");
    env.set("KLARIFY_SYNC__LOG__FILTER", "warn");
    let quiet = env.run(&["--once"]).await;
    assert!(quiet.ok && quiet.stdout.is_empty(), "{}", quiet.stdout);
}

/// Every spelling in which sqlx takes a PostgreSQL password (userinfo, `password=`, the key
/// percent-encoded, a parameter sqlx does not know and would log), and a SQLite URL given one,
/// for a database that does not exist: no mode's stdout or stderr, no log line and no `/readyz`
/// answer shows the password.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_password_never_shows_when_the_database_fails() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    // A server that answers (a refused connection is retried for 10 s), without the database.
    let mut missing = url::Url::parse(&common::pg::fresh_database().await).unwrap();
    missing.set_path("/no_such_database");
    let with_query = |query: &str| {
        let mut url = missing.clone();
        let query = [url.query(), Some(query)].into_iter().flatten();
        url.set_query(Some(&query.collect::<Vec<_>>().join("&")));
        url.to_string()
    };
    let mut userinfo = missing.clone();
    userinfo.set_password(Some(DB_PASSWORD)).unwrap();
    let urls = [
        userinfo.to_string(),
        with_query(&format!("password={DB_PASSWORD}")),
        with_query(&format!("pass%77ord={DB_PASSWORD}")),
        with_query(&format!("sslpassword={DB_PASSWORD}")),
        format!("{}?password={DB_PASSWORD}", common::sqlite_url(dir.path())),
    ];
    for url in urls {
        let mut env = env_for(&fake, &dir);
        env.set("DATABASE_URL", &url);
        for args in [
            &["--once"][..],
            &["--backfill"],
            &["status"],
            &["status", "--json"],
        ] {
            let out = env.run(args).await;
            assert!(!out.ok, "{url} {args:?}: {}", out.stdout);
            assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        }
        if url.contains("sslpassword") {
            continue; // refused at start, before the daemon would serve anything
        }
        let mut daemon = Daemon::start(
            env.command(dir.path(), &[]),
            "a daemon whose database fails",
        )
        .await;
        daemon.wait_for("cannot open the database").await;
        let (status, body) = daemon.get("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("cannot open the database"), "{body}");
        binary::assert_no_secret_in(&body);
        daemon.terminate(STOPS_WITHIN).await;
    }
}

/// A database that works, reached with `?password=` (the test server trusts local connections,
/// so the password is sent nowhere): the logs of a failed and a good pass, `status` and the
/// recorded errors in `sync_runs` never show it.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_password_never_shows_when_the_database_works() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let url = common::pg::fresh_database().await;
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}password={DB_PASSWORD}");
    let mut env = env_for(&fake, &dir);
    env.set("DATABASE_URL", &url);
    let mut wrong_key = env.clone();
    wrong_key.set("KLARIFY_ACCESS_KEY", "not-the-key");
    assert!(!wrong_key.run(&["--once"]).await.ok);
    let out = env.run(&["--once"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("sync pass succeeded"), "{}", out.stdout);
    for args in [&["status"][..], &["status", "--json"]] {
        let out = env.run(args).await;
        assert!(
            out.stdout.contains("rejected the access key"),
            "{}",
            out.stdout
        );
    }
    let url = url.into();
    let errors = "SELECT COUNT(*) FROM sync_runs WHERE error IS NOT NULL";
    assert_eq!(common::scalar(&url, errors).await, 1);
    let leaks = format!("{errors} AND error LIKE '%{DB_PASSWORD}%'");
    assert_eq!(common::scalar(&url, &leaks).await, 0);
}

/// With a plain-http (loopback) API, a proxy from the environment would see the access key in
/// clear text: klarify-sync goes direct, and the proxy is never contacted.
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_api_is_never_reached_through_a_proxy() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let contacted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let contacted = contacted.clone();
        async move {
            while proxy.accept().await.is_ok() {
                contacted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let mut env = env_for(&fake, &dir);
    for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        env.set(var, &proxy_url);
    }
    let out = env.run(&["--once"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(contacted.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_same(&mirror(&dir).await, &source_of(&fake));
}

/// `KLARIFY_SYNC_CONFIG` names the `--config` file, for platforms that mount a config file
/// but do not change the command line.
#[tokio::test(flavor = "multi_thread")]
async fn klarify_sync_config_names_the_config_file() {
    let fake = fake(21, 10, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("klarify-sync.toml");
    std::fs::write(
        &file,
        format!("[klarify]\nbase_url = \"{}\"\n", fake.base_url()),
    )
    .unwrap();
    let mut env = env_for(&fake, &dir);
    env.remove("KLARIFY_SYNC__KLARIFY__BASE_URL");
    env.set("KLARIFY_SYNC_CONFIG", file.to_str().unwrap());
    let out = env.run(&["--once"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert_same(&mirror(&dir).await, &source_of(&fake));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_is_one_line_and_exit_code_1() {
    // `status` writing to a pipe nobody reads any more (`klarify-sync status | true`): printing
    // panics, as it does anywhere in Rust; what matters is how the binary reports a panic.
    let fake = fake(21, 1, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    // `status` reads an existing mirror only.
    assert!(env_for(&fake, &dir).run(&["--backfill"]).await.ok);
    let mut fds = [0; 2];
    // SAFETY: a new pipe; its read end is closed at once, its write end handed to the child.
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        std::os::fd::OwnedFd::from_raw_fd(fds[1])
    };
    let mut status = env_for(&fake, &dir).command(dir.path(), &["status"]);
    status.env("RUST_BACKTRACE", "1").stdout(write_end);
    let out = binary::run(status).await;
    let stderr = out.stderr;
    assert_eq!(out.code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("klarify-sync: ") && stderr.contains("Broken pipe"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn many_idle_connections_leave_the_daemon_answering_and_syncing() {
    const MAX_FILES: u64 = 256;
    let fake = fake(21, 100, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(&fake, &dir);
    env.set("KLARIFY_SYNC__SCHEDULE__CRON", "* * * * * *");
    // Fewer lines than at trace level.
    env.set("RUST_LOG", "info");
    let mut command = env.command(dir.path(), &[]);
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: MAX_FILES,
                rlim_max: MAX_FILES,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let mut daemon = Daemon::start(command, "a daemon out of file descriptors").await;
    let addr = daemon.addr.clone();
    daemon.wait_for("sync pass succeeded").await;

    // More connections than the daemon has file descriptors, all silent.
    let mut idle = Vec::new();
    for _ in 0..MAX_FILES + 150 {
        let connect = tokio::net::TcpStream::connect(&addr);
        let connected = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .expect("the daemon keeps accepting connections");
        idle.push(connected.unwrap());
    }
    let health = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("/healthz answers");
    assert_eq!(health.status(), 200);

    let edited = source_of(&fake)[0].id.clone();
    fake.edit(&edited);
    while mirror(&dir).await != source_of(&fake) {
        daemon.wait_for("sync pass succeeded").await;
    }
    drop(idle);
    daemon.terminate(STOPS_WITHIN).await;
}
