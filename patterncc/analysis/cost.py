"""Per-row cost in closed form: a sympy bound on the keys one query row attends over, in n and the parameters.

Every set primitive has a closed-form bound on its maximum number of keys per row (a `stride(l)` row holds at
most n/l + 1 keys, a `local(w)` row 2w + 1, or w + 1 when causal); set algebra combines them (union: sum,
intersection: min, difference: the left side). `where` predicates are recognised when they bound the distance
i - j to an interval and optionally to a residue class (`abs(i - j) <= E`, `(i - j) % d == 0`, `i - j >= 0`, and
conjunctions and disjunctions of these), or restrict keys to a prefix (`j < E`); anything else costs n, with a
note. Parameters and lets stay symbols named as in the source; the asymptotic order in n substitutes the
parameters that depend on n (`l = isqrt(n)` gives sqrt(n)) and treats the others as constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir

N = sympy.Symbol("n", positive=True, integer=True)
NO_CLOSED_FORM = "no closed form for this `where` predicate: bounded by n"


@dataclass(frozen=True)
class Cost:
    """Keys per query row: `formula` bounds the maximum (an expectation when `expected`)."""

    formula: sympy.Expr
    order: sympy.Expr | None  # an O(...) term in n; None when sympy could not compute it
    expected: bool = False
    notes: tuple[str, ...] = ()

    def value(self, env: dict[str, int], n: int) -> float:
        """The formula at given parameter values and n."""
        return formula_value(self.formula, env, n)

    def to_json(self, env: dict[str, int], n: int) -> dict:
        return {"formula": str(self.formula), "order": format_order(self.order), "expected": self.expected,
                "value": self.value(env, n), "notes": list(self.notes)}


def formula_value(formula: sympy.Expr, env: dict[str, int], n: int) -> float:
    """A formula of the analysis at given parameter values and n."""
    values = {sympy.Symbol(name, positive=True, integer=True): v for name, v in env.items()}
    return float(formula.subs(values).subs(N, n))


def format_order(order: sympy.Expr | None) -> str:
    """`O(n)` rather than sympy's `O(n, (n, oo))`; `?` when the order could not be computed."""
    if order is None:
        return "?"
    return f"O({order.expr})" if isinstance(order, sympy.Order) else str(order)


class _Symbolic:
    """IR expressions as sympy expressions: parameters as symbols, lets expanded, h a given integer."""

    def __init__(self, pattern: ir.Pattern, h: int):
        self.pattern, self.h = pattern, h
        self.lets = {}
        for name, value in pattern.lets:
            self.lets[name] = self.expr(value)

    def expr(self, e: ir.Expr) -> sympy.Expr:
        return ir.fold_expr(e, const=lambda c: sympy.Integer(int(c.value)), var=self._var, neg=lambda _, a: -a,
                            not_=_not_an_integer, call=_sympy_call, binop=_sympy_binop)

    def _var(self, v: ir.Var) -> sympy.Expr:
        if v.name == "h":
            return sympy.Integer(self.h)
        if v.name in self.lets:
            return self.lets[v.name]
        return N if v.name == "n" else sympy.Symbol(v.name, positive=True, integer=True)


def _not_an_integer(e: ir.Expr, *_) -> sympy.Expr:
    raise AssertionError(e)


def _sympy_call(e: ir.Call, args: list[sympy.Expr]) -> sympy.Expr:
    if e.func == "isqrt":
        return sympy.floor(sympy.sqrt(args[0]))
    return {"abs": sympy.Abs, "min": sympy.Min, "max": sympy.Max}[e.func](*args)


def _sympy_binop(e: ir.BinOp, a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    if e.op not in ir.INT_OPS:
        _not_an_integer(e)
    if e.op == "//":
        return sympy.floor(a / b)
    if e.op == "%":
        return sympy.Mod(a, b)
    return {"+": a + b, "-": a - b, "*": a * b}[e.op]


def head_cost(pattern: ir.Pattern, group: ir.HeadGroup, h: int, block: int) -> Cost:
    """Cost of one declared head (h: its index within the group)."""
    sym = _Symbolic(pattern, h)
    body = group.body
    if isinstance(body, ir.Hashed):
        # Reformer: each query attends within its own and the previous chunk of the sorted order, per round.
        formula = sym.expr(body.rounds) * 2 * sym.expr(body.chunk)
        note = ("expected keys per row: rounds x 2 chunks (own and previous chunk of the bucket-sorted order); "
                "the pairs depend on the data")
        return _with_order(formula, pattern, expected=True, notes=(note,))
    if isinstance(body, ir.Kernel):
        return Cost(sympy.Integer(1), sympy.O(1, (N, sympy.oo)),
                    notes=("linear attention: O(d^2) work per query row (d the head dimension), whatever n",))
    notes: list[str] = []
    try:
        formula = _set_cost(body, sym, pattern.causal, block, notes)
    except Exception:  # noqa: BLE001 - sympy failed building the formula: n bounds every row
        formula, notes = N, [NO_CLOSED_FORM]
    return _with_order(formula, pattern, notes=tuple(dict.fromkeys(notes)))


def head_cache(pattern: ir.Pattern, group: ir.HeadGroup, h: int) -> sympy.Expr:
    """Keys a KV cache keeps for one head of a causal pattern while generating n positions: the most positions at
    once that a later query still reads, as a formula in n (an upper bound). Per primitive: local(w) and
    dilated(w, d) their window (w + 1, w x d + 1), chunk(l) the current chunk (l), summary(l, c) every summary
    key (c per chunk of l), global(g) the first g; stride(l) every key (each residue recurs), random(r) and
    dense every key, a `where` every key (no shape is assumed). A union keeps the sum of its sides, an
    intersection the smaller, a difference its left side; never more than n. Hashed heads keep every key (their
    windows depend on the data); kernel heads none (they keep a state of head_dim^2 numbers)."""
    body = group.body
    if isinstance(body, ir.Hashed):
        return N
    if isinstance(body, ir.Kernel):
        return sympy.Integer(0)
    sym = _Symbolic(pattern, h)

    def primitive(node: ir.SetPrimitive) -> sympy.Expr:
        if isinstance(node, ir.Local):
            return sym.expr(node.w) + 1
        if isinstance(node, ir.Dilated):
            return sym.expr(node.w) * sym.expr(node.d) + 1
        if isinstance(node, ir.Chunk):
            return sym.expr(node.l)
        if isinstance(node, ir.Summary):
            return sym.expr(node.c) * sympy.ceiling(N / sym.expr(node.l))
        if isinstance(node, ir.Global):
            return sym.expr(node.g)
        return N  # stride, random, dense, where

    try:
        kept = ir.fold_set(body, primitive=primitive, union=lambda a, b: a + b, intersect=sympy.Min,
                           difference=lambda a, b: a)
    except Exception:  # noqa: BLE001 - sympy failed building the formula: n bounds it
        return N
    return sympy.Min(kept, N)


def union_cost(parts: list[Cost], pattern: ir.Pattern) -> Cost:
    formula = sympy.Add(*(c.formula for c in parts))
    notes = tuple(dict.fromkeys(note for c in parts for note in c.notes if note != ORDER_UNKNOWN_NOTE))
    return _with_order(formula, pattern, expected=any(c.expected for c in parts), notes=notes)


def _with_order(formula: sympy.Expr, pattern: ir.Pattern, expected: bool = False, notes: tuple[str, ...] = ()
                ) -> Cost:
    order = order_in_n(pattern, formula)
    if order is None:
        notes = (*notes, ORDER_UNKNOWN_NOTE)
    return Cost(formula, order, expected=expected, notes=notes)


def _set_cost(node: ir.SetExpr, sym: _Symbolic, causal: bool, block: int, notes: list[str]) -> sympy.Expr:
    """Union: the sum; intersection: the smaller side; difference: the left side (notes only from what counts)."""
    formula, set_notes = ir.fold_set(
        node, primitive=lambda p: _primitive_cost(p, sym, causal, block),
        union=lambda a, b: (a[0] + b[0], a[1] + b[1]),
        intersect=lambda a, b: (sympy.Min(a[0], b[0]), a[1] + b[1]), difference=lambda a, b: a)
    notes.extend(set_notes)
    return formula


def _primitive_cost(node: ir.SetPrimitive, sym: _Symbolic, causal: bool, block: int
                    ) -> tuple[sympy.Expr, tuple[str, ...]]:
    """(keys per row, notes) of one primitive."""
    if isinstance(node, ir.Local):
        return _window(sym.expr(node.w), causal), ()
    if isinstance(node, ir.Stride):
        return N / sym.expr(node.l) + 1, ()
    if isinstance(node, ir.Chunk):
        return sym.expr(node.l), ()
    if isinstance(node, ir.Summary):
        return sym.expr(node.c) * (N / sym.expr(node.l) + 1), ()
    if isinstance(node, ir.Global):
        return N, ()  # the first g rows see every key
    if isinstance(node, ir.Dilated):
        return _window(sym.expr(node.w), causal), ()
    if isinstance(node, ir.Random):
        return sym.expr(node.r) * block, ()
    if isinstance(node, ir.Dense):
        return N, ()
    assert isinstance(node, ir.Where)
    bound = _predicate_cost(node.pred, sym, causal)
    if bound is None:
        return N, (NO_CLOSED_FORM,)
    return bound, ()


def _window(w: sympy.Expr, causal: bool) -> sympy.Expr:
    return w + 1 if causal else 2 * w + 1


# `where` shapes ---------------------------------------------------------------------------------------------------


def _predicate_cost(pred: ir.Expr, sym: _Symbolic, causal: bool) -> sympy.Expr | None:
    if isinstance(pred, ir.Const):
        return N if pred.value else sympy.Integer(0)
    if isinstance(pred, ir.BinOp) and pred.op == "or":
        left, right = _predicate_cost(pred.left, sym, causal), _predicate_cost(pred.right, sym, causal)
        return None if left is None or right is None else left + right
    constraints = _Constraints(sym)
    for atom in ir.conjuncts(pred):
        constraints.add(atom)
    return constraints.bound(causal)


_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


class _Constraints:
    """What a conjunction says about d = i - j (an interval and a modulus) and about j alone (an upper bound)."""

    def __init__(self, sym: _Symbolic):
        self.sym = sym
        self.upper: list[sympy.Expr] = []  # d <= each
        self.lower: list[sympy.Expr] = []  # d >= each
        self.modulus: sympy.Expr | None = None
        self.key_limit: list[sympy.Expr] = []  # j < each
        self.other: list[sympy.Expr] = []  # bounds of disjunctions inside the conjunction

    def add(self, atom: ir.Expr) -> None:
        if isinstance(atom, ir.BinOp) and atom.op == "or":
            bound = _predicate_cost(atom, self.sym, causal=False)
            if bound is not None:
                self.other.append(bound)
            return
        if not (isinstance(atom, ir.BinOp) and atom.op in ir.COMPARE_OPS):
            return
        op, left, right = atom.op, atom.left, atom.right
        if _is_position_free(left) and not _is_position_free(right):
            op, left, right = _FLIP[op], right, left
        if not _is_position_free(right):
            return
        bound = self.sym.expr(right)
        modulus = _residue_of_distance(left)
        if modulus is not None and op == "==" and bound == 0:
            self.modulus = self.sym.expr(modulus)
            return
        sign = _distance_sign(left)
        if sign is not None:
            if sign == 0:  # abs(i - j) op bound
                if op in ("<=", "<"):
                    limit = bound if op == "<=" else bound - 1
                    self.upper.append(limit)
                    self.lower.append(-limit)
                return
            # sign * d op bound
            if op == "==":
                self.upper.append(sign * bound)
                self.lower.append(sign * bound)
                return
            if op in ("<=", "<"):
                limit = bound if op == "<=" else bound - 1
                (self.upper if sign > 0 else self.lower).append(sign * limit)
            elif op in (">=", ">"):
                limit = bound if op == ">=" else bound + 1
                (self.lower if sign > 0 else self.upper).append(sign * limit)
            return
        if left == ir.J and op in ("<", "<="):
            self.key_limit.append(bound if op == "<" else bound + 1)

    def bound(self, causal: bool) -> sympy.Expr | None:
        candidates = list(self.other) + list(self.key_limit)
        lower = ([sympy.Integer(0)] if causal else []) + self.lower
        if self.upper and lower:
            hi, lo = _tightest(self.upper, sympy.Min), _tightest(lower, sympy.Max)
            step = self.modulus if self.modulus is not None else 1
            candidates.append((hi - lo) / step + 1)
        elif self.modulus is not None:
            candidates.append(N / self.modulus + 1)
        if not candidates:
            return None
        return candidates[0] if len(candidates) == 1 else sympy.Min(*candidates)


def _tightest(bounds: list[sympy.Expr], pick) -> sympy.Expr:
    return bounds[0] if len(bounds) == 1 else pick(*bounds)


def _is_position_free(e: ir.Expr) -> bool:
    return not e.free_vars() & {"i", "j"}


def _distance_sign(e: ir.Expr) -> int | None:
    """+1 for i - j, -1 for j - i, 0 for abs of either; None for anything else."""
    if e == ir.sub(ir.I, ir.J):
        return 1
    if e == ir.sub(ir.J, ir.I):
        return -1
    if isinstance(e, ir.Call) and e.func == "abs" and _distance_sign(e.args[0]) in (1, -1):
        return 0
    return None


def _residue_of_distance(e: ir.Expr) -> ir.Expr | None:
    """d for `(i - j) % d` or `(j - i) % d` with d free of positions."""
    if isinstance(e, ir.BinOp) and e.op == "%" and _distance_sign(e.left) in (1, -1) and _is_position_free(e.right):
        return e.right
    return None


# Asymptotic order -------------------------------------------------------------------------------------------------


ORDER_UNKNOWN_NOTE = "the order in n could not be computed (sympy failed on this formula); the bound stands"


def order_in_n(pattern: ir.Pattern, formula: sympy.Expr) -> sympy.Expr | None:
    """O(formula) as n grows, with parameters and lets that depend on n replaced by their formulas in n
    (floors dropped: they do not change the order); None when sympy cannot say (its limits and series raise
    NotImplementedError, TypeError and more on some formulas, which must never reach the user)."""
    try:
        return _order_in_n(pattern, formula)
    except Exception:  # noqa: BLE001 - any sympy failure: the bound is still exact, only its order is unknown
        return None


def _order_in_n(pattern: ir.Pattern, formula: sympy.Expr) -> sympy.Expr:
    sym = _Symbolic(pattern, 0)
    dependent = pattern.depends_on_n()
    substitutions = {}
    for p in pattern.params:
        if p.name in dependent and p.default is not None:
            substitutions[sympy.Symbol(p.name, positive=True, integer=True)] = sym.expr(p.default)
    expr = formula
    for _ in range(len(substitutions) + 1):  # defaults may use earlier parameters
        expr = expr.subs(substitutions)
    expr = expr.replace(sympy.floor, lambda x: x).replace(sympy.ceiling, lambda x: x)
    return _order(expr)


def _order(expr: sympy.Expr) -> sympy.Expr:
    if isinstance(expr, sympy.Add):
        return sympy.Add(*(_order(term) for term in expr.args))  # sympy keeps the fastest-growing O term
    if isinstance(expr, sympy.Min):
        orders = [_order(a) for a in expr.args]
        return min(orders, key=lambda o: _growth_key(o, orders))
    if isinstance(expr, sympy.Max):
        orders = [_order(a) for a in expr.args]
        return max(orders, key=lambda o: _growth_key(o, orders))
    try:
        return sympy.O(expr, (N, sympy.oo))
    except (NotImplementedError, ValueError, TypeError):
        return sympy.O(N, (N, sympy.oo))  # a safe upper bound: no row holds more than n keys


def _growth_key(order: sympy.Expr, others: list[sympy.Expr]) -> int:
    """How many of `others` grow strictly slower than `order` (a rank usable as a sort key)."""
    term = order.expr if isinstance(order, sympy.Order) else order
    rank = 0
    for other in others:
        other_term = other.expr if isinstance(other, sympy.Order) else other
        try:
            if sympy.limit(other_term / term, N, sympy.oo) == 0:
                rank += 1
        except (NotImplementedError, ValueError, TypeError):
            pass
    return rank
