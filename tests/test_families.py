"""One generated module runs every head family of a pattern: set heads on the block-sparse kernels, hashed heads
on the LSH kernels, kernel heads on the linear-attention kernels. Each head's output and every gradient is
checked against that family's float64 reference, with repeated and grouped-query heads; random draws are module
buffers that survive state_dict round trips; causal linear attention decodes step by step."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES_DIR, run_aot_worker
from kernel_support import build, family_results, make_inputs
from tolerance import assert_rms_close

import patterncc

# fp64 on the torch path: the same math, so agreement to rounding; fp32 Triton kernels (interpreter): 1e-4 RMS.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)],
                         ids=["torch-fp64", "triton-fp32"])
@pytest.mark.parametrize("head_multiple,kv_divisor", [(1, 1), (2, 2), (1, 3)], ids=["H6", "H12-gqa2", "H6-gqa3"])
def test_hybrid_heads_match_their_family_references(tmp_path, backend, dtype, head_multiple, kv_divisor):
    """examples/hybrid.attn: 4 set heads (local, stride | local) and 2 linear-attention heads in one module."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp16, bf16 and fp32")
    pattern = patterncc.parse(EXAMPLES_DIR / "hybrid.attn", w=8, l=8)
    module = build(pattern, tmp_path)
    assert module.HEAD_FAMILIES == ["set"] * 4 + ["kernel"] * 2
    tested, golden = family_results(module, pattern, 40, 16, dtype, backend, head_multiple, kv_divisor)
    for name in ("out", "dq", "dk", "dv"):
        assert_rms_close(name, tested[name], golden[name], TOLERANCE[dtype])


INTERLEAVED_FAMILIES = """
pattern mix(w = 6) {
    causal
    block 16
    head near = local(w)
    head lin[2] = kernel(relu)
    head far = stride(4)
    head lsh = hashed(buckets = 4, rounds = 2, chunk = 8, shared_qk = true, seed = 3)
}
"""


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)],
                         ids=["torch-fp64", "triton-fp32"])
def test_families_in_any_head_order(tmp_path, backend, dtype):
    """Set heads 0 and 3 are not contiguous: the module selects, runs and reassembles heads in order."""
    pattern = patterncc.parse(INTERLEAVED_FAMILIES)
    module = build(pattern, tmp_path)
    assert module.HEAD_FAMILIES == ["set", "kernel", "kernel", "set", "hashed"]
    tested, golden = family_results(module, pattern, 37, 16, dtype, backend, head_multiple=2)
    for name in ("out", "dq", "dk", "dv"):
        assert_rms_close(name, tested[name], golden[name], TOLERANCE[dtype])


def test_interleaved_layer_runs_its_group_family(tmp_path):
    text = INTERLEAVED_FAMILIES.replace("block 16", "block 16\n    combine interleaved")
    pattern = patterncc.parse(text)
    for layer, family in [(0, "set"), (1, "kernel"), (3, "hashed")]:
        module = build(pattern, tmp_path, layer=layer)
        assert set(module.HEAD_FAMILIES) == {family}, (layer, module.HEAD_FAMILIES)
        tested, golden = family_results(module, pattern, 24, 16, torch.float64, "torch", layer=layer)
        for name in ("out", "dq", "dk", "dv"):
            assert_rms_close(f"layer {layer} {name}", tested[name], golden[name], 1e-9)


def test_random_draws_are_buffers_saved_and_loaded(tmp_path):
    """Rotations (hashed) and projections (favor) are drawn from the pattern's seeds, live in state_dict, and a
    fresh module that loads them before its first call computes the same thing."""
    text = """
    pattern rf() {
        causal
        head lsh[2] = hashed(buckets = 4, rounds = 2, chunk = 8, seed = 5)
        head perf = kernel(favor, features = 16, seed = 2)
    }"""
    module = build(patterncc.parse(text), tmp_path)
    first = module.RfAttention(backend="torch")
    assert first.state_dict() == {}  # nothing drawn before head_dim is known
    q, k, v, _ = make_inputs(1, 3, 3, 30, 16, torch.float64)
    out = first(q, k, v)
    state = first.state_dict()
    assert sorted(state) == ["projection_1_perf", "rotations_0_lsh"]
    assert state["rotations_0_lsh"].shape == (2, 2, 16, 2) and state["projection_1_perf"].shape == (1, 16, 16)
    assert not torch.equal(state["rotations_0_lsh"][0], state["rotations_0_lsh"][1]), "heads of a group share draws"
    # Deterministic: a new module draws the same buffers from the same seeds.
    torch.testing.assert_close(module.RfAttention(backend="torch", head_dim=16).state_dict(), state, rtol=0, atol=0)
    # A module loaded before its first call uses the saved draws, not fresh ones.
    changed = {name: torch.randn_like(value) for name, value in state.items()}
    second = module.RfAttention(backend="torch")
    second.load_state_dict(changed)
    assert not torch.allclose(second(q, k, v), out)
    third = module.RfAttention(backend="torch")
    third.load_state_dict(changed)
    torch.testing.assert_close(third(q, k, v), second(q, k, v), rtol=0, atol=0)


def test_redraw_features_changes_the_projection_reproducibly(tmp_path):
    text = "pattern pf() { head perf[2] = kernel(favor, features = 16, seed = 2) }"
    module = build(patterncc.parse(text), tmp_path)
    attn = module.PfAttention(backend="torch", head_dim=16)
    before = attn.projection_0_perf.clone()
    attn.redraw_features(torch.Generator().manual_seed(7))
    after = attn.projection_0_perf.clone()
    assert not torch.equal(before, after)
    # Redrawing one module leaves the pattern's seeded draws (and so every other module) as they were.
    fresh = module.PfAttention(backend="torch", head_dim=16)
    torch.testing.assert_close(fresh.projection_0_perf, before, rtol=0, atol=0)
    again = module.PfAttention(backend="torch", head_dim=16)
    again.redraw_features(torch.Generator().manual_seed(7))
    torch.testing.assert_close(again.projection_0_perf, after, rtol=0, atol=0)


def test_step_by_step_decoding_equals_the_causal_forward(tmp_path):
    module = build(patterncc.parse(EXAMPLES_DIR / "linear.attn"), tmp_path)
    attn = module.LinearAttention(backend="torch")
    heads, n, dim = 8, 12, 16
    q, k, v, _ = make_inputs(2, heads * 2, heads, n, dim, torch.float64)  # repeated and grouped-query heads
    full = attn(q, k, v)
    state = attn.init_state(2, heads * 2, dim, dtype=torch.float64)
    steps = []
    for t in range(n):
        out_t, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        steps.append(out_t)
    torch.testing.assert_close(torch.stack(steps, dim=2), full, rtol=1e-10, atol=1e-12)


def test_step_exists_only_for_causal_kernel_patterns(tmp_path):
    module = build(patterncc.parse(EXAMPLES_DIR / "hybrid.attn"), tmp_path)
    assert not hasattr(module.HybridAttention, "step")
    module = build(patterncc.parse("pattern b() { head a = kernel(elu1) }"), tmp_path)
    assert not hasattr(module.BAttention, "step")


def test_buffers_for_another_head_dim_are_a_clear_error(tmp_path):
    module = build(patterncc.parse(EXAMPLES_DIR / "reformer.attn"), tmp_path)
    q, k, v, _ = make_inputs(1, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="drawn for head_dim 32"):
        module.attention(q, k, v, backend="torch", buffers=module.default_buffers(32))


def test_mixed_module_compiles_every_family_ahead_of_time():
    """patterncc.aot.module_aot_specs lists every family's kernels of a mixed module, and they build for sm_90
    (one dtype and head_dim here: the families' own tests compile every dtype and head_dim for sm_80 and sm_90)."""
    reports = run_aot_worker(str(EXAMPLES_DIR / "hybrid.attn"), capabilities=("90",), dtypes=("bf16",),
                             head_dims=(64,), timeout=900)
    kernels = {r["kernel"] for r in reports}
    assert {"blocksparse_fwd", "blocksparse_dkdv", "blocksparse_dq"} <= kernels, kernels
    assert any(k.startswith("linear_fwd") for k in kernels) and any(k.startswith("linear_bwd") for k in kernels)
    assert not [r for r in reports if r["spill_stores"] or r["spill_loads"]], reports
