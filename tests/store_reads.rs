//! `Store::live_procedures` reads procedures, lanes and calls in three queries, each seeing the
//! database as of its own start: a procedure made live between them must not break the read.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Env};
use klarify_fake::Organisation;
use klarify_sync::sync::Mode;
use secrecy::ExposeSecret;

/// PostgreSQL only: its table locks let the test hold the lanes query between the first query
/// and a commit. SQLite readers never wait in WAL mode, so there the interleaving cannot be
/// arranged from outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_procedure_revived_between_the_reads_does_not_break_them() {
    let env = Env::new(Backend::Postgres, Organisation::generate(37, 20), 50).await;
    env.pass(Mode::Incremental).await.unwrap();
    let revived = env
        .source()
        .into_iter()
        .find(|p| !p.lanes.is_empty())
        .expect("a procedure with lanes")
        .id;
    let pool = common::any_pool(env.database_url.expose_secret())
        .await
        .unwrap();
    sqlx::query("UPDATE procedures SET deleted_at = updated_at WHERE id = $1")
        .bind(&revived)
        .execute(&pool)
        .await
        .unwrap();

    // Revived, and the lanes locked until the revival commits.
    let mut reviving = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE procedure_lanes IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *reviving)
        .await
        .unwrap();
    sqlx::query("UPDATE procedures SET deleted_at = NULL WHERE id = $1")
        .bind(&revived)
        .execute(&mut *reviving)
        .await
        .unwrap();
    let store = env.store.clone();
    let reading = tokio::spawn(async move { store.live_procedures().await });
    let waiting = "SELECT COUNT(*) FROM pg_locks WHERE NOT granted \
                   AND relation = 'procedure_lanes'::regclass";
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::scalar(&env.database_url, waiting).await == 0 {
        assert!(Instant::now() < deadline, "the lanes query never waited");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    reviving.commit().await.unwrap();

    let live = reading.await.expect("no panic").unwrap();
    assert_eq!(live.len(), 19, "as the first query saw it");
    assert!(live.iter().all(|p| p.id != revived));
    env.assert_mirror_equals_source().await;
}
