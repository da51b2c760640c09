"""Hashed heads' generation: each position is hashed once, when it enters the cache; a decoded position t gets the
row t of LSH attention over positions 0..t (docs/hashed-heads.md, "Generation").

Buckets and sorted chunks depend on every position of the sequence, so a row of LSH attention over the whole
sequence can change when later positions arrive (a later position in a smaller bucket shifts the chunks). What a
step can equal is the forward over the positions so far: at position t, in each round, t is the last query of
its bucket b in the (bucket, position) order, at slot (positions with a smaller bucket) + (positions up to t in
b) - 1; a key j of bucket b sits at slot (keys with a smaller bucket) + (keys of b before j); the window, the
count of rounds, the self rule and the combination of rounds are the forward's. A step compares buckets in
O(rounds x t) integer operations and scores only the keys in its windows (at most rounds x 2 x chunk).
"""

import torch

from ..shared.heads import heads_of, per_q_head, query_heads
from .ops import _lsh_buckets


class LshDecodeState:
    """A hashed call's cache: per position its query and key buckets in every round [batch, heads, rounds,
    max_len] and its key as the forward scores it [batch, heads, max_len, head_dim] (the unit-normalized query
    with shared_qk), in the compute precision (float64 for float64 inputs, else float32)."""

    def __init__(self, batch, heads, rounds, head_dim, max_len, dtype, device):
        self.bucket_q = torch.zeros(batch, heads, rounds, max_len, dtype=torch.int64, device=device)
        self.bucket_k = torch.zeros_like(self.bucket_q)
        self.keys = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)


def lsh_decode_write(state, q, k, rotations, shared_qk, start):
    """Hash q, k (batch, heads, t, head_dim) once and store them at positions start..start + t - 1."""
    stop = start + q.shape[2]
    state.bucket_q[..., start:stop] = _lsh_buckets(q, rotations)
    if shared_qk:
        state.bucket_k[..., start:stop] = state.bucket_q[..., start:stop]
        state.keys[:, :, start:stop] = torch.nn.functional.normalize(q.to(state.keys.dtype), dim=-1)
    else:
        state.bucket_k[..., start:stop] = _lsh_buckets(k, rotations)
        state.keys[:, :, start:stop] = k.to(state.keys.dtype)


def lsh_decode_row(q_t, cache_v, kv_heads, state, t, chunk, shared_qk, scale):
    """Row t of causal LSH attention over positions 0..t: q_t (batch, heads, head_dim), the values of the cache
    cache_v (batch, kv_heads, max_len, head_dim), kv_heads[h] the cache head of head h -> (batch, heads, head_dim)
    in q_t's dtype. Position t must be written (lsh_decode_write)."""
    bucket_q, bucket_k = state.bucket_q[..., :t + 1], state.bucket_k[..., :t + 1]  # [B, H, R, t + 1]
    bucket = bucket_q[..., t:]  # t's bucket per round [B, H, R, 1]
    query_chunk = ((bucket_q < bucket).sum(-1, keepdim=True) + (bucket_q == bucket).sum(-1, keepdim=True) - 1) // chunk
    same = bucket_k == bucket
    key_chunk = ((bucket_k < bucket).sum(-1, keepdim=True) + same.cumsum(-1) - 1) // chunk
    window = same & ((key_chunk == query_chunk) | (key_chunk == query_chunk - 1))  # [B, H, R, t + 1]
    # Only keys in some round's window are scored: at most rounds x 2 x chunk of them, compacted per (batch, head)
    # in position order (slot `width` collects the rest and is dropped).
    in_some = window.any(2)  # [B, H, t + 1]
    counts = in_some.sum(-1, keepdim=True)
    width = max(1, int(counts.max()))
    positions = torch.arange(t + 1, device=q_t.device).expand_as(in_some)
    slot = torch.where(in_some, in_some.cumsum(-1) - 1, width)
    index = torch.zeros(*in_some.shape[:2], width + 1, dtype=torch.int64, device=q_t.device)
    index = index.scatter_(2, slot, positions)[..., :width]  # [B, H, width]
    valid = torch.arange(width, device=q_t.device) < counts
    window = window.gather(3, index[:, :, None].expand(-1, -1, window.shape[2], -1)) & valid[:, :, None]
    allowed = window & (index != t)[:, :, None] if shared_qk else window  # shared_qk: the self rule
    keys = state.keys.gather(2, index[..., None].expand(-1, -1, -1, state.keys.shape[-1]))
    scores = torch.einsum("bhd,bhjd->bhj", q_t.to(keys.dtype), keys) * scale
    scores = scores - torch.log(window.sum(2).to(scores.dtype).clamp(min=1.0))  # rounds holding j, counted once
    masked = torch.where(allowed, scores[:, :, None], float("-inf"))  # [B, H, R, width]
    has_round = allowed.any(-1, keepdim=True)
    lse = torch.where(has_round, torch.logsumexp(torch.where(has_round, masked, 0.0), -1, keepdim=True),
                      float("-inf"))  # per round, -inf with no key that round
    probabilities = torch.where(allowed, torch.exp(masked - torch.where(has_round, lse, 0.0)), 0.0)
    batch, cache_heads, max_len, dim = cache_v.shape
    kv_index = torch.tensor(kv_heads, device=q_t.device)
    rows = (torch.arange(batch, device=q_t.device)[:, None, None] * cache_heads + kv_index[None, :, None]) * max_len
    window_values = cache_v.reshape(-1, dim)[rows + index].to(keys.dtype)  # [B, H, width, D], no copy of the cache
    out_r = torch.einsum("bhrj,bhjd->bhrd", probabilities, window_values)
    top = lse.amax(2)  # [B, H, 1]
    has_keys = top > float("-inf")
    weights = torch.exp(lse - torch.where(has_keys, top, 0.0)[:, :, None])  # [B, H, R, 1]
    out = (weights * out_r).sum(2) / torch.where(has_keys, weights.sum(2), 1.0)
    # No key in any round: v_t with shared_qk (the self rule's fallback), else 0.
    out = torch.where(has_keys, out, cache_v[:, kv_index, t].to(out.dtype) if shared_qk else 0.0)
    return out.to(q_t.dtype)


def lsh_heads_decode_write(q, k, cache, calls, buffers, num_heads, start):
    """Hash positions start.. of q, k (batch, heads / kv_heads, t, head_dim) for every hashed call into
    cache.lsh_states (made at the first write: one LshDecodeState per call)."""
    if cache.lsh_states is None:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        cache.lsh_states = [LshDecodeState(q.shape[0], len(query_heads(call.heads, num_heads, q.shape[1])),
                                           call.rounds, q.shape[-1], cache.max_len, compute, q.device)
                            for call in calls]
    for call, state in zip(calls, cache.lsh_states):
        q_part, k_part, _ = heads_of(q, k, k, call.heads, num_heads, expand_kv=True)
        lsh_decode_write(state, q_part, k_part, per_q_head(buffers[call.buffer], q, num_heads), call.shared_qk,
                         start)


def lsh_heads_decode_pieces(q_t, cache, calls, num_heads, scale, t):
    """Row t of every hashed call, [(pattern heads, out (batch, heads, 1, head_dim))], for q_t (batch, heads, 1,
    head_dim) at position t, already written to the cache; values read from the cache's kv heads."""
    pieces = []
    for call, state in zip(calls, cache.lsh_states):
        heads = query_heads(call.heads, num_heads, q_t.shape[1])
        kv_heads = [head // (q_t.shape[1] // cache.v.shape[1]) for head in heads]
        out = lsh_decode_row(q_t[:, heads, 0], cache.v, kv_heads, state, t, call.chunk, call.shared_qk, scale)
        pieces.append((call.heads, out[:, :, None]))
    return pieces
