"""Tile classification against brute force: the classes a generated module computes in closed form for natural
and grid-transposed visiting orders are sound (EMPTY tiles hold no allowed pair, FULL tiles only allowed pairs)
and, for strides visited transposed, exact even when n / period is not a multiple of the block (tiles that hold
several residue classes are split into one strided interval per run). The layout a module runs refines what the
closed form leaves PARTIAL, so its classes are exact."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES_DIR
from kernel_support import assert_layout_exact, brute_force_classes, build, dense_masks

import patterncc
from patterncc.runtime import tiles

# (pattern, lengths, whether the transposed classes must be exact, not only sound)
CASES = [
    ("pattern s(l = 24) { causal; block 16; head s = stride(l) }", [200, 384, 500], True),
    ("pattern s(l = 32) { block 16; head s = stride(l) & local(300) }", [1000], True),
    ("pattern s(l = 16) { causal; block 16; head a = strided(l); head b = fixed(l, 4) }", [300, 256], False),
    ("pattern s(l = 20) { causal; block 16; head a = stride(l) - chunk(l) }", [333], False),
]


@pytest.mark.parametrize("text,lengths,exact", CASES, ids=["stride-causal", "stride-and-local", "strided-fixed",
                                                     "stride-minus-chunk"])
def test_closed_form_classes_are_sound_and_transposed_strides_exact(tmp_path, text, lengths, exact):
    pattern = patterncc.parse(text)
    module = build(pattern, tmp_path)
    for n in lengths:
        masks = dense_masks(module, pattern, n)
        for mask_index in range(module.NUM_MASKS):
            mask = masks[mask_index]
            tables = module.random_tables(n)
            candidate = module.mask_positions(mask_index, n)
            for positions in (None, candidate) if candidate is not None else (None,):
                got = module.mask_tile_classes(mask_index, n, tables, positions)
                want = brute_force_classes(mask, positions, module.BLOCK)
                where = f"{text} n={n} mask {mask_index} {'transposed' if positions is not None else 'natural'}"
                assert not ((got == tiles.EMPTY) & (want != tiles.EMPTY)).any(), f"unsound EMPTY: {where}"
                assert not ((got == tiles.FULL) & (want != tiles.FULL)).any(), f"unsound FULL: {where}"
                if positions is not None and exact:
                    assert torch.equal(got == tiles.EMPTY, want == tiles.EMPTY), f"inexact EMPTY: {where}"


# Where the closed form alone is not exact (found against FlexAttention's create_block_mask), examples at lengths
# that are not multiples of the block or of their periods, causal and bidirectional.
EXACT_CASES = [
    ("pattern p() { causal; block 16; head a = where j > i }", [16, 40]),
    ("pattern p() { block 16; head a = local(10) & global(20) }", [48, 61]),
    ("pattern s(l = 24) { causal; block 16; head s = stride(l) }", [200, 384, 500]),
    ("pattern s(l = 20) { causal; block 16; head a = stride(l) - chunk(l) }", [333]),
    ("pattern p() { block 16; head a = (where (i + j) % 7 == 0) | summary(12, 3); head b = dilated(5, 3) }", [100]),
    *[(path, [200, 333]) for path in sorted(EXAMPLES_DIR.glob("*.attn"))],
]


@pytest.mark.parametrize("source,lengths", EXACT_CASES, ids=lambda case: str(getattr(case, "stem", ""))[:20] or None)
def test_module_layouts_are_exact(tmp_path, source, lengths):
    for name, pattern in patterncc.parse_all(source).items():
        module = build(pattern, tmp_path)
        for n in lengths:
            assert_layout_exact(module, pattern, n, context=f"{name}")


def test_strided_example_is_transposed_when_n_over_l_is_not_a_multiple_of_the_block(tmp_path):
    """examples/strided.attn at n = 4096 (l = 128, block 64: 32 positions per residue class, two classes per
    tile): the stride head is visited transposed, computing 64 tiles instead of 1056 in natural order."""
    module = build(patterncc.parse("examples/strided.attn"), tmp_path)
    layout = module.get_layout(4096, "cpu")
    assert layout.positions_cpu[1] is not None
    assert int((layout.classes[1] != tiles.EMPTY).sum()) == 64


PLAN_SCRIPT = """
import resource, sys, tempfile, pathlib
import torch
import patterncc
from patterncc.cache import import_file
from patterncc.driver import compile_pattern
compiled = compile_pattern(patterncc.parse(sys.argv[1]))
path = pathlib.Path(tempfile.mkdtemp()) / "m.py"
path.write_text(compiled.source)
module = import_file(path, "m")
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
layout = module.get_layout(int(sys.argv[2]), "cpu")
for mask in range(module.NUM_MASKS):
    module.cpu_gather(layout, mask)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024)
"""


@pytest.mark.parametrize("example", ["bigbird", "strided"])
def test_cpu_planning_memory_is_not_quadratic(example):
    """At n = 16384 the CPU plan of bigbird (global rows) and strided (a stride head) once took 7.7 GB and 2.1 GB
    (every listed tile's predicate at once); planned in bounded steps it stays within 300 MB."""
    result = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, str(EXAMPLES_DIR / f"{example}.attn"), "16384"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth_mb = int(result.stdout.split()[-1])
    assert growth_mb < 300, f"{example}: planning at n = 16384 raised the peak memory by {growth_mb} MB"


def test_compile_report_shows_the_modules_own_layout():
    """The report beside a generated module reads the layout from the module itself: order, computed tiles and
    work efficiency (allowed pairs / computed tile area)."""
    from patterncc.driver import compile_pattern
    from patterncc.report import compile_report, module_layout_stats

    compiled = compile_pattern(patterncc.parse(EXAMPLES_DIR / "strided.attn"))
    stats = module_layout_stats(compiled, 4096)
    assert stats[1]["order"] == "transposed" and stats[1]["computed"] == 64
    assert stats[1]["allowed"] == sum(i // 128 + 1 for i in range(4096))  # j <= i, (i - j) % 128 == 0
    assert abs(stats[1]["efficiency"] - stats[1]["allowed"] / (64 * 64 * 64)) < 1e-12
    report = compile_report(compiled, 4096)
    assert "the module at n=4096: transposed order, 64 of 4096 tiles computed" in report
