//! The database goes away: PostgreSQL stopped before the start or in the middle of a pass, and
//! SQLite files that are locked or read-only. The binary runs as a subprocess; PostgreSQL is a
//! private cluster of each test's own (`common::pg::private_cluster`), never the shared one.
//!
//! The daemon retries a failed pass with backoff from 5 s, or at the next cron tick; the tests
//! set the schedule to every second so a recovery is seen within seconds.

mod common;

use std::path::Path;
use std::time::Duration;

use common::binary::{self, fake, run, Daemon, Output, Vars, ACCESS_KEY};
use common::{assert_same, mirror_at, source_of};
use klarify_fake::{Churn, FakeKlarify};
use serde_json::Value;
use tokio::process::Command;

const EVERY_SECOND: &str = "* * * * * *";
/// How long a daemon may take to stop after SIGTERM.
const STOPS_WITHIN: Duration = Duration::from_secs(15);

/// The binary with a clean environment, pointed at `fake` and `database_url`.
fn command(fake: &FakeKlarify, database_url: &str, cwd: &Path, args: &[&str]) -> Command {
    vars(fake, database_url).command(cwd, args)
}

fn vars(fake: &FakeKlarify, database_url: &str) -> Vars {
    let mut vars = Vars::new(fake, database_url);
    vars.set("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", "20")
        .set("KLARIFY_SYNC__SCHEDULE__CRON", EVERY_SECOND)
        .set("KLARIFY_SYNC__LOG__FORMAT", "json")
        .set("RUST_LOG", "info");
    vars
}

/// One line on stderr, naming the problem; no panic, no backtrace, no clause said twice.
fn assert_one_clean_line(out: &Output, what: &str) {
    eprintln!("{what}: {}", out.stderr.trim_end());
    assert!(!out.ok, "{what}: klarify-sync succeeded");
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "{what}: one line on stderr, got:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.starts_with("klarify-sync: ") && !out.stderr.contains("panicked"),
        "{what}: {}",
        out.stderr
    );
    let clauses: Vec<&str> = out
        .stderr
        .trim_end()
        .split(": ")
        .map(str::trim)
        .filter(|c| c.len() >= 12)
        .collect();
    for (i, clause) in clauses.iter().enumerate() {
        assert!(
            !clauses[i + 1..].contains(clause),
            "{what}: the message repeats {clause:?}: {}",
            out.stderr
        );
    }
}

/// A clear message about a SQLite file: one clean line that says what is wrong (one of
/// `words`) and which database (its file, or the setting that names it).
fn assert_clear_sqlite_message(out: &Output, what: &str, words: &[&str]) {
    assert_one_clean_line(out, what);
    let line = out.stderr.to_lowercase();
    assert!(
        words.iter().any(|w| line.contains(w)),
        "{what}: says what is wrong ({words:?}): {}",
        out.stderr
    );
    assert!(
        ["mirror.db", "database.url", "database_url"]
            .iter()
            .any(|w| line.contains(w)),
        "{what}: says which database (its file or database.url): {}",
        out.stderr
    );
}

fn database_reason(body: &Value) -> bool {
    matches!(
        body["reason"].as_str(),
        Some("database_down" | "database_error")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_with_postgres_stopped_fails_with_one_clean_line() {
    let pg = common::pg::private_cluster().await;
    let url = pg.create_database("mirror").await;
    pg.stop().await;
    let fake = fake(77, 30, Duration::ZERO).await;
    let cwd = tempfile::tempdir().unwrap();
    for mode in ["--once", "--backfill"] {
        let out = run(command(&fake, &url, cwd.path(), &[mode])).await;
        assert_one_clean_line(&out, mode);
        assert!(
            out.stderr.contains("cannot open the database")
                && out.stderr.contains(&format!("127.0.0.1:{}", pg.port())),
            "{mode}: says which database cannot be opened: {}",
            out.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_while_postgres_is_down_reports_it_and_recovers_without_restart() {
    let pg = common::pg::private_cluster().await;
    let url = pg.create_database("mirror").await;
    pg.stop().await;
    let fake = fake(77, 150, Duration::ZERO).await;
    let cwd = tempfile::tempdir().unwrap();
    let what = "daemon started with PostgreSQL down";
    let mut daemon = Daemon::start(command(&fake, &url, cwd.path(), &[]), what).await;
    assert_eq!(daemon.get("/healthz").await.0, 200, "{what}: alive");
    let (_, body) = daemon
        .wait_ready(
            |status, body| status == 503 && database_reason(body),
            Duration::from_secs(30),
        )
        .await;
    assert!(!body.to_string().contains(ACCESS_KEY));
    let pid = daemon.pid();

    pg.start().await;
    daemon
        .wait_ready(|status, _| status == 200, Duration::from_secs(60))
        .await;
    assert_eq!(daemon.pid(), pid, "{what}: recovered without a restart");
    assert_same(&mirror_at(&url).await, &source_of(&fake));
    daemon.terminate(STOPS_WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_pass_fails_the_pass_and_the_daemon_recovers() {
    let pg = common::pg::private_cluster().await;
    let url = pg.create_database("mirror").await;
    let fake = fake(77, 400, Duration::from_millis(40)).await;
    let cwd = tempfile::tempdir().unwrap();
    let what = "PostgreSQL stopped mid-pass";
    let mut daemon = Daemon::start(command(&fake, &url, cwd.path(), &[]), what).await;
    daemon
        .wait_for_requests(&fake, 5, Duration::from_secs(30))
        .await;
    pg.stop().await;
    let failed = daemon.wait_for("sync pass failed").await;
    assert_eq!(
        daemon.count("sync pass succeeded"),
        0,
        "{what}: the pass was meant to be cut by the outage"
    );
    let error = failed["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("database"),
        "{what}: names the database: {error}"
    );
    assert_eq!(error.lines().count(), 1, "{what}: {error}");
    daemon
        .wait_ready(
            |status, body| status == 503 && database_reason(body),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(daemon.get("/healthz").await.0, 200, "{what}: alive");
    // It keeps trying while the database is away.
    daemon.wait_for("sync pass failed").await;

    fake.apply(&Churn {
        edits: 30,
        inserts: 5,
        ..Churn::default()
    });
    pg.start().await;
    daemon
        .wait_ready(|status, _| status == 200, Duration::from_secs(90))
        .await;
    // Ready again means a pass succeeded after the restart, so it read the changes made
    // while the database was away.
    assert_same(&mirror_at(&url).await, &source_of(&fake));
    daemon.terminate(STOPS_WITHIN).await;
}

/// A SQLite mirror after one successful `--once`, in WAL mode like every mirror.
async fn sqlite_mirror(fake: &FakeKlarify) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.db");
    let url = format!("sqlite://{}", path.display());
    let out = run(command(fake, &url, dir.path(), &["--once"])).await;
    assert!(out.ok, "{}", out.stderr);
    (dir, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_file_gets_a_clear_message() {
    use sqlx::{Connection, Executor};
    let fake = fake(77, 40, Duration::ZERO).await;
    let (dir, url) = sqlite_mirror(&fake).await;
    fake.apply(&Churn {
        edits: 5,
        ..Churn::default()
    });
    // Another program holds the write lock, as a long-running import or a stuck tool would.
    let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
    holder.execute("BEGIN EXCLUSIVE").await.unwrap();
    let out = run(command(&fake, &url, dir.path(), &["--once"])).await;
    holder.execute("ROLLBACK").await.unwrap();
    holder.close().await.unwrap();

    assert_one_clean_line(&out, "locked SQLite file");
    let line = out.stderr.to_lowercase();
    assert!(
        line.contains("locked"),
        "says the file is locked: {}",
        out.stderr
    );
    assert!(
        line.contains("mirror.db")
            || line.contains("database.url")
            || line.contains("database_url"),
        "says which database (its path or the setting): {}",
        out.stderr
    );
    // Once the lock is gone, the next run catches up.
    let out = run(command(&fake, &url, dir.path(), &["--once"])).await;
    assert!(out.ok, "{}", out.stderr);
    assert_same(&mirror_at(&url).await, &source_of(&fake));
}

/// Whom to run the binary as so that file permissions bind: root ignores them, so when the
/// tests run as root (CI) the binary runs as `nobody`.
fn unprivileged() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let pw = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
    assert!(
        !pw.is_null(),
        "running the tests as root needs the `nobody` user"
    );
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_sqlite_file_gets_a_clear_message() {
    use std::fs::{set_permissions, Permissions};
    use std::os::unix::fs::{chown, PermissionsExt};
    const READ_ONLY: &[&str] = &["read-only", "readonly", "read only", "permission"];
    let fake = fake(77, 40, Duration::ZERO).await;
    let (dir, url) = sqlite_mirror(&fake).await;
    fake.apply(&Churn {
        edits: 5,
        ..Churn::default()
    });
    let user = unprivileged();
    // The build may sit where `nobody` cannot reach it (a root checkout under /root, 0700): it
    // runs a copy in a directory of its own.
    let copy = tempfile::tempdir().unwrap();
    let program = match user {
        Some(_) => {
            let program = copy.path().join("klarify-sync");
            std::fs::copy(binary::PROGRAM, &program).unwrap();
            set_permissions(copy.path(), Permissions::from_mode(0o755)).unwrap();
            program
        }
        None => Path::new(binary::PROGRAM).to_owned(),
    };
    let as_user = |url: &str| {
        let mut cmd = vars(&fake, url).command_of(&program, dir.path(), &["--once"]);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    };

    let mut outs = Vec::new();
    // Opened read-only on purpose.
    let out = run(command(
        &fake,
        &format!("{url}?mode=ro"),
        dir.path(),
        &["--once"],
    ))
    .await;
    outs.push(("mode=ro", out));

    // A read-only database in a directory the process may write to (-wal, -shm), its lock
    // files (if any) left writable: only the database itself refuses writes.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let lock = path.extension().is_some_and(|e| e == "lock");
        let mode = if lock { 0o666 } else { 0o444 };
        set_permissions(&path, Permissions::from_mode(mode)).unwrap();
    }
    if let Some((uid, gid)) = user {
        chown(dir.path(), Some(uid), Some(gid)).unwrap();
    }
    let out = run(as_user(&url)).await;
    outs.push(("read-only file", out));

    // ... and in a read-only directory.
    set_permissions(dir.path(), Permissions::from_mode(0o555)).unwrap();
    let out = run(as_user(&url)).await;
    set_permissions(dir.path(), Permissions::from_mode(0o755)).unwrap();
    outs.push(("read-only file and directory", out));
    for (what, out) in &outs {
        eprintln!("{what}: {}", out.stderr.trim_end());
    }
    for (what, out) in &outs {
        assert_clear_sqlite_message(out, what, READ_ONLY);
    }
}

/// PostgreSQL's refusals are told in PostgreSQL's terms: a user without the privilege to create
/// the mirror's tables, and a database that does not exist. (Through one driver for both
/// backends, every error code was read as SQLite's, and a missing privilege came out as "the
/// database file is locked… sqlite3 shell?".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusals_get_postgres_messages() {
    use sqlx::{Connection, Executor};
    let fake = fake(77, 10, Duration::ZERO).await;
    let cwd = tempfile::tempdir().unwrap();
    let url = common::pg::fresh_database().await;
    let role = format!("kst_reader_{:08x}", rand::random::<u32>());
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    admin
        .execute(format!("CREATE ROLE {role} LOGIN").as_str())
        .await
        .unwrap();
    admin.close().await.unwrap();
    // PostgreSQL 15 lets only the owner create in `public`.
    let as_reader = url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(as_reader, url, "the test server's URL names its user");

    let out = run(command(&fake, &as_reader, cwd.path(), &["--once"])).await;
    assert_one_clean_line(&out, "a user without privileges");
    let line = out.stderr.to_lowercase();
    assert!(
        line.contains("privilege"),
        "names the missing privilege: {}",
        out.stderr
    );
    assert!(
        !line.contains("sqlite") && !line.contains("locked"),
        "says nothing of SQLite: {}",
        out.stderr
    );

    let missing = format!("{}_missing", url.rsplit_once('?').map_or(&*url, |(u, _)| u));
    let out = run(command(&fake, &missing, cwd.path(), &["--once"])).await;
    assert_one_clean_line(&out, "a database that does not exist");
    assert!(
        out.stderr.contains("does not exist") && out.stderr.contains("createdb"),
        "says the database is missing and how to make it: {}",
        out.stderr
    );
}
