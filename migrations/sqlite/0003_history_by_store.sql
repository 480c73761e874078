-- The history (procedure_history, procedure_version_lanes) is now written by klarify-sync itself,
-- with one set-based statement per batch in the transaction that writes procedures, instead of
-- by row triggers that copied every row and re-parsed its lanes one at a time. What the history
-- holds is unchanged: docs/schema.md describes it.
DROP TRIGGER procedures_history_insert;
DROP TRIGGER procedures_history_update;
