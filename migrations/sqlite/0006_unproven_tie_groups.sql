-- Tie groups (procedures sharing one updated_at) that a pass read while they changed and could
-- not prove it read completely (docs/sync.md, "Unproven groups"). The pass moved on; every later
-- pass reads each group again first, until a quiet moment proves it complete and deletes its row.
-- `at` is the shared instant in the watermark's text form.
CREATE TABLE unproven_tie_groups (
    at           TEXT PRIMARY KEY,
    size_bound   INTEGER NOT NULL,
    size_counted INTEGER NOT NULL,
    recorded_at  TEXT NOT NULL,
    checked_at   TEXT NOT NULL,
    checks       INTEGER NOT NULL
);
