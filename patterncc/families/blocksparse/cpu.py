"""Set heads on the CPU: block-sparse attention in plain torch, differentiated by autograd.

Per query tile (or per chunk of query tiles that see nearly the same keys), the key rows its rows may see are
gathered (compacted from the layout's tile lists and the mask's predicate), then a masked softmax and a weighted
sum: the work of the tiles the kernels compute, never an n x n mask.
"""

import torch

from ...runtime import tiles

CPU_CHUNK = 16  # query tiles per chunk of the CPU path: widths that grow along the sequence are padded little
# Share a chunk's keys when that computes at most this factor more pairs: one gather and one larger matmul per
# chunk beat a gather per tile (measured on CPU; tests set 0 or inf to force either mode).
CPU_SHARE_LIMIT = 1.25
_SCORES_PER_STEP = 1 << 24  # bounds the score tensor of one step: memory stays O(n), whatever the batch


def cpu_gather(layout, mask, dtype):
    """The CPU path's plan for a mask: (mode, key slots, bias, has_keys, widths, positions).

    Per query tile, the key slots some row of it may see (compacted, ascending), the additive score bias of
    those pairs (0 allowed, -inf not) and which rows have any key. Of natural and permuted order, the one
    with less work is used. mode "tile": every query tile gathers its own keys; mode "chunk": the
    CPU_CHUNK query tiles of a chunk share the union of their keys (one gather and one larger matmul),
    chosen when that union is hardly wider than the tiles' own lists (e.g. growing prefixes of summary
    cells)."""
    key = (mask, dtype)
    if key not in layout.cpu_plans:
        orders = [(layout.classes[mask], layout.positions_cpu[mask])]
        if layout.positions_cpu[mask] is not None:  # the kernels chose a permutation; the CPU may not
            orders.append((layout.natural_classes[mask], None))
        best = min((_compact(layout, mask, classes, positions) for classes, positions in orders),
                   key=lambda plan: plan[0])
        _, slots, allowed, widths, positions = best
        mode, slots, allowed, widths = _share_chunks(layout, slots, allowed, widths)
        has_keys = allowed.any(dim=-1, keepdim=True)
        # A row with no allowed key softmaxes over one dummy key instead of none (which would give NaN);
        # its output is then multiplied by has_keys = 0, so output and gradients are exactly 0.
        allowed[:, :, 0] |= ~has_keys[:, :, 0]
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        layout.cpu_plans[key] = (mode, slots, bias, has_keys.to(dtype), widths, positions)
    return layout.cpu_plans[key]


def _compact(layout, mask, classes, positions):
    """(work, key slots [tiles, width], allowed [tiles, block, width], widths per tile, positions)."""
    n, t, block = layout.n, layout.num_tiles, layout.masks.block
    counts, index = tiles.tile_lists(classes != tiles.EMPTY)
    width = index.shape[1]
    slots = torch.arange(t * block, dtype=torch.int64)
    pos = slots.clone()
    if positions is not None:
        pos[:n] = positions
    real = slots < n
    k_slot = (index.to(torch.int64)[:, :, None] * block + torch.arange(block)).reshape(t, width * block)
    listed = (torch.arange(width)[None, :] < counts[:, None].to(torch.int64)).repeat_interleave(block, dim=1)
    allowed = layout.masks.allowed(mask, pos.view(t, block)[:, :, None], pos[k_slot][:, None, :], n, layout.random_cpu)
    allowed = allowed & (listed & real[k_slot])[:, None, :] & real.view(t, block)[:, :, None]
    # Keep only key slots some row of the tile may see, left-aligned (tile_lists sorts them ascending).
    widths, keep = tiles.tile_lists(allowed.any(dim=1))
    keep = keep.to(torch.int64)
    valid = torch.arange(keep.shape[1])[None, :] < widths[:, None].to(torch.int64)
    compact_slots = torch.gather(k_slot, 1, keep)
    compact_allowed = torch.gather(allowed, 2, keep[:, None, :].expand(t, block, keep.shape[1]))
    compact_allowed &= valid[:, None, :]
    work = int(widths.to(torch.int64).sum())
    return work, compact_slots, compact_allowed, widths, positions


def _share_chunks(layout, slots, allowed, widths):
    """("chunk", union slots per chunk, allowed re-aligned to them, union widths per chunk) when sharing
    costs at most CPU_SHARE_LIMIT times the per-tile work (padded per chunk); else ("tile", inputs as is)."""
    t, block = layout.num_tiles, layout.masks.block
    tile_work, unions = 0, []
    for start in range(0, t, CPU_CHUNK):
        stop = min(start + CPU_CHUNK, t)
        w = int(widths[start:stop].max())
        tile_work += (stop - start) * w
        valid = torch.arange(slots.shape[1])[None, :] < widths[start:stop, None].to(torch.int64)
        unions.append(torch.unique(slots[start:stop][valid]))
    shared_work = sum(min(CPU_CHUNK, t - c * CPU_CHUNK) * u.numel() for c, u in enumerate(unions))
    if shared_work > CPU_SHARE_LIMIT * tile_work:
        return "tile", slots, allowed, widths
    width = max(1, max(u.numel() for u in unions))
    chunk_slots = torch.zeros(len(unions), width, dtype=torch.int64)
    chunk_allowed = torch.zeros(t, block, width, dtype=torch.bool)
    for c, union in enumerate(unions):
        start, stop = c * CPU_CHUNK, min((c + 1) * CPU_CHUNK, t)
        chunk_slots[c, :union.numel()] = union
        # Where each tile's compacted slot sits in the chunk's union (both ascending).
        column = torch.searchsorted(union, slots[start:stop].clamp(min=0))
        column = column.clamp(max=max(union.numel() - 1, 0))
        for tile in range(start, stop):
            w = int(widths[tile])
            chunk_allowed[tile][:, column[tile - start, :w]] = allowed[tile, :, :w]
    chunk_widths = torch.tensor([u.numel() for u in unions], dtype=torch.int32)
    return "chunk", chunk_slots, chunk_allowed, chunk_widths


def _cpu_attention_mask(q, k, v, scale, layout, mask, heads, q_per_kv):
    """Attention for the query heads `heads`, which share mask `mask`: per query tile (or per chunk of query
    tiles sharing their keys), gather the key rows its rows may see, masked softmax, weighted sum."""
    mode, slots, bias, has_keys, widths, positions = cpu_gather(layout, mask, q.dtype)
    n, t, block = layout.n, layout.num_tiles, layout.masks.block
    batch, dim = q.shape[0], q.shape[-1]
    head_index = torch.tensor(heads, device=q.device)
    qm, km, vm = q[:, head_index] * scale, k[:, head_index // q_per_kv], v[:, head_index // q_per_kv]
    if positions is not None:
        qm, km, vm = qm[:, :, positions], km[:, :, positions], vm[:, :, positions]
    pad = t * block - n
    if pad:
        qm, km, vm = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qm, km, vm))
    hm = len(heads)
    q_tiles = qm.reshape(batch, hm, t, block, dim)
    outs = []
    for chunk, start in enumerate(range(0, t, CPU_CHUNK)):
        stop = min(start + CPU_CHUNK, t)
        w = max(1, int(widths[chunk] if mode == "chunk" else widths[start:stop].max()))
        step = max(1, min(stop - start, _SCORES_PER_STEP // (batch * hm * block * w)))
        if mode == "chunk":
            idx = slots[chunk, :w]
            k_chunk, v_chunk = km.index_select(2, idx), vm.index_select(2, idx)  # [batch, heads, w, dim]
        for first in range(start, stop, step):
            last = min(first + step, stop)
            tiles_here = last - first
            if mode == "chunk":
                rows = q_tiles[:, :, first:last].reshape(batch, hm, tiles_here * block, dim)
                scores = torch.matmul(rows, k_chunk.transpose(-1, -2))
                scores += bias[first:last, :, :w].reshape(tiles_here * block, w)
                out = torch.matmul(torch.softmax(scores, dim=-1), v_chunk)
                outs.append(out.reshape(batch, hm, tiles_here, block, dim))
                continue
            idx = slots[first:last, :w].reshape(-1)
            k_gathered = km.index_select(2, idx).reshape(batch, hm, tiles_here, w, dim)
            v_gathered = vm.index_select(2, idx).reshape(batch, hm, tiles_here, w, dim)
            scores = torch.matmul(q_tiles[:, :, first:last], k_gathered.transpose(-1, -2))
            scores += bias[first:last, :, :w]  # 0 where allowed, -inf elsewhere; then one fused softmax
            outs.append(torch.matmul(torch.softmax(scores, dim=-1), v_gathered))
    out = torch.cat(outs, dim=2) * has_keys  # rows with no allowed key: 0, with gradient 0
    out = out.reshape(batch, hm, t * block, dim)[:, :, :n]
    if positions is not None:
        out = out[:, :, torch.argsort(positions)]
    return out


def blocksparse_attention_torch(q, k, v, masks, scale):
    """Block-sparse attention of the heads of `masks` with torch ops, differentiable by autograd: q (batch, heads,
    n, head_dim), heads a multiple of the masks' head count; k, v with heads dividing q's."""
    n = q.shape[2]
    layout = masks.layout(n, "cpu")
    num_q_heads, q_per_kv = q.shape[1], q.shape[1] // k.shape[1]
    q_per_head = num_q_heads // len(masks.head_masks)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    by_mask = {}
    for head in range(num_q_heads):
        by_mask.setdefault(masks.head_masks[head // q_per_head], []).append(head)
    per_head = [None] * num_q_heads
    for mask, heads in by_mask.items():
        out = _cpu_attention_mask(qc, kc, vc, scale, layout, mask, heads, q_per_kv)
        for slot, head in enumerate(heads):
            per_head[head] = out[:, slot]
    return torch.stack(per_head, dim=1).to(q.dtype)
