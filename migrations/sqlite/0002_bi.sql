-- Ready for BI: call references resolved to procedures, every version of a procedure kept, and
-- indexes for the usual filters. docs/schema.md describes every table, view and column.
-- Timestamps stay RFC 3339 UTC text with six fractional digits, so text order is time order.

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
-- the triggers below, so it cannot drift from `procedures`: klarify-sync writes a procedures row
-- only when its content changed (or it is revived), and marks deletions with an UPDATE.
CREATE TABLE procedure_history (
    procedure_id TEXT NOT NULL REFERENCES procedures (id) ON DELETE CASCADE,
    updated_at   TEXT NOT NULL,             -- the version's updated_at: it is valid from then
    name         TEXT,
    status       TEXT,
    owner        TEXT,
    performer    TEXT,
    url          TEXT,
    raw          TEXT NOT NULL,             -- the item as received, JSON
    recorded_at  TEXT NOT NULL,             -- when the mirror first wrote this version
    deleted_at   TEXT,                      -- when a backfill found the procedure gone in this version
    PRIMARY KEY (procedure_id, updated_at)
);
CREATE INDEX procedure_history_updated_at ON procedure_history (updated_at);

CREATE TABLE procedure_version_lanes (
    procedure_id TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    position     INTEGER NOT NULL,
    lane         TEXT    NOT NULL,
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
CREATE TRIGGER procedures_history_insert AFTER INSERT ON procedures
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
    SELECT NEW.id, NEW.updated_at, j.key, j.value
    FROM json_each(NEW.raw, '$.lanes') AS j
    WHERE json_type(NEW.raw, '$.lanes') = 'array';
END;

CREATE TRIGGER procedures_history_update AFTER UPDATE ON procedures
WHEN OLD.updated_at IS NOT NEW.updated_at
  OR OLD.content_hash IS NOT NEW.content_hash
  OR OLD.deleted_at IS NOT NEW.deleted_at
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
    SELECT NEW.id, NEW.updated_at, j.key, j.value
    FROM json_each(NEW.raw, '$.lanes') AS j
    WHERE json_type(NEW.raw, '$.lanes') = 'array';
END;

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
