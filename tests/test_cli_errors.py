"""The command line: exit 0 on success, exit 2 with a located message and no traceback on any user error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from patterncc.cli import main

BAD_SYNTAX = "pattern p() {\n    head a = local(1\n}\n"
BAD_SEMANTICS = "pattern p(l = 4) {\n    head a = summary(l, 9)\n}\n"
TWO_PATTERNS = "pattern a() { head x = local(1) }\npattern b() { head y = stride(2) }\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, f"exit {code} for {argv}; stderr:\n{err}"
    assert "Traceback" not in err + out
    assert err.strip(), "no message on stderr"
    return err


@pytest.fixture
def write(tmp_path: Path):
    def write(text: str, name: str = "p.attn") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def test_show_succeeds(capsys, examples_dir: Path, tmp_path: Path):
    out_png = tmp_path / "strided.png"
    code, out, err = run(capsys, "show", examples_dir / "strided.attn", "--n", "200", "-o", out_png, "--grid", "20",
                         "-D", "l=16")
    assert code == 0, err
    assert out.strip() == f"wrote {out_png}"
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_show_picks_a_pattern(capsys, write, tmp_path: Path):
    code, _, err = run(capsys, "show", write(TWO_PATTERNS), "--pattern", "b", "--n", "40", "-o", tmp_path / "b.png")
    assert code == 0, err


def test_syntax_error(capsys, write):
    path = write(BAD_SYNTAX)
    err = user_error(capsys, "show", path, "--n", "64", "-o", path.with_suffix(".png"))
    assert err.startswith(f"{path}:3:1: syntax error: unexpected '}}'; expected ')', ','")
    assert "    ^" in err


def test_semantic_error(capsys, write):
    path = write(BAD_SEMANTICS)
    err = user_error(capsys, "show", path, "--n", "64", "-o", path.with_suffix(".png"))
    assert err.startswith(f"{path}:2:14: error: summary(l, c): c must be at most l, but c = 9 and l = 4")


def test_error_that_needs_n(capsys, write):
    path = write("pattern p(w = 100 - n) {\n    head a = local(w)\n}\n")
    err = user_error(capsys, "show", path, "--n", "128", "-o", path.with_suffix(".png"))
    assert "window of local must be positive, got -28 (with n = 128)" in err


def test_missing_file(capsys, tmp_path: Path):
    err = user_error(capsys, "show", tmp_path / "nope.attn", "--n", "64", "-o", tmp_path / "x.png")
    assert err.strip() == f"{tmp_path / 'nope.attn'}: error: file not found"


def test_file_name_without_suffix_is_still_a_file(capsys, tmp_path: Path):
    err = user_error(capsys, "show", tmp_path / "nope", "--n", "64", "-o", tmp_path / "x.png")
    assert "file not found" in err


@pytest.mark.parametrize("define, words", [
    ("ll=3", ["pattern `fixed` has no parameter `ll`; its parameters are l, c", "did you mean `l`?"]),
    ("l", ["-D expects NAME=INTEGER, got 'l'"]),
    ("l=abc", ["-D 'l=abc': 'abc' is not an integer"]),
    ("3=4", ["'3' is not a parameter name"]),
    ("c=300", ["c must be at most l, but c = 300 and l = 128"]),
], ids=["unknown-parameter", "no-value", "not-an-integer", "not-a-name", "value-breaks-a-check"])
def test_bad_defines(capsys, examples_dir: Path, tmp_path: Path, define, words):
    err = user_error(capsys, "show", examples_dir / "fixed.attn", "--n", "64", "-D", define, "-o", tmp_path / "x.png")
    for word in words:
        assert word in err, err


def test_several_patterns_need_pattern_option(capsys, write, tmp_path: Path):
    err = user_error(capsys, "show", write(TWO_PATTERNS), "--n", "64", "-o", tmp_path / "x.png")
    assert "this file defines 2 patterns (a, b)" in err and "--pattern NAME" in err
    err = user_error(capsys, "show", write(TWO_PATTERNS), "--pattern", "c", "--n", "64", "-o", tmp_path / "x.png")
    assert "no pattern named `c`; this file defines a, b" in err


@pytest.mark.parametrize("output, words", [
    ("missing/x.png", "does not exist"),
    (".", "is a folder"),
    ("x.svg", "must be a .png file"),
], ids=["missing-folder", "folder", "not-png"])
def test_bad_output(capsys, examples_dir: Path, tmp_path: Path, output, words):
    err = user_error(capsys, "show", examples_dir / "local.attn", "--n", "64", "-o", tmp_path / output)
    assert words in err


def test_bad_query(capsys, examples_dir: Path, tmp_path: Path):
    err = user_error(capsys, "show", examples_dir / "local.attn", "--n", "64", "--grid", "8", "--query", "64", "-o",
                     tmp_path / "x.png")
    assert "the query position must be in 0..63 (n = 64), got 64" in err


@pytest.mark.parametrize("argv, words", [
    (["show", "x.attn", "--n", "0", "-o", "x.png"], "expected a positive integer, got 0"),
    (["show", "x.attn", "--n", "ten", "-o", "x.png"], "expected a positive integer, got 'ten'"),
    (["show", "x.attn", "-o", "x.png"], "the following arguments are required: --n"),
    (["draw", "x.attn"], "invalid choice: 'draw'"),
    ([], "the following arguments are required: COMMAND"),
], ids=["n-zero", "n-not-a-number", "n-missing", "unknown-command", "no-command"])
def test_bad_options_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("patterncc 0.")


def test_check_succeeds(capsys, examples_dir: Path):
    code, out, err = run(capsys, "check", examples_dir / "strided.attn", "--n", "256", "-D", "l=16")
    assert code == 0, err
    assert out.startswith("strided") and "Traceback" not in err


def test_check_reports_user_errors(capsys, write):
    path = write(BAD_SYNTAX)
    err = user_error(capsys, "check", path, "--n", "64")
    assert err.startswith(f"{path}:3:1: syntax error")
    err = user_error(capsys, "check", write(BAD_SEMANTICS, "s.attn"), "--n", "64")
    assert "c must be at most l" in err
    err = user_error(capsys, "check", write(TWO_PATTERNS, "two.attn"), "--pattern", "z", "--n", "64")
    assert "no pattern named `z`" in err


def test_empty_rows_warn_with_an_example_query(capsys, write):
    """A head whose rows are empty for some i is legal but almost surely a mistake: a warning, exit 0."""
    path = write("pattern p() {\n    causal\n    head a = where j > i + 3 or i > 9\n    head b = local(1)\n}\n")
    code, out, err = run(capsys, "check", path, "--n", "64")
    assert code == 0, err
    assert out.startswith("p ("), out
    assert err.startswith("warning: pattern `p`, head `a`: query i = 0 attends to no key"), err
    assert "10 of 64 rows are empty at n = 64" in err
    assert "head `b`" not in err


def test_console_script_exits_2_without_traceback(tmp_path: Path):
    script = Path(sys.executable).parent / "patterncc"
    assert script.is_file(), f"no console script at {script}: install patterncc (bash scripts/dev.sh test does)"
    bad = tmp_path / "bad.attn"
    bad.write_text(BAD_SYNTAX)
    result = subprocess.run([str(script), "show", str(bad), "--n", "64", "-o", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{bad}:3:1: syntax error"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
