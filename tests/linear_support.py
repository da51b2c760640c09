"""Shared helpers for the kernel-head (linear attention) tests: a generated module holding the kernel-head
sections, and comparisons against the float64 reference."""

from __future__ import annotations

from pathlib import Path

import torch
from kernel_support import build

import patterncc
from patterncc.reference_linear import linear_reference


def build_linear_module(folder: Path):
    """A module generated from a pattern with one kernel head: it holds the kernel-head sections exactly as
    every generated module does (their functions take the feature map and causality as arguments)."""
    return build(patterncc.parse("pattern linear_sections() { head a = kernel(elu1) }"), folder)


def make_inputs(batch, heads, n, dim, dtype, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(batch, heads, n, dim, generator=generator) * s for s in (scale, scale, 1.0, 1.0))
    return q.to(dtype), k.to(dtype), v.to(dtype), grad.to(dtype)


def forward_backward(fn, q, k, v, grad):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check_linear(module, feature_map, causal, n, dim, dtype=torch.float32, backend="torch", batch=1, heads=2,
                 features=32, eps=1e-6, factor=10.0, floor=None, seed=0):
    """Compare output and every gradient with the float64 reference.

    Tolerance: max error vs float64 <= factor x (max error of the reference computed in `dtype`) + floor. The
    floor (default 1e-6 in fp32) covers tensors the eager computation gets nearly exactly right by chance,
    e.g. relu rows whose features are all 0 (their output and gradients are exactly 0 in every dtype): a
    few fp32 roundings of O(1) values.
    """
    q, k, v, grad = make_inputs(batch, heads, n, dim, dtype, seed=seed)
    projection = module.linear_favor_projection(heads, features, dim, seed) if feature_map == "favor" else None
    if floor is None:
        floor = 1e-6 if dtype == torch.float32 else 1e-3

    def reference(dtype_):
        return lambda a, b, c: linear_reference(a, b, c, feature_map, eps, causal, projection, dtype=dtype_)

    golden = forward_backward(reference(torch.float64), q.double(), k.double(), v.double(), grad.double())
    eager = forward_backward(reference(None), q, k, v, grad)
    tested = forward_backward(lambda a, b, c: module.linear_attention(a, b, c, feature_map, eps, causal, projection,
                                                                      backend=backend), q, k, v, grad)
    for name in ("out", "dq", "dk", "dv"):
        got = tested[name]
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        assert got.shape == golden[name].shape, f"{name}: shape {tuple(got.shape)} != {tuple(golden[name].shape)}"
        assert torch.isfinite(got).all(), f"{name}: non-finite values in the {backend} result"
        err = (got.double() - golden[name]).abs().max().item()
        eager_err = (eager[name].double() - golden[name]).abs().max().item()
        bound = factor * eager_err + floor
        assert err <= bound, (f"{name}: max error {err:.3e} exceeds {factor} x eager {dtype} error {eager_err:.3e} "
                              f"+ {floor:g} ({feature_map}, causal={causal}, n={n}, d={dim}, backend={backend})")
    return tested
