"""The Python API: parse a pattern, analyze it, load it as a module."""

from __future__ import annotations

from pathlib import Path

from . import ir
from .errors import PatternError, PatternUsageError
from .parse import parse_source, read_source
from .semantics import check_module, override_params


def parse_all(text_or_path: str | Path) -> dict[str, ir.Pattern]:
    """Every pattern in a .attn file (or text), by name, in file order."""
    source, filename = read_source(text_or_path)
    try:
        module = parse_source(source, filename)
        return {p.name: p for p in check_module(module)}
    except PatternError as err:
        raise err.with_source(source, filename) from None


def parse(text_or_path: str | Path, pattern: str | None = None, **params: int) -> ir.Pattern:
    """Parse a .attn file (or its text) into the IR, with parameter overrides (`parse(path, l=64)`).

    A file with several patterns needs `pattern=NAME`.
    """
    patterns = parse_all(text_or_path)
    if pattern is None:
        if len(patterns) > 1:
            raise PatternUsageError(f"this file defines {len(patterns)} patterns ({', '.join(patterns)}); "
                                    f"choose one with pattern=NAME (--pattern NAME on the command line)")
        chosen = next(iter(patterns.values()))
    elif pattern in patterns:
        chosen = patterns[pattern]
    else:
        raise PatternUsageError(f"no pattern named `{pattern}`; this file defines {', '.join(patterns)}")
    return override_params(chosen, params)
