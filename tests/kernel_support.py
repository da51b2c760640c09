"""Shared helpers for the kernel tests: build a generated module, run it, compare against float64."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import pytest
import torch
from tolerance import assert_within_eager_error, forward_backward

import patterncc
from patterncc.cache import import_file
from patterncc.driver import compile_pattern
from patterncc.families.blocksparse.naive import masked_attention
from patterncc.mask import pattern_mask
from patterncc.reference import module_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py before triton is imported


def build(pattern: patterncc.ir.Pattern, folder: Path, layer: int = 0):
    """Generate, write and import a pattern's module (its kernels run in the interpreter when INTERPRETING)."""
    compiled = compile_pattern(pattern, layer=layer)
    path = folder / f"{compiled.module_name}_{uuid.uuid4().hex[:8]}.py"
    path.write_text(compiled.source)
    return import_file(path, f"patterncc_test_{path.stem}")


def brute_force_classes(mask: torch.Tensor, positions, block: int) -> torch.Tensor:
    """EMPTY / PARTIAL / FULL of every tile of a dense [n, n] mask visited in `positions` order (None: natural),
    counted pair by pair; a tile holding padding past n is never FULL."""
    from patterncc.runtime import tiles

    n = mask.shape[0]
    if positions is not None:
        mask = mask[positions][:, positions]
    t = -(-n // block)
    padded = torch.zeros(t * block, t * block, dtype=torch.int64)
    padded[:n, :n] = mask
    counts = padded.view(t, block, t, block).sum(dim=(1, 3))
    real = torch.zeros(t * block, dtype=torch.int64)
    real[:n] = 1
    sizes = real.view(t, block).sum(1)
    classes = torch.full((t, t), tiles.PARTIAL, dtype=torch.int8)
    classes[counts == 0] = tiles.EMPTY
    classes[(counts == sizes[:, None] * sizes[None, :]) & (sizes[:, None] == block) & (sizes[None, :] == block)] = \
        tiles.FULL
    return classes


def dense_masks(module, pattern, n: int, layer: int = 0) -> dict[int, torch.Tensor]:
    """Each mask of a generated module as a dense [n, n] bool mask: a head's whole mask from `pattern_mask` (the IR
    evaluated independently of the module), the parts of a split head from the module's `mask_allowed` after
    checking that they are disjoint and that their union is the head's mask."""
    masks = pattern_mask(pattern, n, layer)
    pos = torch.arange(n)
    tables = module.random_tables(n)
    out = {}
    for slot, parts in enumerate(module.HEAD_MASKS):
        head_mask = masks[module.SET_HEADS[slot]]
        if len(parts) == 1:
            out[parts[0]] = head_mask
            continue
        union = torch.zeros(n, n, dtype=torch.bool)
        for mask_index in parts:
            part = module.mask_allowed(mask_index, pos[:, None], pos[None, :], n, tables)
            assert not (union & part).any(), f"parts {parts} of set head {slot} overlap"
            union |= part
            out[mask_index] = part
        assert torch.equal(union, head_mask), f"parts {parts} of set head {slot} are not its mask"
    return out


def assert_layout_exact(module, pattern, n: int, layer: int = 0, context: str = ""):
    """The tile classes a generated module's layout uses at n (in the order it chose per mask) equal brute force."""
    if not getattr(module, "NUM_MASKS", 0):
        return
    layout = module.get_layout(n, "cpu")
    for mask_index, dense in dense_masks(module, pattern, n, layer).items():
        positions = layout.positions_cpu[mask_index]
        want = brute_force_classes(dense, positions, module.BLOCK)
        where = f"{context} n={n} mask {mask_index} ({'transposed' if positions is not None else 'natural'} order)"
        assert torch.equal(layout.classes[mask_index], want), f"inexact tile classes: {where}"


def make_inputs(batch, q_heads, kv_heads, n, dim, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (batch, q_heads, n, dim), (batch, kv_heads, n, dim)
    q = torch.randn(shape_q, generator=generator).to(dtype).to(device)
    k = torch.randn(shape_kv, generator=generator).to(dtype).to(device)
    v = torch.randn(shape_kv, generator=generator).to(dtype).to(device)
    grad = torch.randn(shape_q, generator=generator).to(dtype).to(device)
    return q, k, v, grad


def check_against_reference(module, pattern, n, dim, dtype=torch.float32, backend="torch", batch=1,
                            head_multiple=1, kv_heads=None, layer=0, factor=10.0, device="cpu"):
    """Compare output and every gradient with float64 masked attention: tests/tolerance.py's max-error rule
    (floor 1e-7, for tensors the eager computation gets exactly right, e.g. all-zero gradients of keys no query
    sees)."""
    heads = module.NUM_HEADS * head_multiple
    kv = kv_heads or heads
    q, k, v, grad = make_inputs(batch, heads, kv, n, dim, dtype, device=device)
    mask = pattern_mask(pattern, n, layer=layer)
    scale = 1.0 / math.sqrt(dim)
    golden = forward_backward(lambda a, b, c: masked_attention(a, b, c, mask, scale), q.double(), k.double(),
                              v.double(), grad.double())
    eager = forward_backward(lambda a, b, c: masked_attention(a, b, c, mask, scale, dtype=None), q, k, v, grad)
    tested = forward_backward(lambda a, b, c: module.attention(a, b, c, backend=backend), q, k, v, grad)
    assert_within_eager_error(tested, golden, eager, factor, 1e-7, f"n={n}, d={dim}, backend={backend}")


def family_results(module, pattern, n, dim, dtype, backend, head_multiple=1, kv_divisor=1, layer=0,
                   device="cpu"):
    """(tested, golden): output and q/k/v gradients of a generated module (any head families) and of
    `module_reference` in float64, from the same inputs and the module's seeded buffers."""
    heads = module.NUM_HEADS * head_multiple
    q, k, v, grad = make_inputs(2, heads, heads // kv_divisor, n, dim, dtype, device=device)
    scale = 1.0 / math.sqrt(dim)
    # Modules with random draws (hashed or FAVOR+ heads) take them as `buffers`; the others have none.
    has_buffers = hasattr(module, "default_buffers")
    buffers = {name: value.to(device) for name, value in module.default_buffers(dim).items()} if has_buffers else {}
    extra = {"buffers": buffers} if has_buffers else {}
    tested = forward_backward(lambda a, b, c: module.attention(a, b, c, backend=backend, **extra), q, k, v, grad)
    golden = forward_backward(lambda a, b, c: module_reference(module, pattern, a, b, c, buffers, scale, layer),
                               q.double(), k.double(), v.double(), grad.double())
    return tested, golden


# Whole modules against their float64 references: the torch path in float64 (the same math: agreement to
# rounding) and the Triton kernels under the interpreter in float32; RMS error bounds (tolerance.assert_rms_close).
MODULE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
torch_and_interpreter = pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)],
                                                ids=["torch-fp64", "triton-fp32"])
