"""Compile every kernel of one example ahead of time (run as a subprocess, without TRITON_INTERPRET).

Prints one JSON line per kernel: example, kernel, dtype, head_dim, target, registers, spills, shared memory.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import patterncc
from patterncc.compiler import aot_compile, compile_pattern, import_file


def main(path: str, capabilities: list[int]) -> None:
    for name in patterncc.parse_all(path):
        compiled = compile_pattern(patterncc.parse(path, pattern=name))
        module_path = Path(tempfile.mkdtemp()) / f"{compiled.module_name}.py"
        module_path.write_text(compiled.source)
        module = import_file(module_path, f"aot_{compiled.module_name}_{compiled.key}")
        for capability in capabilities:
            for report in aot_compile(module, capability):
                print(json.dumps({"example": Path(path).stem, **report.__dict__}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(c) for c in sys.argv[2:]])
