"""The `random(r, seed)` primitive's block table: which key blocks each query block sees.

Each query block sees r key blocks drawn without replacement from its allowed key blocks (those at or below
the diagonal when causal), chosen by a seeded integer hash so the table is the same on every run, machine,
torch version and device: the r allowed key blocks with the smallest hash(seed, query block, key block).
Self-contained (torch only): `patterncc compile` copies this file's functions into generated modules.
"""

import torch

_MASK31 = 0x7FFFFFFF


def _mix31(x: torch.Tensor) -> torch.Tensor:
    # An avalanche integer hash on 31-bit values; every product stays below 2**63, so int64 never wraps.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK31
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK31
    return (x >> 16) ^ x


def random_block_table(num_q_blocks: int, num_k_blocks: int, r: int, seed: int, causal: bool) -> torch.Tensor:
    """Boolean (num_q_blocks, num_k_blocks): True where query block qb sees key block kb."""
    qb = torch.arange(num_q_blocks, dtype=torch.int64)[:, None]
    kb = torch.arange(num_k_blocks, dtype=torch.int64)[None, :]
    h = _mix31(_mix31(_mix31(torch.full_like(qb, seed & _MASK31)) ^ qb) ^ kb)
    key = h * (1 << 31) + kb  # ties broken by block index, so the order is total
    allowed = (kb <= qb) if causal else torch.ones_like(key, dtype=torch.bool)
    key = torch.where(allowed, key, torch.iinfo(torch.int64).max)
    take = min(r, num_k_blocks)
    chosen = torch.topk(key, take, dim=1, largest=False).indices
    table = torch.zeros(num_q_blocks, num_k_blocks, dtype=torch.bool)
    table.scatter_(1, chosen, True)
    return table & allowed
