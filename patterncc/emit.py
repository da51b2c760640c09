"""IR expressions -> source text for the three places generated code evaluates a pattern.

- `triton`: inside kernels, on int32 position tiles `o_i` [BLOCK_M, 1] and `o_j` [1, BLOCK_N];
- `torch`: the CPU path, on int64 position tensors `pos_i`, `pos_j`;
- `tiles`: tile classification for new sequence lengths, on strided intervals (`runtime/tiles.py`).

Nothing from a .attn file is pasted: names come from the IR (validated identifiers, emitted with a `P_` prefix)
and numbers are re-printed from parsed integers. Python's floor semantics for `//` and `%` are kept
everywhere: Triton's integer `//` and `%` truncate toward zero (as C does, and its interpreter too), so the
kernel uses floor helpers unless value ranges prove the dividend non-negative and the divisor positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import ir

POSITION_BOUND = 1 << 30  # sequence lengths up to 2**30 positions; decides int32 vs int64 in kernels
INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class RandomRef(ir.Expr):
    """`random(...)`'s block table number `table`, looked up at (i // block, j // block)."""

    table: int
    block: int

    def __str__(self) -> str:
        return f"random_table[{self.table}][i // {self.block}, j // {self.block}]"


# Constant folding ----------------------------------------------------------------------------------------------


def fold(expr: ir.Expr) -> ir.Expr:
    """Evaluate constant subexpressions and drop `and true` / `or false`, for readable generated code."""
    if isinstance(expr, (ir.Const, ir.Var, RandomRef)):
        return expr
    if isinstance(expr, ir.Neg):
        inner = fold(expr.operand)
        return ir.Const(-inner.value) if isinstance(inner, ir.Const) else ir.Neg(inner)
    if isinstance(expr, ir.Not):
        inner = fold(expr.operand)
        if isinstance(inner, ir.Const):
            return ir.Const(not inner.value)
        return inner.operand if isinstance(inner, ir.Not) else ir.Not(inner)
    if isinstance(expr, ir.Call):
        args = tuple(fold(a) for a in expr.args)
        if all(isinstance(a, ir.Const) for a in args):
            return ir.Const(ir.evaluate_int(ir.Call(expr.func, args), {}))
        return ir.Call(expr.func, args)
    assert isinstance(expr, ir.BinOp)
    left, right = fold(expr.left), fold(expr.right)
    if isinstance(left, ir.Const) and isinstance(right, ir.Const):
        if not (expr.op in ("//", "%") and right.value == 0):
            return ir.Const(ir.evaluate_int(ir.BinOp(expr.op, left, right), {}))
    if expr.op in ("and", "or"):
        absorbing, identity = (False, True) if expr.op == "and" else (True, False)
        for a, b in ((left, right), (right, left)):
            if isinstance(a, ir.Const):
                return ir.Const(absorbing) if a.value == absorbing else b
    if expr.op in ("+", "-") and isinstance(right, ir.Const) and right.value == 0:
        return left
    if expr.op == "*" and isinstance(right, ir.Const) and right.value == 1:
        return left
    return ir.BinOp(expr.op, left, right)


# Value ranges (exact Python integers) --------------------------------------------------------------------------


def value_range(expr: ir.Expr, ranges: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    """Bounds of an integer expression given bounds of its variables; None for conditions."""
    if isinstance(expr, ir.Const):
        return None if isinstance(expr.value, bool) else (expr.value, expr.value)
    if isinstance(expr, ir.Var):
        return ranges[expr.name]
    if isinstance(expr, RandomRef) or isinstance(expr, ir.Not):
        return None
    if isinstance(expr, ir.Neg):
        lo, hi = value_range(expr.operand, ranges)
        return -hi, -lo
    if isinstance(expr, ir.Call):
        rs = [value_range(a, ranges) for a in expr.args]
        if expr.func == "abs":
            lo, hi = rs[0]
            return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
        if expr.func == "isqrt":
            return math.isqrt(max(rs[0][0], 0)), math.isqrt(max(rs[0][1], 0))
        f = min if expr.func == "min" else max
        return f(rs[0][0], rs[1][0]), f(rs[0][1], rs[1][1])
    assert isinstance(expr, ir.BinOp)
    if expr.op in ir.COMPARE_OPS or expr.op in ir.BOOL_OPS:
        return None
    (alo, ahi), (blo, bhi) = value_range(expr.left, ranges), value_range(expr.right, ranges)
    if expr.op == "+":
        return alo + blo, ahi + bhi
    if expr.op == "-":
        return alo - bhi, ahi - blo
    if expr.op == "*":
        corners = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
        return min(corners), max(corners)
    big = max(abs(alo), abs(ahi), abs(blo), abs(bhi))
    if expr.op == "%":
        return (0, bhi - 1) if blo > 0 else (-big, big)
    if blo > 0:  # floor division by a positive divisor is monotone in the dividend
        return min(alo // blo, alo // bhi), max(ahi // blo, ahi // bhi)
    return -big, big


def _subranges(expr: ir.Expr, ranges) -> list[tuple[int, int]]:
    out = []
    for node in expr.walk():
        r = value_range(node, ranges) if not isinstance(node, RandomRef) else None
        if r is not None:
            out.append(r)
    return out


def needs_int64(expr: ir.Expr, runtime_bounds: dict[str, tuple[int, int]]) -> bool:
    """True when some intermediate value could leave int32 for positions below POSITION_BOUND."""
    ranges = {"i": (0, POSITION_BOUND), "j": (0, POSITION_BOUND), "n": (1, POSITION_BOUND), **runtime_bounds}
    ranges["n"] = (1, POSITION_BOUND)
    return any(lo < -INT32_MAX or hi > INT32_MAX for lo, hi in _subranges(expr, ranges))


# Emitters ------------------------------------------------------------------------------------------------------


class _Emitter:
    """Shared walk; subclasses say how each operation is spelled."""

    def __init__(self, names: dict[str, str], ranges: dict[str, tuple[int, int]]):
        self.names = names  # IR variable -> source name
        self.ranges = ranges

    def __call__(self, expr: ir.Expr) -> str:
        return self.emit(expr)

    def emit(self, expr: ir.Expr) -> str:
        if isinstance(expr, ir.Const):
            return self.const(expr.value)
        if isinstance(expr, ir.Var):
            return self.names[expr.name]
        if isinstance(expr, RandomRef):
            return self.random(expr)
        if isinstance(expr, ir.Neg):
            return f"(-{self.emit(expr.operand)})"
        if isinstance(expr, ir.Not):
            return self.not_(self.emit(expr.operand))
        if isinstance(expr, ir.Call):
            return self.call(expr.func, [self.emit(a) for a in expr.args])
        assert isinstance(expr, ir.BinOp)
        a, b = self.emit(expr.left), self.emit(expr.right)
        if expr.op in ("//", "%"):
            return self.division(expr, a, b)
        return self.binary(expr.op, a, b)

    def simple_division(self, expr: ir.BinOp) -> bool:
        """Dividend provably >= 0 and divisor provably > 0: truncating and floor division agree."""
        ranges = {"i": (0, POSITION_BOUND), "j": (0, POSITION_BOUND), "n": (1, POSITION_BOUND), **self.ranges}
        a, b = value_range(expr.left, ranges), value_range(expr.right, ranges)
        return a[0] >= 0 and b[0] > 0

    def const(self, value) -> str:
        return repr(value) if isinstance(value, bool) else str(int(value))

    def not_(self, a: str) -> str:
        return f"(~{a})"

    def binary(self, op: str, a: str, b: str) -> str:
        py = {"and": "&", "or": "|"}.get(op, op)
        return f"({a} {py} {b})"


class TritonEmitter(_Emitter):
    def call(self, func, args):
        if func == "abs":
            return f"tl.abs({args[0]})"
        if func == "isqrt":
            return f"_isqrt({args[0]})"
        return f"tl.{'minimum' if func == 'min' else 'maximum'}({args[0]}, {args[1]})"

    def division(self, expr, a, b):
        if self.simple_division(expr):
            return f"({a} {expr.op} {b})"
        return f"{'_floordiv' if expr.op == '//' else '_floormod'}({a}, {b})"

    def random(self, ref: RandomRef):
        return (f"(tl.load(RANDOM + {ref.table} * NUM_BLOCKS * NUM_BLOCKS + (o_i // {ref.block}) * NUM_BLOCKS"
                f" + o_j // {ref.block}, mask=(o_i < n_ctx) & (o_j < n_ctx), other=0) != 0)")


class TorchEmitter(_Emitter):
    """Tensors follow Python's floor semantics for // and % already."""

    def call(self, func, args):
        if func == "abs":
            return f"torch.abs(torch.as_tensor({args[0]}))"
        if func == "isqrt":
            return f"tiles_floor_sqrt({args[0]})"
        return f"torch.{'minimum' if func == 'min' else 'maximum'}(torch.as_tensor({args[0]}), " \
               f"torch.as_tensor({args[1]}))"

    def division(self, expr, a, b):
        return f"({a} {expr.op} {b})"

    def not_(self, a):
        return f"(~torch.as_tensor({a}))"

    def random(self, ref: RandomRef):
        return f"random_tables[{ref.table}][pos_i // {ref.block}, pos_j // {ref.block}]"


class TilesEmitter(_Emitter):
    """Calls into the embedded tile-classification runtime (`tiles_*` names)."""

    _OPS = {"+": "add", "-": "sub", "*": "mul", "//": "floordiv", "%": "mod"}

    def emit(self, expr):
        if isinstance(expr, ir.Const) and not isinstance(expr.value, bool):
            return f"tiles_const({int(expr.value)})"
        if isinstance(expr, ir.Var) and expr.name not in ("i", "j"):
            return f"tiles_const({self.names[expr.name]})"
        if isinstance(expr, ir.Neg):
            return f"tiles_neg({self.emit(expr.operand)})"
        return super().emit(expr)

    def const(self, value):
        return f"tiles_truth({value!r})"

    def not_(self, a):
        return f"tiles_not_({a})"

    def call(self, func, args):
        name = {"abs": "abs_", "isqrt": "isqrt", "min": "minimum", "max": "maximum"}[func]
        return f"tiles_{name}({', '.join(args)})"

    def division(self, expr, a, b):
        return f"tiles_{self._OPS[expr.op]}({a}, {b})"

    def binary(self, op, a, b):
        if op in self._OPS:
            return f"tiles_{self._OPS[op]}({a}, {b})"
        if op in ("and", "or"):
            return f"tiles_{op}_({a}, {b})"
        return f"tiles_compare({op!r}, {a}, {b})"

    def random(self, ref: RandomRef):
        return (f"tiles_lookup(random_tables[{ref.table}], tiles_floordiv(i, tiles_const({ref.block})), "
                f"tiles_floordiv(j, tiles_const({ref.block})))")


def describe(expr: ir.Expr) -> str:
    """The math of a predicate as a one-line comment (Python syntax, floor semantics)."""
    text = str(expr)
    return text[1:-1] if text.startswith("(") and text.endswith(")") else text
