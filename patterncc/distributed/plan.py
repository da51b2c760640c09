"""Context parallel, the plan: which positions each rank owns, and which keys each rank reads from each other rank.

Pure computation, no process group: every rank builds the same plan from the same arguments, so the exchange
needs no metadata round. Ownership is in units of `block` positions: zig-zag for causal patterns (2 x world
chunks, rank r owning chunks r and 2 x world - 1 - r, so that rows of growing cost pair with rows of shrinking
cost), contiguous otherwise, or contiguous with boundaries at equal shares of the per-row cost ("balanced").

What a rank reads is exact, per key position: the union, over the rows it owns, of the keys each row attends,
taken from the set heads' CPU plans (`families.blocksparse.cpu.cpu_gather`: per query tile, the key slots its
rows may see and which pairs the mask allows, built from the closed-form tile classes without an n x n mask).
Keys a rank already holds are not counted; the rest it receives from their owners, once per call. Hashed heads
(buckets depend on the data) and kernel heads (a prefix of states) are planned by their own rules, documented
in `bytes_received`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PatternUsageError, check_positive_int
from ..families.blocksparse.cpu import cpu_gather
from ..families.linear.ops import linear_feature_dim
from ..families.shared.heads import heads_of
from ..runtime import tiles

ORDERS = ("auto", "zigzag", "contiguous", "balanced")


@dataclass
class Shard:
    """Who owns which positions, and which key positions each rank reads from others (see `plan`)."""

    n: int
    world_size: int
    block: int
    order: str
    owner: torch.Tensor  # [n] int64: the rank owning each position
    local_index: torch.Tensor  # [n] int64: where each position sits in its owner's shard
    runs: list  # per rank: its (start, stop) position ranges, ascending
    row_cost: torch.Tensor  # [n] float64: keys each row attends, summed over set heads (1 per row without any)
    reads: dict  # (rank, mask) -> sorted int64 key positions that rank's rows read through that mask
    module: torch.nn.Module = field(repr=False)  # the loaded pattern module the plan was made for

    def positions(self, rank: int) -> torch.Tensor:
        """The positions rank `rank` owns, in the order it holds them (ascending): a 1-D int64 tensor."""
        self._check_rank(rank)
        return torch.cat([torch.arange(a, b) for a, b in self.runs[rank]])

    def shard_length(self, rank: int) -> int:
        return sum(b - a for a, b in self.runs[rank])

    def _check_rank(self, rank):
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")

    @property
    def generated(self):
        return sys.modules[type(self.module).__module__]

    def remote_reads(self, rank: int, mask: int) -> torch.Tensor:
        """Key positions rank `rank` reads through mask `mask` and does not own."""
        keys = self.reads[(rank, mask)]
        return keys[self.owner[keys] != rank]

    def kv_reads(self, rank: int, q_heads: int, kv_heads: int) -> list[torch.Tensor]:
        """Per kv head of the set heads' k and v (as heads_of gives them: `q_heads` set query heads, `kv_heads`
        kv heads), the remote key positions rank `rank` receives: the union over the masks of the query heads
        that read that kv head."""
        masks = self.generated.PATTERN_MASKS
        q_per_head, q_per_kv = q_heads // len(masks.head_masks), q_heads // kv_heads
        wanted = [set() for _ in range(kv_heads)]
        for head in range(q_heads):
            wanted[head // q_per_kv].update(masks.head_masks[head // q_per_head])
        empty = torch.zeros(0, dtype=torch.int64)
        return [torch.unique(torch.cat([self.remote_reads(rank, m) for m in sorted(ms)] or [empty]))
                for ms in wanted]

    def bytes_received(self, rank: int, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                       dtype=torch.float32) -> int:
        """Bytes rank `rank` receives in one forward call with q (batch, q_heads, shard, head_dim) and k, v
        (batch, kv_heads, shard, head_dim) of `dtype`:
        - set heads: k and v of every remote key position its rows read (per kv head, `kv_reads`);
        - hashed heads: q, k and v of every other rank's positions, for each hashed query head (the buckets
          depend on the data, so every rank sorts the whole sequence of those heads);
        - kernel heads: each other rank's state per run (feature_dim x head_dim sums, feature_dim normalizer
          sums and one stabilizer), per kernel query head, in float32 (float64 for float64 inputs)."""
        self._check_rank(rank)
        g = self.generated
        element = torch.empty(0, dtype=dtype).element_size()
        total = 0
        repeat = q_heads // g.NUM_HEADS
        if "set" in g.HEAD_FAMILIES:
            set_q, set_kv = set_head_counts(g, q_heads, kv_heads)
            total += sum(len(r) for r in self.kv_reads(rank, set_q, set_kv)) * 2 * head_dim * batch * element
        others = self.n - self.shard_length(rank)
        for call in getattr(g, "HASHED_CALLS", []):
            total += others * len(call.heads) * repeat * 3 * head_dim * batch * element
        state_element = torch.empty(0, dtype=torch.promote_types(dtype, torch.float32)).element_size()
        for call in getattr(g, "KERNEL_CALLS", []):
            state = linear_feature_dim(call.feature_map, head_dim, call.features) * (head_dim + 1) + 1
            total += ((self.world_size - 1) * len(self.runs[rank]) * len(call.heads) * repeat * batch * state
                      * state_element)
        return total

    def ring_bytes(self, rank: int, batch: int, kv_heads: int, head_dim: int, dtype=torch.float32) -> int:
        """What ring attention's rank receives in one forward call: every other rank's k and v, all kv heads."""
        element = torch.empty(0, dtype=dtype).element_size()
        return (self.n - self.shard_length(rank)) * kv_heads * 2 * head_dim * batch * element

    def rank_costs(self) -> torch.Tensor:
        """Per rank, the sum of its rows' cost."""
        return torch.zeros(self.world_size, dtype=torch.float64).index_add_(0, self.owner, self.row_cost)

    @property
    def imbalance(self) -> float:
        """The busiest rank's cost over the mean rank's (1.0: perfectly balanced)."""
        costs = self.rank_costs()
        return float(costs.max() / costs.mean())


def set_head_counts(generated, q_heads, kv_heads):
    """(query heads, kv heads) of the set heads' q and k as the generated module's heads_of gives them (grouped
    kv heads stay grouped only where the set heads align with whole groups)."""
    q, k = torch.empty(1, q_heads, 1, 1, device="meta"), torch.empty(1, kv_heads, 1, 1, device="meta")
    q_set, k_set, _ = heads_of(q, k, k, generated.SET_HEADS, generated.NUM_HEADS, expand_kv=False)
    return q_set.shape[1], k_set.shape[1]


def plan(pattern, n: int, world_size: int, block: int | None = None, *, order: str = "auto", **params) -> Shard:
    """The context-parallel plan of `pattern` (a .attn path or text, or a module from patterncc.load) at
    sequence length n over `world_size` ranks.

    block: the unit of ownership in positions (default: the set heads' layout tile, else 64); order: "zigzag"
    (default for causal patterns), "contiguous" (default otherwise) or "balanced" (contiguous, boundaries at
    equal shares of the per-row cost). Every rank needs at least one unit (two with zig-zag)."""
    check_positive_int(n, "n")
    check_positive_int(world_size, "world_size")
    if order not in ORDERS:
        raise PatternUsageError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    module = _module(pattern, params)
    g = sys.modules[type(module).__module__]
    masks = getattr(g, "PATTERN_MASKS", None)
    if block is None:
        block = masks.block if masks is not None else 64
    check_positive_int(block, "block")
    if order == "auto":
        order = "zigzag" if g.CAUSAL else "contiguous"
    units = -(-n // block)
    chunks = 2 * world_size if order == "zigzag" else world_size
    if units < chunks:
        raise PatternUsageError(
            f"n={n} has {units} blocks of {block} positions, but {order} ownership over {world_size} ranks needs "
            f"at least {chunks}: use a smaller block (block=) or fewer ranks")
    layout = masks.layout(n, "cpu") if masks is not None else None
    row_cost = _row_cost(masks, layout, n) if masks is not None else torch.ones(n, dtype=torch.float64)
    unit_runs = _unit_runs(order, units, world_size, row_cost, block, n)
    runs = [[(a * block, min(n, b * block)) for a, b in rank_runs] for rank_runs in unit_runs]
    owner = torch.empty(n, dtype=torch.int64)
    local_index = torch.empty(n, dtype=torch.int64)
    for rank, rank_runs in enumerate(runs):
        offset = 0
        for a, b in rank_runs:
            owner[a:b] = rank
            local_index[a:b] = torch.arange(offset, offset + b - a)
            offset += b - a
    reads = _reads(masks, layout, owner, world_size) if masks is not None else {}
    return Shard(n, world_size, block, order, owner, local_index, runs, row_cost, reads, module)


def _module(pattern, params):
    if isinstance(pattern, torch.nn.Module):
        if params:
            raise PatternUsageError("parameters go to patterncc.load() when the pattern is already a module")
        if not hasattr(type(pattern), "head_families"):
            raise PatternUsageError(f"expected a module from patterncc.load, got {type(pattern).__name__}")
        return pattern
    from ..api import load

    return load(pattern if isinstance(pattern, Path) else str(pattern), **params)


def _unit_runs(order, units, world_size, row_cost, block, n):
    """Per rank, its (first unit, stop unit) runs."""
    if order == "zigzag":
        bounds = [c * units // (2 * world_size) for c in range(2 * world_size + 1)]
        return [[(bounds[r], bounds[r + 1]), (bounds[2 * world_size - 1 - r], bounds[2 * world_size - r])]
                for r in range(world_size)]
    if order == "contiguous":
        bounds = [r * units // world_size for r in range(world_size + 1)]
    else:  # balanced: each boundary where the cumulative cost reaches r / world of the total (one unit at least)
        padded = torch.nn.functional.pad(row_cost, (0, units * block - n))
        cumulative = padded.view(units, block).sum(1).cumsum(0)
        targets = cumulative[-1] * torch.arange(1, world_size, dtype=torch.float64) / world_size
        bounds = [0] + [int(b) + 1 for b in torch.searchsorted(cumulative, targets)] + [units]
        for r in range(1, world_size):  # at least one unit each, keeping room for the ranks after
            bounds[r] = min(max(bounds[r], bounds[r - 1] + 1), units - (world_size - r))
    return [[(bounds[r], bounds[r + 1])] for r in range(world_size)]


def _plan_rows(layout, plan, chunk):
    """(positions of the chunk's query slots [tiles, block] (-1 past n), allowed pairs [tiles, block, w] without
    the dummy key of rows that have none, key positions [tiles or 1, w])."""
    n, block = layout.n, layout.masks.block
    pos, real = tiles.slot_positions(plan.positions, n, layout.num_tiles, block)
    rows = slice(chunk.start * block, chunk.stop * block)
    row_pos = torch.where(real[rows], pos[rows], -1).view(-1, block)
    allowed = ~chunk.blocked & plan.has_keys[chunk.start:chunk.stop].to(torch.bool)
    key_pos = pos[chunk.slots.clamp(max=n - 1)]
    return row_pos, allowed, key_pos.view(1, -1) if chunk.shared else key_pos


def _row_cost(masks, layout, n):
    """Keys each row attends, summed over the pattern's set heads (a mask shared by several heads counts once
    per head)."""
    uses = torch.zeros(masks.num_masks, dtype=torch.float64)
    for head_masks in masks.head_masks:
        for m in head_masks:
            uses[m] += 1
    cost = torch.zeros(n, dtype=torch.float64)
    for m in range(masks.num_masks):
        plan = cpu_gather(layout, m)
        for chunk in plan.chunks:
            row_pos, allowed, _ = _plan_rows(layout, plan, chunk)
            real = row_pos >= 0
            cost.index_add_(0, row_pos[real], allowed.sum(-1)[real].to(torch.float64) * uses[m])
    return cost


def _reads(masks, layout, owner, world_size):
    """(rank, mask) -> the sorted key positions that rank's rows read through the mask."""
    reads = {}
    for m in range(masks.num_masks):
        plan = cpu_gather(layout, m)
        found = [[] for _ in range(world_size)]
        for chunk in plan.chunks:
            row_pos, allowed, key_pos = _plan_rows(layout, plan, chunk)
            row_owner = torch.where(row_pos >= 0, owner[row_pos.clamp(min=0)], -1)
            key_pos = key_pos.expand(allowed.shape[0], -1)
            for rank in torch.unique(row_owner[row_owner >= 0]).tolist():
                read = (allowed & (row_owner == rank)[:, :, None]).any(dim=1)  # [tiles, w]
                found[rank].append(key_pos[read])
        for rank in range(world_size):
            keys = torch.cat(found[rank]) if found[rank] else torch.zeros(0, dtype=torch.int64)
            reads[(rank, m)] = torch.unique(keys)
    return reads
