"""The generated kernels on a real CUDA GPU: every example, fp32/fp16/bf16, every head dim, outputs and all
gradients against float64 masked attention. Skipped without CUDA; run on a GPU machine with

    TRITON_INTERPRET=0 python -m pytest tests/gpu -q

(TRITON_INTERPRET must be 0 from the start: conftest.py otherwise turns the interpreter on for the CPU suite).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import EXAMPLES_DIR
from kernel_support import build, check_against_reference, family_results
from tolerance import assert_rms_close

import patterncc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run with TRITON_INTERPRET=0"),
]

CASES = [("strided", dict(l=128)), ("fixed", dict(l=128, c=16)), ("local", dict(w=256)),
         ("bigbird", dict()), ("dilated", dict())]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(pattern, generated module) per example, built once."""
    folder = tmp_path_factory.mktemp("generated_gpu")
    out = {}
    for name, params in CASES:
        pattern = patterncc.parse(EXAMPLES_DIR / f"{name}.attn", **params)
        out[name] = (pattern, build(pattern, folder))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", [16, 32, 64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kernels_on_gpu(compiled, name, dim, dtype):
    pattern, module = compiled[name]
    n = 1000  # not a multiple of any tile
    # fp32: 10x the eager fp32 error (FlexAttention's rule); 16-bit: kernels keep softmax statistics in fp32,
    # so they must be within 1.1x of the eager computation in the same 16-bit dtype.
    factor = 10.0 if dtype == torch.float32 else 1.1
    check_against_reference(module, pattern, n, dim, dtype=dtype, backend="triton", batch=2, head_multiple=2,
                            kv_heads=module.NUM_HEADS, factor=factor, device="cuda")


FAMILY_CASES = [("reformer", dict()), ("linear", dict()), ("hybrid", dict(w=128, l=128))]
# RMS error relative to the float64 result's RMS, per input dtype (16-bit inputs carry ~3 significant digits).
FAMILY_RMS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", [32, 64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("name", [c[0] for c in FAMILY_CASES])
def test_family_kernels_on_gpu(tmp_path, name, dim, dtype):
    """Hashed and kernel heads (alone and mixed with set heads) against their float64 references."""
    params = dict(FAMILY_CASES)[name]
    pattern = patterncc.parse(EXAMPLES_DIR / f"{name}.attn", **params)
    module = build(pattern, tmp_path)
    tested, golden = family_results(module, pattern, 1000, dim, dtype, "triton", head_multiple=2, kv_divisor=2,
                                    device="cuda")
    for key in ("out", "dq", "dk", "dv"):
        assert_rms_close(f"{name} {key}", tested[key], golden[key], FAMILY_RMS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dim", [64, 128], ids=lambda d: f"D{d}")
def test_split_k_decode_on_gpu(compiled, dim, dtype):
    """Decode steps through the split-K kernel equal the torch path's on the same cache (strided, 2048 positions,
    grouped-query heads)."""
    _, module = compiled["strided"]
    heads, n, prompt = 4, 2048, 1900
    q, k, v = (torch.randn(1, heads if i == 0 else 2, n, dim, device="cuda", dtype=dtype) for i in range(3))
    outputs = {}
    for backend in ("torch", "triton"):
        cache = module.new_cache(1, 2, dim, n, dtype, "cuda")
        module.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], cache, backend="triton")
        outputs[backend] = module.decode(q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], cache, backend=backend)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(outputs["triton"], outputs["torch"], rtol=tolerance, atol=tolerance)
