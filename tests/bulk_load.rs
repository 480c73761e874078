//! A pass into an empty mirror is a bulk load: the secondary indexes of the mirrored tables (on
//! PostgreSQL also the lanes' and calls' foreign keys) are dropped at its start and built once at
//! its end. Whatever happens to the pass, the mirror ends with the schema its migrations made.

mod common;

use common::{Backend, Env};
use klarify_fake::{FakeOptions, Organisation};
use klarify_sync::store::{PageWrite, Store};
use klarify_sync::sync::{run_pass, Mode};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

on_both_backends!(
    a_pass_into_an_empty_mirror_is_a_bulk_load,
    only_an_empty_mirror_defers_its_indexes,
    a_failed_bulk_load_builds_its_indexes_all_the_same,
    the_next_pass_builds_what_a_killed_bulk_load_left_out,
    a_load_klarify_keeps_waiting_builds_its_indexes_early_where_that_is_cheap,
    an_early_build_leaves_what_is_costly_row_by_row_for_the_end,
);

/// Every index and foreign key, with its definition.
async fn schema(backend: Backend, url: &SecretString) -> Vec<String> {
    let sql = match backend {
        Backend::Sqlite => {
            "SELECT 'index ' || name || ': ' || coalesce(sql, '') FROM sqlite_master \
             WHERE type = 'index' \
             UNION ALL \
             SELECT 'foreign key ' || m.name || '.' || f.\"from\" || ' -> ' || f.\"table\" \
             FROM sqlite_master m JOIN pragma_foreign_key_list(m.name) f WHERE m.type = 'table' \
             ORDER BY 1"
        }
        Backend::Postgres => {
            "SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = current_schema() \
             UNION ALL \
             SELECT 'constraint ' || c.conname || ': ' || pg_get_constraintdef(c.oid) \
             FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace \
             WHERE n.nspname = current_schema() \
             ORDER BY 1"
        }
    };
    let pool = common::any_pool(url.expose_secret()).await.unwrap();
    let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
    pool.close().await;
    rows.into_iter().map(|(s,)| s).collect()
}

async fn deferred(url: &SecretString) -> i64 {
    common::scalar(url, "SELECT COUNT(*) FROM deferred_schema").await
}

fn mentions(schema: &[String], name: &str) -> bool {
    schema.iter().any(|s| s.contains(name))
}

async fn a_pass_into_an_empty_mirror_is_a_bulk_load(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(81, 700), 20).await;
    let migrated = schema(backend, &env.database_url).await;

    let first = env.pass(Mode::Backfill).await.unwrap();
    assert!(first.bulk_load, "the first pass found an empty mirror");
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(deferred(&env.database_url).await, 0);
    env.assert_mirror_equals_source().await;

    // A mirror with data is written row by row, indexes in place, and detects deletions.
    let gone = env.source()[3].id.clone();
    assert!(env.fake.delete(&gone));
    let second = env.pass(Mode::Backfill).await.unwrap();
    assert!(!second.bulk_load, "the mirror held procedures");
    assert_eq!(second.deleted, 1);
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    env.assert_mirror_equals_source().await;
}

async fn only_an_empty_mirror_defers_its_indexes(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(82, 300), 20).await;
    let migrated = schema(backend, &env.database_url).await;

    assert!(env.store.defer_for_bulk_load().await.unwrap());
    let during = schema(backend, &env.database_url).await;
    for name in ["procedures_live_name", "procedure_calls_related_name"] {
        assert!(
            mentions(&migrated, name) && !mentions(&during, name),
            "{name}: {during:?}"
        );
    }
    if matches!(backend, Backend::Postgres) {
        assert!(!mentions(&during, "procedure_lanes_procedure_id_fkey"));
        assert!(!mentions(&during, "procedure_calls_procedure_id_fkey"));
    }
    // What the writes rely on stays: the primary keys, and the history's cascade.
    for name in [
        "procedures_pkey",
        "sqlite_autoindex_procedures_1",
        "procedure_history",
    ] {
        assert_eq!(mentions(&migrated, name), mentions(&during, name), "{name}");
    }
    let dropped = migrated.len() - during.len();
    assert_eq!(deferred(&env.database_url).await, dropped as i64);

    assert_eq!(env.store.restore_deferred().await.unwrap(), dropped);
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(env.store.restore_deferred().await.unwrap(), 0);

    env.pass(Mode::Backfill).await.unwrap();
    assert!(!env.store.defer_for_bulk_load().await.unwrap());
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(deferred(&env.database_url).await, 0);
}

async fn a_failed_bulk_load_builds_its_indexes_all_the_same(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(83, 2000), 20).await;
    let migrated = schema(backend, &env.database_url).await;
    common::fail_one_range_mid_pass(&env.fake);
    env.pass(Mode::Backfill).await.unwrap_err();
    env.fake.clear_faults();
    assert!(
        !env.mirror().await.is_empty(),
        "what was read before the failure is committed"
    );
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(deferred(&env.database_url).await, 0);

    let resumed = env.pass(Mode::Incremental).await.unwrap();
    assert!(!resumed.bulk_load);
    env.assert_mirror_equals_source().await;
}

/// Klarify slower than the database: the writer idles between batches. The indexes the backend
/// keeps cheaply row by row are then built while the readers wait, and the rest of the load is
/// written with them in place; what costs more row by row is built at the end.
async fn a_load_klarify_keeps_waiting_builds_its_indexes_early_where_that_is_cheap(
    backend: Backend,
) {
    // Five batches of 3,000, each received in about two seconds (30 pages, 8 at a time): a
    // writer needs a fraction of that, under half of it even on a 2-core machine loaded by a
    // whole test run, which a shorter latency would not leave room for.
    let slow = FakeOptions {
        latency: std::time::Duration::from_millis(500),
        ..FakeOptions::default()
    };
    let env = Env::with_options(backend, Organisation::generate(85, 15_000), slow, 100).await;
    let migrated = schema(backend, &env.database_url).await;

    let report = env.pass(Mode::Backfill).await.unwrap();
    assert!(report.bulk_load);
    assert!(report.early_index_build);
    // What waits for the end: the foreign keys of lanes and calls (PostgreSQL), whose checks row
    // by row would make the writer the bound for the rest of the load; on SQLite the four
    // indexes keyed by names and ids, which outgrow its page cache.
    let left = match backend {
        Backend::Sqlite => 4,
        Backend::Postgres => 2,
    };
    assert_eq!(report.built_at_end, left);
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(deferred(&env.database_url).await, 0);
    env.assert_mirror_equals_source().await;
}

/// The early build (Klarify keeps the load waiting) builds the indexes its backend keeps cheaply
/// row by row, and leaves the rest to the end: the foreign keys, and on SQLite the indexes keyed
/// by names and ids.
async fn an_early_build_leaves_what_is_costly_row_by_row_for_the_end(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(86, 300), 20).await;
    let migrated = schema(backend, &env.database_url).await;
    assert!(env.store.defer_for_bulk_load().await.unwrap());
    let deferred_at_start = deferred(&env.database_url).await;

    let built = env.store.build_early_indexes().await.unwrap();
    let early = schema(backend, &env.database_url).await;
    let (built_early, left_for_the_end): (&[&str], &[&str]) = match backend {
        Backend::Sqlite => (
            &["procedures_status", "procedures_updated_at"],
            &["procedures_live_name", "procedure_calls_related_name"],
        ),
        Backend::Postgres => (
            &["procedures_live_name", "procedure_calls_related_name"],
            &[
                "procedure_lanes_procedure_id_fkey",
                "procedure_calls_procedure_id_fkey",
            ],
        ),
    };
    for name in built_early {
        assert!(mentions(&early, name), "{name}: {early:?}");
    }
    for name in left_for_the_end {
        assert!(!mentions(&early, name), "{name}: {early:?}");
    }
    let left = match backend {
        Backend::Sqlite => 4,
        Backend::Postgres => 2,
    };
    assert_eq!(built as i64, deferred_at_start - left);
    assert_eq!(deferred(&env.database_url).await, left);
    assert_eq!(env.store.build_early_indexes().await.unwrap(), 0);

    assert_eq!(env.store.restore_deferred().await.unwrap() as i64, left);
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(deferred(&env.database_url).await, 0);
}

/// A process killed during a bulk load leaves committed batches, the indexes dropped and their
/// record behind; the next pass finds a mirror with data, so it is no bulk load, and builds them
/// before it writes.
async fn the_next_pass_builds_what_a_killed_bulk_load_left_out(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(84, 300), 20).await;
    let migrated = schema(backend, &env.database_url).await;
    assert!(env.store.defer_for_bulk_load().await.unwrap());
    let mut first_half = env.source();
    first_half.sort_by_key(|p| p.updated_at);
    first_half.truncate(150);
    let run = env.store.begin_run(Mode::Backfill, None).await.unwrap();
    let batch = PageWrite {
        run,
        items: &first_half,
        rejected: &[],
        watermark: first_half.last().map(|p| p.updated_at),
        track_seen: false,
        unproven: &[],
        proven: &[],
    };
    env.store.write_page(&batch).await.unwrap();
    env.store.close().await;

    let reopened = Store::open(&env.database_url, 2).await.unwrap();
    assert_ne!(schema(backend, &env.database_url).await, migrated);
    let report = run_pass(
        &env.client,
        &reopened,
        Mode::Incremental,
        &env.options,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(!report.bulk_load, "the mirror held procedures");
    assert_eq!(report.stats.inserted, 150);
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(deferred(&env.database_url).await, 0);
    common::assert_same(&reopened.live_procedures().await.unwrap(), &env.source());
    reopened.close().await;
}

/// A BI session left in a transaction holds a lock that dropping an index would wait for, and
/// every query after the drop would queue behind it: the pass loads row by row instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_in_a_transaction_keeps_the_indexes_in_place() {
    let backend = Backend::Postgres;
    let env = Env::new(backend, Organisation::generate(85, 300), 20).await;
    let migrated = schema(backend, &env.database_url).await;
    let mut reader = sqlx::AnyConnection::connect(env.database_url.expose_secret())
        .await
        .unwrap();
    reader.execute("BEGIN").await.unwrap();
    reader
        .execute("SELECT COUNT(*) FROM procedures")
        .await
        .unwrap();

    // Without the lock timeout the pass waits for the reader for ever.
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), env.pass(Mode::Backfill))
        .await
        .expect("the pass did not wait for the reader")
        .unwrap();
    assert!(!report.bulk_load);
    assert_eq!(schema(backend, &env.database_url).await, migrated);
    assert_eq!(deferred(&env.database_url).await, 0);
    env.assert_mirror_equals_source().await;
    reader.execute("ROLLBACK").await.unwrap();
}
