"""Exact head statistics against the dense reference mask (`pattern_mask(pattern, n)`), at small n, including n that is
not a multiple of the block or of the pattern's period."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import patterncc
from patterncc import PatternWarning
from patterncc.analysis.analyze import analyze
from patterncc.analysis.layout import EMPTY, FULL, head_layout
from patterncc.mask import pattern_mask
from patterncc.runtime.tiles import single_threaded
from patterncc.semantics import bind_pattern

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Reference masks are many tiny torch ops, which stall with two threads on a busy 2-core machine."""
    with single_threaded():
        yield


SMALL_PARAMS = {"strided": {"l": 7}, "fixed": {"l": 8, "c": 3}, "local": {"w": 5}, "dilated": {"w": 3, "d": 3},
                "bigbird": {"w": 5, "g": 3, "r": 2}, "hybrid": {"w": 6, "l": 9}, "reformer": {}, "linear": {}}

HAND_WRITTEN = {
    "every-primitive": """pattern every(l = 6, c = 2) { block 16
        head a = local(3)
        head b = stride(l)
        head c = chunk(l)
        head d = summary(l, c)
        head e = global(2)
        head f = dilated(2, 3)
        head g = random(2, seed = 5)
        head k = dense }""",
    "algebra-causal": """pattern alg(l = 5) { causal block 16
        head a = strided(l) & (where j % 2 == 0)
        head b = fixed(l, 2) - local(1)
        head c = (where abs(i - j) <= 4 and (j - i) % 2 == 0) | global(1)
        head d = where i // 3 == j // 4 or isqrt(i) == isqrt(j) }""",
    "per-head-index": """pattern idx(l = 8, c = 2) { causal block 32
        head s[3] = where j % l >= l - (h + 1) * c and j % l < l - h * c
        head r[2] = random(1, seed = h) | local(h + 1) }""",
    "empty-rows-bidirectional": """pattern gaps() { block 16
        head a = where j > i + 3
        head b = kernel(relu) }""",
}


def _patterns():
    for name, params in SMALL_PARAMS.items():
        yield f"{name}-small", lambda name=name, params=params: patterncc.parse(EXAMPLES_DIR / f"{name}.attn",
                                                                               **params)
        yield f"{name}-default", lambda name=name: patterncc.parse(EXAMPLES_DIR / f"{name}.attn")
    for name, text in HAND_WRITTEN.items():
        yield name, lambda text=text: patterncc.parse(text)


PATTERNS = dict(_patterns())


def _reference_heads(pattern, n: int) -> dict[str, torch.Tensor]:
    """The reference mask of every analysis entry: declared heads by name, and the union of known heads."""
    bound = bind_pattern(pattern, n)
    masks = pattern_mask(pattern, n)  # multihead: one per declared head, in declaration order
    out, start, known = {}, 0, []
    for group, count in zip(pattern.heads, bound.counts):
        for h in range(count):
            out[f"{group.name}[{h}]"] = masks[start + h]
            out.setdefault(group.name, masks[start + h])
            if group.family != "hashed":
                known.append(masks[start + h])
        start += count
    if known:
        out["union"] = torch.stack(known).any(dim=0)
    return out


@pytest.mark.parametrize("n", [37, 130, 200], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("case", list(PATTERNS), ids=list(PATTERNS))
def test_stats_match_reference_mask(case: str, n: int):
    pattern = PATTERNS[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        result = analyze(pattern, n)
    reference = _reference_heads(pattern, n)
    allowed = n * (n + 1) // 2 if pattern.causal else n * n
    entries = list(result.heads) + ([result.union] if result.union else [])
    assert (result.union is None) == ("union" not in reference)
    for entry in entries:
        where = f"{case} n={n} head {entry.name}"
        if entry.family == "hashed":
            assert entry.rows is None and entry.layout is None, where
            continue
        rows = reference[entry.name].sum(dim=1)
        stats = entry.rows
        assert (stats.min, stats.max) == (int(rows.min()), int(rows.max())), f"{where}: min/max keys per row"
        assert stats.nonzeros == int(rows.sum()), f"{where}: nonzeros"
        assert stats.mean == int(rows.sum()) / n, f"{where}: mean"
        assert stats.density == int(rows.sum()) / allowed, f"{where}: density"
        empty = (rows == 0).nonzero()
        assert stats.empty_rows == len(empty), f"{where}: empty rows"
        assert stats.first_empty_row == (int(empty[0]) if len(empty) else None), f"{where}: first empty row"


@pytest.mark.parametrize("case", ["strided-small", "every-primitive", "per-head-index", "bigbird-small"])
def test_layout_summary_is_the_kernels_layout_and_sound(case: str):
    """The block layout reported is `head_layout` at the pattern's block; check it against the mask."""
    pattern = PATTERNS[case]()
    n = 150
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        result = analyze(pattern, n)
    bound = bind_pattern(pattern, n)
    reference = _reference_heads(pattern, n)
    block = bound.block
    tiles = -(-n // block)
    for entry in result.heads:
        group = next(g for g in pattern.heads if g.name == entry.group)
        classes = head_layout(bound, ((group, entry.h or 0),)).classes
        layout = entry.layout
        assert (layout.block, layout.q_tiles, layout.k_tiles) == (block, tiles, tiles)
        assert (layout.empty, layout.full) == (int((classes == EMPTY).sum()), int((classes == FULL).sum()))
        assert layout.empty + layout.partial + layout.full == tiles * tiles
        assert layout.density == float((classes != EMPTY).sum()) / tiles ** 2
        padded = torch.zeros(tiles * block, tiles * block, dtype=torch.bool)
        padded[:n, :n] = reference[entry.name]
        per_tile = padded.view(tiles, block, tiles, block).sum(dim=(1, 3))
        assert not bool(per_tile[classes == EMPTY].any()), f"{case} {entry.name}: an EMPTY tile holds a pair"
        assert bool((per_tile[classes == FULL] == block * block).all()), f"{case} {entry.name}: a FULL tile has a gap"


def test_empty_rows_warn_with_an_example_query():
    pattern = patterncc.parse(EXAMPLES_DIR / "fixed.attn", l=8, c=2)
    with pytest.warns(PatternWarning, match=r"head `summary`: query i = 0 attends to no key \(6 of 50 rows"):
        result = analyze(pattern, 50)
    assert len(result.warnings) == 1 and "summary" in result.warnings[0]
    bidirectional = patterncc.parse(HAND_WRITTEN["empty-rows-bidirectional"])
    with pytest.warns(PatternWarning, match=r"head `a`: query i = 36 attends to no key \(4 of 40 rows"):
        analyze(bidirectional, 40)


def test_no_warning_for_full_rows():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatternWarning)
        analyze(patterncc.parse(EXAMPLES_DIR / "strided.attn", l=7), 100)


def test_kernel_and_hashed_heads():
    result = analyze(patterncc.parse(EXAMPLES_DIR / "hybrid.attn", w=6, l=9), 100)
    summary = result.head("summary")
    assert summary.family == "kernel" and summary.count == 2
    assert (summary.rows.min, summary.rows.max, summary.rows.nonzeros) == (1, 100, 5050)  # support: j <= i
    assert summary.cost.order.expr == 1
    reformer = analyze(patterncc.parse(EXAMPLES_DIR / "reformer.attn"), 256)
    lsh = reformer.head("lsh")
    assert lsh.rows is None and lsh.cost.expected and reformer.union is None
    assert lsh.cost.value(dict(reformer.bound.env), 256) == 4 * 2 * 64  # rounds x 2 chunks of 64


def test_heads_using_h_are_listed_one_by_one():
    with pytest.warns(PatternWarning) as records:  # s[h] sees the h-th summary cells of each chunk of 8
        result = analyze(patterncc.parse(HAND_WRITTEN["per-head-index"]), 64)
    assert [str(r.message).split(":")[0] for r in records] == [f"pattern `idx`, head `s[{h}]`" for h in range(3)]
    assert "(6 of 64 rows are empty" in str(records[0].message)
    assert [(e.name, e.h, e.count) for e in result.heads] == [("s[0]", 0, 1), ("s[1]", 1, 1), ("s[2]", 2, 1),
                                                             ("r[0]", 0, 1), ("r[1]", 1, 1)]
    identical = analyze(patterncc.parse(EXAMPLES_DIR / "local.attn", w=4), 64)
    assert [(e.name, e.h, e.count) for e in identical.heads] == [("window", None, 4)]
    assert identical.layer_heads == ("window",) * 4


def test_large_n_never_builds_the_dense_mask(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the analysis must not build an n x n mask")

    monkeypatch.setattr(patterncc.mask, "pattern_mask", refuse)
    monkeypatch.setattr(patterncc.mask, "set_mask", refuse)
    result = analyze(patterncc.parse(EXAMPLES_DIR / "strided.attn"), 8192 + 37)
    stride = result.head("stride")
    n, l = 8192 + 37, 128  # noqa: E741
    # stride(l), causal: row i sees i // l + 1 keys
    assert stride.rows.nonzeros == sum(i // l + 1 for i in range(n))
    assert (stride.rows.min, stride.rows.max) == (1, (n - 1) // l + 1)
