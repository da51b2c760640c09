"""Grid-transpose permutations: the formula, soundness of the permuted layout, and when one is chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patterncc
from patterncc.analysis.layout import EMPTY, FULL, head_layout
from patterncc.analysis.permute import Permutation, candidate_periods, choose_permutation, search_permutation
from patterncc.mask import pattern_mask
from patterncc.runtime.tiles import single_threaded
from patterncc.semantics import bind_pattern

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Reference masks are many tiny torch ops, which stall with two threads on a busy 2-core machine."""
    with single_threaded():
        yield


@pytest.mark.parametrize("n", [1, 10, 37, 128, 130], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("period", [2, 3, 8, 16], ids=lambda p: f"L{p}")
def test_positions_are_the_column_major_grid_order(period: int, n: int):
    perm = Permutation(period)
    expected = [p for r in range(period) for p in range(r, n, period)]  # p % l == 0 ascending, then 1, ...
    assert perm.positions(n).tolist() == expected
    assert perm.positions(n).dtype == torch.int64
    assert (perm.positions(n)[perm.inverse(n)] == torch.arange(n)).all()
    assert (perm.inverse(n)[perm.positions(n)] == torch.arange(n)).all()
    # the formula as documented: slot(p) = (p % l) * (n // l) + min(p % l, n % l) + p // l
    slot = [(p % period) * (n // period) + min(p % period, n % period) + p // period for p in range(n)]
    assert perm.inverse(n).tolist() == slot
    assert f"(p % {period}) * (n // {period}) + min(p % {period}, n % {period}) + p // {period}" in perm.formula


SOUNDNESS = {
    "stride": ("pattern s(l = 8) { causal block 16\n head a = stride(l) }", 8),
    "stride-bidirectional": ("pattern s(l = 16) { block 16\n head a = stride(l) }", 16),
    "summary": ("pattern f(l = 16, c = 4) { causal block 16\n head a = summary(l, c) }", 16),
    "dilated": ("pattern d() { block 16\n head a = where abs(i - j) <= 24 and (i - j) % 4 == 0 }", 4),
    "strided": ("pattern m(l = 8) { causal block 16\n head a = strided(l) }", 8),
}


@pytest.mark.parametrize("n", [64, 130, 256], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("case", list(SOUNDNESS), ids=list(SOUNDNESS))
def test_permuted_layout_is_sound(case: str, n: int):
    """EMPTY and FULL tiles of the permuted layout agree with the mask gathered through the permutation."""
    text, period = SOUNDNESS[case]
    pattern = patterncc.parse(text)
    bound = bind_pattern(pattern, n)
    perm = Permutation(period)
    positions = perm.positions(n)
    classes = head_layout(bound, bound.head_sets(0)[0], positions=positions).classes
    mask = pattern_mask(pattern, n)[0][positions][:, positions]  # [slot_q, slot_k]
    block = bound.block
    tiles = -(-n // block)
    padded = torch.zeros(tiles * block, tiles * block, dtype=torch.bool)
    padded[:n, :n] = mask
    per_tile = padded.view(tiles, block, tiles, block).sum(dim=(1, 3))
    assert not bool(per_tile[classes == EMPTY].any()), f"{case} n={n}: an EMPTY tile holds a pair"
    assert bool((per_tile[classes == FULL] == block * block).all()), f"{case} n={n}: a FULL tile has a gap"


def test_stride_becomes_much_sparser():
    pattern = patterncc.parse(EXAMPLES_DIR / "strided.attn", l=64)
    bound = bind_pattern(pattern, 4096)
    local_pairs, stride_pairs = bound.head_sets(0)
    choice = search_permutation(bound, stride_pairs)
    assert choice.chosen == Permutation(64)
    assert choice.natural_density > 0.45  # natural order: about half the tiles (every other diagonal)
    assert choice.permuted_density <= choice.natural_density / 20, choice
    # the interface the kernel stage calls
    perm = choose_permutation(bound, stride_pairs, tile=64)
    assert perm is not None and perm.period == 64
    assert perm.positions(4096).shape == (4096,)
    assert choose_permutation(bound, local_pairs) is None  # no modulus: nothing to try


def test_mixed_local_and_stride_is_not_permuted():
    """strided's merged union: the transpose that helps stride(l) scatters local(l), so no permutation."""
    pattern = patterncc.parse(EXAMPLES_DIR / "strided.attn", l=64)
    bound = bind_pattern(pattern, 4096)
    merged = tuple(pair for pairs in bound.head_sets(0) for pair in pairs)
    choice = search_permutation(bound, merged)
    assert choice.candidates and choice.chosen is None
    assert choose_permutation(bound, merged) is None
    hybrid = patterncc.parse(EXAMPLES_DIR / "hybrid.attn", l=64)
    hybrid_bound = bind_pattern(hybrid, 4096)
    far = next(pairs for pairs in hybrid_bound.head_sets(0) if pairs[0][0].name == "far")
    assert choose_permutation(hybrid_bound, far) is None  # stride(l) | local(16)


def test_candidates_are_the_evaluated_moduli():
    pattern = patterncc.parse(EXAMPLES_DIR / "dilated.attn", d=3)
    bound = bind_pattern(pattern, 512)
    assert [candidate_periods(bound, pairs) for pairs in bound.head_sets(0)] == [[], [3], [6]]
    linear = patterncc.parse(EXAMPLES_DIR / "linear.attn")
    linear_bound = bind_pattern(linear, 256)
    assert candidate_periods(linear_bound, linear_bound.head_sets(0)[0]) == []
    assert choose_permutation(linear_bound, linear_bound.head_sets(0)[0]) is None
