"""Tile classification by abstract interpretation: is a (query tile, key tile) pair empty, partial or full?

Every quantity is a *strided interval* per tile pair: all the values it can take lie in
{lo, lo + st, lo + 2 st, ..., hi} (st == 0: the single value lo). Tiles of positions are exact strided
intervals in natural order (st = 1) and after the grid permutations the analysis finds (st = l), which is what
lets `(i - j) % l == 0` be decided per tile. Predicates are three-valued: (may_be_true, may_be_false).
The result is sound, never exact by luck: "full" means every pair in the tile satisfies the predicate, "empty"
means none does; anything unproven is "partial" and the kernel evaluates the predicate there.

All ops are vectorized over tile pairs with torch int64 tensors that broadcast (query tiles along dim 0, key
tiles along dim 1). Self-contained (torch and math only): generated modules embed this file.
"""

import contextlib

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = 1 << 60  # values beyond this are treated as unbounded; keeps int64 products from wrapping


class SI:
    """A strided interval per tile pair: lo, hi, st (int64 tensors or Python ints, broadcastable)."""

    __slots__ = ("lo", "hi", "st")

    def __init__(self, lo, hi, st):
        self.lo, self.hi, self.st = lo, hi, st

    def __repr__(self):
        return f"SI(lo={self.lo}, hi={self.hi}, st={self.st})"


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int64)


def const(c: int) -> SI:
    return SI(_t(c), _t(c), _t(0))


def _top_like(*xs) -> SI:
    shape = torch.broadcast_shapes(*(_t(x).shape for x in xs))
    return SI(torch.full(shape, -_BIG), torch.full(shape, _BIG), torch.ones(shape, dtype=torch.int64))


def _clamp(s: SI) -> SI:
    """Widen anything near the int64 edge to the unbounded interval (sound: it only loses precision)."""
    wide = (s.lo < -_BIG) | (s.hi > _BIG)
    if not bool(torch.as_tensor(wide).any()):
        return s
    return SI(torch.where(wide, -_BIG, s.lo), torch.where(wide, _BIG, s.hi),
              torch.where(wide, 1, s.st))


class TilePieces:
    """The positions of each tile as a union of at most a few strided intervals ("pieces"): piece k of every tile
    (an SI of shape (num_tiles,)) with `valid[k]`, which tiles have a k-th piece. A tile of a grid-transposed order
    holds runs of several residue classes (when n / period is not a multiple of the tile): one strided interval
    per run keeps `(i - j) % l == 0` decidable, where their hull (stride gcd 1) would not."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: list[tuple[SI, torch.Tensor]]):
        self.pieces = pieces

    @property
    def num_tiles(self) -> int:
        return self.pieces[0][0].lo.shape[0]


MAX_PIECES = 4  # beyond this many runs a tile is described by its hull (sound, less precise)


def _runs_hull(grid: torch.Tensor, valid: torch.Tensor) -> SI:
    lo = torch.where(valid, grid, _BIG).min(dim=1).values
    hi = torch.where(valid, grid, -1).max(dim=1).values
    st = torch.zeros(grid.shape[0], dtype=torch.int64)
    for c in range(grid.shape[1]):
        st = torch.gcd(st, torch.where(valid[:, c], grid[:, c] - lo, 0))
    return SI(lo, hi, st)


def tile_positions(positions: torch.Tensor, n: int, tile: int) -> TilePieces:
    """Per tile of `tile` consecutive slots of `positions` (a permutation of 0..n-1, or arange(n)): the original
    positions it holds, as up to MAX_PIECES strided intervals, one per maximal run of slots whose positions step
    by the tile's most common step. Slots past n (the last tile's padding) are ignored."""
    num_tiles = -(-n // tile)
    padded = torch.full((num_tiles * tile,), -1, dtype=torch.int64)
    padded[:n] = positions.to(torch.int64)
    grid = padded.view(num_tiles, tile)
    valid = grid >= 0
    if tile == 1:
        return TilePieces([(_runs_hull(grid, valid), valid[:, 0])])
    step = grid[:, 1:] - grid[:, :-1]
    both = valid[:, 1:] & valid[:, :-1]
    usual = torch.mode(torch.where(both, step, step[:, :1]), dim=1).values
    breaks = both & (step != usual[:, None])
    run = torch.cat([torch.zeros(num_tiles, 1, dtype=torch.int64), torch.cumsum(breaks, dim=1)], dim=1)
    many = run.max(dim=1).values >= MAX_PIECES
    run[many] = 0  # too many runs: the hull
    pieces = []
    for k in range(int(run.max()) + 1):
        member = valid & (run == k)
        pieces.append((_runs_hull(grid, member), member.any(dim=1)))
    return TilePieces(pieces)


def natural_tiles(n: int, tile: int) -> SI:
    """Tile intervals of the identity order, in closed form (no permutation tensor)."""
    lo = torch.arange(0, n, tile, dtype=torch.int64)
    hi = torch.clamp(lo + tile - 1, max=n - 1)
    return SI(lo, hi, (hi > lo).to(torch.int64))


# Integer ops ----------------------------------------------------------------------------------------------------


def _gcd(a, b) -> torch.Tensor:
    """Elementwise gcd of non-negative strides, broadcast. Strides take few distinct values (0 and 1 in natural
    order, l after a grid transpose), so gcd runs on a table of distinct pairs: torch.gcd over every tile pair
    would dominate the layout's cost."""
    a, b = _t(a), _t(b)
    if bool((a <= 1).all()) and bool((b <= 1).all()):
        return torch.maximum(a, b)
    values_a, index_a = torch.unique(a, return_inverse=True)
    values_b, index_b = torch.unique(b, return_inverse=True)
    if values_a.numel() * values_b.numel() > 4096:
        return torch.gcd(*torch.broadcast_tensors(a, b))
    table = torch.gcd(values_a[:, None], values_b[None, :])
    return table[index_a, index_b]


def add(a: SI, b: SI) -> SI:
    return _clamp(SI(a.lo + b.lo, a.hi + b.hi, _gcd(a.st, b.st)))


def neg(a: SI) -> SI:
    return SI(-a.hi, -a.lo, a.st)


def sub(a: SI, b: SI) -> SI:
    return add(a, neg(b))


def mul(a: SI, b: SI) -> SI:
    corners = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
    lo = torch.minimum(torch.minimum(_t(corners[0]), _t(corners[1])), torch.minimum(_t(corners[2]), _t(corners[3])))
    hi = torch.maximum(torch.maximum(_t(corners[0]), _t(corners[1])), torch.maximum(_t(corners[2]), _t(corners[3])))
    # (a.lo + s k)(b.lo + t m) - a.lo b.lo is a multiple of gcd(a.lo t, b.lo s, s t)
    st = _gcd(torch.abs(_gcd(torch.abs(_t(a.lo) * _t(b.st)), torch.abs(_t(b.lo) * _t(a.st)))),
              torch.abs(_t(a.st) * _t(b.st)))
    big = (torch.abs(lo) > _BIG) | (torch.abs(hi) > _BIG)
    # bound the product's size before trusting int64: operands up to 2**31 cannot overflow
    a_big = (torch.abs(_t(a.lo)) > 1 << 31) | (torch.abs(_t(a.hi)) > 1 << 31)
    b_big = (torch.abs(_t(b.lo)) > 1 << 31) | (torch.abs(_t(b.hi)) > 1 << 31)
    big = big | a_big | b_big
    out = SI(lo, hi, torch.abs(st))
    if bool(big.any()):
        top = _top_like(lo, hi)
        out = SI(torch.where(big, top.lo, lo), torch.where(big, top.hi, hi), torch.where(big, 1, out.st))
    return out


def _positive_const_divisor(b: SI):
    return (_t(b.st) == 0) & (_t(b.lo) > 0)


def floordiv(a: SI, b: SI) -> SI:
    """a // b. Exact stride when the divisor is a positive constant dividing a's stride."""
    const_pos = _positive_const_divisor(b)
    d = torch.where(const_pos, _t(b.lo), 1)
    lo, hi = torch.div(_t(a.lo), d, rounding_mode="floor"), torch.div(_t(a.hi), d, rounding_mode="floor")
    exact = (_t(a.st) % d) == 0
    st = torch.where(exact, _t(a.st) // d, (hi > lo).to(torch.int64))
    # Non-constant or non-positive divisors: bound by the corner quotients when the divisor keeps one sign.
    general = ~const_pos
    if bool(general.any()):
        sign_fixed = (_t(b.lo) > 0) | (_t(b.hi) < 0)
        qs = []
        for x in (a.lo, a.hi):
            for y in (b.lo, b.hi):
                y = torch.where(_t(y) == 0, 1, _t(y))
                qs.append(torch.div(_t(x), y, rounding_mode="floor"))
        glo = torch.minimum(torch.minimum(qs[0], qs[1]), torch.minimum(qs[2], qs[3]))
        ghi = torch.maximum(torch.maximum(qs[0], qs[1]), torch.maximum(qs[2], qs[3]))
        top = _top_like(glo, ghi)
        glo = torch.where(sign_fixed, glo, top.lo)
        ghi = torch.where(sign_fixed, ghi, top.hi)
        lo, hi = torch.where(general, glo, lo), torch.where(general, ghi, hi)
        st = torch.where(general, (hi > lo).to(torch.int64), st)
    return SI(lo, hi, st)


def mod(a: SI, b: SI) -> SI:
    """a % b with Python's sign convention (result in [0, b) for b > 0)."""
    const_pos = _positive_const_divisor(b)
    m = torch.where(const_pos, _t(b.lo), 1)
    a_lo, a_hi, a_st = _t(a.lo), _t(a.hi), _t(a.st)
    single = (a_st == 0) | ((a_st % m) == 0)  # every value of a has the same residue
    no_wrap = torch.div(a_lo, m, rounding_mode="floor") == torch.div(a_hi, m, rounding_mode="floor")
    g = _gcd(a_st, m)
    g = torch.where(g == 0, m, g)
    r = torch.remainder(a_lo, g)
    lo = torch.where(single, torch.remainder(a_lo, m), torch.where(no_wrap, torch.remainder(a_lo, m), r))
    hi = torch.where(single, torch.remainder(a_lo, m),
                     torch.where(no_wrap, torch.remainder(a_hi, m), m - g + r))
    st = torch.where(single, 0, torch.where(no_wrap, a_st, g))
    if bool((~const_pos).any()):
        # Other divisors: the result lies between 0 and the divisor (Python's convention), nothing finer.
        top_hi = torch.maximum(torch.abs(_t(b.lo)), torch.abs(_t(b.hi)))
        lo = torch.where(const_pos, lo, -top_hi)
        hi = torch.where(const_pos, hi, top_hi)
        st = torch.where(const_pos, st, 1)
    return SI(lo, hi, st)


def abs_(a: SI) -> SI:
    lo, hi = _t(a.lo), _t(a.hi)
    nonneg, nonpos = lo >= 0, hi <= 0
    out_lo = torch.where(nonneg, lo, torch.where(nonpos, -hi, 0))
    out_hi = torch.where(nonneg, hi, torch.where(nonpos, -lo, torch.maximum(-lo, hi)))
    st = torch.where(nonneg | nonpos, _t(a.st), (out_hi > out_lo).to(torch.int64))
    return SI(out_lo, out_hi, st)


def minimum(a: SI, b: SI) -> SI:
    lo, hi = torch.minimum(_t(a.lo), _t(b.lo)), torch.minimum(_t(a.hi), _t(b.hi))
    st = _gcd(_gcd(_t(a.st), _t(b.st)), torch.abs(_t(a.lo) - _t(b.lo)))
    return SI(lo, hi, torch.where(hi > lo, st, 0))


def maximum(a: SI, b: SI) -> SI:
    lo, hi = torch.maximum(_t(a.lo), _t(b.lo)), torch.maximum(_t(a.hi), _t(b.hi))
    st = _gcd(_gcd(_t(a.st), _t(b.st)), torch.abs(_t(a.lo) - _t(b.lo)))
    return SI(lo, hi, torch.where(hi > lo, st, 0))


def floor_sqrt(x) -> torch.Tensor:
    """Exact integer square root of non-negative int64 values (negatives clamp to 0)."""
    x = torch.clamp(_t(x), min=0)
    r = torch.sqrt(x.to(torch.float64)).to(torch.int64)
    r = torch.where(r * r > x, r - 1, r)  # float sqrt can be one off near perfect squares
    return torch.where((r + 1) * (r + 1) <= x, r + 1, r)


def isqrt(a: SI) -> SI:
    lo, hi = floor_sqrt(a.lo), floor_sqrt(a.hi)
    return SI(lo, hi, (hi > lo).to(torch.int64))


# Three-valued predicates: (may_be_true, may_be_false) -----------------------------------------------------------


def truth(value: bool):
    return (torch.tensor(bool(value)), torch.tensor(not value))


def _contains_zero(d: SI) -> torch.Tensor:
    lo, hi, st = _t(d.lo), _t(d.hi), _t(d.st)
    in_range = (lo <= 0) & (hi >= 0)
    if bool((st <= 1).all()):  # unit or zero stride: every integer in range (or lo itself) is a value
        return in_range & ((st == 1) | (lo == 0))
    on_grid = torch.where(st == 0, lo == 0, torch.remainder(-lo, torch.where(st == 0, 1, st)) == 0)
    return in_range & on_grid


def compare(op: str, a: SI, b: SI):
    d = sub(a, b)
    lo, hi = _t(d.lo), _t(d.hi)
    zero = _contains_zero(d)
    single_zero = (lo == 0) & (hi == 0)
    if op == "==":
        return zero, ~single_zero
    if op == "!=":
        return ~single_zero, zero
    if op == "<":
        return lo < 0, hi >= 0
    if op == "<=":
        return lo <= 0, hi > 0
    if op == ">":
        return hi > 0, lo <= 0
    if op == ">=":
        return hi >= 0, lo < 0
    raise ValueError(op)


def and_(a, b):
    return a[0] & b[0], a[1] | b[1]


def or_(a, b):
    return a[0] | b[0], a[1] & b[1]


def not_(a):
    return a[1], a[0]


def lookup(table: torch.Tensor, row: SI, col: SI):
    """A boolean table indexed by two integer quantities (e.g. the random primitive's block table)."""
    exact = (_t(row.st) == 0) & (_t(col.st) == 0)
    r = torch.clamp(_t(row.lo), 0, table.shape[0] - 1)
    c = torch.clamp(_t(col.lo), 0, table.shape[1] - 1)
    value = table[r, c]
    # Unknown cells (tiles straddling table blocks) may be either; exact cells are what the table says.
    may_true = torch.where(exact, value, table.any())
    may_false = torch.where(exact, ~value, ~table.all())
    return may_true, may_false


def classify(pred) -> torch.Tensor:
    """int8 per tile pair: EMPTY (never true), FULL (always true) or PARTIAL."""
    may_true, may_false = pred
    out = torch.full(torch.broadcast_shapes(may_true.shape, may_false.shape), PARTIAL, dtype=torch.int8)
    out[~may_true.expand_as(out)] = EMPTY
    out[(may_true & ~may_false).expand_as(out)] = FULL
    return out


def tile_lists(selected: torch.Tensor):
    """Per row, the ascending column indices where `selected` is True: (counts[rows] int32, indices[rows, width]
    int32). Kernels loop to counts[row]; entries past it repeat a valid index and are never read.
    O(non-zeros): built from `nonzero()`, which lists entries row by row with ascending columns."""
    rows = selected.shape[0]
    counts = selected.sum(dim=1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    row, col = selected.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, 0) - counts  # index in `row` where each row's entries begin
    rank = torch.arange(row.shape[0]) - starts[row]
    indices = torch.zeros(rows, width, dtype=torch.int32)
    indices[row, rank] = col.to(torch.int32)
    return counts.to(torch.int32), indices


@contextlib.contextmanager
def single_threaded():
    """Tile ops are many small memory-bound kernels: torch's intra-op threads only contend for them (15x slower
    on a busy 2-core machine), so layouts are built on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _query_rows(tiles_: SI, start: int, stop: int) -> SI:
    return SI(tiles_.lo[start:stop, None], tiles_.hi[start:stop, None], tiles_.st[start:stop, None])


def _key_columns(tiles_: SI) -> SI:
    return SI(tiles_.lo[None, :], tiles_.hi[None, :], tiles_.st[None, :])


def _never_full_past_n(classes: torch.Tensor, n: int, tile_m: int, tile_n: int) -> torch.Tensor:
    # A tile holding padding slots (past n) is never FULL, so FULL tiles need no mask of any kind in a kernel.
    if n % tile_m:
        classes[-1][classes[-1] == FULL] = PARTIAL
    if n % tile_n:
        classes[:, -1][classes[:, -1] == FULL] = PARTIAL
    return classes


def classify_tiles(predicate, q_tiles: SI, k_tiles: SI, n: int, tile_m: int, tile_n: int,
                   rows_per_chunk: int = 256) -> torch.Tensor:
    """int8 classes (num_q_tiles, num_k_tiles) of `predicate(i, j)` (i, j strided intervals per tile), for tiles
    given as one strided interval each (`natural_tiles`). Chunked over query tiles to bound memory."""
    num_q, num_k = q_tiles.lo.shape[0], k_tiles.lo.shape[0]
    classes = torch.empty(num_q, num_k, dtype=torch.int8)
    with single_threaded():
        for start in range(0, num_q, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_q)
            i, j = _query_rows(q_tiles, start, stop), _key_columns(k_tiles)
            classes[start:stop] = classify(predicate(i, j)).expand(stop - start, num_k)
    return _never_full_past_n(classes, n, tile_m, tile_n)


def classify_tile_pieces(predicate, q_tiles, k_tiles, n: int, tile_m: int, tile_n: int,
                         rows_per_chunk: int = 256) -> torch.Tensor:
    """As `classify_tiles`, for tiles given as TilePieces (`tile_positions`): a tile pair is EMPTY when every pair
    of its pieces is, FULL when every pair is."""
    num_q, num_k = q_tiles.num_tiles, k_tiles.num_tiles
    classes = torch.empty(num_q, num_k, dtype=torch.int8)
    with single_threaded():
        for start in range(0, num_q, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_q)
            may_true = torch.zeros(stop - start, num_k, dtype=torch.bool)
            may_false = torch.zeros(stop - start, num_k, dtype=torch.bool)
            for q_piece, q_valid in q_tiles.pieces:
                i = _query_rows(q_piece, start, stop)
                for k_piece, k_valid in k_tiles.pieces:
                    piece_true, piece_false = predicate(i, _key_columns(k_piece))
                    present = q_valid[start:stop, None] & k_valid[None, :]
                    may_true |= piece_true & present
                    may_false |= piece_false & present
            classes[start:stop] = classify((may_true, may_false))
    return _never_full_past_n(classes, n, tile_m, tile_n)


def slot_positions(positions, n: int, num_tiles: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the original position each of the num_tiles * tile slots of a visiting order holds, which slots exist):
    `positions` (None: natural order) for the first n slots; padding slots past n hold their own index."""
    slots = torch.arange(num_tiles * tile, dtype=torch.int64)
    pos = slots.clone()
    if positions is not None:
        pos[:n] = positions.to(torch.int64)
    return pos, slots < n


# Exact refinement of PARTIAL tiles: at most this many predicate evaluations per mask and sequence length (about
# 0.2 s of torch int64 work on one core), in steps of at most _REFINE_STEP pairs (bounded memory). Tiles past the
# budget keep their closed-form class: sound, only possibly PARTIAL where EMPTY or FULL would be exact.
REFINE_BUDGET = 1 << 23
_REFINE_STEP = 1 << 20


def refine_partial(classes: torch.Tensor, allowed, positions, n: int, tile: int,
                   budget: int = REFINE_BUDGET) -> torch.Tensor:
    """`classes` (square, one visiting order for queries and keys) with each PARTIAL tile made exact by evaluating
    the predicate on it: EMPTY when no pair is allowed, FULL when every pair is (and the tile holds no padding).
    allowed(pos_i, pos_j) -> bool tensor, broadcast; positions: original position per slot, or None (natural).

    A probe first reads each tile's first row and first column (2 x tile pairs, every difference i - j the tile
    holds): most tiles the closed form calls PARTIAL are (a band's edge, a column or row set), and a probe that
    sees both values proves it. Only tiles whose probe is uniform are evaluated whole."""
    candidates = (classes == PARTIAL).nonzero()
    if candidates.numel() == 0:
        return classes
    num_tiles = classes.shape[0]
    pos, real = (x.view(num_tiles, tile) for x in slot_positions(positions, n, num_tiles, tile))
    refined = classes.clone()
    spent = 0
    per_step = max(1, _REFINE_STEP // (tile * tile))
    for start in range(0, candidates.shape[0], per_step):
        if spent >= budget:
            break
        q_tile, k_tile = candidates[start:start + per_step].unbind(1)
        rows, cols = pos[q_tile], pos[k_tile]  # [C, tile]; a tile's first row and column are never padding
        first_row, first_col = allowed(rows[:, :1], cols), allowed(rows, cols[:, :1])  # [C, tile] each
        keys_real, queries_real = real[k_tile], real[q_tile]
        seen_true = (first_row & keys_real).any(1) | (first_col & queries_real).any(1)
        seen_false = (~first_row & keys_real).any(1) | (~first_col & queries_real).any(1)
        spent += q_tile.shape[0] * 2 * tile
        uniform = ~(seen_true & seen_false)
        if not bool(uniform.any()):
            continue
        q_tile, k_tile = q_tile[uniform], k_tile[uniform]
        pairs = allowed(pos[q_tile][:, :, None], pos[k_tile][:, None, :]) \
            & real[q_tile][:, :, None] & real[k_tile][:, None, :]
        spent += q_tile.shape[0] * tile * tile
        any_true, all_true = pairs.flatten(1).any(1), pairs.flatten(1).all(1)  # all: every pair real and allowed
        refined[q_tile[~any_true], k_tile[~any_true]] = EMPTY
        refined[q_tile[all_true], k_tile[all_true]] = FULL
    return refined


# A grid permutation is used for a sequence length only where it at least halves the tiles computed there (the
# analysis chooses candidates by the same rule at its reference length).
PERMUTATION_GAIN = 0.5


def permutation_pays(permuted_tiles: int, natural_tiles: int) -> bool:
    return permuted_tiles <= PERMUTATION_GAIN * natural_tiles
