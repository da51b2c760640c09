"""Compile every kernel-head (linear attention) kernel ahead of time for one target (run as a subprocess,
without TRITON_INTERPRET): `python linear_aot_worker.py CAPABILITY DTYPES HEAD_DIMS`, e.g.
`python linear_aot_worker.py 90 fp16,bf16,fp32 16,32,64,128`.

Prints one JSON line per kernel variant (every feature map, causal and bidirectional): registers, spills, shared
memory and the config used (the first of its chain that does not spill, as `_launch` picks on a GPU).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from linear_support import build_linear_module

from patterncc.compiler import aot_compile


def main(capability: int, dtypes: list[str], head_dims: list[int]) -> None:
    module = build_linear_module(Path(tempfile.mkdtemp()))
    for report in aot_compile(module, capability, tuple(dtypes), tuple(head_dims), specs=module.linear_aot_specs):
        print(json.dumps(report.__dict__), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(","), [int(d) for d in sys.argv[3].split(",")])
