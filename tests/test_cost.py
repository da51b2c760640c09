"""Closed-form per-row cost: the formulas, their order in n, and that evaluated they bound the exact maximum."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import sympy

import patterncc
from patterncc import PatternWarning
from patterncc.analysis.analyze import analyze
from patterncc.analysis.cost import NO_CLOSED_FORM, N, format_order, head_cost
from patterncc.runtime.tiles import single_threaded

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Reference masks are many tiny torch ops, which stall with two threads on a busy 2-core machine."""
    with single_threaded():
        yield


def sym(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, positive=True, integer=True)


WHERE_SHAPES = """pattern shapes(w = 5, d = 3, g = 4) { block 16
    head window  = where abs(i - j) <= w
    head strict  = where abs(j - i) < w
    head onesided = where i - j >= 0 and i - j <= 2 * w
    head comb    = where abs(i - j) <= w * d and (i - j) % d == 0
    head residue = where (j - i) % d == 0
    head prefix  = where j < g
    head either  = where abs(i - j) <= 1 or j < g
    head opaque  = where (i * j) % 7 == 1
    head cut     = local(w) & stride(d)
    head minus   = chunk(8) - local(1)
}"""
CAUSAL_SHAPES = WHERE_SHAPES.replace("{ block 16", "{ causal block 16").replace("pattern shapes", "pattern causal")

BOUND_CASES = {
    **{f"{name}-{k}": (EXAMPLES_DIR / f"{name}.attn", params) for name, variants in {
        "strided": [{"l": 7}, {"l": 16}, {}], "fixed": [{"l": 8, "c": 3}, {}], "local": [{"w": 5}],
        "dilated": [{"w": 3, "d": 3}, {}], "bigbird": [{"w": 5, "g": 3, "r": 2}], "hybrid": [{"w": 6, "l": 9}],
    }.items() for k, params in enumerate(variants)},
    "where-shapes": (WHERE_SHAPES, {}),
    "where-shapes-causal": (CAUSAL_SHAPES, {}),
}


@pytest.mark.parametrize("n", [37, 100, 200], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("case", list(BOUND_CASES), ids=list(BOUND_CASES))
def test_formula_bounds_the_exact_maximum(case: str, n: int):
    source, params = BOUND_CASES[case]
    pattern = patterncc.parse(source, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        result = analyze(pattern, n)
    env = dict(result.bound.env)
    has_kernel = any(entry.family == "kernel" for entry in result.heads)
    for entry in (*result.heads, result.union):
        if entry.family == "kernel" or (entry.family == "union" and has_kernel):
            continue  # a kernel head's cost is O(1) work per row, not a count of the keys of its support
        bound = entry.cost.value(env, n)
        assert bound >= entry.rows.max, f"{case} n={n} {entry.name}: {entry.cost.formula} = {bound} < {entry.rows.max}"


def test_example_formulas():
    strided = patterncc.parse(EXAMPLES_DIR / "strided.attn")
    result = analyze(strided, 1024)
    l = sym("l")  # noqa: E741
    assert sympy.simplify(result.union.cost.formula - (l + N / l + 2)) == 0  # local l + 1, stride n/l + 1
    assert sympy.simplify(result.head("local").cost.formula - (l + 1)) == 0
    assert format_order(result.head("local").cost.order) == "O(1)"
    assert format_order(result.union.cost.order) == "O(n)"  # l is a constant parameter here
    with pytest.warns(PatternWarning, match="head `summary`"):  # rows before the first summary cells are empty
        fixed = analyze(patterncc.parse(EXAMPLES_DIR / "fixed.attn", l=16, c=4), 256)
    assert sympy.simplify(fixed.head("summary").cost.formula - sym("c") * (N / sym("l") + 1)) == 0
    assert sympy.simplify(fixed.head("chunk").cost.formula - sym("l")) == 0


def test_order_follows_parameters_that_depend_on_n():
    pattern = patterncc.parse("pattern s(l = isqrt(n)) { causal\n head a = local(l)\n head b = stride(l) }")
    result = analyze(pattern, 1024)
    assert format_order(result.union.cost.order) == "O(sqrt(n))"
    assert format_order(result.head("a").cost.order) == "O(sqrt(n))"
    assert result.union.cost.value(dict(result.bound.env), 1024) == 32 + 1024 / 32 + 2


def test_where_shapes():
    pattern = patterncc.parse(WHERE_SHAPES)
    w, d, g = sym("w"), sym("d"), sym("g")
    expected = {
        "window": 2 * w + 1, "strict": 2 * (w - 1) + 1, "onesided": 2 * w + 1, "comb": 2 * w + 1,
        "residue": N / d + 1, "prefix": g, "either": 3 + g, "opaque": N, "cut": sympy.Min(2 * w + 1, N / d + 1),
        "minus": sympy.Integer(8),
    }
    for group in pattern.heads:
        cost = head_cost(pattern, group, 0, 16)
        assert sympy.simplify(cost.formula - expected[group.name]) == 0, f"{group.name}: {cost.formula}"
        assert (NO_CLOSED_FORM in cost.notes) == (group.name == "opaque"), group.name
    causal = patterncc.parse(CAUSAL_SHAPES)
    window = head_cost(causal, causal.heads[0], 0, 16)
    assert sympy.simplify(window.formula - (w + 1)) == 0  # only j <= i
    comb = head_cost(causal, causal.heads[3], 0, 16)
    assert sympy.simplify(comb.formula - (w + 1)) == 0
    assert format_order(head_cost(causal, causal.heads[4], 0, 16).order) == "O(n)"


def test_head_index_is_substituted():
    pattern = patterncc.parse(EXAMPLES_DIR / "dilated.attn")
    far = pattern.heads[1]
    for h in range(2):
        cost = head_cost(pattern, far, h, 64)  # window w d (h + 1), spacing d (h + 1): w + 1 keys (causal)
        assert sympy.simplify(cost.formula - (sym("w") + 1)) == 0, h


def test_hashed_and_kernel_costs():
    reformer = patterncc.parse(EXAMPLES_DIR / "reformer.attn")
    cost = head_cost(reformer, reformer.heads[0], 0, 64)
    assert cost.expected and sympy.simplify(cost.formula - 128 * sym("rounds")) == 0
    assert any("expected" in note for note in cost.notes)
    linear = patterncc.parse(EXAMPLES_DIR / "linear.attn")
    kernel = head_cost(linear, linear.heads[0], 0, 64)
    assert format_order(kernel.order) == "O(1)" and not kernel.expected
    assert any("d^2" in note for note in kernel.notes)
