#!/usr/bin/env bash
# The one script run on the GPU host (H200, 16 cores, Python 3.12, no network). Results go to $OUT.
#   1. pulp from the carried wheel folder .whl/ (made here by scripts/fetch_gpu_wheels.sh; git-ignored),
#      installed into /tmp/site: without it bench/gpu_offload.py plans by enumeration.
#   2. the GPU engine tests (token-identical greedy output through the copy stream in every expert-streaming
#      schedule, the H2D accounting; about 60 s) and the GPU checks of the pinned paths (the registered expert
#      region, the attention's pinned buffers), log in $OUT/gpu_engine_tests.log.
#   3. the offload benchmark within its time budget (default 240 s; GPU_BENCH_BUDGET_S to change).
#   4. the verify-attention kernel benchmark (if present, at most 40 s).
# torch, cupy and transformers are the host's; this repo is not installed: a folder of links in /tmp
# gives the checkout's planner/, runtime/ and cuda_kernels/ their import names (specmoe.planner, ...). The C++ kernel is built into /tmp (a fresh machine has no cache; $HOME may not be
# writable). Every step runs under its own `timeout`, so one that hangs cannot eat the session. Device tool
# call (from the repo root here):
#     run(command="OUT=$OUT bash bench/run_gpu_session.sh", carry=[".whl"], timeout_s=560)
set -o pipefail
export PYTHONUNBUFFERED=1
# the thread environment of the calibration (runtime/thread_env.py), set before any python loads torch;
# CuPy's kernel cache in a writable place (a fresh host's $HOME may not be)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/cupy-cache}"
SRC_LINKS=/tmp/specmoe-src
mkdir -p "$SRC_LINKS/specmoe"
for pkg in planner runtime cuda_kernels; do ln -sfn "$PWD/$pkg" "$SRC_LINKS/specmoe/$pkg"; done
export PYTHONPATH="$SRC_LINKS${PYTHONPATH:+:$PYTHONPATH}"
export SPECMOE_CACHE_DIR="${SPECMOE_CACHE_DIR:-/tmp/specmoe-cache}"
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
  if timeout 60 python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "pip install of .whl/*.whl failed: the bench will plan by enumeration"
  fi
else
  echo "no .whl/ folder carried (run scripts/fetch_gpu_wheels.sh here and carry .whl): the bench will plan by enumeration"
fi
timeout 20 python -c "import pulp; print('pulp', pulp.__version__, 'solvers', pulp.listSolvers(onlyAvailable=True))" 2>&1 \
  | tee "$OUT/gpu_engine_tests.log"
# the device this session got (the calibrated spec the bench compares with is the H200 host's)
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/device: /' \
  | tee -a "$OUT/gpu_engine_tests.log"
# imports and planning, before any GPU time is spent (a broken import fails here in seconds)
timeout 60 python bench/gpu_offload.py --plan-only --out "$OUT/plan-only" 2>&1 | tail -5 | tee -a "$OUT/gpu_engine_tests.log" \
  || { echo "plan-only check failed: stopping before the GPU steps"; exit 3; }

# (at most 8 files come back from $OUT: the tests write one JSON, gpu_tests.json)
SPECMOE_GPU_OUT="$OUT" timeout 160 python -m pytest -q -rA -p no:cacheprovider \
  tests/test_engine_gpu.py tests/test_host_region.py tests/test_kv_cache_fresh.py 2>&1 | tail -40 | tee -a "$OUT/gpu_engine_tests.log"
echo "GPU engine tests exit status $?"

timeout $(( ${GPU_BENCH_BUDGET_S:-240} + 60 )) python bench/gpu_offload.py --out "$OUT" \
  --time-budget-s "${GPU_BENCH_BUDGET_S:-240}" --prompt-len 256 2>&1 | tee "$OUT/gpu_offload.log"
rc=$?
echo "gpu_offload.py exit status $rc"

if [ -f bench/verify_attention.py ]; then
  timeout 40 python bench/verify_attention.py --quick --tag h200-16core > "$OUT/verify_attention_h200-16core.txt" 2>&1
  echo "verify_attention.py exit status $?"
fi
exit $rc
