"""patterncc: a compiler for attention connectivity patterns."""

__version__ = "0.1.0"  # first: the modules below read it

from .analysis.analyze import analyze
from .api import parse, parse_all
from .compiler import compile_pattern, load
from .errors import PatternError, PatternSemanticError, PatternSyntaxError, PatternUsageError, PatternWarning

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
]
