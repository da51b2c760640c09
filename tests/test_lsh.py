"""Reformer LSH attention (hashed heads): the Triton kernels (in the interpreter) and the CPU path against the
dense float64 reference in patterncc/families/lsh/naive.py, outputs and every gradient; the reference's own identity
with softmax over the union of windows; determinism; ahead-of-time compilation for sm_90 and sm_80."""

from __future__ import annotations

import pytest
import tolerance
import torch
from conftest import run_aot_worker
from kernel_support import INTERPRETING
from lsh_support import build_module

from patterncc.families.blocksparse.naive import masked_attention
from patterncc.families.lsh.naive import lsh_reference, lsh_union_mask, lsh_windows

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def lsh():
    return build_module()


def make_inputs(batch, heads, n, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=generator).to(dtype) for _ in range(4)]  # q, k, v, dout


def forward_backward(fn, q, k, v, grad):
    results = tolerance.forward_backward(fn, q, k, v, grad)
    if results["dk"] is None:  # with shared_qk k is unused: its gradient is 0
        results["dk"] = torch.zeros_like(k)
    return results


def check(lsh, n, dim, rounds, buckets, chunk, causal, shared_qk, backend, dtype=torch.float32, heads=2, batch=1,
          factor=10.0, seed=0):
    """Output and dq, dk, dv against the float64 reference: max error <= factor x (the reference's own error when
    computed in the inputs' dtype) + floor: tests/tolerance.py's max-error rule.

    The floor, 1e-7 x max(1, max|dO| x max|v|), is about a float32 ulp of dO_i . v_j: a row with a single key
    (frequent with several buckets and small n) has dS = P (dO_i . v_j - dO_i . O_i) = 0 exactly, which the
    eager reference reproduces exactly but FlashAttention's backward (and the rounds' combine) only up to such an
    ulp; kernel_support's plain 1e-7 assumes |dO . v| <= 1."""
    q, k, v, grad = make_inputs(batch, heads, n, dim, dtype, seed)
    rotations = lsh.lsh_rotations(heads, rounds, dim, buckets, seed=seed + 1)
    scale = dim ** -0.5
    golden = forward_backward(lambda a, b, c: lsh_reference(a, b, c, rotations, chunk, causal, shared_qk, scale),
                              q.double(), k.double(), v.double(), grad.double())
    eager = forward_backward(lambda a, b, c: lsh_reference(a, b, c, rotations, chunk, causal, shared_qk, scale,
                                                           dtype=None), q, k, v, grad)
    tested = forward_backward(lambda a, b, c: lsh.lsh_attention(a, b, c, rotations, chunk, causal, shared_qk,
                                                                backend=backend), q, k, v, grad)
    floor = 1e-7 * max(1.0, grad.abs().max().item() * v.abs().max().item())
    where = f"n={n} d={dim} R={rounds} buckets={buckets} c={chunk} causal={causal} shared={shared_qk} {backend}"
    tolerance.assert_within_eager_error(tested, golden, eager, factor, floor, where, dtype=dtype)
    return q, k, v, rotations, tested


# (n, head_dim, rounds, buckets, chunk, causal, shared_qk): odd lengths, n < chunk, n a multiple of chunk.
CASES = [
    (40, 16, 2, 4, 8, True, True),
    (37, 32, 3, 2, 8, False, False),
    (12, 16, 1, 8, 16, True, False),
    (64, 16, 3, 8, 16, False, True),
    (50, 32, 2, 4, 4, True, False),
    (29, 16, 2, 2, 32, False, True),
    (72, 32, 1, 4, 16, True, True),
    (45, 16, 3, 4, 8, True, False),
]


def case_id(case):
    n, dim, rounds, buckets, chunk, causal, shared = case
    return f"N{n}-D{dim}-R{rounds}-B{buckets}-C{chunk}-{'causal' if causal else 'bidir'}-{'shared' if shared else 'qk'}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_reference(lsh, case, backend):
    if backend == "triton" and not INTERPRETING:
        pytest.skip("the CPU suite runs the kernels in the interpreter (TRITON_INTERPRET=1)")
    check(lsh, *case, backend=backend)


# Every combination on the CPU path, whose cost is small.
GRID = [(n, dim, rounds, buckets, 8, causal, shared) for n in (5, 24, 33) for dim in (16,) for rounds in (1, 3)
        for buckets in (2, 8) for causal in (False, True) for shared in (False, True)]


@pytest.mark.parametrize("case", GRID, ids=[case_id(c) for c in GRID])
def test_torch_path_grid(lsh, case):
    check(lsh, *case, backend="torch")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_torch_path_half_precision(lsh, dtype):
    """Scores and softmax run in float32 whatever the input dtype, so the 16-bit result is no worse than
    (here: far better than) the reference computed in that dtype."""
    check(lsh, 40, 16, 2, 4, 8, True, True, backend="torch", dtype=DTYPES[dtype])


def test_triton_fp16(lsh):
    if not INTERPRETING:
        pytest.skip("the CPU suite runs the kernels in the interpreter (TRITON_INTERPRET=1)")
    check(lsh, 33, 16, 2, 4, 8, True, False, backend="triton", dtype=torch.float16)


def test_duplicates_are_counted_once(lsh):
    """Many rounds and two buckets: some key certainly lands in a query's window in several rounds. Without the
    -log(count) correction the result would weigh such keys more than softmax over the union does."""
    n, dim, rounds, buckets, chunk = 32, 16, 6, 2, 8
    q, _k, _v, rotations, _ = check(lsh, n, dim, rounds, buckets, chunk, False, True, backend="torch")
    count = lsh_windows(q.double(), None, rotations, chunk, True).sum(dim=2)
    assert count.max() > 1, "no duplicate in this case: it does not test the correction"
    if INTERPRETING:
        check(lsh, n, dim, rounds, buckets, chunk, False, True, backend="triton")


@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared", "qk"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_rounds_combine_to_union_softmax(lsh, causal, shared_qk):
    """The reference's round-by-round result with duplicate correction is exactly softmax over the union of all
    rounds' windows (self rule included)."""
    q, k, v, _ = make_inputs(2, 2, 48, 16, torch.float64, seed=3)
    rotations = lsh.lsh_rotations(2, 4, 16, 4, seed=5)
    union = lsh_union_mask(q, k, rotations, 8, causal, shared_qk)
    keys = torch.nn.functional.normalize(q, dim=-1) if shared_qk else k
    by_rounds = lsh_reference(q, k, v, rotations, 8, causal, shared_qk, 0.25)
    # masked_attention takes one mask per head; the union differs per batch element.
    for b in range(2):
        plain = masked_attention(q[b:b + 1], keys[b:b + 1], v[b:b + 1], union[b], 0.25)
        err = (by_rounds[b:b + 1] - plain).abs().max().item()
        assert err < 1e-12, f"out: rounds combined differ from union softmax by {err:.3e} (batch {b})"
    count = lsh_windows(q, k, rotations, 8, shared_qk).sum(dim=2)
    assert count.max() > 1, "no duplicate: the identity is not exercised"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_self_rule_fallback(lsh, backend):
    """With shared_qk and causal, position 0 has no key but itself: its output is v_0 and only v_0 gets its
    gradient."""
    if backend == "triton" and not INTERPRETING:
        pytest.skip("the CPU suite runs the kernels in the interpreter (TRITON_INTERPRET=1)")
    q, k, v, grad = make_inputs(1, 2, 24, 16, torch.float32, seed=4)
    rotations = lsh.lsh_rotations(2, 2, 16, 4, seed=2)
    grad = torch.zeros_like(grad)
    grad[:, :, 0] = 1.0
    got = forward_backward(lambda a, b, c: lsh.lsh_attention(a, b, c, rotations, 8, True, True, backend=backend),
                           q, k, v, grad)
    assert torch.equal(got["out"][:, :, 0], v[:, :, 0]), "out: position 0 is not v_0"
    assert torch.equal(got["dv"][:, :, 0], grad[:, :, 0]), "dv: position 0's gradient is not dO_0"
    assert not got["dv"][:, :, 1:].any(), "dv: a fallback row's gradient reached other positions"
    assert not got["dq"].any(), "dq: a fallback row's gradient reached the queries"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_without_keys_give_zero(lsh, backend):
    """Separate q and k: a query whose bucket has no key in its window outputs 0 with zero gradients, no NaN."""
    if backend == "triton" and not INTERPRETING:
        pytest.skip("the CPU suite runs the kernels in the interpreter (TRITON_INTERPRET=1)")
    q, k, v, grad = make_inputs(1, 2, 24, 16, torch.float32, seed=6)
    rotations = lsh.lsh_rotations(2, 1, 16, 8, seed=3)
    empty = ~lsh_union_mask(q, k, rotations, 4, False, False).any(dim=-1)  # [B, H, n]
    assert empty.any(), "every row has a key: this case tests nothing"
    got = forward_backward(lambda a, b, c: lsh.lsh_attention(a, b, c, rotations, 4, False, False, backend=backend),
                           q, k, v, grad)
    assert not got["out"][empty].any(), "out: a row without keys is not 0"
    assert not got["dq"][empty].any(), "dq: a row without keys has a gradient"
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name}: NaN or inf"


def test_rotations_are_deterministic(lsh):
    first = lsh.lsh_rotations(3, 2, 16, 8, seed=7)
    assert first.shape == (3, 2, 16, 4) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.equal(first, lsh.lsh_rotations(3, 2, 16, 8, seed=7)), "rotations: same seed, other values"
    assert not torch.equal(first, lsh.lsh_rotations(3, 2, 16, 8, seed=8)), "rotations: seed ignored"
    # Pinned values: one seed gives one tensor on every machine (torch's CPU generator is portable).
    expected = torch.randn(3, 2, 16, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, expected), "rotations: not torch.randn from Generator().manual_seed(seed)"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_is_deterministic(lsh, backend):
    if backend == "triton" and not INTERPRETING:
        pytest.skip("the CPU suite runs the kernels in the interpreter (TRITON_INTERPRET=1)")
    q, k, v, grad = make_inputs(1, 2, 40, 16, torch.float32, seed=9)

    def run():
        rotations = lsh.lsh_rotations(2, 2, 16, 4, seed=1)
        return forward_backward(lambda a, b, c: lsh.lsh_attention(a, b, c, rotations, 8, True, False,
                                                                  backend=backend), q, k, v, grad)

    first, second = run(), run()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name}: two runs differ"


def test_shared_qk_ignores_k(lsh):
    q, k, v, _ = make_inputs(1, 2, 30, 16, torch.float32, seed=2)
    rotations = lsh.lsh_rotations(2, 2, 16, 4, seed=1)
    with_k = lsh.lsh_attention(q, k, v, rotations, 8, False, True, backend="torch")
    without = lsh.lsh_attention(q, None, v, rotations, 8, False, True, backend="torch")
    assert torch.equal(with_k, without), "out: shared_qk used the k argument"


@pytest.mark.parametrize("bad, message", [
    ({"v": torch.zeros(1, 2, 30, 32)}, "one shape"),
    ({"rotations": torch.zeros(2, 2, 32, 2)}, "rotations must have shape"),
    ({"rotations": torch.zeros(2, 16, 2)}, "4-D"),
    ({"chunk": 0}, "chunk"),
    ({"backend": "cuda"}, "backend"),
    ({"q": torch.zeros(2, 30, 16)}, "4-D"),
], ids=["v-shape", "rotation-dim", "rotation-rank", "chunk", "backend", "q-rank"])
def test_bad_inputs_raise(lsh, bad, message):
    q, k, v, _ = make_inputs(1, 2, 30, 16, torch.float32)
    args = {"q": q, "k": k, "v": v, "rotations": lsh.lsh_rotations(2, 2, 16, 4, seed=1), "chunk": 8, "causal": False,
                "shared_qk": False, "backend": "torch"}
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        lsh.lsh_attention(**args)
    with pytest.raises(ValueError, match="even"):
        lsh.lsh_rotations(2, 2, 16, 5, seed=1)


# Ahead-of-time compilation: real Triton compiler, no GPU --------------------------------------------------------


@pytest.fixture(scope="module")
def aot_reports():
    return run_aot_worker("family:lsh", timeout=1200)


def test_every_kernel_compiles_for_sm90_and_sm80(aot_reports):
    seen = {(r["kernel"], r["dtype"], r["head_dim"], r["target"]) for r in aot_reports}
    expected = {(k, d, h, t) for k in ("lsh_fwd", "lsh_dkdv", "lsh_dq") for d in ("fp16", "bf16", "fp32")
                for h in (16, 32, 64, 128) for t in ("sm_90", "sm_80")}
    assert seen == expected, f"missing {sorted(expected - seen)[:5]}"


def test_chosen_configs_do_not_spill(aot_reports):
    spilled = [f"{r['kernel']} {r['dtype']} d={r['head_dim']} {r['target']} {r['variant']}: {r['spill_stores']} B "
               f"stored, {r['registers']} registers" for r in aot_reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "every config of the chain spills:\n" + "\n".join(spilled)


def test_defaults_need_no_fallback(aot_reports):
    fallback = [f"{r['kernel']} {r['dtype']} d={r['head_dim']} {r['target']} {r['variant']}"
                for r in aot_reports if r["configs_tried"] > 1]
    assert not fallback, "the default config spills, a fallback was needed: " + ", ".join(fallback)


def test_shared_memory_fits_sm80(aot_reports):
    too_big = [r for r in aot_reports if r["shared_bytes"] > 163 * 1024]  # A100: 164 KiB per block
    assert not too_big, f"{too_big[:3]}"


def test_dropout_kernels_compile_without_spills():
    """The attention-dropout variant (a Philox number per pair in every kernel) of the heaviest predicate compiles
    for sm_90 and sm_80 and the config its chain picks does not spill: 16-bit and fp32 at the head dims that need
    the most registers (without dropout every dtype and head dim is checked above). With dropout, lsh_fwd fp16
    d=64 on sm_80 spills in its default (64, 32, 4, 2) and takes the chain's next config, (32, 32, 8, 2)."""
    reports = run_aot_worker("family:lsh", dtypes=("fp16", "fp32"), head_dims=(64, 128), timeout=1200, dropout=True)
    seen = {(r["kernel"], r["dtype"], r["head_dim"], r["target"]) for r in reports if r["dropout"]}
    assert len(seen) == 3 * 2 * 2 * 2, sorted(seen)
    spilled = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled[:3]
