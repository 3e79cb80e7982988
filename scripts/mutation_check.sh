#!/usr/bin/env bash
# Mutation testing of the modules that carry the predictions, with mutmut 2 (it mutates a file in place,
# runs the tests, restores it). It works on a copy of the committed tree, never on the checkout, so it
# can run beside other work; `import specmoe.*` is pointed at the copy through PYTHONPATH.
#
#   bash scripts/mutation_check.sh                 # every module below (long: about an hour on 2 cores)
#   bash scripts/mutation_check.sh planner/memory.py   # one module of the list
#
# Each module is run against the tests that guard it (fast ones: the runner stops at the first failure).
# The tests' output goes to /dev/null inside `sh -c`: mutmut reads the runner through a pty until every
# process holding it exits, and a helper process a test leaves behind would otherwise hang it.
# A mutant counts as killed when a test fails or the run times out. Ends with one line:
#   mutation: K killed of N (P.P%) over MODULES; S survivors listed in FILE
# The survivors (each with its diff) go to bench/results/mutation_survivors.txt; reasons for the ones that
# are equivalent are kept in bench/results/mutation_equivalent.txt (file, line and the mutated line).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
WORK=${MUTATION_WORKDIR:-/tmp/specmoe-mutation}
OUT="$REPO/bench/results/mutation_survivors.txt"

declare -A TESTS=(
  [planner/cost_terms.py]="tests/test_guard_mutants.py tests/test_guard_cost_model.py tests/test_cost_model.py"
  [planner/cost_model.py]="tests/test_guard_mutants.py tests/test_guard_cost_model.py tests/test_cost_model.py tests/test_paper_analysis.py tests/test_cost_model_overhead.py"
  [planner/memory.py]="tests/test_guard_mutants.py tests/test_memory.py tests/test_paper_analysis.py tests/test_guard_memory_fit.py"
  [planner/simulator.py]="tests/test_guard_mutants.py tests/test_simulator.py tests/test_cost_model.py"
  [runtime/speculative.py]="tests/test_guard_acceptance.py"
  [runtime/calibrate/measure.py]="tests/test_guard_calibration.py"
)
MODULES=("$@")
[ ${#MODULES[@]} -eq 0 ] && MODULES=(planner/cost_terms.py planner/cost_model.py planner/memory.py planner/simulator.py runtime/speculative.py runtime/calibrate/measure.py)
for m in "${MODULES[@]}"; do
  [ -n "${TESTS[$m]:-}" ] || { echo "mutation: error: no tests listed for $m (one of: ${!TESTS[*]})" >&2; exit 2; }
done

"$PY" -m pip install -q "mutmut==2.5.1" >/dev/null
rm -rf "$WORK" && mkdir -p "$WORK/src" "$WORK/ns/specmoe"
git -C "$REPO" archive HEAD | tar -x -C "$WORK/src"
for d in planner runtime cuda_kernels; do ln -s "$WORK/src/$d" "$WORK/ns/specmoe/$d"; done
export PYTHONPATH="$WORK/ns" OMP_NUM_THREADS=1 SPECMOE_CALIBRATE_STRICT=0
cd "$WORK/src"
# mutmut 2 can deadlock between its worker threads (a thread blocked writing a full pipe); a watchdog
# restarts it from its cache when no mutant has finished for STALL_S seconds, the module restored first
STALL_S=${MUTATION_STALL_S:-120}
untested() { "$PY" -c "import sqlite3,sys; c=sqlite3.connect('.mutmut-cache', timeout=30); print(c.execute(
  \"select count(*) from Mutant m join Line l on m.line=l.id join SourceFile f on l.sourcefile=f.id
  where m.status='untested' and f.filename=?\", (sys.argv[1],)).fetchone()[0])" "$1" 2>/dev/null || echo -1; }
for m in "${MODULES[@]}"; do
  echo "mutation: $m against ${TESTS[$m]}" >&2
  for attempt in $(seq 1 30); do
    git -C "$REPO" show "HEAD:$m" > "$m"           # the unmutated module (a killed run may leave a mutant)
    "$REPO/.venv/bin/mutmut" run --paths-to-mutate "$m" --tests-dir tests --no-progress \
        --runner "sh -c '$PY -m pytest -x -q -p no:cacheprovider -p no:randomly ${TESTS[$m]} </dev/null >/dev/null 2>&1'" \
        >/dev/null 2>&1 &
    pid=$!
    last=$(untested "$m"); still=0
    while kill -0 "$pid" 2>/dev/null; do
      sleep 10
      now=$(untested "$m")
      [ "$now" = "-1" ] && continue               # the cache was busy (locked): no reading, no verdict
      if [ "$now" = "$last" ]; then still=$((still + 10)); else still=0; last=$now; fi
      if [ "$still" -ge "$STALL_S" ]; then
        echo "mutation: $m stalled with $now untested: restarting mutmut" >&2
        pkill -P "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; sleep 2; kill -9 "$pid" 2>/dev/null || true
        break
      fi
    done
    wait "$pid" 2>/dev/null || true
    [ "$(untested "$m")" = "0" ] && break
  done
  git -C "$REPO" show "HEAD:$m" > "$m"
done
"$PY" "$REPO/scripts/mutation_summary.py" "$WORK/src/.mutmut-cache" "$OUT" "$REPO/bench/results/mutation_equivalent.txt" \
    "${MODULES[@]}"
