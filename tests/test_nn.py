"""patterncc.nn.SparseSelfAttention: shapes, grouped-query attention, its errors, and the training example."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES_DIR, ROOT

import patterncc
import patterncc.nn


def test_layer_is_projections_around_the_pattern():
    """The layer equals its projections and the pattern's module applied by hand (GQA: 4 query heads, 2 kv)."""
    layer = patterncc.nn.SparseSelfAttention(32, 4, EXAMPLES_DIR / "strided.attn", num_kv_heads=2, l=16)
    layer = layer.double()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    q = layer.q_proj(x).view(2, 70, 4, 8).transpose(1, 2)
    k, v = layer.kv_proj(x).view(2, 70, 2, 2, 8).permute(2, 0, 3, 1, 4)
    attn = patterncc.load(EXAMPLES_DIR / "strided.attn", l=16)
    want = layer.out_proj(attn(q, k, v).transpose(1, 2).reshape(2, 70, 32))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_dropout_needs_set_heads():
    with pytest.raises(patterncc.PatternUsageError, match="this pattern has kernel heads"):
        patterncc.nn.SparseSelfAttention(32, 8, EXAMPLES_DIR / "linear.attn", dropout=0.1)


def test_head_count_as_a_parameter():
    """linear.attn's head count is a parameter: a 4-head layer works with heads=4 and says what to change
    without it."""
    layer = patterncc.nn.SparseSelfAttention(32, 4, EXAMPLES_DIR / "linear.attn", heads=4)
    assert layer(torch.randn(1, 20, 32)).shape == (1, 20, 32)
    with pytest.raises(patterncc.PatternUsageError, match=r"num_heads 4 is not a multiple of the pattern's 8 heads"
                                                          r".*heads=4"):
        patterncc.nn.SparseSelfAttention(32, 4, EXAMPLES_DIR / "linear.attn")


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=30, num_heads=4), "embed_dim 30 is not a multiple of num_heads 4"),
    (dict(embed_dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads 3 does not divide num_heads 4"),
    (dict(embed_dim=32, num_heads=4, dropout=1.5), r"dropout must be a number in \[0, 1\), got 1.5"),
    (dict(embed_dim=32, num_heads=0), "num_heads must be a positive integer"),
])
def test_layer_errors(kwargs, message):
    with pytest.raises(patterncc.PatternUsageError, match=message):
        patterncc.nn.SparseSelfAttention(pattern=EXAMPLES_DIR / "strided.attn", **kwargs)


def test_layer_checks_its_input():
    layer = patterncc.nn.SparseSelfAttention(32, 4, EXAMPLES_DIR / "strided.attn")
    with pytest.raises(ValueError, match=r"x must be \(batch, n, embed_dim=32\), got \(2, 10, 16\)"):
        layer(torch.randn(2, 10, 16))


def test_training_example_runs(tmp_path):
    """examples/train_lm.py, shortened: both models train, the plot is written."""
    out = tmp_path / "loss.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_lm.py"), "--steps", "3", "--context",
                             "64", "--batch", "2", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "patterncc (strided): train loss" in result.stdout and "dense causal SDPA: train loss" in result.stdout
    assert out.stat().st_size > 0
