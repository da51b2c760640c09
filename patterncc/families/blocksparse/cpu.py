"""Set heads on the CPU: block-sparse attention in plain torch, differentiated by autograd.

Per query tile (or per chunk of query tiles that see nearly the same keys), the key rows its rows may see are
gathered (compacted from the layout's tile lists and the mask's predicate), then a masked softmax and a weighted
sum: the work of the tiles the kernels compute, never an n x n mask.
"""

from typing import NamedTuple

import torch

from ...runtime import tiles
from ..shared.dropout import dropout_keep, dropout_offsets
from .layout import PERMUTED_ORDERS

CPU_CHUNK = 16  # query tiles per chunk of the CPU path at most: widths that grow along a sequence are padded little
# Share a chunk's keys when that computes at most this factor more pairs: one gather and one larger matmul per
# chunk beat a gather per tile (measured on CPU; tests set 0 or inf to force either mode).
CPU_SHARE_LIMIT = 1.25
# Memory bounds, in elements: a chunk's plan (query rows x the keys its tiles list), one step of planning (the
# predicate on query rows x listed keys, int64 intermediates) and one step of attention (scores). Each is O(1) in n,
# so planning and the forward pass take memory in proportion to the pairs computed, never n x n.
_PLAN_PER_CHUNK = 1 << 23
_PLAN_PER_STEP = 1 << 22
_SCORES_PER_STEP = 1 << 24


class CpuChunk(NamedTuple):
    """The keys of query tiles start..stop-1: shared (one key list for the chunk, slots [w]) or per tile (slots
    [tiles, w]); blocked [tiles, block, w]: the (query row, key) pairs the mask does not allow (bool: a quarter of
    the memory of a float bias; scores are masked with it in place as they are computed)."""

    start: int
    stop: int
    shared: bool
    slots: torch.Tensor
    blocked: torch.Tensor


class CpuPlan(NamedTuple):
    positions: torch.Tensor | None  # the visiting order (None: natural)
    chunks: list  # of CpuChunk, covering every query tile in order
    has_keys: torch.Tensor  # [tiles, block, 1]: 1 for rows with an allowed key, 0 otherwise
    unpermute: torch.Tensor | None  # each position's slot in the visiting order (None: natural)


def cpu_gather(layout, mask):
    """The CPU path's plan for a mask (a CpuPlan), built once per (layout, mask).

    The order is the kernels' (natural or a grid transpose) or natural, whichever lists fewer key tiles. Per
    chunk of query tiles, the key slots some row may see (compacted, ascending) and their score bias; a chunk
    shares one key list when that union is hardly wider than its tiles' own lists (e.g. growing prefixes of
    summary cells). Planning evaluates the predicate only on listed tiles, in steps of bounded size."""
    if mask not in layout.cpu_plans:
        classes, positions = layout.classes[mask], layout.positions_cpu[mask]
        if PERMUTED_ORDERS and positions is not None:  # the kernels chose a permutation; the CPU may not
            natural = layout.natural_classes[mask]
            if _sampled_work(layout, mask, natural, None) < _sampled_work(layout, mask, classes, positions):
                classes, positions = natural, None
        layout.cpu_plans[mask] = _plan(layout, mask, classes, positions)
    return layout.cpu_plans[mask]


CPU_SAMPLED_TILES = 8  # query tiles whose compacted key lists estimate an order's work


def _sampled_work(layout, mask, classes, positions):
    """The CPU work of a visiting order (keys gathered per query row), estimated from the compacted key lists of
    a few evenly spaced query tiles: what the CPU pays is keys actually seen, not tiles listed, and compacting
    every tile of both orders would cost O(n^2) for a stride in natural order."""
    t = layout.num_tiles
    counts, index, pos, real = _order(layout, classes, positions)
    sample = sorted({(k * (t - 1)) // max(1, CPU_SAMPLED_TILES - 1) for k in range(min(t, CPU_SAMPLED_TILES))})
    widths = [int(_compact(layout, mask, classes, index[i:i + 1], counts[i:i + 1], i, pos, real)[2][0])
              for i in sample]
    return sum(widths) / len(widths)


def _order(layout, classes, positions):
    """(key tiles listed per query tile: counts, index; original position per slot; which slots exist)."""
    n, t, block = layout.n, layout.num_tiles, layout.masks.block
    counts, index = tiles.tile_lists(classes != tiles.EMPTY)
    pos, real = tiles.slot_positions(positions, n, t, block)
    return counts.to(torch.int64), index, pos, real


def _plan(layout, mask, classes, positions):
    t, block = layout.num_tiles, layout.masks.block
    counts, index, pos, real = _order(layout, classes, positions)
    chunks, has_keys = [], []
    start = 0
    while start < t:
        # As many tiles as CPU_CHUNK and the chunk's memory bound allow (at least one).
        stop = start + 1
        while stop < min(start + CPU_CHUNK, t) and \
                (stop + 1 - start) * block * int(counts[start:stop + 1].max()) * block <= _PLAN_PER_CHUNK:
            stop += 1
        slots, allowed, widths = _compact(layout, mask, classes, index[start:stop], counts[start:stop], start, pos,
                                          real)
        chunk, allowed = _share(start, stop, slots, allowed, widths)
        rows_with_keys = allowed.any(dim=-1, keepdim=True)
        # A row with no allowed key softmaxes over one dummy key instead of none (which would give NaN); its
        # output is then multiplied by has_keys = 0, so output and gradients are exactly 0.
        allowed[:, :, 0] |= ~rows_with_keys[:, :, 0]
        chunks.append(chunk._replace(blocked=~allowed))
        has_keys.append(rows_with_keys)
        start = stop
    unpermute = None if positions is None else torch.argsort(positions)
    return CpuPlan(positions, chunks, torch.cat(has_keys), unpermute)


def _compact(layout, mask, classes, index, counts, first_tile, pos, real):
    """For query tiles first_tile.. (their key-tile lists `index`, `counts` in the order `classes` describes): (key
    slots [tiles, w], allowed [tiles, block, w], widths [tiles]), keeping only key slots some row of the tile may
    see, left-aligned. The predicate is evaluated on PARTIAL tiles only: a FULL tile allows every pair."""
    block, n = layout.masks.block, layout.n
    tiles_here = index.shape[0]
    width = max(1, int(counts.max()))
    index = index[:, :width].to(torch.int64)
    k_slot = (index[:, :, None] * block + torch.arange(block)).reshape(tiles_here, width * block)
    listed_tiles = torch.arange(width)[None, :] < counts[:, None]
    listed = listed_tiles.repeat_interleave(block, dim=1) & real[k_slot]
    tile_class = classes[first_tile:first_tile + tiles_here].gather(1, index)  # [tiles, width]
    allowed = (tile_class == tiles.FULL).repeat_interleave(block, dim=1)[:, None, :].repeat(1, block, 1)
    # Columns of the PARTIAL tiles; list padding repeats column block 0, where the predicate is exact too.
    part_counts, part_index = tiles.tile_lists((tile_class == tiles.PARTIAL) & listed_tiles)
    part_cols = (part_index.to(torch.int64)[:, :, None] * block + torch.arange(block)).reshape(tiles_here, -1)
    per_step = max(1, _PLAN_PER_STEP // (block * part_cols.shape[1]))
    for a in range(0, tiles_here if int(part_counts.max()) else 0, per_step):
        b = min(a + per_step, tiles_here)
        rows = pos[(first_tile + a) * block:(first_tile + b) * block].view(b - a, block)
        keys = pos[k_slot[a:b].gather(1, part_cols[a:b])]
        values = layout.masks.allowed(mask, rows[:, :, None], keys[:, None, :], n, layout.random_cpu)
        allowed[a:b].scatter_(2, part_cols[a:b, None, :].expand(b - a, block, part_cols.shape[1]), values)
    query_real = real[first_tile * block:(first_tile + tiles_here) * block].view(tiles_here, block)
    allowed &= listed[:, None, :] & query_real[:, :, None]
    widths, keep = tiles.tile_lists(allowed.any(dim=1))
    keep = keep.to(torch.int64)
    valid = torch.arange(keep.shape[1])[None, :] < widths[:, None].to(torch.int64)
    slots = torch.gather(k_slot, 1, keep)
    allowed = torch.gather(allowed, 2, keep[:, None, :].expand(tiles_here, block, keep.shape[1])) & valid[:, None, :]
    return slots, allowed, widths.to(torch.int64)


def _share(start, stop, slots, allowed, widths):
    """(CpuChunk without its mask, allowed aligned to its slots): the chunk's tiles share the union of their key slots
    when that costs at most CPU_SHARE_LIMIT times their own lists (padded to the widest)."""
    tiles_here, block = allowed.shape[0], allowed.shape[1]
    valid = torch.arange(slots.shape[1])[None, :] < widths[:, None]
    union = torch.unique(slots[valid])
    if union.numel() == 0 or tiles_here * union.numel() > CPU_SHARE_LIMIT * tiles_here * int(widths.max()):
        return CpuChunk(start, stop, False, slots, None), allowed
    shared = torch.zeros(tiles_here, block, union.numel(), dtype=torch.bool)
    # Where each tile's compacted slot sits in the union (both ascending).
    column = torch.searchsorted(union, slots).clamp(max=union.numel() - 1)
    for tile in range(tiles_here):
        w = int(widths[tile])
        shared[tile][:, column[tile, :w]] = allowed[tile, :, :w]
    return CpuChunk(start, stop, True, union, None), shared


class _MaskRows(NamedTuple):
    """One mask's query heads in the CPU plan's order: rows permuted to the visiting order and padded to whole
    tiles (q scaled), key slots gathered through `keys`; `rows` and `positions` move other per-row tensors in and
    out of that order."""

    plan: CpuPlan
    q_tiles: torch.Tensor  # [batch, heads, tiles, block, d]
    km: torch.Tensor  # [batch, heads, tiles x block, d]
    vm: torch.Tensor

    def keys(self, slots):
        """(k, v) [batch, heads, *slots.shape, d] of key slots (int64)."""
        batch, heads, _, dim = self.km.shape
        return tuple(x.index_select(2, slots.reshape(-1)).reshape(batch, heads, *slots.shape, dim)
                     for x in (self.km, self.vm))

    def rows(self, x):
        """Per-row x [batch, heads, n, ...] -> the plan's order, padded, [batch, heads, tiles, block, ...]."""
        return _plan_rows(self.plan, *self.q_tiles.shape[2:4], x)

    def positions(self, x, n):
        """Per-slot x [batch, heads, tiles x block, ...] in the plan's order -> original positions, [:, :, :n]."""
        if PERMUTED_ORDERS and self.plan.unpermute is not None:
            return x[:, :, self.plan.unpermute]
        return x[:, :, :n]


def _plan_rows(plan, tiles, block, x):
    if PERMUTED_ORDERS and plan.positions is not None:
        x = x[:, :, plan.positions]
    pad = tiles * block - x.shape[2]
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], pad, *x.shape[3:])], dim=2)
    return x.reshape(x.shape[0], x.shape[1], tiles, block, *x.shape[3:])


def _mask_rows(q, k, v, scale, layout, mask, heads, q_per_kv):
    """_MaskRows of query heads `heads` (q's), which share mask `mask`."""
    plan = cpu_gather(layout, mask)
    head_index = torch.tensor(heads, device=q.device)
    tiles, block = layout.num_tiles, layout.masks.block
    km, vm = (_plan_rows(plan, tiles, block, x[:, head_index // q_per_kv]).flatten(2, 3) for x in (k, v))
    return _MaskRows(plan, _plan_rows(plan, tiles, block, q[:, head_index] * scale), km, vm)


def _cpu_attention_mask(q, k, v, scale, layout, mask, heads, q_per_kv, with_lse=False, dropout=None):
    """Attention for the query heads `heads`, which share mask `mask`: per query tile (or per chunk of query
    tiles sharing their keys), gather the key rows its rows may see, masked softmax, weighted sum. With_lse:
    (output, natural log-sum-exp per row, -inf for a row with no allowed key). dropout: a Dropout or None (the
    LSE is that of the probabilities before dropout, as the kernels')."""
    rows = _mask_rows(q, k, v, scale, layout, mask, heads, q_per_kv)
    plan, n, block = rows.plan, layout.n, layout.masks.block
    batch, hm, t = rows.q_tiles.shape[:3]

    def drop(first, last, key_slots):
        return _dropout(dropout, q, heads, plan, first * block, last * block, key_slots, n)

    pieces = attend_tiles(plan, [(0, t)], lambda first, last: rows.q_tiles[:, :, first:last], rows.keys,
                          batch * hm, block, with_lse, drop if dropout is not None else None)
    out = torch.cat([out for _, _, out, _ in pieces], dim=2) * plan.has_keys.to(q.dtype)  # no key: 0, gradient 0
    out = rows.positions(out.flatten(2, 3), n)
    if not with_lse:
        return out
    lse = torch.cat([lse for _, _, _, lse in pieces], dim=2).masked_fill(plan.has_keys == 0, float("-inf"))
    return out, rows.positions(lse.flatten(2, 4), n)


def _cpu_attention_mask_backward(q, k, v, scale, layout, mask, heads, q_per_kv, lse, grad, delta, dropout=None):
    """The gradients of _cpu_attention_mask's output for query heads `heads`, without autograd and without its
    saved probabilities (FlashAttention's backward on the CPU plan): (dq, dk, dv), each [batch, len(heads), n, d]
    (dk, dv per query head; the caller sums a kv head's). lse [batch, heads, n]: the head's final natural
    log-sum-exp per row (a split head's over all its parts, so the parts' gradients add up); grad: dO; delta:
    rowsum(dO * O) of the final output. P = exp(s - lse) is recomputed per step; dV = (P * drop)^T dO,
    dS = P * (dP * drop - delta), dQ = dS K * scale, dK = dS^T (Q * scale)."""
    rows = _mask_rows(q, k, v, scale, layout, mask, heads, q_per_kv)
    plan, n, block = rows.plan, layout.n, layout.masks.block
    batch, hm, t = rows.q_tiles.shape[:3]
    head_index = torch.tensor(heads, device=q.device)
    # A row with no key under this mask (its dummy key included) gets P = 0: LSE +inf.
    lse_tiles = rows.rows(lse[:, head_index][..., None]).masked_fill(plan.has_keys == 0, float("inf"))
    do_tiles, delta_tiles = rows.rows(grad[:, head_index]), rows.rows(delta[:, head_index][..., None])
    dq, dk, dv = (torch.zeros_like(x) for x in (rows.q_tiles.flatten(2, 3), rows.km, rows.vm))
    for chunk, first, last, (k_chunk, v_chunk) in _chunk_steps(plan, [(0, t)], batch * hm, block, rows.keys):
        local = slice(first - chunk.start, last - chunk.start)
        q_step, do_step = rows.q_tiles[:, :, first:last], do_tiles[:, :, first:last]
        lse_step, delta_step = lse_tiles[:, :, first:last], delta_tiles[:, :, first:last]
        if chunk.shared:  # one key list for the step's rows: [b, h, rows, d] against [b, h, w, d]
            q_step, do_step, lse_step, delta_step = (x.flatten(2, 3) for x in (q_step, do_step, lse_step,
                                                                                 delta_step))
            slots, blocked = chunk.slots, chunk.blocked[local].flatten(0, 1)
            key_slots = slots.view(1, -1)
        else:  # per tile: [b, h, tiles, block, d] against [b, h, tiles, w, d]
            slots, blocked = chunk.slots[local], chunk.blocked[local]
            k_chunk, v_chunk = rows.keys(slots)
            key_slots = slots[:, None, :]
        scores = torch.matmul(q_step, k_chunk.transpose(-1, -2)).masked_fill_(blocked, float("-inf"))
        probabilities = scores.sub_(lse_step).exp_()
        drop = _dropout(dropout, q, heads, plan, first * block, last * block, key_slots, n)
        dv_slots = torch.matmul((probabilities if drop is None else probabilities * drop).transpose(-1, -2), do_step)
        dp = torch.matmul(do_step, v_chunk.transpose(-1, -2))
        ds = (dp if drop is None else dp.mul_(drop)).sub_(delta_step).mul_(probabilities)
        dq[:, :, first * block:last * block] = torch.matmul(ds, k_chunk).reshape(batch, hm, -1, q.shape[-1])
        dk_slots = torch.matmul(ds.transpose(-1, -2), q_step)
        dk.index_add_(2, slots.reshape(-1), dk_slots.reshape(batch, hm, -1, q.shape[-1]))
        dv.index_add_(2, slots.reshape(-1), dv_slots.reshape(batch, hm, -1, q.shape[-1]))
    return rows.positions(dq * scale, n), rows.positions(dk, n), rows.positions(dv, n)


def attend_tiles(plan, ranges, queries, keys, batch_heads, block, with_lse, drop=None):
    """The masked softmax attention of a CpuPlan's query tiles in `ranges` ([(first, last)], ascending, disjoint):
    [(first, last, out [batch, heads, tiles, block, d], lse [batch, heads, tiles, block, 1] or None)] in tile order.
    queries(first, last) -> the scaled query rows [batch, heads, last - first, block, d] of those tiles (in the
    plan's order); keys(slots) -> (k, v) [batch, heads, *slots.shape, d] of the plan's key slots (an int64
    tensor); batch_heads: batch x heads (bounds the scores of one step); drop(first, last, key_slots) -> dropout's
    multiplier, or drop None. Rows with no allowed key come out of one dummy key; callers zero them with
    plan.has_keys. The single-process CPU path and context parallel (patterncc.distributed, whose keys come from
    several ranks) share this loop."""
    pieces = []
    for chunk, first, last, shared_keys in _chunk_steps(plan, ranges, batch_heads, block, keys):
        pieces.append((first, last, *_attend_chunk(chunk, queries(first, last), first, last, *shared_keys, keys,
                                                    with_lse, drop)))
    return pieces


def _chunk_steps(plan, ranges, batch_heads, block, keys):
    """The tile loop of attend_tiles and of the backward pass: (chunk, first, last, (k, v) of a shared chunk's
    keys or (None, None)) for each step of query tiles first..last - 1, each step at most _SCORES_PER_STEP
    scores; a shared chunk's keys are gathered once."""
    for chunk in plan.chunks:
        w = chunk.blocked.shape[-1]
        shared_keys = (None, None)
        step = max(1, _SCORES_PER_STEP // (batch_heads * block * w))
        for lo, hi in ranges:
            lo, hi = max(lo, chunk.start), min(hi, chunk.stop)
            if lo >= hi:
                continue
            if chunk.shared and shared_keys[0] is None:
                shared_keys = keys(chunk.slots)  # [b, h, w, d]
            for first in range(lo, hi, step):
                yield chunk, first, min(first + step, hi), shared_keys


def _attend_chunk(chunk, rows, first, last, k_chunk, v_chunk, keys, with_lse, drop):
    """(out, lse) of query tiles first..last - 1 of `chunk`, rows [batch, heads, tiles, block, d]."""
    batch, hm, tiles_here, block, dim = rows.shape
    local = slice(first - chunk.start, last - chunk.start)
    w = chunk.blocked.shape[-1]
    if chunk.shared:
        scores = torch.matmul(rows.reshape(batch, hm, tiles_here * block, dim), k_chunk.transpose(-1, -2))
        scores.masked_fill_(chunk.blocked[local].reshape(tiles_here * block, w), float("-inf"))
        out, lse = _attend(scores, v_chunk, with_lse, drop(first, last, chunk.slots.view(1, -1)) if drop else None)
        return (out.reshape(batch, hm, tiles_here, block, dim),
                lse.reshape(batch, hm, tiles_here, block, 1) if with_lse else None)
    k_gathered, v_gathered = keys(chunk.slots[local])  # [b, h, tiles, w, d]
    scores = torch.matmul(rows, k_gathered.transpose(-1, -2))
    scores.masked_fill_(chunk.blocked[local], float("-inf"))  # then one fused softmax
    return _attend(scores, v_gathered, with_lse, drop(first, last, chunk.slots[local][:, None, :]) if drop else None)


def _dropout(dropout, q, heads, plan, first_slot, stop_slot, key_slots, n):
    """Dropout's multiplier (1 / (1 - p) kept, 0 dropped) for scores of query slots first_slot..stop_slot - 1 x
    key slots (shared [1, w], or per tile [tiles, 1, w]) of the query heads `heads`, or None without dropout: the
    kernels' Philox numbers at the pairs' original positions."""
    if dropout is None:
        return None
    query_slots = torch.arange(first_slot, stop_slot).view(*key_slots.shape[:-2], -1, 1)
    if PERMUTED_ORDERS and plan.positions is not None:
        query_slots, key_slots = (plan.positions[s.clamp(max=n - 1)] for s in (query_slots, key_slots))
    keep = dropout_keep(dropout, dropout_offsets(q.shape[0], q.shape[1], n, heads, query_slots, key_slots))
    return keep.to(q.dtype) * dropout.scale


def _attend(scores, values, with_lse, drop=None):
    """(softmax(scores) (times dropout's multiplier `drop`) @ values, the rows' log-sum-exp [..., 1] or None)."""
    if not with_lse:
        probabilities = torch.softmax(scores, dim=-1)
        lse = None
    elif torch.is_grad_enabled() and scores.requires_grad:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probabilities = torch.exp(scores - lse)
    else:  # no autograd (the traced operator's forward): in place, and faster than torch.logsumexp on the CPU
        top = scores.amax(dim=-1, keepdim=True)
        probabilities = scores.sub_(top).exp_()
        total = probabilities.sum(dim=-1, keepdim=True)
        probabilities.div_(total)
        lse = top + total.log()
    if drop is not None:
        probabilities = probabilities * drop
    return torch.matmul(probabilities, values), lse


def combine_parts(parts, exp=torch.exp, log=torch.log):
    """Attention over the union of disjoint key sets, from each set's (output, log-sum-exp per row; +inf or -inf
    for a row with no key in it): (outputs weighted by exp(lse_k - lse), lse; +inf for a row with no key at all).
    exp, log: the LSE's base (the kernels' is 2). Differentiable: the CPU path's split heads run through it."""
    lse = torch.stack([part_lse for _, part_lse in parts])  # [parts, ...]
    lse = torch.where(torch.isinf(lse), float("-inf"), lse)
    top = lse.max(dim=0).values.detach()
    top = torch.where(top == float("-inf"), 0.0, top)
    weights = exp(lse - top)
    total = weights.sum(dim=0)
    has_keys = total > 0
    out = sum(w[..., None] * part_out for w, (part_out, _) in zip(weights, parts))
    out = out / torch.where(has_keys, total, 1.0)[..., None]
    return out, torch.where(has_keys, top + log(torch.where(has_keys, total, 1.0)), float("inf"))


def blocksparse_attention_torch(q, k, v, masks, scale, dropout=None, with_lse=False):
    """Block-sparse attention of the heads of `masks` with torch ops, differentiable by autograd: q (batch, heads,
    n, head_dim), heads a multiple of the masks' head count; k, v with heads dividing q's. A head split into
    parts attends over each and combines them by log-sum-exp. dropout: a Dropout or None (the same pairs as the
    kernels drop). with_lse: (output, natural log-sum-exp per row [batch, heads, n]), for
    blocksparse_torch_backward."""
    layout = masks.layout(q.shape[2], "cpu")
    q_per_kv = q.shape[1] // k.shape[1]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)

    def attend_mask(mask, heads, mask_lse):
        return _cpu_attention_mask(qc, kc, vc, scale, layout, mask, heads, q_per_kv, mask_lse, dropout)

    if with_lse:
        out, lse = attend_mask_heads(masks, q.shape[1], attend_mask, with_lse=True)
        return out.to(q.dtype), lse
    return attend_mask_heads(masks, q.shape[1], attend_mask).to(q.dtype)


def blocksparse_torch_backward(q, k, v, out, lse, grad, masks, scale, dropout=None):
    """(dq, dk, dv) of blocksparse_attention_torch from its output and LSE (with_lse=True) and dO, recomputing
    each step's probabilities instead of keeping them (autograd would keep every computed pair's): what the
    traced operator's backward runs on the CPU. Split heads: each part with the head's final LSE."""
    layout = masks.layout(q.shape[2], "cpu")
    batch, num_q_heads, n, dim = q.shape
    q_per_kv = num_q_heads // k.shape[1]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, vc, grad = q.to(compute), k.to(compute), v.to(compute), grad.to(compute)
    delta = (grad * out.to(compute)).sum(-1)  # rowsum(dO * O), O after dropout
    dq = torch.zeros_like(qc)
    dk_per_q, dv_per_q = (torch.zeros(batch, num_q_heads, n, dim, dtype=compute, device=q.device) for _ in range(2))
    lse = lse.to(compute)
    for mask, heads in _heads_by_mask(masks, num_q_heads).items():
        shares = _cpu_attention_mask_backward(qc, kc, vc, scale, layout, mask, heads, q_per_kv, lse, grad, delta,
                                              dropout)
        for total, share in zip((dq, dk_per_q, dv_per_q), shares):
            total[:, heads] += share
    # Grouped-query attention: a kv head's gradient sums over the query heads that share it.
    dk, dv = (x.view(batch, k.shape[1], q_per_kv, n, dim).sum(2) for x in (dk_per_q, dv_per_q))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _heads_by_mask(masks, num_q_heads):
    """{mask: the query heads whose set head runs it} (a split head's parts are several masks)."""
    q_per_head = num_q_heads // len(masks.head_masks)
    by_mask = {}
    for head in range(num_q_heads):
        for mask in masks.head_masks[head // q_per_head]:
            by_mask.setdefault(mask, []).append(head)
    return by_mask


def attend_mask_heads(masks, num_q_heads, attend_mask, with_lse=False):
    """Every query head's output [batch, heads, rows, d] from per-mask attention: attend_mask(mask, query heads,
    with_lse) -> out [batch, len(heads), rows, d] (with its LSE per row when with_lse). A head split into parts
    combines its parts by log-sum-exp. with_lse: (output, LSE per row [batch, heads, rows])."""
    q_per_head = num_q_heads // len(masks.head_masks)
    by_mask = _heads_by_mask(masks, num_q_heads)
    split = masks.num_parts > 1
    results = {mask: attend_mask(mask, heads, split or with_lse) for mask, heads in by_mask.items()}
    per_head, per_head_lse = [], []
    for head in range(num_q_heads):
        shares = [(results[mask], by_mask[mask].index(head)) for mask in masks.head_masks[head // q_per_head]]
        if split:
            out, lse = combine_parts([(out[:, slot], lse[:, slot]) for (out, lse), slot in shares])
        elif with_lse:
            ((out, lse), slot), = shares
            out, lse = out[:, slot], lse[:, slot]
        else:
            (out, slot), = shares
            out = out[:, slot]
        per_head.append(out)
        per_head_lse.append(lse if with_lse else None)
    if with_lse:
        return torch.stack(per_head, dim=1), torch.stack(per_head_lse, dim=1)
    return torch.stack(per_head, dim=1)
