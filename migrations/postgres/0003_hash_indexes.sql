-- B-tree index entries are limited to about 2.7 kB, so one procedure with a very long name,
-- owner, status, lane or called name would make every write of its page fail. Those columns
-- are looked up by equality only (filters, name resolution), which hash indexes serve with no
-- size limit.
DROP INDEX procedures_status;
DROP INDEX procedures_owner;
DROP INDEX procedures_live_name;
DROP INDEX procedure_lanes_lane;
DROP INDEX procedure_calls_related_name;
DROP INDEX procedure_version_lanes_lane;
CREATE INDEX procedures_status ON procedures USING hash (status);
CREATE INDEX procedures_owner ON procedures USING hash (owner);
CREATE INDEX procedures_live_name ON procedures USING hash (name) WHERE deleted_at IS NULL;
CREATE INDEX procedure_lanes_lane ON procedure_lanes USING hash (lane);
CREATE INDEX procedure_calls_related_name ON procedure_calls USING hash (related_name);
CREATE INDEX procedure_version_lanes_lane ON procedure_version_lanes USING hash (lane);
