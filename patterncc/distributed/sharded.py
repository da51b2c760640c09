"""Context parallel, the module: each rank attends its own positions, fetching from other ranks only what its
rows read, with torch.distributed collectives (gloo on CPU, NCCL on CUDA) that carry their gradients back.

Per family, one exchange per forward call (and its mirror in backward):
- set heads: one all_to_all_single of exactly the remote key/value rows the plan lists (`Shard.kv_reads`); each
  rank then runs the CPU path's tile loop (`attend_tiles`) on the query rows it owns, gathering keys from its own
  rows and the received ones. The exchange is started asynchronously: the first mask's tiles whose rows read only
  the rank's own keys are computed before waiting for it. Backward sends each received row's dK/dV back to its
  owner, which adds them (synchronously).
- kernel heads: one all_gather of each rank's per-run state sums; a run starts from the sum of the states of
  every earlier run (causal; FAVOR+ states rescaled to the largest key exponent before it), or every rank uses
  the total (non-causal). Backward returns each state's gradient to its owner.
- hashed heads: one all_to_all_single that gives every rank every position's q, k and v of the hashed heads: the
  buckets depend on the data, so each rank hashes and sorts the whole sequence of those heads, as one process
  would, and keeps its own rows.
The torch path runs on every device; the Triton kernels are not used under context parallel yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import PatternUsageError
from ..families.blocksparse.cpu import attend_mask_heads, attend_tiles, cpu_gather
from ..families.linear.cpu import linear_attention_torch, linear_phi
from ..families.linear.ops import linear_prefill_state
from ..families.lsh.ops import lsh_attention
from ..families.shared.heads import assemble_heads, attention_scale, heads_of, per_q_head
from ..runtime import tiles
from .plan import Shard


class ShardedAttention(torch.nn.Module):
    """A patterncc attention module over a sequence sharded across the ranks of a process group.

    module_or_pattern: a module from patterncc.load, or a .attn path or text (loaded with **params); it must be
    the pattern `shard` was planned for. forward(q_local, k_local, v_local) on each rank, with q_local (batch,
    heads, shard length, head_dim) holding the positions shard.positions(rank) in that order (k_local, v_local
    likewise, kv_heads dividing heads), returns that rank's rows of the single-process module's output, and
    backward leaves each rank the gradients of its own positions. Every rank of `group` (default: the world)
    calls it with the same shapes. `bytes_received`: what the last forward call received on this rank."""

    def __init__(self, module_or_pattern, group=None, *, shard: Shard, **params):
        super().__init__()
        if isinstance(module_or_pattern, torch.nn.Module):
            if params:
                raise PatternUsageError("parameters go to patterncc.load() when the pattern is already a module")
            module = module_or_pattern
        else:
            from ..api import load

            module = load(module_or_pattern if isinstance(module_or_pattern, Path) else str(module_or_pattern),
                          **params)
        self.generated = sys.modules[type(module).__module__]
        if self.generated.PATTERN_KEY != shard.generated.PATTERN_KEY:
            raise PatternUsageError(f"the shard was planned for pattern key {shard.generated.PATTERN_KEY}, this "
                                    f"module is {self.generated.PATTERN_KEY}: plan with the same pattern and params")
        self.attention = module
        self.group = group
        self.shard = shard
        self.bytes_received = 0
        self._synced_buffers = False
        self._exchanges = {}  # (rank, q heads, kv heads) -> the set heads' exchange plan
        self._rank_plans = {}  # (rank, mask) -> this rank's share of the mask's CPU plan

    def forward(self, q, k, v, *, scale=None):
        g = self.generated
        rank = dist.get_rank(self.group)
        self._check(q, k, v, rank)
        scale = attention_scale(q, self.attention.scale if scale is None else scale)
        buffers = self._random_draws(q)
        self.bytes_received = 0
        pieces = []
        if "set" in g.HEAD_FAMILIES:
            q_set, k_set, v_set = heads_of(q, k, v, g.SET_HEADS, g.NUM_HEADS, expand_kv=False)
            pieces.append((g.SET_HEADS, self._set_heads(q_set, k_set, v_set, scale, rank)))
        for call in getattr(g, "HASHED_CALLS", []):
            pieces.append((call.heads, self._hashed_call(q, k, v, call, buffers, scale, rank)))
        for call in getattr(g, "KERNEL_CALLS", []):
            pieces.append((call.heads, self._kernel_call(q, k, v, call, buffers, rank)))
        return assemble_heads(pieces, q, g.NUM_HEADS)

    def _check(self, q, k, v, rank):
        shard = self.shard
        world = dist.get_world_size(self.group)
        if world != shard.world_size:
            raise ValueError(f"the shard was planned for {shard.world_size} ranks, the process group has {world}")
        self.generated.check_attention_inputs(q, k, v, self.generated.NUM_HEADS, "torch", ())
        if q.shape[2] != shard.shard_length(rank):
            raise ValueError(f"rank {rank} owns {shard.shard_length(rank)} positions (shard.positions({rank})), "
                             f"but q has {q.shape[2]}")

    def _random_draws(self, q):
        """The module's random draws (hashed rotations, FAVOR+ features), identical on every rank: rank 0's are
        broadcast at the first call."""
        names = getattr(self.generated, "BUFFERS", [])
        if not names:
            return {}
        buffers = self.attention._buffers_for(q.shape[-1], q.device)
        if not self._synced_buffers:
            for name in names:
                dist.broadcast(buffers[name], src=dist.get_global_rank(self.group, 0) if self.group else 0,
                               group=self.group)
            self._synced_buffers = True
        return buffers

    def _received(self, tensor, own=0):
        self.bytes_received += (tensor.numel() - own) * tensor.element_size()
        return tensor

    # Set heads ---------------------------------------------------------------------------------------------

    def _exchange_plan(self, rank, q_heads, kv_heads, device):
        """(send index into this rank's kv rows, send splits, receive splits, [kv heads, n] row of each
        (kv head, position) in the store: own rows first, then received ones, -1 where absent)."""
        key = (rank, q_heads, kv_heads)
        if key not in self._exchanges:
            shard = self.shard
            local = shard.shard_length(rank)
            reads = [shard.kv_reads(r, q_heads, kv_heads) for r in range(shard.world_size)]
            send, send_splits, recv_splits = [], [], []
            lookup = torch.full((kv_heads, shard.n), -1, dtype=torch.int64)
            mine = shard.positions(rank)
            for head in range(kv_heads):
                lookup[head, mine] = head * local + torch.arange(local)
            row = kv_heads * local
            for other in range(shard.world_size):
                sent = received = 0
                for head in range(kv_heads):
                    wanted = reads[other][head]  # what `other` reads of kv head `head`
                    from_me = wanted[shard.owner[wanted] == rank]
                    send.append(head * local + shard.local_index[from_me])
                    sent += len(from_me)
                    mine_in = reads[rank][head]
                    got = mine_in[shard.owner[mine_in] == other]
                    lookup[head, got] = torch.arange(row, row + len(got))
                    row += len(got)
                    received += len(got)
                send_splits.append(sent)
                recv_splits.append(received)
            self._exchanges[key] = (torch.cat(send).to(device), send_splits, recv_splits, lookup.to(device))
        return self._exchanges[key]

    def _set_heads(self, q, k, v, scale, rank):
        g, shard = self.generated, self.shard
        masks = g.PATTERN_MASKS
        layout = masks.layout(shard.n, "cpu")
        batch, kv_heads, local, dim = k.shape
        send_index, send_splits, recv_splits, lookup = self._exchange_plan(rank, q.shape[1], kv_heads, q.device)
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        rows = torch.cat([k, v], dim=-1).permute(1, 2, 0, 3).reshape(kv_heads * local, batch, 2 * dim)
        outgoing = rows.index_select(0, send_index)
        pending = []  # the exchange runs while the query tiles that read only local keys are computed
        incoming = self._received(exchange(outgoing, send_splits, recv_splits, self.group, pending))
        store = _KeyStore(rows, incoming, pending[0], compute)
        qc = q.to(compute) * scale
        q_per_kv = q.shape[1] // kv_heads

        def attend_mask(mask, heads, with_lse):
            return self._attend_mask(layout, mask, heads, qc, store, lookup[torch.tensor(heads) // q_per_kv], rank,
                                     with_lse)

        return attend_mask_heads(masks, q.shape[1], attend_mask).to(q.dtype)

    def _rank_plan(self, layout, plan, mask, rank, device):
        """This rank's share of the mask's CPU plan: its chunks keep only the query rows the rank owns (a tile of a
        grid-transposed order may hold a few owned rows: the rest are not computed), padded per chunk to the most
        rows a tile keeps. Returns (chunks, query slot of each kept row [tiles, block] (-1 padding), per tile its
        chunk's row width, the tile ranges holding its rows ([those reading only its own keys, those reading remote
        keys too]), original position per slot)."""
        key = (rank, mask)
        if key not in self._rank_plans:
            shard, block = self.shard, layout.masks.block
            pos, real = tiles.slot_positions(plan.positions, shard.n, layout.num_tiles, block)
            pos = pos.clamp(max=shard.n - 1)
            owned = (real & (shard.owner[pos] == rank)).view(-1, block)  # [tiles, block]
            chunks, kept_slots, widths = [], [], []
            remote = torch.zeros(layout.num_tiles, dtype=torch.bool)
            for chunk in plan.chunks:
                mine = owned[chunk.start:chunk.stop]
                width = max(1, int(mine.sum(1).max()))
                # Owned rows first (a stable sort keeps their order), then padding rows, cut to `width`.
                offsets = torch.argsort((~mine).to(torch.int8), dim=1, stable=True)[:, :width]
                valid = mine.gather(1, offsets)
                blocked = chunk.blocked.gather(1, offsets[..., None].expand(-1, -1, chunk.blocked.shape[-1]))
                blocked[~valid] = True
                blocked[..., 0] &= valid  # a padding row softmaxes over one dummy key (dropped), never none
                keeps = plan.has_keys[chunk.start:chunk.stop, :, 0].to(torch.bool).gather(1, offsets) & valid
                slots = (torch.arange(chunk.start, chunk.stop)[:, None] * block + offsets).masked_fill(~keeps, -1)
                chunks.append(chunk._replace(blocked=blocked))
                kept_slots.append(torch.nn.functional.pad(slots, (0, block - width), value=-1))
                widths += [width] * (chunk.stop - chunk.start)
                # Whether a kept row reads a key another rank owns: such tiles wait for the exchange.
                key_owner = shard.owner[pos[chunk.slots.clamp(max=shard.n - 1)]].view(-1 if not chunk.shared else 1,
                                                                                     chunk.slots.shape[-1])
                reads = ~blocked & keeps[..., None] & (key_owner != rank)[:, None, :]
                remote[chunk.start:chunk.stop] = reads.any(2).any(1)
            ranges = {False: [], True: []}  # tiles holding this rank's rows: local keys only / remote keys too
            for tile in torch.nonzero(owned.any(1))[:, 0].tolist():
                runs = ranges[bool(remote[tile])]
                if runs and runs[-1][1] == tile:
                    runs[-1][1] = tile + 1
                else:
                    runs.append([tile, tile + 1])
            self._rank_plans[key] = (chunks, torch.cat(kept_slots).to(device), widths,
                                     [[tuple(r) for r in ranges[remote]] for remote in (False, True)], pos.to(device))
        return self._rank_plans[key]

    def _attend_mask(self, layout, mask, heads, q, store, lookup, rank, with_lse):
        """This rank's rows of mask `mask` for query heads `heads`: (out [batch, heads, local, d], LSE or None).
        Tiles whose rows read only this rank's keys run first, while the exchange may still be under way."""
        shard = self.shard
        plan = cpu_gather(layout, mask)
        chunks, kept_slots, widths, (local_ranges, remote_ranges), slot_position = self._rank_plan(
            layout, plan, mask, rank, q.device)
        batch, local, dim = q.shape[0], q.shape[2], q.shape[-1]
        hm = len(heads)
        q_rows = torch.cat([q[:, heads], q.new_zeros(batch, hm, 1, dim)], dim=2)  # row `local`: padding
        local_index = shard.local_index.to(q.device)

        def local_rows(first, last):  # [tiles, width]: the kept rows' local index, `local` for padding
            slots = kept_slots[first:last, :widths[first]]  # tiles of one chunk: one width
            return torch.where(slots >= 0, local_index[slot_position[slots.clamp(min=0)]], local)

        def queries(first, last):
            rows = local_rows(first, last)
            return q_rows.index_select(2, rows.reshape(-1)).view(batch, hm, *rows.shape, dim)

        def keys_from(rows_of_store, lookup_of):
            def keys(slots):
                store_rows = lookup_of.gather(1, slot_position[slots.reshape(-1)][None].expand(hm, -1))  # [hm, S]
                gathered = rows_of_store.index_select(0, store_rows.reshape(-1)).view(hm, *slots.shape, batch, 2 * dim)
                gathered = gathered.movedim(-2, 0)  # [batch, hm, *slots.shape, 2d]
                return gathered[..., :dim], gathered[..., dim:]
            return keys

        own_plan = plan._replace(chunks=chunks)
        # Own rows only (absent and remote keys read a zero row: no kept row of these tiles reads them).
        own_lookup = torch.where((lookup >= 0) & (lookup < store.own_rows), lookup, store.own_rows)
        pieces = attend_tiles(own_plan, local_ranges, queries, keys_from(store.local, own_lookup), batch * hm,
                              layout.masks.block, with_lse)
        if remote_ranges:
            full = store.full()
            full_lookup = torch.where(lookup >= 0, lookup, full.shape[0] - 1)
            pieces += attend_tiles(own_plan, remote_ranges, queries, keys_from(full, full_lookup), batch * hm,
                                   layout.masks.block, with_lse)
        rows = torch.cat([local_rows(first, last).reshape(-1) for first, last, _, _ in pieces])
        kept = rows < local  # owned rows with a key: the others stay 0 (and -inf LSE)
        out = torch.cat([o.reshape(batch, hm, -1, dim) for _, _, o, _ in pieces], dim=2)[:, :, kept]
        out = q.new_zeros(batch, hm, local, dim).index_copy(2, rows[kept], out)
        if not with_lse:
            return out
        lse = torch.cat([s.reshape(batch, hm, -1) for _, _, _, s in pieces], dim=2)[:, :, kept]
        return out, q.new_full((batch, hm, local), float("-inf")).index_copy(2, rows[kept], lse)

    # Hashed heads ------------------------------------------------------------------------------------------

    def _hashed_call(self, q, k, v, call, buffers, scale, rank):
        """Every position's q, k, v of the call's heads from every rank, the call's attention over the whole
        sequence in global order, and this rank's rows of it."""
        g, shard = self.generated, self.shard
        q_part, k_part, v_part = heads_of(q, k, v, call.heads, g.NUM_HEADS, expand_kv=True)
        batch, heads, local, dim = q_part.shape
        rows = torch.cat([q_part, k_part, v_part], dim=-1).permute(2, 0, 1, 3)  # [local, batch, heads, 3d]
        world = shard.world_size
        outgoing = rows.repeat(world - 1, 1, 1, 1)  # this rank's rows for every other rank
        splits = [0 if r == rank else local for r in range(world)]
        recv_splits = [0 if r == rank else shard.shard_length(r) for r in range(world)]
        incoming = self._received(exchange(outgoing, splits, recv_splits, self.group))
        others = torch.cat([shard.positions(r) for r in range(world) if r != rank]).to(q.device)
        mine = shard.positions(rank).to(q.device)
        full = torch.cat([rows, incoming]).index_select(0, torch.argsort(torch.cat([mine, others])))
        full = full.permute(1, 2, 0, 3)  # [batch, heads, n, 3d]
        rotations = per_q_head(buffers[call.buffer], q, g.NUM_HEADS)
        out = lsh_attention(full[..., :dim], full[..., dim:2 * dim], full[..., 2 * dim:], rotations, call.chunk,
                              g.CAUSAL, call.shared_qk, scale, "torch")
        return out.index_select(2, mine)

    # Kernel heads ------------------------------------------------------------------------------------------

    def _kernel_call(self, q, k, v, call, buffers, rank):
        """Each run of this rank's positions starts from the states of every earlier run (causal) or every rank
        uses the sum of all states (non-causal), gathered once from every rank."""
        g, shard = self.generated, self.shard
        q_part, k_part, v_part = heads_of(q, k, v, call.heads, g.NUM_HEADS, expand_kv=True)
        projection = per_q_head(buffers[call.buffer], q, g.NUM_HEADS) if call.feature_map == "favor" else None
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qc, kc, vc = q_part.to(compute), k_part.to(compute), v_part.to(compute)
        runs = _local_runs(shard.runs[rank])
        favor = call.feature_map == "favor"
        own = torch.stack([_run_state(kc[:, :, a:b], vc[:, :, a:b], call.feature_map, projection) for a, b in runs])
        world = shard.world_size
        splits = [0 if r == rank else len(own) for r in range(world)]  # own runs to every other rank, and theirs
        others = self._received(exchange(own.repeat(world - 1, 1, 1, 1), splits, splits, self.group))
        # Every rank's runs in rank order: [runs of all ranks, batch, heads, F * d + F + 1].
        states = torch.cat([others[:rank * len(own)], own, others[rank * len(own):]])
        order = [start for r in range(shard.world_size) for start, _ in shard.runs[r]]
        dim, features = vc.shape[-1], own.shape[-1] // (vc.shape[-1] + 1)
        if not g.CAUSAL:
            total = _combine_states(states, favor)
            phi_q, _ = linear_phi(qc, call.feature_map, projection)
            s, z = _unpack(total, features, dim)[:2]
            out = torch.matmul(phi_q, s) / (torch.matmul(phi_q, z[..., None]) + call.eps)
            return out.to(q.dtype)
        outs = []
        for (a, b), (start, _) in zip(runs, shard.runs[rank]):
            earlier = [i for i, s in enumerate(order) if s < start]
            if earlier:
                s, z, m = _unpack(_combine_states(states[earlier], favor), features, dim)
                initial = (s, z, m if favor else None)
            else:
                initial = None
            outs.append(linear_attention_torch(q_part[:, :, a:b], k_part[:, :, a:b], v_part[:, :, a:b],
                                               call.feature_map, call.eps, True, projection, initial))
        return torch.cat(outs, dim=2)


class _KeyStore:
    """The k/v rows [rows, batch, 2 x head_dim] a rank's set heads read: its own at once (`local`, with a zero row
    at `own_rows`), its own and the received ones once the exchange has completed (`full()`, a zero row last)."""

    def __init__(self, rows, incoming, work, compute):
        self.rows, self.incoming, self.work, self.compute = rows, incoming, work, compute
        self.own_rows = rows.shape[0]
        self.local = torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])]).to(compute)
        self._full = None

    def full(self):
        if self._full is None:
            if self.work is not None:
                self.work.wait()
            self._full = torch.cat([self.rows, self.incoming, self.rows.new_zeros(1, *self.rows.shape[1:])])
            self._full = self._full.to(self.compute)
        return self._full


class _Exchange(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0, differentiable: backward sends each received row's
    gradient back to the rank that sent the row. With a `pending` list, the forward only starts the exchange and
    appends its handle: the received rows are valid after handle.wait()."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group, pending):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        received = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        work = dist.all_to_all_single(received, rows.contiguous(), recv_splits, send_splits, group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return received

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        grad_rows = grad.new_empty(sum(send_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_rows, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_rows, None, None, None, None


def exchange(rows, send_splits, recv_splits, group=None, pending=None):
    """Rows [sum(send_splits), ...] sent to the ranks of `group`, send_splits[r] of them to rank r, in order; the
    rows received, recv_splits[r] from rank r, in rank order. Every rank calls it with matching splits. pending:
    a list to receive the exchange's handle (then wait on it before reading the rows), or None to wait here."""
    return _Exchange.apply(rows, list(send_splits), list(recv_splits), group, pending)


def _local_runs(runs):
    """The local (start, stop) rows of a rank's position runs."""
    out, offset = [], 0
    for a, b in runs:
        out.append((offset, offset + b - a))
        offset += b - a
    return out


def _run_state(k, v, feature_map, projection):
    """A run's keys as one packed state [batch, heads, F * d + F + 1]: the decoding state linear_prefill_state
    gives (sum of phi(k) v^T, sum of phi(k), the largest key exponent m they are relative to; 0 for elu1 and
    relu), flattened for the exchange."""
    s, z, m = linear_prefill_state(k, v, feature_map, projection, k.dtype)
    return torch.cat([s.flatten(-2), z, m[..., None]], dim=-1)


def _combine_states(states, favor):
    """The sum of packed states [runs, batch, heads, F * d + F + 1]; FAVOR+ ones rescaled to their largest m."""
    if not favor:
        return states.sum(0)
    m = states[..., -1].detach()
    top = m.amax(0)
    weights = torch.exp(m - top)[..., None]
    return torch.cat([(states[..., :-1] * weights).sum(0), top[..., None]], dim=-1)


def _unpack(state, features, dim):
    s = state[..., :features * dim].unflatten(-1, (features, dim))
    return s, state[..., features * dim:features * (dim + 1)], state[..., -1]
