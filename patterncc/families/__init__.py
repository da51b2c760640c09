"""Kernel families: one folder per way of computing attention heads, each real, importable Python.

- `blocksparse/`: set heads (a connectivity pattern): block-sparse FlashAttention over tile lists built in
  closed form, a torch CPU path, and `naive.py`, dense masked attention in float64;
- `lsh/`: hashed heads (Reformer LSH attention);
- `linear/`: kernel heads (linear attention with a feature map);
- `shared/`: what every family uses once: kernel launching with spill-free config chains, input checks,
  ahead-of-time signatures, and the Triton helpers (online softmax, floor division).

Each family has `kernels.py` (its `@triton.jit` functions), `ops.py` (launchers, autograd, public entry point,
ahead-of-time specs), a torch CPU path and `naive.py` (the float64 reference the tests compare against). Generated
modules are assembled from these files (`patterncc.codegen.assemble`): only the definitions a pattern uses are
copied, so a generated file imports only torch and triton.
"""

__all__: list[str] = []
