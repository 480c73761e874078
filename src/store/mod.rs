//! The mirror database: one [`Store`] over SQLite or PostgreSQL, each on its own driver.
//!
//! What to write and in which order is decided once, backend-neutrally ([`write`],
//! [`bulk_load`], [`sweep`]); a backend ([`sqlite`], [`postgres`]) executes it with its own typed
//! statements through the [`Backend`] and transaction traits below, and maps its errors to one
//! [`StoreError`] in its own words.

mod bulk_load;
mod error;
mod lock;
mod model;
mod postgres;
mod sql;
mod sqlite;
mod sweep;
mod write;

pub use error::{redact_url, StoreError};
pub use lock::{LockGuard, LockKind};
pub use model::{
    CallEdge, Counts, GraphNode, Mode, PageWrite, RunId, RunOutcome, RunRecord, RunSummary, Status,
    StoredUnproven, UnprovenGroup, WriteStats,
};

use std::collections::HashMap;

use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

use crate::config::{database_kind, DatabaseKind};
use crate::klarify::{parse_instant, untrusted, Procedure};
use bulk_load::Restore;
use error::explain;
use postgres::PgBackend;
use sqlite::SqliteBackend;

/// A transaction on a backend's writer.
pub(crate) trait Tx {
    async fn commit(self) -> Result<(), StoreError>;
}

/// What each backend does on its pools; the flows around it are [`Store`]'s.
pub(crate) trait Backend {
    type Tx: write::WriteTx + bulk_load::SchemaTx + sweep::SweepTx;
    /// As `status` and the logs name it.
    const NAME: &'static str;
    /// Procedures per statement within a batch's transaction.
    const BATCH_ITEMS: usize;

    fn migrator(&self) -> &'static sqlx::migrate::Migrator;
    async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError>;
    /// A transaction on the writer.
    async fn begin(&self) -> Result<Self::Tx, StoreError>;
    async fn applied_migration(&self) -> Result<Option<i64>, StoreError>;
    /// The stored cursor as stored: text in the watermark's form on both backends.
    async fn watermark(&self) -> Result<Option<String>, StoreError>;
    /// Marks passes still running abandoned (the caller holds the pass lock) and records a new one.
    async fn begin_run(
        &self,
        mode: Mode,
        watermark: Option<OffsetDateTime>,
    ) -> Result<RunId, StoreError>;
    async fn finish_run(&self, run: RunId, record: &RunRecord) -> Result<(), StoreError>;
    async fn live_rows(&self) -> Result<LiveRows, StoreError>;
    async fn call_graph(&self) -> Result<(Vec<GraphNode>, Vec<CallEdge>), StoreError>;
    /// Oldest instant first.
    async fn unproven_groups(&self) -> Result<Vec<StoredUnproven>, StoreError>;
    async fn future_dated(&self, after: OffsetDateTime) -> Result<u64, StoreError>;
    async fn counts(&self) -> Result<Counts, StoreError>;
    /// Newest first.
    async fn recent_runs(&self, limit: i64) -> Result<Vec<RunSummary>, StoreError>;
    async fn try_lock(&self, kind: LockKind) -> Result<Option<LockGuard>, StoreError>;
    /// After each committed page.
    fn after_write(&self) {}
    async fn close(&self);
}

/// A live procedure's row, before its lanes and calls are added.
#[derive(sqlx::FromRow)]
pub(crate) struct LiveProcedure {
    id: String,
    name: Option<String>,
    status: Option<String>,
    owner: Option<String>,
    performer: Option<String>,
    updated_at: OffsetDateTime,
    url: Option<String>,
    raw: String,
}

/// The live procedures, and the lanes (`id, lane`) and calls (`id, relation, name`) of live
/// procedures in the API's order.
pub(crate) struct LiveRows {
    procedures: Vec<LiveProcedure>,
    lanes: Vec<(String, String)>,
    calls: Vec<(String, String, String)>,
}

/// A count as the integer columns store it.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[derive(Clone)]
enum Db {
    Sqlite(SqliteBackend),
    Postgres(PgBackend),
}

/// Runs `$body` with `$b` bound to the backend, whichever it is.
macro_rules! on_backend {
    ($store:expr, $b:ident => $body:expr) => {
        match &$store.db {
            Db::Sqlite($b) => $body,
            Db::Postgres($b) => $body,
        }
    };
}

#[derive(Clone)]
pub struct Store {
    db: Db,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish()
    }
}

impl Store {
    /// Opens (creating a SQLite file when missing) and migrates the database.
    pub async fn open(url: &SecretString, max_connections: u32) -> Result<Self, StoreError> {
        let store = Self::connect(url, max_connections, true).await?;
        let migrated = on_backend!(store, b => b.migrate().await);
        migrated.map_err(|e| match e {
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

    /// Connects the backend's pools; `create`: a missing SQLite file is created, else it is an
    /// error.
    async fn connect(
        url: &SecretString,
        max_connections: u32,
        create: bool,
    ) -> Result<Self, StoreError> {
        let raw = url.expose_secret();
        let connect_error = |reason: String| StoreError::Connect {
            url: redact_url(raw),
            reason,
        };
        let kind = database_kind(raw).map_err(|e| connect_error(e.to_string()))?;
        let db = match kind {
            DatabaseKind::Sqlite => {
                if !create && !sqlite::exists(raw).map_err(|e| connect_error(explain(&e)))? {
                    return Err(StoreError::NoMirror {
                        url: redact_url(raw),
                    });
                }
                SqliteBackend::connect(raw, max_connections, create)
                    .await
                    .map(Db::Sqlite)
            }
            DatabaseKind::Postgres => PgBackend::connect(raw, max_connections)
                .await
                .map(Db::Postgres),
        };
        let db = db.map_err(|e| connect_error(explain(&e)))?;
        Ok(Self { db })
    }

    pub fn backend(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => SqliteBackend::NAME,
            Db::Postgres(_) => PgBackend::NAME,
        }
    }

    /// Cheap readiness check: the database answers and runs the schema this binary expects
    /// (another version of klarify-sync may have migrated it since this one started).
    #[tracing::instrument(skip_all)]
    pub async fn ping(&self) -> Result<(), StoreError> {
        let (applied, expected) = on_backend!(self, b => (
            b.applied_migration().await?,
            b.migrator().iter().map(|m| m.version).max(),
        ));
        if applied != expected {
            return Err(StoreError::Schema { applied, expected });
        }
        Ok(())
    }

    /// The stored cursor: every procedure modified up to it has been written.
    #[tracing::instrument(skip_all)]
    pub async fn watermark(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        let stored = on_backend!(self, b => b.watermark().await?);
        stored.map(|w| parse_stored(&w)).transpose()
    }

    /// Records the start of a pass; call it holding the pass lock.
    #[tracing::instrument(skip_all)]
    pub async fn begin_run(
        &self,
        mode: Mode,
        watermark: Option<OffsetDateTime>,
    ) -> Result<RunId, StoreError> {
        on_backend!(self, b => b.begin_run(mode, watermark).await)
    }

    #[tracing::instrument(skip_all)]
    pub async fn finish_run(&self, run: RunId, record: &RunRecord) -> Result<(), StoreError> {
        on_backend!(self, b => b.finish_run(run, record).await)
    }

    /// Writes one page in one transaction: procedures that are new or changed, their lanes and
    /// calls, the rejected items, and the cursor. All or nothing.
    #[tracing::instrument(skip_all, fields(items = page.items.len()))]
    pub async fn write_page(&self, page: &PageWrite<'_>) -> Result<WriteStats, StoreError> {
        on_backend!(self, b => {
            let stats = write::write_page(b.begin().await?, page, batch_items(b)).await?;
            b.after_write();
            Ok(stats)
        })
    }

    /// Before a pass: when the mirror holds no procedure at all, drops the indexes (and, on
    /// PostgreSQL, foreign keys) a bulk load builds at its end ([`bulk_load`]). Returns whether
    /// the mirror was empty. Call it holding the pass lock.
    #[tracing::instrument(skip_all)]
    pub async fn defer_for_bulk_load(&self) -> Result<bool, StoreError> {
        on_backend!(self, b => bulk_load::defer(b.begin().await?).await)
    }

    /// Builds what [`Store::defer_for_bulk_load`] dropped; also what a pass killed before its
    /// end left out. Returns how many indexes and constraints it built.
    #[tracing::instrument(skip_all)]
    pub async fn restore_deferred(&self) -> Result<usize, StoreError> {
        on_backend!(self, b => bulk_load::restore(b.begin().await?, Restore::All).await)
    }

    /// Builds what a load Klarify keeps waiting builds early, while the readers wait: the
    /// deferred indexes the backend keeps cheaply row by row, never the foreign keys
    /// ([`bulk_load`]). Returns how many.
    #[tracing::instrument(skip_all)]
    pub async fn build_early_indexes(&self) -> Result<usize, StoreError> {
        on_backend!(self, b => bulk_load::restore(b.begin().await?, Restore::Early).await)
    }

    /// After a complete backfill: marks live procedures the run did not see as deleted, unless
    /// that would be more than `max_share` of them. Returns how many were marked.
    #[tracing::instrument(skip_all)]
    pub async fn mark_unseen_deleted(&self, run: RunId, max_share: f64) -> Result<u64, StoreError> {
        on_backend!(self, b => sweep::mark_unseen_deleted(b.begin().await?, run, max_share).await)
    }

    /// Every live procedure as the mirror holds it, lanes and calls in the API's order, sorted by
    /// id. What a BI user would read back; tests compare it with the source.
    #[tracing::instrument(skip_all)]
    pub async fn live_procedures(&self) -> Result<Vec<Procedure>, StoreError> {
        let rows = on_backend!(self, b => b.live_rows().await?);
        let mut index = HashMap::with_capacity(rows.procedures.len());
        let mut procs: Vec<Procedure> = Vec::with_capacity(rows.procedures.len());
        for p in rows.procedures {
            index.insert(p.id.clone(), procs.len());
            procs.push(Procedure {
                id: p.id,
                name: p.name,
                status: p.status,
                owner: p.owner,
                performer: p.performer,
                updated_at: p.updated_at,
                url: p.url,
                raw: p.raw,
                lanes: Vec::new(),
                called_within: Vec::new(),
                called_from: Vec::new(),
            });
        }
        // Each query sees the database as of its own start: lanes and calls of a procedure
        // written since the first are left out, as that procedure is.
        for (id, lane) in rows.lanes {
            if let Some(&i) = index.get(&id) {
                procs[i].lanes.push(lane);
            }
        }
        for (id, relation, name) in rows.calls {
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
        on_backend!(self, b => b.call_graph().await)
    }

    /// The tie groups earlier passes could not prove they read completely, oldest instant first.
    #[tracing::instrument(skip_all)]
    pub async fn unproven_groups(&self) -> Result<Vec<StoredUnproven>, StoreError> {
        on_backend!(self, b => b.unproven_groups().await)
    }

    /// How many live procedures are dated after `after`.
    #[tracing::instrument(skip_all)]
    pub async fn future_dated(&self, after: OffsetDateTime) -> Result<u64, StoreError> {
        on_backend!(self, b => b.future_dated(after).await)
    }

    /// The watermark, the table sizes, the newest `runs` passes, the unproven tie groups, and
    /// how many procedures are dated after `future_after`.
    #[tracing::instrument(skip_all)]
    pub async fn status(
        &self,
        runs: i64,
        future_after: OffsetDateTime,
    ) -> Result<Status, StoreError> {
        let (counts, recent_runs) =
            on_backend!(self, b => (b.counts().await?, b.recent_runs(runs).await?));
        Ok(Status {
            backend: self.backend(),
            watermark: self.watermark().await?,
            counts,
            future_dated: count(self.future_dated(future_after).await?),
            unproven_tie_groups: self.unproven_groups().await?,
            recent_runs,
        })
    }

    /// Takes the lock when nobody holds it; `None` when another process does.
    pub async fn try_lock(&self, kind: LockKind) -> Result<Option<LockGuard>, StoreError> {
        on_backend!(self, b => b.try_lock(kind).await)
    }

    pub async fn close(&self) {
        on_backend!(self, b => b.close().await)
    }
}

fn batch_items<B: Backend>(_: &B) -> usize {
    B::BATCH_ITEMS
}

fn parse_stored(s: &str) -> Result<OffsetDateTime, StoreError> {
    parse_instant(s).map_err(|e| StoreError::Corrupt(format!("timestamp {}: {e}", untrusted(s))))
}
