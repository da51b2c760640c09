"""The Python API: parse a pattern, analyze it, load it as a module."""

from __future__ import annotations

from pathlib import Path

from . import ir
from .errors import PatternError, PatternUsageError
from .parse import Source, parse_source, read_source
from .semantics import check_module, override_params


def parse_all(text_or_path: str | Path) -> dict[str, ir.Pattern]:
    """Every pattern in a .attn file (or text), by name, in file order."""
    source, filename = read_source(text_or_path)
    try:
        module = parse_source(source, filename)
        return {p.name: p for p in check_module(module)}
    except PatternError as err:
        raise err.with_source(source, filename) from None


def parse(text_or_path: str | Path, pattern: str | None = None, **params: int) -> ir.Pattern:
    """Parse a .attn file (or its text) into the IR, with parameter overrides (`parse(path, l=64)`).

    A file with several patterns needs `pattern=NAME`.
    """
    patterns = parse_all(text_or_path)
    if pattern is None:
        if len(patterns) > 1:
            raise PatternUsageError(f"this file defines {len(patterns)} patterns ({', '.join(patterns)}); "
                                    f"choose one with pattern=NAME (--pattern NAME on the command line)")
        chosen = next(iter(patterns.values()))
    elif pattern in patterns:
        chosen = patterns[pattern]
    else:
        raise PatternUsageError(f"no pattern named `{pattern}`; this file defines {', '.join(patterns)}")
    return override_params(chosen, params)


def load(text_or_path: str | Path, pattern: str | None = None, layer: int = 0, scale: float | None = None,
         backend: str = "auto", head_dim: int | None = None, **params: int):
    """A `.attn` pattern as a torch.nn.Module: `patterncc.load("fixed.attn", l=64)(q, k, v)`.

    q: (batch, heads, n, head_dim); k, v: (batch, kv_heads, n, head_dim) with kv_heads dividing heads; heads a
    multiple of the pattern's head count. `layer` picks the head group for `combine interleaved` patterns;
    `scale` defaults to 1/sqrt(head_dim); `backend` is "auto" (Triton on CUDA, block-sparse torch on CPU),
    "triton" or "torch". `head_dim` draws the random buffers of hashed and FAVOR+ heads at once (otherwise at the
    first call). Compiled modules are cached (PATTERNCC_CACHE_DIR, default ~/.cache/patterncc).
    """
    cls = _loaded_class(Source(*read_source(text_or_path)), pattern, layer, params)
    return cls(scale=scale, backend=backend, head_dim=head_dim)


def _loaded_class(source, pattern, layer, params):
    """The attention class of the pattern's generated module (compiled, or taken from the cache), picklable."""
    from .cache import load_module  # the compiler and torch load here, not with the package

    module = load_module(source, pattern=pattern, layer=layer, **params)
    cls = next(getattr(module, name) for name in dir(module)
               if isinstance(getattr(module, name), type) and getattr(getattr(module, name), "__module__", "") ==
               module.__name__ and hasattr(getattr(module, name), "num_heads"))
    cls._patterncc_origin = (source, pattern, layer, params)
    cls.__reduce_ex__ = _reduce_loaded
    return cls


def _reduce_loaded(self, protocol):
    """Pickling a loaded module: its class is rebuilt from the pattern's text (compiled again, or taken from the
    cache, in the process that unpickles), then its state (parameters, buffers, settings) is restored. So
    `torch.save(model)` of a model holding patterncc modules loads in a fresh process."""
    return _rebuild_loaded, type(self)._patterncc_origin, self.__dict__.copy()


def _rebuild_loaded(source, pattern, layer, params):
    cls = _loaded_class(source, pattern, layer, params)
    return cls.__new__(cls)
