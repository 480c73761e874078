//! The daemon in-process: leadership between replicas and the scheduled reconciliation.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Backend, Env};
use klarify_sync::daemon::Daemon;
use klarify_sync::fake::{Fault, Organisation};
use klarify_sync::klarify::KlarifyClient;
use tokio::sync::oneshot;

on_both_backends!(
    only_one_replica_syncs_and_the_other_takes_over,
    the_scheduled_reconciliation_detects_deletions,
    readyz_says_never_synced_stale_and_schema_mismatch,
);

/// A daemon on port 0 over `env`'s source and database, stopped by sending on the channel.
async fn start(
    env: &Env,
    cron: &str,
    backfill_cron: Option<&str>,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    start_with(env, cron, backfill_cron, Duration::from_secs(600)).await
}

async fn start_with(
    env: &Env,
    cron: &str,
    backfill_cron: Option<&str>,
    max_staleness: Duration,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let daemon = Daemon {
        client: KlarifyClient::new(common::client_settings(&env.fake, 50)).unwrap(),
        database_url: env.database_url.clone(),
        max_connections: 3,
        options: env.options.clone(),
        cron: cron.to_owned(),
        backfill_cron: backfill_cron.map(str::to_owned),
        max_staleness,
        max_unproven: Duration::from_secs(3600),
        retry_delays: (Duration::from_millis(50), Duration::from_millis(200)),
    }
    .bind("127.0.0.1:0".parse().unwrap())
    .await
    .unwrap();
    let addr = daemon.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        daemon
            .run_until_stopped(async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
    });
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
    task_a.await.unwrap();
    eventually("the standby takes over", || async {
        readyz(b).await.0 == 200
    })
    .await;
    env.fake.edit(&env.source()[1].id);
    eventually("the new leader syncs", || env.mirror_equals_source()).await;
    assert_no_overlapping_runs(&env).await;

    stop_b.send(()).unwrap();
    task_b.await.unwrap();
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
    task.await.unwrap();
}

async fn pool(env: &Env) -> sqlx::AnyPool {
    use secrecy::ExposeSecret;
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(env.database_url.expose_secret())
        .await
        .unwrap()
}

async fn count_runs(env: &Env) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sync_runs")
        .fetch_one(&pool(env).await)
        .await
        .unwrap();
    n
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
    task.await.unwrap();
}
