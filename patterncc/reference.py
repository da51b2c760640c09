"""A whole generated module's float64 reference: each head through its family's own `naive.py` (dense masked
attention for set heads, `lsh_reference` for hashed heads, `linear_reference` for kernel heads). Small n only."""

from __future__ import annotations

import torch

from .families.blocksparse.naive import masked_attention
from .mask import pattern_mask


def module_reference(module, pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buffers: dict | None = None,
                     scale: float | None = None, layer: int = 0) -> torch.Tensor:
    """A generated module's attention in float64, each head through its own family's reference: masked softmax
    (set heads, from `pattern.mask`), `lsh_reference` (hashed), `linear_reference` (kernel heads).

    module: the generated Python module (its HEAD_FAMILIES, HASHED_CALLS and KERNEL_CALLS say which head is
    which); buffers: its random draws (default: `module.default_buffers(head_dim)`). Shapes as `masked_attention`.
    """
    from .families.linear.naive import linear_reference
    from .families.lsh.naive import lsh_reference

    q, k, v = q.double(), k.double(), v.double()
    heads, n, dim = q.shape[1], q.shape[2], q.shape[3]
    if scale is None:
        scale = dim ** -0.5
    if buffers is None:
        buffers = module.default_buffers(dim) if hasattr(module, "default_buffers") else {}
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
        mask = pattern_mask(pattern, n, layer=layer)[set_heads].repeat_interleave(repeat, dim=0)
        place(index, masked_attention(q[:, index], k[:, index], v[:, index], mask, scale))
    for call in getattr(module, "HASHED_CALLS", []):
        index = q_heads(call.heads)
        rotations = buffers[call.buffer].double().repeat_interleave(repeat, dim=0)
        place(index, lsh_reference(q[:, index], k[:, index], v[:, index], rotations, call.chunk, module.CAUSAL,
                                   call.shared_qk, scale))
    for call in getattr(module, "KERNEL_CALLS", []):
        index = q_heads(call.heads)
        projection = (buffers[call.buffer].double().repeat_interleave(repeat, dim=0) if call.feature_map == "favor"
                      else None)
        place(index, linear_reference(q[:, index], k[:, index], v[:, index], call.feature_map, call.eps,
                                      module.CAUSAL, projection))
    return torch.cat(outputs, dim=1)
