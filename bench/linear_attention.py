"""Kernel heads (linear attention, elu1, causal) against dense causal softmax attention, and on a GPU against
flash-linear-attention's chunked linear attention, all in one run so ratios compare like with like.

    python bench/linear_attention.py                                   # CPU, fp32, n = 4096 ... 65536
    python bench/linear_attention.py --device cuda --dtype bf16 --md bench/results/linear-gpu.md

Each measurement runs in its own subprocess, so its peak memory (CPU: peak RSS above the process's RSS once the
inputs exist; CUDA: torch.cuda.max_memory_allocated above the inputs) is its own. Times are the median of
--repeats runs after one warm-up. Dense attention is skipped at the n where its previous time, scaled by the
quadratic growth, would exceed --dense-limit seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:  # run from a checkout: the module is built from the template sections
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _method(name, device):
    """A function (q, k, v) -> out for `name`: "linear" (this project), "dense" (SDPA) or "fla"."""
    if name == "dense":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "linear":
        import tempfile

        from linear_support import build_linear_module

        module = build_linear_module(Path(tempfile.mkdtemp()))
        return lambda q, k, v: module.linear_attention(q, k, v, "elu1", 1e-6, True)
    import inspect

    from fla.ops.linear_attn import chunk_linear_attn

    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}

    def fla(q, k, v):
        # Same feature map, applied outside: fla takes (batch, n, heads, d) and phi(q), phi(k).
        phi_q, phi_k = (torch.nn.functional.elu(x) + 1 for x in (q, k))
        out, _ = chunk_linear_attn(phi_q.transpose(1, 2), phi_k.transpose(1, 2), v.transpose(1, 2), scale=1.0,
                                   normalize=True, **extra)
        return out.transpose(1, 2)

    return fla


def measure(name, n, heads, dim, dtype, device, backward, repeats):
    """Run in a child process: (median seconds, peak bytes above the inputs)."""
    torch.manual_seed(0)
    fn = _method(name, device)
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=DTYPES[dtype]) for _ in range(3))
    grad = torch.randn_like(q)

    def run():
        if backward:
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            fn(qq, kk, vv).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return statistics.median(times), max(peak, 0)


def child(args) -> None:
    seconds, peak = measure(args.child, args.n[0], args.heads, args.dim, args.dtype, args.device, args.backward,
                            args.repeats)
    result = {"seconds": seconds, "peak_bytes": peak}
    if args.child == "linear" and args.device == "cuda":
        from common import chosen_configs

        from patterncc.families.shared import launch

        result["configs"] = chosen_configs(launch)
    print(json.dumps(result))


def run_child(args, name, n, backward):
    command = [sys.executable, __file__, "--child", name, "--n", str(n), "--heads", str(args.heads), "--dim",
               str(args.dim), "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]
    if backward:
        command.append("--backward")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"{name} n={n} backward={backward} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit", type=float, default=120.0, help="skip dense runs expected to take longer")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--md", help="write a markdown table here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    methods = ["linear", "dense"]
    if args.device == "cuda":
        try:
            import fla.ops.linear_attn  # noqa: F401

            methods.append("fla")
        except ImportError:
            print("flash-linear-attention (fla) is not installed: skipping its chunk_linear_attn")
    rows, last_dense = [], {}
    for n in args.n:
        row = {"n": n}
        for name in methods:
            for backward in (False, True):
                key = f"{name}_{'fwdbwd' if backward else 'fwd'}"
                previous = last_dense.get(backward)
                if name == "dense" and previous and previous[1] * (n / previous[0]) ** 2 > args.dense_limit:
                    row[key] = None
                    continue
                result = run_child(args, name, n, backward)
                row[key] = result
                if name == "dense" and result:
                    last_dense[backward] = (n, result["seconds"])
                shown = f"{result['seconds']:.3f} s, {result['peak_bytes'] / 2**20:.0f} MiB" if result else "failed"
                print(f"n={n} {key}: {shown}", flush=True)
        rows.append(row)
    meta = {"machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "heads": args.heads, "dim": args.dim, "dtype": args.dtype, "device": args.device,
            "repeats": args.repeats}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(meta, rows, methods))


def markdown(meta, rows, methods) -> str:
    def cell(result, what):
        if not result:
            return "-"
        return f"{result['seconds']:.3f}" if what == "s" else f"{result['peak_bytes'] / 2**20:.0f}"

    def ratio(a, b):
        return f"{b['seconds'] / a['seconds']:.1f}x" if a and b else "-"

    head = ["n"]
    for mode in ("fwd", "fwdbwd"):
        for name in methods:
            head += [f"{name} {mode} (s)", f"{name} {mode} peak (MiB)"]
        head += [f"dense / linear {mode}"] + ([f"fla / linear {mode}"] if "fla" in methods else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["n"])]
        for mode in ("fwd", "fwdbwd"):
            for name in methods:
                cells += [cell(row.get(f"{name}_{mode}"), "s"), cell(row.get(f"{name}_{mode}"), "mib")]
            cells.append(ratio(row.get(f"linear_{mode}"), row.get(f"dense_{mode}")))
            if "fla" in methods:
                cells.append(ratio(row.get(f"linear_{mode}"), row.get(f"fla_{mode}")))
        lines.append("| " + " | ".join(cells) + " |")
    return (f"# Kernel heads (linear attention) benchmark\n\nMachine: {meta['machine']}"
            + (f", {meta['gpu']}" if "gpu" in meta else "")
            + f"; torch {meta['torch']}, {meta['threads']} threads, Python {meta['python']}.\n\n"
            f"    {meta['command']}\n\nbatch 1, {meta['heads']} heads, head_dim {meta['dim']}, {meta['dtype']} on "
            f"{meta['device']}; linear = `linear_attention(q, k, v, \"elu1\", 1e-6, causal=True)`, dense = causal "
            f"`F.scaled_dot_product_attention`; median of {meta['repeats']} after a warm-up; peak = memory above the "
            "inputs (CPU: peak RSS). Ratio = other's time / linear's time. Raw numbers in the .json.\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
