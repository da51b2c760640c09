"""The front end on valid input: examples, syntax-tree positions, file structure, parameters and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patterncc
from patterncc import ast, ir
from patterncc.mask import pattern_mask
from patterncc.parse import parse_source
from patterncc.semantics import bind_pattern


def test_every_example_parses(example_file: Path):
    patterns = patterncc.parse_all(example_file)
    assert patterns, f"{example_file.name} defines no pattern"
    for name, p in patterns.items():
        assert p.name == name
        assert p.heads, f"{name} has no heads"
        assert p.filename == str(example_file)
        mask = pattern_mask(p, 100)
        assert mask.shape == (bind_pattern(p, 100).num_heads, 100, 100)
        assert mask.dtype == torch.bool


def test_examples_are_the_issue_list(examples_dir: Path):
    names = {p.stem for p in examples_dir.glob("*.attn")}
    assert {"strided", "fixed", "local", "bigbird", "dilated", "reformer", "linear", "hybrid"} <= names


def test_example_ir_strided(examples_dir: Path):
    p = patterncc.parse(examples_dir / "strided.attn")
    assert p.name == "strided"
    assert p.params == (ir.Param("l", ir.Const(128)),)
    assert p.causal and p.combine == "multihead" and p.block == ir.Const(64)
    ell = ir.Var("l")
    assert [(g.name, g.body) for g in p.heads] == [("local", ir.Local(ell)), ("stride", ir.Stride(ell))]


def test_parse_accepts_text_path_and_str_path(examples_dir: Path):
    path = examples_dir / "fixed.attn"
    assert patterncc.parse(path) == patterncc.parse(str(path)) == patterncc.parse(path.read_text())


SOURCE = """\
# leading comment
pattern first(l = 8) {
    causal
    head near = local(l)   # trailing comment
}

pattern second(w = 4, c = 2) {
    block 32
    head a[2] = where abs(i - j) <= w * (h + 1)
    head b = summary(w, c)
}
"""


def test_ast_positions():
    module = parse_source(SOURCE, "mem.attn")
    assert [p.name for p in module.patterns] == ["first", "second"]
    first, second = module.patterns
    assert (first.span.line, first.span.column) == (2, 9)  # the pattern's name
    assert (first.params[0].span.line, first.params[0].span.column) == (2, 15)
    causal, head = first.body
    assert isinstance(causal, ast.Causal) and (causal.span.line, causal.span.column) == (3, 5)
    assert isinstance(head, ast.Head) and (head.span.line, head.span.column) == (4, 10)
    prim = head.body
    assert isinstance(prim, ast.Primitive) and prim.name == "local"
    assert (prim.span.line, prim.span.column, prim.span.end_column) == (4, 17, 22)
    group = second.body[1]
    assert isinstance(group, ast.Head) and isinstance(group.count, ast.Number) and group.count.value == 2
    where = group.body
    assert isinstance(where, ast.Where) and (where.span.line, where.span.column) == (9, 17)
    assert isinstance(where.predicate, ast.Binary) and where.predicate.op == "<="
    assert (where.predicate.span.line, where.predicate.span.column) == (9, 34)  # the operator


def test_multiple_patterns_per_file(tmp_path: Path):
    path = tmp_path / "two.attn"
    path.write_text(SOURCE)
    patterns = patterncc.parse_all(path)
    assert list(patterns) == ["first", "second"]
    assert patterncc.parse(path, pattern="second") == patterns["second"]
    with pytest.raises(patterncc.PatternUsageError, match=r"defines 2 patterns \(first, second\)"):
        patterncc.parse(path)
    with pytest.raises(patterncc.PatternUsageError, match="no pattern named `third`"):
        patterncc.parse(path, pattern="third")


def test_comments_everywhere():
    text = "#a\npattern p(#x\nl = 3 # default\n) { # open\n head a = # rhs\n local(l) # end\n} # done"
    p = patterncc.parse(text)
    assert p.heads[0].body == ir.Local(ir.Var("l"))


def test_semicolons_and_newlines_are_optional_separators():
    one_line = patterncc.parse("pattern p(l = 4) { causal; block 16; head a = local(l); head b = stride(l); }")
    no_sep = patterncc.parse("pattern p(l = 4) { causal block 16 head a = local(l) head b = stride(l) }")
    lines = patterncc.parse("pattern p(l = 4) {\n causal\n block 16\n head a = local(l)\n head b = stride(l)\n}")
    assert one_line == no_sep == lines
    assert one_line.causal and one_line.block == ir.Const(16) and len(one_line.heads) == 2


def test_defaults_use_n_and_earlier_params():
    p = patterncc.parse("pattern p(l = isqrt(n), c = l // 4 + 1, w = l * c) { head a = summary(l, c) }")
    assert dict(bind_pattern(p, 100).env) == {"l": 10, "c": 3, "w": 30}
    assert dict(bind_pattern(p, 1000).env) == {"l": 31, "c": 8, "w": 248}
    assert p.depends_on_n() == {"l", "c", "w"}


def test_lets_are_evaluated_exactly():
    p = patterncc.parse("pattern p(l = 8) { let big = l * 3; let half = (big + n) // 2\n head a = local(half) }")
    assert dict(bind_pattern(p, 10).env) == {"l": 8, "big": 24, "half": 17}


def test_lets_over_positions_and_conditions_are_inlined():
    with_lets = patterncc.parse("pattern p(l = 5) { let d = i - j\n let near = abs(d) <= l\n"
                                "head a = where near and d % 2 == 0 }")
    inline = patterncc.parse("pattern p(l = 5) { head a = where abs(i - j) <= l and (i - j) % 2 == 0 }")
    assert with_lets == inline


def test_override_from_python(examples_dir: Path):
    p = patterncc.parse(examples_dir / "strided.attn", l=64)
    assert p.params == (ir.Param("l", ir.Const(64)),)
    assert bind_pattern(p, 512).env["l"] == 64
    text = (examples_dir / "strided.attn").read_text().replace("l = 128", "l = 64")
    assert torch.equal(pattern_mask(p, 300), pattern_mask(patterncc.parse(text), 300))


def test_override_supplies_a_parameter_without_default():
    text = "pattern p(l, c = l // 2) { head a = fixed(l, c) }"
    p = patterncc.parse(text, l=10)
    assert dict(bind_pattern(p, 50).env) == {"l": 10, "c": 5}


def test_head_groups_expand_with_h():
    p = patterncc.parse("pattern p(l = 16, c = 4) { head s[4] = where j % l >= l - (h + 1) * c and j % l < l - h * c "
                        "\n head t = local(1) }")
    bound = bind_pattern(p, 64)
    assert bound.counts == (4, 1) and bound.num_heads == 5
    assert [h for (_, h), in bound.head_sets()] == [0, 1, 2, 3, 0]


def test_keyword_and_default_arguments():
    p = patterncc.parse("pattern p() { head a = random(2)\n head b = random(r = 2, seed = 7)\n"
                        "head c = hashed(rounds = 2)\n head d = kernel(favor, features = 8) }")
    a, b, c, d = (g.body for g in p.heads)
    assert a == ir.Random(ir.Const(2), ir.Const(0))
    assert b == ir.Random(ir.Const(2), ir.Const(7))
    assert c == ir.Hashed(ir.Const(64), ir.Const(2), ir.Const(64), True, ir.Const(0))
    assert d == ir.Kernel("favor", ir.Const(8), ir.Const(0), 1e-6)


def test_where_extends_to_the_end_and_parentheses_combine_it():
    p = patterncc.parse("pattern p() { head a = (where i % 2 == 0) | local(1)\n head b = where i > j or j == 0 }")
    a, b = (g.body for g in p.heads)
    assert isinstance(a, ir.Union) and isinstance(a.left, ir.Where) and a.right == ir.Local(ir.Const(1))
    assert isinstance(b, ir.Where) and b.pred.op == "or"


def test_set_algebra_precedence_is_pythons():
    p = patterncc.parse("pattern p() { head a = dense | dense & dense - local(1) }")
    body = p.heads[0].body
    assert isinstance(body, ir.Union) and isinstance(body.right, ir.Intersect)
    assert isinstance(body.right.right, ir.Difference)


def test_boolean_precedence_and_binds_tighter_than_or():
    p = patterncc.parse("pattern p() { head a = where i == 0 or j == 0 and not i == j }")
    pred = p.heads[0].body.pred
    assert pred.op == "or" and pred.right.op == "and" and isinstance(pred.right.right, ir.Not)


def test_combine_modes():
    for mode in ("multihead", "merged", "interleaved"):
        p = patterncc.parse(f"pattern p() {{ combine {mode}\n head a = local(1)\n head b = stride(3) }}")
        assert p.combine == mode
    assert patterncc.parse("pattern p() { head a = local(1) }").combine == "multihead"
