"""Set heads, one position at a time: the keys a new query may see, from the layout row, and attention over them.

Decoding runs the pattern at the cache's sequence length (`max_len`), as the causal forward over the whole
sequence does. For the query at position t, the key tiles its layout row lists (in the mask's visiting order,
EMPTY skipped) hold every candidate key; the predicate keeps those at or before t that the mask allows. Listing
costs the row's tiles (a grid-transposed stride(l) lists about l + t / l keys), and attention the allowed keys
only: strided(l) attends l + t / l keys. The lists of a query tile's 64 steps are built together, then turned
into cache rows for every head at once, so a step is one gather of k and v and two batched products.
"""

import torch

from ...runtime import tiles
from ..shared.decode import cache_rows
from ..shared.launch import aot_configs, aot_signature, uses_triton
from .cpu import combine_parts
from .decode_kernels import blocksparse_decode_kernel


def decode_keys(masks, mask_ids, t, max_len):
    """The key positions (ascending int64) the query at position t may attend under the union of masks
    `mask_ids` (a set head's disjoint parts), at sequence length max_len."""
    first, keys = _tile_keys(masks.layout(max_len, "cpu"), mask_ids, t)
    row = keys[t - first]
    return row[row >= 0].sort().values


# Keep a query tile's allowed keys (evaluated on block x its candidate keys, as int64 intermediates) only up to
# this many pairs; beyond it, each step evaluates its own row (memory O(candidates) instead of O(block x
# candidates)). The same bound caps a tile's gather plan (query rows x heads x keys).
_ROW_PAIRS = 1 << 22


def _tile_keys(layout, mask_ids, t):
    """(first, keys): keys [rows, K] int64, row r the keys the query at position first + r may attend under the
    union of `mask_ids` (the parts are disjoint, so each key once), -1 padding the shorter rows. Consecutive decode
    steps share a query tile, so its rows are evaluated together once and kept (the latest tile per head) when that
    is at most _ROW_PAIRS pairs; otherwise the one row of t."""
    kept = layout.decode_rows.get(mask_ids)
    if kept is not None and kept[0] <= t < kept[0] + kept[1].shape[0]:
        return kept
    block, n = layout.masks.block, layout.n
    masks = [mask for mask in mask_ids if mask < layout.masks.num_masks]  # past it: a head's empty part
    tile_start = t // block * block
    queries = torch.arange(tile_start, min(tile_start + block, n))
    listed = [_listed_tiles(layout, mask, queries) for mask in masks]
    if sum(index.numel() for _, index in listed) * block > _ROW_PAIRS:
        queries = queries[t - tile_start:t - tile_start + 1]
        listed = [_listed_tiles(layout, mask, queries) for mask in masks]
    candidates = [torch.zeros(len(queries), 0, dtype=torch.int64)]
    allowed = [torch.zeros(len(queries), 0, dtype=torch.bool)]
    for mask, (counts, index) in zip(masks, listed):
        keys, valid = _candidate_keys(layout, mask, queries, counts, index)
        candidates.append(keys)
        allowed.append(valid & layout.masks.allowed(mask, queries[:, None], keys, n, layout.random_cpu))
    candidates, allowed = torch.cat(candidates, 1), torch.cat(allowed, 1)
    counts, index = tiles.tile_lists(allowed)  # per row, the allowed candidates' columns, in order
    width = int(counts.max())
    keys = torch.gather(candidates, 1, index[:, :width].long())
    keys = torch.where(torch.arange(width) < counts[:, None], keys, -1)
    layout.decode_rows[mask_ids] = (int(queries[0]), keys)
    return layout.decode_rows[mask_ids]


def _listed_tiles(layout, mask, queries):
    """(counts, index): the key tiles each query's row of tiles lists (not EMPTY) in the mask's visiting order,
    the kernels' (natural or a grid transpose), as tiles.tile_lists gives them."""
    positions, block = layout.positions_cpu[mask], layout.masks.block
    if positions is None:
        query_tiles = queries // block
    else:
        if mask not in layout.decode_inverse:
            layout.decode_inverse[mask] = torch.argsort(positions)
        query_tiles = layout.decode_inverse[mask][queries] // block
    return tiles.tile_lists(layout.classes[mask][query_tiles] != tiles.EMPTY)


def _candidate_keys(layout, mask, queries, counts, index):
    """(keys [rows, K] int64, valid [rows, K]): per query, the key positions of the tiles its row lists (in the
    visiting order: a grid transpose lists l + t / l keys for a stride, where natural order lists all t), valid
    where the slot exists and the key is at or before the query (causal). counts, index: _listed_tiles."""
    positions, block, n = layout.positions_cpu[mask], layout.masks.block, layout.n
    slots = (index.long()[:, :, None] * block + torch.arange(block)).flatten(1)  # [rows, tiles x block]
    valid = (torch.arange(index.shape[1]) < counts[:, None].long()).repeat_interleave(block, 1) & (slots < n)
    keys = slots if positions is None else positions[slots.clamp(max=n - 1)]
    return keys, valid & (keys <= queries[:, None])


def _gather_plan(cache, masks, t, max_len, kv_heads, num_q_heads, compute):
    """What a torch decode step at position t reads, for every query head at once: (first, rows, bias, empty),
    rows [R, heads, K] the cache rows of each head's allowed keys for the queries first..first + R - 1, bias
    [R, heads, K] 0 there and -inf on padding, empty [R, heads] the heads with no key (None when none). Built once
    per query tile (the cache's pages change only between tiles) and kept on the cache."""
    key = (id(masks), max_len, tuple(kv_heads), num_q_heads, compute)
    plan = cache.set_gather
    if plan is not None and plan[0] == key and plan[1] <= t < plan[1] + plan[2].shape[0]:
        return plan[1:]
    kv_heads = torch.as_tensor(kv_heads)
    layout = masks.layout(max_len, "cpu")
    lists = [_tile_keys(layout, mask_ids, t) for mask_ids in masks.head_masks]
    first = max(start for start, _ in lists)  # per-tile lists, or the one row of t where one was too large
    stop = min(start + keys.shape[0] for start, keys in lists)
    width = max(keys.shape[1] for _, keys in lists)
    per_head = [torch.nn.functional.pad(keys[first - start:stop - start], (0, width - keys.shape[1]), value=-1)
                for start, keys in lists]
    q_per_head = num_q_heads // len(per_head)
    keys = torch.stack(per_head, 1).repeat_interleave(q_per_head, dim=1).to(cache.device)  # [R, heads, K]
    valid = keys >= 0
    # Padding reads row 0 (any stored row) and is masked by the bias.
    rows = cache_rows(cache, kv_heads.to(cache.device)[None, :].expand(keys.shape[0], -1), keys, valid)
    bias = torch.zeros(keys.shape, dtype=compute, device=cache.device).masked_fill_(~valid, float("-inf"))
    empty = ~valid.any(-1)
    plan = (key, first, rows, bias, empty if bool(empty.any()) else None)
    cache.set_gather = plan
    return plan[1:]


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
    compute = torch.float32 if q_t.dtype in (torch.float16, torch.bfloat16) else q_t.dtype
    if uses_triton(q_t, backend):
        return _decode_triton(q_t, cache, masks, scale, t, max_len, torch.as_tensor(kv_heads)).to(q_t.dtype)
    # Torch: every head's keys in one gather of k and of v, padded to the longest row.
    first, rows, bias, empty = _gather_plan(cache, masks, t, max_len, kv_heads, num_q_heads, compute)
    rows, bias = rows[t - first], bias[t - first]  # [heads, K]
    batch, width, dim = q_t.shape[0], rows.shape[1], q_t.shape[2]
    # (batch x heads) products of one row each: bmm of a row against k^T is several times faster than matmul's
    # matrix-vector form at these sizes (CPU, measured).
    k = cache.k.index_select(1, rows.flatten()).view(batch * num_q_heads, width, dim)
    v = cache.v.index_select(1, rows.flatten()).view(batch * num_q_heads, width, dim)
    if k.dtype != compute:
        k, v = k.to(compute), v.to(compute)
    q_rows = (q_t.to(compute) * scale).reshape(batch * num_q_heads, 1, dim)
    scores = torch.bmm(q_rows, k.transpose(1, 2)).view(batch, num_q_heads, width).add_(bias)
    probs = torch.softmax(scores, dim=-1).view(batch * num_q_heads, 1, width)
    out = torch.bmm(probs, v).view(batch, num_q_heads, dim)
    if empty is not None:  # a head with no allowed key gives 0 (its softmax over -inf alone is NaN)
        out = out.masked_fill(empty[t - first][None, :, None], 0)
    return out.to(q_t.dtype)


def _decode_triton(q_t, cache, masks, scale, t, max_len, kv_heads):
    """The split-K kernel for each group of heads that share their masks (one key list), float32 out."""
    q_per_head = q_t.shape[1] // len(masks.head_masks)
    out = torch.zeros(q_t.shape, dtype=torch.float32, device=q_t.device)
    heads_of_masks = {}
    for head, mask_ids in enumerate(masks.head_masks):
        heads_of_masks.setdefault(mask_ids, []).extend(range(head * q_per_head, (head + 1) * q_per_head))
    for mask_ids, q_heads in heads_of_masks.items():
        keys = decode_keys(masks, mask_ids, t, max_len).to(cache.k.device)
        if keys.numel() == 0:
            continue
        q_index = torch.tensor(q_heads)
        rows = cache_rows(cache, kv_heads[q_index], keys[None, :].expand(len(q_heads), -1))
        q_index = q_index.to(q_t.device)
        out[:, q_index] = blocksparse_decode_triton(q_t[:, q_index], cache.k, cache.v, rows.to(torch.int32), scale)
    return out


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
