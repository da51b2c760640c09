"""Context parallel on CPU (gloo): bytes each rank receives against ring attention's, and time per training step
with 1, 2 and 4 processes.

    python bench/context_parallel.py --json bench/results/cpu-context-parallel.json

Bytes: from the plan at --bytes-n (65536) over --bytes-ranks (4) ranks, batch 1, the pattern's heads, head_dim
64, float32; the plan's count is what the exchange receives on the wire (tests/test_distributed.py asserts the
two are equal), and the time runs below report the measured bytes too. Ring attention: every rank receives every
other rank's k and v. Time: forward + backward of the attention alone at --time-n, the best of --steps, in one
process with 1 and 2 threads, then in 2 and 4 spawned processes of one thread each (the slowest rank's step);
speedup = one process with 1 thread / that. Run it with nothing else running: this machine has 2 cores, so 4
processes share them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import EXAMPLES, PATTERNS, write_results

import patterncc
import patterncc.distributed as cp

HEAD_DIM = 64


def inputs(module, n):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, module.num_heads, n, HEAD_DIM, generator=generator) for _ in range(3)]


def best_step(attn, tensors, steps, barrier=None):
    times = []
    for _ in range(steps):
        leaves = [x.detach().requires_grad_() for x in tensors]
        if barrier:
            barrier()
        started = time.perf_counter()
        attn(*leaves).square().mean().backward()
        times.append(time.perf_counter() - started)
    return min(times)


def rank_worker(rank, world, label, n, steps, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    file, params = PATTERNS[label]
    module = patterncc.load(EXAMPLES / file, **params)
    shard = cp.plan(module, n, world)
    attn = cp.ShardedAttention(module, shard=shard)
    mine = shard.positions(rank)
    tensors = [x[:, :, mine] for x in inputs(module, n)]
    seconds = best_step(attn, tensors, steps, dist.barrier)
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "bytes": attn.bytes_received}))
    dist.destroy_process_group()


def sharded_step(label, n, world, steps):
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_worker, args=(world, label, n, steps, folder), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    return max(r["seconds"] for r in ranks), [r["bytes"] for r in ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes-n", type=int, default=65536)
    parser.add_argument("--bytes-ranks", type=int, default=4)
    parser.add_argument("--time-n", type=int, default=16384)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    print(f"bytes received per rank and call, n={args.bytes_n}, {args.bytes_ranks} ranks, batch 1, head_dim "
          f"{HEAD_DIM}, float32 (ratio: to ring attention's)")
    for label in args.patterns:
        file, params = PATTERNS[label]
        module = patterncc.load(EXAMPLES / file, **params)
        started = time.perf_counter()
        shard = cp.plan(module, args.bytes_n, args.bytes_ranks)
        planned = time.perf_counter() - started
        heads = module.num_heads
        got = [shard.bytes_received(r, 1, heads, heads, HEAD_DIM) for r in range(args.bytes_ranks)]
        ring = [shard.ring_bytes(r, 1, heads, HEAD_DIM) for r in range(args.bytes_ranks)]
        ratios = [g / r for g, r in zip(got, ring)]
        print(f"  {label:18} " + "  ".join(f"r{r} {g / 2**20:6.2f} MiB ({x:.3f})" for r, (g, x) in
                                             enumerate(zip(got, ratios)))
              + f"   max {max(ratios):.3f}, all ranks {sum(got) / sum(ring):.3f}; plan {planned:.1f} s, "
                f"imbalance {shard.imbalance:.3f}")
        rows.append({"kind": "bytes", "pattern": label, "n": args.bytes_n, "ranks": args.bytes_ranks, "bytes": got,
                     "ring": ring, "plan_seconds": planned, "imbalance": shard.imbalance, "order": shard.order})
    print(f"\nforward + backward seconds per step at n={args.time_n} (best of {args.steps}; speedup against one "
          f"process, 1 thread)")
    for label in args.patterns:
        file, params = PATTERNS[label]
        module = patterncc.load(EXAMPLES / file, **params)
        tensors = inputs(module, args.time_n)
        single = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            best_step(module, tensors, 1)  # plans the layout once
            single[threads] = best_step(module, tensors, args.steps)
        torch.set_num_threads(1)
        line = f"  {label:18} 1 process: {single[1]:.3f} s (1 thread), {single[2]:.3f} s (2 threads)"
        row = {"kind": "time", "pattern": label, "n": args.time_n, "single": single}
        for world in args.worlds:
            seconds, measured = sharded_step(label, args.time_n, world, args.steps)
            line += f"; {world} processes: {seconds:.3f} s ({single[1] / seconds:.2f}x)"
            row[f"world{world}"] = {"seconds": seconds, "bytes": measured}
        print(line, flush=True)
        rows.append(row)
    write_results(args.json, args, rows)


if __name__ == "__main__":
    main()
