"""Shared helpers for the kernel-head (linear attention) tests: a generated module holding the kernel-head
sections, and comparisons against the float64 reference."""

from __future__ import annotations

from pathlib import Path

import torch
from tolerance import assert_within_eager_error, forward_backward

from patterncc.families.linear.naive import linear_reference


def build_linear_module(folder: Path | None = None):
    """The kernel-head family itself (patterncc.families.linear.ops), whose functions take the feature map and
    causality as arguments; generated modules copy these same definitions. `folder` is unused."""
    from patterncc.families.linear import ops

    return ops


def make_inputs(batch, heads, n, dim, dtype, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(batch, heads, n, dim, generator=generator) * s for s in (scale, scale, 1.0, 1.0))
    return q.to(dtype), k.to(dtype), v.to(dtype), grad.to(dtype)


def check_linear(module, feature_map, causal, n, dim, dtype=torch.float32, backend="torch", batch=1, heads=2,
                 features=32, eps=1e-6, factor=10.0, floor=None, seed=0):
    """Compare output and every gradient with the float64 reference, by tests/tolerance.py's max-error rule. The
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
    assert_within_eager_error(tested, golden, eager, factor, floor,
                              f"{feature_map}, causal={causal}, n={n}, d={dim}, backend={backend}", dtype=dtype)
    return tested
