//! PostgreSQL: production. Added rows (new procedures, every lane and call) are written by
//! `COPY`, the rest by `UNNEST` of typed arrays, a statement per table for every 1,000
//! procedures; timestamps are `timestamptz` but for the cursor columns, which are text in the
//! watermark's form on both backends.

mod tx;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPool, PgPoolOptions};
use time::OffsetDateTime;

use super::model::{Mode, RunRecord, RunSummary, StoredUnproven};
use super::{
    sql, Backend, CallEdge, Counts, GraphNode, LiveRows, LockGuard, LockKind, RunId, StoreError,
};
use crate::klarify::format_instant;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

const LIVE_PROCEDURES: &str = "SELECT id, name, status, owner, performer, updated_at, url, \
    raw::text AS raw FROM procedures WHERE deleted_at IS NULL";
const RECENT_RUNS: &str = "SELECT id, started_at, finished_at, mode, outcome, pages, fetched, \
    inserted, updated, unchanged, deleted, rejected, watermark_after::timestamptz AS watermark_after, \
    error FROM sync_runs ORDER BY id DESC LIMIT $1";
const UNPROVEN_GROUPS: &str = "SELECT at::timestamptz AS at, size_bound, size_counted, \
    recorded_at, checked_at, checks FROM unproven_tie_groups ORDER BY at";

#[derive(Clone)]
pub(super) struct PgBackend {
    /// Reads: readiness, status, tests, and the lock sessions.
    pool: PgPool,
    /// Writes, one connection.
    writer: PgPool,
}

impl PgBackend {
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = |n: u32| {
            PgPoolOptions::new()
                .max_connections(n)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
        };
        let writer = pool(1).await?;
        let pool = pool(max_connections).await?;
        Ok(Self { pool, writer })
    }
}

impl Backend for PgBackend {
    type Tx = tx::PgTx;
    const NAME: &'static str = "postgres";
    // The server's work does not depend on it; klarify-sync's memory does: the arrays of a
    // statement hold about a megabyte per 1,000 procedures.
    const BATCH_ITEMS: usize = 1000;

    sql::backend_common!();

    async fn begin(&self) -> Result<tx::PgTx, StoreError> {
        Ok(tx::PgTx(self.writer.begin().await?))
    }

    async fn try_lock(&self, kind: LockKind) -> Result<Option<LockGuard>, StoreError> {
        super::lock::advisory_lock(&self.pool, kind).await
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

/// Timestamps are `timestamptz` but for the cursor columns (text, as on SQLite).
fn stamp(t: OffsetDateTime) -> OffsetDateTime {
    t
}

/// The SQLSTATEs whose cause is the set-up, not the data, in words that say what to do.
pub(super) fn explain(e: &PgDatabaseError) -> Option<String> {
    let m = e.message();
    Some(match e.code() {
        "28P01" | "28000" => format!("PostgreSQL refused the login ({m}): check the user and password in database.url (DATABASE_URL) and the server's pg_hba.conf"),
        "3D000" => format!("{m}: create it (createdb) or fix the database name in database.url (DATABASE_URL)"),
        "42501" => format!("the database user lacks a privilege klarify-sync needs ({m}): it must own the mirror's tables, or be granted CREATE on the schema for the first migration"),
        "53300" => format!("the PostgreSQL server has no free connection ({m}): lower database.max_connections or raise the server's max_connections"),
        "53100" => format!("the PostgreSQL server's disk is full ({m}): free space, then retry"),
        "57P01" | "57P02" | "57P03" => format!("the PostgreSQL server is shutting down or starting up ({m}); the next pass retries"),
        "25006" => format!("the server is a read-only standby ({m}): point database.url at the primary"),
        "55P03" => format!("a lock is held by another session ({m}): a BI session left in a transaction? End it, then retry"),
        _ => return None,
    })
}
