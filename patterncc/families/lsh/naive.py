"""Dense reference for Reformer LSH attention (hashed heads), to test the generated kernels against.

Shares no code with the kernels and the CPU path beside it (ops.py, cpu.py): it builds every round's n x n
window mask and the n x n duplicate count explicitly, so use it on small n only. Semantics: docs/hashed-heads.md.
"""

from __future__ import annotations

import torch


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket of every position per round, (B, H, R, n) int64: argmax of [x R ; -x R], computed in float32."""
    batch, heads, n, _ = x.shape
    rounds = rotations.shape[1]
    out = torch.empty(batch, heads, rounds, n, dtype=torch.int64)
    for h in range(heads):
        for r in range(rounds):
            projected = x[:, h].float().cpu() @ rotations[h, r].float().cpu()  # [B, n, buckets // 2]
            out[:, h, r] = torch.cat([projected, -projected], dim=-1).argmax(dim=-1)
    return out


def _chunk_of_position(bucket: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunk of each position once positions are sorted by (bucket, position): a stable sort by bucket."""
    order = torch.sort(bucket, stable=True).indices
    chunk_index = torch.empty_like(order)
    chunk_index[order] = torch.arange(bucket.numel()) // chunk
    return chunk_index


def lsh_windows(q: torch.Tensor, k: torch.Tensor | None, rotations: torch.Tensor, chunk: int,
                shared_qk: bool) -> torch.Tensor:
    """Every round's window before the causal and self rules, bool (B, H, R, n, n): key j shares query i's
    bucket and sits in i's chunk or the chunk before it (no wrap-around). Its sum over R is count_ij."""
    bucket_q = lsh_buckets(q, rotations)
    bucket_k = bucket_q if shared_qk else lsh_buckets(k, rotations)
    batch, heads, rounds, n = bucket_q.shape
    windows = torch.zeros(batch, heads, rounds, n, n, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for r in range(rounds):
                bq, bk = bucket_q[b, h, r], bucket_k[b, h, r]
                cq, ck = _chunk_of_position(bq, chunk), _chunk_of_position(bk, chunk)
                same_bucket = bq[:, None] == bk[None, :]
                near = (ck[None, :] == cq[:, None]) | (ck[None, :] == cq[:, None] - 1)
                windows[b, h, r] = same_bucket & near
    return windows


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that gives -inf for an all -inf slice with a zero (not NaN) gradient."""
    has = (x > float("-inf")).any(dim=dim, keepdim=True)
    lse = torch.logsumexp(torch.where(has, x, torch.zeros_like(x)), dim=dim, keepdim=True)
    return torch.where(has, lse, torch.full_like(lse, float("-inf"))).squeeze(dim)


def _rules(n: int, causal: bool, shared_qk: bool) -> torch.Tensor:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if shared_qk:
        allowed &= j != i
    return allowed


def lsh_union_mask(q: torch.Tensor, k: torch.Tensor | None, rotations: torch.Tensor, chunk: int, causal: bool,
                   shared_qk: bool) -> torch.Tensor:
    """The pairs LSH attention attends, bool (B, H, n, n): the union of all rounds' windows under the causal and
    self rules; with shared_qk a row left empty attends only itself (the self rule's fallback)."""
    n = q.shape[2]
    union = lsh_windows(q, k, rotations, chunk, shared_qk).any(dim=2) & _rules(n, causal, shared_qk)
    if shared_qk:
        empty = ~union.any(dim=-1)
        union |= empty[..., None] & torch.eye(n, dtype=torch.bool)
    return union


def lsh_reference(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, rotations: torch.Tensor, chunk: int,
                  causal: bool, shared_qk: bool, scale: float | None = None,
                  dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """LSH attention as the Reformer defines it, densely: per round a masked softmax of s_ij - log(count_ij)
    over that round's window, the rounds combined by their log-sum-exp, and the self rule's fallback.

    q, k, v: (B, H, n, D) (k unused with shared_qk: the keys are the unit-normalized queries); rotations:
    (H, R, D, buckets // 2). Computed in `dtype` (float64 by default; None keeps the inputs' dtype), buckets in
    float32 from the inputs as given. Rows with no allowed key (only without shared_qk) give 0."""
    windows = lsh_windows(q, k, rotations, chunk, shared_qk)
    if dtype is not None:
        q, v = q.to(dtype), v.to(dtype)
        k = k.to(dtype) if k is not None else None
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = q.shape[2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    count = windows.sum(dim=2).to(q.dtype)  # [B, H, n, n]
    masks = windows & _rules(n, causal, shared_qk)  # [B, H, R, n, n]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale - torch.log(count.clamp_min(1))
    outs, lses = [], []
    for r in range(windows.shape[2]):
        mask = masks[:, :, r]
        masked = scores.masked_fill(~mask, float("-inf"))
        lse = _logsumexp(masked, dim=-1)  # -inf for a row with no key this round
        probs = torch.where(mask, torch.exp(masked - torch.where(mask.any(-1), lse, 0)[..., None]), 0)
        outs.append(torch.matmul(probs, v))
        lses.append(lse)
    lse = torch.stack(lses, dim=2)  # [B, H, R, n]
    total = _logsumexp(lse, dim=2)  # -inf for a row with no key in any round
    has_keys = masks.any(dim=-1).any(dim=2)
    weights = torch.where(has_keys[:, :, None], torch.exp(lse - torch.where(has_keys, total, 0)[:, :, None]), 0)
    out = (weights[..., None] * torch.stack(outs, dim=2)).sum(dim=2)
    if shared_qk:
        out = torch.where(has_keys[..., None], out, v)
    return out
