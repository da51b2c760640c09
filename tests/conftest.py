"""Shared fixtures: the examples, a fixed seed for every test, and the `gpu` marker's skip without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
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
