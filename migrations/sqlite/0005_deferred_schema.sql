-- A first backfill into an empty mirror builds the secondary indexes of the mirrored tables once,
-- at its end, instead of inserting into each of them row by row (random names and ids land all
-- over them: most of a bulk load's work, docs/performance.md). Each row is one index that is
-- missing now and the statement that builds it; it is written in the transaction that drops the
-- index, so a pass killed before its end leaves the record, and the next pass rebuilds it.
CREATE TABLE deferred_schema (
    name    TEXT PRIMARY KEY,
    restore TEXT NOT NULL
);
