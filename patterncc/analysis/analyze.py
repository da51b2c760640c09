"""The analysis driver: every fact `patterncc check` reports about a pattern at one n.

Passes, in order:
  1. bind parameters for n and list the distinct heads (a group whose expression uses `h` gives one entry per
     head; otherwise one entry stands for all its identical heads);
  2. per head, exact connectivity from the tile layout (`stats`), its row statistics, block layout at the
     pattern's block size, closed-form cost (`cost`) and the best token permutation (`permute`);
  3. the same for the union of every head whose pairs are known (set and kernel heads; hashed heads depend on
     the data and are left out);
  4. path-length-p coverage (`coverage`) of the merged union and of the declared head order;
  5. which entry each attention head of the requested layer runs (`combine`).

`with_module_layout` then adds what the generated module's block-sparse kernels compute at n (the CLI builds the
module: this stage never imports the compiler).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy

from .. import ir
from ..errors import PatternUsageError, check_positive_int, warn
from ..runtime import tiles
from ..semantics import bind_pattern
from . import cost as cost_mod
from .coverage import CoverageResult, coverage
from .layout import BlockLayout, head_layout
from .permute import PermutationChoice, search_permutation
from .stats import (
    Connectivity,
    RowStats,
    StepPairs,
    allowed_pairs,
    empty_connectivity,
    head_connectivity,
    row_stats,
    step_pairs,
    union,
)

DATA_DEPENDENT = ("hashed heads depend on the data: their pairs are unknown before the inputs are, so coverage "
                  "cannot be proven for them")


@dataclass(frozen=True)
class LayoutSummary:
    """Tile classes of a head at the pattern's block size, as the kernels will see them (`layout.head_layout`:
    FULL and EMPTY are proven, PARTIAL tiles are masked)."""

    block: int
    q_tiles: int
    k_tiles: int
    empty: int
    partial: int
    full: int
    density: float  # non-empty tiles / all tiles

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class HeadAnalysis:
    name: str  # `group`, or `group[h]` when the group's heads differ
    group: str | None  # None for the union
    h: int | None  # None when the entry stands for identical heads (or is the union)
    count: int  # attention heads (declared) this entry stands for
    family: str  # "set", "kernel", "hashed", or "union"
    rows: RowStats | None  # None for hashed heads
    layout: LayoutSummary | None  # None for hashed heads
    cost: cost_mod.Cost
    permutation: PermutationChoice | None  # None unless every pair is from a set head
    cache: sympy.Expr | None = None  # keys a KV cache keeps for it while generating (causal patterns; not the union)

    def to_json(self, env: dict[str, int], n: int) -> dict:
        stats = self.rows
        return {
            "name": self.name, "group": self.group, "h": self.h, "count": self.count, "family": self.family,
            "rows": None if stats is None else {"min": stats.min, "mean": stats.mean, "max": stats.max},
            "nonzeros": None if stats is None else stats.nonzeros,
            "density": None if stats is None else stats.density,
            "empty_rows": None if stats is None else stats.empty_rows,
            "first_empty_row": None if stats is None else stats.first_empty_row,
            "layout": None if self.layout is None else self.layout.to_json(),
            "cost": self.cost.to_json(env, n),
            "permutation": None if self.permutation is None else self.permutation.to_json(),
            "cache": None if self.cache is None else {"formula": str(self.cache),
                                                      "value": cost_mod.formula_value(self.cache, env, n)},
        }


@dataclass(frozen=True)
class ModuleMask:
    """One mask of the generated module at n: its visiting order of queries and of keys ("natural" or
    "transposed"), the tiles its kernels compute (not EMPTY) and the pairs it allows."""

    mask: int
    q_order: str
    k_order: str
    computed: int
    allowed: int
    efficiency: float  # allowed / (computed x block^2)

    def to_json(self) -> dict:
        return {"mask": self.mask, "q_order": self.q_order, "k_order": self.k_order,
                "computed_tiles": self.computed, "nonzeros": self.allowed, "efficiency": self.efficiency}


@dataclass(frozen=True)
class ModuleHead:
    """What the generated module's block-sparse kernels compute for one entry of `Analysis.heads` (or the union)
    at n: its masks (several when the head is split into disjoint parts, each visited in its own order), their
    tiles and pairs together, against the tiles a dense kernel computes."""

    name: str  # the entry's name, as in `Analysis.heads`
    attention_heads: tuple[int, ...]  # the attention heads of the layer that run it
    masks: tuple[ModuleMask, ...]
    block: int
    tiles: int  # all tile pairs: num_tiles^2
    dense_tiles: int  # a dense kernel's: num_tiles (num_tiles + 1) / 2 when causal, else all

    @property
    def computed(self) -> int:
        return sum(m.computed for m in self.masks)

    @property
    def allowed(self) -> int:
        return sum(m.allowed for m in self.masks)

    @property
    def efficiency(self) -> float:
        return self.allowed / max(1, self.computed * self.block ** 2)

    def to_json(self) -> dict:
        return {"name": self.name, "attention_heads": list(self.attention_heads),
                "masks": [m.to_json() for m in self.masks], "computed_tiles": self.computed,
                "total_tiles": self.tiles, "dense_tiles": self.dense_tiles, "nonzeros": self.allowed,
                "efficiency": self.efficiency}


@dataclass(frozen=True)
class Analysis:
    pattern: ir.Pattern
    bound: ir.Bound
    layer: int
    max_steps: int
    heads: tuple[HeadAnalysis, ...]
    union: HeadAnalysis | None  # None when no head has known pairs (only hashed heads)
    coverage: dict[str, CoverageResult]  # "merged" and "declared_order"
    layer_heads: tuple[str, ...]  # per attention head of `layer`: the name of the entry it runs
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    # What the generated module computes (`with_module_layout`); None until added, or when it could not be built.
    module_heads: tuple[ModuleHead, ...] | None = None

    @property
    def n(self) -> int:
        return self.bound.n

    def head(self, name: str) -> HeadAnalysis:
        for entry in (*self.heads, *([self.union] if self.union else [])):
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> dict:
        """Every fact as plain JSON types; the schema is documented in docs/check-json.md."""
        pattern, bound = self.pattern, self.bound
        env = dict(bound.env)
        params = {p.name: env[p.name] for p in pattern.params if p.name in env}
        return {
            "pattern": pattern.name, "file": pattern.filename, "n": bound.n, "layer": self.layer,
            "causal": pattern.causal, "block": bound.block, "combine": pattern.combine,
            "params": params, "lets": {name: env[name] for name, _ in pattern.lets if name in env},
            "allowed_pairs": allowed_pairs(bound.n, pattern.causal),
            "heads": [entry.to_json(env, bound.n) for entry in self.heads],
            "union": None if self.union is None else self.union.to_json(env, bound.n),
            "layer_heads": list(self.layer_heads),
            "coverage": {key: result.to_json() for key, result in self.coverage.items()},
            "warnings": list(self.warnings), "notes": list(self.notes),
            "set_heads": None if self.module_heads is None else [head.to_json() for head in self.module_heads],
        }


MAX_N = 32768  # coverage keeps n x n bits per step (128 MiB here) and the analysis takes ~10 s at this n
MAX_STEPS = 64

Progress = Callable[[str, int, int], None]  # (what is being analyzed, done, total)


def analyze(pattern: ir.Pattern, n: int, layer: int = 0, max_steps: int = 8, progress: Progress | None = None
            ) -> Analysis:
    """Exact statistics, closed-form cost, coverage and permutations of `pattern` at sequence length n.

    `layer` picks the layer of a `combine interleaved` pattern (it only changes `layer_heads`); `max_steps` caps
    the attention path length tried for coverage. Example: `analyze(patterncc.parse("examples/strided.attn"),
    n=4096).coverage["merged"].steps == 2`.
    """
    check_positive_int(max_steps, "max_steps")
    if max_steps > MAX_STEPS:
        raise PatternUsageError(f"max_steps is at most {MAX_STEPS}, got {max_steps}")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_N:
        raise PatternUsageError(f"the analysis takes n up to {MAX_N}, got n = {n}",
                                hint="the kernels take any n; `patterncc show` draws the block layout up to "
                                     "n = 4096 tiles of the block size")
    with tiles.single_threaded():
        return _analyze(pattern, n, layer, max_steps, progress or (lambda what, done, total: None))


def _analyze(pattern: ir.Pattern, n: int, layer: int, max_steps: int, progress: Progress) -> Analysis:
    # 1. bind and list distinct heads
    bound = bind_pattern(pattern, n)
    entries = []  # (name, group, h or None, count)
    for group, count in zip(pattern.heads, bound.counts):
        if group.uses_head_index:
            entries.extend((f"{group.name}[{h}]", group, h, 1) for h in range(count))
        else:
            entries.append((group.name, group, None, count))
    # 2. each head
    connectivity: dict[str, Connectivity] = {}
    heads, warnings = [], []
    total = len(entries) + 2
    for index, (name, group, h, count) in enumerate(entries):
        progress(f"{pattern.name}: head {name}", index, total)
        pairs = ((group, h or 0),)
        head_cost = cost_mod.head_cost(pattern, group, h or 0, bound.block)
        cache = cost_mod.head_cache(pattern, group, h or 0) if pattern.causal else None
        if group.family == "hashed":
            heads.append(HeadAnalysis(name, group.name, h, count, "hashed", None, None, head_cost, None, cache))
            continue
        layout = head_layout(bound, pairs)
        conn = connectivity[name] = head_connectivity(bound, group, h or 0, layout)
        stats = row_stats(conn, pattern.causal)
        if group.family == "set" and stats.empty_rows:
            message = (f"pattern `{pattern.name}`, head `{name}`: query i = {stats.first_empty_row} attends to no "
                       f"key ({stats.empty_rows} of {n} rows are empty at n = {n}); softmax over an empty row is "
                       f"undefined")
            warnings.append(message)
            warn(message)
        permutation = search_permutation(bound, pairs, natural_layout=layout) if group.family == "set" else None
        heads.append(HeadAnalysis(name, group.name, h, count, group.family, stats, _summary(layout), head_cost,
                                  permutation, cache))
    # 3. the union of every head with known pairs
    known = [(entry, head) for entry, head in zip(entries, heads) if head.family != "hashed"]
    notes = []
    if len(known) < len(heads):
        notes.append(DATA_DEPENDENT + "; the union leaves them out")
    union_entry = None
    progress(f"{pattern.name}: union", len(entries), total)
    if known:
        pairs = tuple((group, h or 0) for (_, group, h, _), _ in known)
        conn = union([connectivity[head.name] for _, head in known])
        layout = head_layout(bound, pairs)
        all_sets = all(head.family == "set" for _, head in known)
        union_entry = HeadAnalysis(
            "union", None, None, sum(head.count for _, head in known), "union", row_stats(conn, pattern.causal),
            _summary(layout), cost_mod.union_cost([head.cost for _, head in known], pattern),
            search_permutation(bound, pairs, natural_layout=layout) if all_sets else None)
    unknown_order = [h.name for h in (*heads, *([union_entry] if union_entry else [])) if h.cost.order is None]
    if unknown_order:
        notes.append(f"{cost_mod.ORDER_UNKNOWN_NOTE} ({', '.join(unknown_order)})")
    # 4. coverage
    progress(f"{pattern.name}: coverage", len(entries) + 1, total)
    results = _coverage(pattern, bound, entries, connectivity, max_steps)
    # 5. what each attention head of the layer runs
    layer_heads = tuple(_entry_name(pairs, pattern.combine) for pairs in bound.head_sets(layer))
    return Analysis(pattern, bound, layer, max_steps, tuple(heads), union_entry, results, layer_heads,
                    tuple(warnings), tuple(notes))


LOW_EFFICIENCY = 0.1  # a head computing fewer allowed pairs than this share of its tiles' pairs is a warning


def with_module_layout(analysis: Analysis, stats: dict[int, dict] | None, why_not: str | None = None) -> Analysis:
    """`analysis` with what the generated module's block-sparse kernels compute at its n, per entry and per mask.

    stats: mask -> its facts at n, from `patterncc.report.module_layout_stats` (`heads`: the attention heads of
    the layer using it; `q_order`, `k_order`, `computed`, `tiles`, `allowed`, `efficiency`); None when the module
    could not be generated, and `why_not` (a note) says why. A head whose work efficiency is below LOW_EFFICIENCY,
    or that computes more than half the tiles of a dense kernel (which would then do as well), is a warning,
    unless n fits in one tile."""
    if stats is None:
        return dataclasses.replace(analysis, notes=(*analysis.notes, why_not or "the generated module was not built"))
    pattern, bound = analysis.pattern, analysis.bound
    runs: dict[int, list[int]] = {}  # attention head -> its masks
    for mask, run in sorted(stats.items()):
        for head in run["heads"]:
            runs.setdefault(head, []).append(mask)
    grouped: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for head, masks in sorted(runs.items()):
        grouped.setdefault((analysis.layer_heads[head], tuple(masks)), []).append(head)
    heads, warnings = [], []
    for (name, masks), attention_heads in grouped.items():
        total = stats[masks[0]]["tiles"]
        num_tiles = math.isqrt(total)
        entry = ModuleHead(name, tuple(attention_heads), tuple(
            ModuleMask(m, stats[m]["q_order"], stats[m]["k_order"], stats[m]["computed"], stats[m]["allowed"],
                       stats[m]["efficiency"]) for m in masks), bound.block, total,
            num_tiles * (num_tiles + 1) // 2 if pattern.causal else total)
        heads.append(entry)
        reasons = []
        # When n fits in one tile, every kernel computes that tile: no layout could do better.
        if num_tiles > 1 and entry.computed and entry.efficiency < LOW_EFFICIENCY:
            reasons.append(f"work efficiency {entry.efficiency:.3f} is below {LOW_EFFICIENCY} (most computed pairs "
                           f"are masked out)")
        if num_tiles > 1 and 2 * entry.computed > entry.dense_tiles:
            dense = f"{entry.dense_tiles} {'causal ' if pattern.causal else ''}tiles of a dense kernel"
            reasons.append(f"{entry.computed} tiles are more than half the {dense}, which would do as well")
        if reasons:
            message = (f"pattern `{pattern.name}`, head `{name}`: at n = {bound.n} its kernels compute "
                       f"{entry.computed} of {total} tiles of {bound.block} x {bound.block} for {entry.allowed} "
                       f"allowed pairs; {', and '.join(reasons)}")
            warnings.append(message)
            warn(message)
    return dataclasses.replace(analysis, warnings=(*analysis.warnings, *warnings), module_heads=tuple(heads))


def _summary(layout: BlockLayout) -> LayoutSummary:
    counts = layout.counts()
    return LayoutSummary(layout.tile_m, layout.num_q_tiles, layout.num_k_tiles, counts["empty"], counts["partial"],
                         counts["full"], layout.density())


def _coverage(pattern: ir.Pattern, bound: ir.Bound, entries, connectivity: dict[str, Connectivity],
              max_steps: int) -> dict[str, CoverageResult]:
    cache: dict[str, StepPairs] = {}

    def pairs_of(name: str, group: ir.HeadGroup, h: int | None) -> StepPairs:
        if name not in cache:
            cache[name] = step_pairs(bound, group, h or 0, connectivity[name])
        return cache[name]

    known = [(name, group, h) for name, group, h, _ in entries if group.family != "hashed"]
    if not known:
        unknown = CoverageResult("unknown", None, max_steps, (), allowed_pairs(bound.n, pattern.causal), None, (),
                                 DATA_DEPENDENT)
        return {"merged": unknown, "declared_order": unknown}
    merged_pairs = pairs_of(*known[0])
    for entry in known[1:]:
        merged_pairs = merged_pairs | pairs_of(*entry)
    hashed = len(known) < len(entries)
    merged = coverage([merged_pairs], [name for name, _, _ in known], pattern.causal, max_steps)
    if hashed:
        merged = _with_note(merged, DATA_DEPENDENT + "; they are left out of the union")
    # Declared order: step t runs group t mod G; a hashed group proves nothing, so its step keeps only the residual.
    steps, names = [], []
    for group in pattern.heads:
        members = [(name, g, h) for name, g, h in known if g is group]
        if not members:
            steps.append(StepPairs(empty_connectivity(bound.n)))
            names.append(f"{group.name} (data-dependent: residual only)")
            continue
        group_pairs = pairs_of(*members[0])
        for member in members[1:]:
            group_pairs = group_pairs | pairs_of(*member)
        steps.append(group_pairs)
        names.append(group.name)
    if len(pattern.heads) == 1:
        declared = dataclasses.replace(merged, sequence=tuple(names))
    else:
        declared = coverage(steps, names, pattern.causal, max_steps)
        if hashed:
            declared = _with_note(declared, DATA_DEPENDENT + "; their steps count as the residual alone")
    return {"merged": merged, "declared_order": declared}


def _with_note(result: CoverageResult, note: str) -> CoverageResult:
    return dataclasses.replace(result, note=note)


def _entry_name(pairs, combine: str) -> str:
    if combine == "merged":
        return "union"
    (group, h), = pairs
    return f"{group.name}[{h}]" if group.uses_head_index else group.name
