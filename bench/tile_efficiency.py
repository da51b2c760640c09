"""Work efficiency of the block-sparse kernels: allowed pairs / (computed tiles x block^2), per mask of every set
example (and `combine merged` strided and fixed), at each n, in the visiting order the generated module chooses.
Issue 11 asks for >= 0.3 for every set head; this is the measurement, not a timing.

Allowed pairs come from the CPU path's compacted plan (exact per query row and key, built without an n x n
mask); computed tiles from the layout the kernels use.

    python bench/tile_efficiency.py [--n 4096 16384] [--markdown bench/results/tile-efficiency.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import patterncc  # noqa: E402
from patterncc.driver import compile_pattern  # noqa: E402
from patterncc.report import module_layout_stats  # noqa: E402

MERGED = {
    "strided-merged": "pattern strided_merged(l = 128) { causal; block 64; head a = strided(l) }",
    "fixed-merged": "pattern fixed_merged(l = 128, c = 16) { causal; block 64; head a = fixed(l, c) }",
}
SET_EXAMPLES = ["strided", "fixed", "local", "bigbird", "dilated"]


def rows_for(label, source, n):
    """One row per distinct set-head mask (a split head's parts summed: its order lists each part's), from the
    layout the generated module builds at n (patterncc.report.module_layout_stats)."""
    compiled = compile_pattern(patterncc.parse(source))
    heads_of = {}
    for head, parts in zip(compiled.plan.set_heads, compiled.plan.head_masks):
        heads_of.setdefault(parts, []).append(head)
    runs = module_layout_stats(compiled, n)
    rows = []
    for parts, heads in heads_of.items():
        computed = sum(runs[m]["computed"] for m in parts)
        allowed = sum(runs[m]["allowed"] for m in parts)
        efficiency = allowed / max(1, computed * compiled.plan.block ** 2)
        order = " + ".join(runs[m]["order"] for m in parts)
        rows.append((label, n, "+".join(map(str, parts)), heads, order, computed, allowed, efficiency))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    sources = {name: ROOT / "examples" / f"{name}.attn" for name in SET_EXAMPLES} | MERGED
    rows = [row for n in args.n for label, source in sources.items() for row in rows_for(label, source, n)]
    header = "| pattern | n | masks | heads | order | computed tiles | allowed pairs | efficiency |"
    lines = [header, "|---|---:|---:|---|---|---:|---:|---:|"]
    for label, n, mask, heads, order, computed, allowed, efficiency in rows:
        flag = "" if efficiency >= 0.3 else " (< 0.3)"
        lines.append(f"| {label} | {n} | {mask} | {heads} | {order} | {computed} | {allowed} | "
                     f"{efficiency:.3f}{flag} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(f"# Work efficiency of the block-sparse kernels\n\nCommand: `python "
                                 f"bench/tile_efficiency.py --n {' '.join(map(str, args.n))}` (a count, not a "
                                 f"timing: the same on every machine).\n\n{text}\n")


if __name__ == "__main__":
    main()
