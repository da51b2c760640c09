"""Exact connectivity of a head, tile by tile, and the row statistics it gives.

A head's pairs are held at TILE x TILE granularity (TILE = 64, so that one row of a tile is one uint64 word):
the layout analysis (`layout.head_layout`) proves most tiles EMPTY or FULL in closed form, and only its PARTIAL
tiles are evaluated concretely, one word per row (bit c of the word of row r in tile (q, t) is the pair
(64 q + r, 64 t + c)). Nothing n x n is built: work and memory follow the number of partial tiles.

The concrete evaluation splits each predicate at its boolean connectives and evaluates every atom in the
cheapest form it allows: an atom of `i - j` alone (windows, strides, dilations) is evaluated once per distance
and then read out per tile diagonal; an atom of j alone (summary cells) once per key; of i alone once per query;
anything else on the partial tiles themselves, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ir
from ..mask import eval_expr
from ..runtime.random_blocks import random_block_table
from .layout import EMPTY, FULL, PARTIAL, BlockLayout, head_layout

TILE = 64
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_GENERIC_TILES_PER_CHUNK = 256  # 256 tiles x 4096 pairs: about 8 MB per int64 temporary
_DIFF = "__d"  # the variable standing for i - j in distance-only atoms
_BIT_WEIGHTS = np.uint64(1) << np.arange(TILE, dtype=np.uint64)


@dataclass(frozen=True)
class Connectivity:
    """The pairs of one head (or a union of heads) for one n.

    classes: int8 (tiles, tiles) EMPTY / PARTIAL / FULL at TILE x TILE. FULL tiles hold no padding.
    tile_q, tile_k: int64 (P,) the partial tiles, sorted by (tile_q, tile_k).
    words: uint64 (P, TILE): per partial tile, one word per query row; padding rows and columns are 0.
    """

    n: int
    classes: np.ndarray
    tile_q: np.ndarray
    tile_k: np.ndarray
    words: np.ndarray

    @property
    def num_tiles(self) -> int:
        return self.classes.shape[0]

    def row_counts(self) -> np.ndarray:
        """int64 (n,): how many keys each query sees."""
        nt = self.num_tiles
        per_tile = (self.classes == FULL).sum(axis=1).astype(np.int64) * TILE
        counts = np.repeat(per_tile, TILE)
        if len(self.words):
            rows = (self.tile_q[:, None] * TILE + np.arange(TILE)[None, :]).ravel()
            bits = np.bitwise_count(self.words).ravel()
            counts += np.bincount(rows, weights=bits, minlength=nt * TILE).astype(np.int64)
        return counts[: self.n]

    def with_self_loops(self) -> Connectivity:
        """The same pairs plus (i, i) for every i: the residual connection of a transformer layer."""
        nt = self.num_tiles
        diagonal = np.arange(nt)
        identity = np.where(diagonal[:, None] * TILE + np.arange(TILE)[None, :] < self.n, _BIT_WEIGHTS[None, :],
                            np.uint64(0))
        loops = Connectivity(self.n, np.where(np.eye(nt, dtype=bool), PARTIAL, EMPTY).astype(np.int8),
                             diagonal, diagonal, identity)
        return union([self, loops])


def union(parts: list[Connectivity]) -> Connectivity:
    """The union of several heads' pairs (a tile FULL in any part is FULL; partial words are OR-ed)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    full = np.zeros_like(first.classes, dtype=bool)
    for part in parts:
        full |= part.classes == FULL
    keys, words = [], []
    nt = first.num_tiles
    for part in parts:
        keep = ~full[part.tile_q, part.tile_k]
        keys.append(part.tile_q[keep] * nt + part.tile_k[keep])
        words.append(part.words[keep])
    return _from_partial_words(first.n, full, np.concatenate(keys), np.concatenate(words))


def _from_partial_words(n: int, full: np.ndarray, keys: np.ndarray, words: np.ndarray) -> Connectivity:
    """Assemble a Connectivity from FULL tiles and (possibly repeated) partial tile keys, normalizing tiles whose
    words turn out all-zero (EMPTY) or all-ones (FULL)."""
    nt = full.shape[0]
    if len(keys):
        order = np.argsort(keys, kind="stable")
        keys, words = keys[order], words[order]
        new_key = np.concatenate([[True], keys[1:] != keys[:-1]])
        if not new_key.all():  # a tile partial in several parts (usually few): OR its copies into the first
            first, repeated = np.nonzero(new_key)[0], np.nonzero(~new_key)[0]
            merged = words[first]
            np.bitwise_or.at(merged, np.cumsum(new_key)[repeated] - 1, words[repeated])
            keys, words = keys[first], merged
    else:
        words = words.reshape(0, TILE)
    nonzero = words.any(axis=1)
    all_ones = (words == ALL_ONES).all(axis=1)
    full = full.copy()
    full.ravel()[keys[all_ones]] = True
    keep = nonzero & ~all_ones
    keys, words = keys[keep], words[keep]
    classes = np.where(full, FULL, EMPTY).astype(np.int8)
    classes.ravel()[keys] = PARTIAL
    return Connectivity(n, classes, keys // nt, keys % nt, np.ascontiguousarray(words))


# Evaluating one head --------------------------------------------------------------------------------------------


def head_connectivity(bound: ir.Bound, group: ir.HeadGroup, h: int, layout: BlockLayout | None = None
                      ) -> Connectivity:
    """Exact pairs of one declared head. Kernel and hashed heads give their support (all j, or j <= i).
    `layout`: the head's `head_layout` at TILE x TILE, if the caller has it already."""
    return body_connectivity(bound, group.body if group.family == "set" else ir.Dense(), h, layout)


def body_connectivity(bound: ir.Bound, body: ir.SetExpr, h: int, layout: BlockLayout | None = None
                      ) -> Connectivity:
    """Exact pairs of a set expression (with `causal` applied) for head index h."""
    n = bound.n
    if layout is None or (layout.tile_m, layout.tile_n) != (TILE, TILE):
        layout = head_layout(bound, ((ir.HeadGroup("_", ir.Const(1), body), h),), TILE, TILE)
    classes = layout.classes.numpy()
    tile_q, tile_k = (a.astype(np.int64) for a in np.nonzero(classes == PARTIAL))
    evaluator = _TileEvaluator(bound, h, tile_q, tile_k)
    words = evaluator.set_words(body)
    if bound.pattern.causal:
        words &= evaluator.pred_words(ir.cmp(">=", ir.sub(ir.I, ir.J), 0))
    words &= evaluator.padding_words()
    nt = classes.shape[0]
    return _from_partial_words(n, classes == FULL, tile_q * nt + tile_k, words)


def empty_connectivity(n: int) -> Connectivity:
    nt = -(-n // TILE)
    none = np.zeros(0, dtype=np.int64)
    return Connectivity(n, np.zeros((nt, nt), dtype=np.int8), none, none, np.zeros((0, TILE), dtype=np.uint64))


class _TileEvaluator:
    """Words (P, TILE) of set expressions and predicates on a fixed list of partial tiles."""

    def __init__(self, bound: ir.Bound, h: int, tile_q: np.ndarray, tile_k: np.ndarray):
        self.bound, self.n, self.h = bound, bound.n, h
        self.tile_q, self.tile_k = tile_q, tile_k
        self.env = {**bound.env, "n": bound.n, "h": h}

    def padding_words(self) -> np.ndarray:
        """All ones except rows and columns past n."""
        cols = self.tile_k[:, None] * TILE + np.arange(TILE)[None, :]
        col_word = _pack((cols < self.n)[:, None, :])[:, 0]
        rows = self.tile_q[:, None] * TILE + np.arange(TILE)[None, :]
        return np.where(rows < self.n, col_word[:, None], np.uint64(0))

    def set_words(self, node: ir.SetExpr) -> np.ndarray:
        return ir.fold_set_bool(node, lambda p: self._random_words(p) if isinstance(p, ir.Random)
                                else self.pred_words(p.predicate()))

    def pred_words(self, expr: ir.Expr) -> np.ndarray:
        return ir.fold_bool(expr, atom=self._atom_words, and_=np.bitwise_and, or_=np.bitwise_or,
                            not_=np.invert)

    def _atom_words(self, expr: ir.Expr) -> np.ndarray:
        free = expr.free_vars()
        if not free & {"i", "j"}:
            return self._constant(bool(eval_expr(expr, self.env)))
        distance = _as_distance(expr)
        if not distance.free_vars() & {"i", "j"}:
            return self._distance_words(distance)
        if "i" not in free:
            return self._key_words(expr)
        if "j" not in free:
            return self._query_words(expr)
        return self._generic_words(expr)

    def _constant(self, value: bool) -> np.ndarray:
        return np.full((len(self.tile_q), TILE), ALL_ONES if value else np.uint64(0), dtype=np.uint64)

    def _distance_words(self, expr: ir.Expr) -> np.ndarray:
        # Within tile (q, t), i - j = TILE (q - t) + r - c: one table per tile diagonal q - t.
        n = self.n
        distances = torch.arange(-(n - 1), n, dtype=torch.int64)
        table = _as_bool(eval_expr(expr, {**self.env, _DIFF: distances}), 2 * n - 1)
        table = np.concatenate([[False], table, [False]])  # out-of-range distances only occur at padding
        diagonals, inverse = np.unique(self.tile_q - self.tile_k, return_inverse=True)
        offsets = (TILE * diagonals[:, None, None] + np.arange(TILE)[None, :, None]
                   - np.arange(TILE)[None, None, :]) + n
        bits = table[np.clip(offsets, 0, 2 * n)]
        return _pack(bits)[inverse.ravel()]

    def _key_words(self, expr: ir.Expr) -> np.ndarray:
        nt = -(-self.n // TILE)
        values = np.zeros(nt * TILE, dtype=bool)
        values[: self.n] = _as_bool(eval_expr(expr, {**self.env, "j": torch.arange(self.n)}), self.n)
        per_tile = _pack(values.reshape(nt, 1, TILE))[:, 0]
        return np.repeat(per_tile[self.tile_k][:, None], TILE, axis=1)

    def _query_words(self, expr: ir.Expr) -> np.ndarray:
        nt = -(-self.n // TILE)
        values = np.zeros(nt * TILE, dtype=bool)
        values[: self.n] = _as_bool(eval_expr(expr, {**self.env, "i": torch.arange(self.n)}), self.n)
        return np.where(values.reshape(nt, TILE)[self.tile_q], ALL_ONES, np.uint64(0))

    def _generic_words(self, expr: ir.Expr) -> np.ndarray:
        return self._chunked(lambda i, j: eval_expr(expr, {**self.env, "i": i, "j": j}))

    def _random_words(self, node: ir.Random) -> np.ndarray:
        nb = -(-self.n // self.bound.block)
        r, seed = ir.evaluate_int(node.r, self.env), ir.evaluate_int(node.seed, self.env)
        table = random_block_table(nb, nb, r, seed, self.bound.pattern.causal)
        block = self.bound.block
        return self._chunked(lambda i, j: table[i // block, j // block])

    def _chunked(self, evaluate) -> np.ndarray:
        """Evaluate `evaluate(i, j)` on the partial tiles themselves (positions past n are clamped; the padding
        mask clears them later)."""
        out = np.empty((len(self.tile_q), TILE), dtype=np.uint64)
        offsets = torch.arange(TILE, dtype=torch.int64)
        tq, tk = torch.from_numpy(self.tile_q), torch.from_numpy(self.tile_k)
        for start in range(0, len(self.tile_q), _GENERIC_TILES_PER_CHUNK):
            stop = min(start + _GENERIC_TILES_PER_CHUNK, len(self.tile_q))
            i = torch.clamp(tq[start:stop, None, None] * TILE + offsets[None, :, None], max=self.n - 1)
            j = torch.clamp(tk[start:stop, None, None] * TILE + offsets[None, None, :], max=self.n - 1)
            bits = torch.as_tensor(evaluate(i, j), dtype=torch.bool).expand(stop - start, TILE, TILE)
            out[start:stop] = _pack(bits.numpy())
        return out


def _as_bool(value, size: int) -> np.ndarray:
    return torch.as_tensor(value, dtype=torch.bool).expand(size).numpy()


def _pack(bits: np.ndarray) -> np.ndarray:
    """bool (..., TILE) -> uint64 (...), bit c = bits[..., c]."""
    packed = np.packbits(np.ascontiguousarray(bits), axis=-1, bitorder="little")
    return packed.view("<u8")[..., 0].astype(np.uint64, copy=False)


def _as_distance(expr: ir.Expr) -> ir.Expr:
    """`expr` with every `i - j` replaced by the distance variable (and `j - i` by its negation)."""
    distances = {ir.sub(ir.I, ir.J): ir.Var(_DIFF), ir.sub(ir.J, ir.I): ir.Neg(ir.Var(_DIFF))}
    return ir.map_expr(expr, lambda e: distances.get(e, e))


# A head as explicit pairs plus residue windows (for coverage) ---------------------------------------------------------


@dataclass(frozen=True)
class StepPairs:
    """What one attention step attends over: explicit pairs, plus residue windows. A residue window (l, m) is the
    pairs with (i - j) % l == 0 and |i - j| <= m l (m None: unbounded), and j <= i when causal: `stride(l)` is
    (l, None), `dilated(w, d)` is (d, w). `whole`, when at hand, is all of it as one Connectivity: the first step
    then writes reach directly instead of computing it."""

    explicit: Connectivity
    residues: frozenset[tuple[int, int | None]] = frozenset()
    whole: Connectivity | None = None

    def __or__(self, other: StepPairs) -> StepPairs:
        whole = None
        if self.whole is not None and other.whole is not None:
            whole = union([self.whole, other.whole])
        return StepPairs(union([self.explicit, other.explicit]), self.residues | other.residues, whole)


def step_pairs(bound: ir.Bound, group: ir.HeadGroup, h: int, whole: Connectivity | None = None) -> StepPairs:
    """A head's pairs for coverage, with its top-level residue-window members (`stride`, `dilated`, and `where`
    of the same shapes) apart. `whole`: the head's full Connectivity, if the caller has it."""
    if group.family != "set":
        support = whole or body_connectivity(bound, ir.Dense(), h)
        return StepPairs(support, whole=support)
    members = ir.union_members(group.body)
    env = {**bound.env, "n": bound.n, "h": h}
    windows = [_residue_window(m, env) for m in members]
    residues = frozenset(w for w in windows if w is not None)
    rest = [m for m, w in zip(members, windows) if w is None]
    if not residues:
        explicit = whole or body_connectivity(bound, group.body, h)
        return StepPairs(explicit, whole=explicit)
    if not rest:
        return StepPairs(empty_connectivity(bound.n), residues, whole)
    body = rest[0]
    for member in rest[1:]:
        body = ir.Union(body, member)
    return StepPairs(body_connectivity(bound, body, h), residues, whole)


def _residue_window(node: ir.SetExpr, env: dict) -> tuple[int, int | None] | None:
    """(l, m) when the set is {(i, j): (i - j) % l == 0 and |i - j| <= m l} (m None: no distance bound)."""
    if isinstance(node, ir.Stride):
        period, reach = ir.evaluate_int(node.l, env), None
    elif isinstance(node, ir.Dilated):
        period, reach = ir.evaluate_int(node.d, env), ir.evaluate_int(node.w, env)
    elif isinstance(node, ir.Where):
        pred = node.pred
        atoms = [pred.left, pred.right] if isinstance(pred, ir.BinOp) and pred.op == "and" else [pred]
        moduli = [m for m in map(_distance_modulus, atoms) if m is not None]
        limits = [d for d in map(_distance_limit, atoms) if d is not None]
        if len(moduli) != 1 or len(moduli) + len(limits) != len(atoms) or len(limits) > 1:
            return None
        period = ir.evaluate_int(moduli[0], env)
        reach = ir.evaluate_int(limits[0], env) // period if limits and period >= 1 else None
        if reach is not None and reach < 0:
            return None
    else:
        return None
    return (period, reach) if period >= 1 else None


_DISTANCES = (ir.sub(ir.I, ir.J), ir.sub(ir.J, ir.I))


def _distance_modulus(atom: ir.Expr) -> ir.Expr | None:
    """l for `(i - j) % l == 0` (or j - i), l free of positions."""
    if isinstance(atom, ir.BinOp) and atom.op == "==" and atom.right == ir.Const(0) \
            and isinstance(atom.left, ir.BinOp) and atom.left.op == "%" and atom.left.left in _DISTANCES \
            and not atom.left.right.free_vars() & {"i", "j"}:
        return atom.left.right
    return None


def _distance_limit(atom: ir.Expr) -> ir.Expr | None:
    """The largest |i - j| allowed by `abs(i - j) <= E` or `< E` (or j - i), E free of positions."""
    if isinstance(atom, ir.BinOp) and atom.op in ("<=", "<") and isinstance(atom.left, ir.Call) \
            and atom.left.func == "abs" and atom.left.args[0] in _DISTANCES \
            and not atom.right.free_vars() & {"i", "j"}:
        return atom.right if atom.op == "<=" else ir.sub(atom.right, 1)
    return None


# Statistics -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowStats:
    """Keys per query row, exact for one n."""

    min: int
    mean: float
    max: int
    nonzeros: int
    density: float  # nonzeros / allowed pairs (n * n, or n (n + 1) / 2 when causal)
    empty_rows: int
    first_empty_row: int | None


def allowed_pairs(n: int, causal: bool) -> int:
    return n * (n + 1) // 2 if causal else n * n


def row_stats(conn: Connectivity, causal: bool) -> RowStats:
    counts = conn.row_counts()
    total = int(counts.sum())
    empty = np.nonzero(counts == 0)[0]
    return RowStats(min=int(counts.min()), mean=total / conn.n, max=int(counts.max()), nonzeros=total,
                    density=total / allowed_pairs(conn.n, causal), empty_rows=len(empty),
                    first_empty_row=int(empty[0]) if len(empty) else None)

