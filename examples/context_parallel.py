"""Context parallel: one long sequence sharded across processes, each fetching only the keys its rows attend.

    torchrun --nproc-per-node 4 examples/context_parallel.py                    # strided, n = 65536, gloo on CPU
    torchrun --nproc-per-node 2 examples/context_parallel.py --seq-len 16384 --check  # compare with one process

Each rank holds the positions `shard.positions(rank)` of q, k and v (zig-zag halves for this causal pattern),
runs forward and backward `--steps` times, and rank 0 prints per rank: positions, bytes received per call
against ring attention's (every other rank's k and v), and seconds per step. --check also runs the whole
sequence in every process and compares the rank's rows of the output (tests/test_distributed.py checks the
gradients too).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import patterncc
import patterncc.distributed as cp

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern", nargs="?", default=str(HERE / "strided.attn"), help="a .attn file")
    parser.add_argument("--seq-len", type=int, default=65536, help="sequence length (default 65536)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default: the pattern's)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="forward + backward steps to time")
    parser.add_argument("--check", action="store_true", help="compare with the whole sequence in one process")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    module = patterncc.load(args.pattern) if rank == 0 else None
    dist.barrier()  # rank 0 compiles the module once; the others find it in the cache
    module = module or patterncc.load(args.pattern)
    started = time.perf_counter()
    shard = cp.plan(module, args.seq_len, world)
    planned_in = time.perf_counter() - started
    attn = cp.ShardedAttention(module, shard=shard)
    heads = args.heads or module.num_heads
    generator = torch.Generator().manual_seed(0)  # every rank draws the whole sequence, keeps its rows
    q, k, v = (torch.randn(1, heads, args.seq_len, args.head_dim, generator=generator) for _ in range(3))
    mine = shard.positions(rank)
    local = [x[:, :, mine].to(device).requires_grad_() for x in (q, k, v)]

    times = []
    for _ in range(args.steps):
        for x in local:
            x.grad = None
        dist.barrier()
        started = time.perf_counter()
        out = attn(*local)
        out.square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    row = {"rank": rank, "positions": len(mine), "received": attn.bytes_received,
           "ring": shard.ring_bytes(rank, 1, heads, args.head_dim, q.dtype), "seconds": min(times)}
    if args.check:
        with torch.no_grad():
            expected = module(q.to(device), k.to(device), v.to(device))
        row["max_error"] = float((out.detach() - expected[:, :, mine.to(device)]).abs().max())
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print(f"{Path(args.pattern).name}: n={args.seq_len}, {world} ranks ({shard.order} ownership, blocks of "
              f"{shard.block}), heads={heads}, head_dim={args.head_dim}, {'NCCL' if cuda else 'gloo'}; "
              f"plan built in {planned_in:.1f} s; work imbalance {shard.imbalance:.3f}")
        for r in rows:
            extra = f", max |out - one process| {r['max_error']:.2e}" if "max_error" in r else ""
            print(f"  rank {r['rank']}: {r['positions']} positions, received {r['received'] / 2**20:.2f} MiB per "
                  f"call ({r['received'] / r['ring']:.3f} of ring attention's {r['ring'] / 2**20:.2f} MiB), "
                  f"{r['seconds']:.3f} s per forward + backward{extra}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
