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
    from lsh_support import build_module

    from patterncc.compiler import aot_compile

    module = build_module()
    for variant, (rounds, causal, shared_qk) in VARIANTS.items():
        def specs(dtype, head_dim, rounds=rounds, causal=causal, shared_qk=shared_qk):
            return module.lsh_aot_specs(dtype, head_dim, rounds, causal, shared_qk)

        for report in aot_compile(module, capability, specs=specs):
            print(json.dumps(dict(report.__dict__, variant=variant)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
