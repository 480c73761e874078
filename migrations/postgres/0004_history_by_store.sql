-- The history (procedure_history, procedure_version_lanes) is now written by klarify-sync itself,
-- with set-based statements per batch in the transaction that writes procedures, instead of by
-- a row trigger that ran a PL/pgSQL function for every written row. What the history holds is
-- unchanged: docs/schema.md describes it.
DROP TRIGGER procedures_history_insert ON procedures;
DROP TRIGGER procedures_history_update ON procedures;
DROP FUNCTION record_procedure_version();

COMMENT ON TABLE procedure_history IS
    'One row per distinct version (procedure_id, updated_at) of a procedure the mirror has stored, written by klarify-sync together with procedures. Query procedure_versions, which adds valid_from/valid_to.';
