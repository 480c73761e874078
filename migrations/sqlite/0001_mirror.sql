-- The mirror of Klarify procedures. Timestamps are RFC 3339 UTC text with six fractional
-- digits ("2024-01-15T14:30:00.000000Z"), so that text order is time order.

CREATE TABLE procedures (
    id            TEXT PRIMARY KEY,
    name          TEXT,
    status        TEXT,
    owner         TEXT,
    performer     TEXT,
    updated_at    TEXT NOT NULL,
    url           TEXT,
    raw           TEXT NOT NULL,            -- the item as received, JSON
    content_hash  TEXT NOT NULL,            -- sha256 of raw: unchanged re-reads write nothing
    first_seen_at TEXT NOT NULL,
    synced_at     TEXT NOT NULL,            -- when this row's content was last written
    deleted_at    TEXT                      -- set by a backfill when the API stopped serving it
);
CREATE INDEX procedures_updated_at ON procedures (updated_at);
CREATE INDEX procedures_live ON procedures (deleted_at);

CREATE TABLE procedure_lanes (
    procedure_id TEXT    NOT NULL REFERENCES procedures (id) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    lane         TEXT    NOT NULL,
    PRIMARY KEY (procedure_id, position)
);

CREATE TABLE procedure_calls (
    procedure_id TEXT    NOT NULL REFERENCES procedures (id) ON DELETE CASCADE,
    relation     TEXT    NOT NULL CHECK (relation IN ('called_within', 'called_from')),
    position     INTEGER NOT NULL,
    related_name TEXT    NOT NULL,
    PRIMARY KEY (procedure_id, relation, position)
);

CREATE TABLE rejected_items (
    raw_hash      TEXT PRIMARY KEY,         -- one row per distinct item, however often it is served
    raw           TEXT NOT NULL,
    reason        TEXT NOT NULL,
    first_seen_at TEXT NOT NULL,
    seen_at       TEXT NOT NULL
);

CREATE TABLE sync_runs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at       TEXT    NOT NULL,
    finished_at      TEXT,
    mode             TEXT    NOT NULL,
    outcome          TEXT    NOT NULL,      -- running, succeeded, failed, interrupted
    pages            INTEGER NOT NULL DEFAULT 0,
    fetched          INTEGER NOT NULL DEFAULT 0,
    inserted         INTEGER NOT NULL DEFAULT 0,
    updated          INTEGER NOT NULL DEFAULT 0,
    unchanged        INTEGER NOT NULL DEFAULT 0,
    deleted          INTEGER NOT NULL DEFAULT 0,
    rejected         INTEGER NOT NULL DEFAULT 0,
    watermark_before TEXT,
    watermark_after  TEXT,
    error            TEXT
);

-- The sync cursor: everything modified up to `watermark` has been written.
CREATE TABLE sync_state (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    watermark TEXT
);

-- Ids served during a backfill, so that deletions are detected without holding them in memory.
CREATE TABLE sync_seen (
    run_id       INTEGER NOT NULL,
    procedure_id TEXT    NOT NULL,
    PRIMARY KEY (run_id, procedure_id)
);

CREATE VIEW live_procedures AS
SELECT id, name, status, owner, performer, updated_at, url, raw, deleted_at
FROM procedures
WHERE deleted_at IS NULL;
