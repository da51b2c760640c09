"""A pattern in other libraries' terms, for users migrating: FlexAttention's (mask_mod, BlockMask) and the 0/1 block
layout of DeepSpeed's sparse attention and OpenAI's blocksparse.

Both are built from patterncc's block classification (closed form over tiles, `analysis.layout.head_layout`),
with every tile it calls PARTIAL re-checked by evaluating the pattern on that tile (`tiles.refine_partial`), so
EMPTY and FULL blocks are exact, never an n x n mask. The refinement has a budget (`tiles.REFINE_BUDGET`
evaluations per head); at sequence lengths beyond it a few blocks may stay partial, which costs FlexAttention a
mask evaluation there but never changes a result. The pairs themselves come from the IR's formulas
(`mask.set_allowed`), not from generated code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import ir
from .analysis.layout import head_layout
from .api import parse
from .errors import PatternUsageError, check_positive_int
from .mask import set_allowed
from .runtime import tiles
from .semantics import bind_pattern


def _bound(pattern, n: int, params: dict) -> ir.Bound:
    """The pattern (a path, its text or a parsed one) bound at n; bind_pattern checks n."""
    if not isinstance(pattern, ir.Pattern):
        pattern = parse(pattern if isinstance(pattern, Path) else str(pattern), **params)
    elif params:
        raise PatternUsageError("parameters go to parse() when the pattern is already parsed")
    return bind_pattern(pattern, n)


def _set_heads(bound: ir.Bound, layer: int, what: str):
    """Per attention head, its (group, h) pairs; every head must be a set head (its pairs known without data)."""
    heads = bound.head_sets(layer)
    for index, pairs in enumerate(heads):
        for group, _ in pairs:
            if group.family != "set":
                raise PatternUsageError(
                    f"{what} needs set heads (pairs fixed by the pattern); head {index} (`{group.name}`) is a "
                    f"{group.family} head, whose keys depend on the data")
    return heads


def _head_allowed(bound: ir.Bound, pairs):
    """allowed(pos_i, pos_j) -> bool tensor for the union of the head's (group, h) pairs."""
    def allowed(i, j):
        out = None
        for group, h in pairs:
            member = set_allowed(group.body, {**bound.env, "h": h}, i, j, bound.n, bound.block,
                                 bound.pattern.causal)
            out = member if out is None else out | member
        return out
    return allowed


def _exact_classes(bound: ir.Bound, pairs, block: int) -> torch.Tensor:
    classes = head_layout(bound, pairs, block, block).classes
    return tiles.refine_partial(classes, _head_allowed(bound, pairs), None, bound.n, block)


def to_block_layout(pattern, n: int, block: int = 16, *, layer: int = 0, **params: int) -> torch.Tensor:
    """The pattern's block layout at sequence length n: an int64 (heads, blocks, blocks) tensor of 0 and 1, with
    blocks = ceil(n / block); layout[h, r, c] = 1 when head h lets some query of block row r attend some key of
    block column c. This is the `layout` of DeepSpeed's SparsityConfig.make_layout and of OpenAI's blocksparse
    (one layout per head, query blocks along dim 1); both expect n to be a multiple of `block` (16 by default,
    DeepSpeed's). `pattern`: a .attn path, its text, or a parsed pattern; params override its parameters."""
    check_positive_int(block, "block")
    bound = _bound(pattern, n, params)
    heads = _set_heads(bound, layer, "to_block_layout")
    return torch.stack([(_exact_classes(bound, pairs, block) != tiles.EMPTY).to(torch.int64) for pairs in heads])


def to_flex(pattern, n: int, device="cpu", *, block: int = 128, layer: int = 0, **params: int):
    """(mask_mod, block_mask) for torch.nn.attention.flex_attention at sequence length n, q and k of
    (batch, heads, n, head_dim) with heads = the pattern's head count.

    mask_mod(b, h, q_idx, kv_idx) is the pattern's predicate (head h's pairs, causality included); block_mask is
    `BlockMask.from_kv_blocks` over patterncc's exact layout at `block` (128, FlexAttention's default): FULL
    blocks skip mask_mod, PARTIAL ones evaluate it, EMPTY ones are never visited. `flex_attention(q, k, v,
    block_mask=block_mask)` then equals the patterncc module's output."""
    from torch.nn.attention.flex_attention import BlockMask

    bound = _bound(pattern, n, params)
    heads = _set_heads(bound, layer, "to_flex")
    classes = torch.stack([_exact_classes(bound, pairs, block) for pairs in heads])  # [H, q blocks, k blocks]
    allowed = [_head_allowed(bound, pairs) for pairs in heads]

    def mask_mod(b, h, q_idx, kv_idx):
        # FlexAttention pads n to its block size: clamp padding positions into range (it masks them itself).
        i, j = q_idx.clamp(max=n - 1), kv_idx.clamp(max=n - 1)
        out = allowed[0](i, j)
        for head in range(1, len(allowed)):
            out = torch.where(h == head, allowed[head](i, j), out)
        return out

    def block_lists(selected):  # counts [1, H, q blocks], indices [1, H, q blocks, k blocks] (selected first)
        counts = selected.sum(-1, dtype=torch.int32)
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None].to(device), order[None].to(device)

    partial_counts, partial_index = block_lists(classes == tiles.PARTIAL)
    full_counts, full_index = block_lists(classes == tiles.FULL)
    block_mask = BlockMask.from_kv_blocks(partial_counts, partial_index, full_counts, full_index,
                                          BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n))
    return mask_mod, block_mask
