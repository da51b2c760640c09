"""Path-length-p coverage, the Sparse Transformer criterion (Child et al. 2019, section 4.2).

A stack of attention layers with residual connections passes information from key j to query i in p steps when
there is a chain j = k_0, k_1, ..., k_p = i where each k_{s+1} attends to k_s in step s (or k_{s+1} = k_s: the
residual is a self loop). The pattern covers in p steps when every allowed pair (all j <= i when causal) has such
a chain. Computed exactly by propagating reach sets: reach_{s+1}[i] = OR over k in N_s(i) of reach_s[k],
one packed bit per (i, j).

Speed comes from never touching one key at a time where a whole run of keys can be taken at once. A step's
explicit pairs come from a `Connectivity`: a FULL tile contributes the OR of its 64 source rows (computed once
per tile per step), a partial tile whose rows all carry the same word (summary cells) contributes once per query
tile, and a run of consecutive keys inside a partial tile is one lookup of a running OR within the tile (from its
first row, or to its last) or two lookups of a per-tile sparse table. Residue windows (`stride(l)`,
`dilated(w, d)`) are kept apart: running ORs along each residue class replace their n / l (or 2w + 1) lookups per
row. Reach rows are only read over the words their query tiles can hold (a window that grows as reach grows), and
columns are processed in slabs so memory stays bounded for large n (n = 16384 needs 32 MB per reach buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import EMPTY, FULL
from .stats import ALL_ONES, TILE, Connectivity, StepPairs, allowed_pairs, empty_connectivity

# Where a lookup reads: the reach rows themselves, a level 1..5 of the per-tile sparse table (OR of rows
# src .. src + 2^L - 1), or the OR of a tile's rows from its first row (prefix) or up to its last (suffix).
_REACH, _PREFIX, _SUFFIX = 0, 6, 7
_TILES_PER_CHUNK = 8  # destination query tiles computed together
_FEW_ROWS = 16  # destinations below which a lookup matrix is gathered in one call
_SPARSE_BELOW = 0.25  # derive only the rows read when they OR fewer than this fraction of all rows
_WORDS_PER_BUFFER = 1 << 22  # reach buffer size cap (32 MB); wider problems are cut into column slabs


@dataclass(frozen=True)
class CoverageResult:
    """Coverage of one step sequence (the merged union, or the declared head order)."""

    status: str  # "covered", "not_within_max_steps", "never" (a fixed point short of all pairs), "unknown"
    steps: int | None  # smallest p that covers every allowed pair, when status == "covered"
    max_steps: int
    covered: tuple[int, ...]  # allowed pairs connected after step 1, 2, ... (until covered or stopped)
    allowed: int  # allowed pairs: n (n + 1) / 2 when causal, else n^2
    witness: tuple[int, int] | None  # the first allowed pair (i, j) not connected after the last step computed
    sequence: tuple[str, ...]  # what each step of one cycle attends over
    note: str | None = None

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(c / self.allowed for c in self.covered)

    def to_json(self) -> dict:
        return {"status": self.status, "steps": self.steps, "max_steps": self.max_steps,
                "fractions": list(self.fractions), "covered_pairs": list(self.covered),
                "witness": list(self.witness) if self.witness else None, "sequence": list(self.sequence),
                "note": self.note}


class _Step:
    """One attention step (a Connectivity with self loops) compiled into lookups, grouped by destination chunk.

    A lookup (source, row) ORs one row of one source array (see _REACH, _PREFIX, _SUFFIX) into its destination:
    a query tile (FULL tiles, and partial tiles whose rows all hold one word) or a single query row.
    """

    def __init__(self, pairs: StepPairs):
        conn = pairs.explicit.with_self_loops()
        self.classes = tuple(sorted(p for p, m in pairs.residues if m is None))  # unbounded: whole classes
        self.windows = tuple(sorted((p, m) for p, m in pairs.residues if m is not None))
        nt = conn.num_tiles
        self.nt, self.nrows = nt, nt * TILE
        full_q, full_t = np.nonzero(conn.classes == FULL)
        tile_parts = [(full_q, np.full(len(full_q), _PREFIX), full_t * TILE + TILE - 1)]
        valid_rows = np.clip(conn.n - conn.tile_q * TILE, 0, TILE)
        row_valid = np.arange(TILE)[None, :] < valid_rows[:, None]
        uniform = ((conn.words == conn.words[:, :1]) | ~row_valid).all(axis=1)
        uniform_tiles = np.nonzero(uniform)[0]
        index, start, end = _runs(conn.words[uniform_tiles, 0])
        tiles = uniform_tiles[index]
        tile_parts += _run_lookups(conn.tile_q[tiles], conn.tile_k[tiles], start, end)
        mixed = np.nonzero(~uniform)[0]
        index, start, end = _runs(conn.words[mixed].ravel())
        tiles, rows = mixed[index // TILE], index % TILE
        row_parts = _run_lookups(conn.tile_q[tiles] * TILE + rows, conn.tile_k[tiles], start, end)
        self.tile_lookups = _sorted_lookups(tile_parts)
        self.row_lookups = _sorted_lookups(row_parts)
        self._choose_derived()
        self.chunks = [self._chunk_plan(q0, min(q0 + _TILES_PER_CHUNK, nt))
                       for q0 in range(0, nt, _TILES_PER_CHUNK)]

    def _choose_derived(self) -> None:
        """For each derived source kind the step reads, compute it densely (every row of the tiles read, by
        running ORs) or sparsely (only the rows read, each from its own range), whichever ORs fewer rows."""
        dst_src = np.concatenate([self.tile_lookups[1], self.row_lookups[1]])
        rows_read = np.concatenate([self.tile_lookups[2], self.row_lookups[2]])
        self.dense: dict[int, np.ndarray] = {}  # kind -> bool per tile group: compute there
        self.sparse: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # kind -> (first, last) row of each range
        self.remap: dict[int, np.ndarray] = {}  # kind -> sorted rows read (lookup index = position in it)
        for kind in np.unique(dst_src):
            kind = int(kind)
            if kind == _REACH:
                continue
            rows = np.unique(rows_read[dst_src == kind])
            first, last = _ranges(kind, rows)
            if int((last - first + 1).sum()) < _SPARSE_BELOW * self.nrows:
                self.sparse[kind], self.remap[kind] = (first, last), rows
            else:
                groups = np.zeros(-(-self.nt // _TILES_PER_CHUNK), dtype=bool)
                groups[rows // (TILE * _TILES_PER_CHUNK)] = True
                self.dense[kind] = groups

    def _chunk_plan(self, q0: int, q1: int) -> dict:
        """Padded lookup matrices (per source) of the destination tiles q0..q1-1, and the source tiles read."""
        plan = {"q0": q0, "q1": q1, "tile": {}, "row": {}}
        read = []
        for kind, (dst, source, src), lo, hi in (("tile", self.tile_lookups, q0, q1),
                                                   ("row", self.row_lookups, q0 * TILE, q1 * TILE)):
            a, b = np.searchsorted(dst, [lo, hi])
            dst, source, src = dst[a:b] - lo, source[a:b], src[a:b]
            for kind_of_source in np.unique(source):
                kind_of_source = int(kind_of_source)
                pick = source == kind_of_source
                index, sentinel = src[pick], self.nrows
                if kind_of_source in self.remap:
                    rows = self.remap[kind_of_source]
                    index, sentinel = np.searchsorted(rows, index), len(rows)
                plan[kind][kind_of_source] = _padded(dst[pick], index, hi - lo, sentinel)
            read.append(src // TILE)
        plan["sources"] = np.unique(np.concatenate(read))
        return plan


def _ranges(kind: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reach rows (first, last) whose OR a derived row holds."""
    tile_start = rows - rows % TILE
    if kind == _PREFIX:
        return tile_start, rows
    if kind == _SUFFIX:
        return rows, tile_start + TILE - 1
    return rows, rows + (1 << kind) - 1


def _sorted_lookups(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    dst, source, src = (np.concatenate([p[k] for p in parts]).astype(np.int64) for k in range(3))
    order = np.argsort(dst, kind="stable")
    return dst[order], source[order], src[order]


def _padded(dst: np.ndarray, src: np.ndarray, rows: int, sentinel: int) -> np.ndarray:
    """(rows, max degree) matrix of sources per destination; empty slots hold `sentinel` (an all-zero row)."""
    counts = np.bincount(dst, minlength=rows)
    out = np.full((rows, max(int(counts.max(initial=0)), 1)), sentinel, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out[dst, np.arange(len(dst)) - starts[dst]] = src
    return out


def _runs(words: np.ndarray):
    """Maximal runs of set bits: (index of the word, first bit, last bit) per run, ordered by word then bit."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    index, start = _bit_positions(words & ~(words << np.uint64(1)))
    _, end = _bit_positions(words & ~(words >> np.uint64(1)))
    return index, start, end


def _bit_positions(words: np.ndarray):
    """(index of the word, bit) of every set bit, ordered by word then bit; work follows the set bits."""
    index = np.nonzero(words)[0]
    words = words[index]
    found_index, found_bit = [], []
    while len(words):
        lowest = words & (~words + np.uint64(1))
        found_index.append(index)
        found_bit.append(np.log2(lowest.astype(np.float64)).astype(np.int64))  # exact: lowest is a power of two
        words = words ^ lowest
        keep = words != 0
        index, words = index[keep], words[keep]
    if not found_index:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    index, bit = np.concatenate(found_index), np.concatenate(found_bit)
    order = np.argsort(index, kind="stable")  # rounds visit bits in ascending order within each word
    return index[order], bit[order]


def _unpack(words: np.ndarray) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")


def _run_lookups(dst: np.ndarray, tile: np.ndarray, start: np.ndarray, end: np.ndarray):
    """The (dst, source, row) lookups that OR keys start..end of a tile: a prefix or suffix OR when the run
    touches the tile's edge, else one reach row or the two (possibly equal) power-of-two runs of the sparse
    table that cover it."""
    base = tile * TILE
    prefix = start == 0
    suffix = (end == TILE - 1) & ~prefix
    inner = ~prefix & ~suffix
    parts = [(dst[prefix], np.full(prefix.sum(), _PREFIX), (base + end)[prefix]),
             (dst[suffix], np.full(suffix.sum(), _SUFFIX), (base + start)[suffix])]
    dst, base, start, end = dst[inner], base[inner], start[inner], end[inner]
    level = np.floor(np.log2(end - start + 1)).astype(np.int64)
    parts.append((dst, level, base + start))
    second = end - (1 << level) + 1 != start
    parts.append((dst[second], level[second], (base + end - (1 << level) + 1)[second]))
    return parts


class _Slab:
    """Reach sets restricted to key words [w0, w1): double-buffered reach rows and the derived source arrays.

    Each reach row is one query; rows past n and the last (sentinel) row stay zero. Reach only grows from step
    to step (self loops), so every array is zero outside the per-tile word spans, which only widen: a step
    rewrites each destination over its whole span and never needs to clear what lies beyond.
    """

    def __init__(self, n: int, nt: int, w0: int, w1: int, causal: bool):
        self.n, self.nt, self.w0, self.w1, self.causal = n, nt, w0, w1, causal
        self.shape = (nt * TILE + 1, w1 - w0)  # + 1: the all-zero sentinel row
        self.reach = np.zeros(self.shape, dtype=np.uint64)
        self.next = np.zeros(self.shape, dtype=np.uint64)
        self.dense_buffers: dict[int, np.ndarray] = {}  # derived kind -> full array, allocated when first needed
        self.derived: dict[int, np.ndarray] = {}  # what the current step reads, per source kind
        self.span_lo = np.zeros(nt, dtype=np.int64)  # words of reach rows of tile t lie in [span_lo, span_hi)
        self.span_hi = np.zeros(nt, dtype=np.int64)

    def start(self, conn: Connectivity) -> int:
        """Reach after the first step: that step's own pairs (self loops included). Returns the pairs covered."""
        nonempty = conn.classes != EMPTY
        self.span_lo = np.argmax(nonempty, axis=1).astype(np.int64)
        self.span_hi = self.nt - np.argmax(nonempty[:, ::-1], axis=1).astype(np.int64)
        full_q, full_t = np.nonzero(conn.classes == FULL)
        in_slab = (full_t >= self.w0) & (full_t < self.w1)
        rows = full_q[in_slab, None] * TILE + np.arange(TILE)[None, :]
        self.reach[rows, (full_t[in_slab] - self.w0)[:, None]] = ALL_ONES
        in_slab = (conn.tile_k >= self.w0) & (conn.tile_k < self.w1)
        rows = conn.tile_q[in_slab, None] * TILE + np.arange(TILE)[None, :]
        self.reach[rows, (conn.tile_k[in_slab] - self.w0)[:, None]] = conn.words[in_slab]
        return int(np.bitwise_count(self.reach).sum())

    def advance(self, step: _Step) -> int:
        """reach <- step(reach). Returns the pairs covered afterwards."""
        self._derive(step)
        classes = {period: self._residue_classes(period) for period in step.classes}
        covered = 0
        new_lo, new_hi = self.span_lo.copy(), self.span_hi.copy()
        for plan in step.chunks:
            q0, q1 = plan["q0"], plan["q1"]
            r0, r1 = q0 * TILE, q1 * TILE
            sources = [plan["sources"]]
            if classes:  # a residue class reaches every earlier tile (every tile when bidirectional)
                sources.append(np.arange(q1 if self.causal else self.nt))
            for period, reach in step.windows:
                back, ahead = self._window_rows(period, reach)
                sources.append(np.arange(max(r0 - back, 0) // TILE, min(-(-(r1 + ahead) // TILE), self.nt)))
            sources = np.concatenate(sources)
            lo = max(int(self.span_lo[sources].min()), self.w0)
            hi = min(int(self.span_hi[sources].max()), self.w1)
            if hi <= lo:
                continue
            a, b = lo - self.w0, hi - self.w0
            out = np.zeros((r1 - r0, b - a), dtype=np.uint64)
            for source, matrix in plan["row"].items():
                _or_lookups(out, self._array(source), matrix, a, b)
            if plan["tile"]:
                per_tile = np.zeros((q1 - q0, b - a), dtype=np.uint64)
                for source, matrix in plan["tile"].items():
                    _or_lookups(per_tile, self._array(source), matrix, a, b)
                out |= np.repeat(per_tile, TILE, axis=0)
            for period, (table, c0) in classes.items():
                if self.causal:
                    out |= table[r0:r1, a - c0:b - c0]
                else:
                    out |= table[np.arange(r0, r1) % period, a - c0:b - c0]
            for period, reach in step.windows:
                out |= self._residue_window(r0, r1, period, reach, a, b)
            out[max(self.n - r0, 0):] = 0  # rows past n
            self.next[r0:r1, a:b] = out
            covered += int(np.bitwise_count(out).sum())
            new_lo[q0:q1], new_hi[q0:q1] = np.minimum(new_lo[q0:q1], lo), np.maximum(new_hi[q0:q1], hi)
        self.reach, self.next = self.next, self.reach
        self.span_lo, self.span_hi = new_lo, new_hi
        return covered

    def _window_rows(self, period: int, reach: int) -> tuple[int, int]:
        """How many rows before and after a query a residue window reads."""
        return period * reach, (0 if self.causal else period * reach)

    def _residue_window(self, r0: int, r1: int, period: int, reach: int, a: int, b: int) -> np.ndarray:
        """Rows r0..r1-1 of: OR of reach rows i - t l for t = 0..m (t = -m..m when bidirectional), words a..b.

        A sliding-window OR along each residue class by doubling: after each pass, row x holds the OR of the
        `span` rows x, x - l, ..., and two overlapping windows make a longer one (measured 10x faster in numpy
        than van Herk's running ORs, whose accumulations run along a strided axis)."""
        back, ahead = self._window_rows(period, reach)
        first, length = r0 - back, (r1 - r0) + back + ahead  # rows read, from `first`
        window = reach + 1 + ahead // period  # rows of one class per window
        rows = np.zeros((length, b - a), dtype=np.uint64)
        lo, hi = max(first, 0), min(first + length, self.shape[0] - 1)
        if hi > lo:
            rows[lo - first:hi - first] = self.reach[lo:hi, a:b]
        span = 1
        while span < window:
            shift = min(span, window - span) * period
            longer = rows.copy()
            longer[shift:] |= rows[:-shift]
            rows, span = longer, span + shift // period
        return rows[back + ahead:]  # row x's window ends at x + ahead

    def _residue_classes(self, period: int) -> tuple[np.ndarray, int]:
        """OR of reach rows along residue classes mod `period`, over the words any reach row holds (from word c0):
        causal, row i holds the OR of rows i, i - l, i - 2l, ...; bidirectional, row r < l the OR of its class."""
        c0 = max(int(self.span_lo.min()), self.w0) - self.w0
        c1 = min(int(self.span_hi.max()), self.w1) - self.w0
        rows = self.nt * TILE
        blocks = -(-rows // period)
        table = np.zeros((blocks * period, max(c1 - c0, 0)), dtype=np.uint64)
        table[:rows] = self.reach[:rows, c0:c1]
        grid = table.reshape(blocks, period, -1)
        if not self.causal:
            return np.bitwise_or.reduce(grid, axis=0), c0
        np.bitwise_or.accumulate(grid, axis=0, out=grid)
        return table, c0

    def _array(self, source: int) -> np.ndarray:
        return self.reach if source == _REACH else self.derived[source]

    def _derive(self, step: _Step) -> None:
        """The derived source arrays the step reads (prefix and suffix ORs within tiles, sparse-table levels)."""
        for kind, (first, last) in step.sparse.items():
            tiles = np.unique(first // TILE)
            lo = max(int(self.span_lo[tiles].min()), self.w0) - self.w0
            hi = min(int(self.span_hi[tiles].max()), self.w1) - self.w0
            table = np.zeros((len(first) + 1, self.shape[1]), dtype=np.uint64)
            if hi > lo:
                acc = self.reach[first, lo:hi]
                for offset in range(1, int((last - first).max(initial=0)) + 1):
                    np.bitwise_or(acc, self.reach[np.minimum(first + offset, last), lo:hi], out=acc)
                table[:-1, lo:hi] = acc
            self.derived[kind] = table
        dense = sorted(step.dense)
        for kind in dense:
            if kind not in self.dense_buffers:
                self.dense_buffers[kind] = np.zeros(self.shape, dtype=np.uint64)
            self.derived[kind] = self.dense_buffers[kind]
        for group, t0 in enumerate(range(0, self.nt, _TILES_PER_CHUNK)):
            kinds = [kind for kind in dense if step.dense[kind][group]]
            if not kinds:
                continue
            t1 = min(t0 + _TILES_PER_CHUNK, self.nt)
            lo = max(int(self.span_lo[t0:t1].min()), self.w0) - self.w0
            hi = min(int(self.span_hi[t0:t1].max()), self.w1) - self.w0
            if hi <= lo:
                continue
            rows = slice(t0 * TILE, t1 * TILE)
            block = self.reach[rows, lo:hi]
            tiled = block.reshape(t1 - t0, TILE, hi - lo)
            if _PREFIX in kinds:
                self.derived[_PREFIX][rows, lo:hi] = np.bitwise_or.accumulate(tiled, axis=1).reshape(block.shape)
            if _SUFFIX in kinds:
                suffix = np.bitwise_or.accumulate(tiled[:, ::-1], axis=1)[:, ::-1]
                self.derived[_SUFFIX][rows, lo:hi] = suffix.reshape(block.shape)
            previous = block
            for level in range(1, max((k for k in kinds if k < _PREFIX), default=0) + 1):
                half = 1 << (level - 1)
                current = previous.copy()
                current[:-half] |= previous[half:]  # rows near a tile's end mix tiles: no lookup reads them
                if level in kinds:
                    self.derived[level][rows, lo:hi] = current
                previous = current

    def row_deficit(self) -> tuple[int, int] | None:
        """The first allowed pair (i, j) with j in this slab that is not covered, or None."""
        counts = np.bitwise_count(self.reach[: self.n]).sum(axis=1).astype(np.int64)
        first_key, last_key = self.w0 * TILE, min(self.w1 * TILE, self.n)
        rows = np.arange(self.n)
        expected = np.clip((rows + 1 if self.causal else self.n) - first_key, 0, last_key - first_key)
        short = np.nonzero(counts < expected)[0]
        if not len(short):
            return None
        i = int(short[0])
        bits = _unpack(self.reach[i]).ravel().astype(bool)
        allowed = np.arange(len(bits)) + first_key <= (i if self.causal else self.n - 1)
        j = int(np.nonzero(~bits & allowed)[0][0]) + first_key
        return i, j


def _or_lookups(out: np.ndarray, source: np.ndarray, matrix: np.ndarray, a: int, b: int) -> None:
    """out[r] |= OR over d of source[matrix[r, d], a:b]: one gather per column (measured fastest in numpy),
    or one gather in all when there are only a few destinations and per-call overhead would dominate."""
    rows, degree = matrix.shape
    if rows <= _FEW_ROWS:
        gathered = source[matrix.T.ravel(), a:b].reshape(degree, rows, b - a)
        np.bitwise_or(out, np.bitwise_or.reduce(gathered, axis=0), out=out)
        return
    for d in range(degree):
        np.bitwise_or(out, source[matrix[:, d], a:b], out=out)


def coverage(steps: list[StepPairs], names: list[str], causal: bool, max_steps: int) -> CoverageResult:
    """Coverage of the step sequence steps[0], steps[1], ... repeated cyclically. Self loops are added here."""
    cycle = len(steps)
    n, nt = steps[0].explicit.n, steps[0].explicit.num_tiles
    compiled: dict[int, _Step] = {}
    slab_words = max(1, min(nt, _WORDS_PER_BUFFER // (nt * TILE + 1)))
    slab_counts, witnesses, finished, stalled = [], [], [], False
    for w0 in range(0, nt, slab_words):
        w1 = min(w0 + slab_words, nt)
        slab = _Slab(n, nt, w0, w1, causal)
        slab_total = _slab_allowed(n, w0, w1, causal)
        first = steps[0].whole if steps[0].whole is not None else \
            (steps[0].explicit if not steps[0].residues else None)
        if first is None:  # start from the residual alone and take the first step like any other
            slab.start(empty_connectivity(n).with_self_loops())
            counts = []
        else:
            counts = [slab.start(first.with_self_loops())]
        while not counts or (counts[-1] < slab_total and len(counts) < max_steps
                             and not _cycle_stalled(counts, cycle)):
            index = len(counts) % cycle  # the step numbered len(counts) + 1
            if index not in compiled:
                compiled[index] = _Step(steps[index])
            counts.append(slab.advance(compiled[index]))
        if counts[-1] == slab_total:
            finished.append(len(counts))
        else:
            witnesses.append(slab.row_deficit())
            stalled |= _cycle_stalled(counts, cycle)
        slab_counts.append(counts)
    total = allowed_pairs(n, causal)
    length = max(len(c) for c in slab_counts)
    covered = tuple(sum(c[min(s, len(c) - 1)] for c in slab_counts) for s in range(length))
    if not witnesses:
        return CoverageResult("covered", max(finished), max_steps, covered, total, None, tuple(names))
    status = "never" if stalled else "not_within_max_steps"
    return CoverageResult(status, None, max_steps, covered, total, min(witnesses), tuple(names))


def _cycle_stalled(counts: list[int], cycle: int) -> bool:
    """No pair was added over a whole cycle of steps: reach is a fixed point of every step, forever."""
    return len(counts) > cycle and counts[-1] == counts[-1 - cycle]


def _slab_allowed(n: int, w0: int, w1: int, causal: bool) -> int:
    first_key, last_key = w0 * TILE, min(w1 * TILE, n)
    if not causal:
        return n * max(last_key - first_key, 0)
    keys = np.arange(first_key, last_key, dtype=np.int64)
    return int((n - keys).sum())
