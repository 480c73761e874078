#!/usr/bin/env bash
# The cost of the schema alone: copies the rows of a finished mirror into a freshly migrated
# one, in updated_at order, in batches of 3,000 (one transaction each, as the sync commits),
# with no JSON and no klarify-sync (docs/performance.md, "Tried and not adopted").
#
#   sqlite FULL.db EMPTY.db ["SQL run before the copy"] ["SQL run after it"]
#   postgres ADMIN_URL FULL_DB ["SQL run before the copy"] ["SQL run after it"]
#
# FULL: a mirror after `klarify-sync --backfill` (e.g. of `fake-klarify --procedures 100000`).
# EMPTY.db: a migrated, empty SQLite mirror. `status` only reads an existing mirror; a pass
# migrates before its first request, so one that finds no API leaves an empty mirror behind:
#   KLARIFY_ACCESS_KEY=none KLARIFY_SYNC__KLARIFY__BASE_URL=http://127.0.0.1:9 \
#   KLARIFY_SYNC__KLARIFY__MAX_ATTEMPTS=1 DATABASE_URL=sqlite://EMPTY.db klarify-sync --once
# (it fails, as it should). SYNC=OFF and CACHE=KiB set SQLite's pragmas. Prints the wall time
# of the copy.
set -euo pipefail

batches() { # TABLE_PREFIX: the copy's statements, one transaction per batch
    local n=$1 src=$2 seen=$3
    for b in $(seq 0 $(((n + 2999) / 3000 - 1))); do
        local lo=$((b * 3000 + 1)) hi=$((b * 3000 + 3000))
        echo "BEGIN;"
        echo "INSERT INTO procedures SELECT p.* FROM ord o JOIN ${src}procedures p ON p.id = o.id WHERE o.rn BETWEEN $lo AND $hi;"
        echo "INSERT INTO procedure_lanes SELECT l.* FROM ord o JOIN ${src}procedure_lanes l ON l.procedure_id = o.id WHERE o.rn BETWEEN $lo AND $hi;"
        echo "INSERT INTO procedure_calls SELECT c.* FROM ord o JOIN ${src}procedure_calls c ON c.procedure_id = o.id WHERE o.rn BETWEEN $lo AND $hi;"
        echo "INSERT INTO sync_seen SELECT $seen, o.id FROM ord o WHERE o.rn BETWEEN $lo AND $hi;"
        echo "COMMIT;"
    done
}

timed() {
    local started ended
    started=$(date +%s.%N)
    "$@" >/dev/null
    ended=$(date +%s.%N)
    echo "copy: $(echo "$ended - $started" | bc) s"
}

case "${1:-}" in
sqlite)
    full=$2 empty=$3 before=${4:-} after=${5:-}
    copy=$(mktemp -d)/floor.db
    sqlite3 "$empty" "PRAGMA wal_checkpoint(TRUNCATE);" >/dev/null
    cp "$empty" "$copy"
    n=$(sqlite3 "$full" "SELECT COUNT(*) FROM procedures")
    sqlite3 "$copy" <<SQL
ATTACH '$full' AS src;
CREATE TABLE ord AS SELECT id, row_number() OVER (ORDER BY updated_at) AS rn FROM src.procedures;
CREATE INDEX ord_rn ON ord (rn);
INSERT INTO sync_runs (started_at, mode, outcome) VALUES ('-', 'backfill', 'running');
SQL
    script=$(mktemp)
    {
        echo "PRAGMA synchronous = ${SYNC:-NORMAL}; PRAGMA cache_size = -${CACHE:-8192};"
        echo "PRAGMA wal_autocheckpoint = 20000; PRAGMA foreign_keys = ON;"
        echo "ATTACH '$full' AS src;"
        echo "$before"
        batches "$n" src. 1 | sed 's/INSERT INTO \(procedure[a-z_]*\|sync_seen\) /INSERT INTO main.\1 /'
        echo "$after"
    } >"$script"
    timed sqlite3 "$copy" <"$script"
    ;;
postgres)
    admin=$2 full=$3 before=${4:-} after=${5:-}
    url=${admin%/*}
    psql -q "$admin" -c "DROP DATABASE IF EXISTS klarify_floor" -c "CREATE DATABASE klarify_floor TEMPLATE $full" >/dev/null
    psql -q "$url/klarify_floor" >/dev/null <<SQL
CREATE SCHEMA src;
CREATE TABLE src.procedures AS SELECT * FROM procedures;
CREATE TABLE src.procedure_lanes AS SELECT * FROM procedure_lanes;
CREATE TABLE src.procedure_calls AS SELECT * FROM procedure_calls;
CREATE TABLE ord AS SELECT id, row_number() OVER (ORDER BY updated_at) AS rn FROM procedures;
CREATE INDEX ON ord (rn);
TRUNCATE procedures, procedure_lanes, procedure_calls, procedure_history, procedure_history_lanes, sync_seen CASCADE;
VACUUM ANALYZE;
SQL
    n=$(psql -At "$url/klarify_floor" -c "SELECT COUNT(*) FROM ord")
    script=$(mktemp)
    { echo "$before"; batches "$n" src. 1; echo "$after"; } >"$script"
    timed psql -q "$url/klarify_floor" -f "$script"
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
