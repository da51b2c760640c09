"""Token permutations that make a head block-sparse.

`stride(l)` is block-dense in natural order: every tile holds a few pairs. View the sequence as an (n / l) x l
grid (row-major: position p sits in row p // l, column p % l) and read it column by column instead; positions
with equal p % l become contiguous, and `stride(l)` becomes chunk-like: all its pairs fall in diagonal blocks.

Candidates are grid transposes with period l for every integer appearing as a modulus in the head's predicate
(`stride(l)`, `dilated(w, d)`, `summary(l, c)`, `% l` inside `where`). The block density of the head's layout
(`layout.head_layout`) is compared in natural and permuted order at the kernel's tile size, and the best
candidate is chosen when it keeps at most `GAIN` of the natural density.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ir
from .layout import BlockLayout, head_layout

GAIN = 0.5  # choose a permutation only when it at least halves the block density


@dataclass(frozen=True)
class Permutation:
    """Grid transpose with period l: slot order lists every position p with p % l == 0 ascending, then
    p % l == 1, and so on. positions(n)[slot] is the original position visited at that slot."""

    period: int

    def slots(self, n: int) -> torch.LongTensor:
        """slot of each original position p: (p % l) * (n // l) + min(p % l, n % l) + p // l."""
        p = torch.arange(n, dtype=torch.int64)
        residue = p % self.period
        return residue * (n // self.period) + torch.clamp(residue, max=n % self.period) + p // self.period

    def positions(self, n: int) -> torch.LongTensor:
        out = torch.empty(n, dtype=torch.int64)
        out[self.slots(n)] = torch.arange(n, dtype=torch.int64)
        return out

    def inverse(self, n: int) -> torch.LongTensor:
        """inverse(n)[p] = the slot holding original position p (so positions(n)[inverse(n)] == arange(n))."""
        return self.slots(n)

    @property
    def formula(self) -> str:
        l = self.period  # noqa: E741
        return (f"grid transpose, period {l}: position p goes to slot "
                f"(p % {l}) * (n // {l}) + min(p % {l}, n % {l}) + p // {l}")


@dataclass(frozen=True)
class PermutationChoice:
    """What the search found for one head: block density in natural order, per candidate, and the choice."""

    tile: int
    natural_density: float
    candidates: dict[int, float]  # period -> block density after that transpose
    chosen: Permutation | None

    @property
    def permuted_density(self) -> float | None:
        return None if self.chosen is None else self.candidates[self.chosen.period]

    def to_json(self) -> dict:
        return {"tile": self.tile, "density_before": self.natural_density,
                "density_after": self.permuted_density,
                "candidates": {str(k): v for k, v in sorted(self.candidates.items())},
                "period": None if self.chosen is None else self.chosen.period,
                "formula": None if self.chosen is None else self.chosen.formula}


def choose_permutation(bound: ir.Bound, pairs, tile: int | None = None) -> Permutation | None:
    """The grid transpose that makes the head attending over `pairs` (one entry of `bound.head_sets(layer)`)
    block-sparse at `tile` x `tile` (default: the pattern's block), or None when no candidate helps enough."""
    return search_permutation(bound, pairs, tile).chosen


def search_permutation(bound: ir.Bound, pairs, tile: int | None = None,
                       natural_layout: BlockLayout | None = None) -> PermutationChoice:
    """Block density in natural order and after every candidate transpose (`natural_layout`: the head's layout
    at `tile` in natural order, if the caller has it)."""
    tile = tile or bound.block
    if natural_layout is None or (natural_layout.tile_m, natural_layout.tile_n) != (tile, tile):
        natural_layout = head_layout(bound, pairs, tile, tile)
    natural = natural_layout.density()
    candidates: dict[int, float] = {}
    for period in candidate_periods(bound, pairs):
        perm = Permutation(period)
        candidates[period] = head_layout(bound, pairs, tile, tile, positions=perm.positions(bound.n)).density()
    chosen = None
    if candidates:
        best = min(candidates, key=lambda period: (candidates[period], period))
        if candidates[best] <= GAIN * natural:
            chosen = Permutation(best)
    return PermutationChoice(tile, natural, candidates, chosen)


MAX_PERIODS = 8
# Each candidate costs a layout of the whole head, in time proportional to its heads: a union of 4096 heads tries
# one period, a union of 64 heads eight.
_PERIOD_BUDGET = 512


def candidate_periods(bound: ir.Bound, pairs) -> list[int]:
    """The moduli of the heads' predicates, evaluated (2 <= l < n), at most MAX_PERIODS of them and fewer for a
    union of many heads (those that most heads use, then the smallest); none if any head is not a set head."""
    periods: dict[int, int] = {}
    for group, h in pairs:
        if group.family != "set":
            return []
        env = {**bound.env, "n": bound.n, "h": h}
        for node in group.body.walk():
            for modulus in _moduli(node):
                try:
                    value = ir.evaluate_int(modulus, env)
                except (ZeroDivisionError, ArithmeticError, KeyError):
                    continue
                if isinstance(value, int) and 2 <= value < bound.n:
                    periods[value] = periods.get(value, 0) + 1
    keep = min(MAX_PERIODS, max(1, _PERIOD_BUDGET // max(1, len(pairs))))
    return sorted(sorted(periods, key=lambda p: (-periods[p], p))[:keep])


def _moduli(node: ir.SetExpr):
    if isinstance(node, ir.Stride):
        yield node.l
    elif isinstance(node, ir.Dilated):
        yield node.d
    elif isinstance(node, ir.Summary):
        yield node.l
    elif isinstance(node, ir.Where):
        for e in node.pred.walk():
            if isinstance(e, ir.BinOp) and e.op == "%" and not e.right.free_vars() & {"i", "j"}:
                yield e.right
