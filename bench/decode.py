"""Decoding speed on the CPU: tokens per second generating after a long prompt, patterncc's KV cache against dense
SDPA over a full KV cache, side by side in one run.

    python bench/decode.py --threads 1 2 --prompt 16384 --tokens 1024

Per pattern: batch 1, 4 query heads (the pattern's heads repeated), head_dim 64, fp32. The prompt is prefilled
(not timed); then `--tokens` positions are decoded one at a time and timed. The dense baseline attends every cached
key with F.scaled_dot_product_attention for each new position. `cache`: the key/value positions patterncc's cache
holds (pages of kept tiles, all kv heads) over a full cache's. Run it with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import EXAMPLES, write_results

import patterncc

PATTERNS = {
    "strided(l=128)": ("strided.attn", {"l": 128}),
    "fixed(l=128,c=16)": ("fixed.attn", {"l": 128, "c": 16}),
    "local(256)": ("local.attn", {"w": 256}),
    "linear": ("linear.attn", {"heads": 4}),
    "reformer": ("reformer.attn", {"heads": 4}),
}


def decode_rate(step, tokens):
    started = time.perf_counter()
    for t in range(tokens):
        step(t)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    total, heads, dim = args.prompt + args.tokens, 4, 64
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, total, dim, generator=generator) for _ in range(3))
    rows = []
    print(f"prompt {args.prompt}, {args.tokens} decoded tokens, batch 1, {heads} heads, d {dim}, fp32; "
          f"torch {torch.__version__}")
    for threads in args.threads:
        torch.set_num_threads(threads)

        def dense_step(t):
            position = args.prompt + t
            F.scaled_dot_product_attention(q[:, :, position:position + 1], k[:, :, :position + 1],
                                           v[:, :, :position + 1])

        dense = decode_rate(dense_step, args.tokens)
        for label, (file, params) in PATTERNS.items():
            attn = patterncc.load(EXAMPLES / file, **params)
            cache = attn.new_cache(1, heads, dim, total)
            with torch.no_grad():
                attn.prefill(q[:, :, :args.prompt], k[:, :, :args.prompt], v[:, :, :args.prompt], cache)

                def step(t):
                    position = args.prompt + t
                    window = slice(position, position + 1)
                    attn.decode(q[:, :, window], k[:, :, window], v[:, :, window], cache)

                rate = decode_rate(step, args.tokens)
            kept = cache.pages * cache.page  # positions of one kv head the cache holds, all heads together
            rows.append({"threads": threads, "pattern": label, "tokens_per_s": rate, "dense_tokens_per_s": dense,
                         "speedup": rate / dense, "cache_positions": kept, "dense_cache_positions": heads * total})
            print(f"threads {threads}  {label:18s}  {rate:8.1f} tok/s   dense SDPA {dense:8.1f} tok/s   "
                  f"{rate / dense:5.2f}x   cache {kept / (heads * total):.3f} of a full one")
    write_results(args.json, args, rows)


if __name__ == "__main__":
    main()
