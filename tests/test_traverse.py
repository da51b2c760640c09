"""The IR's one traversal (`ir.fold_expr`, `ir.map_expr`, `ir.fold_bool`, `ir.fold_set`) and the emitters built on
it: torch code that reads as written by hand, with only the parentheses Python needs."""

from __future__ import annotations

import ast
import operator
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patterncc
from patterncc import ir
from patterncc.emit import RandomRef, TilesEmitter, TorchEmitter, TritonEmitter, fold
from patterncc.mask import eval_expr
from patterncc.runtime.tiles import floor_sqrt

ROOT = Path(__file__).resolve().parents[1]
TORCH_NAMES = {"i": "pos_i", "j": "pos_j", "n": "n", "a": "P_a", "b": "P_b"}


def _body(text: str) -> ir.SetExpr:
    return patterncc.parse(f"pattern p(w = 3, l = 4) {{ head a = {text} }}").heads[0].body


def test_fold_expr_gives_every_case_its_node_and_folded_children():
    e = ir.add(ir.mul(ir.I, 2), ir.Neg(ir.Call("abs", (ir.J,))))
    text = ir.fold_expr(e, const=lambda c: str(c.value), var=lambda v: v.name,
                        binop=lambda b, x, y: f"({x}{b.op}{y})", neg=lambda _, x: f"-{x}",
                        not_=lambda _, x: f"!{x}", call=lambda c, args: f"{c.func}{args}")
    assert text == "((i*2)+-abs['j'])"


def test_fold_expr_sends_extension_nodes_to_other():
    e = ir.or_(RandomRef(0, 16), ir.cmp("<", ir.I, 3))
    cases = dict(const=lambda c: 0, var=lambda v: 0, binop=lambda _, x, y: x + y, neg=lambda _, x: x,
                 not_=lambda _, x: x, call=lambda _, args: sum(args))
    assert ir.fold_expr(e, **cases, other=lambda node: 100) == 100
    with pytest.raises(TypeError, match="RandomRef"):
        ir.fold_expr(e, **cases)


def test_map_expr_rebuilds_bottom_up_and_keeps_extension_nodes():
    e = ir.and_(RandomRef(1, 8), ir.cmp("<=", ir.Call("abs", (ir.sub(ir.I, ir.J),)), ir.Var("w")))
    renamed = ir.map_expr(e, lambda x: ir.Const(5) if x == ir.Var("w") else x)
    assert renamed == ir.and_(RandomRef(1, 8), ir.cmp("<=", ir.Call("abs", (ir.sub(ir.I, ir.J),)), 5))
    assert ir.substitute(e, {"w": 5}) == renamed
    seen = []
    ir.map_expr(ir.add(ir.I, ir.J), lambda x: seen.append(str(x)) or x)
    assert seen == ["i", "j", "(i + j)"]  # children before their parent


def test_fold_bool_folds_connectives_and_keeps_atoms_whole():
    pred = _body("where (abs(i - j) <= w or j < 2) and not (i % l == 0)").pred
    atoms = ir.fold_bool(pred, atom=lambda a: [str(a)], and_=operator.add, or_=operator.add, not_=lambda x: x)
    assert atoms == ["(abs((i - j)) <= w)", "(j < 2)", "((i % l) == 0)"]
    assert [str(c) for c in ir.conjuncts(pred)] == ["((abs((i - j)) <= w) or (j < 2))", "not ((i % l) == 0)"]


def test_fold_set_and_union_members():
    body = _body("local(w) | stride(l) & chunk(l) - global(1) | dense")
    count = ir.fold_set(body, primitive=lambda p: 1, union=operator.add, intersect=operator.add,
                        difference=operator.add)
    assert count == 5
    assert [type(m).__name__ for m in ir.union_members(body)] == ["Local", "Intersect", "Dense"]
    shape = ir.fold_set(body, primitive=lambda p: type(p).__name__[0], union=lambda a, b: f"({a}|{b})",
                        intersect=lambda a, b: f"({a}&{b})", difference=lambda a, b: f"({a}-{b})")
    assert shape == "((L|(S&(C-G)))|D)"


def test_ir_imports_neither_semantics_nor_mask():
    script = ("import sys, types\n"
              "pkg = types.ModuleType('patterncc'); pkg.__path__ = ['patterncc']; sys.modules['patterncc'] = pkg\n"
              "import patterncc.ir\n"
              "print(sorted(m for m in sys.modules if m.startswith('patterncc')))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['patterncc', 'patterncc.ir']"
    assert not hasattr(ir.Pattern, "bind") and not hasattr(ir.Pattern, "mask")


# Emitters ---------------------------------------------------------------------------------------------------------


def _predicate(text: str) -> ir.Expr:
    return fold(ir.set_predicate(_body(text)))


def test_torch_code_reads_as_written_by_hand():
    emit = TorchEmitter(TORCH_NAMES, {})
    assert emit(_predicate("local(128)")) == "(pos_i - pos_j).abs() <= 128"
    assert emit(_predicate("stride(16) - chunk(4)")) == "((pos_i - pos_j) % 16 == 0) & ~(pos_i // 4 == pos_j // 4)"
    assert emit(_predicate("where min(i, n) < max(j, 3) and not (n > 4)")) == \
        "(pos_i.clamp(max=n) < pos_j.clamp(min=3)) & (not (n > 4))"
    assert emit(ir.Call("min", (ir.I, ir.J))) == "torch.minimum(pos_i, pos_j)"
    assert emit(ir.Call("abs", (ir.Var("a"),))) == "abs(P_a)"


def test_triton_and_tiles_code():
    triton = TritonEmitter({"i": "o_i", "j": "o_j", "n": "n_ctx"}, {})
    assert triton(_predicate("local(128)")) == "tl.abs(o_i - o_j) <= 128"
    assert triton(_predicate("stride(128)")) == "_floormod(o_i - o_j, 128) == 0"
    assert triton(_predicate("summary(16, 4)")) == "o_j % 16 >= 12"
    assert triton(ir.sub(ir.I, ir.sub(ir.J, 1))) == "o_i - (o_j - 1)"
    assert triton(ir.Neg(ir.Neg(ir.I))) == "- -o_i"
    tiles = TilesEmitter({"i": "i", "j": "j", "n": "n"}, {})
    assert tiles(_predicate("local(2)")) == "tiles_compare('<=', tiles_abs_(tiles_sub(i, j)), tiles_const(2))"


def _random_expr(rng: random.Random, depth: int, boolean: bool) -> ir.Expr:
    if boolean:
        kind = rng.randrange(5) if depth else 0
        if kind == 0:
            return ir.cmp(rng.choice(ir.COMPARE_OPS), _random_expr(rng, 2, False), _random_expr(rng, 2, False))
        if kind == 1:
            return ir.Not(_random_expr(rng, depth - 1, True))
        if kind == 2:
            return ir.cmp(rng.choice(["==", "!="]), _random_expr(rng, depth - 1, True),
                          _random_expr(rng, depth - 1, True))
        return ir.BinOp(rng.choice(ir.BOOL_OPS), _random_expr(rng, depth - 1, True), _random_expr(rng, depth - 1, True))
    kind = rng.randrange(7) if depth else rng.randrange(2)
    if kind == 0:
        return ir.Var(rng.choice(list(TORCH_NAMES)))
    if kind == 1:
        return ir.Const(rng.choice([0, 1, 3, 16, -2]))
    sub = [_random_expr(rng, depth - 1, False) for _ in range(2)]
    if kind == 2:
        return ir.BinOp(rng.choice(["+", "-", "*"]), *sub)
    if kind == 3:
        return ir.BinOp(rng.choice(["//", "%"]), sub[0], ir.Const(rng.choice([3, 16, -4])))
    if kind == 4:
        return ir.Neg(sub[0])
    if kind == 5:
        return ir.Call(rng.choice(["min", "max"]), tuple(sub))
    return ir.Call(rng.choice(["abs", "isqrt"]), (ir.Call("abs", (sub[0],)),))


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_torch_code_means_what_the_reference_computes(seed):
    """Emitted with the fewest parentheses, evaluated by Python: the same values as `mask.eval_expr` (so every
    parenthesis that precedence needs is there), as tensors where i or j occur."""
    rng = random.Random(seed)
    emit = TorchEmitter(TORCH_NAMES, {})
    i = torch.arange(-3, 20, dtype=torch.int64)[:, None]
    j = torch.arange(-2, 17, dtype=torch.int64)[None, :]
    for _ in range(150):
        expr = _random_expr(rng, 3, rng.random() < 0.7)
        code = emit(expr)
        for n, a, b in ((5, 3, 7), (40, -4, 2)):
            want = eval_expr(expr, {"i": i, "j": j, "n": n, "a": a, "b": b})
            got = eval(code, {"torch": torch, "tiles_floor_sqrt": floor_sqrt, "pos_i": i, "pos_j": j, "n": n,
                              "P_a": a, "P_b": b})
            shape = (i.shape[0], j.shape[1])
            assert torch.equal(torch.as_tensor(got).expand(shape), torch.as_tensor(want).expand(shape)), code
            if "i" not in expr.free_vars() and "j" not in expr.free_vars():
                assert not isinstance(got, torch.Tensor) or "isqrt" in str(expr), code
        triton = TritonEmitter({"i": "o_i", "j": "o_j", "n": "n_ctx", "a": "P_a", "b": "P_b"},
                               {"a": (-9, 9), "b": (-9, 9)})(expr)
        assert ast.parse(triton)  # valid Python, as Triton's frontend reads it
