-- A bulk load that Klarify keeps waiting builds its indexes early, while the readers wait, but
-- adds the lanes' and calls' foreign keys only at its end: kept row by row, their checks cost more
-- than the indexes do, and checking them once at the end is one join (docs/performance.md).
-- Each deferred object now says which it is.
ALTER TABLE deferred_schema
    ADD COLUMN kind text NOT NULL DEFAULT 'index' CHECK (kind IN ('index', 'constraint'));
UPDATE deferred_schema SET kind = 'constraint' WHERE restore LIKE 'ALTER TABLE %';
ALTER TABLE deferred_schema ALTER COLUMN kind DROP DEFAULT;
COMMENT ON COLUMN deferred_schema.kind IS 'index, or constraint (a foreign key): a load Klarify keeps waiting builds the indexes early and the constraints at its end.';
