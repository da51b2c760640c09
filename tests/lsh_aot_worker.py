"""Compile every LSH kernel ahead of time for one CUDA capability (run as a subprocess, TRITON_INTERPRET=0).

Prints one JSON line per (kernel, dtype, head_dim, variant): registers, spills and shared memory of the first
config of the kernel's chain that does not spill, as the module picks on a GPU.
"""

from __future__ import annotations

import json
import sys

# (rounds, causal, shared_qk) of the kernels' constexprs: the heaviest predicate, and the lightest.
VARIANTS = {"R4-causal-shared": (4, True, True), "R1-bidir-qk": (1, False, False)}


def main(capability: int) -> None:
    import triton
    from lsh_support import build_module
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from patterncc.compiler import ptxas_stats

    module = build_module()
    target = GPUTarget("cuda", capability, 32)
    for variant, (rounds, causal, shared_qk) in VARIANTS.items():
        for dtype in ("fp16", "bf16", "fp32"):
            for head_dim in (16, 32, 64, 128):
                for name, kernel, signature, configs in module.lsh_aot_specs(dtype, head_dim, rounds, causal,
                                                                              shared_qk):
                    for tried, (constexprs, options) in enumerate(configs, start=1):
                        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                        compiled = triton.compile(source, target=target, options=options)
                        stats = ptxas_stats(compiled.asm["ptx"], capability)
                        if not (stats["spill_stores"] or stats["spill_loads"]):
                            break
                    config = (constexprs["BLOCK_M"], constexprs["BLOCK_N"], options["num_warps"],
                              options["num_stages"])
                    print(json.dumps(dict(kernel=name, dtype=dtype, head_dim=head_dim, target=f"sm_{capability}",
                                          variant=variant, config=config, configs_tried=tried,
                                          shared_bytes=compiled.metadata.shared, **stats)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
