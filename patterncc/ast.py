"""The syntax tree: it mirrors the text of a .attn file and keeps every node's position for error messages.

The semantic pass (`semantics.py`) turns this into the IR (`ir.py`); nothing after it sees the AST.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass(frozen=True)
class Node:
    span: Span = field(compare=False, repr=False)


# Integer and boolean expressions.


@dataclass(frozen=True)
class Number(Node):
    value: int


@dataclass(frozen=True)
class Decimal(Node):
    """A decimal literal; only `eps` of kernel heads takes one."""

    text: str


@dataclass(frozen=True)
class BoolLit(Node):
    value: bool


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class Call(Node):
    func: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Unary(Node):
    op: str  # "-" or "not"
    operand: Expr


@dataclass(frozen=True)
class Binary(Node):
    op: str  # + - * // % == != < <= > >= and or
    left: Expr
    right: Expr


Expr = Number | Decimal | BoolLit | Name | Call | Unary | Binary


# Set expressions over (i, j).


@dataclass(frozen=True)
class Arg(Node):
    name: str | None  # None for a positional argument
    value: Expr


@dataclass(frozen=True)
class Primitive(Node):
    name: str
    args: tuple[Arg, ...]
    has_parens: bool


@dataclass(frozen=True)
class Where(Node):
    predicate: Expr


@dataclass(frozen=True)
class SetOp(Node):
    op: str  # "|", "&", "-"
    left: SetExpr
    right: SetExpr


SetExpr = Primitive | Where | SetOp


# Statements and patterns.


@dataclass(frozen=True)
class Param(Node):
    name: str
    default: Expr | None


@dataclass(frozen=True)
class Let(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Causal(Node):
    pass


@dataclass(frozen=True)
class Block(Node):
    size: Expr


@dataclass(frozen=True)
class Head(Node):
    name: str
    count: Expr | None
    body: SetExpr


@dataclass(frozen=True)
class Combine(Node):
    mode: str


Statement = Let | Causal | Block | Head | Combine


@dataclass(frozen=True)
class Pattern(Node):
    name: str
    params: tuple[Param, ...]
    body: tuple[Statement, ...]


@dataclass(frozen=True)
class Module(Node):
    patterns: tuple[Pattern, ...]
    source: str = field(compare=False, repr=False)
    filename: str = field(compare=False, repr=False)
