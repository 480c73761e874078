-- Tie groups (procedures sharing one updated_at) that a pass read while they changed and could
-- not prove it read completely (docs/sync.md, "Unproven groups"). The pass moved on; every later
-- pass reads each group again first, until a quiet moment proves it complete and deletes its row.
CREATE TABLE unproven_tie_groups (
    at           text PRIMARY KEY,
    size_bound   bigint NOT NULL,
    size_counted bigint NOT NULL,
    recorded_at  timestamptz NOT NULL,
    checked_at   timestamptz NOT NULL,
    checks       bigint NOT NULL
);
COMMENT ON TABLE unproven_tie_groups IS 'Groups of procedures sharing one updated_at that a pass could not prove it read completely; each later pass reads them again first. Empty while the source is quiet.';
COMMENT ON COLUMN unproven_tie_groups.at IS 'The shared updated_at, in the watermark''s text form.';
COMMENT ON COLUMN unproven_tie_groups.size_bound IS 'At most this many procedures shared it at the instant it was last measured.';
COMMENT ON COLUMN unproven_tie_groups.size_counted IS 'How many of them were served after that measurement.';
COMMENT ON COLUMN unproven_tie_groups.recorded_at IS 'When a pass first failed to prove it.';
COMMENT ON COLUMN unproven_tie_groups.checked_at IS 'When a pass last tried.';
COMMENT ON COLUMN unproven_tie_groups.checks IS 'Passes that tried.';
