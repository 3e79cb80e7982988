#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU host lacks, into .whl/ at the repo root
# (git-ignored; the GPU session carries it: run(..., carry=[".whl"])). bench/run_gpu_session.sh
# installs them there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
#   - pulp: the planner's MILP (without it bench/gpu_offload.py plans by enumeration). The GPU host
#     runs Python 3.12 on x86-64 and has no network. pulp is pure Python with CBC bundled, so one
#     py3-none-any wheel fits; the platform tags are given anyway so pip never picks an sdist.
# Pinned to the version this repo's venv tests with. Usage (repo root):  bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PULP_VERSION="${PULP_VERSION:-$("$PY" -c 'import pulp; print(pulp.__version__)' 2>/dev/null || echo 3.3.2)}"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .whl "pulp==${PULP_VERSION}"
ls -l .whl
