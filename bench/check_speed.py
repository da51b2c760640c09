"""How long `patterncc check` takes on every example: the whole analysis (exact stats, layouts, cost, coverage,
permutations) at n = 16384 by default, the target being under 5 s for all examples together.

    python bench/check_speed.py [--n 16384] [--repeat 3] [--max-steps 8]

Times are per example, in this process after one small warm-up analysis (the first torch call in a process pays
for its own set-up). Wall time is what a user waits; CPU time is steadier on a shared machine. The best of
`--repeat` runs is shown, with the median beside it. Process start-up and imports (python, torch, sympy) are not
included: they are measured once, separately, for the whole `patterncc check` command.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import patterncc  # noqa: E402
from patterncc.analysis.analyze import analyze  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=8)
    args = parser.parse_args()
    examples = sorted((ROOT / "examples").glob("*.attn"))
    warnings.simplefilter("ignore", patterncc.PatternWarning)  # the fixed example's summary head warns, by design
    analyze(patterncc.parse(ROOT / "examples" / "strided.attn"), 256)  # warm-up

    table = Table(title=f"patterncc check, every example, n = {args.n} (best of {args.repeat}; median)",
                  title_justify="left")
    for column in ("example", "wall s", "cpu s", "merged coverage", "declared order"):
        table.add_column(column, justify="left" if column in ("example", "merged coverage", "declared order")
                         else "right")
    best_wall = best_cpu = 0.0
    for path in examples:
        walls, cpus = [], []
        for pattern in patterncc.parse_all(path).values():
            for run in range(args.repeat):
                wall, cpu = time.perf_counter(), time.process_time()
                result = analyze(pattern, args.n, max_steps=args.max_steps)
                result.to_json()
                if len(walls) <= run:
                    walls.append(0.0), cpus.append(0.0)
                walls[run] += time.perf_counter() - wall
                cpus[run] += time.process_time() - cpu
        best_wall += min(walls)
        best_cpu += min(cpus)
        table.add_row(path.stem, f"{min(walls):.3f} ({statistics.median(walls):.3f})",
                      f"{min(cpus):.3f} ({statistics.median(cpus):.3f})",
                      _coverage(result.coverage["merged"]), _coverage(result.coverage["declared_order"]))
    table.add_section()
    table.add_row("all examples", f"{best_wall:.3f}", f"{best_cpu:.3f}", "", "")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(f"one `patterncc check examples/strided.attn --n {args.n}` process, start-up and imports "
                  f"included: {_command_seconds(args.n):.2f} s wall")
    return 0


def _coverage(result) -> str:
    if result.status == "covered":
        return f"{result.steps} step{'' if result.steps == 1 else 's'}"
    if result.status == "not_within_max_steps":
        return f"{result.fractions[-1]:.3f} after {len(result.fractions)} steps"
    return result.status


def _command_seconds(n: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "patterncc.cli", "check", str(ROOT / "examples" / "strided.attn"),
                    "--n", str(n), "--json"], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
