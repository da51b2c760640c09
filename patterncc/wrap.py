"""Line wrapping for emitted code and comments, so generated files keep lines within 120 characters.

Emitted expressions come out of patterncc.emit on one line; they are always placed inside brackets in the
templates (a call's argument list, or parentheses the emitter wrote), so a break at any bracket depth above zero
is legal Python. Breaks go before a binary operator or after a comma, at the outermost depth that needs one.
"""

from __future__ import annotations

import io
import textwrap
import tokenize

WIDTH = 120
_BREAK_BEFORE = {"&", "|", "and", "or", "+", "-", "<=", ">=", "<", ">", "==", "!="}


def wrap_code(text: str, column: int, indent: int, width: int = WIDTH) -> str:
    """`text` starting at `column` of a line indented by `indent`: continuation lines are indented by
    indent + 4. Text that fits is returned unchanged."""
    if column + len(text) <= width:
        return text
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT)]
    # Pieces: (text, depth at its start, whether a line may break before it).
    pieces: list[tuple[str, bool]] = []
    depth = 0
    previous_end = 0
    offsets = _offsets(text)
    for index, tok in enumerate(tokens):
        start = offsets[tok.start[0] - 1] + tok.start[1]
        end = offsets[tok.end[0] - 1] + tok.end[1]
        gap = text[previous_end:start]
        breakable = depth > 0 and (tok.string in _BREAK_BEFORE and tok.type == tokenize.OP or tok.string in (
            "and", "or")) or (depth > 0 and index > 0 and tokens[index - 1].string == ",")
        pieces.append((gap + tok.string, breakable))
        if tok.string in "([{":
            depth += 1
        elif tok.string in ")]}":
            depth -= 1
        previous_end = end
    # Segments run from one break point to the next; a segment that would pass the width starts a new line.
    segments: list[str] = []
    for piece, breakable in pieces:
        if breakable or not segments:
            segments.append(piece)
        else:
            segments[-1] += piece
    lines, line = [], ""
    position = column
    continuation = " " * (indent + 4)
    for segment in segments:
        if line.strip() and position + len(segment.rstrip()) > width:
            lines.append(line.rstrip())
            line = continuation + segment.lstrip()
            position = len(line)
        else:
            line += segment
            position += len(segment)
    lines.append(line)
    return "\n".join(lines)


def _offsets(text: str) -> list[int]:
    offsets, total = [], 0
    for line in text.splitlines(keepends=True) or [""]:
        offsets.append(total)
        total += len(line)
    return offsets


def wrap_comment(text: str, column: int, indent: int, width: int = WIDTH) -> str:
    """A comment's text starting at `column`: continuation lines are `#` comments indented by `indent`, their
    text aligned 4 spaces further."""
    if column + len(text) <= width:
        return text
    first_width = max(20, width - column)
    rest = textwrap.wrap(text, width=first_width, break_long_words=False, break_on_hyphens=False)
    head, tail = rest[0], " ".join(rest[1:])
    prefix = " " * indent + "#     "
    more = textwrap.wrap(tail, width=max(20, width - len(prefix)), break_long_words=False, break_on_hyphens=False)
    return "\n".join([head] + [prefix + line for line in more])
