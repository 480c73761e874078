//! SQLite: the embedded default. Timestamps are RFC 3339 UTC text in one fixed width
//! ([`format_instant`]), so that they compare correctly as text; rows are written by multi-row
//! statements prepared once per shape and reused for the whole batch.

mod tx;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteError, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::Executor;
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use super::model::{Mode, RunRecord, RunSummary, StoredUnproven};
use super::write::timed;
use super::{
    sql, Backend, CallEdge, Counts, GraphNode, LiveRows, LockGuard, LockKind, RunId, StoreError,
};
use crate::klarify::format_instant;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

const LIVE_PROCEDURES: &str = "SELECT id, name, status, owner, performer, updated_at, url, raw \
    FROM procedures WHERE deleted_at IS NULL";
const RECENT_RUNS: &str = "SELECT id, started_at, finished_at, mode, outcome, pages, fetched, \
    inserted, updated, unchanged, deleted, rejected, watermark_after, error \
    FROM sync_runs ORDER BY id DESC LIMIT $1";
const UNPROVEN_GROUPS: &str = "SELECT at, size_bound, size_counted, recorded_at, checked_at, \
    checks FROM unproven_tie_groups ORDER BY at";

#[derive(Clone)]
pub(super) struct SqliteBackend {
    /// Reads: readiness, status, tests, and the checkpoints.
    pool: SqlitePool,
    /// Writes, one connection.
    writer: SqlitePool,
    /// Lock files are named after it; `None` for an in-memory database.
    file: Option<PathBuf>,
    /// The last checkpoint started; commits while it runs start none.
    running_checkpoint: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Whether the database file of `url` exists (an in-memory database always does).
pub(super) fn exists(url: &str) -> Result<bool, sqlx::Error> {
    let file = SqliteConnectOptions::from_str(url)?
        .get_filename()
        .to_owned();
    Ok(file == Path::new(":memory:") || file.exists())
}

impl SqliteBackend {
    /// `create`: a missing file is created (the caller checked it may be).
    pub(super) async fn connect(
        url: &str,
        max_connections: u32,
        create: bool,
    ) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(create)
            // BI readers never block a sync and a sync never blocks them.
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL never corrupts the file; a power cut (not a crash of the
            // process) may lose the last commits, each of which carries its own watermark, so
            // the mirror stays consistent and the next pass re-reads what was lost.
            .synchronous(SqliteSynchronous::Normal)
            // Every connection has its own page cache of `cache_size`; `soft_heap_limit` is
            // process-wide: past it SQLite frees the least recently used unpinned pages of any
            // connection (the bundled build shares one page LRU across connections) instead of
            // growing, so all caches together stay near 16 MiB.
            .pragma("cache_size", "-8192")
            .pragma("soft_heap_limit", "16777216")
            // A batch dirties thousands of pages (random ids and names land all over the
            // indexes keyed by them), more than the default checkpoint threshold of 1,000
            // pages: every commit would pay a checkpoint with two fsyncs. The checkpoints run
            // on a read connection instead, after each commit, while the writer goes on; the
            // writer's own, past 20,000 pages (80 MiB of WAL), only bounds the WAL.
            .pragma("wal_autocheckpoint", "20000");
        let file = options.get_filename();
        let file = (file != Path::new(":memory:")).then(|| file.to_owned());
        let pool = |n: u32| {
            SqlitePoolOptions::new()
                .max_connections(n)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
        };
        // Every write goes through one connection: SQLite takes one writer at a time anyway,
        // and a connection drops its whole page cache when another one wrote since its last
        // transaction, so connections taking turns started each batch cold.
        let writer = pool(1).await?;
        let pool = pool(max_connections).await?;
        Ok(Self {
            pool,
            writer,
            file,
            running_checkpoint: Arc::default(),
        })
    }
}

impl Backend for SqliteBackend {
    type Tx = tx::SqliteTx;
    const NAME: &'static str = "sqlite";
    // The whole batch in each table's statements: with a small page cache, one table at a time
    // for all of it keeps that table's pages hot (docs/performance.md).
    const BATCH_ITEMS: usize = usize::MAX;

    sql::backend_common!();

    async fn begin(&self) -> Result<tx::SqliteTx, StoreError> {
        Ok(tx::SqliteTx(self.writer.begin().await?))
    }

    async fn try_lock(&self, kind: LockKind) -> Result<Option<LockGuard>, StoreError> {
        match &self.file {
            Some(db) => super::lock::file_lock(db, kind),
            None => Ok(Some(LockGuard::nothing())),
        }
    }

    /// Copies the WAL into the database on a read connection, with its fsyncs, off the writer's
    /// path. PASSIVE takes no lock the writer waits for: it copies what readers no longer need.
    fn after_write(&self) {
        let mut running = self
            .running_checkpoint
            .lock()
            .expect("no panics while the checkpoint lock is held");
        if running.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        let pool = self.pool.clone();
        *running = Some(tokio::spawn(async move {
            let checkpoint = async {
                pool.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    .await
                    .map_err(StoreError::from)
            };
            // A failed checkpoint loses nothing: the pages stay in the WAL for the next one.
            if let Err(e) = timed("checkpoint", checkpoint).await {
                tracing::debug!(error = %e, "background checkpoint failed");
            }
        }));
    }

    async fn close(&self) {
        let checkpoint = self
            .running_checkpoint
            .lock()
            .expect("no panics while the checkpoint lock is held")
            .take();
        if let Some(checkpoint) = checkpoint {
            let _ = checkpoint.await;
        }
        self.writer.close().await;
        self.pool.close().await;
    }
}

/// SQLite's result codes name the cause precisely enough to say what to do.
pub(super) fn explain(e: &SqliteError) -> Option<String> {
    use sqlx::error::DatabaseError;
    // Extended result codes carry the primary code in the low byte.
    let code = e.code()?.parse::<i32>().ok()? & 0xff;
    Some(match code {
        5 | 6 => "the database file is locked by another connection (a BI tool or sqlite3 shell in a write transaction?); close it or wait, then retry (database.url)".to_owned(),
        8 => "the database is read-only: klarify-sync must be able to write the file and its directory, which holds the -wal and -shm files (database.url)".to_owned(),
        14 => "the database file cannot be opened: check that database.url names a file in a directory that exists and is writable".to_owned(),
        11 | 26 => format!("the database file is damaged or not a SQLite database ({e}): restore it from a backup, or point database.url at a new file and run --backfill"),
        13 => "the disk holding the database is full: free space, then retry".to_owned(),
        _ => return None,
    })
}

/// Timestamps are text in one fixed width, so that text order is time order.
fn stamp(t: OffsetDateTime) -> String {
    format_instant(t)
}
