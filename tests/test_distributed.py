"""Context parallel (patterncc.distributed): the plan, checked against dense masks at small n; and spawned gloo
process groups of 2 and 4 ranks whose sharded outputs and q/k/v gradients equal one process's, receiving exactly
the bytes the plan counts."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.multiprocessing as mp
from distributed_support import CASES, ROOT, load, worker

import patterncc
import patterncc.distributed as cp
from patterncc.mask import pattern_mask

# float64 everywhere: sharding changes only the order of sums (the LSH and kernel heads' included).
TOLERANCE = 1e-10


# 4 ranks rerun the families and orders on another partition (a subset, to bound the suite's time).
FOUR_RANKS = ["strided", "strided-gqa", "fixed", "bigbird-balanced", "hybrid", "reformer", "favor-causal"]


@pytest.mark.parametrize("world, n, names", [(2, 200, [c[0] for c in CASES]), (4, 203, FOUR_RANKS)],
                         ids=["2-ranks", "4-ranks"])
def test_sharded_outputs_and_gradients_equal_one_process(tmp_path, world, n, names):
    """Every case of distributed_support.CASES on 2 ranks (every set example, a hashed and a kernel example,
    mixed families, grouped-query attention, FAVOR+ causal and not, the balanced order), a subset on 4, with n
    not a multiple of world x block."""
    for case in CASES:  # compiled once here, so the ranks find every module in the cache
        load(case[1], case[2])
    context = mp.start_processes(worker, args=(world, n, str(tmp_path), names), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish in 600 s")
    results = [r for rank in range(world) for r in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    assert len(results) == world * len(names)
    for r in results:
        assert max(r["errors"]) < TOLERANCE, r
        assert r["bytes"] == r["planned"], r  # measured on the wire == the plan's count
    by_case = {r["case"]: r for r in results}
    assert by_case["strided"]["order"] == "zigzag" and by_case["bigbird-balanced"]["order"] == "balanced"
    if "bigbird" in by_case:
        assert by_case["bigbird"]["order"] == "contiguous"


@pytest.mark.parametrize("name", ["strided", "fixed", "local", "bigbird", "dilated", "hybrid"])
@pytest.mark.parametrize("world, n, block", [(2, 200, 16), (3, 1000, 64), (4, 203, 8)])
def test_each_rank_reads_exactly_the_keys_its_rows_attend(name, world, n, block):
    """The plan's reads per rank and set head equal the union of the dense mask's rows that rank owns."""
    case = next(c for c in CASES if c[0] == name)
    module = load(case[1], case[2])
    shard = cp.plan(module, n, world, block=block)
    generated = shard.generated
    dense = pattern_mask(patterncc.parse(ROOT / case[1], **case[2]), n)
    owned = torch.cat([shard.positions(r) for r in range(world)])
    assert sorted(owned.tolist()) == list(range(n))  # every position owned once
    for rank in range(world):
        mine = shard.positions(rank)
        assert torch.equal(shard.owner[mine], torch.full_like(mine, rank))
        assert torch.equal(shard.local_index[mine], torch.arange(len(mine)))
        for slot, head in enumerate(generated.SET_HEADS):
            reads = torch.unique(torch.cat([shard.reads[(rank, m)] for m in generated.HEAD_MASKS[slot]]))
            assert torch.equal(reads, torch.nonzero(dense[head][mine].any(0))[:, 0]), (rank, head)


def test_zigzag_balances_causal_work_and_ownership_follows_blocks():
    module = load("examples/strided.attn", {"l": 16})
    shard = cp.plan(module, 1024, 4, block=32)
    assert shard.order == "zigzag"
    assert [[(a, b) for a, b in runs] for runs in shard.runs][0] == [(0, 128), (896, 1024)]
    assert all(a % 32 == 0 for runs in shard.runs for a, _ in runs)
    assert shard.imbalance < 1.05
    contiguous = cp.plan(module, 1024, 4, block=32, order="contiguous")
    assert contiguous.imbalance > shard.imbalance  # later rows of a causal pattern cost more
    balanced = cp.plan(module, 1024, 4, block=32, order="balanced")
    assert balanced.imbalance < contiguous.imbalance


def test_local_pattern_reads_only_neighbouring_keys():
    """local(w): a rank reads w keys before its first row (causal) from its neighbour, nothing else."""
    module = load("examples/local.attn", {"w": 32, "heads": 1})
    shard = cp.plan(module, 4096, 4, order="contiguous")
    for rank in range(4):
        remote = shard.remote_reads(rank, 0)
        first = int(shard.positions(rank)[0])
        assert remote.tolist() == list(range(max(0, first - 32), first))
    assert shard.bytes_received(3, 1, 1, 1, 64) == 32 * 2 * 64 * 4
    assert shard.bytes_received(3, 1, 1, 1, 64) * 90 < shard.ring_bytes(3, 1, 1, 64)


def test_plan_errors_name_what_to_change():
    module = load("examples/strided.attn", {"l": 16})
    with pytest.raises(patterncc.PatternUsageError, match="n=100 has 2 blocks of 64 positions.*needs at least 8"):
        cp.plan(module, 100, 4)
    with pytest.raises(patterncc.PatternUsageError, match="order must be one of"):
        cp.plan(module, 1000, 2, order="spiral")
    with pytest.raises(patterncc.PatternUsageError, match="parameters go to patterncc.load"):
        cp.plan(module, 1000, 2, l=8)
    with pytest.raises(patterncc.PatternUsageError, match="world_size must be a positive integer"):
        cp.plan(module, 1000, 0)
    shard = cp.plan(module, 1000, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard.positions(2)
    with pytest.raises(patterncc.PatternUsageError, match="planned for pattern key"):
        cp.ShardedAttention(load("examples/strided.attn", {"l": 8}), shard=shard)


def test_the_torchrun_example_runs_and_matches_one_process():
    """examples/context_parallel.py under torchrun (2 CPU processes, a short sequence)."""
    import re
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             str(ROOT / "examples" / "context_parallel.py"), "--seq-len", "1024", "--steps", "1",
                             "--check"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [float(e) for e in re.findall(r"max \|out - one process\| (\S+)", result.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-5, result.stdout
    assert "zigzag ownership" in result.stdout


def test_tiles_reading_only_own_keys_run_while_the_exchange_is_under_way():
    """The rank's query tiles split into those whose rows read only its own keys (computed before waiting for the
    exchange) and the rest: with local(32) and contiguous ownership, only a rank's first tile reads remote keys."""
    from patterncc.families.blocksparse.cpu import cpu_gather

    module = load("examples/local.attn", {"w": 32, "heads": 1})
    shard = cp.plan(module, 4096, 4, order="contiguous")
    attn = cp.ShardedAttention(module, shard=shard)
    layout = shard.generated.PATTERN_MASKS.layout(4096, "cpu")
    _, _, _, (own, remote), _ = attn._rank_plan(layout, cpu_gather(layout, 0), 0, 1, "cpu")
    assert (own, remote) == ([(17, 32)], [(16, 17)])  # rank 1 holds tiles 16..31 of 64 positions
    _, _, _, (own, remote), _ = attn._rank_plan(layout, cpu_gather(layout, 0), 0, 0, "cpu")
    assert (own, remote) == ([(0, 16)], [])
