"""Stage 1: source text -> syntax tree (`ast.py`), with syntax errors that point at line and column.

Lark never reaches the user: its `UnexpectedInput` is converted here, and `match_examples` labels the
common mistakes with an explanation of what to write instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from . import ast
from .errors import PatternError, PatternSyntaxError, PatternUsageError, Span
from .resources import resource_dir

MAX_SOURCE_BYTES = 1 << 20  # a .attn file is a few hundred bytes; this bounds what a pipe or /dev/zero can feed
MAX_NESTING = 120  # levels of the syntax tree (expressions nest at most semantics.MAX_EXPR_DEPTH deep)
MAX_LITERAL = 2**62  # as ir.INT_LIMIT: the range patterncc computes in


@cache
def _parser() -> lark.Lark:
    grammar = (resource_dir("grammar") / "attn.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _span(meta_or_token) -> Span:
    if isinstance(meta_or_token, Token):
        end = meta_or_token.end_column if meta_or_token.end_line == meta_or_token.line else None
        return Span(meta_or_token.line, meta_or_token.column, end)
    if getattr(meta_or_token, "empty", False):
        return Span(1, 1)
    end = meta_or_token.end_column if meta_or_token.end_line == meta_or_token.line else None
    return Span(meta_or_token.line, meta_or_token.column, end)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, source: str, filename: str):
        super().__init__()
        self.source = source
        self.filename = filename

    def start(self, meta, patterns):
        return ast.Module(_span(meta), tuple(patterns), self.source, self.filename)

    def pattern(self, meta, children):
        name, *rest = children
        params = tuple(p for p in rest if isinstance(p, ast.Param))
        body = tuple(s for s in rest if s is not None and not isinstance(s, ast.Param))
        return ast.Pattern(_span(name), str(name), params, body)

    def param(self, meta, children):
        name, default = children
        return ast.Param(_span(name), str(name), default)

    def let_stmt(self, meta, children):
        name, value = children
        return ast.Let(_span(name), str(name), value)

    def causal_stmt(self, meta, children):
        return ast.Causal(_span(meta))

    def block_stmt(self, meta, children):
        return ast.Block(_span(meta), children[0])

    def head_stmt(self, meta, children):
        name, count, body = children
        return ast.Head(_span(name), str(name), count, body)

    def combine_stmt(self, meta, children):
        return ast.Combine(_span(children[0]), str(children[0]))

    def empty_stmt(self, meta, children):
        return None

    def where_clause(self, meta, children):
        return ast.Where(_span(meta), children[0])

    def set_union(self, meta, children):
        return ast.SetOp(_span(meta), "|", children[0], children[1])

    def set_inter(self, meta, children):
        return ast.SetOp(_span(meta), "&", children[0], children[1])

    def set_diff(self, meta, children):
        return ast.SetOp(_span(meta), "-", children[0], children[1])

    def primitive(self, meta, children):
        name, *args = children
        has_parens = not (len(args) == 0 or (len(args) == 1 and args[0] is None and _is_bare(meta, name)))
        args = tuple(a for a in args if a is not None)
        return ast.Primitive(_span(name), str(name), args, has_parens)

    def pos_arg(self, meta, children):
        return ast.Arg(_span(meta), None, children[0])

    def kw_arg(self, meta, children):
        name, value = children
        return ast.Arg(_span(name), str(name), value)

    def or_op(self, meta, children):
        return ast.Binary(_span(meta), "or", *children)

    def and_op(self, meta, children):
        return ast.Binary(_span(meta), "and", *children)

    def not_op(self, meta, children):
        return ast.Unary(_span(meta), "not", children[0])

    def compare(self, meta, children):
        left, op, right = children
        return ast.Binary(_span(op), str(op), left, right)

    def _binary(op):  # noqa: N805 - a factory for the five arithmetic rules
        def rule(self, meta, children):
            return ast.Binary(_span(meta), op, children[0], children[1])

        return rule

    add, sub, mul, floordiv, mod = _binary("+"), _binary("-"), _binary("*"), _binary("//"), _binary("%")

    def neg(self, meta, children):
        return ast.Unary(_span(meta), "-", children[0])

    def number(self, meta, children):
        token = children[0]
        value = int(token) if len(token) <= 20 else MAX_LITERAL  # int() refuses 4300 digits: never call it so
        if value >= MAX_LITERAL:
            raise PatternSyntaxError("this integer is too large: literals must be below 2**62",
                                     _span(token), self.source, self.filename)
        return ast.Number(_span(token), value)

    def decimal(self, meta, children):
        return ast.Decimal(_span(children[0]), str(children[0]))

    def true(self, meta, children):
        return ast.BoolLit(_span(meta), True)

    def false(self, meta, children):
        return ast.BoolLit(_span(meta), False)

    def var(self, meta, children):
        return ast.Name(_span(children[0]), str(children[0]))

    def call(self, meta, children):
        name, *args = children
        return ast.Call(_span(name), str(name), tuple(a for a in args if a is not None))


def _is_bare(meta, name: Token) -> bool:
    """True when a primitive was written without parentheses (`dense`), false for `dense()`."""
    return getattr(meta, "end_pos", None) == name.end_pos


# Common mistakes, labelled by the parser state they leave Lark in (Lark's `match_examples`).
_EXAMPLES: dict[str, list[str]] = {
    "inside `where`, combine conditions with `and`, `or`, `not`; `where` extends to the end of its head's "
    "expression, so to combine it with set operators write `(where ...) | other`": [
        "pattern p() { head a = where i > j | local(1) }",
        "pattern p() { head a = where i > j & local(1) }",
        "pattern p() { head a = where i > j - local(1) }",
    ],
    "a pattern starts with `pattern NAME(params) { ... }`": [
        "head a = local(1)",
        "causal",
        "pattern { }",
    ],
    "a head is written `head NAME = EXPR` or `head NAME[k] = EXPR`": [
        "pattern p() { head = local(1) }",
        "pattern p() { head a local(1) }",
        "pattern p() { head a: local(1) }",
    ],
    "a parameter list is written `(name = default, ...)`": [
        "pattern p(l = ) { }",
        "pattern p(l = 1,) { }",
        "pattern p(1) { }",
    ],
    "compare with `==` (a single `=` only gives a name its value)": [
        "pattern p() { head a = where i = j }",
        "pattern p() { head a = where i % 2 = 0 }",
    ],
    "use `and`, `or`, `not` for booleans and `|`, `&`, `-` for sets": [
        "pattern p() { head a = where !(i > j) }",
        "pattern p() { head a = where i > j and && j }",
    ],
    "unbalanced braces or parentheses": [
        "pattern p() { head a = local(1) ",
        "pattern p() { head a = (local(1) }",
        "pattern p() { head a = local(1 }",
    ],
}

_TOKEN_NAMES = {
    "NAME": "a name",
    "INT": "an integer",
    "LPAR": "'('",
    "RPAR": "')'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LSQB": "'['",
    "RSQB": "']'",
    "EQUAL": "'='",
    "COMMA": "','",
    "VBAR": "'|'",
    "AMPERSAND": "'&'",
    "MINUS": "'-'",
    "PLUS": "'+'",
    "STAR": "'*'",
    "PERCENT": "'%'",
    "SLASH": "'/'",
    "COMPARE": "a comparison",
    "DECIMAL": "a decimal number",
    "SEMICOLON": "';'",
    "$END": "end of file",
}

# Characters that are not in the language at all, and what to write instead.
_CHARACTER_HINTS = {
    "!": "negate a condition with `not` (`!=` is not-equal)",
    "/": "integer division is `//` (floor division, as in Python)",
}


def _token_name(token_type: str) -> str:
    if token_type in _TOKEN_NAMES:
        return _TOKEN_NAMES[token_type]
    try:
        pattern = _parser().get_terminal(token_type).pattern
    except KeyError:
        return token_type.lower()
    # Keywords and operators Lark names itself (`BLOCK`, `__ANON_0` for `//`): show their text.
    return f"'{pattern.value}'" if isinstance(pattern, lark.lexer.PatternStr) else token_type.lower()


def _describe_expected(expected: set[str]) -> str:
    def order(name: str) -> tuple[int, str]:  # "a name", "a comparison" first, then operators, then keywords
        return (0 if not name.startswith("'") else 2 if name[1:-1].isalpha() else 1), name

    names = sorted({_token_name(t) for t in expected}, key=order)
    if len(names) > 12:
        names = names[:12] + ["..."]
    return ", ".join(names)


def normalize_newlines(source: str) -> str:
    """Line breaks as the parser counts them: `\r\n` and a lone `\r` become `\n` (other characters that
    `str.splitlines` breaks at, such as form feeds, are whitespace within a line, as for the parser)."""
    return source.replace("\r\n", "\n").replace("\r", "\n")


def parse_source(source: str, filename: str = "<pattern>") -> ast.Module:
    """Parse .attn text into a syntax tree; raise PatternSyntaxError on any malformed input."""
    source = normalize_newlines(source)
    if len(source) > MAX_SOURCE_BYTES:
        raise PatternUsageError(f"the pattern text is {len(source)} characters long; at most {MAX_SOURCE_BYTES}",
                                filename=filename)
    parser = _parser()
    try:
        tree = parser.parse(source)
    except lark.UnexpectedInput as err:
        raise _syntax_error(err, source, filename) from None
    except RecursionError:  # Lark's own recursion: an input nested far beyond MAX_NESTING
        raise PatternSyntaxError(f"the text nests too deeply (at most {MAX_NESTING} levels)", None, source,
                                 filename) from None
    _check_nesting(tree, source, filename)
    try:
        return _ToAst(source, filename).transform(tree)
    except lark.exceptions.VisitError as err:
        if isinstance(err.orig_exc, PatternError):
            raise err.orig_exc from None
        raise


def _check_nesting(tree: lark.Tree, source: str, filename: str) -> None:
    """A located error for a syntax tree deeper than MAX_NESTING (500 chained `not`s), before any recursive pass
    over it."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise PatternSyntaxError(f"this expression nests more than {MAX_NESTING} levels deep",
                                     _span(node.meta), source, filename,
                                     hint="split it into lets, or write a long sum as a product")
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))


def _syntax_error(err: lark.UnexpectedInput, source: str, filename: str) -> PatternSyntaxError:
    line = getattr(err, "line", None) or 1
    column = getattr(err, "column", None) or 1
    if line < 1:  # Lark reports -1 at end of input
        lines = source.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    if isinstance(err, lark.UnexpectedCharacters):
        got = repr(source[err.pos_in_stream]) if err.pos_in_stream < len(source) else "end of file"
        message = f"unexpected character {got}"
    elif isinstance(err, lark.UnexpectedToken):
        got = "end of file" if err.token.type == "$END" else repr(str(err.token))
        # `accepts` (what the parser state really accepts) is exact where LALR's `expected` over-approximates.
        message = f"unexpected {got}; expected {_describe_expected(set(err.accepts or err.expected))}"
    else:  # UnexpectedEOF
        message = "unexpected end of file"
    hint = None
    if isinstance(err, lark.UnexpectedCharacters):
        char = source[err.pos_in_stream] if err.pos_in_stream < len(source) else ""
        return PatternSyntaxError(message, Span(line, column), source, filename, hint=_CHARACTER_HINTS.get(char))
    try:
        hint = err.match_examples(_parser().parse, _EXAMPLES, use_accepts=True)
    except Exception:  # labelling is best effort; the position and expected tokens are still exact
        hint = None
    return PatternSyntaxError(message, Span(line, column), source, filename, hint=hint)


@dataclass(frozen=True)
class Source:
    """Pattern text already read, with the name errors give it (the CLI's `--text`, `-` for stdin)."""

    text: str
    filename: str = "<pattern>"


def read_source(text_or_path: str | Path | Source) -> tuple[str, str]:
    """(source, filename) for a path to a .attn file (a `Path`, or a string that looks like one), pattern text
    (a string with `{` or a line break), or a `Source`."""
    if isinstance(text_or_path, Source):
        return normalize_newlines(text_or_path.text), text_or_path.filename
    if isinstance(text_or_path, Path):
        return read_file(text_or_path)
    text = str(text_or_path)
    if _names_a_file(text):
        return read_file(Path(text))
    return normalize_newlines(text), "<pattern>"


def _names_a_file(text: str) -> bool:
    if "{" in text or "\n" in text or "\r" in text:
        return False
    if text.endswith(".attn") or "/" in text or "\\" in text:
        return True  # read as a path, so that a mistyped one is "file not found", not a syntax error
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL byte: pattern text, not a path
        return False


def read_file(path: Path | str) -> tuple[str, str]:
    """(text, name) of a .attn file, `-` for stdin: at most MAX_SOURCE_BYTES of UTF-8, read as bytes (so pipes,
    /dev/stdin and /dev/zero end), every line break normalized."""
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_SOURCE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        raise PatternUsageError("file not found", filename=name) from None
    except OSError as err:  # a folder, no permission
        raise PatternUsageError(f"cannot read this file: {err.strerror or err}", filename=name) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise PatternUsageError(f"{name} is larger than {MAX_SOURCE_BYTES} bytes, the limit for a pattern file",
                                filename=name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise PatternUsageError(f"{name} is not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start} "
                                f"(line {line})", filename=name) from None
    return normalize_newlines(text.removeprefix("\ufeff")), name
