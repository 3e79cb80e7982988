#!/usr/bin/env bash
# Mutation testing of the modules that carry the predictions, with mutmut 2's mutations and cache and
# scripts/mutation_run.py as the runner (it mutates a file in place, runs the tests, restores it). It
# works on a copy of the committed tree, never on the checkout, so it can run beside other work;
# `import specmoe.*` is pointed at the copy through PYTHONPATH.
#
#   bash scripts/mutation_check.sh                 # every module below (long: about an hour on 2 cores)
#   bash scripts/mutation_check.sh planner/memory.py   # one module of the list
#   MUTATION_RESUME=1 bash scripts/mutation_check.sh    # keep the verdicts already in the work copies'
#                                                        # caches (sources refreshed from HEAD; mutants of
#                                                        # changed lines are tested again, and a module's
#                                                        # surviving ones when its own tests change)
#   MUTATION_JOBS=1 bash scripts/mutation_check.sh      # one module at a time (default 2 side by side,
#                                                        # each module in its own copy with its own cache)
#
# Each module is run against the tests that guard it (fast ones: the runner stops at the first failure).
# A mutant counts as killed when a test fails or the run times out (max(60 s, 10 x the unmutated run)).
# Ends with one line:
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
  [planner/cost_model.py]="tests/test_guard_mutants_cost_model.py tests/test_guard_mutants.py tests/test_guard_cost_model.py tests/test_cost_model.py tests/test_paper_analysis.py tests/test_cost_model_overhead.py"
  [planner/memory.py]="tests/test_guard_mutants_memory.py tests/test_guard_mutants_memory_batch.py tests/test_guard_mutants.py tests/test_memory.py tests/test_paper_analysis.py tests/test_guard_memory_fit.py tests/test_eagle_planner.py"
  [planner/simulator.py]="tests/test_guard_mutants_simulator.py tests/test_guard_mutants_simulator_run.py tests/test_guard_mutants.py tests/test_simulator.py tests/test_cost_model.py"
  [runtime/speculative.py]="tests/test_guard_mutants_speculative.py tests/test_guard_mutants_speculative_steps.py tests/test_guard_mutants_speculative_sampling.py tests/test_guard_acceptance.py tests/test_engine_overhead.py"
  [runtime/calibrate/measure.py]="tests/test_guard_mutants_measure.py tests/test_guard_mutants_measure_cpu.py tests/test_guard_mutants_measure_cuda.py tests/test_guard_calibration.py"
)
ALL=(planner/cost_terms.py planner/cost_model.py planner/memory.py planner/simulator.py runtime/speculative.py
     runtime/calibrate/measure.py)
MODULES=("$@")
[ ${#MODULES[@]} -eq 0 ] && MODULES=("${ALL[@]}")
for m in "${MODULES[@]}"; do
  [ -n "${TESTS[$m]:-}" ] || { echo "mutation: error: no tests listed for $m (one of: ${!TESTS[*]})" >&2; exit 2; }
done
JOBS=${MUTATION_JOBS:-2}
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "mutation: error: MUTATION_JOBS: must be a positive integer, got '$JOBS'" >&2; exit 2; }

"$PY" -m pip install -q "mutmut==2.5.1" >/dev/null
if [ "${MUTATION_RESUME:-0}" = 1 ]; then
  echo "mutation: resuming from the caches under $WORK" >&2
else
  rm -rf "$WORK"
fi
export OMP_NUM_THREADS=1 SPECMOE_CALIBRATE_STRICT=0

# Mutate one module in its own copy of the committed tree (its own mutmut cache, kept across runs).
run_module() {
  local m=$1 dir="$WORK/${1//\//_}"
  mkdir -p "$dir/src" "$dir/ns/specmoe"
  git -C "$REPO" archive HEAD | tar -x -C "$dir/src"
  for d in planner runtime cuda_kernels; do ln -sfn "$dir/src/$d" "$dir/ns/specmoe/$d"; done
  cd "$dir/src"
  export PYTHONPATH="$dir/ns"
  echo "mutation: $m against ${TESTS[$m]}" >&2
  # every mutant not yet killed is tested again when the files of the tests dir change: it holds the
  # module's own test files and the tests' helpers (fixtures, conftest), so that new tests of other modules
  # do not send this module's survivors back for retesting
  local tdir="$dir/tests_of"
  rm -rf "$tdir" && mkdir -p "$tdir"
  for f in ${TESTS[$m]}; do ln -s "$dir/src/$f" "$tdir/"; done
  for f in "$dir/src/tests/"*.py; do case "${f##*/}" in test_*) ;; *) ln -s "$f" "$tdir/" ;; esac; done
  git -C "$REPO" show "HEAD:$m" > "$m"           # the unmutated module (a killed run may leave a mutant)
  "$PY" "$REPO/scripts/mutation_run.py" "$m" "$tdir" -- \
      "$PY" -m pytest -x -q -p no:cacheprovider -p no:randomly ${TESTS[$m]} || true
  git -C "$REPO" show "HEAD:$m" > "$m"
}

# JOBS modules at a time, each in its own copy
for m in "${MODULES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  ( run_module "$m" ) &
done
wait
caches=$(for m in "${MODULES[@]}"; do printf '%s,' "$WORK/${m//\//_}/src/.mutmut-cache"; done)
"$PY" "$REPO/scripts/mutation_summary.py" "${caches%,}" "$OUT" "$REPO/bench/results/mutation_equivalent.txt" \
    "${MODULES[@]}"
