"""The kernel families as real Python: imported and run directly (no generated module), the library's names unique
across the families, the assembler copying only what a pattern reaches, and the verifier catching what a bad
render would produce."""

from __future__ import annotations

import ast
import math

import pytest
import torch
from conftest import EXAMPLE_FILES, EXAMPLES_DIR
from tolerance import assert_within_eager_error, forward_backward

import patterncc
from patterncc.assemble import LIBRARY, assemble, library_definitions
from patterncc.driver import compile_pattern
from patterncc.families.blocksparse.layout import dense_block_masks
from patterncc.families.blocksparse.naive import masked_attention
from patterncc.families.blocksparse.ops import blocksparse_attention
from patterncc.verify import GeneratedCodeError, verify_module


def _dense_masks(n):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return torch.stack([(j <= i) & (i - j < 10),  # a causal window
                        ((i - j) % 7 == 0) & (j <= i),  # a causal stride
                        (i // 16 == j // 16) | (j < 2),  # blocks plus global keys, bidirectional
                        torch.zeros(n, n, dtype=torch.bool)])  # no key at all: output and gradients 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,dim,block", [(45, 16, 16), (70, 32, 32)], ids=["N45-D16-B16", "N70-D32-B32"])
def test_blocksparse_family_on_dense_masks(backend, n, dim, block):
    """blocksparse_attention on BlockMasks built from boolean masks (the kernels' default hook reads them), with
    repeated and grouped-query heads, against float64 masked attention: output and every gradient."""
    masks = _dense_masks(n)
    block_masks = dense_block_masks(masks, block=block)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, n, dim, generator=generator)  # 4 masks, each over 2 query heads
    k, v = (torch.randn(2, 4, n, dim, generator=generator) for _ in range(2))  # 2 query heads per kv head
    grad = torch.randn(2, 8, n, dim, generator=generator)
    scale = 1 / math.sqrt(dim)
    golden = forward_backward(lambda a, b, c: masked_attention(a, b, c, masks, scale), q.double(), k.double(),
                              v.double(), grad.double())
    eager = forward_backward(lambda a, b, c: masked_attention(a, b, c, masks, scale, dtype=None), q, k, v, grad)
    tested = forward_backward(lambda a, b, c: blocksparse_attention(a, b, c, block_masks, backend=backend), q, k,
                              v, grad)
    assert_within_eager_error(tested, golden, eager, 10.0, 1e-7, f"n={n} d={dim} block={block} {backend}")
    assert not tested["out"][:, 6:].any(), "heads of the empty mask must give 0"


def test_blocksparse_family_rejects_mismatched_heads():
    block_masks = dense_block_masks(_dense_masks(32), block=16)
    q = torch.randn(1, 6, 32, 16)
    with pytest.raises(ValueError, match="multiple of 4 heads, got 6"):
        blocksparse_attention(q, q, q, block_masks)


@pytest.mark.parametrize("source, params, n", [
    ("strided.attn", dict(l=8), 1000),  # the stride head's CPU plan is grid transposed at this n
    ("fixed.attn", dict(l=16, c=3), 333),
    ("pattern p(l = 24) { causal block 16 head a = local(l) head b = stride(l) combine merged }", {}, 400),
    ("pattern p() { causal block 16 head a = where j > i }", {}, 50),  # no row has a key
], ids=["strided-transposed", "fixed", "split", "empty"])
def test_cpu_backward_from_lse_equals_autograd(source, params, n):
    """The CPU path's backward from the forward's output and LSE (no saved probabilities) equals autograd through
    the CPU path, float64: grouped-query attention, split heads, a grid-transposed plan, dropout, rows without keys."""
    from patterncc.families.blocksparse.cpu import blocksparse_attention_torch, blocksparse_torch_backward, cpu_gather
    from patterncc.families.shared.dropout import Dropout

    attn = patterncc.load(EXAMPLES_DIR / source if source.endswith(".attn") else source, **params)
    masks = __import__("sys").modules[type(attn).__module__].PATTERN_MASKS
    if source == "strided.attn":
        assert cpu_gather(masks.layout(n, "cpu"), 1).positions is not None, "the plan is not transposed"
    heads = 2 * len(masks.head_masks)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, n, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, heads // 2, n, 16, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(2, heads, n, 16, generator=generator, dtype=torch.float64)
    for dropout in (None, Dropout(0.3, 99)):
        want = torch.autograd.grad(blocksparse_attention_torch(q, k, v, masks, 0.25, dropout), (q, k, v), grad)
        with torch.no_grad():
            out, lse = blocksparse_attention_torch(q, k, v, masks, 0.25, dropout, with_lse=True)
            got = blocksparse_torch_backward(q, k, v, out, lse, grad, masks, 0.25, dropout)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{name}, dropout {dropout is not None}")


def test_library_names_are_unique_and_every_definition_assembles():
    """Every library definition lives in one namespace in a generated module: no name may be defined by two
    library files (assemble checks it), and the whole library assembles into valid Python."""
    names = {name for d in library_definitions() for name in d.binds}
    assembled = assemble(names)
    ast.parse("\n".join(assembled.imports) + "\n" + assembled.text)
    sources = {d.source.path for d in library_definitions()}
    assert sources == {source.path for source in LIBRARY}, "a library file contributes no definition"


def test_assemble_copies_only_what_is_reached():
    text = assemble({"lsh_attention"}).text
    assert "def lsh_attention(" in text and "def lsh_fwd_kernel(" in text
    for absent in ("linear_attention", "blocksparse_fwd_kernel", "tiles_classify", "random_block_table"):
        assert absent not in text, f"{absent} was copied though lsh_attention never reaches it"


@pytest.mark.parametrize("source,problem", [
    ("def f():\n    return 1\n\n\ndef f():\n    return 2\n\n\n__all__ = ['f']\n", "`f` is defined twice"),
    ("X = 1\nX = 2\n__all__ = ['X']\n", "`X` is defined twice"),
    ("def f():\n    return missing\n\n\n__all__ = ['f']\n", "`missing` is used but never defined"),
    ("def f():\n    return 1\n\n\ndef g():\n    return 2\n\n\n__all__ = ['f']\n",
     "`g` (line 5) is defined but never used"),
    ("def f():\n    return 1\n\n\n__all__ = ['f', 'h']\n", "`h` is in __all__ but never defined"),
    ("def f(:\n", "does not parse"),
], ids=["function-twice", "constant-twice", "undefined", "unused", "missing-export", "syntax"])
def test_verifier_rejects(source, problem):
    with pytest.raises(GeneratedCodeError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        verify_module(source)


def test_verifier_accepts_optional_imports_and_local_names():
    source = ("import math\n\ntry:\n    import triton\nexcept ImportError:\n    triton = None\n\n\n"
              "def f(x):\n    y = [math.sqrt(z) for z in x]\n    return y, triton\n\n\n__all__ = ['f']\n")
    verify_module(source)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_generated_files_define_only_what_they_use(path):
    """Every example's module passes the verifier (no unused, duplicate or undefined top-level name), keeps lines
    within 120 characters, and carries no family its pattern does not use."""
    for name in patterncc.parse_all(path):
        compiled = compile_pattern(patterncc.parse(path, pattern=name))
        verify_module(compiled.source)
        long_lines = [n for n, line in enumerate(compiled.source.splitlines(), 1) if len(line) > 120]
        assert not long_lines, f"{path.stem}: lines longer than 120 characters: {long_lines[:5]}"
        families = set(compiled.plan.head_families)
        for family, marker in (("set", "def blocksparse_fwd_kernel("), ("hashed", "def lsh_fwd_kernel("),
                               ("kernel", "def linear_fwd_kernel(")):
            assert (marker in compiled.source) == (family in families), f"{path.stem}: {family} kernels"


def test_kernel_branches_of_unused_feature_maps_are_dropped(tmp_path):
    """A module whose kernel heads all use elu1 carries no FAVOR+ or relu branch in its kernels, and its
    linear_attention accepts only elu1 (no call can reach a dropped branch)."""
    from kernel_support import build

    module = build(patterncc.parse("pattern p() { causal; head a = local(4); head b = kernel(elu1) }"), tmp_path)
    source = open(module.__file__).read()
    assert 'FEATURE == "favor"' not in source and 'FEATURE == "relu"' not in source
    assert "def linear_favor_projection(" not in source
    assert module.LINEAR_FEATURE_MAPS == ("elu1",)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        module.linear_attention(q, q, q, "relu", 1e-6, True)
