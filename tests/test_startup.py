"""Start-up: `import patterncc` and `patterncc --help`/`--version` load neither torch nor the compiler; the heavy
parts load on first use of `analyze`, `compile_pattern` or `load`."""

from __future__ import annotations

import subprocess
import sys

import patterncc

HEAVY = ("torch", "numpy", "sympy", "jinja2", "triton")


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_loads_no_heavy_library():
    _python("import patterncc, sys; assert 'torch' not in sys.modules, 'import patterncc imported torch'")
    out = _python(f"import patterncc, sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.strip() == "", f"`import patterncc` imported {out.strip()}"


def test_lazy_names_resolve_to_the_functions():
    code = ("import sys, patterncc\n"
            "from patterncc.analysis.analyze import analyze\n"
            "from patterncc.driver import compile_pattern\n"
            "assert patterncc.analyze is analyze and patterncc.compile_pattern is compile_pattern\n"
            "assert callable(patterncc.parse) and callable(patterncc.load)\n"
            "assert 'torch' in sys.modules\n")
    _python(code)
    assert set(patterncc.__all__) <= set(dir(patterncc))


def test_version_and_help_load_no_heavy_library():
    for flag in ("--version", "--help"):
        code = ("import sys\nfrom patterncc.cli import main\n"
                f"try:\n    main([{flag!r}])\nexcept SystemExit as e:\n    assert e.code == 0\n"
                f"print('loaded:', ' '.join(m for m in {HEAVY!r} if m in sys.modules))")
        out = _python(code)
        assert out.rstrip().endswith("loaded:"), f"`patterncc {flag}` imported {out.split('loaded:')[-1]}"


def test_version_is_printed():
    result = subprocess.run([sys.executable, "-m", "patterncc.cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"patterncc {patterncc.__version__}"
