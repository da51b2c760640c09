"""The generated file stands alone (torch and triton only), reads like hand-written code, and `load()` caches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import EXAMPLES_DIR

import patterncc
from patterncc.api import load
from patterncc.cache import load_module
from patterncc.driver import compile_pattern
from patterncc.mask import pattern_mask


def test_generated_module_runs_without_patterncc(tmp_path):
    compiled = compile_pattern(patterncc.parse(EXAMPLES_DIR / "fixed.attn", l=16, c=4))
    (tmp_path / "fixed.py").write_text(compiled.source)
    script = textwrap.dedent("""
        import sys
        sys.modules["patterncc"] = None  # any `import patterncc` now fails
        import torch
        from fixed import FixedAttention
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 50, 16, requires_grad=True) for _ in range(3))
        out = FixedAttention()(q, k, v)
        out.sum().backward()
        assert out.shape == (1, 2, 50, 16) and q.grad is not None
        loaded = sorted(name for name, mod in sys.modules.items()
                        if mod is not None and name.split(".")[0] in ("patterncc", "lark"))
        print("ok", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "", "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok []", result.stdout


def test_generated_source_snapshot():
    """The pattern's math appears as comments and as the kernel predicate (floor helpers only where needed)."""
    source = compile_pattern(patterncc.parse(EXAMPLES_DIR / "strided.attn", l=128)).source
    assert "#   mask 0 (local): (abs((i - j)) <= 128) and (j <= i)" in source
    assert "#   mask 1 (stride): (((i - j) % 128) == 0) and (j <= i)" in source
    assert "m_allowed = tl.broadcast_to((tl.abs(o_i - o_j) <= 128) & (o_j <= o_i), [ROWS, COLS])" in source
    assert "_floormod(o_i - o_j, 128) == 0" in source  # i - j can be negative: floor, not C's remainder
    assert "def blocksparse_fwd_kernel(" in source and "def blocksparse_bwd_dkdv_kernel(" in source
    assert "def pattern_allowed(" in source  # the one hook where the pattern enters the kernels
    assert "class StridedAttention(torch.nn.Module):" in source
    header = source.splitlines()[:12]
    assert any(line.startswith("#   pattern strided(l = 128) {") for line in header)


def test_non_negative_dividends_use_plain_operators():
    text = "pattern p(l = 16, c = 4) { head s = summary(l, c) }"
    source = compile_pattern(patterncc.parse(text)).source
    assert "o_j % 16 >= 12" in source  # j >= 0 and 16 > 0: truncation and floor agree


def test_untrusted_text_never_reaches_generated_code(tmp_path):
    """Comments of the .attn file are not copied, and a file name with a newline cannot start a line of code."""
    path = tmp_path / "evil\nimport os  # .attn"
    path.write_text("pattern p() { head a = local(3) # ; import os; os.system('x')\n}")
    source = compile_pattern(patterncc.parse(path)).source
    assert "os.system" not in source
    assert not any(line.startswith("import os  # .attn") for line in source.splitlines())
    assert "evil\\nimport os" in source  # the name, shown through repr()
    compile(source, "generated", "exec")


def test_untrusted_names_and_numbers_are_reprinted():
    """Nothing from the .attn text is pasted into generated code: parameters become numbers or P_ names."""
    text = "pattern p(huge = 123456789012, w = 3) { head a = where abs(i - j) <= w and j < huge }"
    source = compile_pattern(patterncc.parse(text)).source
    assert "123456789012" in source and "huge" not in source.split('"""')[-1].split("# The pattern")[0]


def test_load_returns_module_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    attn = load(EXAMPLES_DIR / "fixed.attn", l=16, c=4, backend="torch")
    assert isinstance(attn, torch.nn.Module)
    q = torch.randn(1, 4, 40, 16)
    out = attn(q, q, q)
    assert out.shape == q.shape
    files = list(tmp_path.rglob("*.py"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    load_module(EXAMPLES_DIR / "fixed.attn", l=16, c=4)
    assert files[0].stat().st_mtime_ns == mtime, "a cached module must not be regenerated"
    load_module(EXAMPLES_DIR / "fixed.attn", l=32, c=4)
    assert len(list(tmp_path.rglob("*.py"))) == 2, "other parameters are another cache entry"
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files left behind"


def test_load_interleaved_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    text = "pattern p(l = 8) { causal block 16 head a = local(l) head b = stride(l) combine interleaved }"
    pattern = patterncc.parse(text)
    q = torch.randn(1, 2, 30, 8, dtype=torch.float64)
    for layer in range(3):
        out = load(text, layer=layer, backend="torch")(q, q, q)
        from patterncc.families.blocksparse.naive import masked_attention

        expected = masked_attention(q, q, q, pattern_mask(pattern, 30, layer=layer))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12, msg=f"layer {layer}")


def test_family_parameters_must_not_depend_on_n():
    """They fix buffer shapes and kernel constants: a clear error, not a module that breaks at a new n."""
    text = "pattern p() { causal head a = hashed(buckets = 4, rounds = 1, chunk = n // 8) }"
    with pytest.raises(patterncc.PatternError, match="hashed head `a` must not depend on n"):
        load(text)


def test_scale_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    text = "pattern p() { causal block 16 head a = local(4) }"
    q = torch.randn(1, 1, 20, 8, dtype=torch.float64)
    from patterncc.families.blocksparse.naive import masked_attention

    out = load(text, scale=0.3, backend="torch")(q, q, q)
    torch.testing.assert_close(out, masked_attention(q, q, q, pattern_mask(patterncc.parse(text), 20), scale=0.3),
                               rtol=1e-10, atol=1e-12)
