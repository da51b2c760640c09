"""Layout construction time of generated modules: tile classes, permutation choice and tile lists for one n,
in closed form (never an n x n mask). Issue 3 asks for well under a second at n = 65536.

    python bench/layout_speed.py [--n 16384 65536] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import patterncc  # noqa: E402
from patterncc.cache import import_file  # noqa: E402
from patterncc.driver import compile_pattern  # noqa: E402

SET_EXAMPLES = ["strided", "fixed", "local", "bigbird", "dilated"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"layout construction, median of {args.repeats} (seconds)")
    table.add_column("example")
    for n in args.n:
        table.add_column(f"n={n}", justify="right")
    table.add_column("visiting order per mask at the largest n")
    folder = Path(tempfile.mkdtemp(prefix="patterncc-bench-"))
    for name in SET_EXAMPLES:
        compiled = compile_pattern(patterncc.parse(ROOT / "examples" / f"{name}.attn"))
        path = folder / f"{compiled.module_name}.py"
        path.write_text(compiled.source)
        module = import_file(path, f"bench_{compiled.module_name}")
        module.Layout(256, "cpu", module.PATTERN_MASKS)  # first-call imports
        cells, layout = [], None
        for n in args.n:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                layout = module.Layout(n, "cpu", module.PATTERN_MASKS)  # uncached: get_layout caches per n
                times.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(times):.3f}")
        orders = ", ".join("natural" if p is None else "transposed" for p in layout.positions_cpu)
        table.add_row(name, *cells, orders)
    Console().print(table)


if __name__ == "__main__":
    main()
