"""IR -> .attn text -> IR is the identity (random patterns: test_properties.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import patterncc
from patterncc.format import format_expr, format_pattern, format_patterns


def round_trip(source: str | Path, **params) -> str:
    original = list(patterncc.parse_all(source).values()) if not params else [patterncc.parse(source, **params)]
    text = format_patterns(original)
    again = list(patterncc.parse_all(text).values())
    assert again == original, f"IR changed through the text:\n{text}"
    assert format_patterns(again) == text, "formatting is not idempotent"
    return text


def test_every_example_round_trips(example_file: Path):
    round_trip(example_file)


def test_example_files_together_round_trip(examples_dir: Path):
    everything = "\n".join(p.read_text() for p in sorted(examples_dir.glob("*.attn")))
    text = round_trip(everything)
    assert text.count("pattern ") == len(list(examples_dir.glob("*.attn")))


def test_overridden_parameters_round_trip(examples_dir: Path):
    text = round_trip(examples_dir / "fixed.attn", l=64, c=8)
    assert text.startswith("pattern fixed(l = 64, c = 8) {")


def test_negative_override_round_trips():
    pattern = patterncc.parse("pattern p(a = 3) { head x = local(a + 5) }", a=-2)
    assert patterncc.parse(format_pattern(pattern)) == pattern


def test_canonical_text(examples_dir: Path):
    assert format_pattern(patterncc.parse(examples_dir / "strided.attn")) == (
        "pattern strided(l = 128) {\n"
        "    causal\n"
        "    head local = local(l)\n"
        "    head stride = stride(l)\n"
        "}\n"
    )


TRICKY = {
    "left-associative-minus": "head a = where i - j - 1 == 0 and i - (j - 1) == 2",
    "floor-ops": "head a = where (i - j) // 3 * 2 % 5 == i // (3 * 2) % 5",
    "unary-minus": "head a = where -i + - -j == -(i - j) and i - -1 > 0",
    "not-and-or": "head a = where not (i == j or i == 0) and not i > j or (j == 1 or j == 2) and true",
    "comparison-operands": "head a = where (i + 1) * 2 >= j - 1 and i + 1 != j or -(i) < j",
    "functions": "head a = where min(max(i, j), abs(i - j)) <= isqrt(n) + min(1, 2)",
    "set-precedence": "head a = local(1) | stride(2) & chunk(3) - summary(3, 1)",
    "set-parentheses": "head a = ((local(1) | stride(2)) & chunk(3)) - (summary(3, 1) - global(1))",
    "right-nested-union": "head a = local(1) | (stride(2) | chunk(4))",
    "where-in-algebra": "head a = (where i % 2 == 0) - (where j % 3 == 0) | dense",
    "merged-sugar": "head a = strided(4) & fixed(8, 2)",
    "sugar-lookalike": "head a = local(4) | stride(5)",
    "random-seeds": "head a[3] = random(2) | random(1, seed = h * 7 + 1)",
    "families": "head a = hashed(buckets = 8, rounds = 2, chunk = 16, shared_qk = false, seed = 3)\n"
                "head b = kernel(favor, features = 32, seed = 2, eps = 1e-3)\n head c = kernel(relu, eps = 2)",
    "head-count-expression": "head a[k // 2] = dilated(w, d + h)",
    "block-expression": "block 16 * 2\n head a = dense",
    "lets": "let big = k * w\n let half = big // 2\n head a = local(half)",
    "bool-literals": "head a = where true and not false",
}


@pytest.mark.parametrize("body", TRICKY.values(), ids=TRICKY.keys())
def test_tricky_round_trips(body):
    for preamble in ("", "causal\n", "causal\ncombine interleaved\n"):
        round_trip(f"pattern p(k = 4, w = isqrt(n), d = w - 1, e) {{\n{preamble}{body}\n}}")


def test_parentheses_only_where_needed():
    p = patterncc.parse("pattern p() { head a = where ((i - (j)) * (2)) == ((0)) and ((i > 1)) }")
    assert format_expr(p.heads[0].body.pred) == "(i - j) * 2 == 0 and i > 1"
    p = patterncc.parse("pattern p() { head a = (local(1) | (stride(2))) | ((dense)) }")
    assert "head a = local(1) | stride(2) | dense\n" in format_pattern(p)


def test_where_is_bare_only_as_a_whole_head():
    text = format_pattern(patterncc.parse("pattern p() { head a = where i > j\n head b = (where i > j) & dense }"))
    assert "head a = where i > j\n" in text
    assert "head b = (where i > j) & dense\n" in text


def test_comments_are_dropped_and_statements_reordered():
    text = round_trip("# c\npattern p(l = 4) { head a = local(l) # x\n causal; let m = l * 2\n head b = stride(m) }")
    assert "#" not in text
    assert text.splitlines()[1:4] == ["    causal", "    let m = l * 2", "    head a = local(l)"]
