"""Compile kernels ahead of time for CUDA targets (run as a subprocess, without TRITON_INTERPRET):

    python tests/aot_worker.py SOURCE CAPABILITY [CAPABILITY ...] [--dtypes fp16,bf16] [--head-dims 64] [--dropout]

SOURCE is an .attn file (every kernel of each of its patterns' generated modules), `family:lsh` (every LSH kernel,
for the heaviest and the lightest predicate; with --dropout, the heaviest), `family:linear` (every linear-attention
kernel variant: each feature map, causal and bidirectional) or `family:decode` (the set heads' split-K decode
kernel). Prints one JSON
line per kernel: its name, dtype, head_dim, target, registers, spills, shared memory and the config used (the
first of its chain that does not spill, as the module picks on a GPU), with `example` or `variant` saying where
it came from. conftest.run_aot_worker runs it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# LSH (rounds, causal, shared_qk) constexprs: the heaviest predicate, and the lightest.
LSH_VARIANTS = {"R4-causal-shared": (4, True, True), "R1-bidir-qk": (1, False, False)}


def _reports(source: str, capability: int, dtypes: tuple, head_dims: tuple, dropout: bool = False):
    from patterncc.aot import aot_compile, module_aot_specs

    if source == "family:lsh":
        from patterncc.families.lsh import ops

        # With dropout, the heaviest predicate only: Philox adds the same work to every variant.
        variants = dict(list(LSH_VARIANTS.items())[:1]) if dropout else LSH_VARIANTS
        for variant, (rounds, causal, shared_qk) in variants.items():
            def specs(dtype, head_dim, rounds=rounds, causal=causal, shared_qk=shared_qk):
                return ops.lsh_aot_specs(dtype, head_dim, rounds, causal, shared_qk, dropout=dropout)

            for report in aot_compile(ops, capability, dtypes, head_dims, specs=specs):
                yield dict(report.__dict__, variant=variant, dropout=dropout)
    elif source == "family:decode":
        from patterncc.families.blocksparse import decode

        for report in aot_compile(decode, capability, dtypes, head_dims, specs=decode.blocksparse_decode_aot_specs):
            yield dict(report.__dict__, variant="decode")
    elif source == "family:linear":
        from patterncc.families.linear import ops

        for report in aot_compile(ops, capability, dtypes, head_dims, specs=ops.linear_aot_specs):
            yield dict(report.__dict__, variant="linear")
    else:
        import tempfile

        import patterncc
        from patterncc.cache import import_file
        from patterncc.driver import compile_pattern

        for name in patterncc.parse_all(source):
            compiled = compile_pattern(patterncc.parse(source, pattern=name))
            module_path = Path(tempfile.mkdtemp()) / f"{compiled.module_name}.py"
            module_path.write_text(compiled.source)
            module = import_file(module_path, f"aot_{compiled.module_name}_{compiled.key}")
            specs = module_aot_specs(module, dropout=True) if dropout else None
            for report in aot_compile(module, capability, dtypes, head_dims, specs=specs):
                yield dict(report.__dict__, example=Path(source).stem, dropout=dropout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("capabilities", nargs="+", type=int)
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="16,32,64,128")
    parser.add_argument("--dropout", action="store_true",
                        help="the attention-dropout kernels (an .attn file's set heads, or family:lsh)")
    args = parser.parse_args()
    dtypes = tuple(args.dtypes.split(","))
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    for capability in args.capabilities:
        for report in _reports(args.source, capability, dtypes, head_dims, args.dropout):
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
