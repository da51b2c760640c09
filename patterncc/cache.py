"""The cache of generated modules behind `patterncc.load`: `PATTERNCC_CACHE_DIR` (default ~/.cache/patterncc)
holds `<identity key>/<module>.py`, written atomically, so concurrent loads never see half a file."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from . import driver
from .api import parse


def cache_dir() -> Path:
    root = os.environ.get("PATTERNCC_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "patterncc"


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_file(path: Path, module_name: str) -> ModuleType:
    """Import a generated file as `module_name` (registered in sys.modules: triton's jit inspects the defining
    module)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_module(text_or_path, pattern: str | None = None, layer: int = 0, **params: int) -> ModuleType:
    """Compile (or take from the cache) and import the generated module; returns the Python module."""
    ir_pattern = parse(text_or_path, pattern=pattern, **params)
    key = driver.identity_key(ir_pattern, driver.Options.make(layer, params=params))
    stem = driver.module_name(ir_pattern.name, layer, ir_pattern.combine)
    path = cache_dir() / key / f"{stem}.py"
    if not path.exists() or os.environ.get(driver.DUMP_ENV):
        compiled = driver.compile_pattern(ir_pattern, layer=layer, params=params)
        if not path.exists():
            write_atomically(path, compiled.source)
    return import_file(path, f"patterncc_generated_{stem}_{key}")
