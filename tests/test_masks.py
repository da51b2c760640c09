"""The reference masks against each primitive's formula, written here again with plain Python loops.

Sizes include n below, at and above the block, and n that is not a multiple of the block or of l.
"""

from __future__ import annotations

import math

import pytest
import torch

import patterncc
from patterncc.mask import pattern_mask

NS = [1, 37, 64, 130]


def brute(n: int, allowed, causal: bool = False) -> torch.Tensor:
    """(n, n) from a Python predicate allowed(i, j): the independent reference."""
    rows = [[bool(allowed(i, j)) and (j <= i or not causal) for j in range(n)] for i in range(n)]
    return torch.tensor(rows, dtype=torch.bool).reshape(n, n)


def head(body: str, params: str = "", causal: bool = False, block: int = 64) -> patterncc.ir.Pattern:
    return patterncc.parse(f"pattern p({params}) {{ {'causal' if causal else ''}\n block {block}\n head a = {body} }}")


def assert_mask(pattern, n: int, expected: torch.Tensor, head_index: int = 0, layer: int = 0) -> None:
    got = pattern_mask(pattern, n, layer=layer)[head_index]
    if not torch.equal(got, expected):
        wrong = (got != expected).nonzero()
        i, j = (int(x) for x in wrong[0])
        raise AssertionError(f"{pattern.heads[0].body} at n = {n}: {len(wrong)} pairs differ, first (i={i}, j={j}): "
                             f"mask {bool(got[i, j])}, formula {bool(expected[i, j])}")


def ids(values, name):
    return [f"{name}{v}" for v in values]


# Primitives ------------------------------------------------------------------------------------------------------

PRIMITIVES = [
    # (source, parameter sets, formula over (i, j, params))
    ("local(w)", [{"w": 1}, {"w": 5}, {"w": 64}], lambda i, j, w: abs(i - j) <= w),
    ("stride(L)", [{"L": 1}, {"L": 3}, {"L": 7}, {"L": 16}], lambda i, j, L: (i - j) % L == 0),
    ("chunk(L)", [{"L": 1}, {"L": 5}, {"L": 16}, {"L": 200}], lambda i, j, L: i // L == j // L),
    ("summary(L, c)", [{"L": 4, "c": 1}, {"L": 7, "c": 3}, {"L": 16, "c": 16}],
     lambda i, j, L, c: j % L in range(L - c, L)),
    ("strided(L)", [{"L": 3}, {"L": 10}], lambda i, j, L: abs(i - j) <= L or (i - j) % L == 0),
    ("fixed(L, c)", [{"L": 8, "c": 2}, {"L": 10, "c": 3}],
     lambda i, j, L, c: i // L == j // L or j % L >= L - c),
    ("global(g)", [{"g": 1}, {"g": 9}], lambda i, j, g: i < g or j < g),
    ("dilated(w, d)", [{"w": 2, "d": 3}, {"w": 4, "d": 1}, {"w": 3, "d": 5}],
     lambda i, j, w, d: abs(i - j) <= w * d and (i - j) % d == 0),
    ("dense", [{}], lambda i, j: True),
]
PRIMITIVE_CASES = [(src, params, f, causal, n) for src, sets, f in PRIMITIVES for params in sets
                   for causal in (False, True) for n in NS]


def _case_id(case):
    src, params, _, causal, n = case
    values = "-".join(f"{k}{v}" for k, v in params.items())
    return f"{src.split('(')[0]}-{values or 'none'}-{'causal' if causal else 'bidir'}-N{n}"


@pytest.mark.parametrize("source, params, formula, causal, n", PRIMITIVE_CASES, ids=map(_case_id, PRIMITIVE_CASES))
def test_primitive_matches_formula(source, params, formula, causal, n):
    declared = ", ".join(f"{k} = {v}" for k, v in params.items())
    pattern = head(source, declared, causal=causal, block=16)
    assert_mask(pattern, n, brute(n, lambda i, j: formula(i, j, **params), causal))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_causal_local_is_the_papers_a1(causal):
    """With causal, local(l) is A(1) = {max(0, i - l), .., i}."""
    n, ell = 50, 6
    got = pattern_mask(head("local(l)", f"l = {ell}", causal=causal), n)[0]
    for i in range(n):
        lo, hi = max(0, i - ell), i if causal else min(n - 1, i + ell)
        assert got[i].nonzero().flatten().tolist() == list(range(lo, hi + 1)), f"row {i}"


# where: arbitrary predicates with Python's floor semantics ---------------------------------------------------------

WHERES = [
    ("(i - j) // 4 == -1", lambda i, j, n: (i - j) // 4 == -1),
    ("(j - i) % 5 == 3", lambda i, j, n: (j - i) % 5 == 3),
    ("-i % 3 == j % 3", lambda i, j, n: -i % 3 == j % 3),
    ("(i * 3 + j) % 7 == 2 or i // 7 == j // 3", lambda i, j, n: (i * 3 + j) % 7 == 2 or i // 7 == j // 3),
    ("isqrt(i) == isqrt(j)", lambda i, j, n: math.isqrt(i) == math.isqrt(j)),
    ("min(i, j) % 3 == 0 and max(i, j) < n - 5", lambda i, j, n: min(i, j) % 3 == 0 and max(i, j) < n - 5),
    ("not abs(i - j) > 2 or j == 0", lambda i, j, n: not abs(i - j) > 2 or j == 0),
    ("i == 0 or j == 0 and i != j", lambda i, j, n: i == 0 or (j == 0 and i != j)),
    ("i - j - 1 >= 0 - 2 * 3", lambda i, j, n: i - j - 1 >= -6),
    ("true", lambda i, j, n: True),
    ("i < 0", lambda i, j, n: False),
]


@pytest.mark.parametrize("n", [1, 23, 70], ids=ids([1, 23, 70], "N"))
@pytest.mark.parametrize("predicate, formula", WHERES, ids=[w for w, _ in WHERES])
def test_where_matches_python(predicate, formula, n):
    assert_mask(head(f"where {predicate}"), n, brute(n, lambda i, j: formula(i, j, n)))


def test_where_with_parameters_and_lets():
    pattern = patterncc.parse("pattern p(l = isqrt(n), c = l // 2) { causal\n let span = l * c\n"
                              "let near = abs(i - j) < span\n head a = where near and (i + j) % l < c }")
    n = 90  # l = 9, c = 4, span = 36
    assert_mask(pattern, n, brute(n, lambda i, j: abs(i - j) < 36 and (i + j) % 9 < 4, causal=True))


# Set algebra -----------------------------------------------------------------------------------------------------


def _local(w):
    return lambda i, j: abs(i - j) <= w


def _stride(ell):
    return lambda i, j: (i - j) % ell == 0


def _chunk(ell):
    return lambda i, j: i // ell == j // ell


def _summary(ell, c):
    return lambda i, j: j % ell >= ell - c


ALGEBRA = [
    ("local(4) | stride(5)", lambda i, j: _local(4)(i, j) or _stride(5)(i, j)),
    ("local(9) & stride(2)", lambda i, j: _local(9)(i, j) and _stride(2)(i, j)),
    ("chunk(8) - local(2)", lambda i, j: _chunk(8)(i, j) and not _local(2)(i, j)),
    # - binds tighter than &, which binds tighter than |
    ("local(3) | stride(5) & chunk(8) - summary(8, 2)",
     lambda i, j: _local(3)(i, j) or (_stride(5)(i, j) and (_chunk(8)(i, j) and not _summary(8, 2)(i, j)))),
    ("(local(3) | stride(5)) & chunk(8)", lambda i, j: (_local(3)(i, j) or _stride(5)(i, j)) and _chunk(8)(i, j)),
    ("dense - local(2) - stride(3)", lambda i, j: not _local(2)(i, j) and not _stride(3)(i, j)),
    ("dense - (local(2) - stride(3))", lambda i, j: not (_local(2)(i, j) and not _stride(3)(i, j))),
    ("(where i % 2 == 0) | chunk(5)", lambda i, j: i % 2 == 0 or _chunk(5)(i, j)),
    ("global(2) - (where j > i)", lambda i, j: (i < 2 or j < 2) and not j > i),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("expr, formula", ALGEBRA, ids=[a for a, _ in ALGEBRA])
def test_set_algebra(expr, formula, causal):
    n = 45
    assert_mask(head(expr, causal=causal), n, brute(n, formula, causal))


# random(r, seed) ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n, block, r", [(64, 16, 2), (100, 16, 3), (130, 32, 1), (40, 16, 9)],
                         ids=["N64-B16-r2", "N100-B16-r3", "N130-B32-r1", "N40-B16-r9-more-than-blocks"])
def test_random_sees_r_allowed_blocks(n, block, r, causal):
    mask = pattern_mask(head(f"random({r}, seed = 5)", causal=causal, block=block), n)[0]
    support = brute(n, lambda i, j: True, causal)
    blocks = math.ceil(n / block)
    for qb in range(blocks):
        rows = slice(qb * block, (qb + 1) * block)
        seen = []
        for kb in range(blocks):
            cols = slice(kb * block, (kb + 1) * block)
            tile, expected_tile = mask[rows, cols], support[rows, cols]
            if tile.any():
                seen.append(kb)
                # a chosen block is the whole tile (less the causal triangle on the diagonal)
                assert torch.equal(tile, expected_tile), f"query block {qb}, key block {kb} partly lit"
        allowed = qb + 1 if causal else blocks
        assert len(seen) == min(r, allowed), f"query block {qb} sees blocks {seen}, expected {min(r, allowed)}"
        assert all(kb <= qb for kb in seen) or not causal


def test_random_is_deterministic_and_seeded():
    def draw(seed):
        return pattern_mask(head(f"random(2, seed = {seed})", block=16), 160)[0]

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_random_golden_table():
    """The seeded draw is part of the language: the same blocks on every run, machine and torch version."""
    mask = pattern_mask(head("random(2, seed = 3)", block=16), 96)[0]
    table = mask[::16, ::16].int().tolist()
    assert table == RANDOM_GOLDEN, f"random(2, seed = 3) at 6 x 6 blocks changed: {table}"


RANDOM_GOLDEN = [
    [1, 0, 0, 0, 1, 0],
    [0, 0, 0, 1, 0, 1],
    [1, 0, 1, 0, 0, 0],
    [0, 1, 0, 1, 0, 0],
    [1, 0, 0, 0, 0, 1],
    [0, 1, 1, 0, 0, 0],
]


# Heads, groups and combine ------------------------------------------------------------------------------------------


def test_head_group_h_gives_distinct_subblocks():
    """The paper's fixed pattern with heads attending to distinct length-c subblocks."""
    ell, c, n = 16, 4, 50
    pattern = patterncc.parse(f"pattern p(l = {ell}, c = {c}) {{ causal\n"
                              "head s[4] = where j % l >= l - (h + 1) * c and j % l < l - h * c }")
    masks = pattern_mask(pattern, n)
    assert masks.shape == (4, n, n)
    for h in range(4):
        expected = brute(n, lambda i, j, h=h: ell - (h + 1) * c <= j % ell < ell - h * c, causal=True)
        assert torch.equal(masks[h], expected), f"head h = {h}"
    assert not (masks[0] & masks[1]).any()


def test_multihead_keeps_declaration_order():
    pattern = patterncc.parse("pattern p() { head a[2] = local(1 + h)\n head b = stride(4) }")
    masks = pattern_mask(pattern, 30)
    assert masks.shape == (3, 30, 30)
    assert torch.equal(masks[0], brute(30, _local(1)))
    assert torch.equal(masks[1], brute(30, _local(2)))
    assert torch.equal(masks[2], brute(30, _stride(4)))


def test_merged_gives_every_head_the_union():
    pattern = patterncc.parse(
        "pattern p() { causal\n combine merged\n head a = chunk(8)\n head b[2] = summary(8, 1 + h) }")
    masks = pattern_mask(pattern, 40)
    union = brute(40, lambda i, j: _chunk(8)(i, j) or _summary(8, 2)(i, j), causal=True)
    assert masks.shape == (3, 40, 40)
    for k in range(3):
        assert torch.equal(masks[k], union), f"head {k}"


@pytest.mark.parametrize("layer", [0, 1, 2, 3, 7])
def test_interleaved_layer_r_uses_group_r_mod_p(layer):
    pattern = patterncc.parse("pattern p() { combine interleaved\n head a = local(2)\n head b[2] = stride(3 + h) }")
    masks = pattern_mask(pattern, 33, layer=layer)
    assert masks.shape == (3, 33, 33)  # every layer has all three attention heads
    for k in range(3):
        if layer % 2 == 0:
            expected = brute(33, _local(2))
        else:
            expected = brute(33, _stride(3 + k % 2))
        assert torch.equal(masks[k], expected), f"layer {layer}, head {k}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_kernel_and_hashed_heads_give_their_support(causal):
    pattern = patterncc.parse(f"pattern p() {{ {'causal' if causal else ''}\n head k = kernel(elu1)\n"
                              "head r = hashed(buckets = 4)\n head s = local(1) }")
    masks = pattern_mask(pattern, 20)
    support = brute(20, lambda i, j: True, causal)
    assert torch.equal(masks[0], support) and torch.equal(masks[1], support)
    assert torch.equal(masks[2], brute(20, _local(1), causal))


EXAMPLE_HEADS = {  # the formulas in each example's comments, at its default parameters
    "strided": [_local(128), _stride(128)],
    "fixed": [_chunk(128), _summary(128, 16)],
    "local": [_local(256)] * 4,
    "dilated": [_local(32)] + [lambda i, j, h=h: abs(i - j) <= 64 * (h + 1) and (i - j) % (2 * (h + 1)) == 0
                               for h in range(2)],
}


@pytest.mark.parametrize("name", EXAMPLE_HEADS)
def test_examples_match_their_comments(examples_dir, name):
    n = 300
    masks = pattern_mask(patterncc.parse(examples_dir / f"{name}.attn"), n)
    assert masks.shape[0] == len(EXAMPLE_HEADS[name])
    for k, formula in enumerate(EXAMPLE_HEADS[name]):
        assert torch.equal(masks[k], brute(n, formula, causal=True)), f"{name} head {k}"
