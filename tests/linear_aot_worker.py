"""Compile every kernel-head (linear attention) kernel ahead of time for one target (run as a subprocess,
without TRITON_INTERPRET): `python linear_aot_worker.py CAPABILITY DTYPES HEAD_DIMS`, e.g.
`python linear_aot_worker.py 90 fp16,bf16,fp32 16,32,64,128`.

Prints one JSON line per kernel variant: kernel, dtype, head_dim, target, registers, spills, shared memory, the
config used (the first of its chain that does not spill, as `_launch` picks on a GPU) and how many were tried.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from linear_support import build_linear_module

from patterncc.compiler import ptxas_stats


def main(capability: int, dtypes: list[str], head_dims: list[int]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = build_linear_module(Path(tempfile.mkdtemp()))
    target = GPUTarget("cuda", capability, 32)
    for dtype in dtypes:
        for head_dim in head_dims:
            for name, kernel, signature, configs in module.linear_aot_specs(dtype, head_dim):
                for tried, (constexprs, options) in enumerate(configs, start=1):
                    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                    compiled = triton.compile(source, target=target, options=options)
                    stats = ptxas_stats(compiled.asm["ptx"], capability)
                    if not (stats["spill_stores"] or stats["spill_loads"]):
                        break
                config = (constexprs["BLOCK_M"], constexprs["BLOCK_N"], options["num_warps"], options["num_stages"])
                print(json.dumps(dict(kernel=name, dtype=dtype, head_dim=head_dim, target=f"sm_{capability}",
                                      **stats, shared_bytes=compiled.metadata.shared, config=config,
                                      configs_tried=tried, chain_length=len(configs))), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(","), [int(d) for d in sys.argv[3].split(",")])
