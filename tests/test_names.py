"""No name in a .attn file can collide with or change anything in a generated module.

User names reach a generated module only as its one class, `<CamelCase>Attention`, and as buffer names that carry
the call's index; every other top-level name is the library's or the template's. This file names a pattern, a
parameter or a let, and a head after every other top-level name any example's module defines (sorted), and after
every family prefix, each pattern mixing all three head families: each compiles (the verifier rejects duplicate or
undefined names), imports, and matches its float64 reference on the CPU path; the names that collided before this
scheme (family prefixes, module constants) are tested in both roles and also run under the Triton interpreter.
"""

from __future__ import annotations

import ast
from functools import cache

import pytest
import torch
from conftest import EXAMPLE_FILES
from kernel_support import build, family_results
from tolerance import assert_rms_close

import patterncc
from patterncc.driver import compile_pattern

FAMILY_PREFIXES = ["blocksparse", "lsh", "linear", "pattern", "tiles", "set", "hashed", "kernel"]
# Names that broke generated modules before one naming scheme (see the project's issues 10 and 12).
ONCE_BROKEN = ["linear", "lsh", "Layout", "CAUSAL", "BLOCK", "BUFFERS", "PERMUTED", "mask", "m", "attention",
               "pattern_allowed", "tl", "triton", "torch", "math", "LshCall", "default_buffers"]
# The name as the pattern's, a parameter's and a head's; or as the pattern's, a let's and a head's.
TEXTS = ("""pattern {name}({name} = 3) {{
    causal
    head {name} = local({name}) | global(1)
    head other_hashed = hashed(buckets = 4, chunk = 8)
    head other_kernel = kernel(elu1)
}}""", """pattern {name}() {{
    causal
    let {name} = 3
    head {name} = local({name}) | global(1)
    head other_hashed = hashed(buckets = 4, chunk = 8)
    head other_kernel = kernel(elu1)
}}""")


@cache
def generated_names() -> list[str]:
    """Every top-level name any example's generated module defines (names starting with `_` cannot name
    anything in a .attn file)."""
    names: set[str] = set()
    for path in EXAMPLE_FILES:
        for pattern in patterncc.parse_all(path):
            tree = ast.parse(compile_pattern(patterncc.parse(path, pattern=pattern)).source)
            body = list(tree.body)
            while body:
                node = body.pop()
                if isinstance(node, ast.If):
                    body.extend(node.body)
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return sorted(name for name in names if not name.startswith("_"))


def _module(name, tmp_path, text=TEXTS[0]):
    pattern = patterncc.parse(text.format(name=name))
    module = build(pattern, tmp_path)
    camel = name[:1].upper() + name[1:]
    assert module.__all__[0].endswith("Attention") and module.__all__[0].startswith(camel.split("_")[0]), module.__all__
    assert module.HEAD_FAMILIES == ["set", "hashed", "kernel"]
    assert module.CAUSAL is True, f"a pattern named {name} changed the module's CAUSAL"
    return pattern, module


def test_every_generated_name_compiles_and_matches_on_the_cpu_path(tmp_path):
    names = sorted(set(generated_names()) | set(FAMILY_PREFIXES) | set(ONCE_BROKEN))
    assert len(names) > 60, f"too few names collected: {names}"
    # Every other name in sorted order, in one of the two roles (alternating), and the family prefixes and the
    # once-broken names in both: a name scheme that broke would break a whole class of names, and building a
    # module for each of the ~190 names took two minutes of the suite's twenty.
    sampled = names[::2]
    cases = [(name, TEXTS[index % 2]) for index, name in enumerate(sampled)]
    for name in sorted(set(FAMILY_PREFIXES) | set(ONCE_BROKEN)):
        cases += [(name, text) for text in TEXTS if (name, text) not in cases]
    for name, text in cases:
        pattern, module = _module(name, tmp_path, text)
        tested, golden = family_results(module, pattern, 20, 16, torch.float64, "torch")
        for tensor in ("out", "dq", "dk", "dv"):
            assert_rms_close(f"{name}: {tensor}", tested[tensor], golden[tensor], 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(FAMILY_PREFIXES[:3]) | set(ONCE_BROKEN)))
def test_once_broken_names_run_under_the_interpreter(tmp_path, name):
    pattern, module = _module(name, tmp_path)
    tested, golden = family_results(module, pattern, 20, 16, torch.float32, "triton")
    for tensor in ("out", "dq", "dk", "dv"):
        assert_rms_close(f"{name}: {tensor}", tested[tensor], golden[tensor], 1e-4)


def test_buffers_of_per_head_groups_never_collide(tmp_path):
    """`a` with per-head parameters (two calls) and a group named `a_0` get distinct buffers."""
    text = """pattern p() {
        head a[2] = hashed(buckets = 4 + 2 * h, chunk = 8)
        head a_0 = hashed(buckets = 4, chunk = 8, seed = 9)
    }"""
    module = build(patterncc.parse(text), tmp_path)
    assert len(set(module.BUFFERS)) == len(module.BUFFERS) == 3, module.BUFFERS
    drawn = module.default_buffers(16)
    assert not torch.equal(drawn[module.BUFFERS[0]][0, 0], drawn[module.BUFFERS[2]][0, 0])
