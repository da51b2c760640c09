"""The wheel: it carries the grammar and templates, installs (non-editable) into a fresh venv, and runs there
from a folder where the source tree is not importable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}\n" \
                                   f"{result.stderr}"
    return result


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path):
    # A clean environment: nothing from this session's PYTHONPATH or working directory leaks in.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # Build isolation fetches hatchling (from PyPI, or pip's cache).
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", wheels], tmp_path, env)
    [wheel] = wheels.glob("patterncc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "patterncc/grammar/attn.lark" in names, sorted(names)
    assert any(n.startswith("patterncc/templates/") for n in names), "templates/ is not in the wheel"
    assert "patterncc/cli.py" in names
    assert "patterncc/families/blocksparse/kernels.py" in names, "the kernel families are not in the wheel"

    # A venv of its own whose dependencies (torch and the rest) come from this interpreter's site-packages
    # through a .pth file, so that nothing is downloaded; patterncc itself only from the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     env).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "patterncc_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed", "-q",
          wheel], tmp_path, env)

    where = _run([python, "-c", "import patterncc, patterncc.resources as r; print(patterncc.__file__); "
                                "print(r.resource_dir('grammar')); print(r.resource_dir('templates'))"],
                 tmp_path, env).stdout.split()
    for path in where:
        assert Path(path).is_relative_to(site), f"{path} is not the installed wheel's (expected under {site})"

    work = tmp_path / "work"
    (work / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "strided.attn", work / "examples")
    check = _run([venv / "bin" / "patterncc", "check", "examples/strided.attn", "--n", "1024"], work, env)
    assert "strided" in check.stdout and "coverage" in check.stdout.lower(), check.stdout
    shown = _run([venv / "bin" / "patterncc", "show", "examples/strided.attn", "--n", "1024", "-o", "strided.png"],
                 work, env)
    assert shown.stdout.strip() == "wrote strided.png"
    assert (work / "strided.png").read_bytes()[:4] == b"\x89PNG"
    # Generated modules are assembled from the installed package's family files.
    compiled = _run([venv / "bin" / "patterncc", "compile", "examples/strided.attn", "-o", "kernels"], work, env)
    assert "wrote" in compiled.stdout and (work / "kernels" / "strided.py").exists(), compiled.stdout
    ran = _run([python, "-c", "import torch; from kernels.strided import StridedAttention as A; "
                              "print(tuple(A()(*(torch.randn(1, 2, 40, 16) for _ in range(3))).shape))"], work, env)
    assert ran.stdout.strip() == "(1, 2, 40, 16)", ran.stdout
