#!/usr/bin/env bash
# Set up from nothing and run something:
#   bash scripts/dev.sh demo           check and draw every example (pictures in out/), compile every example
#                                      into out/kernels/, run two on the CPU, and train a small language model
#                                      with patterncc attention against dense attention (out/train_lm.png)
#   bash scripts/dev.sh test [ARGS]    run the tests (ARGS go to pytest)
#
# Setup: a virtual environment in .venv, torch only when it is missing (pinned to the CPU wheel: an unpinned
# `torch` pulls several GB of CUDA packages), then patterncc in editable mode with its test extras. Each step is
# skipped when it is already done, so a second run goes straight to the work. PYTHON picks the interpreter that
# creates .venv (default python3, which must be 3.10 or newer).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH="torch==2.13.0"
STAMP="$VENV/.patterncc-installed"  # what the editable install was made from

say() { printf 'dev.sh: %s\n' "$*" >&2; }
pip_quiet() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

setup() {
    if [ ! -x "$PY" ]; then
        local python="${PYTHON:-python3}"
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            say "patterncc needs Python 3.10 or newer; $python is $("$python" --version 2>&1 || echo missing)"
            say "set PYTHON to a newer interpreter, e.g. PYTHON=python3.11 bash scripts/dev.sh $COMMAND"
            exit 1
        fi
        say "creating the virtual environment .venv"
        "$python" -m venv "$VENV"
    fi
    if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
        say "installing $TORCH (CPU)"
        pip_quiet install "$TORCH"
    fi
    # Reinstall when pyproject.toml changed, or when .venv's patterncc is not this checkout's (a moved clone).
    local want
    want="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        "$ROOT/pyproject.toml") $ROOT"
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || [ ! -x "$VENV/bin/patterncc" ] \
        || ! (cd / && "$PY" -c 'import sys, pytest, hypothesis, patterncc
sys.exit(not patterncc.__file__.startswith(sys.argv[1]))' "$ROOT/patterncc/") >/dev/null 2>&1; then
        say "installing patterncc (editable) and its test dependencies"
        pip_quiet install -e "$ROOT[test]"
        echo "$want" >"$STAMP"
    fi
}

demo() {
    setup
    mkdir -p "$ROOT/out"
    cd "$ROOT"
    for file in examples/*.attn; do
        name="$(basename "$file" .attn)"
        say "patterncc check $file --n 4096"
        "$VENV/bin/patterncc" check "$file" --n 4096
        say "patterncc show $file --n 1024 --grid 32 -o out/$name.png"
        "$VENV/bin/patterncc" show "$file" --n 1024 --grid 32 -o "out/$name.png"
    done
    say "pictures are in out/"
    for file in examples/*.attn; do
        say "patterncc compile $file -o out/kernels"
        "$VENV/bin/patterncc" compile "$file" -o out/kernels
    done
    say "running out/kernels/strided.py and out/kernels/hybrid.py on the CPU"
    "$PY" examples/run_on_cpu.py out/kernels/strided.py examples/strided.attn --n 2048
    "$PY" examples/run_on_cpu.py out/kernels/hybrid.py examples/hybrid.attn --n 2048
    say "training a small language model with patterncc's strided attention and with dense attention"
    "$PY" examples/train_lm.py --steps 300 -o "$ROOT/out/train_lm.png"
}

run_tests() {
    setup
    cd "$ROOT"
    say "running the tests"
    local status=0
    "$PY" -m pytest -q "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        say "pytest collected no tests: that is a failure here"
    elif [ "$status" -ne 0 ]; then
        say "tests failed (pytest exit status $status)"
    fi
    return "$status"
}

COMMAND="${1:-}"
case "$COMMAND" in
    demo) demo ;;
    test) shift; run_tests "$@" ;;
    *)
        echo "usage: bash scripts/dev.sh demo | test [pytest arguments]" >&2
        exit 2
        ;;
esac
