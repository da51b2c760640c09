"""Compile every kernel of one example ahead of time (run as a subprocess, without TRITON_INTERPRET).

    python tests/aot_worker.py EXAMPLE.attn 90 80 [--dtypes fp16,bf16] [--head-dims 64]

Prints one JSON line per kernel: example, kernel, dtype, head_dim, target, registers, spills, shared memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import patterncc
from patterncc.compiler import aot_compile, compile_pattern, import_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("capabilities", nargs="+", type=int)
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="16,32,64,128")
    args = parser.parse_args()
    dtypes = tuple(args.dtypes.split(","))
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    for name in patterncc.parse_all(args.path):
        compiled = compile_pattern(patterncc.parse(args.path, pattern=name))
        module_path = Path(tempfile.mkdtemp()) / f"{compiled.module_name}.py"
        module_path.write_text(compiled.source)
        module = import_file(module_path, f"aot_{compiled.module_name}_{compiled.key}")
        for capability in args.capabilities:
            for report in aot_compile(module, capability, dtypes=dtypes, head_dims=head_dims):
                print(json.dumps({"example": Path(args.path).stem, **report.__dict__}), flush=True)


if __name__ == "__main__":
    main()
