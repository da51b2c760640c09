"""The LSH tests' module: the hashed-heads family itself (patterncc.families.lsh.ops), whose functions take
every parameter as an argument; generated modules copy these same definitions."""

from __future__ import annotations


def build_module(folder: str | None = None):
    """The family's ops module (its kernels run in the interpreter when TRITON_INTERPRET=1, which conftest.py
    sets before triton is imported). `folder` is unused: kept for callers that pass one."""
    from patterncc.families.lsh import ops

    return ops
