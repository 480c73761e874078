//! The mirror database: one [`Store`] over SQLite or PostgreSQL.
//!
//! The flow of every operation is shared; only SQL text and connection set-up differ, so each
//! backend module is a [`Dialect`]: its migrations, its statements and how to open it. Pages are
//! passed to the database as one JSON array per statement (`json_each` / `json_to_recordset`),
//! so writing a page costs a handful of set-based statements whatever its size.

mod lock;
mod postgres;
mod sqlite;

pub use lock::{LockGuard, LockKind};

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use crate::config::{database_kind, url_parameter_is_shown, DatabaseKind};
use crate::klarify::{format_instant, parse_instant, untrusted, Procedure, Rejected};

/// What differs between the backends.
pub(crate) struct Dialect {
    pub name: &'static str,
    pub migrator: sqlx::migrate::Migrator,
    /// Run on every new connection.
    pub session_setup: Option<&'static str>,
    /// Run on a read connection after each commit, while the writer goes on (SQLite: copying
    /// the WAL into the database, with its fsyncs, off the writer's path).
    pub checkpoint: Option<&'static str>,
    /// Procedures per statement within a batch's transaction.
    pub statement_items: usize,
    /// `$1`: JSON array of ids -> `id, updated_at, content_hash, deleted_at`.
    pub existing: &'static str,
    /// `$1`: JSON array of [`ProcRow`], `$2`: now. Upserts `procedures`.
    pub upsert_procedures: &'static str,
    /// `$1`: JSON array of [`VersionRow`]: stored procedures about to take another version. Moves
    /// their current version (row and lanes) into the history, and drops any history rows of
    /// the versions they take (a procedure may come back at a version it had). Run in order,
    /// before the upsert.
    pub archive_versions: &'static [&'static str],
    /// `$1`: JSON array of ids of procedures already stored, after they were archived: removes
    /// their lanes and calls.
    pub delete_replaced: &'static [&'static str],
    /// `$1`: JSON array of [`LaneRow`].
    pub insert_lanes: &'static str,
    /// `$1`: JSON array of [`CallRow`].
    pub insert_calls: &'static str,
    /// `$1`: JSON array of [`RejectRow`], `$2`: now -> `raw_hash, is_new`.
    pub upsert_rejected: &'static str,
    /// `$1`: run id, `$2`: JSON array of ids.
    pub insert_seen: &'static str,
    /// `$1`: started_at, `$2`: mode, `$3`: watermark_before -> id.
    pub begin_run: &'static str,
    /// `$1`: id, `$2`: finished_at, `$3`: outcome, `$4`..`$10`: counts, `$11`: watermark_after, `$12`: error.
    pub finish_run: &'static str,
    /// `$1`: run id, `$2`: now. Marks live procedures the run did not see deleted.
    pub mark_deleted: &'static str,
    /// -> `id, name, status, owner, performer, updated_at, url, raw` of live procedures.
    pub live_procedures: &'static str,
    /// `$1`: limit -> the newest `sync_runs` rows as [`RunSummary`] columns, newest first.
    pub recent_runs: &'static str,
    /// -> `name, drop, restore` of what a bulk load into an empty mirror builds at its end: the
    /// secondary indexes of the mirrored tables, never those behind a primary key or a unique
    /// constraint (the writes rely on them).
    pub deferrable: &'static str,
    /// Run first in the transaction that drops them: how long to wait for a reader's lock on a
    /// mirrored table before loading row by row instead.
    pub lock_timeout: Option<&'static str>,
    /// `$1`: at, `$2`: size_bound, `$3`: size_counted, `$4`: now. Records a tie group a pass
    /// could not prove complete, or another pass that could not.
    pub record_unproven: &'static str,
    /// -> [`StoredUnproven`] columns, oldest instant first.
    pub unproven_groups: &'static str,
    /// `$1`: an instant -> how many live procedures are dated after it.
    pub count_future: &'static str,
}

const GET_WATERMARK: &str = "SELECT watermark FROM sync_state WHERE id = 1";
const SET_WATERMARK: &str = "INSERT INTO sync_state (id, watermark) VALUES (1, $1) \
     ON CONFLICT (id) DO UPDATE SET watermark = excluded.watermark";
/// Passes of processes that died mid-pass; only run under the pass lock, when none is running.
const ABANDON_RUNS: &str = "UPDATE sync_runs SET outcome = 'abandoned' WHERE outcome = 'running'";
const COUNT_LIVE: &str = "SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL";
const COUNT_UNSEEN: &str = "SELECT COUNT(*) FROM procedures p WHERE p.deleted_at IS NULL \
     AND NOT EXISTS (SELECT 1 FROM sync_seen s WHERE s.run_id = $1 AND s.procedure_id = p.id)";
/// Leftovers of backfills that were killed before they finished are dropped too.
const CLEAR_SEEN: &str = "DELETE FROM sync_seen WHERE run_id <= $1";
const COUNTS: &str = "SELECT \
     (SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL), \
     (SELECT COUNT(*) FROM procedures WHERE deleted_at IS NOT NULL), \
     (SELECT COUNT(*) FROM procedure_lanes), \
     (SELECT COUNT(*) FROM procedure_calls), \
     (SELECT COUNT(*) FROM rejected_items)";
const ANY_PROCEDURE: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM procedures LIMIT 1) p";
const RECORD_DEFERRED: &str = "INSERT INTO deferred_schema (name, restore) VALUES ($1, $2)";
const DEFERRED: &str = "SELECT name, restore FROM deferred_schema ORDER BY name";
const CLEAR_DEFERRED: &str = "DELETE FROM deferred_schema";
const DELETE_UNPROVEN: &str = "DELETE FROM unproven_tie_groups WHERE at = $1";
const LIVE_LANES: &str = "SELECT l.procedure_id, l.lane FROM procedure_lanes l \
     JOIN procedures p ON p.id = l.procedure_id WHERE p.deleted_at IS NULL \
     ORDER BY l.procedure_id, l.position";
const LIVE_CALLS: &str =
    "SELECT c.procedure_id, c.relation, c.related_name FROM procedure_calls c \
     JOIN procedures p ON p.id = c.procedure_id WHERE p.deleted_at IS NULL \
     ORDER BY c.procedure_id, c.relation, c.position";
const GRAPH_NODES: &str =
    "SELECT id, name, status, owner FROM procedures WHERE deleted_at IS NULL ORDER BY id";
const GRAPH_EDGES: &str = "SELECT procedure_id, relation, related_name, related_procedure_id, \
     resolution, candidates FROM procedure_call_edges ORDER BY procedure_id, relation, position";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("there is no klarify-sync mirror at {url}: run `klarify-sync --once` first, or point DATABASE_URL at the mirror")]
    NoMirror { url: String },
    #[error("cannot apply the database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{}", explain(.0))]
    Query(#[from] sqlx::Error),
    #[error("the database schema is at migration {applied:?} but this klarify-sync expects {expected:?}; run the matching version")]
    Schema {
        applied: Option<i64>,
        expected: Option<i64>,
    },
    #[error("cannot take the sync lock: {0}")]
    Lock(String),
    #[error("the database holds a value klarify-sync cannot read: {0}")]
    Corrupt(String),
    #[error("refusing to mark {unseen} of {live} live procedures deleted (more than sync.max_delete_share = {max_share}): so many disappearing at once looks like an API fault. Nothing was marked; check Klarify, then rerun --backfill or raise sync.max_delete_share")]
    DeletionGuard {
        unseen: u64,
        live: u64,
        max_share: f64,
    },
}

/// Identifies one row of `sync_runs`.
pub type RunId = i64;

/// A page ready to be committed, with the cursor it moves to.
#[derive(Debug)]
pub struct PageWrite<'a> {
    pub run: RunId,
    pub items: &'a [Procedure],
    pub rejected: &'a [Rejected],
    /// The new stored watermark, committed with the items or not at all.
    pub watermark: Option<OffsetDateTime>,
    /// Record the ids for deletion detection (backfills).
    pub track_seen: bool,
    /// Tie groups read without proof that every member was served; recorded with the items
    /// read of them, so that no watermark past them is committed without the record.
    pub unproven: &'a [UnprovenGroup],
    /// Unproven groups of earlier passes now read completely; their records go with the items.
    pub proven: &'a [OffsetDateTime],
}

/// A tie group a pass read while it changed and could not prove it read completely
/// (docs/sync.md, "Unproven groups").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnprovenGroup {
    /// The `updated_at` its members share.
    pub at: OffsetDateTime,
    /// At most this many procedures shared it at the instant it was last measured.
    pub size_bound: u64,
    /// How many of them were served after that measurement.
    pub size_counted: u64,
}

/// An unproven group as stored, for the next pass, `status` and `/readyz`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StoredUnproven {
    pub at: String,
    pub size_bound: i64,
    pub size_counted: i64,
    pub recorded_at: String,
    pub checked_at: String,
    pub checks: i64,
}

impl StoredUnproven {
    pub fn instant(&self) -> Result<OffsetDateTime, StoreError> {
        parse_stored(&self.at)
    }
}

/// What a page write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Rejected items not seen before (already known ones are only re-stamped).
    pub new_rejected: u64,
}

impl std::ops::AddAssign for WriteStats {
    fn add_assign(&mut self, o: Self) {
        self.inserted += o.inserted;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
        self.new_rejected += o.new_rejected;
    }
}

/// The end of a pass, as recorded in `sync_runs`.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub outcome: &'static str,
    pub pages: u64,
    pub fetched: u64,
    pub stats: WriteStats,
    pub rejected: u64,
    pub deleted: u64,
    pub watermark_after: Option<OffsetDateTime>,
    pub error: Option<String>,
}

/// What `klarify-sync status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub backend: &'static str,
    pub watermark: Option<String>,
    pub live_procedures: i64,
    pub deleted_procedures: i64,
    pub lanes: i64,
    pub calls: i64,
    pub rejected_items: i64,
    /// Live procedures dated after now plus `sync.max_future_skew_secs`: stored, and read again
    /// by every pass, because the watermark never follows them.
    pub future_dated: i64,
    pub unproven_tie_groups: Vec<StoredUnproven>,
    pub recent_runs: Vec<RunSummary>,
}

/// A live procedure as a node of the call graph.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GraphNode {
    pub id: String,
    pub name: Option<String>,
    pub status: Option<String>,
    pub owner: Option<String>,
}

/// One row of the `procedure_call_edges` view (docs/schema.md).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallEdge {
    pub procedure_id: String,
    pub relation: String,
    pub related_name: String,
    pub related_procedure_id: Option<String>,
    pub resolution: String,
    pub candidates: i64,
}

/// One row of `sync_runs`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct RunSummary {
    pub id: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub mode: String,
    pub outcome: String,
    pub pages: i64,
    pub fetched: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub rejected: i64,
    pub watermark_after: Option<String>,
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    /// Reads: readiness, status, tests.
    pool: AnyPool,
    /// Writes, one connection.
    writer: AnyPool,
    dialect: &'static Dialect,
    locking: lock::Locking,
    /// The last [`Dialect::checkpoint`] started; commits while it runs start none.
    running_checkpoint: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.dialect.name)
            .finish()
    }
}

impl Store {
    /// Opens (creating a SQLite file when missing) and migrates the database.
    pub async fn open(url: &SecretString, max_connections: u32) -> Result<Self, StoreError> {
        let store = Self::connect(url, max_connections, true).await?;
        store
            .dialect
            .migrator
            .run(&store.writer)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => StoreError::Connect {
                    url: redact_url(url.expose_secret()),
                    reason: explain(&e),
                },
                other => StoreError::Migrate(other),
            })?;
        Ok(store)
    }

    /// Opens a mirror a sync has made, creating and migrating nothing: for commands that only
    /// read it, which would otherwise leave an empty mirror behind a mistyped URL.
    pub async fn open_existing(url: &SecretString) -> Result<Self, StoreError> {
        let store = Self::connect(url, 1, false).await?;
        match store.ping().await {
            Ok(()) => Ok(store),
            Err(e) => {
                store.close().await;
                // No migrations table: a database, but not a mirror.
                Err(match e {
                    StoreError::Query(_) => StoreError::NoMirror {
                        url: redact_url(url.expose_secret()),
                    },
                    other => other,
                })
            }
        }
    }

    /// Connects both pools; `create`: a missing SQLite file is created, else it is an error.
    async fn connect(
        url: &SecretString,
        max_connections: u32,
        create: bool,
    ) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let raw = url.expose_secret();
        let connect_error = |reason: String| StoreError::Connect {
            url: redact_url(raw),
            reason,
        };
        let kind = database_kind(raw).map_err(|e| connect_error(e.to_string()))?;
        let (dialect, locking) = match kind {
            DatabaseKind::Sqlite => {
                if !create && !sqlite::exists(raw).map_err(|e| connect_error(explain(&e)))? {
                    return Err(StoreError::NoMirror {
                        url: redact_url(raw),
                    });
                }
                let file = sqlite::prepare(raw)
                    .await
                    .map_err(|e| connect_error(explain(&e)))?;
                (&sqlite::DIALECT, lock::Locking::Files(file))
            }
            DatabaseKind::Postgres => (&postgres::DIALECT, lock::Locking::Advisory),
        };
        let options = AnyPoolOptions::new()
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if let Some(sql) = dialect.session_setup {
                        conn.execute(sql).await?;
                    }
                    Ok(())
                })
            })
            .acquire_timeout(std::time::Duration::from_secs(10));
        let connect = |options: AnyPoolOptions| async move {
            options
                .connect(raw)
                .await
                .map_err(|e| connect_error(explain(&e)))
        };
        // Every write goes through one connection. SQLite takes one writer at a time anyway,
        // and a SQLite connection drops its whole page cache when another one wrote since its
        // last transaction: with the pool's connections taking turns, batches started cold, and
        // each connection filled a cache of its own (a 100k backfill: 16% fewer page reads,
        // peak memory 44 instead of 54 MiB).
        let writer = connect(options.clone().max_connections(1)).await?;
        let pool = connect(options.max_connections(max_connections)).await?;
        Ok(Self {
            pool,
            writer,
            dialect,
            locking,
            running_checkpoint: Arc::default(),
        })
    }

    pub fn backend(&self) -> &'static str {
        self.dialect.name
    }

    /// Cheap readiness check: the database answers and runs the schema this binary expects
    /// (another version of klarify-sync may have migrated it since this one started).
    #[tracing::instrument(skip_all)]
    pub async fn ping(&self) -> Result<(), StoreError> {
        let (applied,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        let expected = self.dialect.migrator.iter().map(|m| m.version).max();
        if applied != expected {
            return Err(StoreError::Schema { applied, expected });
        }
        Ok(())
    }

    /// The stored cursor: every procedure modified up to it has been written.
    #[tracing::instrument(skip_all)]
    pub async fn watermark(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        let row: Option<(Option<String>,)> = sqlx::query_as(GET_WATERMARK)
            .fetch_optional(&self.pool)
            .await?;
        row.and_then(|(w,)| w).map(|w| parse_stored(&w)).transpose()
    }

    #[tracing::instrument(skip_all)]
    /// Records the start of a pass; call it holding the pass lock.
    pub async fn begin_run(
        &self,
        mode: &str,
        watermark: Option<OffsetDateTime>,
    ) -> Result<RunId, StoreError> {
        // The caller holds the pass lock, so a pass still marked running died with its process.
        sqlx::query(ABANDON_RUNS).execute(&self.writer).await?;
        let (id,): (i64,) = sqlx::query_as(self.dialect.begin_run)
            .bind(now_text())
            .bind(mode)
            .bind(watermark.map(format_instant))
            .fetch_one(&self.writer)
            .await?;
        Ok(id)
    }

    #[tracing::instrument(skip_all)]
    pub async fn finish_run(&self, run: RunId, r: &RunRecord) -> Result<(), StoreError> {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(self.dialect.finish_run)
            .bind(run)
            .bind(now_text())
            .bind(r.outcome)
            .bind(count(r.pages))
            .bind(count(r.fetched))
            .bind(count(r.stats.inserted))
            .bind(count(r.stats.updated))
            .bind(count(r.stats.unchanged))
            .bind(count(r.deleted))
            .bind(count(r.rejected))
            .bind(r.watermark_after.map(format_instant))
            .bind(r.error.as_deref())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Writes one page in one transaction: procedures that are new or changed, their lanes and
    /// calls, the rejected items, and the cursor. All or nothing.
    #[tracing::instrument(skip_all, fields(items = page.items.len()))]
    pub async fn write_page(&self, page: &PageWrite<'_>) -> Result<WriteStats, StoreError> {
        let started = Instant::now();
        let d = self.dialect;
        let now = now_text();
        let items = latest_per_id(page.items);

        let mut tx = self.writer.begin().await?;
        let mut stats = WriteStats::default();
        for chunk in items.chunks(d.statement_items) {
            let ids = json(&chunk.iter().map(|p| p.id.as_str()).collect::<Vec<_>>());
            stats += self.write_procedures(&mut tx, chunk, &ids, &now).await?;
            if page.track_seen {
                let seen = sqlx::query(d.insert_seen).bind(page.run).bind(&ids);
                timed("insert_seen", seen.execute(&mut *tx)).await?;
            }
        }
        if !page.rejected.is_empty() {
            // One batch may hold an item twice (re-read pages), and PostgreSQL's upsert refuses
            // to touch one row twice in a statement: that failed the batch on every pass.
            let mut rejected: Vec<RejectRow> = page.rejected.iter().map(RejectRow::new).collect();
            let mut distinct = std::collections::HashSet::new();
            rejected.retain(|r| distinct.insert(r.raw_hash.clone()));
            let upsert = sqlx::query_as(d.upsert_rejected)
                .bind(json(&rejected))
                .bind(&now);
            let fresh: Vec<(String, i64)> =
                timed("upsert_rejected", upsert.fetch_all(&mut *tx)).await?;
            for (hash, _) in fresh.iter().filter(|(_, is_new)| *is_new != 0) {
                if let Some(r) = rejected.iter().find(|r| &r.raw_hash == hash) {
                    tracing::warn!(
                        reason = r.reason,
                        raw = %untrusted(r.raw),
                        "Klarify served an item that cannot be understood; kept in rejected_items"
                    );
                    stats.new_rejected += 1;
                }
            }
        }
        for g in page.unproven {
            let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            sqlx::query(d.record_unproven)
                .bind(format_instant(g.at))
                .bind(count(g.size_bound))
                .bind(count(g.size_counted))
                .bind(&now)
                .execute(&mut *tx)
                .await?;
        }
        for &at in page.proven {
            sqlx::query(DELETE_UNPROVEN)
                .bind(format_instant(at))
                .execute(&mut *tx)
                .await?;
        }
        if let Some(w) = page.watermark {
            let set = sqlx::query(SET_WATERMARK).bind(format_instant(w));
            timed("set_watermark", set.execute(&mut *tx)).await?;
        }
        timed("commit", tx.commit()).await?;
        metrics::histogram!("klarify_sync_db_write_duration_seconds").record(started.elapsed());
        self.checkpoint_in_background();
        Ok(stats)
    }

    fn checkpoint_in_background(&self) {
        let Some(sql) = self.dialect.checkpoint else {
            return;
        };
        let mut running = self
            .running_checkpoint
            .lock()
            .expect("no panics while the checkpoint lock is held");
        if running.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        let pool = self.pool.clone();
        *running = Some(tokio::spawn(async move {
            // A failed checkpoint loses nothing: the pages stay in the WAL for the next one.
            if let Err(e) = timed("checkpoint", pool.execute(sql)).await {
                tracing::debug!(error = %e, "background checkpoint failed");
            }
        }));
    }

    /// Writes the procedures among `items` that are new or changed, with their lanes and calls;
    /// the versions they replace go to the history. `ids`: theirs, as a JSON array.
    async fn write_procedures(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        items: &[&Procedure],
        ids: &str,
        now: &str,
    ) -> Result<WriteStats, StoreError> {
        let d = self.dialect;
        let existing = sqlx::query(d.existing).bind(ids);
        let stored: HashMap<String, Stored> = timed("existing", existing.fetch_all(&mut **tx))
            .await?
            .into_iter()
            .map(Stored::from_row)
            .collect::<Result<_, _>>()?;

        let mut stats = WriteStats::default();
        let mut rows = Vec::new();
        let mut written = Vec::new();
        let mut replaced = Vec::new();
        let mut new_versions = Vec::new();
        for &p in items {
            let hash = content_hash(&p.raw);
            let counter = match stored.get(&p.id) {
                None => &mut stats.inserted,
                // An older copy (re-reads arrive out of order) or the same content: leave the row
                // be. A row marked deleted takes whatever is served: the API says it exists.
                Some(s)
                    if !s.deleted && (s.updated_at > p.updated_at || s.content_hash == hash) =>
                {
                    stats.unchanged += 1;
                    continue;
                }
                Some(s) => {
                    // The same version rewritten (or revived) stays one version.
                    if s.updated_at != p.updated_at {
                        new_versions.push(VersionRow::new(p));
                    }
                    replaced.push(p.id.as_str());
                    &mut stats.updated
                }
            };
            *counter += 1;
            rows.push(ProcRow::new(p, hash));
            written.push(p);
        }
        if rows.is_empty() {
            return Ok(stats);
        }
        // New procedures have nothing to archive or replace (foreign keys guarantee it), so a
        // backfill into an empty mirror skips these lookups altogether.
        if !new_versions.is_empty() {
            let new_versions = json(&new_versions);
            for sql in d.archive_versions {
                let archive = sqlx::query(sql).bind(&new_versions);
                timed("archive_versions", archive.execute(&mut **tx)).await?;
            }
        }
        if !replaced.is_empty() {
            let replaced = json(&replaced);
            for sql in d.delete_replaced {
                let delete = sqlx::query(sql).bind(&replaced);
                timed("delete_replaced", delete.execute(&mut **tx)).await?;
            }
        }
        let upsert = sqlx::query(d.upsert_procedures).bind(json(&rows)).bind(now);
        timed("upsert_procedures", upsert.execute(&mut **tx)).await?;
        let lanes = LaneRow::all(&written);
        if !lanes.is_empty() {
            let insert = sqlx::query(d.insert_lanes).bind(json(&lanes));
            timed("insert_lanes", insert.execute(&mut **tx)).await?;
        }
        let calls = CallRow::all(&written);
        if !calls.is_empty() {
            let insert = sqlx::query(d.insert_calls).bind(json(&calls));
            timed("insert_calls", insert.execute(&mut **tx)).await?;
        }
        Ok(stats)
    }

    /// Before a pass: when the mirror holds no procedure at all, drops what
    /// [`Dialect::deferrable`] lists, recording how to build each again in the same transaction.
    /// A bulk load then inserts only into the B-trees its writes need, and
    /// [`Store::restore_deferred`] builds the rest once, sorted, at its end (SQLite: a third of a
    /// 100k backfill's database work; PostgreSQL: the per-row foreign-key checks, over a third;
    /// docs/performance.md). Returns whether the mirror was empty. Call it holding the pass lock.
    #[tracing::instrument(skip_all)]
    pub async fn defer_for_bulk_load(&self) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let (stored,): (i64,) = sqlx::query_as(ANY_PROCEDURE).fetch_one(&mut *tx).await?;
        if stored > 0 {
            return Ok(false);
        }
        if let Some(sql) = self.dialect.lock_timeout {
            (&mut *tx).execute(sql).await?;
        }
        let deferrable: Vec<(String, String, String)> = sqlx::query_as(self.dialect.deferrable)
            .fetch_all(&mut *tx)
            .await?;
        for (name, drop, restore) in &deferrable {
            sqlx::query(RECORD_DEFERRED)
                .bind(name)
                .bind(restore)
                .execute(&mut *tx)
                .await?;
            match (&mut *tx).execute(drop.as_str()).await {
                Ok(_) => {}
                // A reader holds the table (a BI session left in a transaction?). Waiting would
                // make every query after it queue behind the drop; the load keeps the indexes.
                Err(e) if is_lock_timeout(&e) => {
                    tracing::info!(error = %e, "a reader holds the mirrored tables: this bulk load writes its indexes row by row");
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Builds what [`Store::defer_for_bulk_load`] dropped, in one transaction; also what a pass
    /// killed before its end left out. Returns how many indexes and constraints it built.
    #[tracing::instrument(skip_all)]
    pub async fn restore_deferred(&self) -> Result<usize, StoreError> {
        let started = Instant::now();
        let mut tx = self.writer.begin().await?;
        let deferred: Vec<(String, String)> = sqlx::query_as(DEFERRED).fetch_all(&mut *tx).await?;
        if deferred.is_empty() {
            return Ok(0);
        }
        for (_, restore) in &deferred {
            (&mut *tx).execute(restore.as_str()).await?;
        }
        sqlx::query(CLEAR_DEFERRED).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(
            built = deferred.len(),
            duration_ms = started.elapsed().as_millis() as u64,
            "built the indexes and constraints of the bulk load"
        );
        Ok(deferred.len())
    }

    /// After a complete backfill: marks live procedures the run did not see as deleted, unless
    /// that would be more than `max_share` of them. Returns how many were marked.
    #[tracing::instrument(skip_all)]
    pub async fn mark_unseen_deleted(&self, run: RunId, max_share: f64) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let (live,): (i64,) = sqlx::query_as(COUNT_LIVE).fetch_one(&mut *tx).await?;
        let (unseen,): (i64,) = sqlx::query_as(COUNT_UNSEEN)
            .bind(run)
            .fetch_one(&mut *tx)
            .await?;
        let (live, unseen) = (live.max(0) as u64, unseen.max(0) as u64);
        if unseen > 0 && unseen as f64 > max_share * live as f64 {
            return Err(StoreError::DeletionGuard {
                unseen,
                live,
                max_share,
            });
        }
        if unseen > 0 {
            sqlx::query(self.dialect.mark_deleted)
                .bind(run)
                .bind(now_text())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(CLEAR_SEEN).bind(run).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(unseen)
    }

    /// Every live procedure as the mirror holds it, lanes and calls in the API's order, sorted by
    /// id. What a BI user would read back; tests compare it with the source.
    #[tracing::instrument(skip_all)]
    pub async fn live_procedures(&self) -> Result<Vec<Procedure>, StoreError> {
        let mut procs = Vec::new();
        let mut index = HashMap::new();
        for row in sqlx::query(self.dialect.live_procedures)
            .fetch_all(&self.pool)
            .await?
        {
            let p = Procedure {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                status: row.try_get(2)?,
                owner: row.try_get(3)?,
                performer: row.try_get(4)?,
                updated_at: parse_stored(&row.try_get::<String, _>(5)?)?,
                url: row.try_get(6)?,
                raw: row.try_get(7)?,
                lanes: Vec::new(),
                called_within: Vec::new(),
                called_from: Vec::new(),
            };
            index.insert(p.id.clone(), procs.len());
            procs.push(p);
        }
        // Each query sees the database as of its own start: lanes and calls of a procedure
        // written since the first are left out, as that procedure is.
        let lanes: Vec<(String, String)> = sqlx::query_as(LIVE_LANES).fetch_all(&self.pool).await?;
        for (id, lane) in lanes {
            if let Some(&i) = index.get(&id) {
                procs[i].lanes.push(lane);
            }
        }
        let calls: Vec<(String, String, String)> =
            sqlx::query_as(LIVE_CALLS).fetch_all(&self.pool).await?;
        for (id, relation, name) in calls {
            let Some(&i) = index.get(&id) else { continue };
            let p = &mut procs[i];
            match relation.as_str() {
                "called_within" => p.called_within.push(name),
                _ => p.called_from.push(name),
            }
        }
        procs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(procs)
    }

    /// The live procedures, by id, and the edges between them (`procedure_call_edges`): what
    /// `klarify-sync graph` draws. Edges of procedures written between the two reads may name
    /// procedures not in the first; [`crate::graph`] leaves those out.
    #[tracing::instrument(skip_all)]
    pub async fn call_graph(&self) -> Result<(Vec<GraphNode>, Vec<CallEdge>), StoreError> {
        let nodes = sqlx::query_as(GRAPH_NODES).fetch_all(&self.pool).await?;
        let edges = sqlx::query_as(GRAPH_EDGES).fetch_all(&self.pool).await?;
        Ok((nodes, edges))
    }

    /// The tie groups earlier passes could not prove they read completely, oldest instant first.
    #[tracing::instrument(skip_all)]
    pub async fn unproven_groups(&self) -> Result<Vec<StoredUnproven>, StoreError> {
        let groups = sqlx::query_as(self.dialect.unproven_groups)
            .fetch_all(&self.pool)
            .await?;
        Ok(groups)
    }

    /// How many live procedures are dated after `after`.
    #[tracing::instrument(skip_all)]
    pub async fn future_dated(&self, after: OffsetDateTime) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(self.dialect.count_future)
            .bind(format_instant(after))
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    /// The watermark, the table sizes, the newest `runs` passes, the unproven tie groups, and
    /// how many procedures are dated after `future_after`.
    #[tracing::instrument(skip_all)]
    pub async fn status(
        &self,
        runs: i64,
        future_after: OffsetDateTime,
    ) -> Result<Status, StoreError> {
        let (live_procedures, deleted_procedures, lanes, calls, rejected_items): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(COUNTS).fetch_one(&self.pool).await?;
        let recent_runs = sqlx::query_as(self.dialect.recent_runs)
            .bind(runs)
            .fetch_all(&self.pool)
            .await?;
        Ok(Status {
            backend: self.dialect.name,
            watermark: self.watermark().await?.map(format_instant),
            live_procedures,
            deleted_procedures,
            lanes,
            calls,
            rejected_items,
            future_dated: self.future_dated(future_after).await? as i64,
            unproven_tie_groups: self.unproven_groups().await?,
            recent_runs,
        })
    }

    pub async fn close(&self) {
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

/// The stored state of one procedure, enough to decide whether a served item changes it.
struct Stored {
    updated_at: OffsetDateTime,
    content_hash: String,
    deleted: bool,
}

impl Stored {
    fn from_row(row: AnyRow) -> Result<(String, Self), StoreError> {
        Ok((
            row.try_get(0)?,
            Self {
                updated_at: parse_stored(&row.try_get::<String, _>(1)?)?,
                content_hash: row.try_get(2)?,
                deleted: row.try_get::<Option<String>, _>(3)?.is_some(),
            },
        ))
    }
}

#[derive(Serialize)]
struct ProcRow<'a> {
    id: &'a str,
    name: Option<&'a str>,
    status: Option<&'a str>,
    owner: Option<&'a str>,
    performer: Option<&'a str>,
    updated_at: String,
    url: Option<&'a str>,
    raw: &'a str,
    content_hash: String,
}

impl<'a> ProcRow<'a> {
    fn new(p: &'a Procedure, content_hash: String) -> Self {
        Self {
            id: &p.id,
            name: p.name.as_deref(),
            status: p.status.as_deref(),
            owner: p.owner.as_deref(),
            performer: p.performer.as_deref(),
            updated_at: format_instant(p.updated_at),
            url: p.url.as_deref(),
            raw: &p.raw,
            content_hash,
        }
    }
}

/// The version a stored procedure takes.
#[derive(Serialize)]
struct VersionRow<'a> {
    id: &'a str,
    updated_at: String,
}

impl<'a> VersionRow<'a> {
    fn new(p: &'a Procedure) -> Self {
        Self {
            id: &p.id,
            updated_at: format_instant(p.updated_at),
        }
    }
}

#[derive(Serialize)]
struct LaneRow<'a> {
    procedure_id: &'a str,
    position: usize,
    lane: &'a str,
}

impl<'a> LaneRow<'a> {
    fn all(procs: &[&'a Procedure]) -> Vec<Self> {
        let rows = procs.iter().flat_map(|p| {
            p.lanes
                .iter()
                .enumerate()
                .map(move |(position, lane)| LaneRow {
                    procedure_id: &p.id,
                    position,
                    lane,
                })
        });
        rows.collect()
    }
}

#[derive(Serialize)]
struct CallRow<'a> {
    procedure_id: &'a str,
    relation: &'static str,
    position: usize,
    related_name: &'a str,
}

impl<'a> CallRow<'a> {
    fn all(procs: &[&'a Procedure]) -> Vec<Self> {
        let mut rows = Vec::new();
        for p in procs {
            for (relation, names) in [
                ("called_within", &p.called_within),
                ("called_from", &p.called_from),
            ] {
                rows.extend(names.iter().enumerate().map(|(position, name)| CallRow {
                    procedure_id: &p.id,
                    relation,
                    position,
                    related_name: name,
                }));
            }
        }
        rows
    }
}

#[derive(Serialize)]
struct RejectRow<'a> {
    raw_hash: String,
    raw: &'a str,
    reason: &'a str,
}

impl<'a> RejectRow<'a> {
    fn new(r: &'a Rejected) -> Self {
        Self {
            raw_hash: content_hash(&r.raw),
            raw: &r.raw,
            reason: &r.reason,
        }
    }
}

/// Runs one part of a batch write and records its time by name: where the writer's time goes
/// (docs/performance.md) is what bounds a backfill.
async fn timed<T>(
    statement: &'static str,
    run: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let started = Instant::now();
    let result = run.await;
    metrics::histogram!("klarify_sync_db_statement_duration_seconds", "statement" => statement)
        .record(started.elapsed());
    result
}

/// A page may serve one id twice (the vendor promises nothing); the newest copy wins, and for
/// equal timestamps the later one, as it is the last the server said.
fn latest_per_id(items: &[Procedure]) -> Vec<&Procedure> {
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    let mut out: Vec<&Procedure> = Vec::with_capacity(items.len());
    for p in items {
        match position.get(p.id.as_str()) {
            Some(&i) if out[i].updated_at > p.updated_at => {}
            Some(&i) => out[i] = p,
            None => {
                position.insert(&p.id, out.len());
                out.push(p);
            }
        }
    }
    out
}

/// Lowercase hex SHA-256, formatted in one pass (a `format!` per byte cost more than hashing).
fn content_hash(raw: &str) -> String {
    format!("{:x}", Sha256::digest(raw.as_bytes()))
}

fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("rows of strings and numbers always serialise")
}

fn now_text() -> String {
    format_instant(OffsetDateTime::now_utc())
}

fn parse_stored(s: &str) -> Result<OffsetDateTime, StoreError> {
    parse_instant(s).map_err(|e| StoreError::Corrupt(format!("timestamp {}: {e}", untrusted(s))))
}

/// PostgreSQL's `lock_not_available`, which `lock_timeout` raises.
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "55P03")
}

/// A database error in words that say what to do. SQLite's result codes are specific enough
/// to name the cause; anything else is most often an unreachable server.
fn explain(e: &sqlx::Error) -> String {
    let sqlite_code = e
        .as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| c.parse::<i32>().ok())
        .map(|c| c & 0xff); // extended result codes carry the primary code in the low byte
    match (sqlite_code, e) {
        (Some(5 | 6), _) => "the database file is locked by another connection (a BI tool or sqlite3 shell in a write transaction?); close it or wait, then retry (database.url)".to_owned(),
        (Some(8), _) => "the database is read-only: klarify-sync must be able to write the file and its directory, which holds the -wal and -shm files (database.url)".to_owned(),
        (Some(14), _) => "the database file cannot be opened: check that database.url names a file in a directory that exists and is writable".to_owned(),
        (_, sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => {
            format!("{e}; check database.url (DATABASE_URL) and that the database server is running and reachable")
        }
        _ => format!("database error: {e}"),
    }
}

/// The URL with every credential replaced, for messages and logs: the userinfo password, and
/// the value of every query parameter not known to be harmless (`password=` and anything sqlx
/// does not understand, however its name is percent-encoded). A fragment is dropped.
pub fn redact_url(url: &str) -> String {
    const HIDDEN: &str = "***";
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(unparsable URL)".to_owned();
    };
    if parsed.password().is_none() && parsed.query().is_none() && parsed.fragment().is_none() {
        return url.to_owned();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(HIDDEN));
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(key, value)| {
            let value = if url_parameter_is_shown(&key) {
                value.into_owned()
            } else {
                HIDDEN.to_owned()
            };
            (key.into_owned(), value)
        })
        .collect();
    if pairs.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.set_fragment(None);
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("sqlite://klarify.db"), "sqlite://klarify.db");
    }

    /// Every place sqlx's PostgreSQL URL parser takes a password from, however it is spelled.
    #[test]
    fn passwords_in_query_parameters_are_redacted() {
        for (url, shown) in [
            (
                "postgres://u@h/db?password=hunter2",
                "postgres://u@h/db?password=***",
            ),
            (
                "postgres://u@h/db?sslmode=verify-full&pass%77ord=hunter2",
                "postgres://u@h/db?sslmode=verify-full&password=***",
            ),
            (
                "postgres://u:x@h/db?sslpassword=hunter2&application_name=k",
                "postgres://u:***@h/db?sslpassword=***&application_name=k",
            ),
            ("postgres://u@h/db#hunter2", "postgres://u@h/db"),
            (
                "sqlite:///data/m.db?mode=rwc&password=hunter2",
                "sqlite:///data/m.db?mode=rwc&password=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    /// Stored hashes must keep their form, or every row would look changed after an upgrade.
    #[test]
    fn content_hashes_are_lowercase_hex_sha256() {
        assert_eq!(
            content_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_newest_copy_of_a_duplicated_id_wins() {
        let item = |id: &str, ts: &str, name: &str| {
            crate::klarify::parse_item(&format!(
                r#"{{"id":"{id}","updated_at":"{ts}","name":"{name}"}}"#
            ))
            .unwrap()
        };
        let page = [
            item("a", "2024-01-01T00:00:02Z", "a-new"),
            item("b", "2024-01-01T00:00:00Z", "b-first"),
            item("a", "2024-01-01T00:00:01Z", "a-old"),
            item("b", "2024-01-01T00:00:00Z", "b-last"),
        ];
        let names: Vec<_> = latest_per_id(&page)
            .iter()
            .map(|p| p.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a-new", "b-last"]);
    }
}
