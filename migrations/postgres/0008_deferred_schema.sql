-- A first backfill into an empty mirror builds the secondary indexes of the mirrored tables, and
-- checks the foreign keys of their lanes and calls, once at its end instead of row by row (the
-- per-row foreign-key checks alone were over a third of a bulk load, docs/performance.md). Each
-- row is one index or constraint that is missing now and the statement that restores it; it is
-- written in the transaction that drops the object, so a pass killed before its end leaves the
-- record, and the next pass restores it.
CREATE TABLE deferred_schema (
    name    text PRIMARY KEY,
    restore text NOT NULL
);
COMMENT ON TABLE deferred_schema IS 'Internal: indexes and constraints a bulk load into an empty mirror builds at its end; empty except during such a load (or after one was killed, until the next pass).';
COMMENT ON COLUMN deferred_schema.name IS 'The index or constraint.';
COMMENT ON COLUMN deferred_schema.restore IS 'The statement that builds it again.';
