"""Generation with a KV cache: prefill(p) then decode of the remaining positions equals the causal forward over
the whole sequence (float64, torch path; the prefill's kernels under the interpreter too), and a decode step's
keys are exactly the mask's row."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES_DIR, run_aot_worker
from kernel_support import build, make_inputs

import patterncc
from patterncc.mask import pattern_mask

N = 90
CASES = {
    "strided": (EXAMPLES_DIR / "strided.attn", dict(l=8)),
    "fixed": (EXAMPLES_DIR / "fixed.attn", dict(l=16, c=3)),
    "local": (EXAMPLES_DIR / "local.attn", dict(w=9, heads=2)),
    "dilated": (EXAMPLES_DIR / "dilated.attn", dict(w=4)),
    "linear": (EXAMPLES_DIR / "linear.attn", dict(heads=2)),
    "hybrid": (EXAMPLES_DIR / "hybrid.attn", dict(w=8, l=8, k=1)),
    # per-head h, set algebra and where; a window that depends on n (decoding sees n = max_len); random blocks
    "per_head": ("pattern p(l = 12) { causal block 16 head s[2] = (where j % l >= l - 2 * (h + 1)) | local(3) "
                 "head t = stride(5) - chunk(20) }", {}),
    "n_dependent": ("pattern p() { causal block 16 head a = local(n // 8) | global(2) }", {}),
    "random": ("pattern p() { causal block 16 head a = random(2, seed = 3) | local(4) }", {}),
}


def _decode_all(attn, q, k, v, prompt, backend_prefill=None):
    """prefill(prompt) then decode the rest, in steps of one position and, every seventh, three (speculative)."""
    cache = attn.new_cache(q.shape[0], k.shape[1], q.shape[-1], q.shape[2], q.dtype)
    outputs = []
    if prompt:
        outputs.append(attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], cache))
    t = prompt
    while t < q.shape[2]:
        step = min(3 if t % 7 == 0 else 1, q.shape[2] - t)
        outputs.append(attn.decode(q[:, :, t:t + step], k[:, :, t:t + step], v[:, :, t:t + step], cache))
        t += step
    assert cache.length == q.shape[2]
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("prompt", [0, 1, 16, 37])
@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_then_decode_equals_the_causal_forward(name, prompt):
    source, params = CASES[name]
    attn = patterncc.load(source, **params)
    heads = attn.num_heads * 2
    q, k, v, _ = make_inputs(2, heads, heads // 2, N, 16, torch.float64)  # grouped-query: 2 query heads per kv
    torch.testing.assert_close(_decode_all(attn, q, k, v, prompt), attn(q, k, v), rtol=1e-10, atol=1e-10)


HASHED_CASES = {
    "reformer": (EXAMPLES_DIR / "reformer.attn", dict(buckets=4, rounds=3, heads=2)),
    # separate query/key hashing, mixed with set and kernel heads in one module
    "mixed": ("pattern p() { causal block 16 head a = hashed(buckets = 4, rounds = 2, chunk = 4, shared_qk = false, "
              "seed = 3) head b = local(3) | stride(7) head c = kernel(elu1) }", {}),
}


@pytest.mark.parametrize("prompt", [0, 1, 16, 37])
@pytest.mark.parametrize("name", sorted(HASHED_CASES))
def test_hashed_heads_decode_the_last_row_of_the_forward_so_far(name, prompt):
    """Buckets depend on every position, so a decoded position t equals row t of the forward over positions 0..t
    and the prefill equals the forward over the prompt (set and kernel heads: the forward over the whole
    sequence, which is the same at these rows)."""
    source, params = HASHED_CASES[name]
    attn = patterncc.load(source, **params)
    heads = attn.num_heads * 2
    q, k, v, _ = make_inputs(2, heads, heads // 2, 60, 16, torch.float64)
    out = _decode_all(attn, q, k, v, prompt)
    if prompt:
        torch.testing.assert_close(out[:, :, :prompt], attn(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt]),
                                   rtol=1e-10, atol=1e-10)
    for t in range(prompt, 60):
        expected = attn(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1])[:, :, t]
        torch.testing.assert_close(out[:, :, t], expected, rtol=1e-10, atol=1e-10, msg=f"position {t}")


@pytest.mark.parametrize("name, override, n, prompt", [("strided", {}, 20, 0), ("strided", {}, 20, 1),
                                                       ("per_head", {}, 24, 16), ("strided", {}, 44, 37),
                                                       ("hybrid", {}, 46, 40), ("strided", {"l": 2}, 600, 596)])
def test_prefill_and_decode_run_the_kernels(tmp_path, name, override, n, prompt):
    """Everything through the Triton kernels (interpreter): the prompt through the block-sparse (and linear)
    kernels, the decode steps' set heads through the split-K decode kernel; equal to the torch path's forward.
    With grouped-query heads, a head split into parts (per_head) and keys over two splits of 256 (stride(2))."""
    source, params = CASES[name]
    module = build(patterncc.parse(source, **{**params, **override}), tmp_path)
    heads = module.NUM_HEADS * 2
    q, k, v, _ = make_inputs(1, heads, heads // 2, n, 16, torch.float32)
    cache = module.new_cache(1, heads // 2, 16, n)
    prefill_backend = "torch" if n > 100 else "triton"  # the interpreter's prefill at n = 600 adds nothing but time
    first = [module.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], cache, backend=prefill_backend)
             ] if prompt else []
    rest = module.decode(q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], cache, backend="triton")
    torch.testing.assert_close(torch.cat([*first, rest], dim=2), module.attention(q, k, v, backend="torch"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kept", [True, False], ids=["tile-kept", "per-step"])
@pytest.mark.parametrize("name, n", [("strided", 300), ("fixed", 300), ("per_head", 300), ("random", 300),
                                     ("strided", 1000), ("fixed", 1000)])
def test_decode_keys_are_the_mask_row(name, n, kept, monkeypatch):
    """The keys a decode step attends are exactly the dense mask's row (every position), with a query tile's
    predicate kept for its steps and, past the memory bound, evaluated per step; candidates come from each mask's
    visiting order, grid transposed for strided's and fixed's second head at n = 1000 and per_head's third."""
    source, params = CASES[name]
    pattern = patterncc.parse(source, **params)
    attn = patterncc.load(source, **params)
    module = __import__("sys").modules[type(attn).__module__]
    masks = module.PATTERN_MASKS
    layout = masks.layout(n, "cpu")
    layout.decode_rows.clear()
    if n == 1000 or name == "per_head":  # the case covers a permuted visiting order
        assert layout.positions_cpu[-1] is not None
    if not kept:
        monkeypatch.setattr(module, "_ROW_PAIRS", 0)
    dense = pattern_mask(pattern, n)
    for head, set_head in enumerate(module.SET_HEADS):
        for t in range(n):
            keys = module.decode_keys(masks, masks.head_masks[head], t, n)
            assert torch.equal(keys, dense[set_head, t].nonzero().flatten()), (name, set_head, t)


def test_strided_decode_reads_l_plus_t_over_l_keys():
    attn = patterncc.load(EXAMPLES_DIR / "strided.attn", l=128)
    module = __import__("sys").modules[type(attn).__module__]
    local, stride = (len(module.decode_keys(module.PATTERN_MASKS, masks, 16000, 16384))
                     for masks in module.PATTERN_MASKS.head_masks)
    assert (local, stride) == (129, 16000 // 128 + 1)


def test_cache_errors_name_both_numbers():
    attn = patterncc.load(CASES["strided"][0], **CASES["strided"][1])
    q, k, v, _ = make_inputs(1, 2, 2, 10, 16, torch.float32)
    cache = attn.new_cache(1, 2, 16, 8)
    with pytest.raises(ValueError, match="the cache holds 8 positions: 0 used, 10 more do not fit"):
        attn.prefill(q, k, v, cache)
    cache = attn.new_cache(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"this cache holds \(batch, kv_heads, head_dim\) = \(1, 1, 16\), got "
                                         r"\(1, 2, 16\)"):
        attn.prefill(q, k, v, cache)
    with pytest.raises(ValueError, match="needs a causal pattern"):
        patterncc.load(EXAMPLES_DIR / "bigbird.attn").new_cache(1, 4, 16, 64)
    with pytest.raises(ValueError, match="needs a causal pattern"):
        patterncc.load("pattern p() { head a = hashed(buckets = 4, rounds = 1, chunk = 4) }").new_cache(1, 1, 16, 8)


CAUSAL_CASES = [name for name in CASES if name not in ("n_dependent",)] + ["reformer"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_cache_never_drops_a_key_a_later_query_attends(name):
    """Per kv head (one per pattern head) and key tile, the last query tile the module tells the cache to keep it
    for is at least the last query tile that attends a key of it in the dense mask (n = 700)."""
    source, params = CASES[name]
    pattern = patterncc.parse(source, **params)
    attn = patterncc.load(source, **params)
    module = __import__("sys").modules[type(attn).__module__]
    heads, n = attn.num_heads, 700
    cache = attn.new_cache(1, heads, 16, n)
    keep = module.decode_keep_until(cache, heads)
    dense = pattern_mask(pattern, n)
    positions = torch.arange(n)
    for head in range(heads):
        if module.HEAD_FAMILIES[head] == "kernel":
            assert (keep[head] == -1).all()  # a state, no keys
            continue
        last_query = torch.where(dense[head], positions[:, None], -1).amax(0)  # per key: its last reader
        reads = last_query >= 0
        needed = torch.full((cache.tiles,), -1).scatter_reduce(0, (positions // cache.page)[reads],
                                                               (last_query // cache.page)[reads], "amax")
        assert (keep[head] >= needed).all(), (name, head, torch.nonzero(keep[head] < needed)[:5])


def test_a_local_window_keeps_its_window_and_kernel_heads_keep_nothing():
    attn = patterncc.load(EXAMPLES_DIR / "local.attn", w=256, heads=4)
    q, k, v, _ = make_inputs(1, 4, 4, 2048, 16, torch.float32)
    cache = attn.new_cache(1, 4, 16, 2048)
    attn.prefill(q[:, :, :1500], k[:, :, :1500], v[:, :, :1500], cache)
    out = attn.decode(q[:, :, 1500:1600], k[:, :, 1500:1600], v[:, :, 1500:1600], cache)
    torch.testing.assert_close(out, attn(q[:, :, :1600], k[:, :, :1600], v[:, :, :1600])[:, :, 1500:],
                               rtol=1e-5, atol=1e-5)
    # Per head, a window of 257 keys spans at most 6 tiles of 64, the query's own tile included.
    assert cache.pages <= 4 * 6, cache
    hybrid = patterncc.load(EXAMPLES_DIR / "hybrid.attn", w=16, l=16, k=1)
    module = __import__("sys").modules[type(hybrid).__module__]
    cache = hybrid.new_cache(1, 3, 16, 512)
    keep = module.decode_keep_until(cache, 3)
    assert (keep[2] == -1).all() and (keep[1] == cache.tiles - 1).all()  # kernel head: none; stride: every tile


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_the_cache_formula_bounds_the_keys_later_queries_read(name):
    """`check`'s formula per head (analysis.cost.head_cache) is at least the most keys that some later query
    still reads, counted on the dense mask (n = 600)."""
    from patterncc.analysis.cost import formula_value, head_cache
    from patterncc.semantics import bind_pattern

    source, params = (EXAMPLES_DIR / "reformer.attn", {"heads": 2}) if name == "reformer" else CASES[name]
    pattern = patterncc.parse(source, **params)
    n = 600
    bound = bind_pattern(pattern, n)
    dense = pattern_mask(pattern, n)
    index = 0
    for group, count in zip(pattern.heads, bound.counts):
        for h in range(count):
            formula = head_cache(pattern, group, h)
            if group.family == "set":
                last_query = torch.where(dense[index], torch.arange(n)[:, None], -1).amax(0)
                live = max(int(((torch.arange(n) <= t) & (last_query >= t)).sum()) for t in range(n))
            else:
                live = n if group.family == "hashed" else 0
            assert formula_value(formula, bound.env, n) >= live, (name, group.name, h, formula, live)
            index += 1


def test_the_split_k_decode_kernel_compiles_for_sm90_and_sm80_without_spills():
    """The real Triton compiler and ptxas (no GPU needed): every dtype, two head dims, both targets."""
    reports = run_aot_worker("family:decode", head_dims=(64, 128), timeout=900)
    seen = {(r["dtype"], r["head_dim"], r["target"]) for r in reports}
    assert seen == {(d, h, t) for d in ("fp16", "bf16", "fp32") for h in (64, 128) for t in ("sm_90", "sm_80")}
    spilled = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled


@pytest.mark.parametrize("combine, layer", [("merged", 0), ("interleaved", 0), ("interleaved", 1)])
def test_combined_heads_decode(combine, layer):
    """The paper's merged head (every attention head over the union) and interleaved layers (one group per
    layer) generate like every other pattern: prefill then decode equals the causal forward."""
    source = (f"pattern p() {{ causal block 16 combine {combine} head a[2] = local(5) head b[2] = stride(7) "
              f"| local(2) }}")
    attn = patterncc.load(source, layer=layer)
    heads = attn.num_heads * 2
    q, k, v, _ = make_inputs(1, heads, heads // 2, 70, 16, torch.float64)
    torch.testing.assert_close(_decode_all(attn, q, k, v, 20), attn(q, k, v), rtol=1e-10, atol=1e-10)
