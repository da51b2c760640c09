"""Stage 5: the driver. A list of named passes, run in order, each a function of the previous pass's output:

    parse   source text or path -> ir.Pattern   (api.parse: grammar, AST, semantic checks; an IR passes through)
    plan    ir.Pattern -> lower.KernelPlan      (masks, permutations, runtime parameters, int32 or int64)
    render  KernelPlan -> str                   (the generated module, from the Jinja templates)
    verify  str -> str                          (verify.verify_module: parses, no duplicate or undefined names)

Dumping: `patterncc compile FILE --dump-passes DIR`, or the environment variable `PATTERNCC_DUMP_PASSES=DIR` for
any compilation (`patterncc.load`, `compile_pattern`), writes each pass's output to
`DIR/<module>.<k>-<pass>.<ext>`: the IR re-printed as `.attn` text, the plan, the rendered module and the
verified one. With the variable set, `load` runs the passes even when its cache already holds the module.

`identity_key` is the one name of a compiled pattern: a hash of the IR and of every option that changes the
generated module. The cache files modules under it (`patterncc.cache`), and `Compiled.key` carries it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pprint
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, ir
from .resources import _PACKAGE_DIR, resource_dir

if TYPE_CHECKING:
    from .lower import KernelPlan

DUMP_ENV = "PATTERNCC_DUMP_PASSES"


@dataclass(frozen=True)
class Options:
    """What a compilation takes besides the pattern. All but `pattern` (which the IR identifies) change the
    output, so all but it are part of the identity key."""

    layer: int = 0
    n: int | None = None  # sequence length the plan is tuned for (default: lower.REFERENCE_N)
    params: tuple[tuple[str, int], ...] = ()  # parameter overrides, sorted by name
    pattern: str | None = None  # which pattern of a file (the parse pass only)

    @classmethod
    def make(cls, layer: int = 0, n: int | None = None, params: Mapping[str, int] | None = None,
             pattern: str | None = None) -> Options:
        return cls(layer, n, tuple(sorted((params or {}).items())), pattern)


def _parse(source: Any, options: Options) -> ir.Pattern:
    if isinstance(source, ir.Pattern):
        return source  # parsed by the caller, overrides applied
    from .api import parse

    return parse(source, options.pattern, **dict(options.params))


def _plan(pattern: ir.Pattern, options: Options) -> KernelPlan:
    from .lower import plan

    return plan(pattern, layer=options.layer, n=options.n, params=dict(options.params))


def _render(kernel_plan: KernelPlan, options: Options) -> str:
    from .lower import render

    return render(kernel_plan, identity_key(kernel_plan.pattern, options))


def _verify(source: str, options: Options) -> str:
    from .verify import verify_module

    verify_module(source, filename="<generated module>")
    return source


Pass = Callable[[Any, Options], Any]
PASSES: list[tuple[str, Pass]] = [("parse", _parse), ("plan", _plan), ("render", _render), ("verify", _verify)]


@dataclass(frozen=True)
class Compiled:
    pattern: ir.Pattern
    source: str  # the generated module
    module_name: str  # file stem, e.g. "strided"
    class_name: str
    key: str  # identity_key of the pattern and options
    plan: KernelPlan


def run_passes(source: Any, options: Options, dump: str | Path | None = None) -> dict[str, Any]:
    """Every pass in order; returns each one's output by pass name, and writes them under `dump` if given."""
    outputs: dict[str, Any] = {}
    value = source
    for index, (name, run) in enumerate(PASSES, start=1):
        value = run(value, options)
        outputs[name] = value
        if dump:
            stem = module_name(outputs["parse"].name, options.layer, outputs["parse"].combine)
            _dump(Path(dump), f"{stem}.{index}-{name}", value)
    return outputs


def _dump(folder: Path, stem: str, value: Any) -> None:
    if isinstance(value, ir.Pattern):
        from .format import format_pattern

        suffix, text = ".attn", format_pattern(value)
    elif isinstance(value, str):
        suffix, text = ".py", value
    else:
        suffix, text = ".txt", pprint.pformat(value, width=118, sort_dicts=False) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}{suffix}").write_text(text, encoding="utf-8")


def compile_pattern(pattern: ir.Pattern | str | Path, layer: int = 0, n: int | None = None,
                    params: Mapping[str, int] | None = None, *, dump: str | Path | None = None) -> Compiled:
    """Run every pass on a pattern (IR, or a file or text with one pattern). `dump` (default: the environment
    variable PATTERNCC_DUMP_PASSES) names a folder for each pass's output."""
    options = Options.make(layer, n, params)
    outputs = run_passes(pattern, options, dump or os.environ.get(DUMP_ENV) or None)
    parsed, kernel_plan = outputs["parse"], outputs["plan"]
    return Compiled(parsed, outputs["verify"], module_name(parsed.name, layer, parsed.combine),
                    kernel_plan.class_name, identity_key(parsed, options), kernel_plan)


def module_name(name: str, layer: int, combine: str) -> str:
    """The generated file's stem: the pattern's name, plus the layer for `combine interleaved`."""
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", name).lower()
    return f"{stem}_layer{layer}" if combine == "interleaved" else stem


def identity_key(pattern: ir.Pattern, options: Options) -> str:
    """The identity of a compiled pattern (tinygrad's program key): a hash of the IR (comments and formatting of
    the file do not count; its name does, as the module prints it) and of everything else that changes the
    generated module: parameter overrides, layer, n, the patterncc, torch and triton versions, and the
    generator's own files."""
    text = repr((pattern, str(pattern.filename), options.params, options.layer, options.n, versions(),
                 generator_fingerprint()))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@functools.cache
def generator_fingerprint() -> str:
    """A hash of the templates and every source file of the package, so that an edited checkout never reuses a
    stale cached module under an unchanged version number (generated modules embed runtime and family code)."""
    h = hashlib.sha256()
    templates = resource_dir("templates")
    files = [(path.relative_to(templates), path) for path in sorted(templates.glob("*.jinja"))]
    files += [(path.relative_to(_PACKAGE_DIR), path) for path in sorted(_PACKAGE_DIR.rglob("*.py"))
              if "__pycache__" not in path.parts]
    for name, path in files:
        h.update(str(name).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def versions() -> str:
    """The versions a generated module depends on (imports torch, and triton when installed)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"patterncc {__version__}, torch {torch.__version__}, triton {triton_version}"
