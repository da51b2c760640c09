"""Runtime inputs and the cache, as a careless user or a damaged disk provides them: every path checks the same
things with the same messages, an empty batch works, and a bad cached module is regenerated rather than imported."""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_support import build

import patterncc
from patterncc.cache import read_sealed, seal
from patterncc.families.linear.ops import linear_attention
from patterncc.families.lsh.ops import lsh_attention, lsh_rotations

MIXED = """pattern mixed() {
    causal
    head s = local(4)
    head l = hashed(buckets = 4, chunk = 8)
    head k = kernel(elu1)
}"""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return build(patterncc.parse(MIXED), tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def set_only(tmp_path_factory):
    return build(patterncc.parse("pattern w() { causal; block 16; head a = local(5) }"),
                 tmp_path_factory.mktemp("set"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gives_empty_output_and_gradients(mixed, set_only, backend):
    for module in (mixed, set_only):
        q, k, v = (torch.randn(0, module.NUM_HEADS, 24, 16, requires_grad=True) for _ in range(3))
        out = module.attention(q, k, v, backend=backend)
        assert out.shape == q.shape
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_empty_batch_in_each_family_entry_point():
    q, k, v = (torch.randn(0, 2, 24, 16, requires_grad=True) for _ in range(3))
    assert lsh_attention(q, k, v, lsh_rotations(2, 1, 16, 4, seed=0), 8, True, False).shape == q.shape
    assert linear_attention(q, k, v, "elu1", 1e-6, True).shape == q.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_integer_inputs_are_rejected_on_every_path(mixed, backend):
    q = torch.ones(1, mixed.NUM_HEADS, 24, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="must be floating point"):
        mixed.attention(q, q, q, backend=backend)
    with pytest.raises(ValueError, match="must be floating point"):
        lsh_attention(q[:, :1], q[:, :1], q[:, :1], lsh_rotations(1, 1, 16, 4, seed=0), 8, True, False,
                      backend=backend)
    with pytest.raises(ValueError, match="must be floating point"):
        linear_attention(q[:, :1], q[:, :1], q[:, :1], "elu1", 1e-6, True, backend=backend)


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error(set_only, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 24, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        set_only.attention(q, q, q, backend="triton")


def test_seal_detects_truncation_and_garbage(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(seal("x = 1\n"))
    assert read_sealed(path) == "x = 1\n"
    for damaged in ("", "x = 1\n", seal("x = 1\n")[:-10], seal("x = 1\n").replace("x = 1", "x = 2"), "\x00\x01"):
        path.write_text(damaged)
        assert read_sealed(path) is None, repr(damaged)
    path.write_bytes(b"\xff\xfe garbage")
    assert read_sealed(path) is None


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_a_damaged_cached_module_is_regenerated(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    text = "pattern healme() { causal; head a = local(3) }"
    first = patterncc.load(text)
    [path] = list(tmp_path.glob("*/healme.py"))
    source = path.read_text()
    path.write_text({"truncate": source[: len(source) // 2], "empty": "", "garbage": "}}} not python"}[damage])
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = patterncc.load(text)
    assert path.read_text() == source
    q = torch.randn(1, 1, 20, 16)
    torch.testing.assert_close(again(q, q, q), first(q, q, q))


def test_a_module_cached_by_another_process_meanwhile_is_not_called_damaged(tmp_path, monkeypatch):
    """Ranks of one job load the same pattern at once: each compiles it, and finds the file another wrote."""
    from patterncc import driver
    from patterncc.cache import seal, write_atomically

    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    compile_pattern = driver.compile_pattern

    def compiled_while_another_process_writes(pattern, **kwargs):
        compiled = compile_pattern(pattern, **kwargs)
        key = driver.identity_key(pattern, driver.Options.make(0, params={}))
        written.append(tmp_path / key / "race.py")
        write_atomically(written[-1], seal(compiled.source))
        return compiled

    written = []
    monkeypatch.setattr(driver, "compile_pattern", compiled_while_another_process_writes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn = patterncc.load("pattern race() { head a = local(2) }")
    assert [p.exists() for p in written] == [True]  # the other process's file was there when load wrote its own
    q = torch.randn(1, 1, 10, 16)
    assert attn(q, q, q).shape == q.shape


def test_an_unusable_cache_folder_falls_back_with_a_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="PATTERNCC_CACHE_DIR"):
        attn = patterncc.load("pattern fallback() { head a = local(2) }")
    q = torch.randn(1, 1, 10, 16)
    assert attn(q, q, q).shape == q.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a usable folder gives no warning
        monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "ok"))
        patterncc.load("pattern fallback() { head a = local(2) }")


def test_int_subclass_overrides_are_reprinted_as_plain_integers():
    """An override whose type prints itself differently never reaches generated code as its own text."""

    class Sneaky(int):
        def __str__(self):
            return "8\nimport os; os.system('echo pwned')"

        __repr__ = __str__

    pattern = patterncc.parse("examples/strided.attn", l=Sneaky(8))
    source = patterncc.compile_pattern(pattern, params={"l": Sneaky(8)}).source
    assert "pwned" not in source and "l=8" in source


def test_patterns_whose_files_differ_only_in_case_are_refused(tmp_path):
    import subprocess
    import sys

    source = tmp_path / "cases.attn"
    source.write_text("pattern foo() { head a = local(1) }\npattern Foo() { head a = local(2) }\n"
                      "pattern FOO() { head a = local(3) }\n")
    command = [sys.executable, "-m", "patterncc.cli", "compile", str(source), "-o", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "`foo` and `Foo` would both be written to foo.py" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    one = subprocess.run([sys.executable, "-m", "patterncc.cli", "compile", str(source), "--pattern", "Foo", "-o",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
