"""Context-parallel cases run by spawned gloo process groups (tests/test_distributed.py): each rank runs every case
and writes what it measured to a JSON file the test reads. A module of its own so that spawned processes import
the worker by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import patterncc
import patterncc.distributed as cp

ROOT = Path(__file__).resolve().parent.parent
HEAD_DIM = 8

# (name, pattern (example file or text), parameters, query heads per pattern head, kv heads divisor, plan options)
CASES = [
    ("strided", "examples/strided.attn", {"l": 16}, 1, 1, {"block": 16}),
    ("strided-gqa", "examples/strided.attn", {"l": 16}, 2, 2, {"block": 16}),
    ("fixed", "examples/fixed.attn", {"l": 32, "c": 4}, 1, 1, {"block": 16}),
    ("local", "examples/local.attn", {"w": 24, "heads": 2}, 1, 1, {"block": 16}),
    ("bigbird", "examples/bigbird.attn", {"w": 24, "g": 8, "r": 2, "heads": 2}, 1, 1, {"block": 16}),
    ("bigbird-balanced", "examples/bigbird.attn", {"w": 24, "g": 8, "r": 2, "heads": 2}, 1, 1,
     {"block": 16, "order": "balanced"}),
    ("dilated", "examples/dilated.attn", {"w": 8, "d": 2}, 1, 1, {"block": 16}),
    ("hybrid", "examples/hybrid.attn", {"w": 16, "l": 16, "k": 1}, 1, 1, {"block": 16}),
    ("linear", "examples/linear.attn", {"heads": 2}, 1, 1, {"block": 16}),
    ("reformer", "examples/reformer.attn", {"buckets": 8, "rounds": 2, "heads": 2}, 1, 1, {"block": 16}),
    ("favor-noncausal", "pattern nc() { block 16; head f = kernel(favor, features = 16); head w = local(5) }", {},
     1, 1, {"block": 16}),
    ("favor-causal", "pattern fc() { causal; block 16; head f = kernel(favor, features = 16); head s = stride(7) }",
     {}, 1, 1, {"block": 16}),
]


def load(pattern, params):
    return patterncc.load(ROOT / pattern if pattern.endswith(".attn") else pattern, **params)


def run_case(case, n, rank, world):
    name, pattern, params, q_repeat, kv_divisor, options = case
    module = load(pattern, params)
    q_heads = module.num_heads * q_repeat
    kv_heads = q_heads // kv_divisor
    generator = torch.Generator().manual_seed(1234)  # the same inputs on every rank
    q = torch.randn(2, q_heads, n, HEAD_DIM, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(2, kv_heads, n, HEAD_DIM, dtype=torch.float64, generator=generator) for _ in range(2))
    weight = torch.randn(2, q_heads, n, HEAD_DIM, dtype=torch.float64, generator=generator)
    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = module(*whole)
    (expected * weight).sum().backward()

    shard = cp.plan(module, n, world, **options)
    attn = cp.ShardedAttention(module, shard=shard)
    mine = shard.positions(rank)
    local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
    out = attn(*local)
    (out * weight[:, :, mine]).sum().backward()
    errors = [float((out - expected[:, :, mine]).abs().max())]
    for part, full in zip(local, whole):
        grad_full = full.grad if full.grad is not None else torch.zeros_like(full)  # shared-QK never reads k
        grad_part = part.grad if part.grad is not None else torch.zeros_like(part)
        errors.append(float((grad_part - grad_full[:, :, mine]).abs().max()))
    return {"case": name, "rank": rank, "errors": errors, "bytes": attn.bytes_received,
            "planned": shard.bytes_received(rank, 2, q_heads, kv_heads, HEAD_DIM, torch.float64),
            "ring": shard.ring_bytes(rank, 2, kv_heads, HEAD_DIM, torch.float64), "order": shard.order}


def worker(rank, world, n, folder, names):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        results = [run_case(case, n, rank, world) for case in CASES if case[0] in names]
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
