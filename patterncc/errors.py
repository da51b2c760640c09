"""The one error type users see, with file, line, column and the offending source line under a caret."""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A place in a source text: 1-based line and column, as editors count them."""

    line: int
    column: int
    end_column: int | None = None


class PatternError(Exception):
    """Anything wrong with a pattern or how it is used. The CLI prints it without a traceback and exits 2."""

    kind = "error"

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        source: str | None = None,
        filename: str | None = None,
        hint: str | None = None,
    ):
        self.message = message
        self.span = span
        self.source = source
        self.filename = filename or "<pattern>"
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = self.filename
        if self.span is not None:
            where += f":{self.span.line}:{self.span.column}"
        lines = [f"{where}: {self.kind}: {self.message}"]
        if self.span is not None and self.source is not None:
            # Lines as the parser counts them (only `\n` breaks one; `splitlines` also breaks at form feeds and
            # more), each control character shown as one space so that the caret stays under its column.
            src_lines = self.source.split("\n")
            if 1 <= self.span.line <= len(src_lines):
                text = "".join(" " if ord(c) < 32 or 0x7f <= ord(c) < 0xa0 or c in "\u2028\u2029" else c
                               for c in src_lines[self.span.line - 1])
                width = 1
                if self.span.end_column is not None and self.span.end_column > self.span.column:
                    width = self.span.end_column - self.span.column
                lines.append(f"    {text}")
                lines.append("    " + " " * (self.span.column - 1) + "^" * width)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def with_source(self, source: str, filename: str | None) -> PatternError:
        """The same error, located in `source` (used when the error was raised before the text was known)."""
        if self.source is None:
            self.source = source
        if filename and self.filename == "<pattern>":
            self.filename = filename
        self.args = (self.render(),)
        return self


class PatternSyntaxError(PatternError):
    kind = "syntax error"


class PatternSemanticError(PatternError):
    kind = "error"


class PatternUsageError(PatternError):
    """Bad use of a valid pattern: an unknown -D parameter, tensors of the wrong shape, an impossible n."""

    kind = "error"


class PatternWarning(UserWarning):
    """A pattern that compiles but probably does not say what its author meant (e.g. a head with empty rows)."""


def check_positive_int(value, what: str) -> None:
    """A PatternUsageError unless `value` is an int >= 1 (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PatternUsageError(f"{what} must be a positive integer, got {value!r}")


def warn(message: str) -> None:
    warnings.warn(message, PatternWarning, stacklevel=3)
