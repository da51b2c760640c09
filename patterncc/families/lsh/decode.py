"""Hashed heads' generation: each position is hashed once, when it enters the cache; a decoded position t gets the
row t of LSH attention over positions 0..t (docs/hashed-heads.md, "Generation").

Buckets and sorted chunks depend on every position of the sequence, so a row of LSH attention over the whole
sequence can change when later positions arrive (a later position in a smaller bucket shifts the chunks). What a
step can equal is the forward over the positions so far. Positions arrive in order, so in the (bucket, position)
order of positions 0..t, t is the last of its bucket b: its slot is (positions with bucket <= b) - 1, from
per-bucket counts; a key j sits at slot (keys with a smaller bucket) + (keys of j's bucket before j), the second
term fixed when j arrives. The cache keeps the counts and the keys' order as a list, so a step reads its window's
2 x chunk slots of that list directly; the count of rounds, the self rule and the combination of rounds are the
forward's. Per step and round: O(buckets) for the slots, one O(t) integer copy (of the tail past its slot) to
insert the new key into the sorted list, and rounds x 2 x chunk scored keys.
"""

import torch

from ..shared.decode import cache_read_values, rows_of_batches
from ..shared.heads import heads_of, per_q_head, query_heads
from .cpu import lsh_combine_rounds
from .ops import _lsh_buckets


class LshDecodeState:
    """A hashed call's cache, per (batch, head, round): the query and key bucket of each position [batch, heads,
    rounds, max_len], how many queries and keys each bucket holds [..., buckets], each key's index among the keys
    of its bucket, and the positions in (bucket, position) order of keys; per (batch, head) each position's key as
    the forward scores it [batch, heads, max_len, head_dim] (the unit-normalized query with shared_qk), in the
    compute precision (float64 for float64 inputs, else float32)."""

    def __init__(self, batch, heads, rounds, buckets, head_dim, max_len, dtype, device):
        self.bucket_q = torch.zeros(batch, heads, rounds, max_len, dtype=torch.int64, device=device)
        self.bucket_k = torch.zeros_like(self.bucket_q)
        self.count_q = torch.zeros(batch, heads, rounds, buckets, dtype=torch.int64, device=device)
        self.count_k = torch.zeros_like(self.count_q)
        self.member_k = torch.zeros_like(self.bucket_q)
        self.sorted_k = torch.zeros_like(self.bucket_q)
        self.length = 0
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
    if stop - start == 1 and start == state.length:
        _insert_one(state, start)
    else:  # a prompt: counts, members and order of every position so far at once
        _rebuild(state, stop)
    state.length = stop


def _rebuild(state, stop):
    bucket_q, bucket_k = state.bucket_q[..., :stop], state.bucket_k[..., :stop]
    ones = torch.ones_like(bucket_q)
    state.count_q.zero_().scatter_add_(-1, bucket_q, ones)
    state.count_k.zero_().scatter_add_(-1, bucket_k, ones)
    positions = torch.arange(stop, device=bucket_k.device)
    order = torch.argsort(bucket_k * stop + positions, dim=-1)  # (bucket, position) order
    state.sorted_k[..., :stop] = order
    slot = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))
    before = state.count_k.cumsum(-1) - state.count_k  # keys with a smaller bucket
    state.member_k[..., :stop] = slot - before.gather(-1, bucket_k)


def _insert_one(state, t):
    """Position t (the next one) into the counts and the keys' sorted list: at the end of its bucket's run."""
    bucket_q, bucket_k = state.bucket_q[..., t:t + 1], state.bucket_k[..., t:t + 1]
    state.count_q.scatter_add_(-1, bucket_q, torch.ones_like(bucket_q))
    state.member_k[..., t:t + 1] = state.count_k.gather(-1, bucket_k)
    state.count_k.scatter_add_(-1, bucket_k, torch.ones_like(bucket_k))
    slot = state.count_k.cumsum(-1).gather(-1, bucket_k) - 1  # [B, H, R, 1]
    # Per (batch, head, round) row, the keys after the slot move up by one: a copy of the row's tail, which is
    # several times cheaper than one gather over whole rows when rows are few (measured: 1.8 ms a step for 16
    # rows at t = 17k, against about 0.1 ms).
    for row, at in zip(state.sorted_k.view(-1, state.sorted_k.shape[-1]), slot.flatten().tolist()):
        if at < t:
            row[at + 1:t + 1] = row[at:t].clone()
        row[at] = t


def lsh_decode_row(q_t, cache, kv_heads, state, t, chunk, shared_qk, scale):
    """Row t of causal LSH attention over positions 0..t: q_t (batch, heads, head_dim), values from the
    DecodeCache `cache`, kv_heads[h] the cache head of head h -> (batch, heads, head_dim) in q_t's dtype. Positions
    0..t must be written (lsh_decode_write), and no later one."""
    bucket = state.bucket_q[..., t]  # t's bucket per round [B, H, R]
    query_chunk = (state.count_q.cumsum(-1).gather(-1, bucket[..., None]) - 1) // chunk  # [B, H, R, 1]
    # The keys whose slot lies in t's chunk or the one before, in every round: [B, H, R, 2c].
    slots = (query_chunk - 1) * chunk + torch.arange(2 * chunk, device=q_t.device)
    candidates = state.sorted_k.gather(-1, slots.clamp(0, t))
    batch, heads, rounds, width = candidates.shape
    # In how many rounds' windows each candidate lies (same bucket and a slot in that round's two chunks).
    before = state.count_k.cumsum(-1) - state.count_k  # keys with a smaller bucket, per bucket
    flat = candidates.reshape(batch, heads, 1, rounds * width).expand(-1, -1, rounds, -1)
    key_bucket = state.bucket_k.gather(-1, flat)  # [B, H, R' (round asked), R x 2c]
    key_chunk = (before.gather(-1, key_bucket) + state.member_k.gather(-1, flat)) // chunk
    in_window = (key_bucket == bucket[..., None]) & ((key_chunk == query_chunk) | (key_chunk == query_chunk - 1))
    in_window &= (flat <= t)
    count = in_window.sum(2).view(batch, heads, rounds, width)
    window = in_window.view(batch, heads, rounds, rounds, width).diagonal(dim1=2, dim2=3).movedim(-1, 2)
    window = window & (slots >= 0) & (slots <= t)
    allowed = window & (candidates != t) if shared_qk else window  # shared_qk: the self rule
    index = candidates.reshape(batch, heads, rounds * width)
    keys = rows_of_batches(state.keys.flatten(0, 1), index.flatten(0, 1)).view(batch, heads, rounds * width, -1)
    scores = torch.einsum("bhd,bhjd->bhj", q_t.to(keys.dtype), keys).view(batch, heads, rounds, width) * scale
    scores = scores - torch.log(count.to(scores.dtype).clamp(min=1.0))  # rounds holding the pair, counted once
    masked = torch.where(allowed, scores, float("-inf"))
    has_round = allowed.any(-1, keepdim=True)
    lse = torch.where(has_round, torch.logsumexp(torch.where(has_round, masked, 0.0), -1, keepdim=True),
                      float("-inf"))  # per round, -inf with no key that round
    probabilities = torch.where(allowed, torch.exp(masked - torch.where(has_round, lse, 0.0)), 0.0)
    window_values = cache_read_values(cache, kv_heads, index.to(cache.v.device)).to(keys.dtype)  # [B, H, R x 2c, D]
    out_r = torch.einsum("bhrj,bhrjd->bhrd", probabilities, window_values.view(batch, heads, rounds, width, -1))
    own = None
    if shared_qk:  # the self rule's fallback for a row with no key: v_t
        own = cache_read_values(cache, kv_heads, torch.full((batch, heads, 1), t, device=cache.v.device))
    out = lsh_combine_rounds(out_r[:, :, :, None], lse, own)[:, :, 0]
    return out.to(q_t.dtype)


def lsh_heads_decode_write(q, k, cache, calls, buffers, num_heads, start):
    """Hash positions start.. of q, k (batch, heads / kv_heads, t, head_dim) for every hashed call into
    cache.lsh_states (made at the first write: one LshDecodeState per call)."""
    if cache.lsh_states is None:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        cache.lsh_states = [LshDecodeState(q.shape[0], len(query_heads(call.heads, num_heads, q.shape[1])),
                                           call.rounds, call.buckets, q.shape[-1], cache.max_len, compute, q.device)
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
        kv_heads = [head // (q_t.shape[1] // cache.kv_heads) for head in heads]
        out = lsh_decode_row(q_t[:, heads, 0], cache, kv_heads, state, t, call.chunk, call.shared_qk, scale)
        pieces.append((call.heads, out[:, :, None]))
    return pieces
