"""The typed IR that every pass after the front end consumes: frozen, hashable dataclasses with no source positions.

Notation: a head is a set of (i, j) pairs, i the query position, j the key position, both 0-based in [0, n).
Integer expressions use Python's semantics (`//` floors, `%` takes the sign of the divisor). Every set primitive
except `random` is a predicate over i and j (`SetPrimitive.predicate()`); `random` is a per-block table.
Parameters and lets stay symbolic here; `Pattern.bind(n)` evaluates them with exact integer arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

# Expressions ---------------------------------------------------------------------------------------------------

INT_OPS = ("+", "-", "*", "//", "%")
COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")
BOOL_OPS = ("and", "or")
FUNCTIONS = {"abs": 1, "min": 2, "max": 2, "isqrt": 1}
POSITION_VARS = ("i", "j")
BUILTIN_VARS = ("i", "j", "n", "h")


class Expr:
    """Base of integer and boolean expressions."""

    def children(self) -> tuple[Expr, ...]:
        return ()

    def free_vars(self) -> frozenset[str]:
        out: set[str] = set()
        for node in self.walk():
            if isinstance(node, Var):
                out.add(node.name)
        return frozenset(out)

    def walk(self) -> Iterator[Expr]:
        yield self
        for child in self.children():
            yield from child.walk()


@dataclass(frozen=True)
class Const(Expr):
    value: int | bool

    def __str__(self) -> str:
        return str(self.value).lower() if isinstance(self.value, bool) else str(self.value)


@dataclass(frozen=True)
class Var(Expr):
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class BinOp(Expr):
    op: str
    left: Expr
    right: Expr

    def children(self):
        return (self.left, self.right)

    def __str__(self) -> str:
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr

    def children(self):
        return (self.operand,)

    def __str__(self) -> str:
        return f"-{self.operand}"


@dataclass(frozen=True)
class Not(Expr):
    operand: Expr

    def children(self):
        return (self.operand,)

    def __str__(self) -> str:
        return f"not {self.operand}"


@dataclass(frozen=True)
class Call(Expr):
    func: str  # one of FUNCTIONS
    args: tuple[Expr, ...]

    def children(self):
        return self.args

    def __str__(self) -> str:
        return f"{self.func}({', '.join(map(str, self.args))})"


def _c(x: Expr | int | bool) -> Expr:
    return x if isinstance(x, Expr) else Const(x)


def add(a, b) -> Expr:
    return BinOp("+", _c(a), _c(b))


def sub(a, b) -> Expr:
    return BinOp("-", _c(a), _c(b))


def mul(a, b) -> Expr:
    return BinOp("*", _c(a), _c(b))


def floordiv(a, b) -> Expr:
    return BinOp("//", _c(a), _c(b))


def mod(a, b) -> Expr:
    return BinOp("%", _c(a), _c(b))


def cmp(op: str, a, b) -> Expr:
    return BinOp(op, _c(a), _c(b))


def and_(a, b) -> Expr:
    return BinOp("and", _c(a), _c(b))


def or_(a, b) -> Expr:
    return BinOp("or", _c(a), _c(b))


I, J = Var("i"), Var("j")


def substitute(expr: Expr, env: Mapping[str, Expr | int]) -> Expr:
    """`expr` with every variable named in `env` replaced (ints become constants)."""
    if isinstance(expr, Var):
        return _c(env[expr.name]) if expr.name in env else expr
    if isinstance(expr, Const):
        return expr
    kwargs = {}
    for f in fields(expr):
        value = getattr(expr, f.name)
        if isinstance(value, Expr):
            value = substitute(value, env)
        elif isinstance(value, tuple):
            value = tuple(substitute(v, env) for v in value)
        kwargs[f.name] = value
    return type(expr)(**kwargs)


def evaluate_int(expr: Expr, env: Mapping[str, int]) -> int | bool:
    """Exact Python-integer evaluation of a closed expression (parameters, lets, block sizes)."""
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Var):
        return env[expr.name]
    if isinstance(expr, Neg):
        return -evaluate_int(expr.operand, env)
    if isinstance(expr, Not):
        return not evaluate_int(expr.operand, env)
    if isinstance(expr, Call):
        args = [evaluate_int(a, env) for a in expr.args]
        if expr.func == "isqrt":
            if args[0] < 0:
                raise ArithmeticError(f"isqrt of a negative number ({args[0]})")
            return math.isqrt(args[0])
        return {"abs": abs, "min": min, "max": max}[expr.func](*args)
    assert isinstance(expr, BinOp)
    if expr.op == "and":
        return bool(evaluate_int(expr.left, env)) and bool(evaluate_int(expr.right, env))
    if expr.op == "or":
        return bool(evaluate_int(expr.left, env)) or bool(evaluate_int(expr.right, env))
    a, b = evaluate_int(expr.left, env), evaluate_int(expr.right, env)
    if expr.op in ("//", "%") and b == 0:
        raise ZeroDivisionError(f"division by zero in {expr}")
    return {
        "+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "//": lambda: a // b, "%": lambda: a % b,
        "==": lambda: a == b, "!=": lambda: a != b, "<": lambda: a < b, "<=": lambda: a <= b,
        ">": lambda: a > b, ">=": lambda: a >= b,
    }[expr.op]()


# Sets of (i, j) pairs ------------------------------------------------------------------------------------------


class SetExpr:
    """Base of the set algebra over (i, j)."""

    def children(self) -> tuple[SetExpr, ...]:
        return ()

    def walk(self) -> Iterator[SetExpr]:
        yield self
        for child in self.children():
            yield from child.walk()

    def exprs(self) -> tuple[Expr, ...]:
        """The integer/boolean expressions this node holds directly (its arguments)."""
        return tuple(getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Expr))


class SetPrimitive(SetExpr):
    """A named primitive; `predicate()` is its exact definition as an expression over i and j."""

    def predicate(self) -> Expr:
        raise NotImplementedError


@dataclass(frozen=True)
class Local(SetPrimitive):
    """|i - j| <= w."""

    w: Expr

    def predicate(self):
        return cmp("<=", Call("abs", (sub(I, J),)), self.w)


@dataclass(frozen=True)
class Stride(SetPrimitive):
    """(i - j) mod l == 0."""

    l: Expr  # noqa: E741 - the paper's name

    def predicate(self):
        return cmp("==", mod(sub(I, J), self.l), 0)


@dataclass(frozen=True)
class Chunk(SetPrimitive):
    """floor(i / l) == floor(j / l)."""

    l: Expr  # noqa: E741

    def predicate(self):
        return cmp("==", floordiv(I, self.l), floordiv(J, self.l))


@dataclass(frozen=True)
class Summary(SetPrimitive):
    """j mod l >= l - c (the last c positions of every length-l chunk)."""

    l: Expr  # noqa: E741
    c: Expr

    def predicate(self):
        return cmp(">=", mod(J, self.l), sub(self.l, self.c))


@dataclass(frozen=True)
class Global(SetPrimitive):
    """i < g or j < g: the first g positions see and are seen by everything."""

    g: Expr

    def predicate(self):
        return or_(cmp("<", I, self.g), cmp("<", J, self.g))


@dataclass(frozen=True)
class Dilated(SetPrimitive):
    """|i - j| <= w * d and (i - j) mod d == 0."""

    w: Expr
    d: Expr

    def predicate(self):
        return and_(cmp("<=", Call("abs", (sub(I, J),)), mul(self.w, self.d)), cmp("==", mod(sub(I, J), self.d), 0))


@dataclass(frozen=True)
class Random(SetPrimitive):
    """Each query block sees r key blocks drawn (seeded, without replacement) from its allowed key blocks.

    Not a closed-form predicate: the per-block table comes from `patterncc.runtime.blocks.random_block_table`.
    """

    r: Expr
    seed: Expr

    def predicate(self):
        raise TypeError("random(r) is a per-block table, not a closed-form predicate")


@dataclass(frozen=True)
class Dense(SetPrimitive):
    """All pairs."""

    def predicate(self):
        return Const(True)


@dataclass(frozen=True)
class Where(SetPrimitive):
    """An arbitrary predicate over i, j, n, h, parameters and lets."""

    pred: Expr

    def predicate(self):
        return self.pred


@dataclass(frozen=True)
class Union(SetExpr):
    left: SetExpr
    right: SetExpr

    def children(self):
        return (self.left, self.right)


@dataclass(frozen=True)
class Intersect(SetExpr):
    left: SetExpr
    right: SetExpr

    def children(self):
        return (self.left, self.right)


@dataclass(frozen=True)
class Difference(SetExpr):
    left: SetExpr
    right: SetExpr

    def children(self):
        return (self.left, self.right)


def set_predicate(s: SetExpr) -> Expr:
    """The whole set as one boolean expression over i and j (raises TypeError if it contains `random`)."""
    if isinstance(s, SetPrimitive):
        return s.predicate()
    left, right = set_predicate(s.left), set_predicate(s.right)
    if isinstance(s, Union):
        return or_(left, right)
    if isinstance(s, Intersect):
        return and_(left, right)
    return and_(left, Not(right))


def contains_random(s: SetExpr) -> bool:
    return any(isinstance(node, Random) for node in s.walk())


# Non-set head families ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hashed:
    """Reformer LSH attention (Kitaev et al. 2020): data-dependent buckets, lowered by its own kernels."""

    buckets: Expr
    rounds: Expr
    chunk: Expr
    shared_qk: bool
    seed: Expr

    def exprs(self) -> tuple[Expr, ...]:
        return (self.buckets, self.rounds, self.chunk, self.seed)


FEATURE_MAPS = ("elu1", "relu", "favor")


@dataclass(frozen=True)
class Kernel:
    """Linear attention with feature map phi (Katharopoulos et al. 2020; FAVOR+ from Choromanski et al. 2020)."""

    feature_map: str  # one of FEATURE_MAPS
    features: Expr | None  # favor only: number of random features m
    seed: Expr
    eps: float  # the only non-integer in the language: a decimal literal, re-printed with repr()

    def exprs(self) -> tuple[Expr, ...]:
        return tuple(e for e in (self.features, self.seed) if e is not None)


HeadBody = SetExpr | Hashed | Kernel


@dataclass(frozen=True)
class HeadGroup:
    """`head NAME[count] = body`: `count` identical heads; inside `body`, `h` is the index within the group."""

    name: str
    count: Expr
    body: HeadBody

    @property
    def uses_head_index(self) -> bool:
        """Whether the heads of the group differ: their expression mentions `h`."""
        if isinstance(self.body, SetExpr):
            exprs = [e for node in self.body.walk() for e in node.exprs()]
        else:
            exprs = list(self.body.exprs())
        return any("h" in e.free_vars() for e in exprs)

    @property
    def family(self) -> str:
        if isinstance(self.body, Hashed):
            return "hashed"
        if isinstance(self.body, Kernel):
            return "kernel"
        return "set"


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None  # None: must be given (an override) or left symbolic for analysis


COMBINE_MODES = ("multihead", "merged", "interleaved")


@dataclass(frozen=True)
class Pattern:
    name: str
    params: tuple[Param, ...]
    lets: tuple[tuple[str, Expr], ...]
    causal: bool
    block: Expr
    heads: tuple[HeadGroup, ...]
    combine: str
    source: str = field(default="", compare=False, repr=False)
    filename: str = field(default="<pattern>", compare=False, repr=False)
    # Value checks (expr, rule, source span, description) made once values are known; see semantics.py.
    checks: tuple = field(default=(), compare=False, repr=False)

    # Binding --------------------------------------------------------------------------------------------------

    def bind(self, n: int) -> Bound:
        """Evaluate parameters, lets, block and head counts for sequence length n (exact integers)."""
        from .semantics import bind_pattern  # the checks live with the other semantic checks

        return bind_pattern(self, n)

    def depends_on_n(self) -> frozenset[str]:
        """Names of the parameters and lets whose value changes with n."""
        dependent: set[str] = {"n"}
        for p in self.params:
            if p.default is not None and p.default.free_vars() & dependent:
                dependent.add(p.name)
        for name, value in self.lets:
            if value.free_vars() & dependent:
                dependent.add(name)
        return frozenset(dependent - {"n"})

    def mask(self, n: int, layer: int = 0):
        """Dense boolean tensor (heads, n, n): which keys each query of each declared head may see.

        The reference every kernel is tested against, computed directly from the IR's formulas
        (see `patterncc.mask`). Kernel heads give their support (all j, or j <= i when causal); hashed heads,
        whose pairs depend on the data, give the same support as an upper bound.
        """
        from .mask import pattern_mask

        return pattern_mask(self, n, layer=layer)

    @property
    def set_heads(self) -> tuple[HeadGroup, ...]:
        return tuple(g for g in self.heads if g.family == "set")


@dataclass(frozen=True)
class Bound:
    """A pattern with every parameter and let evaluated for one n."""

    pattern: Pattern
    n: int
    env: Mapping[str, int]  # parameters and lets (not i, j, h)
    block: int
    counts: tuple[int, ...]  # heads per group, in declaration order

    @property
    def num_heads(self) -> int:
        """Attention heads in a module for this pattern (interleaved: every head runs one group's set)."""
        return sum(self.counts)

    def head_sets(self, layer: int = 0) -> list[tuple[tuple[HeadGroup, int], ...]]:
        """For every attention head of layer `layer`, the (group, h) pairs whose union it attends over.

        multihead: one pair per head, the declared heads in order. merged: every head gets the union of all
        declared heads (all groups, all h). interleaved: every head of layer r runs group r mod p, with
        h = head index mod that group's size.
        """
        groups = self.pattern.heads
        declared = [(group, h) for group, count in zip(groups, self.counts) for h in range(count)]
        if self.pattern.combine == "merged":
            return [tuple(declared)] * len(declared)
        if self.pattern.combine == "interleaved":
            g = layer % len(groups)
            return [((groups[g], k % self.counts[g]),) for k in range(self.num_heads)]
        return [(pair,) for pair in declared]
