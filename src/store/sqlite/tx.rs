//! SQLite's statements of a page write, a bulk load and a deletion sweep: multi-row statements
//! prepared once per shape and reused for the whole batch.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Executor, FromRow, Row, Sqlite, Transaction};
use time::OffsetDateTime;

use super::super::bulk_load::{Deferrable, Deferred, Dropped, EarlyIndexes, SchemaTx};
use super::super::model::{ProcRow, RejectRow, UnprovenGroup};
use super::super::sweep::SweepTx;
use super::super::write::{calls, lanes, Stored, Version, WriteTx};
use super::super::{count, sql, RunId, StoreError, Tx};
use super::stamp;
use crate::klarify::format_instant;

/// The most rows one statement writes. Smaller remainders go in power-of-two chunks, so that a
/// table is written by at most eight statement shapes, each prepared once per connection.
const MAX_ROWS: usize = 128;
const UPSERT_PROCEDURES: &str = "INSERT INTO procedures (id, name, status, owner, performer, \
    updated_at, url, raw, content_hash, first_seen_at, synced_at, key)";
const INSERT_LANES: &str =
    "INSERT INTO procedure_lanes (procedure_key, procedure_id, position, lane)";
const INSERT_CALLS: &str = "INSERT INTO procedure_calls \
    (procedure_key, procedure_id, relation, position, related_name)";
const UPSERT_REJECTED: &str =
    "INSERT INTO rejected_items (raw_hash, raw, reason, first_seen_at, seen_at)";
const ARCHIVE_PROCEDURES: &str = "INSERT INTO procedure_history (procedure_id, updated_at, name, \
    status, owner, performer, url, raw, recorded_at, deleted_at) \
    SELECT id, updated_at, name, status, owner, performer, url, raw, synced_at, deleted_at \
    FROM procedures WHERE id IN (";
const ARCHIVE_LANES: &str = "INSERT INTO procedure_history_lanes (procedure_id, updated_at, \
    position, lane) SELECT l.procedure_id, p.updated_at, l.position, l.lane \
    FROM procedure_lanes l JOIN procedures p ON p.key = l.procedure_key WHERE p.id IN (";

pub(in crate::store) struct SqliteTx(pub(super) Transaction<'static, Sqlite>);

type SqliteQuery<'q> = Query<'q, Sqlite, SqliteArguments<'q>>;

impl SqliteTx {
    /// Runs `head VALUES (…), … tail` over `rows`, `columns` parameters each, in chunks of at
    /// most [`MAX_ROWS`], and returns what it returns.
    async fn each_chunk<'r, R>(
        &mut self,
        (head, tail): (&'static str, &'static str),
        columns: usize,
        rows: &'r [R],
        bind: impl Fn(SqliteQuery<'r>, &'r R) -> SqliteQuery<'r>,
    ) -> Result<Vec<SqliteRow>, StoreError> {
        let mut out = Vec::new();
        for chunk in chunks(rows) {
            let statement = shape(head, tail, columns, chunk.len());
            let query = chunk.iter().fold(sqlx::query(statement), &bind);
            out.extend(query.fetch_all(&mut *self.0).await?);
        }
        Ok(out)
    }
}

/// `rows` in chunks of [`MAX_ROWS`], then of the largest power of two that fits.
fn chunks<R>(mut rows: &[R]) -> impl Iterator<Item = &[R]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = if rows.len() >= MAX_ROWS {
            MAX_ROWS
        } else {
            1 << rows.len().ilog2()
        };
        let (chunk, rest) = rows.split_at(n);
        rows = rest;
        Some(chunk)
    })
}

/// The text of a statement over `rows` rows of `columns`: `head VALUES (?, …), … tail`. Built
/// once per shape and kept, as sqlx keeps the prepared statement, for the life of the process;
/// [`chunks`] bounds the shapes.
fn shape(head: &'static str, tail: &'static str, columns: usize, rows: usize) -> &'static str {
    type Key = (&'static str, &'static str, usize, usize);
    static SHAPES: LazyLock<Mutex<HashMap<Key, &'static str>>> = LazyLock::new(Mutex::default);
    let mut shapes = SHAPES
        .lock()
        .expect("no panics while the shapes lock is held");
    shapes
        .entry((head, tail, columns, rows))
        .or_insert_with(|| {
            let row = format!("({})", vec!["?"; columns].join(","));
            let text = format!("{head} VALUES {}{tail}", vec![row; rows].join(","));
            Box::leak(text.into_boxed_str())
        })
}

impl WriteTx for SqliteTx {
    sql::write_common!();

    async fn existing(&mut self, ids: &[&str]) -> Result<HashMap<String, Stored>, StoreError> {
        let rows = self
            .each_chunk(
                (
                    "WITH ids(id) AS (",
                    ") SELECT p.id, p.key, p.updated_at, p.content_hash, \
                     p.deleted_at IS NOT NULL AS deleted FROM procedures p JOIN ids ON ids.id = p.id",
                ),
                1,
                ids,
                |q, id| q.bind(*id),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("id")?, Stored::from_row(row)?)))
            .collect()
    }

    async fn archive(&mut self, versions: &[Version<'_>]) -> Result<(), StoreError> {
        let ids: Vec<&str> = versions.iter().map(|v| v.id).collect();
        self.each_chunk(
            (
                "DELETE FROM procedure_history WHERE (procedure_id, updated_at) IN (",
                ")",
            ),
            2,
            versions,
            |q, v| q.bind(v.id).bind(format_instant(v.updated_at)),
        )
        .await?;
        // The history row's lanes go with it (ON DELETE CASCADE; sqlx turns foreign keys on).
        for head in [ARCHIVE_PROCEDURES, ARCHIVE_LANES] {
            self.each_chunk((head, ")"), 1, &ids, |q, id| q.bind(*id))
                .await?;
        }
        Ok(())
    }

    async fn delete_children(&mut self, keys: &[i64]) -> Result<(), StoreError> {
        for head in [
            "DELETE FROM procedure_lanes WHERE procedure_key IN (",
            "DELETE FROM procedure_calls WHERE procedure_key IN (",
        ] {
            self.each_chunk((head, ")"), 1, keys, |q, key| q.bind(*key))
                .await?;
        }
        Ok(())
    }

    async fn upsert_procedures(
        &mut self,
        rows: &[ProcRow<'_>],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let now = format_instant(now);
        self.each_chunk(
            (UPSERT_PROCEDURES, sql::ON_CONFLICT_PROCEDURES),
            12,
            rows,
            |q, r| {
                let p = r.procedure;
                q.bind(p.id.as_str())
                    .bind(p.name.as_deref())
                    .bind(p.status.as_deref())
                    .bind(p.owner.as_deref())
                    .bind(p.performer.as_deref())
                    .bind(format_instant(p.updated_at))
                    .bind(p.url.as_deref())
                    .bind(p.raw.as_str())
                    .bind(r.content_hash.as_str())
                    .bind(now.clone())
                    .bind(now.clone())
                    .bind(r.key)
            },
        )
        .await?;
        Ok(())
    }

    async fn insert_lanes(&mut self, rows: &[ProcRow<'_>]) -> Result<(), StoreError> {
        let lanes: Vec<_> = lanes(rows).collect();
        self.each_chunk((INSERT_LANES, ""), 4, &lanes, |q, ((key, id), i, lane)| {
            q.bind(*key).bind(*id).bind(*i).bind(*lane)
        })
        .await?;
        Ok(())
    }

    async fn insert_calls(&mut self, rows: &[ProcRow<'_>]) -> Result<(), StoreError> {
        let calls: Vec<_> = calls(rows).collect();
        self.each_chunk(
            (INSERT_CALLS, ""),
            5,
            &calls,
            |q, ((key, id), rel, i, name)| q.bind(*key).bind(*id).bind(*rel).bind(*i).bind(*name),
        )
        .await?;
        Ok(())
    }

    async fn insert_seen(&mut self, run: RunId, ids: &[&str]) -> Result<(), StoreError> {
        self.each_chunk(
            (
                "INSERT INTO sync_seen (run_id, procedure_id)",
                " ON CONFLICT DO NOTHING",
            ),
            2,
            ids,
            |q, id| q.bind(run).bind(*id),
        )
        .await?;
        Ok(())
    }

    async fn upsert_rejected(
        &mut self,
        rows: &[RejectRow<'_>],
        now: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        let now = format_instant(now);
        let returned = self
            .each_chunk(
                (UPSERT_REJECTED, sql::ON_CONFLICT_REJECTED),
                5,
                rows,
                |q, r| {
                    q.bind(r.raw_hash.as_str())
                        .bind(r.rejected.raw.as_str())
                        .bind(r.rejected.reason.as_str())
                        .bind(now.clone())
                        .bind(now.clone())
                },
            )
            .await?;
        returned
            .iter()
            .filter_map(|row| match row.try_get::<bool, _>(1) {
                Ok(true) => Some(row.try_get(0).map_err(StoreError::from)),
                Ok(false) => None,
                Err(e) => Some(Err(e.into())),
            })
            .collect()
    }
}

impl SchemaTx for SqliteTx {
    /// Indexes over few distinct values, or over values arriving nearly in write order: their
    /// inserts land on a few pages that stay in the cache. Those keyed by names and ids land all
    /// over their trees, which outgrow the 8 MiB cache: kept row by row they make the writer
    /// the bound even at 50 ms a request (docs/performance.md), so they wait for the end.
    const EARLY_INDEXES: EarlyIndexes = EarlyIndexes::Only(&[
        "procedures_live",
        "procedures_owner",
        "procedures_status",
        "procedures_updated_at",
        "procedure_lanes_lane",
    ]);

    sql::schema_common!();

    /// In WAL mode readers never hold up a writer, DDL included: no lock timeout to set.
    async fn deferrable(&mut self) -> Result<Vec<Deferrable>, StoreError> {
        // Primary keys and unique constraints have autoindexes, whose `sql` is null.
        const DEFERRABLE: &str =
            "SELECT m.name AS name, 'index' AS kind, printf('DROP INDEX \"%w\"', m.name) AS \"drop\", \
            m.sql AS restore FROM sqlite_master m \
            JOIN pragma_index_list(m.tbl_name) i ON i.name = m.name \
            WHERE m.type = 'index' AND m.sql IS NOT NULL AND NOT i.\"unique\" \
              AND m.tbl_name IN ('procedures', 'procedure_lanes', 'procedure_calls')";
        Ok(sqlx::query_as(DEFERRABLE).fetch_all(&mut *self.0).await?)
    }

    async fn drop_deferrable(&mut self, d: &Deferrable) -> Result<Dropped, StoreError> {
        self.0.execute(d.drop.as_str()).await?;
        Ok(Dropped::Yes)
    }
}

sql::tx_common!(SqliteTx);

#[cfg(test)]
mod tests {
    use super::{chunks, MAX_ROWS};

    /// Any number of rows is written by statements of at most eight shapes.
    #[test]
    fn chunks_take_few_shapes_and_every_row_once() {
        let mut shapes = std::collections::BTreeSet::new();
        for n in 0..1000 {
            let rows: Vec<usize> = (0..n).collect();
            let lens: Vec<usize> = chunks(&rows).map(<[usize]>::len).collect();
            assert_eq!(lens.iter().sum::<usize>(), n);
            assert!(lens.iter().all(|&l| l <= MAX_ROWS && l.is_power_of_two()));
            shapes.extend(lens);
        }
        assert_eq!(shapes.len(), 8, "{shapes:?}");
    }
}
