"""Stage 5: the driver. Named passes in order, then the two ways a pattern ships: `patterncc compile -o` (a
standalone module file) and `patterncc.load()` (an nn.Module from a cache of generated files)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import __version__, ir
from .api import parse, parse_all
from .errors import PatternUsageError
from .lower import KernelPlan, plan, render
from .resources import resource_dir


@dataclass(frozen=True)
class Compiled:
    pattern: ir.Pattern
    source: str  # the generated module
    module_name: str  # file stem, e.g. "strided"
    class_name: str
    key: str
    plan: KernelPlan


def compile_pattern(pattern: ir.Pattern, layer: int = 0, n: int | None = None,
                    params: dict | None = None) -> Compiled:
    """Every pass, in order."""
    # 1. parse + semantic checks: done by `parse` (source -> AST -> IR), which gave us `pattern`.
    # 2. bind and plan: distinct masks, permutations, runtime parameters (lower.plan).
    kernel_plan = plan(pattern, layer=layer, n=n, params=params)
    # 3. render the Jinja templates into one module (lower.render).
    source = render(kernel_plan)
    # 4. make sure what we wrote is valid Python before anyone imports it.
    compile(source, f"<generated {pattern.name}>", "exec")
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    return Compiled(pattern, source, _module_name(pattern.name, layer, pattern.combine), kernel_plan.class_name,
                    key, kernel_plan)


def _module_name(name: str, layer: int, combine: str) -> str:
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", name).lower()
    return f"{stem}_layer{layer}" if combine == "interleaved" else stem


@functools.cache
def _generator_fingerprint() -> str:
    """A hash of everything besides the pattern that shapes generated code: the templates, the runtime files
    embedded in generated modules and the code that emits them (so an edited checkout never reuses a stale
    cached module under an unchanged version number)."""
    h = hashlib.sha256()
    package = Path(__file__).resolve().parent
    files = sorted(resource_dir("templates").glob("*.jinja"))
    files += [package / "runtime" / "tiles.py", package / "runtime" / "random_blocks.py", package / "lower.py",
              package / "emit.py", package / "embed.py"]
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _versions() -> str:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"patterncc {__version__}, torch {torch.__version__}, triton {triton_version}"


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    root = os.environ.get("PATTERNCC_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "patterncc"


def import_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton's jit inspects the defining module
    spec.loader.exec_module(module)
    return module


def load_module(text_or_path, pattern: str | None = None, layer: int = 0, **params):
    """Compile (or take from the cache) and import the generated module; returns the Python module."""
    ir_pattern = parse(text_or_path, pattern=pattern, **params)
    # The cache key covers everything that changes the output: the pattern text, parameters, layer, the
    # versions of patterncc, torch and triton, and the generator's own files (tinygrad's program key).
    key_text = repr((ir_pattern.source, ir_pattern.name, sorted(params.items()), layer, _versions(),
                     _generator_fingerprint()))
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    stem = _module_name(ir_pattern.name, layer, ir_pattern.combine)
    path = cache_dir() / key / f"{stem}.py"
    if not path.exists():
        compiled = compile_pattern(ir_pattern, layer=layer, params=params)
        write_atomically(path, compiled.source)
    return import_file(path, f"patterncc_generated_{stem}_{key}")


def load(text_or_path, pattern: str | None = None, layer: int = 0, scale: float | None = None,
         backend: str = "auto", head_dim: int | None = None, **params):
    """A `.attn` pattern as a torch.nn.Module: `patterncc.load("fixed.attn", l=64)(q, k, v)`.

    q: (batch, heads, n, head_dim); k, v: (batch, kv_heads, n, head_dim) with kv_heads dividing heads; heads a
    multiple of the pattern's head count. `layer` picks the head group for `combine interleaved` patterns;
    `scale` defaults to 1/sqrt(head_dim); `backend` is "auto" (Triton on CUDA, block-sparse torch on CPU),
    "triton" or "torch". `head_dim` draws the random buffers of hashed and FAVOR+ heads at once (otherwise at the
    first call). Compiled modules are cached (PATTERNCC_CACHE_DIR, default ~/.cache/patterncc).
    """
    module = load_module(text_or_path, pattern=pattern, layer=layer, **params)
    cls = next(getattr(module, name) for name in dir(module)
               if isinstance(getattr(module, name), type) and getattr(getattr(module, name), "__module__", "") ==
               module.__name__ and hasattr(getattr(module, name), "num_heads"))
    return cls(scale=scale, backend=backend, head_dim=head_dim)


def compile_report(compiled: Compiled, n: int) -> str:
    """What was generated, for the file written beside the module: heads, masks with their math, visiting
    orders, runtime parameters, and the tile layout at sequence length n."""
    from .analysis.layout import pattern_layouts

    kernel_plan = compiled.plan
    bound = compiled.pattern.bind(n)
    layouts = pattern_layouts(bound, layer=kernel_plan.layer)
    lines = [f"patterncc compile report: {compiled.pattern.filename} -> {compiled.module_name}.py "
             f"(class {compiled.class_name})", f"generated by {_versions()}", "",
             f"attention heads: {kernel_plan.num_heads} ({compiled.pattern.combine}); block {kernel_plan.block}; "
             f"{'causal' if kernel_plan.causal else 'bidirectional'}", ""]
    for mask in kernel_plan.masks:
        heads = [kernel_plan.set_heads[s] for s, m in enumerate(kernel_plan.head_masks) if m == mask.index]
        counts = layouts[heads[0]].counts()
        total = sum(counts.values())
        lines.append(f"mask {mask.index} ({' | '.join(mask.heads)}), heads {heads}")
        lines.append(f"  allows: {mask.math}")
        lines.append(f"  order:  {mask.period_formula + ' (where it halves the tiles)' if mask.period else 'natural'}")
        lines.append(f"  tiles at n={n} (natural order): {counts['full']} full, {counts['partial']} partial, "
                     f"{counts['empty']} empty of {total} ({(counts['full'] + counts['partial']) / total:.2%} "
                     f"computed)")
    for call in kernel_plan.hashed_calls:
        lines.append(f"hashed ({call.group}), heads {list(call.heads)}: Reformer LSH attention, {call.buckets} "
                     f"buckets, {call.rounds} rounds, chunk {call.chunk}, "
                     f"{'shared' if call.shared_qk else 'separate'} query/key hashing; buffer {call.name}")
        lines.append(f"  expected keys per query: {call.rounds} rounds x 2 chunks of {call.chunk} = "
                     f"{2 * call.rounds * call.chunk} at most (pairs depend on the data)")
    for call in kernel_plan.kernel_calls:
        features = f", {call.features} features (buffer {call.name})" if call.feature_map == "favor" else ""
        lines.append(f"kernel ({call.group}), heads {list(call.heads)}: linear attention, phi = "
                     f"{call.feature_map}{features}, eps = {call.eps!r}; O(n d^2) work, never n x n")
    if kernel_plan.runtime_params:
        lines += ["", "runtime parameters (kernel arguments, recomputed per n; never a recompile):"]
        lines += [f"  {name} = {source}" for name, source in kernel_plan.runtime_params]
    lines += ["", f"arithmetic in kernels: {'int64' if kernel_plan.int64 else 'int32'}"]
    return "\n".join(lines) + "\n"


# Ahead-of-time compilation for a GPU target, without a GPU ------------------------------------------------------


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    dtype: str
    head_dim: int
    target: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    config: tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
    configs_tried: int  # 1 when the default did not spill


def parse_target(target: str) -> int:
    match = re.fullmatch(r"(?:sm_?|cuda:?)?(\d{2,3})a?", target.strip().lower())
    if not match:
        raise PatternUsageError(f"unknown target {target!r}; expected e.g. sm_90 or sm_80")
    return int(match.group(1))


def aot_compile(module, capability: int, dtypes=("fp16", "bf16", "fp32"),
                head_dims=(16, 32, 64, 128), specs=None) -> list[KernelReport]:
    """Compile every kernel of a generated module to PTX and cubin for `capability`, and read ptxas's report.
    `specs(dtype, head_dim)` lists the kernels (default: the module's `aot_specs`; a family's own, e.g.
    `module.linear_aot_specs`, covers variants the pattern does not use)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    reports = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for name, kernel, signature, configs in (specs or module.aot_specs)(dtype, head_dim):
                # As the module does on a GPU: the first config of the chain that does not spill.
                for tried, (constexprs, options) in enumerate(configs, start=1):
                    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                    compiled = triton.compile(source, target=target, options=options)
                    stats = ptxas_stats(compiled.asm["ptx"], capability)
                    if not (stats["spill_stores"] or stats["spill_loads"]):
                        break
                config = (constexprs["BLOCK_M"], constexprs["BLOCK_N"], options["num_warps"], options["num_stages"])
                reports.append(KernelReport(name, dtype, head_dim, f"sm_{capability}", stats["registers"],
                                            stats["spill_stores"], stats["spill_loads"], compiled.metadata.shared,
                                            config, tried))
    return reports


def _ptxas() -> str:
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (folder / name).exists():
            return str(folder / name)
    raise PatternUsageError("no ptxas found in the triton wheel")


def ptxas_stats(ptx: str, capability: int) -> dict[str, int]:
    """Registers and spills of the (single) kernel in `ptx`, from `ptxas -v`."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        result = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", str(ptx_path), "-o",
                                 str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr.strip()}")
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(registers=int(registers.group(1)) if registers else -1,
                spill_stores=int(spills.group(1)) if spills else 0, spill_loads=int(spills.group(2)) if spills else 0)


# The CLI's `compile` -------------------------------------------------------------------------------------------


def run_compile(args) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    patterns = parse_all(args.file)
    names = [args.pattern] if args.pattern else list(patterns)
    if args.pattern and args.pattern not in patterns:
        raise PatternUsageError(f"no pattern named `{args.pattern}`; this file defines {', '.join(patterns)}")
    for name in names:
        pattern = parse(args.file, pattern=name, **args.params)
        compiled = compile_pattern(pattern, layer=args.layer, n=args.n, params=args.params)
        if args.emit:
            print(compiled.source)
        if args.output:
            path = Path(args.output) / f"{compiled.module_name}.py"
            write_atomically(path, compiled.source)
            report = Path(args.output) / f"{compiled.module_name}.report.txt"
            write_atomically(report, compile_report(compiled, args.n or 4096))
            console.print(f"wrote {path} (class {compiled.class_name}) and {report.name}", highlight=False)
        if args.target:
            capability = parse_target(args.target)
            module_path = Path(tempfile.mkdtemp(prefix="patterncc-aot-")) / f"{compiled.module_name}.py"
            module_path.write_text(compiled.source)
            module = import_file(module_path, f"patterncc_aot_{compiled.module_name}_{compiled.key}")
            with console.status(f"compiling {name} for sm_{capability}..."):
                reports = aot_compile(module, capability)
            if args.asm:
                table = Table(title=f"{name}: sm_{capability} (ptxas -v)")
                for column in ("kernel", "dtype", "head_dim", "tile (M, N), warps, stages", "registers",
                               "spill stores", "spill loads", "shared bytes"):
                    table.add_column(column, justify="right" if column != "kernel" else "left")
                for r in reports:
                    tile = f"{r.config[0]}x{r.config[1]}, {r.config[2]}, {r.config[3]}"
                    if r.configs_tried > 1:
                        tile += f" (fallback {r.configs_tried - 1})"
                    table.add_row(r.kernel, r.dtype, str(r.head_dim), tile, str(r.registers), str(r.spill_stores),
                                  str(r.spill_loads), str(r.shared_bytes))
                console.print(table)
            spilled = [r for r in reports if r.spill_stores or r.spill_loads]
            console.print(f"{name}: {len(reports)} kernels compiled for sm_{capability}, "
                          f"{len(spilled)} with spills", highlight=False)
        if not (args.emit or args.output or args.target):
            console.print(f"{name}: compiled {compiled.class_name} ({len(compiled.source.splitlines())} lines); "
                          f"use -o DIR to write it, --emit to print it", highlight=False)
    return 0
