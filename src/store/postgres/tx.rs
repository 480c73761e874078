//! PostgreSQL's statements of a page write, a bulk load and a deletion sweep: `UNNEST` of typed
//! arrays, one statement per table per batch.

use std::collections::HashMap;

use sqlx::postgres::PgDatabaseError;
use sqlx::{Executor, FromRow, Postgres as Pg, Row, Transaction};
use time::OffsetDateTime;

use super::super::bulk_load::{Deferrable, Deferred, Dropped, EarlyIndexes, SchemaTx};
use super::super::model::{ProcRow, RejectRow, UnprovenGroup};
use super::super::sweep::SweepTx;
use super::super::write::{calls, lanes, Stored, Version, WriteTx};
use super::super::{count, sql, RunId, StoreError, Tx};
use super::stamp;
use crate::klarify::format_instant;

const EXISTING: &str =
    "SELECT id, key, updated_at, content_hash, deleted_at IS NOT NULL AS deleted \
    FROM procedures WHERE id = ANY($1)";
/// The parts of one statement run on one snapshot and foreign keys are checked at its end, so
/// the lanes may name the history rows the same statement adds. A history row's lanes go with
/// it (ON DELETE CASCADE).
const ARCHIVE: &str = "WITH v AS (SELECT * FROM UNNEST($1::text[], $2::timestamptz[]) AS v(id, updated_at)), \
    current_again AS (DELETE FROM procedure_history h USING v \
        WHERE h.procedure_id = v.id AND h.updated_at = v.updated_at), \
    lanes AS (INSERT INTO procedure_history_lanes (procedure_id, updated_at, position, lane) \
        SELECT l.procedure_id, p.updated_at, l.position, l.lane \
        FROM procedure_lanes l JOIN procedures p ON p.key = l.procedure_key \
        WHERE p.id IN (SELECT id FROM v)) \
    INSERT INTO procedure_history \
        (procedure_id, updated_at, name, status, owner, performer, url, raw, recorded_at, deleted_at) \
    SELECT id, updated_at, name, status, owner, performer, url, raw, synced_at, deleted_at \
    FROM procedures WHERE id IN (SELECT id FROM v)";
const DELETE_CHILDREN: &str =
    "WITH lanes AS (DELETE FROM procedure_lanes WHERE procedure_key = ANY($1)) \
    DELETE FROM procedure_calls WHERE procedure_key = ANY($1)";
const UPSERT_PROCEDURES: &str = "INSERT INTO procedures (id, name, status, owner, performer, \
    updated_at, url, raw, content_hash, first_seen_at, synced_at, key) \
    SELECT id, name, status, owner, performer, updated_at, url, raw::jsonb, content_hash, $10, $10, key \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], \
        $7::text[], $8::text[], $9::text[], $11::int8[]) \
        AS r(id, name, status, owner, performer, updated_at, url, raw, content_hash, key)";
const COPY_PROCEDURES: &str = "COPY procedures (id, name, status, owner, performer, updated_at, \
    url, raw, content_hash, first_seen_at, synced_at, key) FROM STDIN";
const COPY_LANES: &str =
    "COPY procedure_lanes (procedure_key, procedure_id, position, lane) FROM STDIN";
const COPY_CALLS: &str = "COPY procedure_calls \
    (procedure_key, procedure_id, relation, position, related_name) FROM STDIN";
const INSERT_SEEN: &str = "INSERT INTO sync_seen (run_id, procedure_id) \
    SELECT $1, UNNEST($2::text[]) ON CONFLICT DO NOTHING";
const UPSERT_REJECTED: &str =
    "INSERT INTO rejected_items (raw_hash, raw, reason, first_seen_at, seen_at) \
    SELECT h, r, why, $4, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS x(h, r, why)";

pub(in crate::store) struct PgTx(pub(super) Transaction<'static, Pg>);

impl PgTx {
    /// Sends `rows` through `COPY … FROM STDIN`: rows that are only added (new procedures, and
    /// lanes and calls, whose old ones were deleted first) skip the executor's per-row work.
    async fn copy(&mut self, statement: &str, rows: CopyText) -> Result<(), StoreError> {
        if rows.0.is_empty() {
            return Ok(());
        }
        let mut copy = self.0.copy_in_raw(statement).await?;
        copy.send(rows.0).await?;
        copy.finish().await?;
        Ok(())
    }
}

/// Rows in `COPY`'s text format: tab-separated, one a line, `\N` for null.
#[derive(Default)]
struct CopyText(Vec<u8>);

impl CopyText {
    fn row<const N: usize>(&mut self, fields: [Option<&str>; N]) {
        for (i, field) in fields.into_iter().enumerate() {
            if i > 0 {
                self.0.push(b'\t');
            }
            let Some(text) = field else {
                self.0.extend_from_slice(b"\\N");
                continue;
            };
            for b in text.bytes() {
                match b {
                    b'\\' => self.0.extend_from_slice(b"\\\\"),
                    b'\t' => self.0.extend_from_slice(b"\\t"),
                    b'\n' => self.0.extend_from_slice(b"\\n"),
                    b'\r' => self.0.extend_from_slice(b"\\r"),
                    b => self.0.push(b),
                }
            }
        }
        self.0.push(b'\n');
    }
}

impl WriteTx for PgTx {
    sql::write_common!();

    async fn existing(&mut self, ids: &[&str]) -> Result<HashMap<String, Stored>, StoreError> {
        let rows = sqlx::query(EXISTING)
            .bind(ids)
            .fetch_all(&mut *self.0)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("id")?, Stored::from_row(row)?)))
            .collect()
    }

    async fn archive(&mut self, versions: &[Version<'_>]) -> Result<(), StoreError> {
        let ids: Vec<&str> = versions.iter().map(|v| v.id).collect();
        let at: Vec<OffsetDateTime> = versions.iter().map(|v| v.updated_at).collect();
        sqlx::query(ARCHIVE)
            .bind(ids)
            .bind(at)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn delete_children(&mut self, keys: &[i64]) -> Result<(), StoreError> {
        sqlx::query(DELETE_CHILDREN)
            .bind(keys)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn upsert_procedures(
        &mut self,
        rows: &[ProcRow<'_>],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let column = |f: for<'r> fn(&'r ProcRow<'r>) -> Option<&'r str>| {
            rows.iter().map(f).collect::<Vec<_>>()
        };
        let updated_at: Vec<OffsetDateTime> = rows.iter().map(|r| r.procedure.updated_at).collect();
        let statement = format!("{UPSERT_PROCEDURES}{}", sql::ON_CONFLICT_PROCEDURES);
        sqlx::query(&statement)
            .bind(column(|r| Some(r.procedure.id.as_str())))
            .bind(column(|r| r.procedure.name.as_deref()))
            .bind(column(|r| r.procedure.status.as_deref()))
            .bind(column(|r| r.procedure.owner.as_deref()))
            .bind(column(|r| r.procedure.performer.as_deref()))
            .bind(updated_at)
            .bind(column(|r| r.procedure.url.as_deref()))
            .bind(column(|r| Some(r.procedure.raw.as_str())))
            .bind(column(|r| Some(r.content_hash.as_str())))
            .bind(now)
            .bind(rows.iter().map(|r| r.key).collect::<Vec<_>>())
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn insert_procedures(
        &mut self,
        rows: &[ProcRow<'_>],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let now = format_instant(now);
        let mut copy = CopyText::default();
        for r in rows {
            let p = r.procedure;
            copy.row([
                Some(p.id.as_str()),
                p.name.as_deref(),
                p.status.as_deref(),
                p.owner.as_deref(),
                p.performer.as_deref(),
                Some(&format_instant(p.updated_at)),
                p.url.as_deref(),
                Some(&p.raw),
                Some(&r.content_hash),
                Some(&now),
                Some(&now),
                Some(&r.key.to_string()),
            ]);
        }
        self.copy(COPY_PROCEDURES, copy).await
    }

    async fn insert_lanes(&mut self, rows: &[ProcRow<'_>]) -> Result<(), StoreError> {
        let mut copy = CopyText::default();
        for ((key, id), position, lane) in lanes(rows) {
            copy.row([
                Some(&key.to_string()),
                Some(id),
                Some(&position.to_string()),
                Some(lane),
            ]);
        }
        self.copy(COPY_LANES, copy).await
    }

    async fn insert_calls(&mut self, rows: &[ProcRow<'_>]) -> Result<(), StoreError> {
        let mut copy = CopyText::default();
        for ((key, id), relation, position, name) in calls(rows) {
            copy.row([
                Some(&key.to_string()),
                Some(id),
                Some(relation),
                Some(&position.to_string()),
                Some(name),
            ]);
        }
        self.copy(COPY_CALLS, copy).await
    }

    async fn insert_seen(&mut self, run: RunId, ids: &[&str]) -> Result<(), StoreError> {
        sqlx::query(INSERT_SEEN)
            .bind(run)
            .bind(ids)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn upsert_rejected(
        &mut self,
        rows: &[RejectRow<'_>],
        now: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        let column =
            |f: for<'r> fn(&'r RejectRow<'r>) -> &'r str| rows.iter().map(f).collect::<Vec<_>>();
        let statement = format!("{UPSERT_REJECTED}{}", sql::ON_CONFLICT_REJECTED);
        let returned: Vec<(String, bool)> = sqlx::query_as(&statement)
            .bind(column(|r| &r.raw_hash))
            .bind(column(|r| &r.rejected.raw))
            .bind(column(|r| &r.rejected.reason))
            .bind(now)
            .fetch_all(&mut *self.0)
            .await?;
        Ok(returned
            .into_iter()
            .filter_map(|(hash, first)| first.then_some(hash))
            .collect())
    }
}

impl SchemaTx for PgTx {
    /// Each index insert is a descent of its tree in shared buffers, which hold them all at the
    /// sizes measured (docs/performance.md).
    const EARLY_INDEXES: EarlyIndexes = EarlyIndexes::All;

    sql::schema_common!();

    /// Also the foreign keys of lanes and calls: each row's check is a locking lookup of its
    /// procedure, while adding the constraint back checks all rows in one join. (SQLite cannot
    /// drop a foreign key, and its checks cost next to nothing.) The history's stay: deleting a
    /// history row relies on their cascade.
    async fn deferrable(&mut self) -> Result<Vec<Deferrable>, StoreError> {
        const DEFERRABLE: &str = "SELECT i.relname::text AS name, 'index' AS kind, \
                format('DROP INDEX %I.%I', n.nspname, i.relname) AS drop, \
                pg_get_indexdef(x.indexrelid) AS restore \
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
            JOIN pg_namespace n ON n.oid = t.relnamespace \
            WHERE n.nspname = current_schema() AND NOT x.indisunique \
              AND t.relname IN ('procedures', 'procedure_lanes', 'procedure_calls') \
            UNION ALL \
            SELECT c.conname::text, 'constraint', format('ALTER TABLE %I.%I DROP CONSTRAINT %I', n.nspname, t.relname, c.conname), \
                format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', n.nspname, t.relname, c.conname, \
                       pg_get_constraintdef(c.oid)) \
            FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
            JOIN pg_namespace n ON n.oid = t.relnamespace \
            WHERE c.contype = 'f' AND n.nspname = current_schema() \
              AND t.relname IN ('procedure_lanes', 'procedure_calls')";
        // Dropping an index waits for every open transaction that read its table.
        self.0.execute("SET LOCAL lock_timeout = '2s'").await?;
        Ok(sqlx::query_as(DEFERRABLE).fetch_all(&mut *self.0).await?)
    }

    async fn drop_deferrable(&mut self, d: &Deferrable) -> Result<Dropped, StoreError> {
        match self.0.execute(d.drop.as_str()).await {
            Ok(_) => Ok(Dropped::Yes),
            Err(e) if pg_code(&e) == Some("55P03") => Ok(Dropped::Blocked),
            Err(e) => Err(e.into()),
        }
    }
}

fn pg_code(e: &sqlx::Error) -> Option<&str> {
    e.as_database_error()?
        .try_downcast_ref::<PgDatabaseError>()
        .map(PgDatabaseError::code)
}

sql::tx_common!(PgTx);
