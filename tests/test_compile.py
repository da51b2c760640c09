"""torch.compile, torch.export, the meta device and pickling of patterncc modules.

Every family's module is one custom operator under tracing (patterncc/families/shared/traced.py): the tests
check a whole graph with no break, one compile for three sequence lengths (dynamic n), outputs and q/k/v
gradients equal to eager, export (strict and not) replayed at a new n, shapes on the meta device, and
`torch.save` of a whole model loaded by a fresh process. The compiled graphs use the `aot_eager` backend: it
traces forward and backward as inductor does, without needing a C++ compiler on the machine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES_DIR
from tolerance import forward_backward
from torch._dynamo.testing import CompileCounterWithBackend

import patterncc

# One example per family mix: set heads, hashed heads, kernel heads, and all three in one module.
FAMILY_EXAMPLES = ["strided", "reformer", "linear", "hybrid"]
LENGTHS = (100, 130, 200)  # not multiples of the block, nor of each other
HEAD_DIM = 32


def _inputs(attn, n, batch=2):
    return [torch.randn(batch, attn.num_heads, n, HEAD_DIM, dtype=torch.float64) for _ in range(3)]


def _assert_same(compiled, eager, where):
    for name in ("out", "dq", "dk", "dv"):
        want = eager[name]
        got = compiled[name]
        if want is None:  # an input no head reads (keys of shared-QK hashed heads): zero gradient, or none
            assert got is None or not got.any(), f"{name} ({where}): gradient of an input no head reads"
            continue
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name} ({where}): {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("example", FAMILY_EXAMPLES)
def test_compile_fullgraph_dynamic_length(example):
    """fullgraph=True compiles once for three sequence lengths; outputs and gradients equal eager."""
    attn = patterncc.load(EXAMPLES_DIR / f"{example}.attn", head_dim=HEAD_DIM)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attn, fullgraph=True, dynamic=True, backend=counter)
    for n in LENGTHS:
        q, k, v = _inputs(attn, n)
        grad = torch.randn_like(q)
        _assert_same(forward_backward(compiled, q, k, v, grad), forward_backward(attn, q, k, v, grad),
                     f"{example}, n={n}")
    assert counter.frame_count == 1, f"{example}: {counter.frame_count} compiles for n in {LENGTHS}"


@pytest.mark.parametrize("example", FAMILY_EXAMPLES)
def test_one_graph_no_breaks(example):
    attn = patterncc.load(EXAMPLES_DIR / f"{example}.attn", head_dim=HEAD_DIM)
    explained = torch._dynamo.explain(attn)(*_inputs(attn, 100))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("example", ["strided", "hybrid"])
def test_export_with_dynamic_length(example, strict):
    """torch.export with n symbolic: the exported program holds the operator and runs at another n."""
    attn = patterncc.load(EXAMPLES_DIR / f"{example}.attn", head_dim=HEAD_DIM)
    n = torch.export.Dim("n", min=2, max=4096)
    exported = torch.export.export(attn, tuple(_inputs(attn, 130)), dynamic_shapes=({2: n}, {2: n}, {2: n}),
                                   strict=strict)
    calls = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert [c for c in calls if "getitem" not in c] == [f"patterncc_{attn_key(attn)}.{operator(attn)}.default"], calls
    q, k, v = _inputs(attn, 200)
    torch.testing.assert_close(exported.module()(q, k, v), attn(q, k, v), rtol=1e-12, atol=1e-12)


def attn_key(attn):
    return sys.modules[type(attn).__module__].PATTERN_KEY


def operator(attn):
    """The traced operator: set-head modules' returns the log-sum-exp its backward takes (no recomputed forward)."""
    return "attention_lse" if set(attn.head_families) == {"set"} else "attention"


def test_compile_before_buffers_are_drawn_says_how():
    """Hashed heads draw their rotations at the first call: compiling before that is a clear error."""
    attn = patterncc.load(EXAMPLES_DIR / "reformer.attn")
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"head_dim=32"):
        compiled(*_inputs(attn, 64))


@pytest.mark.parametrize("example", FAMILY_EXAMPLES)
def test_meta_device(example):
    attn = patterncc.load(EXAMPLES_DIR / f"{example}.attn", head_dim=HEAD_DIM).to("meta")
    q, k, v = (x.to("meta") for x in _inputs(attn, 130))
    out = attn(q, k, v)
    assert out.device.type == "meta" and out.shape == q.shape


def test_pickled_model_loads_in_a_fresh_process(tmp_path):
    """torch.save of a whole model holding loaded modules (each load makes its class from generated code):
    a fresh process unpickles it and computes the same output."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "fixed": patterncc.load(EXAMPLES_DIR / "fixed.attn", l=32, c=4),
        "reformer": patterncc.load(EXAMPLES_DIR / "reformer.attn", head_dim=HEAD_DIM),
    })
    assert type(patterncc.load(EXAMPLES_DIR / "fixed.attn", l=32, c=4)) is type(model["fixed"])  # one class
    inputs = {name: _inputs(attn, 96) for name, attn in model.items()}
    expected = {name: attn(*inputs[name]) for name, attn in model.items()}
    torch.save({"model": model, "inputs": inputs, "expected": expected}, tmp_path / "model.pt")
    script = ("import sys, torch\n"
              "saved = torch.load(sys.argv[1], weights_only=False)\n"
              "for name, attn in saved['model'].items():\n"
              "    torch.testing.assert_close(attn(*saved['inputs'][name]), saved['expected'][name], rtol=0, atol=0)\n"
              "print('same', sorted(saved['model']))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt")], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "same ['fixed', 'reformer']"


@pytest.mark.parametrize("example", ["strided", "reformer"])
def test_operators_pass_opcheck(example):
    """torch.library.opcheck: the fake implementations agree with the real ones (shapes, strides, dtypes) and the
    autograd registration is sound, for inputs that are non-contiguous views (as a projection's transpose)."""
    attn = patterncc.load(EXAMPLES_DIR / f"{example}.attn", head_dim=HEAD_DIM)
    module = sys.modules[type(attn).__module__]
    q, k, v = (torch.randn(2, 100, attn.num_heads, HEAD_DIM, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for _ in range(3))
    buffers = [getattr(attn, name) for name in getattr(module, "BUFFERS", [])]
    documents = torch.tensor([[0] * 40 + [1] * 50 + [-1] * 10, [2] * 100])
    torch.library.opcheck(module.ATTENTION_OP, (q, k, v, HEAD_DIM ** -0.5, "auto", buffers, None, 0.0, None))
    torch.library.opcheck(module.ATTENTION_OP, (q, k, v, HEAD_DIM ** -0.5, "auto", buffers, documents, 0.0, None))
    if not buffers:  # set heads: attention dropout, its seed an input of the operator
        seed = torch.tensor(1234, dtype=torch.int64)
        torch.library.opcheck(module.ATTENTION_OP, (q, k, v, HEAD_DIM ** -0.5, "auto", buffers, None, 0.25, seed))
        # Set-head modules trace to the operator that returns the log-sum-exp its backward takes.
        for dropout in ((0.0, None), (0.25, seed)):
            torch.library.opcheck(module.ATTENTION_LSE_OP, (q, k, v, HEAD_DIM ** -0.5, "auto", *dropout))


@pytest.mark.parametrize("name, source, backend", [
    ("strided-gqa", EXAMPLES_DIR / "strided.attn", "torch"),
    ("split", "pattern p(l = 24) { causal block 16 head a = local(l) head b = stride(l) combine merged }", "torch"),
    ("strided-gqa", EXAMPLES_DIR / "strided.attn", "triton")], ids=["torch-strided-gqa", "torch-split", "triton"])
def test_lse_operator_backward_equals_eager(name, source, backend):
    """The set-head operator's backward (from the forward's LSE, no recomputed forward) gives eager's gradients:
    grouped-query attention, heads split into parts, with and without dropout; the CPU path and the kernels (split
    heads in the kernels: their backward is eager's own, tested in test_dropout and test_kernels)."""
    attn = patterncc.load(source, l=8) if name == "strided-gqa" else patterncc.load(source)
    module = sys.modules[type(attn).__module__]
    dtype = torch.float64 if backend == "torch" else torch.float32
    generator = torch.Generator().manual_seed(0)
    heads, n = 2 * attn.num_heads, 70 if backend == "torch" else 40  # the interpreter is slow
    q = torch.randn(2, heads, n, 16, generator=generator, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, heads // 2, n, 16, generator=generator, dtype=dtype, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(2, heads, n, 16, generator=generator, dtype=dtype)
    for dropout_p, seed in ((0.0, None), (0.3, torch.tensor(77))):
        out = module.ATTENTION_LSE_OP(q, k, v, 0.25, backend, dropout_p, seed)[0]
        via_operator = torch.autograd.grad(out, (q, k, v), grad)
        eager = module.eager_attention(q, k, v, 0.25, backend, [], None, dropout_p, seed)
        want = torch.autograd.grad(eager, (q, k, v), grad)
        tolerance = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(out, eager, rtol=tolerance, atol=tolerance)
        for got, expected in zip(via_operator, want):
            torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
