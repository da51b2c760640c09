"""Where the grammar and the kernel templates live: inside the installed package (the wheel copies the top-level
`grammar/` and `templates/` folders into it) or beside the package in a source checkout."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


@cache
def resource_dir(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"patterncc is installed without its {name}/ folder (looked in {_PACKAGE_DIR})")
