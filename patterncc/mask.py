"""The reference: dense boolean masks computed straight from the IR's formulas.

Kernels are tested against this, so it shares nothing with the layout, lowering or kernel code: it interprets
the IR expressions on full (n, n) integer grids, with Python's floor semantics for `//` and `%`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import ir
from .errors import PatternUsageError
from .runtime.random_blocks import random_block_table
from .runtime.tiles import floor_sqrt
from .semantics import bind_pattern

Value = torch.Tensor | int | bool
_INT64 = 2**63


def _fits(value: Value, name: str) -> Value:
    """Python integers enter int64 tensor arithmetic here; one that does not fit is the user's error."""
    if isinstance(value, int) and not -_INT64 <= value < _INT64:
        raise PatternUsageError(f"{name} = {value} does not fit in a 64-bit integer")
    return value


def eval_expr(expr: ir.Expr, env: Mapping[str, Value]) -> Value:
    """Evaluate an expression where i, j (and anything else) may be broadcastable int64 tensors."""
    return ir.fold_expr(expr, const=lambda c: _fits(c.value, "an integer"),
                        var=lambda v: _fits(env[v.name], f"`{v.name}`"), neg=lambda _, a: -a,
                        not_=lambda _, a: ~a if isinstance(a, torch.Tensor) else not a, call=_call, binop=_binop)


def _call(expr: ir.Call, args: list[Value]) -> Value:
    if expr.func == "abs":
        return torch.abs(args[0]) if isinstance(args[0], torch.Tensor) else abs(args[0])
    if expr.func == "isqrt":
        return _isqrt(args[0])
    a, b = (torch.as_tensor(x) for x in args)
    return torch.minimum(a, b) if expr.func == "min" else torch.maximum(a, b)


def _binop(expr: ir.BinOp, a: Value, b: Value) -> Value:
    op = expr.op
    if op in ("and", "or"):
        a, b = torch.as_tensor(a, dtype=torch.bool), torch.as_tensor(b, dtype=torch.bool)
        return a & b if op == "and" else a | b
    if op in ("//", "%"):
        divisor = torch.as_tensor(b)
        if bool((divisor == 0).any()):
            raise PatternUsageError(f"division by zero in `{expr}`")
        a = torch.as_tensor(a)
        return torch.div(a, divisor, rounding_mode="floor") if op == "//" else torch.remainder(a, divisor)
    return {
        "+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
        "==": lambda: torch.as_tensor(a) == b, "!=": lambda: torch.as_tensor(a) != b,
        "<": lambda: torch.as_tensor(a) < b, "<=": lambda: torch.as_tensor(a) <= b,
        ">": lambda: torch.as_tensor(a) > b, ">=": lambda: torch.as_tensor(a) >= b,
    }[op]()


def _isqrt(x: Value) -> Value:
    if not isinstance(x, torch.Tensor):
        import math

        return math.isqrt(x)
    if bool((x < 0).any()):
        raise PatternUsageError("isqrt of a negative number")
    return floor_sqrt(x)


def set_mask(s: ir.SetExpr, env: Mapping[str, Value], n: int, block: int, causal: bool) -> torch.Tensor:
    """Boolean (n, n) for a set expression; env binds n, h, parameters and lets (i, j are added here)."""
    i = torch.arange(n, dtype=torch.int64)[:, None]
    j = torch.arange(n, dtype=torch.int64)[None, :]
    return set_allowed(s, env, i, j, n, block, causal).expand(n, n).clone()


def set_allowed(s: ir.SetExpr, env: Mapping[str, Value], i: torch.Tensor, j: torch.Tensor, n: int, block: int,
                causal: bool) -> torch.Tensor:
    """The set expression on position tensors i, j (broadcast; positions in 0..n-1): which pairs it allows."""
    full_env = {**env, "i": i, "j": j, "n": n}
    env_ints = {k: v for k, v in full_env.items() if not isinstance(v, torch.Tensor)}
    shape = torch.broadcast_shapes(i.shape, j.shape)

    def primitive(node: ir.SetPrimitive) -> torch.Tensor:
        if isinstance(node, ir.Random):
            nb = -(-n // block)
            r = int(ir.evaluate_int(node.r, env_ints))
            seed = int(ir.evaluate_int(node.seed, env_ints))
            table = random_block_table(nb, nb, r, seed, causal)
            return table[i // block, j // block]
        return torch.as_tensor(eval_expr(node.predicate(), full_env), dtype=torch.bool).expand(shape)

    out = ir.fold_set_bool(s, primitive)
    return out & (j <= i) if causal else out


def support_mask(n: int, causal: bool) -> torch.Tensor:
    """What kernel heads (all earlier keys) and hashed heads (an upper bound) may attend to."""
    out = torch.ones(n, n, dtype=torch.bool)
    return out.tril() if causal else out


def head_mask(bound: ir.Bound, group: ir.HeadGroup, h: int) -> torch.Tensor:
    if group.family != "set":
        return support_mask(bound.n, bound.pattern.causal)
    env = {**bound.env, "h": h}
    return set_mask(group.body, env, bound.n, bound.block, bound.pattern.causal)


def pattern_mask(pattern: ir.Pattern, n: int, layer: int = 0) -> torch.Tensor:
    bound = bind_pattern(pattern, n)
    cache: dict[tuple[str, int], torch.Tensor] = {}
    heads = []
    for pairs in bound.head_sets(layer):
        out = torch.zeros(n, n, dtype=torch.bool)
        for group, h in pairs:
            key = (group.name, h)
            if key not in cache:
                cache[key] = head_mask(bound, group, h)
            out |= cache[key]
        heads.append(out)
    return torch.stack(heads)
