#!/usr/bin/env bash
# Download, once, the wheels that scripts/gpu_check.sh installs on the GPU machine, which has torch and triton but
# no lark and reaches no package registry. Pure-Python wheels only (--only-binary, py3-none-any), without their
# dependencies (--no-deps), so torch and triton are never replaced: each dependency the machine lacks is named
# here instead. The machine already has transformers (fla's layers) and packaging (colt5-attention).
#
#   bash scripts/download_gpu_wheels.sh        # -> scripts/gpu_wheels/ (git-ignored; about 1.8 MB)
#
# Then carry the folder to the GPU machine: the device tool's run with carry ["scripts/gpu_wheels"] (README, "On a GPU").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/scripts/gpu_wheels"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

WHEELS=(
    lark==1.3.1                          # patterncc's parser
    reformer-pytorch==1.4.4              # bench/lsh_attention.py's peer, and what it imports:
    axial-positional-embedding==0.3.12
    local-attention==1.11.2
    hyper-connections==0.4.11            #   (local-attention's)
    torch-einops-utils==0.2.0            #   (hyper-connections')
    product-key-memory==0.3.0
    colt5-attention==0.11.2              #   (product-key-memory's)
    einops==0.8.1                        #   (all of the above; the machine's may be older)
    flash-linear-attention==0.6.0        # bench/linear_attention.py's peer (fla.layers, fla.models)
    fla-core==0.6.0                      #   fla.ops, which holds chunk_linear_attn
)

mkdir -p "$DEST"
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
    -d "$DEST" "${WHEELS[@]}"
# One version of each package: two would make the install on the GPU machine fail.
ls "$DEST"/*.whl | sed 's#.*/##; s/-[0-9].*//' | sort | uniq -d | while read -r twice; do
    echo "download_gpu_wheels.sh: more than one wheel of $twice in $DEST: keep one" >&2
    exit 1
done
du -sh "$DEST"
ls "$DEST"
