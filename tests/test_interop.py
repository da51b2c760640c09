"""patterncc.to_flex and patterncc.to_block_layout against the dense reference mask and the patterncc module."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES_DIR
from torch.nn.attention.flex_attention import create_mask, flex_attention

import patterncc
from patterncc.mask import pattern_mask

# Set-head examples with parameters small enough that n = 200 holds several periods, windows and blocks.
CASES = {
    "strided": dict(l=32),
    "fixed": dict(l=32, c=4),
    "bigbird": dict(w=40, g=16, heads=3),
    "dilated": dict(w=8),
    "local": dict(w=40, heads=2),
}
N = 200  # not a multiple of any block below


def _blocks(dense: torch.Tensor, block: int):
    """(any, all) per (head, query block, key block) of a dense [H, n, n] mask; padding counts as not allowed."""
    heads, n, _ = dense.shape
    size = -(-n // block) * block
    padded = torch.zeros(heads, size, size, dtype=torch.int64)
    padded[:, :n, :n] = dense
    counts = padded.view(heads, size // block, block, size // block, block).sum(dim=(2, 4))
    return counts > 0, counts == block * block


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_block_layout_is_exact(name, block):
    dense = pattern_mask(patterncc.parse(EXAMPLES_DIR / f"{name}.attn", **CASES[name]), N)
    layout = patterncc.to_block_layout(EXAMPLES_DIR / f"{name}.attn", N, block, **CASES[name])
    nonempty, _ = _blocks(dense, block)
    assert layout.dtype == torch.int64 and layout.shape == nonempty.shape
    assert torch.equal(layout, nonempty.to(torch.int64))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", sorted(CASES))
def test_flex_equals_patterncc(name):
    params = CASES[name]
    path = EXAMPLES_DIR / f"{name}.attn"
    mask_mod, block_mask = patterncc.to_flex(path, N, block=64, **params)
    dense = pattern_mask(patterncc.parse(path, **params), N)
    heads = dense.shape[0]
    # mask_mod is the pattern's predicate, head by head.
    assert torch.equal(create_mask(mask_mod, 1, heads, N, N, device="cpu")[0], dense)
    # The block mask is exact: FULL blocks are all allowed, visited blocks are not empty, none is missing.
    nonempty, full = _blocks(dense, 64)
    flex_dense = block_mask.to_dense()[0].bool()  # partial and full blocks
    assert torch.equal(flex_dense, nonempty)
    full_mask = torch.zeros_like(full)
    for h in range(heads):
        for row in range(full.shape[1]):
            count = int(block_mask.full_kv_num_blocks[0, h, row])
            full_mask[h, row, block_mask.full_kv_indices[0, h, row, :count].long()] = True
    assert torch.equal(full_mask, full)
    # And the output equals the module's.
    attn = patterncc.load(path, **params)
    q, k, v = (torch.randn(2, heads, N, 32, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), attn(q, k, v), rtol=1e-10,
                               atol=1e-10)


def test_data_dependent_heads_are_refused():
    with pytest.raises(patterncc.PatternUsageError, match=r"head 0 \(`lsh`\) is a hashed head"):
        patterncc.to_flex(EXAMPLES_DIR / "reformer.attn", 128)
    with pytest.raises(patterncc.PatternUsageError, match=r"kernel head"):
        patterncc.to_block_layout(EXAMPLES_DIR / "hybrid.attn", 128)


def test_bad_sizes_are_usage_errors():
    with pytest.raises(patterncc.PatternUsageError, match="n must be a positive integer"):
        patterncc.to_block_layout(EXAMPLES_DIR / "strided.attn", 0)
    with pytest.raises(patterncc.PatternUsageError, match="block must be a positive integer"):
        patterncc.to_block_layout(EXAMPLES_DIR / "strided.attn", 64, block=0)
