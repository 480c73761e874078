-- Lanes and calls are keyed in the order their procedures were first written: each procedure
-- gets an integer `key`, given by klarify-sync in increasing order, and the primary keys of
-- lanes and calls lead with it. Keyed by the random text id, every batch inserted all over their
-- B-trees (a quarter of the backend's time in a backfill, docs/performance.md); new procedures'
-- lanes and calls now go to the right edge. `procedure_id` stays, with the same meaning, its
-- foreign key and an index for lookups by it; the views are as before (docs/schema.md).

ALTER TABLE procedures ADD COLUMN key bigint;
UPDATE procedures p SET key = n.key
FROM (SELECT id, row_number() OVER (ORDER BY first_seen_at, id) AS key FROM procedures) n
WHERE n.id = p.id;
ALTER TABLE procedures ALTER COLUMN key SET NOT NULL;
CREATE UNIQUE INDEX procedures_key ON procedures (key);
COMMENT ON COLUMN procedures.key IS 'Internal: the order in which the mirror first wrote the procedure; lanes and calls are keyed by it. Join on id.';

ALTER TABLE procedure_lanes ADD COLUMN procedure_key bigint;
UPDATE procedure_lanes l SET procedure_key = p.key FROM procedures p WHERE p.id = l.procedure_id;
ALTER TABLE procedure_lanes ALTER COLUMN procedure_key SET NOT NULL;
ALTER TABLE procedure_lanes DROP CONSTRAINT procedure_lanes_pkey;
ALTER TABLE procedure_lanes ADD PRIMARY KEY (procedure_key, position);
CREATE INDEX procedure_lanes_procedure ON procedure_lanes (procedure_id, position);
COMMENT ON COLUMN procedure_lanes.procedure_key IS 'Internal: procedures.key of the procedure. Join on procedure_id.';

ALTER TABLE procedure_calls ADD COLUMN procedure_key bigint;
UPDATE procedure_calls c SET procedure_key = p.key FROM procedures p WHERE p.id = c.procedure_id;
ALTER TABLE procedure_calls ALTER COLUMN procedure_key SET NOT NULL;
ALTER TABLE procedure_calls DROP CONSTRAINT procedure_calls_pkey;
ALTER TABLE procedure_calls ADD PRIMARY KEY (procedure_key, relation, position);
CREATE INDEX procedure_calls_procedure ON procedure_calls (procedure_id, relation, position);
COMMENT ON COLUMN procedure_calls.procedure_key IS 'Internal: procedures.key of the procedure. Join on procedure_id.';
