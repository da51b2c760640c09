"""The `patterncc` command: check, show, compile.

User errors (bad patterns, bad options) print a located message with no traceback and exit with status 2.
Each subcommand's work lives in its stage's modules; this file parses options, calls them and prints. Stages load
on demand (`--help` and `--version` import neither torch nor the compiler).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

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


# AOT targets: those the kernels' config chains are tested for (tests compile every example for both with the
# ptxas of the Triton wheel). Others (sm_75 has no bf16 and no cp.async) would try configs for many minutes.
TARGETS = ("sm_80", "sm_90")
MAX_COMPILE_N = 65536  # `compile --n`: the report's tile counts are computed for every tile pair


def _add_pattern_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("file", nargs="*" if several else "?",
                   help=f"{'.attn files' if several else 'a .attn file'} (`-` reads standard input)")
    p.add_argument("--text", metavar="TEXT", help="the pattern text itself, instead of a file")
    p.add_argument("-D", dest="defines", action="append", metavar="NAME=VALUE",
                   help="override a parameter's default (repeatable)")
    p.add_argument("--pattern", help="which pattern, when the file defines several (default: all for check)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patterncc", description="A compiler for attention connectivity patterns.")
    parser.add_argument("--version", action="version", version=f"patterncc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="check a pattern and print its analysis")
    _add_pattern_args(check, several=True)
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
    comp.add_argument("--dump-passes", metavar="DIR",
                      help="write each compiler pass's output (parse, plan, render, verify) to DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PatternWarning)
            warnings.showwarning = _show_warning
            args.params = parse_defines(args.defines)
            args.sources = _sources(args)
            if args.command == "check":
                return run_check(args)
            if args.command == "show":
                return run_show(args)
            return run_compile(args)
    except PatternError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _sources(args) -> list:
    """The pattern texts a command reads: FILE arguments are paths (`-` is standard input), never pattern text,
    which comes only through --text."""
    from .parse import Source, read_file

    files = args.file if isinstance(args.file, list) else [args.file] if args.file is not None else []
    if args.text is not None and files:
        raise PatternUsageError("give either FILE or --text, not both")
    if args.text is not None:
        return [Source(args.text, "<text>")]
    if not files:
        raise PatternUsageError(f"`{args.command}` needs a .attn file", hint="or `-` for standard input, or "
                                                                             "--text 'pattern p() { ... }'")
    if files.count("-") > 1:
        raise PatternUsageError("standard input (`-`) can be read only once")
    return [Source(*read_file(f)) for f in files]


def run_check(args) -> int:
    """`check`: analyze every pattern of the files (or --pattern) and print the facts, or JSON with --json
    (schema: docs/check-json.md). Each pattern with set heads is also compiled for n, to report what its
    generated module's block-sparse kernels compute."""
    from rich.console import Console

    from .analysis.analyze import MAX_N, analyze, with_module_layout
    from .analysis.report import JSON_SCHEMA_VERSION, print_analysis, select_patterns

    if args.n > MAX_N:  # before reading anything: the same limit `analyze` applies
        raise PatternUsageError(f"check takes --n up to {MAX_N}, got {args.n}")
    patterns = [p for source in args.sources for p in select_patterns(source, args.pattern, args.params or {})]

    def module_layout(pattern):
        """(module_layout_stats at n, None), or (None, why not). Lowering refuses some patterns the analysis
        takes (a block size over n-dependent parameters, say): that is a note here, never a failed check."""
        if not any(group.family == "set" for group in pattern.heads):
            return {}, None
        from .driver import compile_pattern
        from .report import module_layout_stats

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lowering's own warnings are `compile`'s to print
                compiled = compile_pattern(pattern, layer=args.layer, n=args.n)
                return module_layout_stats(compiled, args.n), None
        except PatternError as err:
            reason = f"lowering refused the pattern: {err.message}"
        except Exception as err:  # a bug in lowering or in the module must not hide the analysis above it
            reason = f"building it failed: {type(err).__name__}: {err}"
        return None, f"the generated module's layout is not reported ({reason})"

    with _progress() as progress:
        analyses = [with_module_layout(analyze(p, args.n, layer=args.layer, max_steps=args.max_steps,
                                               progress=progress), *module_layout(p))
                    for p in patterns]
    if args.json:
        document = {"schema_version": JSON_SCHEMA_VERSION, "patterns": [a.to_json() for a in analyses]}
        print(json.dumps(document, indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 150, highlight=False)
    for index, analysis in enumerate(analyses):
        if index:
            console.print()
        print_analysis(console, analysis)
    return 0


def run_show(args) -> int:
    """`show`: parse, draw, say where the picture went."""
    from .api import parse
    from .show import render

    pattern = parse(args.sources[0], pattern=args.pattern, **args.params)
    path = render(pattern, args.n, args.output, grid=args.grid, query=args.query, layer=args.layer)
    print(f"wrote {path}")
    return 0


def check_file_names(patterns, names, layer: int) -> None:
    """Two patterns whose modules would be written to one file (names compared without case, as on macOS and
    Windows file systems: `foo`, `Foo` and `FOO` all give foo.py) are an error, not a silent overwrite."""
    from .driver import module_name

    seen: dict[str, str] = {}
    for name in names:
        stem = module_name(name, layer, patterns[name].combine).casefold()
        if stem in seen:
            raise PatternUsageError(f"patterns `{seen[stem]}` and `{name}` would both be written to {stem}.py "
                                    f"(file names are compared without case); rename one, or compile one at a "
                                    f"time with --pattern NAME")
        seen[stem] = name


def run_compile(args) -> int:
    """`compile`: generate each pattern's module; write it (-o), print it (--emit), compile it ahead of time
    (--target, --asm), dump every pass (--dump-passes)."""
    from rich.console import Console

    from .api import parse, parse_all
    from .cache import write_atomically
    from .driver import compile_pattern
    from .report import compile_report

    console = Console()
    if args.target is not None:
        args.target = _check_target(args.target)
    if args.n is not None and args.n > MAX_COMPILE_N:
        raise PatternUsageError(f"compile takes --n up to {MAX_COMPILE_N}, got {args.n}",
                                hint="the module itself runs any n; --n only sets the report's tile counts")
    source = args.sources[0]
    patterns = parse_all(source)
    names = [args.pattern] if args.pattern else list(patterns)
    if args.pattern and args.pattern not in patterns:
        raise PatternUsageError(f"no pattern named `{args.pattern}`; this file defines {', '.join(patterns)}")
    if args.output:
        check_file_names(patterns, names, args.layer)
    for name in names:
        pattern = parse(source, pattern=name, **args.params)
        compiled = compile_pattern(pattern, layer=args.layer, n=args.n, params=args.params, dump=args.dump_passes)
        if args.emit:
            print(compiled.source)
        if args.output:
            path = Path(args.output) / f"{compiled.module_name}.py"
            write_atomically(path, compiled.source)
            report = Path(args.output) / f"{compiled.module_name}.report.txt"
            write_atomically(report, compile_report(compiled, args.n or 4096))
            console.print(f"wrote {path} (class {compiled.class_name}) and {report.name}", highlight=False)
        if args.target:
            _compile_ahead_of_time(console, name, compiled, args.target, args.asm)
        if args.dump_passes:
            console.print(f"{name}: wrote each pass's output to {args.dump_passes}", highlight=False)
        if not (args.emit or args.output or args.target or args.dump_passes):
            console.print(f"{name}: compiled {compiled.class_name} ({len(compiled.source.splitlines())} lines); "
                          f"use -o DIR to write it, --emit to print it", highlight=False)
    return 0


def _compile_ahead_of_time(console, name: str, compiled, target: str, asm: bool) -> None:
    from rich.table import Table

    from .aot import aot_compile, parse_target
    from .cache import import_file

    capability = parse_target(target)
    module_path = Path(tempfile.mkdtemp(prefix="patterncc-aot-")) / f"{compiled.module_name}.py"
    module_path.write_text(compiled.source)
    module = import_file(module_path, f"patterncc_aot_{compiled.module_name}_{compiled.key}")
    # A status line on a terminal; elsewhere (logs, CI) one line up front, since this takes minutes.
    if not console.is_terminal:
        print(f"{name}: compiling every kernel for sm_{capability} (fp16/bf16/fp32, head_dim 16-128); this takes "
              f"a few minutes", file=sys.stderr, flush=True)
    with console.status(f"compiling {name} for sm_{capability} (fp16/bf16/fp32, head_dim 16-128; a few "
                        f"minutes)..."):
        reports = aot_compile(module, capability)
    if asm:
        table = Table(title=f"{name}: sm_{capability} (ptxas -v)")
        for column in ("kernel", "dtype", "head_dim", "tile (M, N), warps, stages", "registers", "spill stores",
                       "spill loads", "shared bytes"):
            table.add_column(column, justify="right" if column != "kernel" else "left")
        for r in reports:
            tile = f"{r.config[0]}x{r.config[1]}, {r.config[2]}, {r.config[3]}"
            if r.configs_tried > 1:
                tile += f" (fallback {r.configs_tried - 1})"
            table.add_row(r.kernel, r.dtype, str(r.head_dim), tile, str(r.registers), str(r.spill_stores),
                          str(r.spill_loads), str(r.shared_bytes))
        console.print(table)
    spilled = [r for r in reports if r.spill_stores or r.spill_loads]
    console.print(f"{name}: {len(reports)} kernels compiled for sm_{capability}, {len(spilled)} with spills",
                  highlight=False)


def _check_target(target: str) -> str:
    """`sm_90` (also `sm90`, `90`) for a target patterncc supports; a usage error naming them otherwise."""
    text = target.strip().lower().removeprefix("sm").removeprefix("_")
    normal = f"sm_{text}"
    if normal not in TARGETS:
        raise PatternUsageError(f"unsupported target {target!r}; expected one of {', '.join(TARGETS)}",
                                hint="the kernels' configs are tested for these GPUs only")
    return normal


class _progress:
    """A transient rich progress bar on stderr (shown on a terminal only) for analyses of many heads; entering
    it gives the callback `analyze` takes."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.task = None
        self.bar.start()
        return self.update

    def update(self, what: str, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task(what, total=total)
        self.bar.update(self.task, description=what, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
