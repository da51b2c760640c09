#!/usr/bin/env bash
# Verify patterncc on a lent GPU machine in one command, under 9 minutes (the logic is in gpu_check.py):
#   bash scripts/gpu_check.sh              on the GPU machine (carry scripts/gpu_wheels: README, "On a GPU")
#   bash scripts/gpu_check.sh --dry-run    here, without a GPU: what it would run, with every step that needs none
# Results: $OUT (default: a temporary folder); `--help` lists the options. PYTHON picks the interpreter (default:
# .venv/bin/python where it exists, else python3, which on the GPU machine is the one holding torch and triton).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
