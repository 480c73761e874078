-- A hash index files every row with the same value in one bucket, and an insert walks that
-- bucket's whole overflow chain to find room: on columns with few distinct values (status,
-- owner, lanes) every insert cost grew with the table (a quarter of a 100,000-procedure
-- backfill; quadratic towards a million). B-trees would be cheap here but refuse values over
-- 2.7 kB (migration 0003). For so few distinct values the planner scans anyway, so these
-- columns go without an index on PostgreSQL. Names (call resolution) keep their hash indexes:
-- they are nearly unique, so their chains stay short.
DROP INDEX procedures_status;
DROP INDEX procedures_owner;
DROP INDEX procedure_lanes_lane;
DROP INDEX procedure_version_lanes_lane;
