"""Hostile and careless inputs (issue 12, front end and command line): each ends within seconds, in bounded
memory, with a result or a located PatternError (on the command line: a message, no traceback, exit 2)."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest

import patterncc
from patterncc import PatternSemanticError, PatternSyntaxError, PatternUsageError
from patterncc.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, f"exit {code} for {argv}; stderr:\n{err}"
    assert "Traceback" not in out + err
    return err


class within:
    """Asserts that a block takes at most `seconds` (the cases below took minutes to hours, or never ended)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.start
        assert elapsed < self.seconds, f"took {elapsed:.1f} s (at most {self.seconds} s)"


def doubling_lets(count: int, first: str = "i - j", op: str = "+", use: str = "where a{last} > 0") -> str:
    lets = "\n".join(f"    let a{k} = a{k - 1} {op} a{k - 1}" for k in range(1, count + 1))
    return f"pattern p() {{\n    let a0 = {first}\n{lets}\n    head x = {use.format(last=count)}\n}}\n"


# 1. Lets that double the previous one -------------------------------------------------------------------------


@pytest.mark.parametrize("first, op, use", [("i - j", "+", "where a{last} > 0"), ("i > j", "and", "where a{last}"),
                                            ("h + 1", "*", "local(a{last})")], ids=["positions", "conditions", "h"])
def test_doubling_lets_are_a_located_error_not_exponential_work(capsys, tmp_path, first, op, use):
    text = doubling_lets(30, first, op, use)
    with within(5):
        with pytest.raises(PatternSemanticError) as info:
            patterncc.parse(text)
    message = str(info.value)
    assert "once its lets are inlined (at most 10000)" in message and "    let a1" in message
    assert "^" in message
    path = tmp_path / "doubling.attn"
    path.write_text(text)
    with within(10):
        assert "at most 10000" in user_error(capsys, "check", path, "--n", "64")


def test_shared_lets_stay_linear_in_every_consumer():
    """Below the bound, a let used twice is one object: analysis, masks and code generation each visit it once."""
    from patterncc.analysis.analyze import analyze
    from patterncc.mask import pattern_mask

    pattern = patterncc.parse(doubling_lets(9, "i > j", "and", "where a{last}"))
    plain = patterncc.parse("pattern p() { head x = where i > j }")
    with within(10):
        assert pattern_mask(pattern, 64).equal(pattern_mask(plain, 64))
        assert analyze(pattern, 256).heads[0].rows.nonzeros == analyze(plain, 256).heads[0].rows.nonzeros
        assert "class PAttention" in patterncc.compile_pattern(pattern).source


@pytest.mark.parametrize("body", [" and ".join(["i > j"] * 130), "not " * 500 + "i > j", "i" + " + 0" * 500],
                         ids=["long-and", "500-nots", "500-plus-0"])
def test_deeply_nested_expressions_are_a_located_error_not_a_recursion_error(body):
    with within(5):
        with pytest.raises((PatternSyntaxError, PatternSemanticError)) as info:
            patterncc.parse(f"pattern p() {{\n    head x = where {body} > 0\n}}\n"
                            if body.startswith("i +") else f"pattern p() {{\n    head x = where {body}\n}}\n")
    assert "levels deep" in str(info.value) and ":2:" in str(info.value)


# 2. Values beyond int64 ----------------------------------------------------------------------------------------


def test_squaring_lets_stop_at_2_62_with_a_located_error():
    lets = "\n".join(f"    let a{k} = a{k - 1} * a{k - 1}" for k in range(1, 36))
    with within(2):
        with pytest.raises(PatternUsageError) as info:
            patterncc.parse(f"pattern p() {{\n    let a0 = 3\n{lets}\n    head x = local(1)\n}}\n")
    message = str(info.value)
    assert "let `a6`" in message and "(|value| < 2**62)" in message
    assert message.splitlines()[1].strip() == "let a6 = a5 * a5" and "^^^^^^^" in message


def test_huge_literals_and_overrides_are_refused_where_written(capsys):
    with within(2):
        with pytest.raises(PatternSyntaxError, match="literals must be below 2"):
            patterncc.parse("pattern p() { head x = local(" + "9" * 5000 + ") }")
    with pytest.raises(PatternUsageError, match=r"parameter `l` is outside the range"):
        patterncc.parse(EXAMPLES / "strided.attn", l=2**70)
    assert "outside the range" in user_error(capsys, "check", EXAMPLES / "strided.attn", "--n", "64",
                                             "-D", f"l={2**70}")


# 3. sympy ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [NotImplementedError("MRV set computation"),
                                     TypeError("_eval_nseries() missing 1 required positional argument: 'cdir'")],
                         ids=["mrv", "cdir"])
def test_sympy_failures_in_the_order_fall_back_to_the_bound(monkeypatch, capsys, failure):
    from patterncc.analysis import cost

    def broken(expr):
        raise failure

    monkeypatch.setattr(cost, "_order", broken)
    analysis = patterncc.analyze(patterncc.parse(EXAMPLES / "strided.attn"), 1024)
    stride = analysis.head("stride").cost
    assert stride.order is None and cost.ORDER_UNKNOWN_NOTE in stride.notes
    assert str(stride.formula) == "1 + n/l"
    assert analysis.head("stride").to_json(dict(analysis.bound.env), 1024)["cost"]["order"] == "?"
    code, out, _ = run(capsys, "check", EXAMPLES / "strided.attn", "--n", "1024")
    assert code == 0 and "could not be computed" in out


# 4. Sizes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["check", "strided.attn", "--n", "131072"], "check takes --n up to 32768, got 131072"),
    (["check", "strided.attn", "--n", str(10**7)], "check takes --n up to 32768"),
    (["check", "strided.attn", "--n", "64", "--max-steps", "100000"], "max_steps is at most 64, got 100000"),
    (["show", "strided.attn", "--n", "64", "--grid", "100000", "-o", "{tmp}/x.png"], "grid width must be at most n"),
    (["compile", "strided.attn", "--n", str(10**7)], "compile takes --n up to 65536"),
], ids=["check-n", "check-n-1e7", "max-steps", "show-grid", "compile-n"])
def test_user_sizes_are_bounded_with_the_limit_named(capsys, tmp_path, argv, message):
    argv = [str(EXAMPLES / a) if a.endswith(".attn") else a.format(tmp=tmp_path) for a in argv]
    with within(10):
        assert message in user_error(capsys, *argv)


def test_twenty_thousand_head_statements_are_refused_at_the_4097th(capsys, tmp_path):
    heads = "\n".join(f"    head h{k} = local({k % 7 + 1})" for k in range(20000))
    path = tmp_path / "many.attn"
    path.write_text(f"pattern p() {{\n{heads}\n}}\n")
    with within(20):
        err = user_error(capsys, "check", path, "--n", "64")
    assert "declares more than 4096 heads" in err and ":4098:" in err


def test_the_head_limit_bounds_all_groups_together():
    p = patterncc.parse("pattern p() { head a[4000] = local(h + 1)\n head b[200] = local(1) }")
    with pytest.raises(PatternUsageError, match="has 4200 heads in all"):
        patterncc.semantics.bind_pattern(p, 64)


def test_permutation_candidates_are_bounded_for_unions_of_many_periods():
    from patterncc.analysis.permute import MAX_PERIODS, candidate_periods

    heads = "\n".join(f"    head s{k} = stride({k + 2})" for k in range(40))
    p = patterncc.parse(f"pattern p() {{\n{heads}\n}}\n")
    bound = patterncc.semantics.bind_pattern(p, 256)
    pairs = tuple((g, 0) for g in p.heads)
    assert candidate_periods(bound, pairs) == list(range(2, 2 + MAX_PERIODS))


def test_show_refuses_more_distinct_heads_than_it_can_draw(tmp_path):
    from patterncc.show import MAX_PANELS, render

    p = patterncc.parse("pattern p() { head s[100] = where j % 100 == h }")
    with within(5), pytest.raises(PatternUsageError, match=f"draws at most {MAX_PANELS}"):
        render(p, 128, tmp_path / "x.png")


# 5. Command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["examples/strided.atn", "pattern p() { head a = local(1) }", "a\nb"],
                         ids=["mistyped", "braces", "newline"])
def test_a_file_argument_is_always_a_path(capsys, name):
    err = user_error(capsys, "check", name, "--n", "64")
    assert "file not found" in err and "syntax error" not in err


def test_pattern_text_comes_through_text_or_stdin(capsys, monkeypatch):
    text = "pattern w(k = 8) { causal; head a = local(k) }"
    code, out, _ = run(capsys, "check", "--text", text, "--n", "64")
    assert code == 0 and "w (<text>)" in out
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code, out, _ = run(capsys, "check", "-", "--n", "64")
    assert code == 0 and "w (<stdin>)" in out
    assert "either FILE or --text" in user_error(capsys, "check", EXAMPLES / "local.attn", "--text", text,
                                                 "--n", "64")


def test_check_accepts_several_files(capsys):
    code, out, _ = run(capsys, "check", EXAMPLES / "strided.attn", EXAMPLES / "fixed.attn", "--n", "256", "--json")
    assert code == 0 and '"pattern": "strided"' in out and '"pattern": "fixed"' in out


def test_compile_to_an_unwritable_place_is_a_clean_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = user_error(capsys, "compile", EXAMPLES / "local.attn", "-o", blocker / "out")
    assert err.startswith("<pattern>: error: cannot write ") and "file/out" in err


@pytest.mark.parametrize("target", ["sm_75", "sm_100", "gfx90a", "90x"])
def test_compile_refuses_targets_it_does_not_support(capsys, target):
    with within(5):
        err = user_error(capsys, "compile", EXAMPLES / "local.attn", "--target", target)
    assert f"unsupported target {target!r}; expected one of sm_80, sm_90" in err


def test_generated_files_get_the_umask_mode_and_reach_the_disk(tmp_path, monkeypatch):
    from patterncc.cache import write_atomically

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "a" / "m.py", "x = 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "m.py").stat().st_mode) == 0o644
    assert synced and (tmp_path / "a" / "m.py").read_text() == "x = 1\n"


# 6. Line breaks and reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["pattern p() {\r    causal\r    head a = locl(1)\r}\r",
                                  "pattern p() {\r\n    causal\r\n    head a = locl(1)\r\n}\r\n",
                                  "pattern p() {\x0c    causal\n    head a = locl(1)\n}\n",
                                  "pattern p() { # a\x1cb\u2028c\x85\n    head a = locl(1)\n}\n"],
                         ids=["cr", "crlf", "form-feed", "separators-in-a-comment"])
def test_the_caret_is_under_the_error_whatever_the_line_breaks(text):
    with pytest.raises(PatternSemanticError) as info:
        patterncc.parse(text)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("<pattern>:3:14: error: unknown primitive `locl`") or \
        lines[0].startswith("<pattern>:2:14: error: unknown primitive `locl`")
    assert lines[1] == "        head a = locl(1)" and lines[2] == "                 ^^^^"


def test_dev_zero_is_refused_after_a_mebibyte(capsys):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    with within(5):
        err = user_error(capsys, "check", "/dev/zero", "--n", "64")
    assert "larger than 1048576 bytes" in err


def test_invalid_utf8_is_named_with_its_offset(capsys, tmp_path, monkeypatch):
    path = tmp_path / "bad.attn"
    path.write_bytes(b"pattern p() {\n  head a = local(1) \xff\n}\n")
    assert "not UTF-8 text: byte 0xff at offset 34 (line 2)" in user_error(capsys, "check", path, "--n", "64")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xfe" * 10)))
    assert "<stdin>: error: <stdin> is not UTF-8 text" in user_error(capsys, "check", "-", "--n", "64")


# 7. The Python API ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.attn", "examples/strided.atn", "some/dir/pattern"])
def test_api_path_like_strings_that_do_not_exist_are_file_not_found(name):
    with pytest.raises(PatternUsageError, match="file not found"):
        patterncc.parse(name)


def test_api_still_takes_text_and_paths():
    assert patterncc.parse(str(EXAMPLES / "strided.attn")) == patterncc.parse(EXAMPLES / "strided.attn")
    assert patterncc.parse("pattern w(k = 8) { causal; head a = local(k) }").name == "w"
    with pytest.raises(PatternSyntaxError, match="a pattern starts with"):
        patterncc.parse("head a = local(1)")
