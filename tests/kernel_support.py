"""Shared helpers for the kernel tests: build a generated module, run it, compare against float64."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import torch

import patterncc
from patterncc.compiler import compile_pattern, import_file
from patterncc.reference import masked_attention, module_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py before triton is imported


def build(pattern: patterncc.ir.Pattern, folder: Path, layer: int = 0):
    """Generate, write and import a pattern's module (its kernels run in the interpreter when INTERPRETING)."""
    compiled = compile_pattern(pattern, layer=layer)
    path = folder / f"{compiled.module_name}_{uuid.uuid4().hex[:8]}.py"
    path.write_text(compiled.source)
    return import_file(path, f"patterncc_test_{path.stem}")


def make_inputs(batch, q_heads, kv_heads, n, dim, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (batch, q_heads, n, dim), (batch, kv_heads, n, dim)
    q = torch.randn(shape_q, generator=generator).to(dtype).to(device)
    k = torch.randn(shape_kv, generator=generator).to(dtype).to(device)
    v = torch.randn(shape_kv, generator=generator).to(dtype).to(device)
    grad = torch.randn(shape_q, generator=generator).to(dtype).to(device)
    return q, k, v, grad


def _forward_backward(fn, q, k, v, grad):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check_against_reference(module, pattern, n, dim, dtype=torch.float32, backend="torch", batch=1,
                            head_multiple=1, kv_heads=None, layer=0, factor=10.0, device="cpu"):
    """Compare output and every gradient with float64 masked attention.

    Tolerance (FlexAttention's rule): the kernel's max error against the float64 result must be at most
    `factor` times the error of the same dense computation done eagerly in the kernel's dtype (plus 1e-7 for
    tensors the eager computation gets exactly right, e.g. all-zero gradients of keys no query sees).
    """
    heads = module.NUM_HEADS * head_multiple
    kv = kv_heads or heads
    q, k, v, grad = make_inputs(batch, heads, kv, n, dim, dtype, device=device)
    mask = pattern.mask(n, layer=layer)
    scale = 1.0 / math.sqrt(dim)
    golden = _forward_backward(lambda a, b, c: masked_attention(a, b, c, mask, scale), q.double(), k.double(),
                               v.double(), grad.double())
    eager = _forward_backward(lambda a, b, c: masked_attention(a, b, c, mask, scale, dtype=None), q, k, v, grad)
    tested = _forward_backward(lambda a, b, c: module.attention(a, b, c, backend=backend), q, k, v, grad)
    for name in ("out", "dq", "dk", "dv"):
        got = tested[name]
        assert got.shape == golden[name].shape, f"{name}: shape {tuple(got.shape)} != {tuple(golden[name].shape)}"
        assert not torch.isnan(got).any(), f"{name}: NaN in kernel result"
        kernel_err = (got.double() - golden[name]).abs().max().item()
        eager_err = (eager[name].double() - golden[name]).abs().max().item()
        bound = factor * eager_err + 1e-7
        assert kernel_err <= bound, (f"{name}: max error {kernel_err:.3e} exceeds {factor} x eager "
                                     f"{dtype} error {eager_err:.3e} (n={n}, d={dim}, backend={backend})")


def assert_rms_close(name, got, want, ratio):
    """RMS of the error relative to the RMS of the float64 result (flash-linear-attention's check)."""
    if want is None:  # an input no head reads (k when every head hashes with shared_qk)
        assert got is None or not got.any(), f"{name}: gradient of an input no head reads"
        return
    assert got is not None, f"{name}: no gradient"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    error = (got.double() - want).pow(2).mean().sqrt().item()
    scale = want.pow(2).mean().sqrt().item() + 1e-12
    assert error <= ratio * scale, f"{name}: RMS error {error:.3e} > {ratio} x RMS {scale:.3e}"


def family_results(module, pattern, n, dim, dtype, backend, head_multiple=1, kv_divisor=1, layer=0,
                   device="cpu"):
    """(tested, golden): output and q/k/v gradients of a generated module (any head families) and of
    `module_reference` in float64, from the same inputs and the module's seeded buffers."""
    heads = module.NUM_HEADS * head_multiple
    q, k, v, grad = make_inputs(2, heads, heads // kv_divisor, n, dim, dtype, device=device)
    scale = 1.0 / math.sqrt(dim)
    buffers = {name: value.to(device) for name, value in module.default_buffers(dim).items()}
    tested = _forward_backward(lambda a, b, c: module.attention(a, b, c, backend=backend, buffers=buffers), q, k,
                               v, grad)
    golden = _forward_backward(lambda a, b, c: module_reference(module, pattern, a, b, c, buffers, scale, layer),
                               q.double(), k.double(), v.double(), grad.double())
    return tested, golden
