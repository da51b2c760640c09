"""Block layouts: which (query tile, key tile) pairs of a head are empty, partial or full.

Computed in closed form from the IR by abstract interpretation over tiles (`runtime/tiles.py`): the work is
O(tiles^2) integer ops, never an n x n mask, so n = 65536 takes milliseconds. Positions may be visited
through a permutation (e.g. the grid transpose that makes `stride(l)` block-sparse); tiles are then tiles of
the permuted order, and the predicate is still evaluated on original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ir
from ..runtime import tiles
from ..runtime.random_blocks import random_block_table

EMPTY, PARTIAL, FULL = tiles.EMPTY, tiles.PARTIAL, tiles.FULL
_ROWS_PER_CHUNK = 256  # query tiles classified at once; bounds memory at 256 x num_key_tiles int64s per value


_CALLS = {"abs": tiles.abs_, "isqrt": tiles.isqrt, "min": tiles.minimum, "max": tiles.maximum}
_ARITHMETIC = {"+": tiles.add, "-": tiles.sub, "*": tiles.mul, "//": tiles.floordiv, "%": tiles.mod}


def abstract_expr(expr: ir.Expr, env: dict):
    """Evaluate an IR expression over tiles: integers become `tiles.SI`, conditions (may_true, may_false)."""

    def var(v: ir.Var):
        value = env[v.name]
        return tiles.const(value) if isinstance(value, int) else value

    return ir.fold_expr(
        expr, const=lambda c: tiles.truth(c.value) if isinstance(c.value, bool) else tiles.const(c.value), var=var,
        neg=lambda _, a: tiles.neg(a), not_=lambda _, a: tiles.not_(a), call=lambda e, args: _CALLS[e.func](*args),
        binop=_abstract_binop)


def _abstract_binop(expr: ir.BinOp, a, b):
    if expr.op == "and":
        return tiles.and_(a, b)
    if expr.op == "or":
        return tiles.or_(a, b)
    if expr.op in ir.COMPARE_OPS:
        return tiles.compare(expr.op, a, b)
    return _ARITHMETIC[expr.op](a, b)


def abstract_set(s: ir.SetExpr, env: dict, random_tables: dict):
    def primitive(p: ir.SetPrimitive):
        if isinstance(p, ir.Random):
            block = env["__block__"]
            return tiles.lookup(random_tables[p], tiles.floordiv(env["i"], tiles.const(block)),
                                tiles.floordiv(env["j"], tiles.const(block)))
        return abstract_expr(p.predicate(), env)

    return ir.fold_set(s, primitive=primitive, union=tiles.or_, intersect=tiles.and_,
                       difference=lambda a, b: tiles.and_(a, tiles.not_(b)))


def random_tables(bound: ir.Bound, body: ir.SetExpr, h: int) -> dict:
    """The block table of every `random` node in a head, at the pattern's block size."""
    out = {}
    nb = -(-bound.n // bound.block)
    env = {**bound.env, "n": bound.n, "h": h}
    for node in body.walk():
        if isinstance(node, ir.Random):
            r, seed = ir.evaluate_int(node.r, env), ir.evaluate_int(node.seed, env)
            out[node] = random_block_table(nb, nb, r, seed, bound.pattern.causal)
    return out


@dataclass(frozen=True)
class BlockLayout:
    """Tile classes of one attention head: int8 (num_q_tiles, num_k_tiles) of EMPTY / PARTIAL / FULL.

    FULL tiles need no mask at all (not even for padding: a tile holding positions past n is never FULL).
    """

    classes: torch.Tensor
    tile_m: int
    tile_n: int
    n: int

    @property
    def num_q_tiles(self) -> int:
        return self.classes.shape[0]

    @property
    def num_k_tiles(self) -> int:
        return self.classes.shape[1]

    def counts(self) -> dict[str, int]:
        return {name: int((self.classes == code).sum()) for name, code in
                (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}

    def density(self) -> float:
        return float((self.classes != EMPTY).sum()) / self.classes.numel()


def head_layout(bound: ir.Bound, pairs, tile_m: int | None = None, tile_n: int | None = None,
                positions: torch.Tensor | None = None) -> BlockLayout:
    """Layout of one attention head: the union of (group, h) pairs (see `ir.Bound.head_sets`).

    `positions[p]` is the original position at slot p of the visiting order (default: natural order).
    """
    n = bound.n
    tile_m = tile_m or bound.block
    tile_n = tile_n or bound.block
    causal = bound.pattern.causal
    prepared = []
    for group, h in pairs:
        if group.family != "set":
            prepared.append((ir.Dense(), {}, h))
        else:
            prepared.append((group.body, random_tables(bound, group.body, h), h))

    def predicate(i, j):
        pred = tiles.truth(False)
        for body, tables, h in prepared:
            env = {**bound.env, "n": n, "h": h, "i": i, "j": j, "__block__": bound.block}
            pred = tiles.or_(pred, abstract_set(body, env, tables))
        if causal:
            pred = tiles.and_(pred, tiles.compare("<=", j, i))
        return pred

    if positions is None:
        classes = tiles.classify_tiles(predicate, tiles.natural_tiles(n, tile_m), tiles.natural_tiles(n, tile_n), n,
                                       tile_m, tile_n, _ROWS_PER_CHUNK)
    else:
        classes = tiles.classify_tile_pieces(predicate, tiles.tile_positions(positions, n, tile_m),
                                             tiles.tile_positions(positions, n, tile_n), n, tile_m, tile_n,
                                             _ROWS_PER_CHUNK)
    return BlockLayout(classes, tile_m, tile_n, n)


def pattern_layouts(bound: ir.Bound, layer: int = 0, tile_m: int | None = None, tile_n: int | None = None,
                    positions: torch.Tensor | None = None) -> list[BlockLayout]:
    """One layout per attention head of `layer`, in head order; heads with equal (group, h) sets share work."""
    cache: dict = {}
    out = []
    for pairs in bound.head_sets(layer):
        key = tuple((g.name, h if g.uses_head_index else 0) for g, h in pairs)
        if key not in cache:
            cache[key] = head_layout(bound, pairs, tile_m, tile_n, positions)
        out.append(cache[key])
    return out
