"""Path-length-p coverage against brute-force reachability computed here from the dense reference mask."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import patterncc
from patterncc import PatternWarning
from patterncc.analysis.analyze import analyze
from patterncc.mask import pattern_mask
from patterncc.semantics import bind_pattern

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str, **params):
    return patterncc.parse(EXAMPLES_DIR / f"{name}.attn", **params)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The reference masks are many tiny torch ops; with two intra-op threads they stall on a busy 2-core
    machine (10 ms per 64 x 64 op), so these tests run torch on one thread."""
    from patterncc.runtime.tiles import single_threaded

    with single_threaded():
        yield


CASES = {
    "strided-l7": lambda: _example("strided", l=7),
    "strided-default": lambda: _example("strided"),
    "fixed-l8-c2": lambda: _example("fixed", l=8, c=2),
    "local-w5": lambda: _example("local", w=5),
    "dilated-w3-d2": lambda: _example("dilated", w=3, d=2),
    "hybrid-w5-l7": lambda: _example("hybrid", w=5, l=7),
    "bigbird-w3-g1-r1": lambda: _example("bigbird", w=3, g=1, r=1),
    "chunk-alone": lambda: patterncc.parse("pattern c(l = 10) { causal\n head a = chunk(l) }"),
    "strided-bidirectional": lambda: patterncc.parse(
        "pattern s(l = 6) { block 16\n head a = local(l)\n head b = stride(l) }"),
    "local-bidirectional": lambda: patterncc.parse("pattern w(w = 4) { head a = local(w) }"),
    "fixed-bidirectional": lambda: patterncc.parse(
        "pattern f(l = 8, c = 2) { block 32\n head a = chunk(l)\n head b = summary(l, c) }"),
    "where-and-algebra": lambda: patterncc.parse(
        "pattern q() { causal block 16\n head a = (where (i * 7 + j * 3) % 5 == 0) | local(1)\n"
        " head b = stride(5) - (where i // 3 == j // 5) }"),
    "residue-windows": lambda: patterncc.parse(
        "pattern r() { block 16\n head a = dilated(2, 3) | chunk(5)\n"
        " head b = where abs(j - i) < 9 and (j - i) % 4 == 0 }"),
    "residue-windows-causal": lambda: patterncc.parse(
        "pattern r() { causal block 16\n head a = dilated(3, 5) | summary(7, 1)\n head b = where (i - j) % 6 == 0 }"),
    "with-hashed": lambda: patterncc.parse(
        "pattern m() { causal\n head a = local(3)\n head z = hashed(buckets = 4) }"),
}


def brute_force(pattern, n: int, max_steps: int, merged: bool):
    """(covered pairs per step, status, witness) by boolean matrix products of the reference mask."""
    bound = bind_pattern(pattern, n)
    masks = pattern_mask(pattern, n)
    group_masks, start = [], 0
    for group, count in zip(pattern.heads, bound.counts):
        if group.family == "hashed":  # data-dependent: proves no pair; the step is the residual alone
            group_masks.append(None)
        else:
            group_masks.append(masks[start:start + count].any(dim=0))
        start += count
    known = [m for m in group_masks if m is not None]
    eye = torch.eye(n, dtype=torch.bool)
    steps = [torch.stack(known).any(dim=0)] if merged else [m if m is not None else eye for m in group_masks]
    steps = [(s | eye).numpy().astype(np.int32) for s in steps]
    allowed = np.ones((n, n), dtype=bool)
    if pattern.causal:
        allowed = np.tril(allowed)
    reach, history = np.eye(n, dtype=bool), []
    while True:
        # integer numpy matmul: exact, and no multithreaded BLAS (which stalls on a busy 2-core machine)
        reach = (steps[len(history) % len(steps)] @ reach.astype(np.int32)) > 0
        history.append(reach)
        covered = [int(r.sum()) for r in history]
        if covered[-1] == int(allowed.sum()):
            return covered, "covered", None
        cycle = len(steps)
        if len(history) > cycle and covered[-1] == covered[-1 - cycle]:
            status = "never"
            break
        if len(history) == max_steps:
            status = "not_within_max_steps"
            break
    missing = np.argwhere(allowed & ~reach)  # row-major: the first pair by (i, j)
    return covered, status, tuple(int(x) for x in missing[0])


ENGINES = {  # (destination tiles per chunk, fraction of rows below which derived rows are computed one by one)
    "default": None,
    "chunk1-dense": (1, 0.0),
    "chunk2-sparse": (2, float("inf")),
}


@pytest.mark.parametrize("engine", list(ENGINES), ids=list(ENGINES))
@pytest.mark.parametrize("n", [37, 64, 130], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_coverage_matches_brute_force(case: str, n: int, engine: str, monkeypatch):
    """Every code path of the reach propagation: one or several destination chunks per step, derived rows
    computed densely or one by one."""
    from patterncc.analysis import coverage as coverage_mod

    if ENGINES[engine] is not None:
        tiles_per_chunk, sparse_below = ENGINES[engine]
        monkeypatch.setattr(coverage_mod, "_TILES_PER_CHUNK", tiles_per_chunk)
        monkeypatch.setattr(coverage_mod, "_SPARSE_BELOW", sparse_below)
    pattern = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        result = analyze(pattern, n, max_steps=8)
    for key, merged in (("merged", True), ("declared_order", False)):
        got = result.coverage[key]
        covered, status, witness = brute_force(pattern, n, 8, merged)
        where = f"{case} n={n} {key}"
        assert list(got.covered) == covered, f"{where}: covered pairs per step"
        assert got.status == status, f"{where}: status"
        assert got.steps == (len(covered) if status == "covered" else None), f"{where}: steps"
        assert got.witness == witness, f"{where}: witness"
        assert got.allowed == (n * (n + 1) // 2 if pattern.causal else n * n)


def test_max_steps_caps_the_work_and_reports_a_witness():
    result = analyze(_example("local", w=4), 200, max_steps=3).coverage["merged"]
    covered, status, witness = brute_force(_example("local", w=4), 200, 3, merged=True)
    assert result.status == status == "not_within_max_steps"
    assert len(result.fractions) == 3 and list(result.covered) == covered
    assert result.witness == witness == (13, 0)  # 3 steps of a 4-wide window reach back 12 positions


def test_strided_covers_in_two_steps_at_large_n():
    """The Sparse Transformer's claim for its strided pattern, at a size where brute force would be slow."""
    result = analyze(_example("strided", l=64), 4096)
    for key in ("merged", "declared_order"):
        assert result.coverage[key].status == "covered", key
        assert result.coverage[key].steps == 2, key
        assert result.coverage[key].fractions[-1] == 1.0


def test_only_data_dependent_heads_give_unknown():
    result = analyze(_example("reformer"), 256)
    for key in ("merged", "declared_order"):
        assert result.coverage[key].status == "unknown"
        assert "data-dependent" in result.coverage[key].note or "depend on the data" in result.coverage[key].note
    mixed = analyze(CASES["with-hashed"](), 64).coverage
    assert "depend on the data" in mixed["merged"].note
    assert mixed["declared_order"].sequence == ("a", "z (data-dependent: residual only)")


def test_slabs_give_the_same_answer(monkeypatch):
    """Columns are processed in slabs when the reach buffer would be large; force several slabs."""
    from patterncc.analysis import coverage as coverage_mod

    pattern = _example("dilated", w=3, d=2)
    whole = analyze(pattern, 300).coverage
    monkeypatch.setattr(coverage_mod, "_WORDS_PER_BUFFER", 2 * (5 * 64 + 1))  # two words (128 keys) per slab
    sliced = analyze(pattern, 300).coverage
    for key in whole:
        assert sliced[key].covered == whole[key].covered, key
        assert sliced[key].witness == whole[key].witness, key


def test_max_steps_must_be_positive():
    with pytest.raises(patterncc.PatternUsageError, match="max_steps must be a positive integer, got 0"):
        analyze(_example("local", w=4), 64, max_steps=0)


def test_residue_windows_are_recognised():
    """The shapes the propagation takes as running ORs along residue classes (checked above against brute force)."""
    from patterncc.analysis.stats import step_pairs

    for case, expected in (("residue-windows", [{(3, 2)}, {(4, 2)}]),
                           ("residue-windows-causal", [{(5, 3)}, {(6, None)}]),
                           ("strided-l7", [set(), {(7, None)}]), ("dilated-w3-d2", [set(), {(2, 3)}, {(4, 3)}])):
        pattern = CASES[case]()
        bound = bind_pattern(pattern, 64)
        pairs = [step_pairs(bound, group, h) for group, count in zip(pattern.heads, bound.counts)
                 for h in range(count)]
        assert [set(p.residues) for p in pairs] == expected, case
