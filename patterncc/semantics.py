"""Stage 2: syntax tree -> IR, with every check that can be made without data.

Names are resolved (parameters, lets, i, j, n, h), types checked (integer vs boolean), primitives checked for
arity and argument kinds, and values checked (positive strides and windows, c <= l, block a power of two...) as
soon as they are known: at once for values that do not depend on n, in `bind_pattern` for those that do.
Errors point at the syntax-tree node they are about.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
from collections.abc import Mapping
from dataclasses import dataclass

from . import ast, ir
from .errors import PatternSemanticError, PatternUsageError, Span, check_positive_int

DEFAULT_BLOCK = 64
MAX_HEADS = 4096  # per head group and in all: far beyond any model, and small enough to expand into per-head tables
# Lets over i, j or h and conditions are inlined where they are used: these bound an expression once inlined, so
# that a chain of lets that each use the previous one twice is an error, not 2**k nodes for every later pass.
MAX_EXPR_NODES = 10_000
MAX_EXPR_DEPTH = 100
MAX_PATTERN_NODES = 200_000  # all heads' expressions of one pattern, inlined
RESERVED = frozenset(ir.BUILTIN_VARS) | frozenset(ir.FUNCTIONS) | {"true", "false"}

# name -> (positional parameter names, keyword parameters with defaults)
SET_PRIMITIVES: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {
    "local": (("w",), {}),
    "stride": (("l",), {}),
    "chunk": (("l",), {}),
    "summary": (("l", "c"), {}),
    "strided": (("l",), {}),
    "fixed": (("l", "c"), {}),
    "global": (("g",), {}),
    "dilated": (("w", "d"), {}),
    "random": (("r",), {"seed": 0}),
    "dense": ((), {}),
}
FAMILY_PRIMITIVES = ("hashed", "kernel")
ALL_PRIMITIVES = (*SET_PRIMITIVES, *FAMILY_PRIMITIVES, "where")


def _did_you_mean(name: str, options) -> str | None:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


@dataclass
class _Scope:
    """Names visible to an expression and what they may contain."""

    params: dict[str, ir.Expr | None]
    lets: dict[str, ir.Expr]  # lets over i/j/h are stored inlined; others stay Var references
    positions: bool = False  # i and j allowed (inside `where`)
    head_index: bool = False  # h allowed (inside a head)


class _Checker:
    def __init__(self, module: ast.Module):
        self.source = module.source
        self.filename = module.filename
        self.value_checks: list[tuple[ir.Expr, str, Span, str]] = []
        # id(expr) -> (expr, tree size, depth): expressions share the objects of inlined lets, so each is measured
        # once (the expr is kept so that its id stays its own)
        self.measured: dict[int, tuple[ir.Expr, int, int]] = {}
        self.pattern_nodes = 0

    def error(self, message: str, span: Span | None, hint: str | None = None) -> PatternSemanticError:
        return PatternSemanticError(message, span, self.source, self.filename, hint=hint)

    # Patterns and statements ----------------------------------------------------------------------------------

    def pattern(self, node: ast.Pattern) -> ir.Pattern:
        self.value_checks = []
        self.pattern_nodes = 0
        spans: list[tuple[str, Span]] = []
        self.check_name(node.name, node.span, "pattern")
        scope = _Scope(params={}, lets={})
        params: list[ir.Param] = []
        for p in node.params:
            self.check_name(p.name, p.span, "parameter")
            if p.name in scope.params:
                raise self.error(f"parameter `{p.name}` is declared twice", p.span)
            default = None
            if p.default is not None:
                default = self.int_expr(p.default, scope, f"the default of parameter `{p.name}`")
            scope.params[p.name] = default
            params.append(ir.Param(p.name, default))
            spans.append((p.name, p.default.span if p.default is not None else p.span))

        causal: ast.Causal | None = None
        block: ast.Block | None = None
        combine: ast.Combine | None = None
        lets: list[tuple[str, ir.Expr]] = []
        heads: list[ir.HeadGroup] = []
        head_spans: dict[str, Span] = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Causal):
                if causal is not None:
                    raise self.error("`causal` is given twice", stmt.span)
                causal = stmt
            elif isinstance(stmt, ast.Block):
                if block is not None:
                    raise self.error("`block` is given twice", stmt.span)
                block = stmt
            elif isinstance(stmt, ast.Combine):
                if combine is not None:
                    raise self.error("`combine` is given twice", stmt.span)
                if stmt.mode not in ir.COMBINE_MODES:
                    raise self.error(
                        f"unknown combine mode `{stmt.mode}`; expected one of {', '.join(ir.COMBINE_MODES)}",
                        stmt.span, hint=_did_you_mean(stmt.mode, ir.COMBINE_MODES))
                combine = stmt
            elif isinstance(stmt, ast.Let):
                self.check_name(stmt.name, stmt.span, "let")
                if stmt.name in scope.params or stmt.name in scope.lets:
                    raise self.error(f"`{stmt.name}` is already defined", stmt.span)
                value, kind = self.typed(stmt.value, _Scope(scope.params, scope.lets, positions=True,
                                                            head_index=True))
                self.measure(value, stmt.value.span)
                spans.append((stmt.name, stmt.value.span))
                if value.free_vars() & {"i", "j", "h"} or kind == "bool":
                    # a macro over positions (or a condition): inlined where it is used, so it keeps its type
                    scope.lets[stmt.name] = value
                else:
                    scope.lets[stmt.name] = ir.Var(stmt.name)
                    lets.append((stmt.name, value))
            elif isinstance(stmt, ast.Head):
                self.check_name(stmt.name, stmt.span, "head")
                if stmt.name in head_spans:
                    raise self.error(f"head `{stmt.name}` is declared twice (first on line "
                                     f"{head_spans[stmt.name].line})", stmt.span)
                head_spans[stmt.name] = stmt.span
                if len(heads) == MAX_HEADS:
                    raise self.error(f"pattern `{node.name}` declares more than {MAX_HEADS} heads", stmt.span,
                                     hint="use a head group, `head NAME[k] = ...` with `h`, for many similar heads")
                heads.append(self.head(stmt, scope))
        if not heads:
            raise self.error(f"pattern `{node.name}` declares no head", node.span,
                             hint="add a head, e.g. `head local = local(128)`")

        mode = combine.mode if combine else "multihead"
        if mode == "merged":
            for g in heads:
                if g.family != "set":
                    raise self.error(f"`combine merged` takes the union of set heads, but head `{g.name}` is a "
                                     f"{g.family} head", head_spans[g.name],
                                     hint="use `combine multihead` (the default) to mix families")
        block_expr = ir.Const(DEFAULT_BLOCK)
        if block is not None:
            block_expr = self.int_expr(block.size, scope, "the block size")
            self.value_checks.append((block_expr, "power2", block.span, "block size"))
        pattern = ir.Pattern(
            name=node.name, params=tuple(params), lets=tuple(lets), causal=causal is not None, block=block_expr,
            heads=tuple(heads), combine=mode, source=self.source, filename=self.filename,
            checks=tuple(self.value_checks), spans=tuple(spans))
        _check_values(pattern, n=None)
        return pattern

    def measure(self, expr: ir.Expr, span: Span) -> tuple[int, int]:
        """(tree size, depth) of `expr` with its lets inlined; an error at `span` past MAX_EXPR_NODES or
        MAX_EXPR_DEPTH. Linear in the objects not measured before."""
        stack: list[tuple[ir.Expr, bool]] = [(expr, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in self.measured:
                continue
            children = node.children()
            if ready or not children:
                parts = [self.measured[id(c)] for c in children]
                size = 1 + sum(p[1] for p in parts)
                depth = 1 + max((p[2] for p in parts), default=0)
                self.measured[id(node)] = (node, size, depth)
                if size > MAX_EXPR_NODES:
                    raise self.error(f"this expression has {size} nodes once its lets are inlined (at most "
                                     f"{MAX_EXPR_NODES})", span, hint=_INLINE_HINT)
                if depth > MAX_EXPR_DEPTH:
                    raise self.error(f"this expression nests {depth} levels deep once its lets are inlined (at "
                                     f"most {MAX_EXPR_DEPTH})", span, hint=_INLINE_HINT)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children)
        return self.measured[id(expr)][1:]

    def count_nodes(self, expr: ir.Expr, span: Span) -> None:
        """Add a head's expression to the pattern's total, bounded by MAX_PATTERN_NODES."""
        self.pattern_nodes += self.measure(expr, span)[0]
        if self.pattern_nodes > MAX_PATTERN_NODES:
            raise self.error(f"the heads of this pattern hold more than {MAX_PATTERN_NODES} expression nodes once "
                             f"lets are inlined", span, hint=_INLINE_HINT)

    def check_name(self, name: str, span: Span, what: str) -> None:
        if name in RESERVED:
            raise self.error(f"`{name}` is a built-in name and cannot name a {what}", span)
        if keyword.iskeyword(name) or name.startswith("_"):
            raise self.error(f"`{name}` cannot name a {what}: names may not be Python keywords or start with `_`",
                             span)

    def head(self, stmt: ast.Head, scope: _Scope) -> ir.HeadGroup:
        count = ir.Const(1)
        if stmt.count is not None:
            count = self.int_expr(stmt.count, scope, f"the head count of `{stmt.name}`")
            self.value_checks.append((count, "head_count", stmt.count.span, f"head count of `{stmt.name}`"))
        head_scope = _Scope(scope.params, scope.lets, head_index=True)
        body = self.head_body(stmt.body, head_scope, stmt.name)
        exprs = [e for node in body.walk() for e in node.exprs()] if isinstance(body, ir.SetExpr) else body.exprs()
        for e in exprs:
            self.count_nodes(e, stmt.span)
        return ir.HeadGroup(stmt.name, count, body)

    def head_body(self, node: ast.SetExpr, scope: _Scope, head: str) -> ir.HeadBody:
        if isinstance(node, ast.Primitive) and node.name in FAMILY_PRIMITIVES:
            return self.family(node, scope)
        return self.set_expr(node, scope)

    # Set expressions ------------------------------------------------------------------------------------------

    def set_expr(self, node: ast.SetExpr, scope: _Scope) -> ir.SetExpr:
        if isinstance(node, ast.SetOp):
            for side in (node.left, node.right):
                if isinstance(side, ast.Primitive) and side.name in FAMILY_PRIMITIVES:
                    raise self.error(f"`{side.name}(...)` heads cannot take part in set algebra "
                                     f"(`{node.op}`): their pairs depend on the data", side.span,
                                     hint=f"give the {side.name} head a head of its own")
            left, right = self.set_expr(node.left, scope), self.set_expr(node.right, scope)
            return {"|": ir.Union, "&": ir.Intersect, "-": ir.Difference}[node.op](left, right)
        if isinstance(node, ast.Where):
            inner = _Scope(scope.params, scope.lets, positions=True, head_index=scope.head_index)
            return ir.Where(self.bool_expr(node.predicate, inner, "a `where` predicate"))
        assert isinstance(node, ast.Primitive)
        if node.name in FAMILY_PRIMITIVES:
            raise self.error(f"`{node.name}(...)` must be a head's whole expression", node.span)
        if node.name not in SET_PRIMITIVES:
            raise self.error(f"unknown primitive `{node.name}`", node.span,
                             hint=_did_you_mean(node.name, ALL_PRIMITIVES)
                             or f"the primitives are {', '.join(ALL_PRIMITIVES)}")
        args = self.bind_args(node, *SET_PRIMITIVES[node.name], scope)
        check = self.value_checks.append
        name = node.name
        if name in ("local", "stride", "chunk", "strided"):
            key = "w" if name == "local" else "l"
            check((args[key], "positive", node.span, f"{'window' if key == 'w' else 'stride'} of {name}"))
        if name in ("summary", "fixed"):
            check((args["l"], "positive", node.span, f"l of {name}"))
            check((args["c"], "positive", node.span, f"c of {name}"))
            check((ir.Call("max", (args["c"], args["l"])), "c_le_l", node.span, f"{name}(l, c)"))
        if name == "global":
            check((args["g"], "positive", node.span, "g of global"))
        if name == "dilated":
            check((args["w"], "positive", node.span, "w of dilated"))
            check((args["d"], "positive", node.span, "d of dilated"))
        if name == "random":
            check((args["r"], "positive", node.span, "r of random"))
            check((args["seed"], "nonnegative", node.span, "seed of random"))
        if name == "local":
            return ir.Local(args["w"])
        if name == "stride":
            return ir.Stride(args["l"])
        if name == "chunk":
            return ir.Chunk(args["l"])
        if name == "summary":
            return ir.Summary(args["l"], args["c"])
        if name == "strided":
            return ir.Union(ir.Local(args["l"]), ir.Stride(args["l"]))
        if name == "fixed":
            return ir.Union(ir.Chunk(args["l"]), ir.Summary(args["l"], args["c"]))
        if name == "global":
            return ir.Global(args["g"])
        if name == "dilated":
            return ir.Dilated(args["w"], args["d"])
        if name == "random":
            return ir.Random(args["r"], args["seed"])
        return ir.Dense()

    def bind_args(self, node: ast.Primitive, positional: tuple[str, ...], keywords: Mapping[str, int],
                  scope: _Scope, kinds: Mapping[str, str] | None = None) -> dict[str, ir.Expr]:
        """Match a primitive's arguments to its parameters: arity, unknown or repeated names, types."""
        kinds = kinds or {}
        names = (*positional, *keywords)
        signature = f"{node.name}({', '.join([*positional, *(f'{k}={v}' for k, v in keywords.items())])})"
        if node.has_parens and not names and not node.args:
            pass
        out: dict[str, ir.Expr] = {}
        seen_keyword = False
        for index, arg in enumerate(node.args):
            if arg.name is None:
                if seen_keyword:
                    raise self.error("a positional argument follows a keyword argument", arg.span)
                if index >= len(names):
                    raise self.error(f"`{node.name}` takes {len(positional)} argument"
                                     f"{'' if len(positional) == 1 else 's'} but got {len(node.args)}",
                                     arg.span, hint=f"write {signature}")
                name = names[index]
            else:
                seen_keyword = True
                name = arg.name
                if name not in names:
                    raise self.error(f"`{node.name}` has no argument `{name}`", arg.span,
                                     hint=_did_you_mean(name, names) or f"write {signature}")
            if name in out:
                raise self.error(f"argument `{name}` of `{node.name}` is given twice", arg.span)
            kind = kinds.get(name, "int")
            what = f"argument `{name}` of `{node.name}`"
            if kind == "bool":
                out[name] = self.bool_expr(arg.value, scope, what)
            elif kind == "feature":
                out[name] = self.feature_name(arg.value, what)
            elif kind == "decimal":
                out[name] = self.decimal(arg.value, what)
            else:
                out[name] = self.int_expr(arg.value, scope, what)
        missing = [p for p in positional if p not in out]
        if missing:
            raise self.error(f"`{node.name}` is missing argument{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(f'`{m}`' for m in missing)}", node.span, hint=f"write {signature}")
        for name, default in keywords.items():
            out.setdefault(name, default if isinstance(default, ir.Expr) else ir.Const(default))
        return out

    def feature_name(self, node: ast.Expr, what: str) -> ir.Expr:
        if not isinstance(node, ast.Name):
            raise self.error(f"{what} must be a feature map name, one of {', '.join(ir.FEATURE_MAPS)}", node.span)
        if node.id not in ir.FEATURE_MAPS:
            raise self.error(f"unknown feature map `{node.id}`; expected one of {', '.join(ir.FEATURE_MAPS)}",
                             node.span, hint=_did_you_mean(node.id, ir.FEATURE_MAPS))
        return ir.Var(node.id)

    def decimal(self, node: ast.Expr, what: str) -> ir.Expr:
        if isinstance(node, ast.Number):
            return ir.Const(node.value)
        if isinstance(node, ast.Decimal):
            return ir.Var(repr(float(node.text)))  # carried as text: re-printed from the parsed float
        raise self.error(f"{what} must be a number literal such as 1e-6", node.span)

    def family(self, node: ast.Primitive, scope: _Scope) -> ir.Hashed | ir.Kernel:
        if node.name == "hashed":
            args = self.bind_args(node, (), {"buckets": 64, "rounds": 1, "chunk": 64, "shared_qk": ir.Const(True),
                                             "seed": 0}, scope, kinds={"shared_qk": "bool"})
            shared = args["shared_qk"]
            if not isinstance(shared, ir.Const):
                raise self.error("`shared_qk` must be `true` or `false`", node.span)
            check = self.value_checks.append
            check((args["buckets"], "even", node.span, "buckets of hashed"))
            check((args["rounds"], "positive", node.span, "rounds of hashed"))
            check((args["chunk"], "positive", node.span, "chunk of hashed"))
            check((args["seed"], "nonnegative", node.span, "seed of hashed"))
            return ir.Hashed(args["buckets"], args["rounds"], args["chunk"], bool(shared.value), args["seed"])
        args = self.bind_args(node, ("phi",), {"features": ir.Const(0), "seed": 0, "eps": ir.Var("1e-06")}, scope,
                              kinds={"phi": "feature", "eps": "decimal"})
        phi = args["phi"].name
        features: ir.Expr | None = None
        if phi == "favor":
            if not any(a.name == "features" for a in node.args):
                raise self.error("`kernel(favor, ...)` needs `features = m` (the number of random features)",
                                 node.span, hint="write kernel(favor, features = 64, seed = 0)")
            features = args["features"]
            self.value_checks.append((features, "positive", node.span, "features of kernel(favor)"))
        elif any(a.name == "features" for a in node.args):
            raise self.error(f"`features` only applies to kernel(favor), not kernel({phi})", node.span)
        eps_node = args["eps"]
        eps = float(eps_node.name) if isinstance(eps_node, ir.Var) else float(eps_node.value)
        if not 0 < eps < math.inf:
            raise self.error(f"eps of kernel({phi}) must be a positive finite number, got {eps!r}", node.span)
        self.value_checks.append((args["seed"], "nonnegative", node.span, "seed of kernel"))
        return ir.Kernel(phi, features, args["seed"], eps)

    # Expressions ----------------------------------------------------------------------------------------------

    def int_expr(self, node: ast.Expr, scope: _Scope, what: str) -> ir.Expr:
        expr, kind = self.typed(node, scope)
        self.measure(expr, node.span)
        if kind != "int":
            raise self.error(f"{what} must be an integer, but this is a condition", node.span)
        return expr

    def bool_expr(self, node: ast.Expr, scope: _Scope, what: str) -> ir.Expr:
        expr, kind = self.typed(node, scope)
        self.measure(expr, node.span)
        if kind != "bool":
            raise self.error(f"{what} must be a condition (a comparison, `and`, `or`, `not`), but this is an "
                             f"integer", node.span, hint="compare it, e.g. `... == 0`")
        return expr

    def expr(self, node: ast.Expr, scope: _Scope) -> ir.Expr:
        return self.typed(node, scope)[0]

    def typed(self, node: ast.Expr, scope: _Scope) -> tuple[ir.Expr, str]:
        if isinstance(node, ast.Number):
            return ir.Const(node.value), "int"
        if isinstance(node, ast.BoolLit):
            return ir.Const(node.value), "bool"
        if isinstance(node, ast.Decimal):
            raise self.error(f"decimal numbers are only allowed for `eps`; got {node.text}", node.span)
        if isinstance(node, ast.Name):
            return self.name(node, scope)
        if isinstance(node, ast.Call):
            if node.func not in ir.FUNCTIONS:
                hint = _did_you_mean(node.func, ir.FUNCTIONS)
                if node.func in ALL_PRIMITIVES:
                    hint = f"`{node.func}` is a set primitive; inside `where` use the functions " \
                           f"{', '.join(ir.FUNCTIONS)}"
                raise self.error(f"unknown function `{node.func}`", node.span, hint=hint)
            arity = ir.FUNCTIONS[node.func]
            if len(node.args) != arity:
                raise self.error(f"`{node.func}` takes {arity} argument{'s' if arity > 1 else ''} but got "
                                 f"{len(node.args)}", node.span)
            args = tuple(self.int_expr(a, scope, f"the argument of `{node.func}`") for a in node.args)
            return ir.Call(node.func, args), "int"
        if isinstance(node, ast.Unary):
            if node.op == "-":
                return ir.Neg(self.int_expr(node.operand, scope, "the operand of `-`")), "int"
            return ir.Not(self.bool_expr(node.operand, scope, "the operand of `not`")), "bool"
        assert isinstance(node, ast.Binary)
        if node.op in ir.BOOL_OPS:
            left = self.bool_expr(node.left, scope, f"the left side of `{node.op}`")
            right = self.bool_expr(node.right, scope, f"the right side of `{node.op}`")
            return ir.BinOp(node.op, left, right), "bool"
        left = self.int_expr(node.left, scope, f"the left side of `{node.op}`")
        right = self.int_expr(node.right, scope, f"the right side of `{node.op}`")
        if node.op in ("//", "%") and isinstance(right, ir.Const) and right.value == 0:
            raise self.error(f"division by zero (`{node.op} 0`)", node.span)
        return ir.BinOp(node.op, left, right), "bool" if node.op in ir.COMPARE_OPS else "int"

    def name(self, node: ast.Name, scope: _Scope) -> tuple[ir.Expr, str]:
        name = node.id
        if name in ("i", "j"):
            if not scope.positions:
                raise self.error(f"`{name}` (the {'query' if name == 'i' else 'key'} position) can only be used "
                                 f"inside `where`", node.span)
            return ir.Var(name), "int"
        if name == "h":
            if not scope.head_index:
                raise self.error("`h` (the head's index within its group) can only be used in a head's "
                                 "expression", node.span)
            return ir.Var(name), "int"
        if name == "n":
            return ir.Var(name), "int"
        if name in scope.lets:
            value = scope.lets[name]
            if value.free_vars() & {"i", "j"} and not scope.positions:
                raise self.error(f"let `{name}` uses i or j, so it can only be used inside `where`", node.span)
            return value, _kind_of(value)
        if name in scope.params:
            return ir.Var(name), "int"
        known = [*scope.params, *scope.lets, "n", *(["i", "j"] if scope.positions else []),
                 *(["h"] if scope.head_index else [])]
        hint = _did_you_mean(name, known)
        if hint is None and name in ALL_PRIMITIVES:
            hint = f"`{name}` is a primitive; call it with arguments, e.g. `{name}(...)`"
        raise self.error(f"unknown name `{name}`", node.span,
                         hint=hint or (f"known names here: {', '.join(known)}" if known else None))


_INLINE_HINT = ("lets over i, j or h, and conditions, are copied where they are used; use each such let once, or "
                "write the expression without doubling it")


def _kind_of(expr: ir.Expr) -> str:
    if isinstance(expr, ir.Const):
        return "bool" if isinstance(expr.value, bool) else "int"
    if isinstance(expr, ir.Not) or (isinstance(expr, ir.BinOp) and expr.op in (*ir.COMPARE_OPS, *ir.BOOL_OPS)):
        return "bool"
    return "int"


# Value checks -------------------------------------------------------------------------------------------------

_RULES = {
    "positive": (lambda v: v >= 1, "must be positive"),
    "nonnegative": (lambda v: v >= 0, "must not be negative"),
    "even": (lambda v: v >= 2 and v % 2 == 0, "must be an even number >= 2"),
    "power2": (lambda v: v >= 16 and v & (v - 1) == 0, "must be a power of two >= 16"),
    "head_count": (lambda v: 1 <= v <= MAX_HEADS, f"must be between 1 and {MAX_HEADS}"),
    "c_le_l": (lambda v: False, ""),
}


def _check_values(pattern: ir.Pattern, n: int | None, env: Mapping[str, int] | None = None,
                  counts: Mapping[str, int] | None = None) -> None:
    def error(message: str, span: Span) -> PatternSemanticError:
        return PatternSemanticError(message, span, pattern.source, pattern.filename)

    dependent = pattern.depends_on_n() | {"n"}
    if env is None:
        env = _evaluate_env(pattern, n=None)
    heads_using_h = max(counts.values()) if counts else 1
    for expr, rule, span, what in pattern.checks:
        free = expr.free_vars()
        if n is None and free & dependent:
            continue
        if not free - {"h"} <= set(env) | {"n"}:
            continue  # a parameter without a default: checked once it is given
        ok, text = _RULES[rule]
        for h in range(heads_using_h if "h" in free else 1):
            values = {**env, "n": n if n is not None else 0, "h": h}
            try:
                value = ir.evaluate_int(expr, values)
                if rule == "c_le_l":
                    c, l = (ir.evaluate_int(a, values) for a in expr.args)
                    if c > l:
                        raise error(f"{what}: c must be at most l, but c = {c} and l = {l}", span)
                    continue
            except (ZeroDivisionError, ArithmeticError) as err:
                raise error(f"{what}: {err}", span) from None
            if not ok(value):
                at = f" (with n = {n})" if n is not None and free & dependent else ""
                at += f" (for h = {h})" if "h" in free else ""
                raise error(f"{what} {text}, got {value}{at}", span)


def _evaluate_env(pattern: ir.Pattern, n: int | None) -> dict[str, int]:
    """Values of the parameters and lets computable without n (n is None) or for that n."""
    env: dict[str, int] = {}
    dependent = pattern.depends_on_n()
    spans = dict(pattern.spans)
    for p in pattern.params:
        if p.default is None or (n is None and p.name in dependent):
            continue
        if not p.default.free_vars() <= set(env) | {"n"}:
            continue
        env[p.name] = _exact(pattern, p.default, {**env, "n": n or 0}, f"parameter `{p.name}`", spans.get(p.name))
    for name, value in pattern.lets:
        if (n is None and name in dependent) or not value.free_vars() <= set(env) | {"n"}:
            continue
        env[name] = _exact(pattern, value, {**env, "n": n or 0}, f"let `{name}`", spans.get(name))
    return env


def _exact(pattern: ir.Pattern, expr: ir.Expr, env: Mapping[str, int], what: str, span: Span | None = None) -> int:
    try:
        value = ir.evaluate_int(expr, env)
    except (ZeroDivisionError, ArithmeticError) as err:
        raise PatternUsageError(f"{what} of pattern `{pattern.name}`: {err}", span, pattern.source,
                                pattern.filename) from None
    if isinstance(value, bool):
        raise PatternUsageError(f"{what} of pattern `{pattern.name}` must be an integer", span, pattern.source,
                                pattern.filename)
    return value


def bind_pattern(pattern: ir.Pattern, n: int) -> ir.Bound:
    check_positive_int(n, "the sequence length n")
    missing = [p.name for p in pattern.params if p.default is None]
    if missing:
        raise PatternUsageError(f"pattern `{pattern.name}` needs a value for parameter"
                                f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                                hint=f"pass it, e.g. -D {missing[0]}=64 or patterncc.parse(path, "
                                     f"{missing[0]}=64)")
    env = _evaluate_env(pattern, n)
    counts = tuple(_exact(pattern, g.count, {**env, "n": n}, f"the head count of `{g.name}`")
                   for g in pattern.heads)
    block = _exact(pattern, pattern.block, {**env, "n": n}, "the block size")
    _check_values(pattern, n, env, {g.name: c for g, c in zip(pattern.heads, counts)})
    if sum(counts) > MAX_HEADS:
        raise PatternUsageError(f"pattern `{pattern.name}` has {sum(counts)} heads in all (with n = {n}); at most "
                                f"{MAX_HEADS}", None, pattern.source, pattern.filename)
    return ir.Bound(pattern=pattern, n=n, env=env, block=block, counts=counts)


def override_params(pattern: ir.Pattern, overrides: Mapping[str, int]) -> ir.Pattern:
    """The pattern with parameter defaults replaced by given integers (-D l=64, parse(path, l=64))."""
    names = [p.name for p in pattern.params]
    for key, value in overrides.items():
        if key not in names:
            hint = _did_you_mean(key, names)
            known = f"; its parameters are {', '.join(names)}" if names else "; it has no parameters"
            raise PatternUsageError(f"pattern `{pattern.name}` has no parameter `{key}`{known}",
                                    hint=hint, filename=pattern.filename)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PatternUsageError(f"parameter `{key}` must be an integer, got {value!r}",
                                    filename=pattern.filename)
        if not -ir.INT_LIMIT < value < ir.INT_LIMIT:
            raise PatternUsageError(f"parameter `{key}` is outside the range patterncc computes in "
                                    f"(|value| < 2**62)", filename=pattern.filename)
    if not overrides:
        return pattern
    def literal(value: int) -> ir.Expr:
        # As the parser reads `-2` (negation of a literal), so an overridden pattern re-printed by
        # `format_pattern` parses back to an equal IR.
        return ir.Const(value) if value >= 0 else ir.Neg(ir.Const(-value))

    params = tuple(ir.Param(p.name, literal(int(overrides[p.name]))) if p.name in overrides else p
                   for p in pattern.params)
    out = dataclasses.replace(pattern, params=params)
    _check_values(out, n=None)
    return out


def check_module(module: ast.Module) -> list[ir.Pattern]:
    checker = _Checker(module)
    patterns: list[ir.Pattern] = []
    seen: dict[str, Span] = {}
    for node in module.patterns:
        if node.name in seen:
            raise checker.error(f"pattern `{node.name}` is defined twice (first on line {seen[node.name].line})",
                                node.span)
        seen[node.name] = node.span
        patterns.append(checker.pattern(node))
    return patterns
