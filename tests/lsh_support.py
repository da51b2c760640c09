"""The LSH tests' module: generated from a pattern with one hashed head, so it holds the hashed-heads sections
exactly as every generated module does (their functions take every parameter as an argument)."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

from kernel_support import build

import patterncc


@cache
def build_module(folder: str | None = None):
    """Generate, write and import the module (one per process; its kernels run in the interpreter when
    TRITON_INTERPRET=1)."""
    pattern = patterncc.parse("pattern lsh_sections() { head a = hashed(buckets = 4) }")
    return build(pattern, Path(folder or tempfile.mkdtemp(prefix="patterncc_lsh_")))
