"""Kernel launching, config chains, input checks and ahead-of-time signatures, shared by every kernel family.

A config is (BLOCK_M, BLOCK_N, num_warps, num_stages). Each kernel has a chain of configs, the first its family's
spill-free default; on CUDA the first config of the chain that compiles without register spills is used, then
(once per shape) the fastest of that and a few spill-free candidates. Under the interpreter, or for a kernel in
CONFIG_OVERRIDE, the chain's first config runs as is.
"""

from __future__ import annotations

import inspect
import os

import torch

try:
    import triton
except ImportError:  # the CPU paths need only torch
    triton = None

CONFIG_OVERRIDE = {}  # kernel name -> config, for tests and tuning
# When a default config spills registers, the next of these that is no larger is tried (each smaller; none with
# num_stages=1, which Triton's pipeliner cannot build for these loops).
FALLBACK_CONFIGS = [(32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 8, 2), (16, 16, 4, 2)]
BACKENDS = ("auto", "triton", "torch")
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # head dims every family's Triton kernels take
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SPILL_FREE = {}
_CHOSEN = {}


def dot_precision(dtype):
    # fp32 inputs get exact fp32 products (IEEE), not TF32: a user choosing fp32 asks for its accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def config_chain(name, first, limit=None):
    """The configs of kernel `name` to try in order: CONFIG_OVERRIDE's, or `first` then every fallback whose tile
    is no larger (tiles clipped to `limit`, e.g. the layout block)."""
    if name in CONFIG_OVERRIDE:
        return [CONFIG_OVERRIDE[name]]
    chain = [first]
    for block_m, block_n, warps, stages in FALLBACK_CONFIGS:
        if limit is not None:
            block_m, block_n = min(block_m, limit), min(block_n, limit)
        config = (block_m, block_n, warps, stages)
        if block_m * block_n <= first[0] * first[1] and config not in chain:
            chain.append(config)
    return chain


def _compiles_without_spills(kernel, grid, args, constexprs, config):
    block_m, block_n, warps, stages = config
    try:
        compiled = kernel.warmup(*args, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                 num_stages=stages, grid=grid(block_m, block_n))
        compiled._init_handles()  # loads the binary: sets n_spills, raises if shared memory does not fit
    except Exception:  # out of resources on this card: not usable here
        return False
    return compiled.n_spills == 0


def launch_kernel(name, kernel, grid, args, constexprs, q, chain, candidates=()):
    """Run `kernel` with `grid(BLOCK_M, BLOCK_N)`: on CUDA the first spill-free config of `chain`, then (once
    per shape) the fastest of that and the spill-free `candidates`, which are timed on the call's own arguments
    (so a kernel that updates a buffer in place must pass none); elsewhere the chain's first config."""
    if name in CONFIG_OVERRIDE:
        return _run_kernel(kernel, grid, args, constexprs, CONFIG_OVERRIDE[name])
    config = chain[0]
    if q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # Per kernel variant: its constexprs (dropout or not, ...) change its register needs.
        base = (name, q.dtype, q.shape[-1], tuple(sorted(constexprs.items())))
        if base not in _SPILL_FREE:
            _SPILL_FREE[base] = next((c for c in chain if _compiles_without_spills(kernel, grid, args, constexprs, c)),
                                     chain[-1])
        config = _SPILL_FREE[base]
        key = (*base, q.shape[2], q.shape[0] * q.shape[1])
        others = [c for c in candidates if c != config]
        # Timing reruns the kernel on the live arguments: only kernels that write nothing they read take
        # candidates (not the linear scans, which update their states in place), and with none there is no choice.
        if others and os.environ.get("PATTERNCC_AUTOTUNE", "1") != "0" and key not in _CHOSEN:
            best, best_ms = config, float("inf")
            for candidate in [config] + others:
                try:
                    if not _compiles_without_spills(kernel, grid, args, constexprs, candidate):
                        continue
                    ms = triton.testing.do_bench(lambda: _run_kernel(kernel, grid, args, constexprs, candidate),
                                                 warmup=3, rep=10)
                except Exception:  # e.g. out of shared memory on this card: not a candidate here
                    continue
                if ms < best_ms:
                    best, best_ms = candidate, ms
            _CHOSEN[key] = best
        config = _CHOSEN.get(key, config)
    return _run_kernel(kernel, grid, args, constexprs, config)


def _run_kernel(kernel, grid, args, constexprs, config):
    block_m, block_n, warps, stages = config
    return kernel[grid(block_m, block_n)](*args, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n,
                                          num_warps=warps, num_stages=stages)


def uses_triton(q, backend):
    """Whether a call runs the Triton kernels: backend "triton", or "auto" on CUDA."""
    return backend == "triton" or (backend == "auto" and q.is_cuda)


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def check_4d(**tensors):
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, n, head_dim), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def check_one_shape(**tensors):
    """The inputs of families whose kernels take no grouped-query attention (hashed and kernel heads): 4-D
    tensors of one shape, one floating-point dtype and one device, with a positive sequence length."""
    check_4d(**tensors)
    (first_name, first), *others = tensors.items()
    for name, x in others:
        if x.shape != first.shape:
            raise ValueError(f"q, k, v must have one shape (expand grouped-query heads first), got {first_name} "
                             f"{tuple(first.shape)} and {name} {tuple(x.shape)}")
    for name, x in tensors.items():
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point (float16, bfloat16, float32 or float64), got {x.dtype}")
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"{first_name} and {name} must have one dtype and device, got {first.dtype} on "
                             f"{first.device} and {x.dtype} on {x.device}")
    if first.shape[2] == 0:
        raise ValueError("the sequence length must be positive")


def check_triton_inputs(q, head_dims):
    """What every family's Triton kernels need of q (k and v were checked against q)."""
    if triton is None:
        raise RuntimeError("backend 'triton' needs the triton package")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1 (set before importing "
                         "triton); use backend 'torch' on the CPU")
    if q.shape[3] not in head_dims:
        raise ValueError(f"the Triton kernels take head_dim in {head_dims}, got {q.shape[3]}")
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")


AOT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def aot_signature(kernel, dtype, pointers=None, floats=(), int64s=()):
    """A kernel's signature for triton.compile, read off its parameters by the kernels' naming convention:
    upper-case names are pointers to `dtype` ("fp16", ...) unless `pointers` gives another type (another
    pointer, or a scalar such as NUM_BLOCKS: "i32"), lower-case names are int32 unless listed in `floats` (fp32)
    or `int64s`, constexprs are "constexpr"."""
    pointers = pointers or {}
    signature = {}
    # The Python function's own parameters: the same under the compiler (JITFunction.fn) and the interpreter.
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(getattr(param.annotation, "__name__", param.annotation)):
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = pointers.get(name, "*" + dtype)
        else:
            signature[name] = "fp32" if name in floats else "i64" if name in int64s else "i32"
    return signature


def aot_configs(chain, constexprs):
    """[(constexprs, options)] for each config of a chain, as `patterncc compile --target` tries them."""
    return [(dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n), dict(num_warps=warps, num_stages=stages))
            for block_m, block_n, warps, stages in chain]
