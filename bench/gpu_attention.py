"""GPU benchmark (issue 3): patterncc's Triton kernels against dense causal SDPA and FlexAttention with the same
mask, forward and forward+backward, at n = 16384, 16 heads, head_dim 64, bf16, for strided(l=128),
fixed(l=128, c=16) and local(256). Reports milliseconds, speed-ups measured side by side in this run, and the
effective TFLOP/s of patterncc on the tiles it computes (4 * n_computed_pairs * head_dim flops forward,
2.5 times that for forward+backward, as FlashAttention counts).

    TRITON_INTERPRET=0 python bench/gpu_attention.py --json bench/results/gpu-<device>.json

Needs CUDA. FlexAttention's mask_mod is written from the pattern's formula (the generated module's own torch
predicate, `mask_allowed`), with create_block_mask at the pattern's block size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import EXAMPLES, PATTERNS, chosen_configs, forward_backward  # noqa: E402 (bench/ is on sys.path)

from patterncc.cache import load_module  # noqa: E402


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100)



def flex_attention_fn(module, n, heads):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tables = [t.cuda() for t in module.random_tables(n)]
    per_head = heads // module.NUM_HEADS

    def head_allowed(slot, q_idx, kv_idx):  # a split head allows the union of its parts
        allowed = module.mask_allowed(module.HEAD_MASKS[slot][0], q_idx, kv_idx, n, tables)
        for m in module.HEAD_MASKS[slot][1:]:
            allowed = allowed | module.mask_allowed(m, q_idx, kv_idx, n, tables)
        return allowed

    def mask_mod(b, h, q_idx, kv_idx):
        slot = h // per_head
        allowed = head_allowed(0, q_idx, kv_idx)
        for other in range(1, len(module.HEAD_MASKS)):
            allowed = torch.where(slot == other, head_allowed(other, q_idx, kv_idx), allowed)
        return allowed

    block_mask = create_block_mask(mask_mod, B=None, H=heads, Q_LEN=n, KV_LEN=n, device="cuda",
                                   BLOCK_SIZE=module.BLOCK)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def computed_pairs(module, n, heads) -> int:
    """Query-key pairs in the tiles patterncc computes (every non-empty tile, at the layout's block size)."""
    layout = module.get_layout(n, "cpu")
    per_head = heads // module.NUM_HEADS
    tiles = sum(int((layout.classes[m] != 0).sum()) for parts in module.HEAD_MASKS for m in parts) * per_head
    return tiles * module.BLOCK * module.BLOCK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    n, heads, dim = args.n, args.heads, args.dim
    q, k, v, grad = (torch.randn(args.batch, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    rows = []
    for label, (file, params) in PATTERNS.items():
        module = load_module(EXAMPLES / file, **params)
        ours = lambda a, b, c, m=module: m.attention(a, b, c)  # noqa: E731
        flex = flex_attention_fn(module, n, heads)
        pairs = computed_pairs(module, n, heads) * args.batch
        row = {"pattern": label}
        for name, fn in (("patterncc", ours), ("flex", flex), ("sdpa_causal", sdpa)):
            row[f"{name}_fwd_ms"] = bench_ms(lambda: fn(q, k, v))
            row[f"{name}_fwd_bwd_ms"] = bench_ms(forward_backward(fn, q, k, v, grad))
        row["patterncc_fwd_tflops"] = 4 * pairs * dim / row["patterncc_fwd_ms"] / 1e9
        row["patterncc_fwd_bwd_tflops"] = 2.5 * 4 * pairs * dim / row["patterncc_fwd_bwd_ms"] / 1e9
        causal_pairs = args.batch * heads * n * (n + 1) // 2
        row["sdpa_causal_fwd_tflops"] = 4 * causal_pairs * dim / row["sdpa_causal_fwd_ms"] / 1e9
        row["sdpa_causal_fwd_bwd_tflops"] = 2.5 * 4 * causal_pairs * dim / row["sdpa_causal_fwd_bwd_ms"] / 1e9
        row["configs"] = chosen_configs(module)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "n": n, "heads": heads, "head_dim": dim, "batch": args.batch, "dtype": "bf16",
            "command": " ".join(sys.argv)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
