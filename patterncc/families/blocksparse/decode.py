"""Set heads, one position at a time: the keys a new query may see, from the layout row, and attention over them.

Decoding runs the pattern at the cache's sequence length (`max_len`), as the causal forward over the whole
sequence does. For the query at position t, the key tiles its layout row lists (natural order, EMPTY skipped)
hold every candidate key; the predicate keeps those at or before t that the mask allows. Listing costs the
row's tiles, and attention the allowed keys only: strided(l) attends l + t / l keys.
"""

import torch

from ...runtime import tiles
from ..shared.decode import cache_read, cache_rows
from ..shared.launch import aot_configs, aot_signature, uses_triton
from .cpu import combine_parts
from .decode_kernels import blocksparse_decode_kernel


def decode_keys(masks, mask_ids, t, max_len):
    """The key positions (ascending int64) the query at position t may attend under the union of masks
    `mask_ids` (a set head's disjoint parts), at sequence length max_len."""
    layout = masks.layout(max_len, "cpu")
    keys = []
    for mask in mask_ids:
        if mask >= masks.num_masks:  # the empty part of a head with fewer parts
            continue
        candidates, allowed = _row_keys(layout, mask, t)
        keys.append(candidates[allowed & (candidates <= t)])
    if len(keys) == 1:
        return keys[0]  # ascending: tiles listed in order
    return torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.int64)


# Keep a query tile's predicate (block x its candidate keys, as int64 intermediates) only up to this many pairs;
# beyond it, each step evaluates its own row (memory O(candidates) instead of O(block x candidates)).
_ROW_PAIRS = 1 << 22


def _row_keys(layout, mask, t):
    """(candidate keys [K], allowed [K]) for the query at t: the keys of the tiles its layout row lists, and the
    predicate on them. Consecutive decode steps share a query tile, so its rows are evaluated together once and
    kept (the latest tile per mask) when that is at most _ROW_PAIRS pairs."""
    block, n = layout.masks.block, layout.n
    row = t // block
    cache = layout.decode_rows
    if mask not in cache or cache[mask][0] != row:
        listed = (layout.natural_classes[mask][row] != tiles.EMPTY).nonzero().flatten()
        candidates = (listed[:, None] * block + torch.arange(block)).flatten()
        last_query = min(row * block + block - 1, n - 1)
        candidates = candidates[candidates <= last_query]  # causal: no key past the tile's last query
        allowed = None
        if candidates.numel() * block <= _ROW_PAIRS:
            queries = torch.arange(row * block, last_query + 1)
            allowed = layout.masks.allowed(mask, queries[:, None], candidates[None, :], n, layout.random_cpu)
            allowed = allowed.expand(queries.numel(), candidates.numel())
        cache[mask] = (row, candidates, allowed)
    _, candidates, allowed = cache[mask]
    if allowed is not None:
        return candidates, allowed[t - row * block]
    return candidates, layout.masks.allowed(mask, torch.tensor([t]), candidates, n, layout.random_cpu).reshape(-1)


def set_heads_keep_until(masks, set_heads, num_heads, q_heads, kv_heads, max_len):
    """For a cache of `kv_heads` heads serving `q_heads` query heads: per kv head and key tile of the layout at
    max_len, the last query tile that some set head reading that kv head attends it from (-1: none), [kv_heads,
    tiles]. Exact per tile: from the masks' tile classes in natural order (a tile is EMPTY only when no pair in
    it is allowed)."""
    layout = masks.layout(max_len, "cpu")
    tiles_count = layout.num_tiles
    query_tile = torch.arange(tiles_count)[:, None]
    last_reader = [torch.where(classes != tiles.EMPTY, query_tile, -1).amax(0) for classes in layout.natural_classes]
    keep = torch.full((kv_heads, tiles_count), -1, dtype=torch.int64)
    repeat, q_per_kv = q_heads // num_heads, q_heads // kv_heads
    for slot, head in enumerate(set_heads):
        for mask in masks.head_masks[slot]:
            if mask >= masks.num_masks:  # the empty part of a head with fewer parts
                continue
            for query_head in range(head * repeat, (head + 1) * repeat):
                keep[query_head // q_per_kv] = torch.maximum(keep[query_head // q_per_kv], last_reader[mask])
    return keep


def blocksparse_decode(q_t, cache, masks, scale, t, max_len, kv_heads, backend="auto"):
    """Attention of query position t: q_t (batch, heads, head_dim) over the keys and values of a DecodeCache
    that each head's masks allow; heads a multiple of the masks' head count. kv_heads: the cache's head read by
    each of q_t's heads. Only the allowed keys are read: by the split-K Triton kernel (backend "triton", or
    "auto" on CUDA), else in torch. Returns (batch, heads, head_dim) in q_t's dtype (0 for a head with no
    allowed key)."""
    num_q_heads = q_t.shape[1]
    q_per_head = num_q_heads // len(masks.head_masks)
    kv_heads = torch.as_tensor(kv_heads)
    compute = torch.float32 if q_t.dtype in (torch.float16, torch.bfloat16) else q_t.dtype
    out = torch.zeros(q_t.shape, dtype=compute, device=q_t.device)
    heads_of_masks = {}  # set heads sharing their masks share one key list and one batched product
    for head, mask_ids in enumerate(masks.head_masks):
        heads_of_masks.setdefault(mask_ids, []).extend(range(head * q_per_head, (head + 1) * q_per_head))
    for mask_ids, q_heads in heads_of_masks.items():
        keys = decode_keys(masks, mask_ids, t, max_len).to(cache.k.device)
        if keys.numel() == 0:
            continue
        q_index = torch.tensor(q_heads)
        if uses_triton(q_t, backend):
            rows = cache_rows(cache, kv_heads[q_index], keys[None, :].expand(len(q_heads), -1))
            out[:, q_index.to(q_t.device)] = blocksparse_decode_triton(q_t[:, q_index.to(q_t.device)], cache.k, cache.v,
                                                                       rows.to(torch.int32), scale).to(compute)
            continue
        k, v = (x.to(compute) for x in cache_read(cache, kv_heads[q_index], keys))
        q_index = q_index.to(q_t.device)
        scores = torch.matmul(k, q_t.index_select(1, q_index).to(compute)[..., None])[..., 0] * scale
        out[:, q_index] = torch.matmul(torch.softmax(scores, dim=-1)[:, :, None, :], v)[:, :, 0]
    return out.to(q_t.dtype)


def decode_config(head_dim):
    """(BLOCK_M steps per program, BLOCK_N keys per step, num_warps, num_stages): 256 keys per program in steps of
    64; head_dim 128 on 8 warps (on 4 its tiles take 252 of a thread's 255 registers on sm_90, ptxas -v; 128 on 8)."""
    return (4, 64, 8, 2) if head_dim > 64 else (4, 64, 4, 2)


def blocksparse_decode_triton(q, k_pool, v_pool, rows, scale):
    """Split-K decode: q (batch, heads, head_dim), k_pool and v_pool (batch, cache rows, head_dim), rows (heads,
    keys) int32 the cache row of each key of each head -> (batch, heads, head_dim) float32, the softmax over those
    keys; the splits' partial outputs are combined by log-sum-exp."""
    batch, heads, dim = q.shape
    block_m, block_n, warps, stages = decode_config(dim)
    splits = max(1, -(-rows.shape[1] // (block_m * block_n)))
    part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    q, rows = q.contiguous(), rows.contiguous()
    blocksparse_decode_kernel[(batch * heads, splits)](
        q, k_pool, v_pool, rows, part, lse, float(scale), rows.shape[1], heads, q.stride(0), q.stride(1),
        k_pool.stride(0), rows.stride(0), part.stride(0), part.stride(1), part.stride(2), HEAD_DIM=dim,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return combine_parts([(part[:, :, split], lse[:, :, split]) for split in range(splits)])[0]


def blocksparse_decode_aot_specs(dtype="fp16", head_dim=64):
    """The decode kernel for ahead-of-time compilation: [(name, kernel, signature, [(constexprs, options)])]."""
    signature = aot_signature(blocksparse_decode_kernel, dtype, {"ROWS": "*i32", "OUT": "*fp32", "LSE": "*fp32"},
                              floats=("sm_scale",))
    return [("blocksparse_decode", blocksparse_decode_kernel, signature,
             aot_configs([decode_config(head_dim)], {"HEAD_DIM": head_dim}))]
