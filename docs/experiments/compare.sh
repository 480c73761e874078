#!/usr/bin/env bash
# Two builds back to back, per scenario, with the oracle beside each backfill: the before/after
# figures of docs/performance.md in one command.
#
#   compare.sh BASE_DIR NEW_DIR [bench args]
#   compare.sh /work/bench/base target/release --procedures 10000,100000 --postgres "$URL"
#
# BASE_DIR and NEW_DIR each hold a release build's klarify-sync (`cargo build --release --bins`
# at the workspace root builds it, fake-klarify and the bench into target/release);
# the table labels their rows `base` and `new`. The bench and the fake both builds are measured
# against are NEW_DIR's (BENCH=PATH for another bench). Standard output is only the table; the
# load average before each run is its last column, and `uptime` at the start goes to stderr.
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,12p' "$0"
    exit 2
fi
base=$1 new=$2
shift 2
bench=${BENCH:-$new/bench}
echo "started: $(uptime)" >&2
exec "$bench" --binary "base=$base/klarify-sync" --binary "new=$new/klarify-sync" \
    --fake "$new/fake-klarify" "$@"
