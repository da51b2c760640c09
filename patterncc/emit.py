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
    return ir.map_expr(expr, _simplify)


def _simplify(expr: ir.Expr) -> ir.Expr:
    """One node whose children are already simplified."""
    if isinstance(expr, ir.Neg) and isinstance(expr.operand, ir.Const):
        return ir.Const(-expr.operand.value)
    if isinstance(expr, ir.Not):
        inner = expr.operand
        if isinstance(inner, ir.Const):
            return ir.Const(not inner.value)
        return inner.operand if isinstance(inner, ir.Not) else expr
    if isinstance(expr, ir.Call) and all(isinstance(a, ir.Const) for a in expr.args):
        return ir.Const(ir.evaluate_int(expr, {}))
    if not isinstance(expr, ir.BinOp):
        return expr
    left, right = expr.left, expr.right
    if isinstance(left, ir.Const) and isinstance(right, ir.Const):
        if not (expr.op in ("//", "%") and right.value == 0):
            return ir.Const(ir.evaluate_int(expr, {}))
    if expr.op in ("and", "or"):
        absorbing = expr.op == "or"
        for a, b in ((left, right), (right, left)):
            if isinstance(a, ir.Const):
                return ir.Const(absorbing) if a.value == absorbing else b
    if expr.op in ("+", "-") and isinstance(right, ir.Const) and right.value == 0:
        return left
    if expr.op == "*" and isinstance(right, ir.Const) and right.value == 1:
        return left
    return expr


# Value ranges (exact Python integers) --------------------------------------------------------------------------

Range = tuple[int, int]


def value_range(expr: ir.Expr, ranges: dict[str, Range]) -> Range | None:
    """Bounds of an integer expression given bounds of its variables; None for conditions."""
    return _fold_ranges(expr, ranges, lambda r: r)


def _subranges(expr: ir.Expr, ranges: dict[str, Range]) -> list[Range]:
    """The bounds of every integer subexpression."""
    out: list[Range] = []

    def keep(r: Range | None) -> Range | None:
        if r is not None:
            out.append(r)
        return r

    _fold_ranges(expr, ranges, keep)
    return out


def _fold_ranges(expr: ir.Expr, ranges: dict[str, Range], seen) -> Range | None:
    """`value_range`, with `seen` called on the range of every node (and returning it)."""
    return ir.fold_expr(
        expr, const=lambda c: seen(None if isinstance(c.value, bool) else (c.value, c.value)),
        var=lambda v: seen(ranges[v.name]), neg=lambda _, r: seen((-r[1], -r[0])), not_=lambda _, r: None,
        call=lambda e, rs: seen(_call_range(e.func, rs)), binop=lambda e, a, b: seen(_binop_range(e.op, a, b)),
        other=lambda _: None)


def _call_range(func: str, rs: list[Range]) -> Range:
    if func == "abs":
        lo, hi = rs[0]
        return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
    if func == "isqrt":
        return math.isqrt(max(rs[0][0], 0)), math.isqrt(max(rs[0][1], 0))
    f = min if func == "min" else max
    return f(rs[0][0], rs[1][0]), f(rs[0][1], rs[1][1])


def _binop_range(op: str, a: Range | None, b: Range | None) -> Range | None:
    if op in ir.COMPARE_OPS or op in ir.BOOL_OPS:
        return None
    (alo, ahi), (blo, bhi) = a, b
    if op == "+":
        return alo + blo, ahi + bhi
    if op == "-":
        return alo - bhi, ahi - blo
    if op == "*":
        corners = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
        return min(corners), max(corners)
    big = max(abs(alo), abs(ahi), abs(blo), abs(bhi))
    if op == "%":
        return (0, bhi - 1) if blo > 0 else (-big, big)
    if blo > 0:  # floor division by a positive divisor is monotone in the dividend
        return min(alo // blo, alo // bhi), max(ahi // blo, ahi // bhi)
    return -big, big


def needs_int64(expr: ir.Expr, runtime_bounds: dict[str, tuple[int, int]]) -> bool:
    """True when some intermediate value could leave int32 for positions below POSITION_BOUND."""
    ranges = {"i": (0, POSITION_BOUND), "j": (0, POSITION_BOUND), "n": (1, POSITION_BOUND), **runtime_bounds}
    ranges["n"] = (1, POSITION_BOUND)
    return any(lo < -INT32_MAX or hi > INT32_MAX for lo, hi in _subranges(expr, ranges))


# Emitters ------------------------------------------------------------------------------------------------------


class Code(str):
    """Emitted source text that knows how loosely it binds (a level of `ir.PRECEDENCE`; `ir.ATOM` when it needs
    no parentheses anywhere) and whether it varies with the positions i, j (a tensor over them; otherwise a
    scalar: a Python int or bool, or a 0-d tensor). A `str`, so that emitters can format it like any text."""

    level: int
    positional: bool

    def __new__(cls, text: str, level: int = ir.ATOM, positional: bool = False) -> Code:
        code = super().__new__(cls, text)
        code.level, code.positional = level, positional
        return code

    def at(self, level: int) -> Code:
        """This code where an operand of `level` is expected: parenthesized if it binds more loosely."""
        if self.level >= level:
            return self
        return Code(f"({self})", ir.ATOM, self.positional)


# `and` / `or` on tensors (and on Python bools, which keep them eager like the kernels) are `&` and `|`.
_SPELLING = {"and": "&", "or": "|"}


class _Emitter:
    """A fold over the expression (`ir.fold_expr`); subclasses say how each operation is spelled.

    Hooks return `Code`, or plain text that needs no parentheses anywhere. `binary(op, a, b)` and `not_(a)` get
    operands already parenthesized for `op` (as `&` / `|` for and / or) and for unary `~`; `call`, `division`
    get them as they are (each argument is a whole expression).
    """

    def __init__(self, names: dict[str, str], ranges: dict[str, tuple[int, int]]):
        self.names = names  # IR variable -> source name
        self.ranges = ranges

    def __call__(self, expr: ir.Expr) -> str:
        return str(self.emit(expr))

    def emit(self, expr: ir.Expr) -> Code:
        return ir.fold_expr(expr, const=self._const, var=self._var, binop=self._binop, neg=self._neg,
                            not_=self._not, call=self._call, other=self._other)

    def _const(self, node: ir.Const) -> Code:
        return _code(self.const(node.value), ())

    def _var(self, node: ir.Var) -> Code:
        return Code(self.var(node.name), ir.ATOM, node.name in ir.POSITION_VARS)

    def _binop(self, node: ir.BinOp, a: Code, b: Code) -> Code:
        if node.op in ("//", "%"):
            return _code(self.division(node, a, b), (a, b))
        left, right = ir.operand_levels(_SPELLING.get(node.op, node.op))
        return _code(self.binary(node.op, a.at(left), b.at(right)), (a, b))

    def _neg(self, node: ir.Neg, a: Code) -> Code:
        return _code(self.neg(a.at(ir.UNARY)), (a,))

    def _not(self, node: ir.Not, a: Code) -> Code:
        return _code(self.not_(a.at(ir.UNARY)), (a,))

    def _call(self, node: ir.Call, args: list[Code]) -> Code:
        return _code(self.call(node.func, args), args)

    def _other(self, node: ir.Expr) -> Code:
        if not isinstance(node, RandomRef):
            raise TypeError(f"cannot emit {node!r}")
        code = _code(self.random(node), ())
        return Code(code, code.level, True)

    def simple_division(self, expr: ir.BinOp) -> bool:
        """Dividend provably >= 0 and divisor provably > 0: truncating and floor division agree."""
        ranges = {"i": (0, POSITION_BOUND), "j": (0, POSITION_BOUND), "n": (1, POSITION_BOUND), **self.ranges}
        a, b = value_range(expr.left, ranges), value_range(expr.right, ranges)
        return a[0] >= 0 and b[0] > 0

    def const(self, value) -> str:
        if isinstance(value, bool):
            return repr(value)
        return Code(str(int(value)), ir.ATOM if value >= 0 else ir.UNARY)

    def var(self, name: str) -> str:
        return self.names[name]

    def neg(self, a: Code) -> str:
        return Code(("- " if a.startswith("-") else "-") + a, ir.UNARY)

    def not_(self, a: Code) -> str:
        return Code(f"~{a}", ir.UNARY)

    def binary(self, op: str, a: Code, b: Code) -> str:
        symbol = _SPELLING.get(op, op)
        return Code(f"{a} {symbol} {b}", ir.PRECEDENCE[symbol])

    def infix_division(self, op: str, a: Code, b: Code) -> Code:
        left, right = ir.operand_levels(op)
        return Code(f"{a.at(left)} {op} {b.at(right)}", ir.PRECEDENCE[op])


def _code(result: str, children) -> Code:
    """A hook's result as Code: plain text binds tightly; it varies with positions when an operand does."""
    level = result.level if isinstance(result, Code) else ir.ATOM
    return Code(result, level, any(c.positional for c in children))


class TritonEmitter(_Emitter):
    def call(self, func, args):
        if func == "abs":
            return f"tl.abs({args[0]})"
        if func == "isqrt":
            return f"_isqrt({args[0]})"
        return f"tl.{'minimum' if func == 'min' else 'maximum'}({args[0]}, {args[1]})"

    def division(self, expr, a, b):
        if self.simple_division(expr):
            return self.infix_division(expr.op, a, b)
        return f"{'_floordiv' if expr.op == '//' else '_floormod'}({a}, {b})"

    def random(self, ref: RandomRef):
        return Code(f"tl.load(RANDOM + {ref.table} * NUM_BLOCKS * NUM_BLOCKS + (o_i // {ref.block}) * NUM_BLOCKS"
                    f" + o_j // {ref.block}, mask=(o_i < n_ctx) & (o_j < n_ctx), other=0) != 0", ir.COMPARE)


class TorchEmitter(_Emitter):
    """Position tensors follow Python's floor semantics for // and % already; scalars (n, runtime parameters)
    stay Python ints and bools, so that only what varies with i, j is a tensor."""

    def call(self, func, args):
        if func == "isqrt":
            return f"tiles_floor_sqrt({args[0]})"
        if func == "abs":
            return f"{args[0].at(ir.ATOM)}.abs()" if args[0].positional else f"abs({args[0]})"
        a, b = args
        if a.positional and b.positional:
            return f"torch.{'minimum' if func == 'min' else 'maximum'}({a}, {b})"
        if a.positional or b.positional:  # min and max are symmetric: clamp the tensor by the scalar
            tensor, scalar = (a, b) if a.positional else (b, a)
            return f"{tensor.at(ir.ATOM)}.clamp({'max' if func == 'min' else 'min'}={scalar})"
        return f"{func}({a}, {b})"

    def division(self, expr, a, b):
        return self.infix_division(expr.op, a, b)

    def not_(self, a):
        return Code(f"~{a}", ir.UNARY) if a.positional else Code(f"not {a}", ir.NOT)

    def random(self, ref: RandomRef):
        return f"random_tables[{ref.table}][pos_i // {ref.block}, pos_j // {ref.block}]"


class TilesEmitter(_Emitter):
    """Calls into the embedded tile-classification runtime (`tiles_*` names)."""

    _OPS = {"+": "add", "-": "sub", "*": "mul", "//": "floordiv", "%": "mod"}

    def const(self, value):
        return f"tiles_truth({value!r})" if isinstance(value, bool) else f"tiles_const({int(value)})"

    def var(self, name):
        return self.names[name] if name in ir.POSITION_VARS else f"tiles_const({self.names[name]})"

    def neg(self, a):
        return f"tiles_neg({a})"

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
