//! Statements both backends run as they are. Timestamps are bound by each backend in its own
//! type (SQLite: fixed-width text; PostgreSQL: `timestamptz`), so these take none, or take them
//! in columns both store as text.

pub(super) const APPLIED_MIGRATION: &str =
    "SELECT MAX(version) FROM _sqlx_migrations WHERE success";
pub(super) const GET_WATERMARK: &str = "SELECT watermark FROM sync_state WHERE id = 1";
pub(super) const NEXT_KEY: &str = "SELECT COALESCE(MAX(key), 0) + 1 FROM procedures";
pub(super) const SET_WATERMARK: &str = "INSERT INTO sync_state (id, watermark) VALUES (1, $1) \
     ON CONFLICT (id) DO UPDATE SET watermark = excluded.watermark";
/// Passes of processes that died mid-pass; only run under the pass lock, when none is running.
pub(super) const ABANDON_RUNS: &str =
    "UPDATE sync_runs SET outcome = 'abandoned' WHERE outcome = 'running'";
pub(super) const COUNT_LIVE: &str = "SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL";
pub(super) const COUNT_UNSEEN: &str = "SELECT COUNT(*) FROM procedures p \
     WHERE p.deleted_at IS NULL \
     AND NOT EXISTS (SELECT 1 FROM sync_seen s WHERE s.run_id = $1 AND s.procedure_id = p.id)";
/// Leftovers of backfills that were killed before they finished are dropped too.
pub(super) const CLEAR_SEEN: &str = "DELETE FROM sync_seen WHERE run_id <= $1";
pub(super) const COUNTS: &str = "SELECT \
     (SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL) AS live_procedures, \
     (SELECT COUNT(*) FROM procedures WHERE deleted_at IS NOT NULL) AS deleted_procedures, \
     (SELECT COUNT(*) FROM procedure_lanes) AS lanes, \
     (SELECT COUNT(*) FROM procedure_calls) AS calls, \
     (SELECT COUNT(*) FROM rejected_items) AS rejected_items";
pub(super) const ANY_PROCEDURE: &str = "SELECT EXISTS (SELECT 1 FROM procedures)";
pub(super) const RECORD_DEFERRED: &str =
    "INSERT INTO deferred_schema (name, kind, restore) VALUES ($1, $2, $3)";
pub(super) const DEFERRED: &str = "SELECT name, kind, restore FROM deferred_schema ORDER BY name";
pub(super) const FORGET_DEFERRED: &str = "DELETE FROM deferred_schema WHERE name = $1";
pub(super) const DELETE_UNPROVEN: &str = "DELETE FROM unproven_tie_groups WHERE at = $1";
pub(super) const LIVE_LANES: &str = "SELECT l.procedure_id, l.lane FROM procedure_lanes l \
     JOIN procedures p ON p.id = l.procedure_id WHERE p.deleted_at IS NULL \
     ORDER BY l.procedure_id, l.position";
pub(super) const LIVE_CALLS: &str =
    "SELECT c.procedure_id, c.relation, c.related_name FROM procedure_calls c \
     JOIN procedures p ON p.id = c.procedure_id WHERE p.deleted_at IS NULL \
     ORDER BY c.procedure_id, c.relation, c.position";
pub(super) const GRAPH_NODES: &str =
    "SELECT id, name, status, owner FROM procedures WHERE deleted_at IS NULL ORDER BY id";
pub(super) const GRAPH_EDGES: &str =
    "SELECT procedure_id, relation, related_name, related_procedure_id, \
     resolution, candidates FROM procedure_call_edges ORDER BY procedure_id, relation, position";
pub(super) const BEGIN_RUN: &str =
    "INSERT INTO sync_runs (started_at, mode, outcome, watermark_before) \
     VALUES ($1, $2, 'running', $3) RETURNING id";
/// `$1`: id, `$2`: finished_at, `$3`: outcome, `$4`..`$10`: [`super::RunRecord::counts`],
/// `$11`: watermark_after, `$12`: error.
pub(super) const FINISH_RUN: &str = "UPDATE sync_runs SET finished_at = $2, outcome = $3, \
     pages = $4, fetched = $5, inserted = $6, updated = $7, unchanged = $8, deleted = $9, \
     rejected = $10, watermark_after = $11, error = $12 WHERE id = $1";
pub(super) const MARK_DELETED: &str = "UPDATE procedures SET deleted_at = $2 \
     WHERE deleted_at IS NULL AND NOT EXISTS \
     (SELECT 1 FROM sync_seen s WHERE s.run_id = $1 AND s.procedure_id = procedures.id)";
pub(super) const RECORD_UNPROVEN: &str = "INSERT INTO unproven_tie_groups \
     (at, size_bound, size_counted, recorded_at, checked_at, checks) VALUES ($1, $2, $3, $4, $4, 1) \
     ON CONFLICT (at) DO UPDATE SET size_bound = excluded.size_bound, \
     size_counted = excluded.size_counted, checked_at = excluded.checked_at, \
     checks = unproven_tie_groups.checks + 1";
pub(super) const COUNT_FUTURE: &str =
    "SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL AND updated_at > $1";
/// The upsert keeps a stored newer version, and revives a row marked deleted.
pub(super) const ON_CONFLICT_PROCEDURES: &str = " ON CONFLICT (id) DO UPDATE SET \
     name = excluded.name, status = excluded.status, owner = excluded.owner, \
     performer = excluded.performer, updated_at = excluded.updated_at, url = excluded.url, \
     raw = excluded.raw, content_hash = excluded.content_hash, synced_at = excluded.synced_at, \
     deleted_at = NULL \
     WHERE procedures.deleted_at IS NOT NULL OR procedures.updated_at <= excluded.updated_at";
pub(super) const ON_CONFLICT_REJECTED: &str = " ON CONFLICT (raw_hash) DO UPDATE SET \
     seen_at = excluded.seen_at, reason = excluded.reason \
     RETURNING raw_hash, first_seen_at = seen_at";

// What both backends execute the same way is written once, below, and expanded into each
// backend's impls. Names are resolved where a macro is expanded: each backend module defines
// `MIGRATOR`, `LIVE_PROCEDURES`, `RECENT_RUNS` and `UNPROVEN_GROUPS` (their SQL differs), and
// `stamp`, which binds an instant in the type its timestamp columns take.

/// [`super::Backend`]'s reads and pass records.
macro_rules! backend_common {
    () => {
        fn migrator(&self) -> &'static sqlx::migrate::Migrator {
            &MIGRATOR
        }

        async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
            MIGRATOR.run(&self.writer).await
        }

        async fn applied_migration(&self) -> Result<Option<i64>, StoreError> {
            Ok(sqlx::query_scalar(sql::APPLIED_MIGRATION)
                .fetch_one(&self.pool)
                .await?)
        }

        async fn watermark(&self) -> Result<Option<String>, StoreError> {
            let w: Option<Option<String>> = sqlx::query_scalar(sql::GET_WATERMARK)
                .fetch_optional(&self.pool)
                .await?;
            Ok(w.flatten())
        }

        async fn begin_run(
            &self,
            mode: Mode,
            watermark: Option<OffsetDateTime>,
        ) -> Result<RunId, StoreError> {
            let mut tx = self.writer.begin().await?;
            sqlx::query(sql::ABANDON_RUNS).execute(&mut *tx).await?;
            let id = sqlx::query_scalar(sql::BEGIN_RUN)
                .bind(stamp(OffsetDateTime::now_utc()))
                .bind(mode.as_str())
                .bind(watermark.map(format_instant))
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(id)
        }

        async fn finish_run(&self, run: RunId, r: &RunRecord) -> Result<(), StoreError> {
            let q = sqlx::query(sql::FINISH_RUN)
                .bind(run)
                .bind(stamp(OffsetDateTime::now_utc()))
                .bind(r.outcome.as_str());
            r.counts()
                .into_iter()
                .fold(q, |q, n| q.bind(n))
                .bind(r.watermark_after.map(format_instant))
                .bind(r.error.as_deref())
                .execute(&self.writer)
                .await?;
            Ok(())
        }

        async fn live_rows(&self) -> Result<LiveRows, StoreError> {
            Ok(LiveRows {
                procedures: sqlx::query_as(LIVE_PROCEDURES)
                    .fetch_all(&self.pool)
                    .await?,
                lanes: sqlx::query_as(sql::LIVE_LANES)
                    .fetch_all(&self.pool)
                    .await?,
                calls: sqlx::query_as(sql::LIVE_CALLS)
                    .fetch_all(&self.pool)
                    .await?,
            })
        }

        async fn call_graph(&self) -> Result<(Vec<GraphNode>, Vec<CallEdge>), StoreError> {
            let nodes = sqlx::query_as(sql::GRAPH_NODES)
                .fetch_all(&self.pool)
                .await?;
            let edges = sqlx::query_as(sql::GRAPH_EDGES)
                .fetch_all(&self.pool)
                .await?;
            Ok((nodes, edges))
        }

        async fn unproven_groups(&self) -> Result<Vec<StoredUnproven>, StoreError> {
            Ok(sqlx::query_as(UNPROVEN_GROUPS)
                .fetch_all(&self.pool)
                .await?)
        }

        async fn future_dated(&self, after: OffsetDateTime) -> Result<u64, StoreError> {
            let n: i64 = sqlx::query_scalar(sql::COUNT_FUTURE)
                .bind(stamp(after))
                .fetch_one(&self.pool)
                .await?;
            Ok(n.max(0) as u64)
        }

        async fn counts(&self) -> Result<Counts, StoreError> {
            Ok(sqlx::query_as(sql::COUNTS).fetch_one(&self.pool).await?)
        }

        async fn recent_runs(&self, limit: i64) -> Result<Vec<RunSummary>, StoreError> {
            Ok(sqlx::query_as(RECENT_RUNS)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
        }
    };
}
pub(super) use backend_common;

/// [`super::Tx`] and [`super::sweep::SweepTx`].
macro_rules! tx_common {
    ($tx:ty) => {
        impl Tx for $tx {
            async fn commit(self) -> Result<(), StoreError> {
                Ok(self.0.commit().await?)
            }
        }

        impl SweepTx for $tx {
            async fn count_live(&mut self) -> Result<u64, StoreError> {
                let n: i64 = sqlx::query_scalar(sql::COUNT_LIVE)
                    .fetch_one(&mut *self.0)
                    .await?;
                Ok(n.max(0) as u64)
            }

            async fn count_unseen(&mut self, run: RunId) -> Result<u64, StoreError> {
                let n: i64 = sqlx::query_scalar(sql::COUNT_UNSEEN)
                    .bind(run)
                    .fetch_one(&mut *self.0)
                    .await?;
                Ok(n.max(0) as u64)
            }

            async fn mark_unseen_deleted(
                &mut self,
                run: RunId,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                sqlx::query(sql::MARK_DELETED)
                    .bind(run)
                    .bind(stamp(now))
                    .execute(&mut *self.0)
                    .await?;
                Ok(())
            }

            async fn clear_seen(&mut self, run: RunId) -> Result<(), StoreError> {
                sqlx::query(sql::CLEAR_SEEN)
                    .bind(run)
                    .execute(&mut *self.0)
                    .await?;
                Ok(())
            }
        }
    };
}
pub(super) use tx_common;

/// [`super::bulk_load::SchemaTx`]'s bookkeeping of what was deferred.
macro_rules! schema_common {
    () => {
        async fn any_procedure(&mut self) -> Result<bool, StoreError> {
            Ok(sqlx::query_scalar(sql::ANY_PROCEDURE)
                .fetch_one(&mut *self.0)
                .await?)
        }

        async fn record_deferred(&mut self, d: &Deferred) -> Result<(), StoreError> {
            sqlx::query(sql::RECORD_DEFERRED)
                .bind(&d.name)
                .bind(d.kind)
                .bind(&d.restore)
                .execute(&mut *self.0)
                .await?;
            Ok(())
        }

        async fn deferred(&mut self) -> Result<Vec<Deferred>, StoreError> {
            Ok(sqlx::query_as(sql::DEFERRED)
                .fetch_all(&mut *self.0)
                .await?)
        }

        async fn restore(&mut self, statement: &str) -> Result<(), StoreError> {
            self.0.execute(statement).await?;
            Ok(())
        }

        async fn forget_deferred(&mut self, name: &str) -> Result<(), StoreError> {
            sqlx::query(sql::FORGET_DEFERRED)
                .bind(name)
                .execute(&mut *self.0)
                .await?;
            Ok(())
        }
    };
}
pub(super) use schema_common;

/// [`super::write::WriteTx`]'s statements of one row each.
macro_rules! write_common {
    () => {
        async fn next_key(&mut self) -> Result<i64, StoreError> {
            Ok(sqlx::query_scalar(sql::NEXT_KEY)
                .fetch_one(&mut *self.0)
                .await?)
        }

        async fn record_unproven(
            &mut self,
            g: &UnprovenGroup,
            now: OffsetDateTime,
        ) -> Result<(), StoreError> {
            sqlx::query(sql::RECORD_UNPROVEN)
                .bind(format_instant(g.at))
                .bind(count(g.size_bound))
                .bind(count(g.size_counted))
                .bind(stamp(now))
                .execute(&mut *self.0)
                .await?;
            Ok(())
        }

        async fn delete_unproven(&mut self, at: OffsetDateTime) -> Result<(), StoreError> {
            sqlx::query(sql::DELETE_UNPROVEN)
                .bind(format_instant(at))
                .execute(&mut *self.0)
                .await?;
            Ok(())
        }

        async fn set_watermark(&mut self, watermark: OffsetDateTime) -> Result<(), StoreError> {
            sqlx::query(sql::SET_WATERMARK)
                .bind(format_instant(watermark))
                .execute(&mut *self.0)
                .await?;
            Ok(())
        }
    };
}
pub(super) use write_common;
