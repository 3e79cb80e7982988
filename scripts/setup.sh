#!/usr/bin/env bash
# Create .venv and install specmoe with the engine, the test tools and Ray Data (`specmoe job`).
# torch is pinned (CPU build on a CPU machine) so no multi-GB CUDA build is pulled by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[runtime,dev,ray]"
echo "setup: ok ($(.venv/bin/python -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'))"
