#!/usr/bin/env bash
# The one script run on the GPU host (H200, 16 cores): the offload benchmark within its 170 s budget,
# then the verify-attention kernel benchmark (if present, at most 40 s). Results go to $OUT.
# Nothing is installed (no network there): torch, cupy and transformers are the host's; this repo
# is not installed, so it runs from the checkout with PYTHONPATH. The C++ kernel is built into
# /tmp (a fresh machine has no cache; $HOME may not be writable).
#     OUT=/path/to/results bash bench/run_gpu_session.sh
set -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SPECMOE_CACHE_DIR="${SPECMOE_CACHE_DIR:-/tmp/specmoe-cache}"
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"

python bench/gpu_offload.py --out "$OUT" --time-budget-s 170 2>&1 | tee "$OUT/gpu_offload.log"
rc=$?
echo "gpu_offload.py exit status $rc"

if [ -f bench/verify_attention.py ]; then
  timeout 40 python bench/verify_attention.py --quick --tag h200-16core > "$OUT/verify_attention_h200-16core.txt" 2>&1
  echo "verify_attention.py exit status $?"
fi
exit $rc
