"""The `patterncc` command: check, show, compile.

User errors (bad patterns, bad options) print a located message with no traceback and exit with status 2.
Each subcommand's work lives in its stage's module; this file only parses options and reports errors.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from . import __version__
from .errors import PatternError, PatternUsageError, PatternWarning

EXIT_USER_ERROR = 2


def parse_defines(defines: Sequence[str] | None) -> dict[str, int]:
    """`-D l=64 -D c=8` -> {"l": 64, "c": 8}, with errors that say what was wrong."""
    out: dict[str, int] = {}
    for item in defines or ():
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name:
            raise PatternUsageError(f"-D expects NAME=INTEGER, got {item!r}", hint="e.g. -D l=64")
        if not name.isidentifier():
            raise PatternUsageError(f"-D {item!r}: {name!r} is not a parameter name")
        try:
            out[name] = int(value, 0)
        except ValueError:
            raise PatternUsageError(f"-D {item!r}: {value!r} is not an integer", hint=f"e.g. -D {name}=64") from None
    return out


def positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_pattern_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .attn file")
    p.add_argument("-D", dest="defines", action="append", metavar="NAME=VALUE",
                   help="override a parameter's default (repeatable)")
    p.add_argument("--pattern", help="which pattern, when the file defines several (default: all for check)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patterncc", description="A compiler for attention connectivity patterns.")
    parser.add_argument("--version", action="version", version=f"patterncc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="check a pattern and print its analysis")
    _add_pattern_args(check)
    check.add_argument("--n", type=positive_int, required=True, help="sequence length")
    check.add_argument("--json", action="store_true", help="print the analysis as JSON")
    check.add_argument("--max-steps", type=positive_int, default=8,
                       help="longest attention path tried for coverage (default 8)")
    check.add_argument("--layer", type=int, default=0, help="layer index, for `combine interleaved`")

    show = sub.add_parser("show", help="draw the connectivity of a pattern as a PNG")
    _add_pattern_args(show)
    show.add_argument("--n", type=positive_int, required=True, help="sequence length")
    show.add_argument("-o", "--output", required=True, help="output PNG path")
    show.add_argument("--grid", type=positive_int, metavar="R",
                      help="also show, for one query, the cells of an R-wide 2-D image it sees")
    show.add_argument("--query", type=int, help="the query position for --grid (default: the middle one)")
    show.add_argument("--layer", type=int, default=0, help="layer index, for `combine interleaved`")

    comp = sub.add_parser("compile", help="generate Triton kernels and a torch module")
    _add_pattern_args(comp)
    comp.add_argument("-o", "--output", help="output folder (default: print nothing but the report)")
    comp.add_argument("--emit", action="store_true", help="print the generated source")
    comp.add_argument("--target", help="compile ahead of time for a GPU, e.g. sm_90 or sm_80 (needs no GPU)")
    comp.add_argument("--asm", action="store_true", help="with --target: print registers, spills, shared memory")
    comp.add_argument("--n", type=positive_int, help="bake index lists for this sequence length")
    comp.add_argument("--layer", type=int, default=0, help="layer index, for `combine interleaved`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PatternWarning)
            warnings.showwarning = _show_warning
            args.params = parse_defines(args.defines)
            if args.command == "check":
                from .analysis.report import run_check

                return run_check(args)
            if args.command == "show":
                from .show import run_show

                return run_show(args)
            from .compiler import run_compile

            return run_compile(args)
    except PatternError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
