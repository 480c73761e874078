-- The current version of a procedure is its `procedures` row and its `procedure_lanes`; the
-- history tables now keep only the versions that are no longer current. Writing every version
-- twice (the row and its lanes in both places) was over a third of a backfill's work and of the
-- file. `procedure_versions` and `procedure_version_lanes` are views over both, with the rows
-- and meaning they had before (docs/schema.md); only `recorded_at` of a current version is now
-- `procedures.synced_at`, when the mirror last wrote that content.
DROP VIEW procedure_versions;

DELETE FROM procedure_version_lanes
WHERE (procedure_id, updated_at) IN (SELECT id, updated_at FROM procedures);
DELETE FROM procedure_history
WHERE (procedure_id, updated_at) IN (SELECT id, updated_at FROM procedures);

ALTER TABLE procedure_version_lanes RENAME TO procedure_history_lanes;
DROP INDEX procedure_version_lanes_lane;
CREATE INDEX procedure_history_lanes_lane ON procedure_history_lanes (lane);

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

-- The lanes of every version: past versions' from the history, the current one's from
-- `procedure_lanes`.
CREATE VIEW procedure_version_lanes AS
SELECT procedure_id, updated_at, position, lane
FROM procedure_history_lanes
UNION ALL
SELECT l.procedure_id, p.updated_at, l.position, l.lane
FROM procedure_lanes l
JOIN procedures p ON p.id = l.procedure_id;
