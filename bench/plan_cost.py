"""Planning cost of generated modules, and the CPU forward's memory at a long sequence: each example in its own
process, so peak memory is its own.

Planning = what a module does once per sequence length before any attention: the layout (tile classes, visiting
order per mask, exact refinement of partial tiles, tile lists) and the CPU path's plan (per chunk of query tiles,
the keys its rows may see). Issue 11 asks for every example under 0.5 s and 200 MB at n = 16384; and for a CPU
forward (batch 1, 4 heads, head_dim 64, fp32, no grad) of strided, fixed, local and bigbird at n = 65536 under
2 GB peak.

    python bench/plan_cost.py [--n 16384] [--forward-n 65536] [--markdown bench/results/plan-cost.md]

Memory is the growth of the process's peak resident set (ru_maxrss) over what it held after importing torch,
compiling the module and (for the forward) allocating q, k, v: what planning and attention add.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["strided", "fixed", "local", "bigbird", "dilated", "hybrid"]
FORWARD_EXAMPLES = ["strided", "fixed", "local", "bigbird"]

CHILD = r"""
import json, resource, sys, tempfile, time, pathlib
import torch
import patterncc
from patterncc.cache import import_file
from patterncc.driver import compile_pattern
name, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
compiled = compile_pattern(patterncc.parse(pathlib.Path(sys.argv[4]) / "examples" / f"{name}.attn"))
path = pathlib.Path(tempfile.mkdtemp()) / f"{compiled.module_name}.py"
path.write_text(compiled.source)
module = import_file(path, "bench_" + compiled.module_name)
small = module.Layout(256, "cpu", module.PATTERN_MASKS)  # first-call imports and warm-up
for mask in range(module.NUM_MASKS):
    module.cpu_gather(small, mask)
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if mode == "plan":
    before = peak_mb()
    start = time.perf_counter()
    layout = module.Layout(n, "cpu", module.PATTERN_MASKS)
    built = time.perf_counter()
    for mask in range(module.NUM_MASKS):
        module.cpu_gather(layout, mask)
    done = time.perf_counter()
    print(json.dumps(dict(layout_s=built - start, plan_s=done - start, mb=peak_mb() - before)))
else:
    heads = module.NUM_HEADS * max(1, 4 // module.NUM_HEADS)  # 4 heads, or a multiple of the pattern's
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 64, generator=generator) for _ in range(3))
    before = peak_mb()
    start = time.perf_counter()
    with torch.no_grad():
        out = module.attention(q, k, v, backend="torch")
    print(json.dumps(dict(forward_s=time.perf_counter() - start, mb=peak_mb() - before, heads=heads)))
"""


def run(name: str, n: int, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, name, str(n), mode, str(ROOT)], capture_output=True,
                            text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{name} {mode} at n={n} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--forward-n", type=int, default=65536)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    lines = [f"Planning at n = {args.n} (layout, then the CPU plan of every mask; one run each):", "",
             "| example | layout (s) | layout + CPU plan (s) | peak growth (MB) |", "|---|---:|---:|---:|"]
    for name in EXAMPLES:
        r = run(name, args.n, "plan")
        lines.append(f"| {name} | {r['layout_s']:.3f} | {r['plan_s']:.3f} | {r['mb']:.0f} |")
    lines += ["", f"CPU forward at n = {args.forward_n} (batch 1, head_dim 64, fp32, no grad, planning included):",
              "", "| example | heads | time (s) | peak growth (MB) |", "|---|---:|---:|---:|"]
    for name in FORWARD_EXAMPLES:
        r = run(name, args.forward_n, "forward")
        lines.append(f"| {name} | {r['heads']} | {r['forward_s']:.2f} | {r['mb']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(f"# Planning cost and CPU forward memory\n\nCommand: `python bench/plan_cost.py "
                                 f"--n {args.n} --forward-n {args.forward_n}`.\n\n{text}\n")


if __name__ == "__main__":
    main()
