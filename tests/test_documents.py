"""Padding and packed documents (key_padding_mask, document_ids, cu_seqlens), every family.

The reference is independent of the packing code: each document is cut out by a Python loop and run through the
module's float64 reference (`patterncc.reference.module_reference`: dense per-document masks for set heads, the
LSH and linear-attention references for the others), padding rows are 0. Forward and q/k/v gradients, on the
torch path (float64) and the Triton kernels under the interpreter (float32).
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import MODULE_TOLERANCE, build, make_inputs, torch_and_interpreter
from tolerance import assert_rms_close, forward_backward

import patterncc
from patterncc.reference import module_reference

# Set heads whose pairs depend on absolute positions (global, summary), so a document that did not restart its
# positions would fail; a mix of all three families; a bidirectional one.
PATTERNS = {
    "set": """
pattern docs(l = 8) {
    causal
    block 16
    head a = local(l) | stride(l)
    head b = summary(l, 2) | global(3)
}""",
    "families": """
pattern mix() {
    causal
    block 16
    head near = local(5) | global(2)
    head lsh = hashed(buckets = 4, rounds = 2, chunk = 8, shared_qk = true, seed = 3)
    head lin = kernel(elu1)
}""",
    "bidirectional": """
pattern both(w = 6) {
    block 16
    head a = local(w) | global(2)
}""",
}
N = 50
# Row 0: documents of 13, 20 (block-straddling, not multiples of 16), 10, then 7 padding; row 1: a document of
# length 1, one of 30 interrupted by padding (its positions are counted among its own tokens), one of 15 whose id
# comes first in the row; row 2: padding only.
DOCUMENTS = torch.tensor([
    [0] * 13 + [1] * 20 + [2] * 10 + [-1] * 7,
    [5] + [3] * 20 + [-1] * 4 + [3] * 10 + [7] * 15,
    [-1] * N,
])


def reference(module, pattern, q, k, v, documents, buffers):
    """Each document alone through the module's float64 reference; padding rows 0."""
    out = torch.zeros(q.shape[:3] + v.shape[3:], dtype=torch.float64)
    for b in range(q.shape[0]):
        for doc in sorted(set(documents[b].tolist()) - {-1}):
            pos = (documents[b] == doc).nonzero().flatten()
            part = module_reference(module, pattern, q[b:b + 1, :, pos], k[b:b + 1, :, pos], v[b:b + 1, :, pos],
                                    buffers, q.shape[-1] ** -0.5)
            out[b, :, pos] = part[0]  # autograd records the assignment
    return out


@torch_and_interpreter
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_documents_match_per_document_reference(tmp_path, name, backend, dtype):
    pattern = patterncc.parse(PATTERNS[name])
    module = build(pattern, tmp_path)
    q, k, v, grad = make_inputs(3, module.NUM_HEADS * 2, module.NUM_HEADS, N, 16, dtype)
    buffers = module.default_buffers(16) if hasattr(module, "default_buffers") else {}
    extra = {"buffers": buffers} if buffers else {}
    tested = forward_backward(lambda a, b, c: module.attention(a, b, c, backend=backend, document_ids=DOCUMENTS,
                                                               **extra), q, k, v, grad)
    golden = forward_backward(lambda a, b, c: reference(module, pattern, a, b, c, DOCUMENTS, buffers),
                              q.double(), k.double(), v.double(), grad.double())
    for tensor in ("out", "dq", "dk", "dv"):
        assert_rms_close(f"{name} {backend} {tensor}", tested[tensor], golden[tensor], MODULE_TOLERANCE[dtype])
    padding = DOCUMENTS[:, None, :, None].expand_as(tested["out"]) < 0
    assert not tested["out"].isnan().any() and not tested["out"][padding].any(), "padding rows must be 0"


def test_padding_mask_and_cu_seqlens_say_the_same(tmp_path):
    """key_padding_mask alone is one document of the real tokens; cu_seqlens on a packed row equals the same
    documents given as ids; both combine with document_ids as padding."""
    module = build(patterncc.parse(PATTERNS["set"]), tmp_path)
    q, k, v, _ = make_inputs(2, 2, 2, N, 16, torch.float64)
    padding = torch.zeros(2, N, dtype=torch.bool)
    padding[0, :5] = True  # left padding
    padding[1, 40:] = True  # right padding
    ids = torch.where(padding, -1, 0)
    torch.testing.assert_close(module.attention(q, k, v, key_padding_mask=padding),
                               module.attention(q, k, v, document_ids=ids), rtol=0, atol=0)
    offsets = torch.tensor([0, 13, 33, 43], dtype=torch.int32)
    packed_ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 10 + [-1] * 7])
    torch.testing.assert_close(module.attention(q[:1], k[:1], v[:1], cu_seqlens=offsets),
                               module.attention(q[:1], k[:1], v[:1], document_ids=packed_ids), rtol=0, atol=0)
    both = module.attention(q, k, v, document_ids=torch.zeros(2, N, dtype=torch.int64), key_padding_mask=padding)
    torch.testing.assert_close(both, module.attention(q, k, v, document_ids=ids), rtol=0, atol=0)


def test_loaded_module_forward_takes_documents_and_compiles():
    """The module's forward takes the same arguments, and a compiled module (one operator) gives the same output
    and gradients."""
    attn = patterncc.load(PATTERNS["set"])
    q, k, v, grad = make_inputs(3, 2, 2, N, 16, torch.float64)
    eager = forward_backward(lambda a, b, c: attn(a, b, c, document_ids=DOCUMENTS), q, k, v, grad)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    traced = forward_backward(lambda a, b, c: compiled(a, b, c, document_ids=DOCUMENTS), q, k, v, grad)
    for tensor in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(traced[tensor], eager[tensor], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(document_ids=torch.zeros(2, 49, dtype=torch.int64)), r"shape \(batch, n\) = \(2, 50\), got shape \(2, 49\)"),
    (dict(document_ids=torch.zeros(2, 50)), "must be an integer tensor"),
    (dict(key_padding_mask=torch.zeros(2, 50, dtype=torch.int64)), "must be a bool tensor"),
    (dict(cu_seqlens=torch.tensor([0, 10])), "q must have batch 1, got 2"),
    (dict(cu_seqlens=torch.tensor([0, 10]), document_ids=torch.zeros(2, 50, dtype=torch.int64)), "not both"),
])
def test_document_argument_errors(kwargs, message):
    attn = patterncc.load(PATTERNS["set"])
    q, k, v, _ = make_inputs(2, 2, 2, N, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        attn(q, k, v, **kwargs)


def test_cu_seqlens_values_are_checked():
    attn = patterncc.load(PATTERNS["set"])
    q, k, v, _ = make_inputs(1, 2, 2, N, 16, torch.float32)
    with pytest.raises(ValueError, match=r"non-decreasing offsets in 0..n = 0..50, got \[0, 30, 20\]"):
        attn(q, k, v, cu_seqlens=torch.tensor([0, 30, 20]))
    with pytest.raises(ValueError, match=r"got \[0, 60\]"):
        attn(q, k, v, cu_seqlens=torch.tensor([0, 60]))
