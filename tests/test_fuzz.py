"""Fuzzing the whole pipeline with hostile and random inputs (derandomized: the same inputs on every machine).

- Grammar-aware: hypothesis builds patterns from the language's parts (primitives with random arguments, set
  algebra, `where` conditions, lets, head groups with `h`, causal or not, block sizes); every one must parse and
  check, or fail with a PatternError whose message points into the text, within seconds. A share of them is also
  compiled, imported and run on the CPU path, and must equal the float64 reference built from `pattern_mask`
  (a differential test of analysis, lowering, assembly and the CPU path against the IR's own semantics).
- Byte-level: the examples with random bytes flipped, inserted or deleted; only PatternError may escape.

Each input must finish within INPUT_SECONDS (a SIGALRM guard) and raise the peak memory by less than 1 GiB.
PATTERNCC_FUZZ_EXAMPLES=N runs N inputs per test instead of the CI default, for a longer local run, e.g.
`PATTERNCC_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time

import pytest
import torch
from conftest import EXAMPLE_FILES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_support import assert_layout_exact, build, family_results
from tolerance import assert_rms_close

import patterncc
from patterncc.analysis.analyze import analyze
from patterncc.errors import PatternError

INPUT_SECONDS = 5
SCALE = int(os.environ.get("PATTERNCC_FUZZ_EXAMPLES", "0")) or None
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
# CI's share: thousands of inputs through the parser and semantic checks (milliseconds each), fewer through the
# analysis (sympy formulas: up to a second each) and a dozen through compile + CPU forward.
FUZZ_PARSE = settings(max_examples=SCALE or 1500, deadline=None, suppress_health_check=_HEALTH)
FUZZ_CHECK = settings(max_examples=SCALE or 60, deadline=None, suppress_health_check=_HEALTH)
FUZZ_COMPILED = settings(max_examples=SCALE or 12, deadline=None, suppress_health_check=_HEALTH)


MEMORY_BYTES = 1 << 30


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Each input within `seconds` (SIGALRM), and the process's peak memory grows by less than MEMORY_BYTES
    while it runs (ru_maxrss is a high-water mark: a larger peak by one input shows as growth)."""
    def expired(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert growth < MEMORY_BYTES, f"{what} raised the peak memory by {growth / 2**30:.1f} GiB"


# Grammar-aware generation ---------------------------------------------------------------------------------------

small = st.integers(min_value=1, max_value=12)
names = st.sampled_from(["p", "q", "w", "l", "c"])


@st.composite
def int_exprs(draw, depth=2):
    """Integer expressions over i, j, n, h, parameters and literals (some of them out of range on purpose)."""
    if depth == 0 or draw(st.booleans()):
        return draw(st.one_of(st.sampled_from(["i", "j", "n", "h", "w"]), st.integers(-3, 40).map(str)))
    op = draw(st.sampled_from(["+", "-", "*", "//", "%"]))
    left, right = draw(int_exprs(depth=depth - 1)), draw(int_exprs(depth=depth - 1))
    if draw(st.booleans()):
        return f"({left} {op} {right})"
    func = draw(st.sampled_from(["abs", "min", "max", "isqrt"]))
    return f"{func}({left})" if func in ("abs", "isqrt") else f"{func}({left}, {right})"


@st.composite
def conditions(draw, depth=2):
    comparison = f"{draw(int_exprs())} {draw(st.sampled_from(['==', '!=', '<', '<=', '>', '>=']))} " \
                 f"{draw(int_exprs())}"
    if depth == 0 or draw(st.booleans()):
        return comparison
    joiner = draw(st.sampled_from(["and", "or"]))
    other = draw(conditions(depth=depth - 1))
    return f"({comparison}) {joiner} ({other})" if draw(st.booleans()) else f"not ({other})"


@st.composite
def primitives(draw):
    a, b = draw(small), draw(small)
    kind = draw(st.sampled_from(["local", "stride", "chunk", "summary", "strided", "fixed", "global", "dilated",
                                 "random", "dense", "where"]))
    if kind == "summary" or kind == "fixed":
        return f"{kind}({max(a, b)}, {min(a, b)})"
    if kind == "dilated":
        return f"dilated({a}, {b})"
    if kind == "random":
        return f"random({a % 3 + 1}, seed = {b})"
    if kind == "dense":
        return "dense"
    if kind == "where":
        return f"(where {draw(conditions())})"
    argument = draw(st.sampled_from([str(a), "w", "w + h", "isqrt(n)"]))
    return f"{kind}({argument})"


@st.composite
def set_exprs(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return draw(primitives())
    op = draw(st.sampled_from(["|", "&", "-"]))
    return f"({draw(set_exprs(depth=depth - 1))} {op} {draw(set_exprs(depth=depth - 1))})"


@st.composite
def pattern_texts(draw):
    lines = [f"pattern fuzz(w = {draw(small)}) {{"]
    if draw(st.booleans()):
        lines.append("    causal")
    if draw(st.booleans()):
        lines.append(f"    block {draw(st.sampled_from([16, 32]))}")
    if draw(st.booleans()):
        lines.append(f"    let v = {draw(int_exprs())}")
    for index in range(draw(st.integers(1, 3))):
        count = draw(st.sampled_from(["", "[2]"]))
        lines.append(f"    head g{index}{count} = {draw(set_exprs())}")
    lines.append("}")
    return "\n".join(lines)


def _check_or_located_error(text: str, n: int | None):
    """Parse (and analyze at n, if given); returns the IR, or None after a PatternError with a message."""
    with time_limit(INPUT_SECONDS, f"checking\n{text}"):
        try:
            pattern = patterncc.parse(text)
            if n is not None:
                analyze(pattern, n)
            return pattern
        except PatternError as err:
            message = str(err)
            assert message.strip(), "an empty error message"
            assert "<pattern>:" in message or "error" in message.lower(), message
            return None


@FUZZ_PARSE
@given(pattern_texts())
def test_random_patterns_parse_or_fail_with_a_located_error(text):
    _check_or_located_error(text, None)


@FUZZ_CHECK
@given(pattern_texts(), st.sampled_from([17, 48, 64]))
def test_random_patterns_analyze_or_fail_with_a_located_error(text, n):
    _check_or_located_error(text, n)


@FUZZ_COMPILED
@given(pattern_texts())
def test_random_patterns_compile_and_match_their_masks(tmp_path_factory, text):
    """Differential: the generated module's CPU path equals masked attention over pattern_mask(n), in float64, and
    its layout's tile classes are exact."""
    pattern = _check_or_located_error(text, 40)
    if pattern is None:
        return
    started = time.perf_counter()
    with time_limit(4 * INPUT_SECONDS, f"compiling\n{text}"):
        try:
            module = build(pattern, tmp_path_factory.mktemp("fuzz"))
        except PatternError:
            return  # e.g. a block size that depends on n: a located usage error, not a crash
        tested, golden = family_results(module, pattern, 40, 16, torch.float64, "torch")
        assert_layout_exact(module, pattern, 40, context=text)
    for name in ("out", "dq", "dk", "dv"):
        assert_rms_close(f"{name} of\n{text}\n", tested[name], golden[name], 1e-9)
    assert time.perf_counter() - started < 4 * INPUT_SECONDS


# Byte-level mutation --------------------------------------------------------------------------------------------

EXAMPLE_BYTES = [path.read_bytes() for path in EXAMPLE_FILES]


@st.composite
def mutated_examples(draw):
    data = bytearray(draw(st.sampled_from(EXAMPLE_BYTES)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.sampled_from([b"{", b"}", b"(", b")", b"|", b"-", b"9" * 30, b"\r",
                                                            b"\x0c", b"\x00", b"h", b"let x = x", b"\xff"]))
        elif action == "delete" and data:
            del data[position:position + draw(st.integers(1, 20))]
        elif data:
            stop = min(len(data), position + draw(st.integers(1, 40)))
            data[position:position] = data[position:stop]
    return bytes(data)


def _parse_mutated(folder, data, analyze_at=None):
    """Parse (and analyze) a mutated file: a result, or a PatternError with a message; nothing else."""
    path = folder / "mutated.attn"
    path.write_bytes(data)
    with time_limit(INPUT_SECONDS, f"reading {data[:200]!r}"):
        try:
            for pattern in patterncc.parse_all(path).values():
                if analyze_at is not None:
                    analyze(pattern, analyze_at)
        except PatternError as err:
            assert str(err).strip()


@FUZZ_PARSE
@given(mutated_examples())
def test_mutated_examples_parse_or_fail_with_a_pattern_error(tmp_path, data):
    _parse_mutated(tmp_path, data)


@FUZZ_CHECK
@given(mutated_examples())
def test_mutated_examples_analyze_or_fail_with_a_pattern_error(tmp_path, data):
    _parse_mutated(tmp_path, data, analyze_at=64)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_examples_themselves_pass_the_fuzz_checks(path):
    """The unmutated examples: the baseline the mutations start from."""
    for pattern in patterncc.parse_all(path).values():
        analyze(pattern, 64)
