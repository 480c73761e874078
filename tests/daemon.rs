//! The daemon in-process: leadership between replicas, the scheduled reconciliation, passes
//! that panic, readiness probes that must not take the sync's connections, and the HTTP limits.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{Backend, Env};
use klarify_fake::{Fault, Organisation};
use klarify_sync::app::{sync_pass, Builder};
use klarify_sync::config::Settings;
use klarify_sync::daemon::{DaemonError, Pass, SyncPass};
use klarify_sync::http::{serve, HttpLimits};
use klarify_sync::store::{PageWrite, RunOutcome, Store, UnprovenGroup};
use klarify_sync::sync::{Mode, PassReport, SyncError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

on_both_backends!(
    only_one_replica_syncs_and_the_other_takes_over,
    the_scheduled_reconciliation_detects_deletions,
    readyz_says_never_synced_stale_and_schema_mismatch,
    a_panicking_pass_is_a_failed_pass_and_retried,
    a_sync_loop_that_dies_ends_the_daemon,
    readyz_probes_cannot_take_the_syncs_connections,
    an_unproven_tie_group_shows_in_readyz_status_and_metrics,
);

type Running = (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), DaemonError>>,
);

/// A daemon on port 0 over `env`'s source and database, stopped by sending on the channel.
async fn start(env: &Env, cron: &str, backfill_cron: Option<&str>) -> Running {
    start_with(env, cron, backfill_cron, Duration::from_secs(600)).await
}

async fn start_with(
    env: &Env,
    cron: &str,
    backfill_cron: Option<&str>,
    max_staleness: Duration,
) -> Running {
    let mut settings = settings(env, cron);
    settings.schedule.backfill_cron = backfill_cron.map(|c| c.parse().unwrap());
    settings.health.max_staleness_secs = max_staleness.as_secs();
    run(daemon(&settings)).await
}

/// The settings of a daemon over `env`'s source and database that syncs on `cron`.
fn settings(env: &Env, cron: &str) -> Settings {
    let mut settings = env.settings();
    settings.schedule.cron = cron.parse().unwrap();
    settings
}

/// The daemon `settings` describe, as `main` builds it, retrying fast.
fn daemon(settings: &Settings) -> Builder {
    common::app::daemon(settings, sync_pass(settings).unwrap())
}

async fn run<P: Pass>(daemon: Builder<P>) -> Running {
    let daemon = daemon.build().await.unwrap();
    let addr = daemon.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(daemon.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

async fn readyz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Polls `check` until it holds, failing after 20 s.
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn only_one_replica_syncs_and_the_other_takes_over(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(31, 200), 50).await;
    let every_second = "* * * * * *";
    let (a, stop_a, task_a) = start(&env, every_second, None).await;
    eventually("the first replica is ready", || async {
        readyz(a).await.0 == 200
    })
    .await;
    let (b, stop_b, task_b) = start(&env, every_second, None).await;
    eventually("the second replica reports standby", || async {
        readyz(b).await.1["reason"] == "standby"
    })
    .await;

    // While A leads, B never runs a pass.
    let passes_before = count_runs(&env).await;
    env.fake.edit(&env.source()[0].id);
    eventually("the leader syncs the edit", || env.mirror_equals_source()).await;
    assert_eq!(readyz(b).await.1["reason"], "standby");
    assert!(count_runs(&env).await > passes_before);

    stop_a.send(()).unwrap();
    task_a.await.unwrap().unwrap();
    eventually("the standby takes over", || async {
        readyz(b).await.0 == 200
    })
    .await;
    env.fake.edit(&env.source()[1].id);
    eventually("the new leader syncs", || env.mirror_equals_source()).await;
    assert_no_overlapping_runs(&env).await;

    stop_b.send(()).unwrap();
    task_b.await.unwrap().unwrap();
}

async fn the_scheduled_reconciliation_detects_deletions(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(32, 100), 50).await;
    // Incremental passes essentially never (1 January); reconciliation every second.
    let (addr, stop, task) = start(&env, "0 0 0 1 1 *", Some("* * * * * *")).await;
    eventually("ready", || async { readyz(addr).await.0 == 200 }).await;
    for p in env.source().iter().take(5) {
        env.fake.delete(&p.id);
    }
    eventually("deletions reach the mirror", || async {
        env.mirror().await.len() == 95
    })
    .await;
    env.assert_mirror_equals_source().await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

async fn pool(env: &Env) -> sqlx::AnyPool {
    use secrecy::ExposeSecret;
    common::any_pool(env.database_url.expose_secret())
        .await
        .unwrap()
}

async fn count_runs(env: &Env) -> i64 {
    common::scalar(&env.database_url, "SELECT COUNT(*) FROM sync_runs").await
}

/// No pass started before the previous one finished.
async fn assert_no_overlapping_runs(env: &Env) {
    let sql =
        "SELECT CAST(started_at AS TEXT), CAST(finished_at AS TEXT) FROM sync_runs ORDER BY id";
    let runs: Vec<(String, String)> = sqlx::query_as(sql)
        .fetch_all(&pool(env).await)
        .await
        .unwrap();
    for pair in runs.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "passes overlap: {pair:?}");
    }
}

async fn readyz_says_never_synced_stale_and_schema_mismatch(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(33, 60), 50).await;
    // The first pass hangs on its first request: the daemon has never synced.
    env.fake.inject(Fault::Hang(Duration::from_secs(3)), 1);
    let (addr, stop, task) = start_with(&env, "0 0 0 1 1 *", None, Duration::from_secs(2)).await;
    eventually("never synced", || async {
        readyz(addr).await.1["reason"] == "never_synced"
    })
    .await;
    eventually("ready", || async { readyz(addr).await.0 == 200 }).await;
    // No pass is due until next year, so the last success ages past max_staleness (2 s).
    eventually("stale", || async {
        readyz(addr).await.1["reason"] == "stale"
    })
    .await;

    // Another version of klarify-sync migrated the database further.
    let newer = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 SELECT 9999, 'newer', success, checksum, execution_time FROM _sqlx_migrations WHERE version = 1";
    sqlx::query(newer).execute(&pool(&env).await).await.unwrap();
    let (status, body) = readyz(addr).await;
    assert_eq!(
        (status, &body["reason"]),
        (503, &"schema_mismatch".into()),
        "{body}"
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

async fn healthz(addr: SocketAddr) -> Result<u16, reqwest::Error> {
    let response = reqwest::get(format!("http://{addr}/healthz")).await?;
    Ok(response.status().as_u16())
}

/// The count of panicked incremental passes in `/metrics` (shared by the tests of this binary).
async fn panicked_passes(addr: SocketAddr) -> u64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(r#"klarify_sync_passes_total{mode="incremental",outcome="panicked"} "#)
        })
        .map_or(0, |n| n.parse().unwrap())
}

/// The real pass, except that while `panicking` is set it panics in the middle: once the pass
/// has taken its lock and recorded its run, with a request in flight.
struct PanicsWhileSet {
    inner: SyncPass,
    panicking: Arc<AtomicBool>,
}

impl Pass for PanicsWhileSet {
    async fn run(
        &self,
        store: &Store,
        mode: Mode,
        shutdown: &CancellationToken,
    ) -> Result<PassReport, SyncError> {
        if !self.panicking.load(Ordering::SeqCst) {
            return self.inner.run(store, mode, shutdown).await;
        }
        let newest = || async {
            let runs = store
                .status(1, time::OffsetDateTime::now_utc())
                .await
                .unwrap()
                .recent_runs;
            runs.into_iter().next().map(|r| (r.id, r.outcome))
        };
        let before = newest().await.map_or(0, |(id, _)| id);
        let pass = self.inner.run(store, mode, shutdown);
        let begun = async {
            while !newest()
                .await
                .is_some_and(|(id, outcome)| id > before && outcome == RunOutcome::Running)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            outcome = pass => outcome,
            () = begun => panic!("a bug in a pass"),
        }
    }
}

async fn a_panicking_pass_is_a_failed_pass_and_retried(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(34, 80), 50).await;
    // Every request hangs (past the client's time-out) until the faults are cleared.
    env.fake
        .inject(Fault::Hang(Duration::from_secs(10)), 10_000);
    let panicking = Arc::new(AtomicBool::new(true));
    // No pass is scheduled before next year: every pass after the first is a retry.
    let settings = settings(&env, "0 0 0 1 1 *");
    let pass = PanicsWhileSet {
        inner: sync_pass(&settings).unwrap(),
        panicking: panicking.clone(),
    };
    let (addr, stop, task) = run(common::app::daemon(&settings, pass)).await;
    let before = panicked_passes(addr).await;
    eventually("readyz reports the panic", || async {
        let (status, body) = readyz(addr).await;
        status == 503
            && body["reason"] == "internal_error"
            && body["detail"].as_str().unwrap().contains("a bug in a pass")
    })
    .await;
    eventually("the panicked pass is retried and counted", || async {
        panicked_passes(addr).await >= before + 2
    })
    .await;
    assert_eq!(healthz(addr).await.unwrap(), 200, "the daemon lives on");

    panicking.store(false, Ordering::SeqCst);
    env.fake.clear_faults();
    eventually("a retry succeeds", || async { readyz(addr).await.0 == 200 }).await;
    env.assert_mirror_equals_source().await;
    // The panicked passes released their lock (or no pass could have run since) and their runs
    // are closed.
    let runs = env
        .store
        .status(100, time::OffsetDateTime::now_utc())
        .await
        .unwrap()
        .recent_runs;
    assert_eq!(runs[0].outcome, RunOutcome::Succeeded);
    assert!(
        runs[1..].iter().all(|r| r.outcome == RunOutcome::Abandoned),
        "{runs:?}"
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// Panics with a payload that panics again when the loop drops it: a panic in the loop itself,
/// outside the pass, as a bug there would raise.
struct PanicsInTheLoop;

struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        panic!("a bug in the sync loop");
    }
}

impl Pass for PanicsInTheLoop {
    async fn run(
        &self,
        _: &Store,
        _: Mode,
        _: &CancellationToken,
    ) -> Result<PassReport, SyncError> {
        std::panic::panic_any(PanicsWhenDropped)
    }
}

async fn a_sync_loop_that_dies_ends_the_daemon(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(35, 10), 50).await;
    let settings = settings(&env, "* * * * * *");
    let (addr, _stop, task) = run(common::app::daemon(&settings, PanicsInTheLoop)).await;
    let ended = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the daemon ends by itself when its sync loop dies")
        .unwrap();
    match ended {
        Err(DaemonError::SyncLoop(why)) => {
            assert!(why.contains("a bug in the sync loop"), "{why}")
        }
        other => panic!("expected the sync loop's death, got {other:?}"),
    }
    assert!(healthz(addr).await.is_err(), "nothing answers /healthz");
}

async fn readyz_probes_cannot_take_the_syncs_connections(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(36, 60), 50).await;
    let (addr, stop, task) = run(daemon(&settings(&env, "* * * * * *"))).await;
    eventually("ready", || async { readyz(addr).await.0 == 200 }).await;

    // On PostgreSQL every readiness probe now waits for a lock on the schema's history (as while
    // another version migrates), holding its connection. SQLite readers never wait in WAL mode:
    // there the flood of probes is all the test does.
    let mut holder = pool(&env).await.begin().await.unwrap();
    if let Backend::Postgres = backend {
        sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *holder)
            .await
            .unwrap();
    }
    let flooding = CancellationToken::new();
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let flooding = flooding.clone();
            tokio::spawn(async move {
                while !flooding.is_cancelled() {
                    let _ = reqwest::get(format!("http://{addr}/readyz")).await;
                }
            })
        })
        .collect();
    env.fake.edit(&env.source()[0].id);
    env.fake.edit(&env.source()[1].id);
    eventually("the sync goes on", || env.mirror_equals_source()).await;
    flooding.cancel();
    for f in flood {
        f.await.unwrap();
    }
    holder.rollback().await.unwrap();
    eventually("ready again", || async { readyz(addr).await.0 == 200 }).await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// [`serve`] with `limits` over a route that answers and one that never does.
async fn serve_with(limits: HttpLimits) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route("/never", get(std::future::pending::<&'static str>));
    let token = CancellationToken::new();
    tokio::spawn(serve(listener, app, limits, token.clone()));
    (addr, token)
}

/// Reads until the server closes the connection, failing after 5 s.
async fn closed_by_server(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .expect("the server keeps the connection open")
        .unwrap();
    received
}

async fn get_within_5s(addr: SocketAddr, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn clients_that_send_no_request_are_disconnected() {
    let (addr, _token) = serve_with(HttpLimits {
        header_read_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    })
    .await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    closed_by_server(&mut silent).await;

    // Also a keep-alive connection left idle after its first response.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /ok HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let received = closed_by_server(&mut idle).await;
    assert!(received.starts_with(b"HTTP/1.1 200"), "{received:?}");
}

#[tokio::test]
async fn a_request_not_answered_in_time_gets_408() {
    let (addr, _token) = serve_with(HttpLimits {
        request_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    })
    .await;
    let response = get_within_5s(addr, "/never").await;
    assert_eq!(response.status(), 408);
}

#[tokio::test]
async fn beyond_the_cap_the_oldest_connection_makes_room() {
    let (addr, _token) = serve_with(HttpLimits {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(600),
        ..HttpLimits::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let response = get_within_5s(addr, "/ok").await;
    assert_eq!(response.status(), 200);
    closed_by_server(&mut idle[0]).await;
}

async fn an_unproven_tie_group_shows_in_readyz_status_and_metrics(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(36, 40), 50).await;
    // Any unproven group is overdue at once; no pass is scheduled before next year.
    let mut settings = settings(&env, "0 0 0 1 1 *");
    settings.health.max_unproven_secs = 0;
    let (addr, stop, task) = run(daemon(&settings)).await;
    eventually("the first pass succeeds", || async {
        let (status, body) = readyz(addr).await;
        status == 200 && body["unproven_tie_groups"] == 0
    })
    .await;
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for gauge in [
        "klarify_sync_unproven_tie_groups 0",
        "klarify_sync_future_dated_procedures 0",
    ] {
        assert!(metrics.contains(gauge), "{gauge} missing from /metrics");
    }
    // As a pass leaves a group it could not prove complete.
    let at = klarify_sync::klarify::parse_instant("2025-05-01T10:00:00Z").unwrap();
    let run = env.store.begin_run(Mode::Incremental, None).await.unwrap();
    let group = UnprovenGroup {
        at,
        size_bound: 450,
        size_counted: 449,
    };
    env.store
        .write_page(&PageWrite {
            run,
            items: &[],
            rejected: &[],
            watermark: None,
            track_seen: false,
            unproven: &[group],
            proven: &[],
        })
        .await
        .unwrap();
    let (status, body) = readyz(addr).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason"], "unproven_tie_group", "{body}");
    assert_eq!(body["unproven_tie_groups"], 1, "{body}");
    let shown = klarify_sync::status::render_text(
        &env.store
            .status(1, time::OffsetDateTime::now_utc())
            .await
            .unwrap(),
    );
    assert!(
        shown.contains(
            "tie group at 2025-05-01T10:00:00.000000Z: at most 450 procedure(s), 449 served since"
        ),
        "{shown}"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
