"""The cache of generated modules behind `patterncc.load`: `PATTERNCC_CACHE_DIR` (default ~/.cache/patterncc)
holds `<identity key>/<module>.py`, written atomically, so concurrent loads never see half a file, and sealed
with a hash of its content, so a damaged file is regenerated rather than imported. An unusable cache folder falls
back to a private temporary folder with a warning."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from . import driver
from .api import parse

CACHE_ENV = "PATTERNCC_CACHE_DIR"
# The last line of every cached module: a hash of everything above it, so a truncated, empty or garbled file (a
# full disk, a killed writer, a stray edit) is detected and regenerated instead of imported.
_SEAL = "# patterncc cache seal: sha256 "


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "patterncc"


def usable_cache_dir() -> Path:
    """cache_dir(), or, when it cannot be created or written (read-only, a file in the way, no permission), a
    private temporary folder, with a warning naming the setting to change."""
    preferred = cache_dir()
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK | os.X_OK):
            return preferred
        problem = "it is not writable"
    except OSError as err:
        problem = err.strerror or str(err)
    fallback = Path(tempfile.gettempdir()) / f"patterncc-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    warnings.warn(f"patterncc: cannot use the cache folder {preferred} ({problem}); using {fallback} instead. "
                  f"Set {CACHE_ENV} to a writable folder.", RuntimeWarning, stacklevel=3)
    return fallback


def seal(source: str) -> str:
    return source + f"{_SEAL}{hashlib.sha256(source.encode()).hexdigest()}\n"


def read_sealed(path: Path) -> str | None:
    """A cached module's source if the file exists and its seal matches; None otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    body, _, last = text.rstrip("\n").rpartition("\n")
    body += "\n"
    if not last.startswith(_SEAL) or last[len(_SEAL):] != hashlib.sha256(body.encode()).hexdigest():
        return None
    return body


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a half-written file. The file gets the mode any new
    file gets (0666 less the umask, not mkstemp's 0600) and reaches the disk before it replaces the old one. A
    folder or file that cannot be written is a PatternUsageError naming it."""
    from .errors import PatternUsageError

    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise PatternUsageError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        if tmp is not None:
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
    path = usable_cache_dir() / key / f"{stem}.py"
    name = f"patterncc_generated_{stem}_{key}"
    cached = read_sealed(path)
    imported = sys.modules.get(name)
    if cached is not None and imported is not None and not os.environ.get(driver.DUMP_ENV):
        # Same key, same source: a second load shares the module, so its classes stay one class (pickling
        # finds them) and its operators are registered once.
        return imported
    if cached is None or os.environ.get(driver.DUMP_ENV):
        compiled = driver.compile_pattern(ir_pattern, layer=layer, params=params)
        if cached is None:
            # Another process (a torchrun rank) may have written it meanwhile: only a file that fails its seal now
            # is damaged.
            if path.exists() and read_sealed(path) is None:
                warnings.warn(f"patterncc: the cached module {path} is damaged (its seal does not match); "
                              f"regenerating it", RuntimeWarning, stacklevel=2)
            write_atomically(path, seal(compiled.source))
    return imported if imported is not None else import_file(path, name)
