//! SQLite: the embedded default. JSON arrays are unpacked with `json_each`; timestamps are
//! RFC 3339 text in one fixed width, so they compare correctly as text.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection};

use super::Dialect;

pub(super) static DIALECT: Dialect = Dialect {
    name: "sqlite",
    migrator: sqlx::migrate!("migrations/sqlite"),
    // In WAL mode NORMAL never corrupts the file; a power cut (not a crash of the process) may
    // lose the last commits, each of which carries its own watermark, so the mirror stays
    // consistent and the next pass re-reads what was lost.
    //
    // A batch dirties thousands of pages (random ids and names land all over the indexes keyed
    // by them), more than the default checkpoint threshold of 1,000 pages: every commit then paid a
    // checkpoint with two fsyncs. The checkpoints run on a read connection instead, after each
    // commit (`checkpoint`), while the writer goes on; the writer's own, past 20,000 pages (80 MiB
    // of WAL), only bounds the WAL when those cannot keep up, and mostly finds its work done.
    //
    // Every connection (the writer's and each of the read pool's, handed out in turn) has its own
    // page cache of `cache_size`, so without a bound the caches add up to connections × 8 MiB.
    // `soft_heap_limit` is process-wide: past it SQLite frees the least recently used unpinned
    // pages of any connection (the bundled build shares one page LRU across connections and
    // enables memory management) instead of growing, so all caches together stay near 16 MiB.
    session_setup: Some(
        "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -8192; \
         PRAGMA wal_autocheckpoint = 20000; PRAGMA soft_heap_limit = 16777216",
    ),
    // PASSIVE takes no lock the writer waits for: it copies what readers no longer need.
    checkpoint: Some("PRAGMA wal_checkpoint(PASSIVE)"),
    // The whole batch in each statement: with a small page cache, one table at a time for all
    // of it keeps that table's pages hot; statements over parts of it cycled through the tables
    // and were 25% slower (docs/performance.md).
    statement_items: usize::MAX,
    existing: "SELECT p.id, p.updated_at, p.content_hash, p.deleted_at FROM procedures p \
        WHERE p.id IN (SELECT value FROM json_each($1))",
    // `WHERE true` resolves SQLite's parsing ambiguity between a SELECT's join and ON CONFLICT.
    upsert_procedures: "WITH r(v) AS MATERIALIZED (SELECT value FROM json_each($1)) \
        INSERT INTO procedures \
        (id, name, status, owner, performer, updated_at, url, raw, content_hash, first_seen_at, synced_at, deleted_at) \
        SELECT v->>'id', v->>'name', v->>'status', v->>'owner', v->>'performer', \
               v->>'updated_at', v->>'url', v->>'raw', v->>'content_hash', $2, $2, NULL \
        FROM r WHERE true \
        ON CONFLICT (id) DO UPDATE SET name = excluded.name, status = excluded.status, \
            owner = excluded.owner, performer = excluded.performer, updated_at = excluded.updated_at, \
            url = excluded.url, raw = excluded.raw, content_hash = excluded.content_hash, \
            synced_at = excluded.synced_at, deleted_at = NULL \
        WHERE procedures.deleted_at IS NOT NULL OR procedures.updated_at <= excluded.updated_at",
    // The history row's lanes go with it (ON DELETE CASCADE; sqlx turns foreign keys on).
    archive_versions: &[
        "DELETE FROM procedure_history WHERE (procedure_id, updated_at) IN \
            (SELECT value->>'id', value->>'updated_at' FROM json_each($1))",
        "INSERT INTO procedure_history \
        (procedure_id, updated_at, name, status, owner, performer, url, raw, recorded_at, deleted_at) \
        SELECT id, updated_at, name, status, owner, performer, url, raw, synced_at, deleted_at \
        FROM procedures WHERE id IN (SELECT value->>'id' FROM json_each($1))",
        "INSERT INTO procedure_history_lanes (procedure_id, updated_at, position, lane) \
        SELECT l.procedure_id, p.updated_at, l.position, l.lane \
        FROM procedure_lanes l JOIN procedures p ON p.id = l.procedure_id \
        WHERE p.id IN (SELECT value->>'id' FROM json_each($1))",
    ],
    delete_replaced: &[
        "DELETE FROM procedure_lanes WHERE procedure_id IN (SELECT value FROM json_each($1))",
        "DELETE FROM procedure_calls WHERE procedure_id IN (SELECT value FROM json_each($1))",
    ],
    insert_lanes: "WITH r(v) AS MATERIALIZED (SELECT value FROM json_each($1)) \
        INSERT INTO procedure_lanes (procedure_id, position, lane) \
        SELECT v->>'procedure_id', v->>'position', v->>'lane' FROM r",
    insert_calls: "WITH r(v) AS MATERIALIZED (SELECT value FROM json_each($1)) \
        INSERT INTO procedure_calls (procedure_id, relation, position, related_name) \
        SELECT v->>'procedure_id', v->>'relation', v->>'position', v->>'related_name' FROM r",
    upsert_rejected: "INSERT INTO rejected_items (raw_hash, raw, reason, first_seen_at, seen_at) \
        SELECT value->>'raw_hash', value->>'raw', value->>'reason', $2, $2 FROM json_each($1) WHERE true \
        ON CONFLICT (raw_hash) DO UPDATE SET seen_at = excluded.seen_at, reason = excluded.reason \
        RETURNING raw_hash, first_seen_at = seen_at",
    insert_seen: "INSERT INTO sync_seen (run_id, procedure_id) SELECT $1, value FROM json_each($2) WHERE true \
        ON CONFLICT DO NOTHING",
    begin_run: "INSERT INTO sync_runs (started_at, mode, outcome, watermark_before) \
        VALUES ($1, $2, 'running', $3) RETURNING id",
    finish_run: "UPDATE sync_runs SET finished_at = $2, outcome = $3, pages = $4, fetched = $5, \
        inserted = $6, updated = $7, unchanged = $8, deleted = $9, rejected = $10, \
        watermark_after = $11, error = $12 WHERE id = $1",
    mark_deleted: "UPDATE procedures SET deleted_at = $2 WHERE deleted_at IS NULL \
        AND NOT EXISTS (SELECT 1 FROM sync_seen s WHERE s.run_id = $1 AND s.procedure_id = procedures.id)",
    live_procedures: "SELECT id, name, status, owner, performer, updated_at, url, raw \
        FROM procedures WHERE deleted_at IS NULL",
    recent_runs: "SELECT id, started_at, finished_at, mode, outcome, pages, fetched, inserted, updated, \
        unchanged, deleted, rejected, watermark_after, error FROM sync_runs ORDER BY id DESC LIMIT $1",
    // Primary keys and unique constraints have autoindexes, whose `sql` is null.
    deferrable: "SELECT m.name, printf('DROP INDEX \"%w\"', m.name), m.sql FROM sqlite_master m \
        JOIN pragma_index_list(m.tbl_name) i ON i.name = m.name \
        WHERE m.type = 'index' AND m.sql IS NOT NULL AND NOT i.\"unique\" \
          AND m.tbl_name IN ('procedures', 'procedure_lanes', 'procedure_calls')",
    // In WAL mode readers never hold up a writer, DDL included.
    lock_timeout: None,
    record_unproven: "INSERT INTO unproven_tie_groups \
        (at, size_bound, size_counted, recorded_at, checked_at, checks) VALUES ($1, $2, $3, $4, $4, 1) \
        ON CONFLICT (at) DO UPDATE SET size_bound = excluded.size_bound, \
        size_counted = excluded.size_counted, checked_at = excluded.checked_at, \
        checks = unproven_tie_groups.checks + 1",
    unproven_groups: "SELECT at, size_bound, size_counted, recorded_at, checked_at, checks \
        FROM unproven_tie_groups ORDER BY at",
    count_future: "SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL AND updated_at > $1",
};

/// Whether the database file of `url` exists (an in-memory database always does).
pub(super) fn exists(url: &str) -> Result<bool, sqlx::Error> {
    let file = SqliteConnectOptions::from_str(url)?
        .get_filename()
        .to_owned();
    Ok(file == Path::new(":memory:") || file.exists())
}

/// Creates the file when missing and switches it to WAL once (the mode is stored in the file),
/// so that BI readers never block a sync and a sync never blocks them. Returns the database
/// file, `None` for an in-memory database.
pub(super) async fn prepare(url: &str) -> Result<Option<PathBuf>, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let conn = options.connect().await?;
    conn.close().await?;
    let file = options.get_filename();
    Ok((file != Path::new(":memory:")).then(|| file.to_owned()))
}
