//! Statements both backends run as they are. Timestamps are bound by each backend in its own
//! type (SQLite: fixed-width text; PostgreSQL: `timestamptz`), so these take none, or take them
//! in columns both store as text.

pub(super) const APPLIED_MIGRATION: &str =
    "SELECT MAX(version) FROM _sqlx_migrations WHERE success";
pub(super) const GET_WATERMARK: &str = "SELECT watermark FROM sync_state WHERE id = 1";
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
    "INSERT INTO deferred_schema (name, restore) VALUES ($1, $2)";
pub(super) const DEFERRED: &str = "SELECT restore FROM deferred_schema ORDER BY name";
pub(super) const CLEAR_DEFERRED: &str = "DELETE FROM deferred_schema";
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
