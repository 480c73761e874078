-- Ready for BI: call references resolved to procedures, every version of a procedure kept,
-- indexes for the usual filters, and a comment on every table, view and column.
-- docs/schema.md describes the same, with example questions.

-- Indexes for the obvious filters (updated_at has one since 0001).
CREATE INDEX procedures_status ON procedures (status);
CREATE INDEX procedures_owner ON procedures (owner);
-- Resolving a called name to a live procedure.
CREATE INDEX procedures_live_name ON procedures (name) WHERE deleted_at IS NULL;
CREATE INDEX procedure_lanes_lane ON procedure_lanes (lane);
CREATE INDEX procedure_calls_related_name ON procedure_calls (related_name);

-- Lanes (roles, departments) of the procedures that exist now.
CREATE VIEW live_procedure_lanes AS
SELECT l.procedure_id, l.position, l.lane
FROM procedure_lanes l
JOIN procedures p ON p.id = l.procedure_id
WHERE p.deleted_at IS NULL;

-- The calls of live procedures, with the called name resolved to a live procedure when exactly
-- one has that name.
CREATE VIEW procedure_call_edges AS
SELECT e.procedure_id,
       e.relation,
       e.position,
       e.related_name,
       CASE WHEN e.candidates = 1 THEN
           (SELECT MIN(q.id) FROM procedures q WHERE q.name = e.related_name AND q.deleted_at IS NULL)
       END AS related_procedure_id,
       CASE WHEN e.candidates = 0 THEN 'unresolved'
            WHEN e.candidates = 1 THEN 'resolved'
            ELSE 'ambiguous' END AS resolution,
       e.candidates
FROM (
    SELECT c.procedure_id, c.relation, c.position, c.related_name,
           (SELECT COUNT(*) FROM procedures q
            WHERE q.name = c.related_name AND q.deleted_at IS NULL) AS candidates
    FROM procedure_calls c
    JOIN procedures p ON p.id = c.procedure_id
    WHERE p.deleted_at IS NULL
) e;

-- History: one row per distinct version (procedure, updated_at) the mirror has written. Kept by
-- the trigger below, so it cannot drift from `procedures`: klarify-sync writes a procedures row
-- only when its content changed (or it is revived), and marks deletions with an UPDATE.
CREATE TABLE procedure_history (
    procedure_id TEXT        NOT NULL REFERENCES procedures (id) ON DELETE CASCADE,
    updated_at   TIMESTAMPTZ NOT NULL,
    name         TEXT,
    status       TEXT,
    owner        TEXT,
    performer    TEXT,
    url          TEXT,
    raw          JSONB       NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL,
    deleted_at   TIMESTAMPTZ,
    PRIMARY KEY (procedure_id, updated_at)
);
CREATE INDEX procedure_history_updated_at ON procedure_history (updated_at);

CREATE TABLE procedure_version_lanes (
    procedure_id TEXT        NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    position     INTEGER     NOT NULL,
    lane         TEXT        NOT NULL,
    PRIMARY KEY (procedure_id, updated_at, position),
    FOREIGN KEY (procedure_id, updated_at)
        REFERENCES procedure_history (procedure_id, updated_at) ON DELETE CASCADE
);
CREATE INDEX procedure_version_lanes_lane ON procedure_version_lanes (lane);

-- The mirror as it is now is its first history.
INSERT INTO procedure_history
    (procedure_id, updated_at, name, status, owner, performer, url, raw, recorded_at, deleted_at)
SELECT id, updated_at, name, status, owner, performer, url, raw, synced_at, deleted_at
FROM procedures;
INSERT INTO procedure_version_lanes (procedure_id, updated_at, position, lane)
SELECT l.procedure_id, p.updated_at, l.position, l.lane
FROM procedure_lanes l
JOIN procedures p ON p.id = l.procedure_id;

-- Whenever a procedures row is written, the history row of its version (id, updated_at) takes the
-- row's content and deletion mark: a new version adds a row, a deletion ends the current one, a
-- revival in the same version clears the mark (the version continues), a revival in a new
-- version adds a row and leaves the old one ended. An unchanged re-read writes nothing, so adds
-- nothing. Lanes come from the item itself (`raw`), so they do not depend on statement order.
CREATE FUNCTION record_procedure_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO procedure_history
        (procedure_id, updated_at, name, status, owner, performer, url, raw, recorded_at, deleted_at)
    VALUES (NEW.id, NEW.updated_at, NEW.name, NEW.status, NEW.owner, NEW.performer, NEW.url,
            NEW.raw, NEW.synced_at, NEW.deleted_at)
    ON CONFLICT (procedure_id, updated_at) DO UPDATE SET
        name = excluded.name, status = excluded.status, owner = excluded.owner,
        performer = excluded.performer, url = excluded.url, raw = excluded.raw,
        deleted_at = excluded.deleted_at;
    DELETE FROM procedure_version_lanes
    WHERE procedure_id = NEW.id AND updated_at = NEW.updated_at;
    INSERT INTO procedure_version_lanes (procedure_id, updated_at, position, lane)
    SELECT NEW.id, NEW.updated_at, l.ordinality - 1, l.lane
    FROM jsonb_array_elements_text(
             CASE WHEN jsonb_typeof(NEW.raw -> 'lanes') = 'array' THEN NEW.raw -> 'lanes'
                  ELSE '[]'::jsonb END
         ) WITH ORDINALITY AS l (lane, ordinality);
    RETURN NULL;
END
$$;

CREATE TRIGGER procedures_history_insert AFTER INSERT ON procedures
FOR EACH ROW EXECUTE FUNCTION record_procedure_version();

CREATE TRIGGER procedures_history_update AFTER UPDATE ON procedures
FOR EACH ROW
WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at
      OR OLD.content_hash IS DISTINCT FROM NEW.content_hash
      OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at)
EXECUTE FUNCTION record_procedure_version();

-- Every version of every procedure ever seen, with the interval it was current:
-- [valid_from, valid_to), valid_to null for the current version of a live procedure.
CREATE VIEW procedure_versions AS
SELECT procedure_id,
       updated_at,
       version,
       updated_at AS valid_from,
       CASE WHEN next_updated_at IS NOT NULL
                 AND (deleted_at IS NULL OR next_updated_at < deleted_at)
            THEN next_updated_at
            ELSE deleted_at END AS valid_to,
       name,
       status,
       owner,
       performer,
       url,
       raw,
       recorded_at,
       deleted_at
FROM (
    SELECT h.procedure_id, h.updated_at, h.name, h.status, h.owner, h.performer, h.url, h.raw,
           h.recorded_at, h.deleted_at,
           ROW_NUMBER() OVER (PARTITION BY h.procedure_id ORDER BY h.updated_at) AS version,
           LEAD(h.updated_at) OVER (PARTITION BY h.procedure_id ORDER BY h.updated_at) AS next_updated_at
    FROM procedure_history h
) v;

-- What BI tools show next to each table, view and column.

COMMENT ON TABLE procedures IS
    'One row per Klarify procedure (process, subprocess or task) ever seen. Rows whose deleted_at is null hold exactly what the API serves now; see live_procedures.';
COMMENT ON COLUMN procedures.id IS 'Klarify''s identifier of the procedure (primary key).';
COMMENT ON COLUMN procedures.name IS 'Display name. Not unique: several procedures may share one.';
COMMENT ON COLUMN procedures.status IS 'Publication state, e.g. published, draft, archived.';
COMMENT ON COLUMN procedures.owner IS 'Person accountable for the outcome of the procedure.';
COMMENT ON COLUMN procedures.performer IS 'People (often a team) responsible for performing it.';
COMMENT ON COLUMN procedures.updated_at IS 'When the procedure was last modified in Klarify (the version''s timestamp).';
COMMENT ON COLUMN procedures.url IS 'Link to the procedure in the Klarify web app.';
COMMENT ON COLUMN procedures.raw IS 'The item exactly as the API served it, unknown fields included (lanes, called_within, called_from are also in their own tables).';
COMMENT ON COLUMN procedures.content_hash IS 'SHA-256 of the item as received; an unchanged re-read writes nothing.';
COMMENT ON COLUMN procedures.first_seen_at IS 'When the mirror first stored this procedure.';
COMMENT ON COLUMN procedures.synced_at IS 'When the mirror last wrote this row''s content.';
COMMENT ON COLUMN procedures.deleted_at IS 'When a full sync (--backfill) found the procedure no longer served; null while it exists.';

COMMENT ON TABLE procedure_lanes IS
    'One row per lane (role or department involved) of a procedure, in the API''s order. Lanes of live procedures only: live_procedure_lanes.';
COMMENT ON COLUMN procedure_lanes.procedure_id IS 'The procedure (procedures.id).';
COMMENT ON COLUMN procedure_lanes.position IS '0-based position of the lane in the API''s list.';
COMMENT ON COLUMN procedure_lanes.lane IS 'Name of the role or department.';

COMMENT ON TABLE procedure_calls IS
    'One row per name in a procedure''s called_within or called_from list, as served (names, not ids). Resolved to procedures: procedure_call_edges.';
COMMENT ON COLUMN procedure_calls.procedure_id IS 'The procedure whose list holds the name (procedures.id).';
COMMENT ON COLUMN procedure_calls.relation IS 'called_within: a parent procedure that includes this one as a sub-process; called_from: a process model or global task that calls this one.';
COMMENT ON COLUMN procedure_calls.position IS '0-based position of the name in its list.';
COMMENT ON COLUMN procedure_calls.related_name IS 'Name of the related procedure, as served.';

COMMENT ON TABLE rejected_items IS
    'One row per distinct item the API served that could not be understood (e.g. no id or no readable updated_at); kept so that nothing served is lost.';
COMMENT ON COLUMN rejected_items.raw_hash IS 'SHA-256 of raw (primary key): the same item served again is not duplicated.';
COMMENT ON COLUMN rejected_items.raw IS 'The item exactly as served, byte for byte.';
COMMENT ON COLUMN rejected_items.reason IS 'Why it could not be understood.';
COMMENT ON COLUMN rejected_items.first_seen_at IS 'When the item was first served.';
COMMENT ON COLUMN rejected_items.seen_at IS 'When the item was last served.';

COMMENT ON TABLE sync_runs IS 'One row per sync pass: when, which mode, how it ended and what it did.';
COMMENT ON COLUMN sync_runs.id IS 'Pass number, increasing.';
COMMENT ON COLUMN sync_runs.started_at IS 'When the pass started.';
COMMENT ON COLUMN sync_runs.finished_at IS 'When the pass ended; null while it runs.';
COMMENT ON COLUMN sync_runs.mode IS 'incremental (from the stored watermark) or backfill (full read, detects deletions).';
COMMENT ON COLUMN sync_runs.outcome IS 'running, succeeded, failed or interrupted.';
COMMENT ON COLUMN sync_runs.pages IS 'Pages requested from the API.';
COMMENT ON COLUMN sync_runs.fetched IS 'Items received (re-reads included).';
COMMENT ON COLUMN sync_runs.inserted IS 'Procedures seen for the first time.';
COMMENT ON COLUMN sync_runs.updated IS 'Procedures whose content changed (or that came back after deletion).';
COMMENT ON COLUMN sync_runs.unchanged IS 'Items received that changed nothing.';
COMMENT ON COLUMN sync_runs.deleted IS 'Procedures marked deleted by this pass (backfill only).';
COMMENT ON COLUMN sync_runs.rejected IS 'Items that could not be understood (see rejected_items).';
COMMENT ON COLUMN sync_runs.watermark_before IS 'The stored watermark when the pass started (RFC 3339 text).';
COMMENT ON COLUMN sync_runs.watermark_after IS 'The stored watermark when the pass ended (RFC 3339 text).';
COMMENT ON COLUMN sync_runs.error IS 'Why the pass failed; null unless it did.';

COMMENT ON TABLE sync_state IS 'Internal: the sync cursor, a single row.';
COMMENT ON COLUMN sync_state.id IS 'Always 1.';
COMMENT ON COLUMN sync_state.watermark IS 'Every procedure modified up to this instant (RFC 3339 text) has been written.';

COMMENT ON TABLE sync_seen IS 'Internal: ids served during a backfill, to detect deletions; emptied when it ends.';
COMMENT ON COLUMN sync_seen.run_id IS 'The backfill (sync_runs.id).';
COMMENT ON COLUMN sync_seen.procedure_id IS 'An id it was served.';

COMMENT ON TABLE procedure_history IS
    'One row per distinct version (procedure_id, updated_at) of a procedure the mirror has stored, written by triggers on procedures. Query procedure_versions, which adds valid_from/valid_to.';
COMMENT ON COLUMN procedure_history.procedure_id IS 'The procedure (procedures.id).';
COMMENT ON COLUMN procedure_history.updated_at IS 'The version''s updated_at in Klarify.';
COMMENT ON COLUMN procedure_history.name IS 'Display name in this version.';
COMMENT ON COLUMN procedure_history.status IS 'Publication state in this version.';
COMMENT ON COLUMN procedure_history.owner IS 'Owner in this version.';
COMMENT ON COLUMN procedure_history.performer IS 'Performer in this version.';
COMMENT ON COLUMN procedure_history.url IS 'Link to the procedure in this version.';
COMMENT ON COLUMN procedure_history.raw IS 'The item as served in this version (calls are in raw->''called_within'' and raw->''called_from'').';
COMMENT ON COLUMN procedure_history.recorded_at IS 'When the mirror first stored this version.';
COMMENT ON COLUMN procedure_history.deleted_at IS 'When a full sync found the procedure gone while this was its version; null otherwise.';

COMMENT ON TABLE procedure_version_lanes IS
    'One row per lane of a version of a procedure; join with procedure_versions on (procedure_id, updated_at).';
COMMENT ON COLUMN procedure_version_lanes.procedure_id IS 'The procedure (procedures.id).';
COMMENT ON COLUMN procedure_version_lanes.updated_at IS 'The version (procedure_versions.updated_at).';
COMMENT ON COLUMN procedure_version_lanes.position IS '0-based position of the lane in that version.';
COMMENT ON COLUMN procedure_version_lanes.lane IS 'Name of the role or department.';

COMMENT ON VIEW live_procedures IS 'Procedures that exist now (deleted_at is null).';
COMMENT ON COLUMN live_procedures.id IS 'Klarify''s identifier of the procedure.';
COMMENT ON COLUMN live_procedures.name IS 'Display name. Not unique: several procedures may share one.';
COMMENT ON COLUMN live_procedures.status IS 'Publication state, e.g. published, draft, archived.';
COMMENT ON COLUMN live_procedures.owner IS 'Person accountable for the outcome of the procedure.';
COMMENT ON COLUMN live_procedures.performer IS 'People (often a team) responsible for performing it.';
COMMENT ON COLUMN live_procedures.updated_at IS 'When the procedure was last modified in Klarify.';
COMMENT ON COLUMN live_procedures.url IS 'Link to the procedure in the Klarify web app.';
COMMENT ON COLUMN live_procedures.raw IS 'The item exactly as the API served it.';
COMMENT ON COLUMN live_procedures.deleted_at IS 'Always null here.';

COMMENT ON VIEW live_procedure_lanes IS 'Lanes (roles, departments) of the procedures that exist now: one row per lane of a live procedure.';
COMMENT ON COLUMN live_procedure_lanes.procedure_id IS 'The procedure (live_procedures.id).';
COMMENT ON COLUMN live_procedure_lanes.position IS '0-based position of the lane in the API''s list.';
COMMENT ON COLUMN live_procedure_lanes.lane IS 'Name of the role or department.';

COMMENT ON VIEW procedure_call_edges IS
    'The call graph: one row per procedure_calls row of a live procedure, with the name resolved to a live procedure when exactly one has it.';
COMMENT ON COLUMN procedure_call_edges.procedure_id IS 'The procedure whose list holds the name (live_procedures.id).';
COMMENT ON COLUMN procedure_call_edges.relation IS 'called_within (a parent that includes this one as a sub-process) or called_from (a process or global task that calls this one).';
COMMENT ON COLUMN procedure_call_edges.position IS '0-based position of the name in its list.';
COMMENT ON COLUMN procedure_call_edges.related_name IS 'The name as served.';
COMMENT ON COLUMN procedure_call_edges.related_procedure_id IS 'The live procedure with that name when exactly one has it; null otherwise.';
COMMENT ON COLUMN procedure_call_edges.resolution IS 'resolved (one live procedure has the name), ambiguous (several) or unresolved (none).';
COMMENT ON COLUMN procedure_call_edges.candidates IS 'How many live procedures have that name.';

COMMENT ON VIEW procedure_versions IS
    'Every distinct version of every procedure the mirror has seen, with the interval [valid_from, valid_to) in which it was the current one. Lanes of a version: procedure_version_lanes.';
COMMENT ON COLUMN procedure_versions.procedure_id IS 'The procedure (procedures.id).';
COMMENT ON COLUMN procedure_versions.updated_at IS 'The version''s updated_at in Klarify; with procedure_id, the key of the version.';
COMMENT ON COLUMN procedure_versions.version IS '1 for the first version the mirror saw, then 2, 3, ... in updated_at order.';
COMMENT ON COLUMN procedure_versions.valid_from IS 'When this version became current: its updated_at.';
COMMENT ON COLUMN procedure_versions.valid_to IS 'When it stopped being current: the next version''s updated_at, or deleted_at if the procedure was deleted in this version; null for the current version of a live procedure.';
COMMENT ON COLUMN procedure_versions.name IS 'Display name in this version.';
COMMENT ON COLUMN procedure_versions.status IS 'Publication state in this version.';
COMMENT ON COLUMN procedure_versions.owner IS 'Owner in this version.';
COMMENT ON COLUMN procedure_versions.performer IS 'Performer in this version.';
COMMENT ON COLUMN procedure_versions.url IS 'Link to the procedure in this version.';
COMMENT ON COLUMN procedure_versions.raw IS 'The item as served in this version.';
COMMENT ON COLUMN procedure_versions.recorded_at IS 'When the mirror first stored this version.';
COMMENT ON COLUMN procedure_versions.deleted_at IS 'When a full sync found the procedure gone while this was its version; null otherwise.';

COMMENT ON FUNCTION record_procedure_version() IS
    'Trigger on procedures: keeps procedure_history and procedure_version_lanes in step with every write.';
