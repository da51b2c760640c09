"""Attention dropout of set and hashed heads: one Philox stream shared by the CPU path and the Triton kernels.

The float64 reference drops the pairs `dropout_keep` names (the torch Philox, itself checked bit for bit against
Triton's `tl.randint`) from masked softmax attention, scaled by 1 / (1 - p): forward and q/k/v gradients with
that mask fixed, on the torch path and under the interpreter, including heads split into parts. Hashed heads:
the same over the union of the rounds' windows (softmax over it is what the rounds combine to), self rule
included.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EXAMPLES_DIR
from kernel_support import MODULE_TOLERANCE, build, make_inputs, torch_and_interpreter
from tolerance import assert_rms_close, forward_backward

import patterncc
import patterncc.nn
from patterncc.families.lsh import ops as lsh_ops
from patterncc.families.lsh.naive import lsh_union_mask
from patterncc.families.shared.dropout import Dropout, dropout_keep, dropout_offsets, philox_randint
from patterncc.mask import pattern_mask

PATTERNS = {
    "set": "pattern d(l = 8) { causal block 16 head a = local(l) | stride(l) head b = summary(l, 2) | global(3) }",
    # Heads split into disjoint parts (local | stride in their own orders): parts share the pairs' numbers.
    "split": "pattern p(l = 24) { causal block 16 head a = local(l) head b = stride(l) combine merged }",
}
# Set and hashed heads in one module (each family numbers its heads from 0).
HASHED_MODULE = ("pattern m() { causal block 16 head a = local(8) "
                 "head r = hashed(buckets = 4, rounds = 2, chunk = 8, shared_qk = true, seed = 3) }")


def test_torch_philox_is_tritons():
    """philox_randint equals tl.randint bit for bit (interpreter), for 64-bit offsets and seeds."""
    import triton
    import triton.language as tl

    @triton.jit
    def draw(OUT, OFFSETS, seed, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(OUT + o, tl.randint(seed, tl.load(OFFSETS + o)).to(tl.int64))

    offsets = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40 + 3]),
                         torch.randint(0, 2**45, (251,), generator=torch.Generator().manual_seed(1))])
    out = torch.empty(256, dtype=torch.int64)
    for seed in (0, 1, 2**31 + 5, 2**61 + 12345):
        draw[(1,)](out, offsets, seed, 256)
        assert torch.equal(philox_randint(seed, offsets), out & 0xFFFFFFFF), seed


def test_keep_rate_within_binomial_bounds():
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep(Dropout(p, seed=7), torch.arange(200_000, dtype=torch.int64))
        kept, n = int(keep.sum()), keep.numel()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) < 5 * sigma, (p, kept / n)


def _reference(pattern, q, k, v, dropout):
    """Masked softmax attention in float64 with the pairs dropout_keep drops set to 0 and the rest scaled."""
    batch, heads, n, dim = q.shape
    mask = pattern_mask(pattern, n)
    mask = mask.repeat_interleave(heads // mask.shape[0], dim=0)
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    i = torch.arange(n).view(n, 1)
    keep = dropout_keep(dropout, dropout_offsets(batch, heads, n, torch.arange(heads), i, i.view(1, n)))
    return (probabilities * keep * dropout.scale) @ v


@torch_and_interpreter
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_dropout_matches_reference(tmp_path, name, backend, dtype):
    pattern = patterncc.parse(PATTERNS[name])
    module = build(pattern, tmp_path)
    q, k, v, grad = make_inputs(2, module.NUM_HEADS * 2, module.NUM_HEADS, 56, 16, dtype)
    torch.manual_seed(3)
    seed = module.dropout_seed(0.3, module.HEAD_FAMILIES)

    tested = forward_backward(lambda a, b, c: module.eager_attention(a, b, c, 0.25, backend, [], None, 0.3, seed),
                              q, k, v, grad)
    dropout = Dropout(0.3, int(seed))
    golden = forward_backward(lambda a, b, c: _reference(pattern, a, b, c, dropout), q.double(), k.double(),
                              v.double(), grad.double())
    for tensor in ("out", "dq", "dk", "dv"):
        assert_rms_close(f"{name} {backend} {tensor}", tested[tensor], golden[tensor], MODULE_TOLERANCE[dtype])


@pytest.mark.parametrize("source", [PATTERNS["set"], HASHED_MODULE], ids=["set", "set-and-hashed"])
def test_same_seed_same_output_and_paths_agree(source):
    """Same torch seed, same output; the torch path equals the interpreter's kernels; another seed differs (for
    the module with hashed heads, in the hashed head too)."""
    attn = patterncc.load(source, head_dim=16)
    module = __import__("sys").modules[type(attn).__module__]
    q, k, v, _ = make_inputs(2, 2 * attn.num_heads, attn.num_heads, 48, 16, torch.float32)
    outputs = {}
    for backend in ("torch", "triton", "torch"):
        torch.manual_seed(11)
        outputs.setdefault(backend, []).append(module.attention(q, k, v, backend=backend, dropout_p=0.2))
    torch.testing.assert_close(outputs["torch"][0], outputs["torch"][1], rtol=0, atol=0)
    torch.testing.assert_close(outputs["triton"][0], outputs["torch"][0], rtol=1e-5, atol=1e-5)
    torch.manual_seed(12)
    other_seed = module.attention(q, k, v, dropout_p=0.2)
    for head in range(q.shape[1]):
        assert not torch.allclose(other_seed[:, head], outputs["torch"][0][:, head]), f"head {head}: no dropout"
    assert not torch.allclose(module.attention(q, k, v), outputs["torch"][0])


def test_dropout_streams_are_independent():
    """A module's hashed calls draw from streams of their own (Dropout.stream), not the set heads' (both number
    their heads from 0): two streams agree on about half the pairs at p = 0.5, as independent draws do."""
    offsets = torch.arange(100_000, dtype=torch.int64)
    dropout = Dropout(0.5, seed=123)
    agree = (dropout_keep(dropout, offsets) == dropout_keep(dropout.stream(1), offsets)).float().mean().item()
    assert abs(agree - 0.5) < 0.01, f"streams 0 and 1 agree on {agree:.3f} of the pairs (independent: 0.5)"


def _hashed_reference(q, k, v, rotations, chunk, causal, shared_qk, dropout):
    """Softmax attention over the union of the rounds' windows in float64 (self rule's fallback included), with
    the pairs dropout_keep drops set to 0 and the rest scaled."""
    batch, heads, n, dim = q.shape
    union = lsh_union_mask(q, k, rotations, chunk, causal, shared_qk)
    keys = torch.nn.functional.normalize(q, dim=-1) if shared_qk else k
    scores = ((q @ keys.transpose(-1, -2)) / math.sqrt(dim)).masked_fill(~union, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    i = torch.arange(n).view(n, 1)
    keep = dropout_keep(dropout, dropout_offsets(batch, heads, n, torch.arange(heads), i, i.view(1, n)))
    return (probabilities * keep * dropout.scale) @ v


# (n, head_dim, rounds, buckets, chunk, causal, shared_qk): duplicates across rounds, the self rule's fallback, and
# separate q and k with rows that have no key.
HASHED_CASES = [(40, 16, 3, 4, 8, True, True), (37, 16, 2, 8, 4, False, False)]


@torch_and_interpreter
@pytest.mark.parametrize("case", HASHED_CASES, ids=["causal-shared", "bidir-qk"])
def test_hashed_dropout_matches_reference(case, backend, dtype):
    n, dim, rounds, buckets, chunk, causal, shared_qk = case
    q, k, v, grad = make_inputs(2, 2, 2, n, dim, dtype)
    rotations = lsh_ops.lsh_rotations(2, rounds, dim, buckets, seed=5)
    dropout = Dropout(0.3, seed=2**40 + 17)
    tested = forward_backward(lambda a, b, c: lsh_ops.lsh_attention(a, b, c, rotations, chunk, causal, shared_qk,
                                                                    backend=backend, dropout=dropout), q, k, v, grad)
    if shared_qk:  # k is unused
        tested["dk"] = torch.zeros_like(k)
    golden = forward_backward(lambda a, b, c: _hashed_reference(a, b, c, rotations, chunk, causal, shared_qk,
                                                                dropout), q.double(), k.double(), v.double(),
                              grad.double())
    if shared_qk:
        golden["dk"] = torch.zeros_like(golden["dq"])
        fallback = lsh_union_mask(q, k, rotations, chunk, causal, shared_qk).diagonal(dim1=-2, dim2=-1)
        assert fallback.any(), "no row takes the self rule's fallback (its weight on v_i is dropped too)"
    for tensor in ("out", "dq", "dk", "dv"):
        assert_rms_close(f"hashed {case} {backend} {tensor}", tested[tensor], golden[tensor], MODULE_TOLERANCE[dtype])
    undropped = lsh_ops.lsh_attention(q, k, v, rotations, chunk, causal, shared_qk, backend=backend)
    assert not torch.allclose(undropped, tested["out"]), "dropout changed nothing"


def test_dropout_refused_where_not_implemented():
    attn = patterncc.load(EXAMPLES_DIR / "hybrid.attn", w=8, l=8)
    q, k, v, _ = make_inputs(1, 6, 6, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="kernel heads .linear attention. form no attention probabilities to drop, "
                                         "and this pattern has kernel heads"):
        attn(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\), got 1.0"):
        patterncc.load(EXAMPLES_DIR / "strided.attn")(q[:, :2], k[:, :2], v[:, :2], dropout_p=1.0)


@pytest.mark.parametrize("source", [PATTERNS["set"], HASHED_MODULE], ids=["set", "set-and-hashed"])
def test_compiled_dropout_equals_eager(source):
    attn = patterncc.load(source, head_dim=16) if "hashed" in source else patterncc.load(source)
    q, k, v, grad = make_inputs(2, 2, 2, 50, 16, torch.float64)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    eager = forward_backward(lambda a, b, c: attn(a, b, c, dropout_p=0.4), q, k, v, grad)
    torch.manual_seed(4)
    traced = forward_backward(lambda a, b, c: compiled(a, b, c, dropout_p=0.4), q, k, v, grad)
    for tensor in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(traced[tensor], eager[tensor], rtol=1e-12, atol=1e-12)


def test_layer_drops_only_in_training():
    layer = patterncc.nn.SparseSelfAttention(32, 4, PATTERNS["set"], dropout=0.5)
    x = torch.randn(2, 40, 32)
    torch.manual_seed(0)
    trained = layer(x)
    layer.eval()
    assert not torch.allclose(trained, layer(x))
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
