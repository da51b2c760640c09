"""The typed IR that every pass after the front end consumes: frozen, hashable dataclasses with no source positions.

Notation: a head is a set of (i, j) pairs, i the query position, j the key position, both 0-based in [0, n).
Integer expressions use Python's semantics (`//` floors, `%` takes the sign of the divisor). Every set primitive
except `random` is a predicate over i and j (`SetPrimitive.predicate()`); `random` is a per-block table.
Parameters and lets stay symbolic here; `semantics.bind_pattern(pattern, n)` evaluates them with exact integer
arithmetic, and `mask.pattern_mask(pattern, n)` gives the dense reference masks.

Every pass that walks the IR is a case of one traversal defined here: `fold_set` over set expressions,
`fold_expr` and `map_expr` over integer and boolean expressions (`fold_bool` over a predicate's connectives).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

# Expressions ---------------------------------------------------------------------------------------------------

INT_OPS = ("+", "-", "*", "//", "%")
COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")
BOOL_OPS = ("and", "or")
FUNCTIONS = {"abs": 1, "min": 2, "max": 2, "isqrt": 1}
POSITION_VARS = ("i", "j")
BUILTIN_VARS = ("i", "j", "n", "h")

# How tightly operators bind, loosest first: Python's levels, which .attn's `or`, `and`, `not`, comparisons and
# arithmetic share; printers of either language parenthesize with them.
OR, AND, NOT, COMPARE, BIT_OR, BIT_AND, SUM, PRODUCT, UNARY, ATOM = range(1, 11)
PRECEDENCE = {"or": OR, "and": AND, **{op: COMPARE for op in COMPARE_OPS}, "|": BIT_OR, "&": BIT_AND,
              "+": SUM, "-": SUM, "*": PRODUCT, "//": PRODUCT, "%": PRODUCT}


def operand_levels(op: str) -> tuple[int, int]:
    """The loosest level each operand of the binary operator `op` may have without parentheses: comparisons do
    not chain, and every other operator is left-associative (`a - (b - c)` keeps its parentheses)."""
    level = PRECEDENCE[op]
    return (level + 1, level + 1) if level == COMPARE else (level, level + 1)


def parenthesize(text: str, level: int, needed: int) -> str:
    """`text` (binding at `level`) where an operand of level `needed` is expected."""
    return f"({text})" if level < needed else text


class Expr:
    """Base of integer and boolean expressions."""

    def children(self) -> tuple[Expr, ...]:
        return ()

    def free_vars(self) -> frozenset[str]:
        # Lets share their value's object wherever they are used, so an expression can be a DAG far smaller than
        # its tree: visit each object once.
        out: set[str] = set()
        seen: set[int] = set()
        stack: list[Expr] = [self]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, Var):
                out.add(node.name)
            stack.extend(node.children())
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


# Traversal of expressions ---------------------------------------------------------------------------------------

T = TypeVar("T")


def fold_expr(expr: Expr, *, const: Callable[[Const], T], var: Callable[[Var], T],
              binop: Callable[[BinOp, T, T], T], neg: Callable[[Neg, T], T], not_: Callable[[Not, T], T],
              call: Callable[[Call, list[T]], T], other: Callable[[Expr], T] | None = None) -> T:
    """Fold `expr` bottom-up, one case per node kind: each case gets the node and its children's values (left to
    right, all of them: there is no short-circuit). Nodes defined outside this module (the emitters' `RandomRef`)
    go to `other` as they are; without `other` they are a TypeError.

    Example, the constants of an expression: `fold_expr(e, const=lambda c: {c.value}, var=lambda v: set(),
    binop=lambda _, a, b: a | b, neg=lambda _, a: a, not_=lambda _, a: a, call=lambda _, args: set().union(*args))`.
    """

    done: dict[int, T] = {}  # by object: a let's value is one object wherever the let is used

    def go(e: Expr) -> T:
        key = id(e)
        if key in done:
            return done[key]
        if isinstance(e, BinOp):
            out = binop(e, go(e.left), go(e.right))
        elif isinstance(e, Const):
            out = const(e)
        elif isinstance(e, Var):
            out = var(e)
        elif isinstance(e, Neg):
            out = neg(e, go(e.operand))
        elif isinstance(e, Not):
            out = not_(e, go(e.operand))
        elif isinstance(e, Call):
            out = call(e, [go(a) for a in e.args])
        elif other is None:
            raise TypeError(f"no case for {type(e).__name__} in this fold over expressions")
        else:
            out = other(e)
        done[key] = out
        return out

    return go(expr)


def map_expr(expr: Expr, fn: Callable[[Expr], Expr]) -> Expr:
    """Rebuild `expr` bottom-up: every node is rebuilt from its mapped children, then replaced by `fn(node)`.

    Works on any dataclass node (fields holding an Expr or a tuple of them are children). Example, renaming:
    `map_expr(e, lambda x: Var("k") if x == Var("j") else x)`.
    """
    done: dict[int, Expr] = {}  # by object, so that shared subexpressions stay shared and cost once

    def go(e: Expr) -> Expr:
        key = id(e)
        if key not in done:
            node = e
            if e.children():
                changes = {}
                for f in fields(e):
                    value = getattr(e, f.name)
                    if isinstance(value, Expr):
                        changes[f.name] = go(value)
                    elif isinstance(value, tuple):
                        changes[f.name] = tuple(go(v) for v in value)
                node = replace(e, **changes)
            done[key] = fn(node)
        return done[key]

    return go(expr)


def fold_bool(expr: Expr, *, atom: Callable[[Expr], T], and_: Callable[[T, T], T], or_: Callable[[T, T], T],
              not_: Callable[[T], T]) -> T:
    """Fold a predicate over its connectives only (`and`, `or`, `not`); every other subexpression is an atom,
    given whole to `atom`. Example, its atoms: `fold_bool(p, atom=lambda a: [a], and_=operator.add,
    or_=operator.add, not_=lambda x: x)`."""

    done: dict[int, T] = {}

    def go(e: Expr) -> T:
        key = id(e)
        if key not in done:
            if isinstance(e, BinOp) and e.op in BOOL_OPS:
                done[key] = (and_ if e.op == "and" else or_)(go(e.left), go(e.right))
            elif isinstance(e, Not):
                done[key] = not_(go(e.operand))
            else:
                done[key] = atom(e)
        return done[key]

    return go(expr)


def conjuncts(expr: Expr) -> list[Expr]:
    """The operands of a chain of `and`, left to right (`[expr]` when it is no `and`)."""
    if isinstance(expr, BinOp) and expr.op == "and":
        return conjuncts(expr.left) + conjuncts(expr.right)
    return [expr]


def substitute(expr: Expr, env: Mapping[str, Expr | int]) -> Expr:
    """`expr` with every variable named in `env` replaced (ints become constants)."""
    return map_expr(expr, lambda e: _c(env[e.name]) if isinstance(e, Var) and e.name in env else e)


_INT_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
            "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge, "and": lambda a, b: bool(a) and bool(b), "or": lambda a, b: bool(a) or bool(b)}


def _int_call(e: Call, args: list) -> int:
    if e.func == "isqrt":
        if args[0] < 0:
            raise ArithmeticError(f"isqrt of a negative number ({args[0]})")
        return math.isqrt(args[0])
    return {"abs": abs, "min": min, "max": max}[e.func](*args)


def _int_binop(e: BinOp, a, b):
    if e.op in ("//", "%") and b == 0:
        raise ZeroDivisionError(f"division by zero in {_short(e)}")
    return bounded(_INT_OPS[e.op](a, b), e)


# Kernels compute in int64; bounding every intermediate value also keeps exact evaluation cheap (squaring a let
# 35 times would otherwise build a number of billions of digits).
INT_LIMIT = 2**62


def bounded(value, expr: Expr):
    """`value` (the value of `expr`), or OverflowError when it is an integer outside (-INT_LIMIT, INT_LIMIT)."""
    if not isinstance(value, bool) and isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        raise OverflowError(f"`{_short(expr)}` is about {'-' if value < 0 else ''}2**{value.bit_length() - 1}, "
                            f"outside the range patterncc computes in (|value| < 2**62)")
    return value


def _short(expr: Expr, limit: int = 60) -> str:
    text = str(expr) if _tree_size(expr, limit) <= limit else f"{type(expr).__name__.lower()} expression"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _tree_size(expr: Expr, limit: int) -> int:
    """Nodes of `expr` as a tree, counting no further than just past `limit`."""
    count, stack = 0, [expr]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        stack.extend(node.children())
    return count


def evaluate_int(expr: Expr, env: Mapping[str, int]) -> int | bool:
    """Exact Python-integer evaluation of a closed expression (parameters, lets, block sizes)."""
    return fold_expr(expr, const=lambda c: c.value, var=lambda v: env[v.name], binop=_int_binop,
                     neg=lambda e, a: bounded(-a, e), not_=lambda _, a: not a,
                     call=lambda e, args: bounded(_int_call(e, args), e))


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


# Traversal of sets ----------------------------------------------------------------------------------------------


def fold_set(s: SetExpr, *, primitive: Callable[[SetPrimitive], T], union: Callable[[T, T], T],
             intersect: Callable[[T, T], T], difference: Callable[[T, T], T]) -> T:
    """Fold a set expression bottom-up: `primitive` for the leaves, one combining case per set operation (both
    sides are always folded, left first). Example, the number of primitives:
    `fold_set(s, primitive=lambda p: 1, union=operator.add, intersect=operator.add, difference=operator.add)`."""

    def go(node: SetExpr) -> T:
        if isinstance(node, SetPrimitive):
            return primitive(node)
        combine = {Union: union, Intersect: intersect, Difference: difference}[type(node)]
        return combine(go(node.left), go(node.right))

    return go(s)


def fold_set_bool(s: SetExpr, primitive: Callable[[SetPrimitive], T]) -> T:
    """`fold_set` into anything with Python's `|`, `&` and `~` (boolean tensors, bit words): union is `|`,
    intersection `&`, difference `a & ~b`."""
    return fold_set(s, primitive=primitive, union=operator.or_, intersect=operator.and_,
                    difference=lambda a, b: a & ~b)


def union_members(s: SetExpr) -> list[SetExpr]:
    """The operands of a chain of unions, left to right (`[s]` when it is no union)."""
    if isinstance(s, Union):
        return union_members(s.left) + union_members(s.right)
    return [s]


def set_predicate(s: SetExpr) -> Expr:
    """The whole set as one boolean expression over i and j (raises TypeError if it contains `random`)."""
    return fold_set(s, primitive=lambda p: p.predicate(), union=or_, intersect=and_,
                    difference=lambda a, b: and_(a, Not(b)))


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
    # (name, span of its value) for parameter defaults and lets, to locate errors found when they are evaluated.
    spans: tuple = field(default=(), compare=False, repr=False)

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
