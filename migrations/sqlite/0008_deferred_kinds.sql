-- Each deferred object says whether it is an index or a constraint (the same table on both
-- backends; on SQLite a bulk load defers only indexes, which it builds at its end).
ALTER TABLE deferred_schema
    ADD COLUMN kind TEXT NOT NULL DEFAULT 'index' CHECK (kind IN ('index', 'constraint'));
