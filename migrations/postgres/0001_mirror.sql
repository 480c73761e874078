-- The mirror of Klarify procedures.

CREATE TABLE procedures (
    id            TEXT PRIMARY KEY,
    name          TEXT,
    status        TEXT,
    owner         TEXT,
    performer     TEXT,
    updated_at    TIMESTAMPTZ NOT NULL,
    url           TEXT,
    raw           JSONB       NOT NULL,     -- the item as received
    content_hash  TEXT        NOT NULL,     -- sha256 of the received text: unchanged re-reads write nothing
    first_seen_at TIMESTAMPTZ NOT NULL,
    synced_at     TIMESTAMPTZ NOT NULL,     -- when this row's content was last written
    deleted_at    TIMESTAMPTZ               -- set by a backfill when the API stopped serving it
);
CREATE INDEX procedures_updated_at ON procedures (updated_at);
CREATE INDEX procedures_live ON procedures (id) WHERE deleted_at IS NULL;

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
    raw           TEXT        NOT NULL,     -- text, not jsonb: kept byte for byte as received
    reason        TEXT        NOT NULL,
    first_seen_at TIMESTAMPTZ NOT NULL,
    seen_at       TIMESTAMPTZ NOT NULL
);

CREATE TABLE sync_runs (
    id               BIGSERIAL PRIMARY KEY,
    started_at       TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ,
    mode             TEXT        NOT NULL,
    outcome          TEXT        NOT NULL,  -- running, succeeded, failed, interrupted
    pages            BIGINT      NOT NULL DEFAULT 0,
    fetched          BIGINT      NOT NULL DEFAULT 0,
    inserted         BIGINT      NOT NULL DEFAULT 0,
    updated          BIGINT      NOT NULL DEFAULT 0,
    unchanged        BIGINT      NOT NULL DEFAULT 0,
    deleted          BIGINT      NOT NULL DEFAULT 0,
    rejected         BIGINT      NOT NULL DEFAULT 0,
    watermark_before TEXT,
    watermark_after  TEXT,
    error            TEXT
);

-- The sync cursor: everything modified up to `watermark` has been written. Text, not
-- timestamptz, so the cursor round-trips exactly whatever the source's precision.
CREATE TABLE sync_state (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    watermark TEXT
);

-- Ids served during a backfill, so that deletions are detected without holding them in memory.
CREATE TABLE sync_seen (
    run_id       BIGINT NOT NULL,
    procedure_id TEXT   NOT NULL,
    PRIMARY KEY (run_id, procedure_id)
);

CREATE VIEW live_procedures AS
SELECT id, name, status, owner, performer, updated_at, url, raw, deleted_at
FROM procedures
WHERE deleted_at IS NULL;
