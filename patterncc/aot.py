"""Ahead-of-time compilation of a generated module's kernels for a GPU target, without a GPU: the real Triton
compiler to PTX, then `ptxas -v` from the triton wheel for registers, spills and shared memory."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PatternUsageError


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


def module_aot_specs(module, dropout=False):
    """specs(dtype, head_dim) of a generated module: every kernel it runs (its own kernel objects, which carry its
    pattern's hook), with the families' signatures and config chains (dropout: the set heads' dropout variant).
    Ahead-of-time compilation is a build-time
    concern, so generated modules carry none of it; the families' spec functions live in patterncc/families."""
    from .families.blocksparse.ops import blocksparse_aot_specs
    from .families.linear.ops import linear_aot_specs
    from .families.lsh.ops import lsh_aot_specs

    def own(*names):
        return {name.removesuffix("_kernel").replace("_bwd_", "_"): getattr(module, name) for name in names}

    families = set(module.HEAD_FAMILIES)
    hashed = sorted({(call.rounds, call.shared_qk) for call in getattr(module, "HASHED_CALLS", [])})
    kernel_calls = getattr(module, "KERNEL_CALLS", [])
    plain = tuple(sorted({c.feature_map for c in kernel_calls if c.feature_map != "favor"}))
    linear = ([(plain, 64)] if plain else []) + [(("favor",), f) for f in
                                                 sorted({c.features for c in kernel_calls if c.feature_map == "favor"})]

    def specs(dtype, head_dim):
        out = []
        if "set" in families:
            out += blocksparse_aot_specs(module.PATTERN_MASKS, dtype, head_dim, own(
                "blocksparse_fwd_kernel", "blocksparse_bwd_dkdv_kernel", "blocksparse_bwd_dq_kernel"), dropout)
        for rounds, shared_qk in hashed:
            out += lsh_aot_specs(dtype, head_dim, rounds, module.CAUSAL, shared_qk,
                                 own("lsh_fwd_kernel", "lsh_bwd_dkdv_kernel", "lsh_bwd_dq_kernel"))
        names = ("linear_state_kernel", "linear_scan_kernel", "linear_fwd_kernel", "linear_bwd_dq_kernel",
                 "linear_bwd_dkdv_kernel")
        for feature_maps, features in linear:
            out += linear_aot_specs(dtype, head_dim, feature_maps, (module.CAUSAL,), features,
                                    {name: getattr(module, name) for name in names})
        return out

    return specs


def aot_compile(module, capability: int, dtypes=("fp16", "bf16", "fp32"),
                head_dims=(16, 32, 64, 128), specs=None) -> list[KernelReport]:
    """Compile every kernel of a generated module to PTX and cubin for `capability`, and read ptxas's report.
    `specs(dtype, head_dim)` lists the kernels (default: `module_aot_specs(module)`; a family's own, e.g.
    `patterncc.families.linear.ops.linear_aot_specs`, covers variants no pattern uses)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    reports = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for name, kernel, signature, configs in (specs or module_aot_specs(module))(dtype, head_dim):
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
