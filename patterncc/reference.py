"""Plain-torch references the kernels are tested against (as flash-linear-attention's `naive.py`).

Dense masked softmax attention: the n x n scores are materialised, so use it on small n only.
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


def module_reference(module, pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buffers: dict | None = None,
                     scale: float | None = None, layer: int = 0) -> torch.Tensor:
    """A generated module's attention in float64, each head through its own family's reference: masked softmax
    (set heads, from `pattern.mask`), `lsh_reference` (hashed), `linear_reference` (kernel heads).

    module: the generated Python module (its HEAD_FAMILIES, HASHED_CALLS and KERNEL_CALLS say which head is
    which); buffers: its random draws (default: `module.default_buffers(head_dim)`). Shapes as `masked_attention`.
    """
    from .reference_linear import linear_reference
    from .reference_lsh import lsh_reference

    q, k, v = q.double(), k.double(), v.double()
    heads, n, dim = q.shape[1], q.shape[2], q.shape[3]
    if scale is None:
        scale = dim ** -0.5
    if buffers is None:
        buffers = module.default_buffers(dim)
    repeat = heads // module.NUM_HEADS
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    outputs: list[torch.Tensor | None] = [None] * heads

    def q_heads(pattern_heads):
        return [h * repeat + r for h in pattern_heads for r in range(repeat)]

    def place(index, part):
        for slot, head in enumerate(index):
            outputs[head] = part[:, [slot]]

    set_heads = [h for h, family in enumerate(module.HEAD_FAMILIES) if family == "set"]
    if set_heads:
        index = q_heads(set_heads)
        mask = pattern.mask(n, layer=layer)[set_heads].repeat_interleave(repeat, dim=0)
        place(index, masked_attention(q[:, index], k[:, index], v[:, index], mask, scale))
    for name, pattern_heads, _, _, _, _, chunk, shared_qk in getattr(module, "HASHED_CALLS", []):
        index = q_heads(pattern_heads)
        rotations = buffers[name].double().repeat_interleave(repeat, dim=0)
        place(index, lsh_reference(q[:, index], k[:, index], v[:, index], rotations, chunk, module.CAUSAL,
                                   shared_qk, scale))
    for name, pattern_heads, _, _, feature_map, _, eps in getattr(module, "KERNEL_CALLS", []):
        index = q_heads(pattern_heads)
        projection = buffers[name].double().repeat_interleave(repeat, dim=0) if feature_map == "favor" else None
        place(index, linear_reference(q[:, index], k[:, index], v[:, index], feature_map, eps, module.CAUSAL,
                                      projection))
    return torch.cat(outputs, dim=1)
