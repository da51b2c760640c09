"""patterncc: a compiler for attention connectivity patterns."""

from .api import parse, parse_all
from .errors import PatternError, PatternSemanticError, PatternSyntaxError, PatternUsageError, PatternWarning

__version__ = "0.1.0"

__all__ = [
    "PatternError",
    "PatternSemanticError",
    "PatternSyntaxError",
    "PatternUsageError",
    "PatternWarning",
    "__version__",
    "parse",
    "parse_all",
]
