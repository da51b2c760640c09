"""The driver: named passes in order, each pass's output dumped on request, one identity key for the cache and
the compiled pattern."""

from __future__ import annotations

from pathlib import Path

import pytest

import patterncc
from patterncc import driver
from patterncc.cache import cache_dir, load_module
from patterncc.cli import main
from patterncc.driver import Options, compile_pattern, identity_key

TEXT = "pattern tiny(l = 8) { causal block 16 head a = local(l) head b = stride(l) }"
DUMPED = ["tiny.1-parse.attn", "tiny.2-plan.txt", "tiny.3-render.py", "tiny.4-verify.py"]


def test_passes_are_named_in_order():
    assert [name for name, _ in driver.PASSES] == ["parse", "plan", "render", "verify"]


def test_compile_dumps_each_pass(tmp_path: Path):
    compiled = compile_pattern(patterncc.parse(TEXT), dump=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == DUMPED
    assert patterncc.parse((tmp_path / DUMPED[0]).read_text()) == compiled.pattern
    assert (tmp_path / DUMPED[1]).read_text().startswith("KernelPlan(")
    assert (tmp_path / DUMPED[3]).read_text() == compiled.source


def test_each_pass_takes_the_previous_output():
    outputs = driver.run_passes(TEXT, Options.make(params={"l": 4}))
    assert list(outputs) == ["parse", "plan", "render", "verify"]
    assert outputs["plan"].pattern == outputs["parse"] == patterncc.parse(TEXT, l=4)
    assert outputs["verify"] == outputs["render"]


def test_verify_pass_rejects_duplicate_definitions():
    verify = dict(driver.PASSES)["verify"]
    with pytest.raises(patterncc.PatternError, match="defined twice"):
        verify("def f():\n    return 1\n\n\ndef f():\n    return 2\n", Options())


def test_cli_dump_passes(tmp_path: Path, capsys):
    source = tmp_path / "tiny.attn"
    source.write_text(TEXT)
    assert main(["compile", str(source), "--dump-passes", str(tmp_path / "dump")]) == 0
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == DUMPED


def test_environment_dumps_passes_for_load_even_from_the_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PATTERNCC_DUMP_PASSES", raising=False)
    load_module(TEXT)
    monkeypatch.setenv("PATTERNCC_DUMP_PASSES", str(tmp_path / "dump"))
    load_module(TEXT)
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == DUMPED


def test_identity_key_follows_the_ir_and_every_option():
    pattern = patterncc.parse(TEXT)
    key = identity_key(pattern, Options())
    commented = patterncc.parse("# a comment\n" + TEXT.replace("{ ", "{\n    "))
    assert identity_key(commented, Options()) == key, "comments and layout are not part of the identity"
    others = [identity_key(patterncc.parse(TEXT, l=4), Options.make(params={"l": 4})),
              identity_key(pattern, Options.make(layer=1)), identity_key(pattern, Options.make(n=1024)),
              identity_key(patterncc.parse(TEXT.replace("stride(l)", "stride(l * 2)")), Options())]
    assert len({key, *others}) == 5, "each option is another key"


def test_cache_and_compiled_share_the_key(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PATTERNCC_DUMP_PASSES", raising=False)
    module = load_module(TEXT, l=4)
    compiled = compile_pattern(patterncc.parse(TEXT, l=4), params={"l": 4})
    assert Path(module.__file__) == cache_dir() / compiled.key / "tiny.py"
