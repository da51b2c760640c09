"""The tests' tolerance rules, in one place. Every kernel test compares outputs and q/k/v gradients against a
float64 golden result computed by the family's reference (`naive.py`), with one of two rules:

- `assert_within_eager_error` (MAX-error based): the tested tensor's largest absolute error against the golden
  result must be at most `factor` x the largest error of the same reference computed eagerly in the tested dtype,
  plus a `floor` for tensors the eager computation gets exactly right by chance (all-zero gradients, single-key
  rows). This is FlexAttention's idea of measuring against the eager computation in the same dtype (its tests use
  factor 10 for fp32 and 1.1 for fp16/bf16), but where FlexAttention compares mean errors, this rule compares
  maximum errors, which is stricter for isolated wrong elements.
- `assert_rms_close` (RMS based, flash-linear-attention's check): the RMS of the error is at most `ratio` x the RMS
  of the golden tensor; used where no eager reference in the tested dtype exists (whole generated modules).

Messages name the tensor and both numbers.
"""

from __future__ import annotations

import torch

GRADIENT_NAMES = ("out", "dq", "dk", "dv")


def forward_backward(fn, q, k, v, grad):
    """{"out", "dq", "dk", "dv"} of fn(q, k, v) with upstream gradient `grad` (None for an input no head reads)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def assert_within_eager_error(tested, golden, eager, factor, floor, where="", dtype=None):
    """The max-error rule above, for each of out, dq, dk, dv present in `golden`."""
    for name in GRADIENT_NAMES:
        want = golden[name]
        got = tested[name]
        if want is None:  # an input no head reads (k with shared_qk)
            assert got is None or not got.any(), f"{name}: gradient of an input no head reads ({where})"
            continue
        assert got is not None, f"{name}: no gradient ({where})"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)} ({where})"
        if dtype is not None:
            assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype} ({where})"
        assert torch.isfinite(got).all(), f"{name}: NaN or inf in the result ({where})"
        err = (got.double() - want).abs().max().item()
        eager_err = (eager[name].double() - want).abs().max().item()
        bound = factor * eager_err + floor
        assert err <= bound, (f"{name}: max error {err:.3e} exceeds {factor} x eager error {eager_err:.3e} + "
                              f"{floor:g} ({where})")


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
