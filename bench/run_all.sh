#!/usr/bin/env bash
# Run every benchmark of bench/ in sequence, one output file each, for RESULTS-draft.md.
#   bash bench/run_all.sh OUTDIR          # the full set (about an hour on 2 cores)
#   bash bench/run_all.sh OUTDIR --quick  # every script's --quick smoke run
# The scripts pin by default, agi_load.py measures the floor (minimal_agi.py) beside
# callguard in the same invocation, and each keeps its result in bench/results/ too.
set -u
cd "$(dirname "$0")/.."
out=${1:-/tmp/callguard-bench-results}
mkdir -p "$out"
PY=.venv/bin/python
n=0
run() {
  n=$((n + 1))
  local name=$1; shift
  local file="$out/$(printf %02d $n)-$name.out"
  { echo "\$ $*"; echo "# started $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$file"
  "$@" >> "$file" 2>&1
  echo "# exit $? at $(date -u +%FT%TZ)" >> "$file"
  echo "done: $file"
}
if [ "${2:-}" = "--quick" ]; then
  run quick-callguard $PY bench/agi_load.py --quick
  run quick-redis $PY bench/agi_load.py --quick --target redis
  run quick-findmax $PY bench/agi_load.py --quick --find-max
  run quick-esl $PY bench/esl_load.py --quick
  run quick-supervise $PY bench/supervise.py --quick
  run quick-scale $PY bench/scale.py --quick
  run quick-ghosts $PY bench/ghosts.py --quick
  exit 0
fi
run callguard-1000 $PY bench/agi_load.py --target callguard --rate 1000 --duration 20 --runs 3
run redis-authorize-1000 $PY bench/agi_load.py --target redis --lua authorize --rate 1000 --duration 20 --runs 3
run callguard-findmax $PY bench/agi_load.py --target callguard --find-max --start-rate 1000 --step 500 --step-seconds 10 --runs 3
run redis-authorize-findmax $PY bench/agi_load.py --target redis --lua authorize --find-max --start-rate 2000 --step 2000 --step-seconds 10 --runs 3
run redis-trivial-findmax $PY bench/agi_load.py --target redis --lua trivial --find-max --start-rate 2000 --step 2000 --step-seconds 10 --runs 3
run esl-callguard-1000 $PY bench/esl_load.py --rate 1000 --duration 20 --runs 3
run supervise-20000 $PY bench/supervise.py --calls 20000 --quota 60 --duration 150 --gc-probe
run fraud $PY bench/fraud.py --runs 5
run fraud-crash $PY bench/fraud.py --crash-at 30
run fraud-e2e $PY bench/fraud.py --e2e
run scale $PY bench/scale.py
run ghosts $PY bench/ghosts.py
run ghosts-off $PY bench/ghosts.py --off
