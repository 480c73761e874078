-- The current version of a procedure is its `procedures` row and its `procedure_lanes`; the
-- history tables now keep only the versions that are no longer current. Writing every version
-- twice (the row and its lanes in both places) was over a quarter of a backfill's work and of
-- the database. `procedure_versions` and `procedure_version_lanes` are views over both, with
-- the rows and meaning they had before (docs/schema.md); only `recorded_at` of a current version
-- is now `procedures.synced_at`, when the mirror last wrote that content.
DROP VIEW procedure_versions;

DELETE FROM procedure_version_lanes v USING procedures p
WHERE v.procedure_id = p.id AND v.updated_at = p.updated_at;
DELETE FROM procedure_history h USING procedures p
WHERE h.procedure_id = p.id AND h.updated_at = p.updated_at;

ALTER TABLE procedure_version_lanes RENAME TO procedure_history_lanes;
ALTER INDEX procedure_version_lanes_pkey RENAME TO procedure_history_lanes_pkey;
ALTER TABLE procedure_history_lanes
    RENAME CONSTRAINT procedure_version_lanes_procedure_id_updated_at_fkey
    TO procedure_history_lanes_procedure_id_updated_at_fkey;

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
    SELECT a.procedure_id, a.updated_at, a.name, a.status, a.owner, a.performer, a.url, a.raw,
           a.recorded_at, a.deleted_at,
           ROW_NUMBER() OVER (PARTITION BY a.procedure_id ORDER BY a.updated_at) AS version,
           LEAD(a.updated_at) OVER (PARTITION BY a.procedure_id ORDER BY a.updated_at) AS next_updated_at
    FROM (
        SELECT procedure_id, updated_at, name, status, owner, performer, url, raw, recorded_at,
               deleted_at
        FROM procedure_history
        UNION ALL
        SELECT id, updated_at, name, status, owner, performer, url, raw, synced_at, deleted_at
        FROM procedures
    ) a
) v;

CREATE VIEW procedure_version_lanes AS
SELECT procedure_id, updated_at, position, lane
FROM procedure_history_lanes
UNION ALL
SELECT l.procedure_id, p.updated_at, l.position, l.lane
FROM procedure_lanes l
JOIN procedures p ON p.id = l.procedure_id;

COMMENT ON TABLE procedure_history IS
    'One row per version (procedure_id, updated_at) of a procedure that is no longer its current one; the current version is the procedures row. Query procedure_versions, which holds both and adds valid_from/valid_to.';
COMMENT ON COLUMN procedure_history.recorded_at IS 'When the mirror last wrote this version''s content (procedures.synced_at while it was current).';
COMMENT ON TABLE procedure_history_lanes IS
    'One row per lane of a version in procedure_history; the current version''s lanes are in procedure_lanes. Query procedure_version_lanes, which holds both.';
COMMENT ON COLUMN procedure_history_lanes.updated_at IS 'The version (procedure_history.updated_at).';

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
COMMENT ON COLUMN procedure_versions.recorded_at IS 'When the mirror last wrote this version''s content.';
COMMENT ON COLUMN procedure_versions.deleted_at IS 'When a full sync found the procedure gone while this was its version; null otherwise.';

COMMENT ON VIEW procedure_version_lanes IS
    'One row per lane of a version of a procedure; join with procedure_versions on (procedure_id, updated_at).';
COMMENT ON COLUMN procedure_version_lanes.procedure_id IS 'The procedure (procedures.id).';
COMMENT ON COLUMN procedure_version_lanes.updated_at IS 'The version (procedure_versions.updated_at).';
COMMENT ON COLUMN procedure_version_lanes.position IS '0-based position of the lane in that version.';
COMMENT ON COLUMN procedure_version_lanes.lane IS 'Name of the role or department.';
