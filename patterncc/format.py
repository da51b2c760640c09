"""IR -> canonical .attn text: `parse(format_pattern(p)) == p` for every pattern the parser can produce.

The text is canonical, not a copy of the source: comments are dropped, statements come in a fixed order
(causal, block, combine, lets, heads), parentheses appear only where precedence needs them, and `let`s over
i, j or h, which the front end inlines, stay inlined. `local(l) | stride(l)` is printed as `strided(l)` and
`chunk(l) | summary(l, c)` as `fixed(l, c)`, the forms they came from (both sides give the same IR).

Precedence levels (loosest first) follow `grammar/attn.lark`; a child is parenthesized when its level is
below the level its position requires, and right operands need one level more (the operators are left-
associative, so `a - (b - c)` keeps its parentheses and `(a - b) - c` loses them).
"""

from __future__ import annotations

from collections.abc import Iterable

from . import ir
from .semantics import DEFAULT_BLOCK

__all__ = ["format_expr", "format_pattern", "format_patterns", "format_set"]

_INDENT = "    "

# Set expression levels.
_UNION, _INTER, _DIFF, _SET_ATOM = range(1, 5)

Text = tuple[str, int]  # (text, precedence level)


def _expr(e: ir.Expr) -> Text:
    """(text, precedence level) of an expression (levels: `ir.PRECEDENCE`)."""
    return ir.fold_expr(e, const=_const, var=lambda v: (v.name, ir.ATOM), neg=_neg, not_=_not, binop=_binop,
                        call=lambda c, args: (f"{c.func}({', '.join(text for text, _ in args)})", ir.ATOM))


def _const(c: ir.Const) -> Text:
    if isinstance(c.value, bool):
        return ("true" if c.value else "false"), ir.ATOM
    # A negative constant only arises from an override (`parse(path, l=-1)`); it reads back as Neg(Const).
    return str(c.value), (ir.ATOM if c.value >= 0 else ir.UNARY)


def _neg(_: ir.Neg, operand: Text) -> Text:
    text = ir.parenthesize(*operand, ir.UNARY)
    return ("- " if text.startswith("-") else "-") + text, ir.UNARY


def _not(_: ir.Not, operand: Text) -> Text:
    return f"not {ir.parenthesize(*operand, ir.NOT)}", ir.NOT


def _binop(e: ir.BinOp, left: Text, right: Text) -> Text:
    left_needed, right_needed = ir.operand_levels(e.op)
    return (f"{ir.parenthesize(*left, left_needed)} {e.op} {ir.parenthesize(*right, right_needed)}",
            ir.PRECEDENCE[e.op])


def format_expr(e: ir.Expr) -> str:
    """An integer or boolean expression as .attn text, with the fewest parentheses that keep its tree."""
    return _expr(e)[0]


def _primitive(s: ir.SetPrimitive) -> str:
    f = format_expr
    if isinstance(s, ir.Local):
        return f"local({f(s.w)})"
    if isinstance(s, ir.Stride):
        return f"stride({f(s.l)})"
    if isinstance(s, ir.Chunk):
        return f"chunk({f(s.l)})"
    if isinstance(s, ir.Summary):
        return f"summary({f(s.l)}, {f(s.c)})"
    if isinstance(s, ir.Global):
        return f"global({f(s.g)})"
    if isinstance(s, ir.Dilated):
        return f"dilated({f(s.w)}, {f(s.d)})"
    if isinstance(s, ir.Random):
        seed = "" if s.seed == ir.Const(0) else f", seed = {f(s.seed)}"
        return f"random({f(s.r)}{seed})"
    if isinstance(s, ir.Dense):
        return "dense"
    raise TypeError(f"no .attn spelling for {s!r}")


def _merged_form(a: ir.SetExpr | None, b: ir.SetExpr | None) -> str | None:
    """`strided(l)` / `fixed(l, c)` when the union of primitives a and b is exactly what that primitive expands
    to."""
    if isinstance(a, ir.Local) and isinstance(b, ir.Stride) and a.w == b.l:
        return f"strided({format_expr(a.w)})"
    if isinstance(a, ir.Chunk) and isinstance(b, ir.Summary) and a.l == b.l:
        return f"fixed({format_expr(a.l)}, {format_expr(b.c)})"
    return None


# A set's text, precedence level, and the primitive it is (None for a set operation), for the merged forms.
SetText = tuple[str, int, ir.SetPrimitive | None]


def _set(s: ir.SetExpr) -> SetText:
    def primitive(p: ir.SetPrimitive) -> SetText:
        if isinstance(p, ir.Where):
            # `where` runs to the end of the head's expression, so anywhere but the whole head it needs parentheses.
            return f"(where {format_expr(p.pred)})", _SET_ATOM, p
        return _primitive(p), _SET_ATOM, p

    def operation(op: str, level: int):
        def combine(left: SetText, right: SetText) -> SetText:
            merged = _merged_form(left[2], right[2]) if op == "|" else None
            if merged is not None:
                return merged, _SET_ATOM, None
            return f"{ir.parenthesize(*left[:2], level)} {op} {ir.parenthesize(*right[:2], level + 1)}", level, None

        return combine

    return ir.fold_set(s, primitive=primitive, union=operation("|", _UNION), intersect=operation("&", _INTER),
                       difference=operation("-", _DIFF))


def format_set(s: ir.SetExpr) -> str:
    """A set expression as it would appear as a head's whole right-hand side."""
    if isinstance(s, ir.Where):
        return f"where {format_expr(s.pred)}"
    return _set(s)[0]


def _family(body: ir.Hashed | ir.Kernel) -> str:
    f = format_expr
    if isinstance(body, ir.Hashed):
        return (f"hashed(buckets = {f(body.buckets)}, rounds = {f(body.rounds)}, chunk = {f(body.chunk)}, "
                f"shared_qk = {'true' if body.shared_qk else 'false'}, seed = {f(body.seed)})")
    args = [body.feature_map]
    if body.features is not None:
        args.append(f"features = {f(body.features)}")
    if body.seed != ir.Const(0):
        args.append(f"seed = {f(body.seed)}")
    if body.eps != 1e-6:
        args.append(f"eps = {body.eps!r}")
    return f"kernel({', '.join(args)})"


def _head(group: ir.HeadGroup) -> str:
    count = "" if group.count == ir.Const(1) else f"[{format_expr(group.count)}]"
    body = format_set(group.body) if group.family == "set" else _family(group.body)
    return f"head {group.name}{count} = {body}"


def format_pattern(pattern: ir.Pattern) -> str:
    """The pattern as canonical .attn text (one `pattern` block, ending with a newline)."""
    params = ", ".join(p.name if p.default is None else f"{p.name} = {format_expr(p.default)}"
                       for p in pattern.params)
    body: list[str] = []
    if pattern.causal:
        body.append("causal")
    if pattern.block != ir.Const(DEFAULT_BLOCK):
        body.append(f"block {format_expr(pattern.block)}")
    if pattern.combine != "multihead":
        body.append(f"combine {pattern.combine}")
    body.extend(f"let {name} = {format_expr(value)}" for name, value in pattern.lets)
    body.extend(_head(g) for g in pattern.heads)
    lines = [f"pattern {pattern.name}({params}) {{", *(_INDENT + line for line in body), "}"]
    return "\n".join(lines) + "\n"


def format_patterns(patterns: Iterable[ir.Pattern]) -> str:
    """Several patterns as one .attn file, separated by blank lines."""
    return "\n".join(format_pattern(p) for p in patterns)
