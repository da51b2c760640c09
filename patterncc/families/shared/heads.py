"""A generated module's attention heads, split by family and put back together; its input checks.

Pattern heads are repeated contiguously over q's heads: with `num_heads` pattern heads and H query heads, query
head x belongs to pattern head x // (H / num_heads). Grouped-query attention: kv head x // (H / H_kv).
"""

import math

import torch

from .launch import check_4d, check_backend, check_triton_inputs, uses_triton


def query_heads(heads, num_heads, q_heads):
    """The query heads of pattern heads `heads`, in order: with q_heads query heads, pattern head x serves
    q_heads / num_heads consecutive ones."""
    repeat = q_heads // num_heads
    return [head * repeat + r for head in heads for r in range(repeat)]


def attention_scale(q, scale):
    """The softmax scale of a call: `scale` as a float, or 1/sqrt(head_dim) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def heads_of(q, k, v, heads, num_heads, expand_kv):
    """q, k, v restricted to the pattern heads `heads` (views where the heads are contiguous). expand_kv: k and
    v get one head per q head (families whose kernels take no grouped-query attention)."""
    q_per_kv = q.shape[1] // k.shape[1]
    q_index = query_heads(heads, num_heads, q.shape[1])
    first, last = q_index[0], q_index[-1] + 1
    contiguous = q_index == list(range(first, last))
    q_part = q[:, first:last] if contiguous else q[:, q_index]
    if q_per_kv == 1:
        return q_part, *((x[:, first:last] if contiguous else x[:, q_index]) for x in (k, v))
    if not expand_kv and contiguous and first % q_per_kv == 0 and last % q_per_kv == 0:
        return q_part, k[:, first // q_per_kv:last // q_per_kv], v[:, first // q_per_kv:last // q_per_kv]
    kv_index = [x // q_per_kv for x in q_index]
    return q_part, k[:, kv_index], v[:, kv_index]


def per_q_head(buffer, q, num_heads):
    """A per-pattern-head buffer repeated for q's heads."""
    return buffer.to(q.device).repeat_interleave(q.shape[1] // num_heads, dim=0)


def assemble_heads(pieces, q, num_heads):
    """The families' outputs [(pattern heads, output)], put back in q's head order."""
    order = query_heads([head for heads, _ in pieces for head in heads], num_heads, q.shape[1])
    out = torch.cat([part for _, part in pieces], dim=1) if len(pieces) > 1 else pieces[0][1]
    if order == sorted(order):
        return out
    inverse = [0] * len(order)
    for slot, head in enumerate(order):
        inverse[head] = slot
    return out[:, inverse]


def check_attention_inputs(q, k, v, num_heads, backend, head_dims):
    """Clear errors before any kernel runs, naming both numbers where shapes disagree."""
    check_backend(backend)
    check_4d(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same sequence length (self-attention), got n_q={q.shape[2]} "
                         f"and n_k={k.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point (float16, bfloat16, float32 or float64), got {q.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[1] % num_heads:
        raise ValueError(f"the pattern has {num_heads} heads, so q must have a multiple of {num_heads} heads, "
                         f"got {q.shape[1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads must be a multiple of k's heads (grouped-query attention), got "
                         f"Hq={q.shape[1]} and Hkv={k.shape[1]}")
    if q.shape[2] == 0:
        raise ValueError("the sequence length must be positive")
    if uses_triton(q, backend):
        check_triton_inputs(q, head_dims)


def check_buffers(buffers, names, head_dim):
    for name in names:
        if name not in buffers:
            raise ValueError(f"buffers lacks {name!r}; expected {names}")
        if buffers[name].shape[2] != head_dim:
            raise ValueError(f"buffer {name!r} was drawn for head_dim {buffers[name].shape[2]}, but q has head_dim "
                             f"{head_dim}")


def empty_batch_output(q, k, v):
    """The output of a call with batch 0: empty, and connected to q, k and v so that backward() runs and gives
    them (empty) gradients, as attention of a non-empty batch does."""
    return torch.zeros_like(q) + (q.sum() + k.sum() + v.sum()) * 0
