-- Lanes and calls are stored in the order their procedures were first written: each procedure
-- gets an integer `key`, given by klarify-sync in increasing order, and lanes and calls are
-- clustered by it (WITHOUT ROWID, primary key first). Keyed by the random text id, every batch
-- inserted all over their B-trees, which outgrew the page cache: a 1M backfill ran at half the
-- rate of a 100k one (docs/performance.md). New procedures' lanes and calls now go to the end.
-- `procedure_id` stays, with the same meaning and an index for lookups by it; the views over
-- these tables are as before (docs/schema.md).

ALTER TABLE procedures ADD COLUMN key INTEGER;
UPDATE procedures SET key = rowid;
CREATE UNIQUE INDEX procedures_key ON procedures (key);

DROP VIEW live_procedure_lanes;
DROP VIEW procedure_call_edges;
DROP VIEW procedure_version_lanes;

CREATE TABLE procedure_lanes_by_key (
    procedure_key INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    procedure_id  TEXT    NOT NULL REFERENCES procedures (id) ON DELETE CASCADE,
    lane          TEXT    NOT NULL,
    PRIMARY KEY (procedure_key, position)
) WITHOUT ROWID;
INSERT INTO procedure_lanes_by_key (procedure_key, position, procedure_id, lane)
SELECT p.key, l.position, l.procedure_id, l.lane
FROM procedure_lanes l JOIN procedures p ON p.id = l.procedure_id;
DROP TABLE procedure_lanes;
ALTER TABLE procedure_lanes_by_key RENAME TO procedure_lanes;
CREATE INDEX procedure_lanes_procedure ON procedure_lanes (procedure_id, position);
CREATE INDEX procedure_lanes_lane ON procedure_lanes (lane);

CREATE TABLE procedure_calls_by_key (
    procedure_key INTEGER NOT NULL,
    relation      TEXT    NOT NULL CHECK (relation IN ('called_within', 'called_from')),
    position      INTEGER NOT NULL,
    procedure_id  TEXT    NOT NULL REFERENCES procedures (id) ON DELETE CASCADE,
    related_name  TEXT    NOT NULL,
    PRIMARY KEY (procedure_key, relation, position)
) WITHOUT ROWID;
INSERT INTO procedure_calls_by_key (procedure_key, relation, position, procedure_id, related_name)
SELECT p.key, c.relation, c.position, c.procedure_id, c.related_name
FROM procedure_calls c JOIN procedures p ON p.id = c.procedure_id;
DROP TABLE procedure_calls;
ALTER TABLE procedure_calls_by_key RENAME TO procedure_calls;
CREATE INDEX procedure_calls_procedure ON procedure_calls (procedure_id, relation, position);
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

-- The lanes of every version: past versions' from the history, the current one's from
-- `procedure_lanes`.
CREATE VIEW procedure_version_lanes AS
SELECT procedure_id, updated_at, position, lane
FROM procedure_history_lanes
UNION ALL
SELECT l.procedure_id, p.updated_at, l.position, l.lane
FROM procedure_lanes l
JOIN procedures p ON p.id = l.procedure_id;
