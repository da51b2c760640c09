"""Every user error the front end reports: its type, its words, and where it points (line, column, caret)."""

from __future__ import annotations

from pathlib import Path

import pytest

import patterncc
from patterncc import PatternError, PatternSemanticError, PatternSyntaxError, PatternUsageError
from patterncc.mask import pattern_mask
from patterncc.semantics import bind_pattern


def located(err: PatternError, line: int, column: int, *words: str, filename: str = "<pattern>") -> str:
    """Check that `err` points at line:column, shows that source line with a caret under it, and says `words`."""
    text = err.render()
    assert err.span is not None, f"error has no position:\n{text}"
    assert (err.span.line, err.span.column) == (line, column), f"expected {line}:{column}, got:\n{text}"
    header, source_line, caret, *_ = text.splitlines()
    assert header.startswith(f"{filename}:{line}:{column}: "), text
    assert source_line == "    " + err.source.splitlines()[line - 1], text
    assert caret.startswith("    " + " " * (column - 1) + "^"), f"caret not under column {column}:\n{text}"
    assert caret.strip() == "^" * len(caret.strip()), text
    for word in words:
        assert word in text, f"{word!r} missing from:\n{text}"
    return text


def error_of(source: str, kind: type[PatternError] = PatternError, **params) -> PatternError:
    with pytest.raises(kind) as info:
        patterncc.parse(source, **params)
    return info.value


def in_head(expr: str, params: str = "", before: str = "") -> str:
    """A pattern whose line 2 (or 3, with `before`) is `    head a = EXPR`: its expression starts at column 14."""
    lines = [f"pattern p({params}) {{", *([f"    {before}"] if before else []), f"    head a = {expr}", "}"]
    return "\n".join(lines) + "\n"


# Syntax errors ---------------------------------------------------------------------------------------------------

SYNTAX = [
    ("unclosed-call", "pattern p() {\n    head a = local(1\n}\n", 3, 1, ["unexpected '}'", "expected", "')'", "','",
                                                                        "unbalanced"]),
    ("stray-character", in_head("local(1) $"), 2, 23, ["unexpected character '$'"]),
    ("where-then-set-operator", in_head("where i > j | local(1)"), 2, 26,
     ["unexpected '|'", "`where` extends to the end", "(where ...) | other"]),
    ("missing-equals", "pattern p() {\n    head a local(1)\n}\n", 2, 12, ["unexpected 'local'", "expected '=', '['",
                                                                          "head NAME = EXPR"]),
    ("statement-outside-pattern", "head a = local(1)\n", 1, 1, ["unexpected 'head'", "expected 'pattern'"]),
    ("end-of-file", "pattern p() {\n    head a = local(1)\n", 2, 21, ["unexpected end of file", "'}'"]),
    ("trailing-comma", "pattern p(l = 1,) {\n    head a = local(l)\n}\n", 1, 17, ["unexpected ')'", "a name",
                                                                             "(name = default, ...)"]),
    ("c-style-not", in_head("where !(i > j)"), 2, 20, ["unexpected character '!'", "`not`"]),
    ("c-style-and", in_head("where i > j && j > 0"), 2, 26, ["unexpected '&'", "combine conditions with `and`"]),
    ("single-slash", in_head("where i / 2 == j"), 2, 22, ["unexpected character '/'", "`//`"]),
    ("assignment-for-comparison", in_head("where i = j"), 2, 22, ["unexpected '='", "a comparison", "`==`"]),
]


@pytest.mark.parametrize("source, line, column, words", [c[1:] for c in SYNTAX], ids=[c[0] for c in SYNTAX])
def test_syntax_errors(source, line, column, words):
    located(error_of(source, PatternSyntaxError), line, column, "syntax error", *words)


def test_syntax_error_names_the_file(tmp_path: Path):
    path = tmp_path / "bad.attn"
    path.write_text("pattern p() {\n    head a = local(1\n}\n")
    err = error_of(path, PatternSyntaxError)
    located(err, 3, 1, filename=str(path))
    assert str(err).startswith(f"{path}:3:1: syntax error: unexpected '}}'")


# Semantic errors -------------------------------------------------------------------------------------------------

SEMANTIC = [
    # unknown names, with a did-you-mean
    ("unknown-primitive", in_head("locl(4)"), 2, 14, ["unknown primitive `locl`", "did you mean `local`?"]),
    ("unknown-primitive-lists-all", in_head("foo(4)"), 2, 14, ["unknown primitive `foo`",
                                                              "the primitives are local, stride, chunk"]),
    ("unknown-parameter", in_head("local(windw)", params="window = 4"), 2, 20,
     ["unknown name `windw`", "did you mean `window`?"]),
    ("unknown-keyword-argument", in_head("random(2, sed = 1)"), 2, 24, ["`random` has no argument `sed`",
                                                                      "did you mean `seed`?"]),
    ("unknown-function", in_head("where abss(i - j) < 3"), 2, 20, ["unknown function `abss`", "did you mean `abs`?"]),
    ("unknown-combine-mode", in_head("local(1)", before="combine merge"), 2, 13,
     ["unknown combine mode `merge`", "multihead, merged, interleaved", "did you mean `merged`?"]),
    ("unknown-feature-map", in_head("kernel(elu)"), 2, 21, ["unknown feature map `elu`",
                                                             "expected one of elu1, relu, favor",
                                                          "did you mean"]),
    # arity
    ("too-many-arguments", in_head("local(1, 2)"), 2, 23, ["`local` takes 1 argument but got 2", "write local(w)"]),
    ("missing-argument", in_head("summary(4)"), 2, 14, ["`summary` is missing argument `c`",
                                                        "write summary(l, c)"]),
    ("function-arity", in_head("where min(i) > 0"), 2, 20, ["`min` takes 2 arguments but got 1"]),
    ("positional-after-keyword", in_head("random(seed = 1, 2)"), 2, 31,
     ["a positional argument follows a keyword argument"]),
    ("argument-twice", in_head("random(2, r = 3)"), 2, 24, ["argument `r` of `random` is given twice"]),
    # argument types
    ("condition-for-integer", in_head("local(1 > 2)"), 2, 22,
     ["argument `w` of `local` must be an integer, but this is a condition"]),
    ("integer-for-condition", in_head("where i + j"), 2, 20, ["a `where` predicate must be a condition", "integer"]),
    ("integer-for-boolean-argument", in_head("hashed(shared_qk = 1)"), 2, 33,
     ["argument `shared_qk` of `hashed` must be a condition"]),
    ("decimal-for-integer", in_head("local(1.5)"), 2, 20, ["decimal numbers are only allowed for `eps`", "1.5"]),
    ("position-outside-where", in_head("local(i)"), 2, 20,
     ["`i` (the query position) can only be used inside `where`"]),
    ("h-outside-head", "pattern p(l = h) {\n    head a = local(l)\n}\n", 1, 15,
     ["`h` (the head's index within its group) can only be used in a head's expression"]),
    ("let-over-positions-outside-where", in_head("local(d)", before="let d = i - j"), 3, 20,
     ["let `d` uses i or j, so it can only be used inside `where`"]),
    # values
    ("zero-stride", in_head("stride(0)"), 2, 14, ["stride of stride must be positive, got 0"]),
    ("negative-stride", in_head("stride(-2)"), 2, 14, ["stride of stride must be positive, got -2"]),
    ("zero-window", in_head("local(0)"), 2, 14, ["window of local must be positive, got 0"]),
    ("zero-chunk", in_head("chunk(l - 4)", params="l = 4"), 2, 14, ["stride of chunk must be positive, got 0"]),
    ("zero-dilation", in_head("dilated(3, 0)"), 2, 14, ["d of dilated must be positive, got 0"]),
    ("zero-random", in_head("random(0)"), 2, 14, ["r of random must be positive, got 0"]),
    ("c-greater-than-l", in_head("summary(4, 8)"), 2, 14, ["c must be at most l", "c = 8", "l = 4"]),
    ("c-greater-than-l-fixed", in_head("fixed(l, c)", params="l = 8, c = 9"), 2, 14,
     ["fixed(l, c): c must be at most l", "c = 9", "l = 8"]),
    ("block-not-power-of-two", in_head("local(1)", before="block 48"), 2, 5,
     ["block size must be a power of two >= 16, got 48"]),
    ("block-too-small", in_head("local(1)", before="block 8"), 2, 5, ["power of two >= 16, got 8"]),
    ("head-count-zero", "pattern p() {\n    head a[0] = local(1)\n}\n", 2, 12,
     ["head count of `a` must be between 1 and 4096, got 0"]),
    ("head-count-huge", "pattern p() {\n    head a[10**9] = local(1)\n}\n".replace("10**9", str(10**9)), 2, 12,
     ["head count of `a` must be between 1 and 4096, got 1000000000"]),
    ("odd-buckets", in_head("hashed(buckets = 3)"), 2, 14, ["buckets of hashed must be an even number", "got 3"]),
    ("favor-without-features", in_head("kernel(favor)"), 2, 14, ["needs `features = m`"]),
    ("features-without-favor", in_head("kernel(elu1, features = 4)"), 2, 14,
     ["`features` only applies to kernel(favor)"]),
    ("non-positive-eps", in_head("kernel(relu, eps = 0)"), 2, 14, ["eps of kernel(relu) must be a positive finite"]),
    ("division-by-zero", in_head("where i % 0 == 0"), 2, 20, ["division by zero"]),
    # families and heads
    ("union-with-hashed", in_head("hashed() | local(3)"), 2, 14,
     ["`hashed(...)` heads cannot take part in set algebra (`|`)", "own"]),
    ("intersection-with-kernel", in_head("local(3) & kernel(elu1)"), 2, 25,
     ["`kernel(...)` heads cannot take part in set algebra (`&`)"]),
    ("difference-with-nested-hashed", in_head("local(1) - (dense & hashed())"), 2, 34,
     ["`hashed(...)` heads cannot take part in set algebra (`&`)"]),
    ("merged-over-kernel-head",
     "pattern p() {\n    combine merged\n    head a = local(3)\n    head b = kernel(elu1)\n}",
     4, 10, ["`combine merged` takes the union of set heads, but head `b` is a kernel head", "combine multihead"]),
    ("merged-over-hashed-head", "pattern p() {\n    head h1 = hashed()\n    combine merged\n    head b = dense\n}",
     2, 10, ["head `h1` is a hashed head"]),
    ("duplicate-head", "pattern p() {\n    head a = local(3)\n    head a = local(4)\n}\n", 3, 10,
     ["head `a` is declared twice (first on line 2)"]),
    ("duplicate-pattern", "pattern p() { head a = dense }\n\npattern p() { head a = dense }\n", 3, 9,
     ["pattern `p` is defined twice (first on line 1)"]),
    ("duplicate-parameter", "pattern p(l = 1, l = 2) {\n    head a = local(l)\n}\n", 1, 18,
     ["parameter `l` is declared twice"]),
    ("let-shadows-parameter", in_head("local(l)", params="l = 2", before="let l = 3"), 2, 9,
     ["`l` is already defined"]),
    ("causal-twice", in_head("local(1)", before="causal causal"), 2, 12, ["`causal` is given twice"]),
    ("no-heads", "pattern p() {\n    causal\n}\n", 1, 9, ["pattern `p` declares no head", "hint: add a head"]),
    # names
    ("builtin-name", "pattern p() {\n    head n = local(1)\n}\n", 2, 10, ["`n` is a built-in name"]),
    ("keyword-name", "pattern p() {\n    head class = local(1)\n}\n", 2, 10, ["names may not be Python keywords"]),
    ("underscore-name", "pattern p(_l = 3) {\n    head a = local(_l)\n}\n", 1, 11, ["or start with `_`"]),
]


@pytest.mark.parametrize("source, line, column, words", [c[1:] for c in SEMANTIC], ids=[c[0] for c in SEMANTIC])
def test_semantic_errors(source, line, column, words):
    err = error_of(source, PatternSemanticError)
    assert "syntax error" not in str(err)
    located(err, line, column, "error:", *words)


# Errors that need n, and errors in how a valid pattern is used ------------------------------------------------------


def test_value_that_depends_on_n_is_checked_when_bound():
    p = patterncc.parse(in_head("local(w)", params="w = 100 - n"))  # fine until n is known
    assert pattern_mask(p, 99).shape == (1, 99, 99)
    with pytest.raises(PatternSemanticError) as info:
        pattern_mask(p, 200)
    located(info.value, 2, 14, "window of local must be positive, got -100 (with n = 200)")


def test_block_that_depends_on_n_is_checked_when_bound():
    p = patterncc.parse(in_head("local(1)", before="block n // 3"))
    bind_pattern(p, 48)
    with pytest.raises(PatternSemanticError) as info:
        bind_pattern(p, 60)
    located(info.value, 2, 5, "block size must be a power of two >= 16, got 20 (with n = 60)")


def test_value_that_depends_on_h_names_the_head():
    p = patterncc.parse(in_head("local(2 - h)").replace("head a", "head a[3]"))
    with pytest.raises(PatternSemanticError) as info:
        bind_pattern(p, 10)
    located(info.value, 2, 17, "window of local must be positive, got 0", "(for h = 2)")


def test_override_that_breaks_c_le_l_names_both_numbers():
    source = in_head("fixed(l, c)", params="l = 8, c = 2")
    err = error_of(source, PatternSemanticError, c=300)
    located(err, 2, 14, "c must be at most l, but c = 300 and l = 8")


def test_unknown_override_parameter_with_did_you_mean(examples_dir: Path):
    err = error_of(examples_dir / "fixed.attn", PatternUsageError, ll=3)
    text = str(err)
    assert "pattern `fixed` has no parameter `ll`; its parameters are l, c" in text
    assert "did you mean `l`?" in text
    assert text.startswith(str(examples_dir / "fixed.attn"))


def test_override_of_a_pattern_without_parameters():
    err = error_of("pattern p() { head a = dense }", PatternUsageError, l=3)
    assert "has no parameter `l`; it has no parameters" in str(err)


def test_override_must_be_an_integer():
    err = error_of(in_head("local(l)", params="l = 1"), PatternUsageError, l="64")
    assert "parameter `l` must be an integer, got '64'" in str(err)


def test_missing_parameter_value():
    p = patterncc.parse(in_head("local(l)", params="l"))
    with pytest.raises(PatternUsageError, match=r"needs a value for parameter l") as info:
        pattern_mask(p, 10)
    assert "-D l=64" in str(info.value)


@pytest.mark.parametrize("n", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_sequence_length_must_be_a_positive_integer(n):
    p = patterncc.parse(in_head("local(1)"))
    with pytest.raises(PatternUsageError, match=r"the sequence length n must be a positive integer"):
        pattern_mask(p, n)


def test_runtime_division_by_zero_is_a_pattern_error():
    p = patterncc.parse(in_head("where i % (j - j) == 0"))
    with pytest.raises(PatternUsageError, match=r"division by zero"):
        pattern_mask(p, 4)


def test_negative_isqrt_in_a_default():
    p = patterncc.parse(in_head("local(l)", params="l = isqrt(10 - n)"))
    with pytest.raises(PatternUsageError, match=r"parameter `l` of pattern `p`: isqrt of a negative number \(-10\)"):
        bind_pattern(p, 20)


def test_integer_too_large_for_64_bits():
    """Literals are bounded where they are written (|v| < 2**62, the range every stage computes in)."""
    err = error_of(in_head("where i < 99999999999999999999"), PatternSyntaxError)
    assert "this integer is too large: literals must be below 2**62" in str(err)
    assert "^^^^^^^^^^^^^^^^^^^^" in str(err)
    err = error_of(in_head("local(w)", params=f"w = {2**70}"), PatternSyntaxError)
    assert "literals must be below 2**62" in str(err)


def test_missing_file_is_a_usage_error(tmp_path: Path):
    missing = tmp_path / "nope.attn"
    err = error_of(missing, PatternUsageError)
    assert str(err) == f"{missing}: error: file not found"
    assert "syntax error" not in str(err)


def test_folder_is_not_a_pattern_file(tmp_path: Path):
    err = error_of(tmp_path, PatternUsageError)
    assert "cannot read this file" in str(err)


def test_errors_render_hint_on_its_own_line():
    text = str(error_of(in_head("locl(4)")))
    assert text.splitlines()[-1] == "hint: did you mean `local`?"
