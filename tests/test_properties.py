"""Property tests (hypothesis, derandomized in conftest.py): set algebra, expression semantics, round trips,
and a parser that raises nothing but PatternError on any text."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterncc
from patterncc.format import format_patterns
from patterncc.mask import pattern_mask
from patterncc.semantics import bind_pattern

Pred = Callable[[int, int], bool]

# Set expressions as trees: text for the parser, and (except `random`) a Python formula for the answer ---------------


@dataclass(frozen=True)
class SetTree:
    text: str  # an atom: a primitive or a parenthesized expression
    formula: Pred | None  # None when it contains `random`, whose blocks only the library knows


def _leaf(text: str, formula: Pred | None) -> SetTree:
    return SetTree(text, formula)


def _where(draw) -> SetTree:
    k = draw(st.integers(1, 9))
    r = draw(st.integers(0, k - 1))
    choices = [
        (f"(i + j) % {k} == {r}", lambda i, j: (i + j) % k == r),
        (f"abs(i - j) <= {r}", lambda i, j: abs(i - j) <= r),
        (f"i // {k} == j // {r + 1}", lambda i, j: i // k == j // (r + 1)),
        (f"j % {k} >= {r} or i < {r}", lambda i, j: j % k >= r or i < r),
        (f"(i - j) % {k} == 0 and not j < {r}", lambda i, j: (i - j) % k == 0 and not j < r),
        (f"i * {r} - j * {k} > -{k}", lambda i, j: i * r - j * k > -k),
    ]
    text, formula = draw(st.sampled_from(choices))
    return _leaf(f"(where {text})", formula)


@st.composite
def set_leaf(draw) -> SetTree:
    a, b = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    lo, hi = min(a, b), max(a, b)
    kind = draw(st.sampled_from(["local", "stride", "chunk", "summary", "strided", "fixed", "global", "dilated",
                                 "dense", "random", "where"]))
    if kind == "where":
        return _where(draw)
    if kind == "random":
        return _leaf(f"random({a}, seed = {b})", None)
    return {
        "local": lambda: _leaf(f"local({a})", lambda i, j: abs(i - j) <= a),
        "stride": lambda: _leaf(f"stride({a})", lambda i, j: (i - j) % a == 0),
        "chunk": lambda: _leaf(f"chunk({a})", lambda i, j: i // a == j // a),
        "summary": lambda: _leaf(f"summary({hi}, {lo})", lambda i, j: j % hi >= hi - lo),
        "strided": lambda: _leaf(f"strided({a})", lambda i, j: abs(i - j) <= a or (i - j) % a == 0),
        "fixed": lambda: _leaf(f"fixed({hi}, {lo})", lambda i, j: i // hi == j // hi or j % hi >= hi - lo),
        "global": lambda: _leaf(f"global({a})", lambda i, j: i < a or j < a),
        "dilated": lambda: _leaf(f"dilated({a}, {b})", lambda i, j: abs(i - j) <= a * b and (i - j) % b == 0),
        "dense": lambda: _leaf("dense", lambda i, j: True),
    }[kind]()


def _combine(op: str, left: SetTree, right: SetTree) -> SetTree:
    formula = None
    if left.formula is not None and right.formula is not None:
        lf, rf = left.formula, right.formula
        formula = {"|": lambda i, j: lf(i, j) or rf(i, j), "&": lambda i, j: lf(i, j) and rf(i, j),
                   "-": lambda i, j: lf(i, j) and not rf(i, j)}[op]
    return SetTree(f"({left.text} {op} {right.text})", formula)


set_tree = st.recursive(
    set_leaf(),
    lambda inner: st.builds(_combine, st.sampled_from(["|", "&", "-"]), inner, inner),
    max_leaves=5,
)


def brute(n: int, formula: Pred, causal: bool) -> torch.Tensor:
    return torch.tensor([[formula(i, j) and (j <= i or not causal) for j in range(n)] for i in range(n)],
                        dtype=torch.bool).reshape(n, n)


@settings(max_examples=60)
@given(a=set_tree, b=set_tree, causal=st.booleans(), n=st.integers(1, 70))
def test_set_algebra_laws(a: SetTree, b: SetTree, causal: bool, n: int):
    source = (f"pattern p() {{ {'causal' if causal else ''}\n block 16\n head a = {a.text}\n head b = {b.text}\n"
              f"head u = {a.text} | {b.text}\n head x = {a.text} & {b.text}\n head d = {a.text} - {b.text} }}")
    ma, mb, mu, mx, md = pattern_mask(patterncc.parse(source), n)
    assert torch.equal(mu, ma | mb), f"mask(A | B) != mask(A) | mask(B)\n{source}"
    assert torch.equal(mx, ma & mb), f"mask(A & B) != mask(A) & mask(B)\n{source}"
    assert torch.equal(md, ma & ~mb), f"mask(A - B) != mask(A) & ~mask(B)\n{source}"
    for tree, mask in ((a, ma), (b, mb)):
        if tree.formula is not None:
            assert torch.equal(mask, brute(n, tree.formula, causal)), f"{tree.text} differs from its formula"


def _unparenthesized(text: str) -> str:
    """The same tree written with as few parentheses as Python's set precedence allows."""
    pattern = patterncc.parse(f"pattern p() {{ head a = {text} }}")
    return format_patterns([pattern]).split("head a = ", 1)[1].rsplit("\n}", 1)[0]


@settings(max_examples=40)
@given(tree=set_tree, n=st.integers(1, 40))
def test_precedence_without_parentheses(tree: SetTree, n: int):
    """`-` binds tighter than `&`, which binds tighter than `|`: minimal parentheses mean the same set."""
    bare = _unparenthesized(tree.text)
    full = pattern_mask(patterncc.parse(f"pattern p() {{ block 16\n head a = {tree.text} }}"), n)
    minimal = pattern_mask(patterncc.parse(f"pattern p() {{ block 16\n head a = {bare} }}"), n)
    assert torch.equal(full, minimal), f"{tree.text} vs {bare}"


# Integer and boolean expressions against Python ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExprTree:
    text: str
    value: Callable[[dict], int | bool]


def _int_leaf(name_or_value) -> ExprTree:
    if isinstance(name_or_value, int):
        return ExprTree(str(name_or_value), lambda env, v=name_or_value: v)
    return ExprTree(name_or_value, lambda env, v=name_or_value: env[v])


int_leaf = st.one_of(st.integers(0, 12).map(_int_leaf), st.sampled_from(["i", "j", "n", "k", "h"]).map(_int_leaf))


def _int_node(inner):
    binary = st.tuples(st.sampled_from(["+", "-", "*"]), inner, inner).map(
        lambda t: ExprTree(f"({t[1].text} {t[0]} {t[2].text})",
                           lambda env, op=t[0], a=t[1], b=t[2]: {"+": a.value(env) + b.value(env),
                                                                 "-": a.value(env) - b.value(env),
                                                                 "*": a.value(env) * b.value(env)}[op]))
    # Divisors are non-zero constants, possibly negative, so floor semantics show on both signs.
    divide = st.tuples(st.sampled_from(["//", "%"]), inner, st.integers(-5, 6).filter(bool)).map(
        lambda t: ExprTree(f"({t[1].text} {t[0]} {'-' if t[2] < 0 else ''}{abs(t[2])})",
                           lambda env, op=t[0], a=t[1], d=t[2]: a.value(env) // d if op == "//" else a.value(env) % d))
    unary = inner.map(lambda a: ExprTree(f"-{a.text}" if not a.text.startswith("-") else f"-({a.text})",
                                         lambda env, a=a: -a.value(env)))
    call = st.one_of(
        inner.map(lambda a: ExprTree(f"abs({a.text})", lambda env, a=a: abs(a.value(env)))),
        inner.map(lambda a: ExprTree(f"isqrt(abs({a.text}))", lambda env, a=a: math.isqrt(abs(a.value(env))))),
        st.tuples(st.sampled_from(["min", "max"]), inner, inner).map(
            lambda t: ExprTree(f"{t[0]}({t[1].text}, {t[2].text})",
                               lambda env, f=t[0], a=t[1], b=t[2]: (min if f == "min" else max)(a.value(env),
                                                                                               b.value(env)))),
    )
    return st.one_of(binary, divide, unary, call)


int_expr = st.recursive(int_leaf, _int_node, max_leaves=6)


def _compare(t) -> ExprTree:
    op, a, b = t
    ops = {"==": lambda x, y: x == y, "!=": lambda x, y: x != y, "<": lambda x, y: x < y,
           "<=": lambda x, y: x <= y, ">": lambda x, y: x > y, ">=": lambda x, y: x >= y}
    return ExprTree(f"{a.text} {op} {b.text}", lambda env: ops[op](a.value(env), b.value(env)))


bool_leaf = st.tuples(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), int_expr, int_expr).map(_compare)
bool_expr = st.recursive(
    bool_leaf,
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(["and", "or"]), inner, inner).map(
            lambda t: ExprTree(f"({t[1].text} {t[0]} {t[2].text})",
                               lambda env, op=t[0], a=t[1], b=t[2]: (a.value(env) and b.value(env)) if op == "and"
                               else (a.value(env) or b.value(env)))),
        inner.map(lambda a: ExprTree(f"not ({a.text})", lambda env, a=a: not a.value(env))),
    ),
    max_leaves=3,
)


@settings(max_examples=60)
@given(pred=bool_expr, n=st.integers(1, 14), k=st.integers(-3, 9))
def test_where_evaluates_like_python(pred: ExprTree, n: int, k: int):
    pattern = patterncc.parse(f"pattern p(k = {k}) {{ head a[2] = where {pred.text} }}")
    masks = pattern_mask(pattern, n)
    for h in range(2):
        expected = torch.tensor([[bool(pred.value({"i": i, "j": j, "n": n, "k": k, "h": h})) for j in range(n)]
                                 for i in range(n)], dtype=torch.bool).reshape(n, n)
        assert torch.equal(masks[h], expected), f"where {pred.text} (k = {k}, h = {h})"


# Round trips of random patterns -------------------------------------------------------------------------------------


@st.composite
def pattern_text(draw) -> str:
    params = [draw(st.sampled_from(["k = 3", "k = isqrt(n) // 2 + 1", "k = n % 5 + 1", "k = -(2 - 7) * 2"])),
              draw(st.sampled_from(["w = isqrt(n) + k", "w", "w = 3"]))]
    lines = []
    if draw(st.booleans()):
        lines.append("causal")
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["block 16", "block 2 * 64", "block k * 0 + 32"])))
    lines.append(draw(st.sampled_from(["", "combine multihead", "combine interleaved"])))
    if draw(st.booleans()):
        lines.append("let m = k * w - 1")
    for index in range(draw(st.integers(1, 3))):
        count = draw(st.sampled_from(["", "[2]", "[k * k + 1]"]))
        body = draw(st.one_of(
            set_tree.map(lambda t: t.text),
            bool_expr.map(lambda e: f"where {e.text}"),
            st.builds(lambda a, e: f"{a.text} | (where {e.text})", set_tree, bool_expr),
            st.sampled_from(["hashed()", "hashed(buckets = 2 * k + 2, shared_qk = false)", "kernel(elu1)",
                             "kernel(favor, features = w + 1, seed = h)", "kernel(relu, eps = 0.5)"]),
        ))
        lines.append(f"head g{index}{count} = {body}")
    return f"pattern p({', '.join(params)}) {{\n" + "\n".join(lines) + "\n}\n"


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(source=pattern_text())
def test_random_patterns_round_trip(source: str):
    try:
        original = list(patterncc.parse_all(source).values())
    except patterncc.PatternError:
        return  # e.g. a value check that fails for the drawn numbers; the round trip is about valid patterns
    text = format_patterns(original)
    assert list(patterncc.parse_all(text).values()) == original, f"{source}\n--- formatted as ---\n{text}"


# The parser raises only PatternError -------------------------------------------------------------------------------

TOKENS = ["pattern", "head", "let", "causal", "block", "combine", "where", "merged", "local", "stride", "hashed",
          "kernel", "random", "seed", "=", "==", "(", ")", "{", "}", "[", "]", ",", ";", "|", "&", "-", "+", "*",
          "//", "%", "<", ">=", "and", "or", "not", "i", "j", "n", "h", "l", "0", "1", "64", "1e-3", "#", "\n",
          "true", "isqrt", "abs", "elu1", "favor", "99999999999999999999", "_x", "class", "é", "\t", "\\", "'"]


def only_pattern_errors(source: str) -> None:
    """Parse, check and (for small patterns) build masks; any exception but PatternError fails the test."""
    try:
        patterns = patterncc.parse_all(source)
        for p in patterns.values():
            bound = bind_pattern(p, 8)
            if bound.num_heads <= 64:
                pattern_mask(p, 8)
    except patterncc.PatternError:
        pass


@settings(max_examples=200)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_token_soup_raises_only_pattern_errors(source: str):
    only_pattern_errors(source)


@settings(max_examples=100)
@given(st.text(max_size=80))
def test_arbitrary_text_raises_only_pattern_errors(source: str):
    only_pattern_errors(source)


SOURCES = [p.read_text() for p in sorted((Path(__file__).parent.parent / "examples").glob("*.attn"))]


@st.composite
def mutated_example(draw) -> str:
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        start = draw(st.integers(0, len(text) - 1))
        stop = draw(st.integers(start, min(len(text), start + 12)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        token = draw(st.sampled_from(TOKENS))
        if action == "delete":
            text = text[:start] + text[stop:]
        elif action == "insert":
            text = text[:start] + f" {token} " + text[start:]
        elif action == "replace":
            text = text[:start] + token + text[stop:]
        else:
            text = text[:stop] + text[start:stop] + text[stop:]
    return text


@settings(max_examples=250)
@given(mutated_example())
def test_mutated_examples_raise_only_pattern_errors(source: str):
    only_pattern_errors(source)
