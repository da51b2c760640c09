"""Builds a module holding the LSH sections the way a generated module includes them, for the LSH tests."""

from __future__ import annotations

import tempfile
import uuid
from functools import cache
from pathlib import Path

from patterncc.compiler import import_file
from patterncc.lower import _environment

# The frame of a generated module around the hashed-heads family (templates/module.py.jinja): its imports, the
# Triton section inside `if triton is not None:`, the shared launchers, then the torch section.
HARNESS = """\
import contextlib
import math
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
{% filter indent(4, first=True) %}
{% include "lsh_triton.py.jinja" %}
{% endfilter %}

{% include "launch.py.jinja" %}

{% include "lsh_heads.py.jinja" %}
"""


def render() -> str:
    return _environment().from_string(HARNESS).render()


@cache
def build_module(folder: str | None = None):
    """Render, write and import the LSH module (one per process; its kernels run in the interpreter when
    TRITON_INTERPRET=1). The lead may swap this for a module generated from an .attn file with hashed heads."""
    path = Path(folder or tempfile.mkdtemp(prefix="patterncc_lsh_")) / f"lsh_{uuid.uuid4().hex[:8]}.py"
    path.write_text(render())
    return import_file(path, f"patterncc_lsh_{path.stem}")
