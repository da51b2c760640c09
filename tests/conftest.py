"""Shared fixtures: the examples, a fixed seed for every test, and the `gpu` marker's skip without CUDA."""

from __future__ import annotations

import os
import sys

# Triton decides interpreter vs compiler when each @triton.jit function (its standard library's included) is
# decorated, i.e. when triton is first imported, before torch can import it: so set the mode here, first.
# The CPU suite runs every generated kernel in the interpreter; GPU runs pass TRITON_INTERPRET=0 (tests/gpu).
# Ahead-of-time compilation for sm_80/sm_90 runs in subprocesses without the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The interpreter the ahead-of-time compilation workers run under: this one, or PATTERNCC_AOT_PYTHON, e.g. a
# virtual environment holding another Triton release (the GPU machines run Triton 3.6; this one may be newer).
AOT_PYTHON = os.environ.get("PATTERNCC_AOT_PYTHON", sys.executable)
EXAMPLES_DIR = ROOT / "examples"
EXAMPLE_FILES = sorted(EXAMPLES_DIR.glob("*.attn"))

# Property tests run the same examples on every machine: derandomized, no example database, no deadline
# (CI machines are slow and shared); each test bounds its own example count.
settings.register_profile("patterncc", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("patterncc")


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    assert EXAMPLE_FILES, f"no .attn files in {EXAMPLES_DIR}"
    return EXAMPLES_DIR


@pytest.fixture(params=EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def example_file(request) -> Path:
    """Each file in examples/, one test per file."""
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
