"""Generated kernels against float64 masked attention: the Triton kernels in the interpreter, and the CPU path.

Every case compares the output and the q, k, v gradients (tolerance rule in kernel_support.py). Shapes are
small because the interpreter is slow; they include n not a multiple of the tile, several head dims, causal
and bidirectional patterns, grouped-query heads, empty rows, and kernel tiles smaller than layout tiles.
"""

from __future__ import annotations

import random

import pytest
import torch
from kernel_support import INTERPRETING, build, check_against_reference

import patterncc
from patterncc.aot import module_aot_specs

EXAMPLE_CASES = [
    # (file, overrides, n, head_dim)
    ("strided", dict(l=16), 100, 32),
    ("fixed", dict(l=16, c=4), 130, 16),
    ("local", dict(w=7), 64, 64),
    ("bigbird", dict(w=20, g=5, r=2), 150, 32),
    ("dilated", dict(w=4, d=3), 90, 16),
]

SMALL_PATTERNS = {
    "bidirectional_strided": "pattern p(l = 8) { block 16 head a = local(l) head b = stride(l) }",
    "empty_rows": "pattern p() { causal block 16 head a = where i % 3 == 0 and j < i head b = dense }",
    "set_algebra": "pattern p(l = 8) { causal block 16 head a = (chunk(l) | summary(l, 2)) - (where i == j) "
                   "head b = local(5) & dilated(3, 2) }",
    "global_random": "pattern p() { block 16 head a[2] = global(3) | random(2, seed = h) }",
    "n_dependent": "pattern p(l = isqrt(n)) { causal block 16 head a = stride(l) | local(l) }",
    "merged": "pattern p(l = 8) { causal block 16 head a = local(l) head b = stride(l) combine merged }",
    "head_index": "pattern p(l = 8, c = 2) { causal block 16 head s[2] = where j % l >= l - (h + 1) * c and "
                  "j % l < l - h * c }",
}

needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="Triton interpreter tests need TRITON_INTERPRET=1 "
                                       "from the start of the session (conftest.py sets it)")


def _example(name, **overrides):
    from conftest import EXAMPLES_DIR

    return patterncc.parse(EXAMPLES_DIR / f"{name}.attn", **overrides)


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    """Generated modules, built once per (source, overrides)."""
    folder = tmp_path_factory.mktemp("generated")
    cache = {}

    def get(pattern):
        key = (pattern.source, repr(pattern.params), pattern.name)
        if key not in cache:
            cache[key] = build(pattern, folder)
        return cache[key]

    return get


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize(("name", "overrides", "n", "dim"), EXAMPLE_CASES,
                         ids=[f"{c[0]}-N{c[2]}-D{c[3]}" for c in EXAMPLE_CASES])
def test_examples(modules, backend, name, overrides, n, dim):
    pattern = _example(name, **overrides)
    check_against_reference(modules(pattern), pattern, n, dim, backend=backend, batch=2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("name", sorted(SMALL_PATTERNS))
def test_small_patterns(modules, backend, name):
    pattern = patterncc.parse(SMALL_PATTERNS[name])
    check_against_reference(modules(pattern), pattern, 75, 16, backend=backend)


# Unions that split at the planning length (l = 24 with block 16; with l = 8 the union's own transpose is as good).
SPLIT_PATTERNS = {
    "merged": "pattern p(l = 24) { causal block 16 head a = local(l) head b = stride(l) combine merged }",
    "n_dependent": SMALL_PATTERNS["n_dependent"],
    "split_and_whole": "pattern p(l = 24) { causal block 16 head a = strided(l) head b = local(3) }",
    "bidirectional": "pattern p(l = 48) { block 16 head a = stride(l) | local(l) }",
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("name", sorted(SPLIT_PATTERNS))
def test_split_heads(modules, backend, name):
    """A union whose members prefer different visiting orders (local | stride) runs as disjoint parts: outputs
    combined by log-sum-exp, gradients from each part with the union's LSE; heads with fewer parts run the empty
    mask in the extra launch. Against the float64 reference, forward and every gradient, with grouped queries."""
    pattern = patterncc.parse(SPLIT_PATTERNS[name])
    module = modules(pattern)
    assert any(len(parts) > 1 for parts in module.HEAD_MASKS), module.HEAD_MASKS
    check_against_reference(module, pattern, 75, 16, backend=backend, head_multiple=2, kv_heads=1)


@needs_interpreter
@pytest.mark.parametrize("config", [(16, 16, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2)], ids=lambda c: f"M{c[0]}-N{c[1]}")
def test_kernel_tiles_smaller_than_layout_tiles(modules, config):
    pattern = _example("strided", l=24)  # layout block 64; kernel tiles 16/32 walk sub-tiles of each
    module = modules(pattern)
    module.CONFIG_OVERRIDE.update({k: config for k in ("blocksparse_fwd", "blocksparse_dq", "blocksparse_dkdv")})
    try:
        check_against_reference(module, pattern, 150, 16, backend="triton")
    finally:
        module.CONFIG_OVERRIDE.clear()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize(("head_multiple", "kv_heads"), [(2, 2), (2, 1), (3, 3)], ids=["rep2", "gqa-mqa", "rep3"])
def test_head_repetition_and_grouped_query(modules, backend, head_multiple, kv_heads):
    pattern = _example("strided", l=8)
    check_against_reference(modules(pattern), pattern, 70, 16, backend=backend, head_multiple=head_multiple,
                            kv_heads=kv_heads)


@pytest.mark.parametrize("seed", range(4))
def test_random_set_expressions(modules, seed):
    """Random set-algebra expressions over every primitive, both backends."""
    rng = random.Random(seed)
    atoms = ["local({w})", "stride({l})", "chunk({l})", "summary({l}, 2)", "global(2)", "dilated(2, 3)",
             "random(1, seed = {s})", "(where (i + j) % {l} < 3)", "dense"]

    def expr(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(atoms).format(w=rng.randint(1, 20), l=rng.randint(2, 20), s=rng.randint(0, 9))
        return f"({expr(depth - 1)} {rng.choice(['|', '&', '-'])} {expr(depth - 1)})"

    causal = "causal" if rng.random() < 0.5 else ""
    text = f"pattern r() {{ {causal} block 16 head a = {expr(3)} head b = {expr(2)} }}"
    pattern = patterncc.parse(text)
    module = modules(pattern)
    check_against_reference(module, pattern, rng.choice([33, 64, 81]), 16, backend="torch")
    if INTERPRETING:
        check_against_reference(module, pattern, 48, 16, backend="triton")


@pytest.mark.parametrize("share", [0.0, float("inf")], ids=["per-tile-keys", "shared-chunk-keys"])
@pytest.mark.parametrize("name", ["fixed", "strided", "bigbird"])
def test_cpu_path_both_gather_modes(tmp_path, name, share):
    """The CPU path's two ways of gathering keys (per query tile, or shared by a chunk of tiles) agree with the
    reference; a fresh module per mode, since the plan is cached with the layout."""
    overrides = {"fixed": dict(l=16, c=4), "strided": dict(l=8), "bigbird": dict(w=20, g=5, r=2)}[name]
    pattern = _example(name, **overrides)
    module = build(pattern, tmp_path)
    module.CPU_SHARE_LIMIT = share
    module.CPU_CHUNK = 2  # several chunks even at small n
    check_against_reference(module, pattern, 300, 16, backend="torch")
    layout = module.get_layout(300, "cpu")
    plans = [module.cpu_gather(layout, m) for m in range(module.NUM_MASKS)]
    shared = {chunk.shared for plan in plans for chunk in plan.chunks}
    assert shared == {False} if share == 0.0 else True in shared, shared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_path_half_precision(modules, dtype):
    """16-bit inputs run in float32 on the CPU path; errors stay within the eager 16-bit computation's."""
    pattern = _example("fixed", l=16, c=4)
    check_against_reference(modules(pattern), pattern, 96, 32, dtype=dtype, backend="torch", factor=1.1)


def test_cpu_path_gradcheck(modules):
    pattern = patterncc.parse(SMALL_PATTERNS["set_algebra"])
    module = modules(pattern)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: module.attention(a, b, c, backend="torch"), (q, k, v))


def test_empty_rows_are_zero_with_zero_gradient(modules):
    pattern = patterncc.parse(SMALL_PATTERNS["empty_rows"])
    module = modules(pattern)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    out = module.attention(q, k, v, backend="torch")
    out.sum().backward()
    empty = torch.tensor([i % 3 != 0 or i == 0 for i in range(40)])  # head a: j < i and i % 3 == 0
    assert torch.equal(out[0, 0, empty], torch.zeros_like(out[0, 0, empty]))
    assert torch.equal(q.grad[0, 0, empty], torch.zeros_like(q.grad[0, 0, empty]))
    assert not torch.isnan(q.grad).any()


def test_new_sequence_length_reuses_kernels_and_caches_layouts(modules):
    """n is a runtime argument: a parameter defined from n becomes a kernel argument, not a constant."""
    pattern = patterncc.parse(SMALL_PATTERNS["n_dependent"])
    module = modules(pattern)
    assert module.runtime_params(100) == (10,) and module.runtime_params(64) == (8,)
    layout = module.get_layout(100, "cpu")
    assert module.get_layout(100, "cpu") is layout
    assert module.get_layout(64, "cpu") is not layout
    assert layout.params_tensor.tolist() == [10]  # the kernels read runtime parameters through one pointer
    for name, _, signature, configs in module_aot_specs(module)("fp16", 64):
        assert signature["n_ctx"] == "i32" and signature["PARAMS"] == "*i32" and signature["NUM_BLOCKS"] == "i32", name
        for constexprs, _ in configs:
            assert "n_ctx" not in constexprs and "PARAMS" not in constexprs, name


def test_long_sequence_layout_is_sparse(modules):
    """n = 65536 in closed form (bench/layout_speed.py times it): the local head's tiles hug the diagonal."""
    pattern = _example("strided")
    layout = modules(pattern).get_layout(65536, "cpu")
    tiles = layout.num_tiles
    nonempty = (layout.classes[0] != 0).sum().item()
    assert nonempty <= 3 * tiles, f"local(128) at block 64 should touch at most 3 tiles per row, got {nonempty}"


@pytest.mark.parametrize(("q_shape", "kv_shape", "message"), [
    ((1, 3, 16, 8), (1, 3, 16, 8), "multiple of 2 heads, got 3"),
    ((1, 4, 16, 8), (1, 3, 16, 8), "Hq=4 and Hkv=3"),
    ((1, 2, 16, 8), (1, 2, 12, 8), "n_q=16 and n_k=12"),
    ((1, 2, 16, 8), (1, 2, 16, 4), "same head_dim, got 8 and 4"),
    ((2, 2, 16, 8), (1, 2, 16, 8), "same batch size, got 2 and 1"),
    ((2, 16, 8), (2, 16, 8), "4-D tensor"),
])
def test_shape_errors_name_both_numbers(modules, q_shape, kv_shape, message):
    module = modules(_example("strided", l=4))
    q, k = torch.randn(q_shape), torch.randn(kv_shape)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module.attention(q, k, k.clone())


def test_triton_backend_rejects_unsupported_head_dim(modules):
    module = modules(_example("strided", l=4))
    q = torch.randn(1, 2, 16, 24)
    with pytest.raises(ValueError, match=r"head_dim in \(16, 32, 64, 128\), got 24"):
        module.attention(q, q, q, backend="triton")
