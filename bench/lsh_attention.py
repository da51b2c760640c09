"""Reformer LSH attention: patterncc's hashed heads against reformer-pytorch's LSHAttention.

    python bench/lsh_attention.py --n 4096 16384 65536 --md bench/results/lsh-cpu.md --json bench/results/lsh-cpu.json
    python bench/lsh_attention.py --device cuda --dtype bf16 --n 4096 16384 65536   # on a GPU

Each (implementation, n) runs in its own process (peak memory is that process's alone): patterncc's in this
interpreter, reformer-pytorch's in --peer-python (default bench/reformer/.venv/bin/python, a venv of its own:
    python -m venv bench/reformer/.venv
    bench/reformer/.venv/bin/pip install torch==2.13.0      # first: an unpinned torch pulls CUDA wheels
    bench/reformer/.venv/bin/pip install reformer-pytorch
). Both get the same n, rounds (n_hashes), chunk (bucket_size), head_dim, causal, shared QK, and buckets = n / chunk
(reformer-pytorch ties the bucket count to n). reformer-pytorch runs with attend_across_buckets=False and
allow_duplicate_attention=False, its settings closest to patterncc's semantics; it still differs slightly: chunk 0
looks back at the last chunk (wrap-around), a position attends itself with a -5e4 score rather than only as a
fallback, and fresh rotations are drawn per call. Time: median of --repeats runs after a warm-up; memory: the
peak above what the inputs already hold (CPU: peak resident set; CUDA: torch's peak allocated).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / "bench" / "reformer" / ".venv" / "bin" / "python"


def _rss_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    # Hand freed heap memory back to the OS first: memory reused from an earlier call would not raise the peak.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM (the peak resident set) to the current RSS
        refs.write("5")
    return _rss_bytes("VmRSS")


def _peak_above(device, base):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _rss_bytes("VmHWM") - base


def _time(fn, device, repeats):
    import torch

    fn()  # warm-up (and, on CUDA, compilation and the launcher's config choice)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args):
    """One implementation at one n: prints a JSON line with times and peak memory."""
    import torch

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    n, heads, dim = args.worker_n, args.heads, args.head_dim
    buckets = n // args.chunk
    generator = torch.Generator().manual_seed(0)
    qk, v, grad = (torch.randn(args.batch, heads, n, dim, generator=generator).to(dtype).to(args.device)
                   for _ in range(3))
    if args.impl == "patterncc":
        sys.path.insert(0, str(ROOT / "tests"))
        sys.path.insert(0, str(ROOT))
        from lsh_support import build_module

        lsh = build_module()
        rotations = lsh.lsh_rotations(heads, args.rounds, dim, buckets, seed=1).to(args.device)

        def attend(x, y):
            return lsh.lsh_attention(x, None, y, rotations, args.chunk, args.causal, True)
    else:
        from reformer_pytorch import LSHAttention

        module = LSHAttention(bucket_size=args.chunk, n_hashes=args.rounds, causal=args.causal,
                              allow_duplicate_attention=False, attend_across_buckets=False).to(args.device)

        def attend(x, y):  # heads folded into the batch, as reformer-pytorch's LSHSelfAttention does
            out = module(x.reshape(-1, n, dim), y.reshape(-1, n, dim))[0]
            return out.reshape(args.batch, heads, n, dim)

    def forward():
        with torch.no_grad():
            attend(qk, v)

    def forward_backward():
        x, y = qk.detach().requires_grad_(), v.detach().requires_grad_()
        attend(x, y).backward(grad)

    result = {"impl": args.impl, "n": n, "buckets": buckets}
    for mode, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        fn()
        base = _reset_peak(args.device)
        fn()
        result[f"{mode}_peak_mb"] = round(_peak_above(args.device, base) / 2**20, 1)
        result[f"{mode}_s"] = _time(fn, args.device, args.repeats)
    result["torch"] = torch.__version__
    if args.impl == "patterncc" and args.device == "cuda":
        from common import chosen_configs

        from patterncc.families.shared import launch

        result["configs"] = chosen_configs(launch)
    if args.impl == "peer":
        from importlib.metadata import version

        result["reformer_pytorch"] = version("reformer-pytorch")
    print(json.dumps(result), flush=True)


def run_one(args, impl, n):
    python = sys.executable if impl == "patterncc" else args.peer_python
    command = [str(python), __file__, "--worker-n", str(n), "--impl", impl, "--device", args.device,
               "--dtype", args.dtype, "--batch", str(args.batch), "--heads", str(args.heads), "--head-dim",
               str(args.head_dim), "--rounds", str(args.rounds), "--chunk", str(args.chunk), "--repeats",
               str(args.repeats)] + (["--causal"] if args.causal else [])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": n, "error": f"over {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"impl": impl, "n": n, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(lines[-1])


def _cell(row, key, digits=3):
    return "-" if not row or key not in row else f"{row[key]:.{digits}f}" if digits else f"{row[key]:.0f}"


def _ratio(ours, peer, key):
    if ours is None or peer is None or key not in ours or key not in peer or ours[key] <= 0:
        return "-"
    return f"{peer[key] / ours[key]:.1f}x"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 on the CPU, bf16 on CUDA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--causal", action="store_true", default=True)
    parser.add_argument("--bidirectional", dest="causal", action="store_false")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per (implementation, n) process")
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["patterncc", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.worker_n:
        return worker(args)

    import torch

    setup = (f"batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, {args.dtype}, rounds {args.rounds}, "
             f"chunk {args.chunk}, buckets n/{args.chunk}, {'causal' if args.causal else 'bidirectional'}, shared QK, "
             f"{args.device}, median of {args.repeats}")
    print(setup)
    print(f"{'n':>7} | {'ours fwd':>9} {'peer fwd':>9} {'ratio':>6} | {'ours f+b':>9} {'peer f+b':>9} {'ratio':>6} | "
          f"{'ours MB':>8} {'peer MB':>8} (fwd+bwd peak)")
    rows = []
    for n in args.n:
        ours, peer = run_one(args, "patterncc", n), run_one(args, "peer", n)
        rows.append({"n": n, "patterncc": ours, "reformer_pytorch": peer})
        ok_ours, ok_peer = ("error" not in ours) and ours, ("error" not in peer) and peer
        print(f"{n:>7} | {_cell(ok_ours, 'fwd_s'):>9} {_cell(ok_peer, 'fwd_s'):>9} "
              f"{_ratio(ok_ours or None, ok_peer or None, 'fwd_s'):>6} | {_cell(ok_ours, 'fwd_bwd_s'):>9} "
              f"{_cell(ok_peer, 'fwd_bwd_s'):>9} {_ratio(ok_ours or None, ok_peer or None, 'fwd_bwd_s'):>6} | "
              f"{_cell(ok_ours, 'fwd_bwd_peak_mb', 0):>8} {_cell(ok_peer, 'fwd_bwd_peak_mb', 0):>8}"
              + "".join(f"  [{r['impl']}: {r['error']}]" for r in (ours, peer) if "error" in r), flush=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__}
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    command = "python bench/lsh_attention.py " + " ".join(sys.argv[1:])
    report = {"setup": setup, "machine": machine, "command": command, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(report))


def markdown(report):
    peer_version = next((r["reformer_pytorch"].get("reformer_pytorch") for r in report["rows"]
                         if "reformer_pytorch" in r["reformer_pytorch"]), "?")
    lines = [
        "# LSH attention: patterncc vs reformer-pytorch",
        "",
        f"Machine: {report['machine']}; reformer-pytorch {peer_version}.",
        "",
        f"Setup: {report['setup']}. Command:",
        "",
        f"    {report['command']}",
        "",
        "Ratio = reformer-pytorch's time / patterncc's (above 1: patterncc faster). Peak = memory above the inputs",
        "during one forward+backward (CPU: peak resident set of the process). Raw numbers in the .json beside this.",
        "",
        ("| n | patterncc fwd (s) | reformer fwd (s) | ratio | patterncc fwd+bwd (s) | reformer fwd+bwd (s) | ratio "
         "| patterncc peak (MB) | reformer peak (MB) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ours = row["patterncc"] if "error" not in row["patterncc"] else None
        peer = row["reformer_pytorch"] if "error" not in row["reformer_pytorch"] else None
        lines.append(f"| {row['n']} | {_cell(ours, 'fwd_s')} | {_cell(peer, 'fwd_s')} | {_ratio(ours, peer, 'fwd_s')} "
                     f"| {_cell(ours, 'fwd_bwd_s')} | {_cell(peer, 'fwd_bwd_s')} | {_ratio(ours, peer, 'fwd_bwd_s')} "
                     f"| {_cell(ours, 'fwd_bwd_peak_mb', 0)} | {_cell(peer, 'fwd_bwd_peak_mb', 0)} |")
        for name in ("patterncc", "reformer_pytorch"):
            if "error" in row[name]:
                lines.append(f"|  | {name} at n={row['n']}: {row[name]['error']} | | | | | | | |")
    lines += [
        "",
        "Semantics differ slightly: reformer-pytorch (attend_across_buckets=False, allow_duplicate_attention=False)",
        "wraps chunk 0 around to the last chunk, lets a position attend itself with a -5e4 score instead of only as",
        "a fallback, and draws fresh rotations on every call; buckets = n / chunk for both, since reformer-pytorch",
        "ties the bucket count to n.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
