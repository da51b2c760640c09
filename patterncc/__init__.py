"""patterncc: a compiler for attention connectivity patterns.

Importing the package is cheap: the analysis (torch, numpy, sympy) and the compiler (jinja2, torch, triton) load
on first use of `analyze` or `compile_pattern` (PEP 562), so `patterncc --help` never waits for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # first: the modules below read it

# `parse` is bound eagerly: importing `.api` imports the submodule `patterncc.parse`, which would otherwise
# shadow the function of the same name as a package attribute. It costs the parser, not torch.
from .api import load, parse, parse_all
from .errors import PatternError, PatternSemanticError, PatternSyntaxError, PatternUsageError, PatternWarning

_LAZY = {"analyze": "patterncc.analysis.analyze", "compile_pattern": "patterncc.driver", "to_flex": "patterncc.interop",
         "to_block_layout": "patterncc.interop"}

__all__ = [
    "PatternError",
    "PatternSemanticError",
    "PatternSyntaxError",
    "PatternUsageError",
    "PatternWarning",
    "__version__",
    "analyze",
    "compile_pattern",
    "load",
    "parse",
    "parse_all",
    "to_block_layout",
    "to_flex",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
