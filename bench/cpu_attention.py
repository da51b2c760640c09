"""CPU benchmark: patterncc's block-sparse torch path against dense masked SDPA, dense causal SDPA and
FlexAttention (torch.compile'd flex_attention with create_block_mask of the same pattern; forward only, it has
no CPU backward), all in one run so the ratios compare like with like.

    python bench/cpu_attention.py                 # n = 8192, 4 heads, head_dim 64, fp32 (issue 3's setting)
    python bench/cpu_attention.py --n 2048 --repeats 2 --json out.json

Each time is the median of --repeats runs after one warm-up (FlexAttention's warm-up includes compiling).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import EXAMPLES, PATTERNS, forward_backward  # noqa: E402 (bench/ is on sys.path)

import patterncc  # noqa: E402
from patterncc.cache import load_module  # noqa: E402
from patterncc.mask import pattern_mask  # noqa: E402
from patterncc.semantics import bind_pattern  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: layouts, torch.compile, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)



def flex_forward(pattern, n, heads, q, k, v):
    """FlexAttention with a mask_mod written from the pattern's formula, at the pattern's block size."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    masks = pattern_mask(pattern, n)  # (pattern heads, n, n): the formula, evaluated once
    mask_per_head = masks.repeat_interleave(heads // masks.shape[0], dim=0)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_per_head[h, q_idx, kv_idx]

    block = bind_pattern(pattern, n).block
    block_mask = create_block_mask(mask_mod, B=None, H=heads, Q_LEN=n, KV_LEN=n, device="cpu", BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    parser.add_argument("--no-masked", action="store_true",
                        help="skip dense masked SDPA (its n x n mask and scores need ~5 GB at n = 16384)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, heads, dim = args.n, args.heads, args.dim
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    results = []
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for label, (file, params) in PATTERNS.items():
        pattern = patterncc.parse(EXAMPLES / file, **params)
        module = load_module(EXAMPLES / file, **params)
        ours = module.__dict__[next(name for name in dir(module) if isinstance(getattr(module, name), type)
                                    and issubclass(getattr(module, name), torch.nn.Module))](backend="torch")
        if not args.no_masked:
            mask = pattern_mask(pattern, n).repeat_interleave(heads // bind_pattern(pattern, n).num_heads, dim=0)[None]
        row = {"pattern": label}
        with console.status(f"{label}: patterncc"):
            row["patterncc_fwd"] = median_seconds(lambda: ours(q, k, v), args.repeats)
            row["patterncc_fwd_bwd"] = median_seconds(forward_backward(ours, q, k, v), args.repeats)
        if not args.no_masked:
            with console.status(f"{label}: masked SDPA"):
                masked = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask)  # noqa: E731
                row["sdpa_masked_fwd"] = median_seconds(lambda: masked(q, k, v), args.repeats)
                row["sdpa_masked_fwd_bwd"] = median_seconds(forward_backward(masked, q, k, v), args.repeats)
        with console.status(f"{label}: causal SDPA"):
            causal = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
            row["sdpa_causal_fwd"] = median_seconds(lambda: causal(q, k, v), args.repeats)
            row["sdpa_causal_fwd_bwd"] = median_seconds(forward_backward(causal, q, k, v), args.repeats)
        if not args.no_flex:
            with console.status(f"{label}: FlexAttention (compiling)"):
                flex = flex_forward(pattern, n, heads, q, k, v)
                row["flex_fwd"] = median_seconds(flex, args.repeats) if flex else None
        results.append(row)

    table = Table(title=f"CPU, n={n}, heads={heads}, head_dim={dim}, fp32, median of {args.repeats} "
                        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for column in ("pattern", "patterncc fwd s", "vs masked SDPA", "vs causal SDPA", "vs FlexAttention",
                   "patterncc fwd+bwd s", "vs masked SDPA", "vs causal SDPA"):
        table.add_column(column, justify="left" if column == "pattern" else "right")
    def ratio(r, other, ours):
        return f"{r[other] / r[ours]:.1f}x" if r.get(other) else "n/a"

    for r in results:
        table.add_row(
            r["pattern"], f"{r['patterncc_fwd']:.3f}", ratio(r, "sdpa_masked_fwd", "patterncc_fwd"),
            ratio(r, "sdpa_causal_fwd", "patterncc_fwd"), ratio(r, "flex_fwd", "patterncc_fwd"),
            f"{r['patterncc_fwd_bwd']:.3f}", ratio(r, "sdpa_masked_fwd_bwd", "patterncc_fwd_bwd"),
            ratio(r, "sdpa_causal_fwd_bwd", "patterncc_fwd_bwd"))
    console.print(table)
    console.print("ratios are speed-ups of patterncc (other's time / patterncc's time), measured in this run")
    if args.json:
        meta = {"n": n, "heads": heads, "head_dim": dim, "dtype": "fp32", "repeats": args.repeats,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "processor": platform.processor(), "python": platform.python_version(),
                "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
