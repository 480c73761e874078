//! PostgreSQL: production. JSON arrays are unpacked with `json_to_recordset`, which reads the
//! text as it goes (`jsonb` first builds a tree of the whole array: 3% slower backfills);
//! timestamps are `timestamptz`, read back as the same RFC 3339 text SQLite stores.

use super::Dialect;

/// `updated_at` as RFC 3339 UTC text with six fractional digits, like SQLite's columns.
macro_rules! rfc3339 {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    };
}

pub(super) static DIALECT: Dialect = Dialect {
    name: "postgres",
    migrator: sqlx::migrate!("migrations/postgres"),
    session_setup: None,
    checkpoint: None,
    // The server's work does not depend on it; klarify-sync's memory does: a statement's JSON
    // parameter is about a megabyte per 1,000 procedures.
    statement_items: 1000,
    existing: concat!(
        "SELECT p.id, ",
        rfc3339!("p.updated_at"),
        ", p.content_hash, p.deleted_at::text FROM procedures p \
         WHERE p.id IN (SELECT json_array_elements_text($1::json))"
    ),
    upsert_procedures: "INSERT INTO procedures \
        (id, name, status, owner, performer, updated_at, url, raw, content_hash, first_seen_at, synced_at, deleted_at) \
        SELECT r.id, r.name, r.status, r.owner, r.performer, r.updated_at::timestamptz, r.url, r.raw::jsonb, \
               r.content_hash, $2::timestamptz, $2::timestamptz, NULL \
        FROM json_to_recordset($1::json) AS r(id text, name text, status text, owner text, performer text, \
             updated_at text, url text, raw text, content_hash text) \
        ON CONFLICT (id) DO UPDATE SET name = excluded.name, status = excluded.status, \
            owner = excluded.owner, performer = excluded.performer, updated_at = excluded.updated_at, \
            url = excluded.url, raw = excluded.raw, content_hash = excluded.content_hash, \
            synced_at = excluded.synced_at, deleted_at = NULL \
        WHERE procedures.deleted_at IS NOT NULL OR procedures.updated_at <= excluded.updated_at",
    // The parts of one statement run on one snapshot and foreign keys are checked at its end, so
    // the lanes may name the history rows the same statement adds. A history row's lanes go with
    // it (ON DELETE CASCADE).
    archive_versions: &["WITH v AS (SELECT r.id, r.updated_at::timestamptz AS updated_at \
            FROM json_to_recordset($1::json) AS r(id text, updated_at text)), \
        current_again AS (DELETE FROM procedure_history h USING v \
            WHERE h.procedure_id = v.id AND h.updated_at = v.updated_at), \
        lanes AS (INSERT INTO procedure_history_lanes (procedure_id, updated_at, position, lane) \
            SELECT l.procedure_id, p.updated_at, l.position, l.lane \
            FROM procedure_lanes l JOIN procedures p ON p.id = l.procedure_id \
            WHERE p.id IN (SELECT id FROM v)) \
        INSERT INTO procedure_history \
            (procedure_id, updated_at, name, status, owner, performer, url, raw, recorded_at, deleted_at) \
        SELECT id, updated_at, name, status, owner, performer, url, raw, synced_at, deleted_at \
        FROM procedures WHERE id IN (SELECT id FROM v)"],
    delete_replaced: &["WITH ids AS (SELECT json_array_elements_text($1::json) AS id), \
        lanes AS (DELETE FROM procedure_lanes WHERE procedure_id IN (SELECT id FROM ids)) \
        DELETE FROM procedure_calls WHERE procedure_id IN (SELECT id FROM ids)"],
    insert_lanes: "INSERT INTO procedure_lanes (procedure_id, position, lane) \
        SELECT r.procedure_id, r.position, r.lane \
        FROM json_to_recordset($1::json) AS r(procedure_id text, position int, lane text)",
    insert_calls: "INSERT INTO procedure_calls (procedure_id, relation, position, related_name) \
        SELECT r.procedure_id, r.relation, r.position, r.related_name \
        FROM json_to_recordset($1::json) AS r(procedure_id text, relation text, position int, related_name text)",
    upsert_rejected: "INSERT INTO rejected_items (raw_hash, raw, reason, first_seen_at, seen_at) \
        SELECT r.raw_hash, r.raw, r.reason, $2::timestamptz, $2::timestamptz \
        FROM json_to_recordset($1::json) AS r(raw_hash text, raw text, reason text) \
        ON CONFLICT (raw_hash) DO UPDATE SET seen_at = excluded.seen_at, reason = excluded.reason \
        RETURNING raw_hash, (first_seen_at = seen_at)::int::int8",
    insert_seen: "INSERT INTO sync_seen (run_id, procedure_id) \
        SELECT $1, x FROM json_array_elements_text($2::json) AS x ON CONFLICT DO NOTHING",
    begin_run: "INSERT INTO sync_runs (started_at, mode, outcome, watermark_before) \
        VALUES ($1::timestamptz, $2, 'running', $3) RETURNING id",
    finish_run: "UPDATE sync_runs SET finished_at = $2::timestamptz, outcome = $3, pages = $4, fetched = $5, \
        inserted = $6, updated = $7, unchanged = $8, deleted = $9, rejected = $10, \
        watermark_after = $11, error = $12 WHERE id = $1",
    mark_deleted: "UPDATE procedures SET deleted_at = $2::timestamptz WHERE deleted_at IS NULL \
        AND NOT EXISTS (SELECT 1 FROM sync_seen s WHERE s.run_id = $1 AND s.procedure_id = procedures.id)",
    live_procedures: concat!(
        "SELECT id, name, status, owner, performer, ",
        rfc3339!("updated_at"),
        ", url, raw::text FROM procedures WHERE deleted_at IS NULL"
    ),
    recent_runs: concat!(
        "SELECT id, ",
        rfc3339!("started_at"),
        " AS started_at, ",
        rfc3339!("finished_at"),
        " AS finished_at, mode, outcome, pages, fetched, inserted, updated, unchanged, deleted, \
         rejected, watermark_after, error FROM sync_runs ORDER BY id DESC LIMIT $1"
    ),
    // Also the foreign keys of lanes and calls: each row's check is a locking lookup of its
    // procedure, while adding the constraint back checks all rows in one join. (SQLite cannot
    // drop a foreign key, and its checks cost next to nothing.) The history's stay: deleting a
    // history row relies on their cascade.
    deferrable: "SELECT i.relname::text, format('DROP INDEX %I.%I', n.nspname, i.relname), \
            pg_get_indexdef(x.indexrelid) \
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
        JOIN pg_namespace n ON n.oid = t.relnamespace \
        WHERE n.nspname = current_schema() AND NOT x.indisunique \
          AND t.relname IN ('procedures', 'procedure_lanes', 'procedure_calls') \
        UNION ALL \
        SELECT c.conname::text, format('ALTER TABLE %I.%I DROP CONSTRAINT %I', n.nspname, t.relname, c.conname), \
            format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', n.nspname, t.relname, c.conname, \
                   pg_get_constraintdef(c.oid)) \
        FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
        JOIN pg_namespace n ON n.oid = t.relnamespace \
        WHERE c.contype = 'f' AND n.nspname = current_schema() \
          AND t.relname IN ('procedure_lanes', 'procedure_calls')",
    // Dropping an index waits for every open transaction that read its table.
    lock_timeout: Some("SET LOCAL lock_timeout = '2s'"),
    record_unproven: "INSERT INTO unproven_tie_groups \
        (at, size_bound, size_counted, recorded_at, checked_at, checks) \
        VALUES ($1, $2, $3, $4::timestamptz, $4::timestamptz, 1) \
        ON CONFLICT (at) DO UPDATE SET size_bound = excluded.size_bound, \
        size_counted = excluded.size_counted, checked_at = excluded.checked_at, \
        checks = unproven_tie_groups.checks + 1",
    unproven_groups: concat!(
        "SELECT at, size_bound, size_counted, ",
        rfc3339!("recorded_at"),
        " AS recorded_at, ",
        rfc3339!("checked_at"),
        " AS checked_at, checks FROM unproven_tie_groups ORDER BY at"
    ),
    count_future: "SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL \
        AND updated_at > $1::timestamptz",
};
