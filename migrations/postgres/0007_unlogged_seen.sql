-- `sync_seen` holds the ids a running backfill was served, to find the deleted procedures when it
-- ends; it is emptied then. Unlogged, writing it costs no WAL (a 100,000-row backfill wrote a WAL
-- record per id, shipped to every replica). A crash of the server empties an unlogged table,
-- which loses nothing: the backfill it served failed with the connection, and the next one starts
-- its own set.
ALTER TABLE sync_seen SET UNLOGGED;
COMMENT ON TABLE sync_seen IS 'Internal: ids served during a backfill, to detect deletions; emptied when it ends. Unlogged: not on replicas, emptied by a server crash.';
