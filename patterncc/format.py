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

# Integer and boolean expression levels.
_OR, _AND, _NOT, _COMPARE, _SUM, _PRODUCT, _UNARY, _ATOM = range(1, 9)
_BINARY_LEVELS = {
    "or": _OR, "and": _AND,
    **{op: _COMPARE for op in ir.COMPARE_OPS},
    "+": _SUM, "-": _SUM,
    "*": _PRODUCT, "//": _PRODUCT, "%": _PRODUCT,
}

# Set expression levels.
_UNION, _INTER, _DIFF, _SET_ATOM = range(1, 5)
_SET_OPS = {ir.Union: ("|", _UNION), ir.Intersect: ("&", _INTER), ir.Difference: ("-", _DIFF)}


def _wrap(text: str, level: int, needed: int) -> str:
    return f"({text})" if level < needed else text


def _expr(e: ir.Expr) -> tuple[str, int]:
    """(text, precedence level) of an expression."""
    if isinstance(e, ir.Const):
        if isinstance(e.value, bool):
            return ("true" if e.value else "false"), _ATOM
        # A negative constant only arises from an override (`parse(path, l=-1)`); it reads back as Neg(Const).
        return str(e.value), (_ATOM if e.value >= 0 else _UNARY)
    if isinstance(e, ir.Var):
        return e.name, _ATOM
    if isinstance(e, ir.Call):
        return f"{e.func}({', '.join(format_expr(a) for a in e.args)})", _ATOM
    if isinstance(e, ir.Neg):
        text, level = _expr(e.operand)
        text = _wrap(text, level, _UNARY)
        return ("- " if text.startswith("-") else "-") + text, _UNARY
    if isinstance(e, ir.Not):
        text, level = _expr(e.operand)
        return f"not {_wrap(text, level, _NOT)}", _NOT
    assert isinstance(e, ir.BinOp), f"not an expression: {e!r}"
    level = _BINARY_LEVELS[e.op]
    # Comparisons do not chain: both sides are sums. Everything else is left-associative.
    left_needed, right_needed = (_SUM, _SUM) if level == _COMPARE else (level, level + 1)
    left, left_level = _expr(e.left)
    right, right_level = _expr(e.right)
    return f"{_wrap(left, left_level, left_needed)} {e.op} {_wrap(right, right_level, right_needed)}", level


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


def _merged_form(s: ir.SetExpr) -> str | None:
    """`strided(l)` / `fixed(l, c)` when a union is exactly what that primitive expands to."""
    if not isinstance(s, ir.Union):
        return None
    a, b = s.left, s.right
    if isinstance(a, ir.Local) and isinstance(b, ir.Stride) and a.w == b.l:
        return f"strided({format_expr(a.w)})"
    if isinstance(a, ir.Chunk) and isinstance(b, ir.Summary) and a.l == b.l:
        return f"fixed({format_expr(a.l)}, {format_expr(b.c)})"
    return None


def _set(s: ir.SetExpr) -> tuple[str, int]:
    merged = _merged_form(s)
    if merged is not None:
        return merged, _SET_ATOM
    if isinstance(s, ir.Where):
        # `where` runs to the end of the head's expression, so anywhere but the whole head it needs parentheses.
        return f"(where {format_expr(s.pred)})", _SET_ATOM
    if isinstance(s, ir.SetPrimitive):
        return _primitive(s), _SET_ATOM
    op, level = _SET_OPS[type(s)]
    left, left_level = _set(s.left)
    right, right_level = _set(s.right)
    return f"{_wrap(left, left_level, level)} {op} {_wrap(right, right_level, level + 1)}", level


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
