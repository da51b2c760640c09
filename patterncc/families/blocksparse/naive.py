"""Plain-torch float64 reference for the set heads: dense masked softmax attention.

The n x n scores are materialised, so use it on small n only. It shares no code with the kernels or the CPU path.
"""

from __future__ import annotations

import torch


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v per head; rows with no allowed key give 0.

    q: (batch, heads, n, d); k, v: (batch, kv_heads, n, d) with kv_heads dividing heads; mask: bool
    (mask_heads, n, n) with mask_heads dividing heads, each mask head repeated contiguously over the query heads
    (patterncc's convention). Computed in `dtype` (float64 by default; None keeps the inputs' dtype).
    """
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    heads, kv_heads, mask_heads = q.shape[1], k.shape[1], mask.shape[0]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    allowed = mask.to(q.device).repeat_interleave(heads // mask_heads, dim=0)[None]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs, v)
