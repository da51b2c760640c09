"""Shared fixtures: the examples, a fixed seed for every test, and the `gpu` marker's skip without CUDA."""

from __future__ import annotations

import os
import sys

# Triton decides interpreter vs compiler when each @triton.jit function (its standard library's included) is
# decorated, i.e. when triton is first imported, before torch can import it: so set the mode here, first.
# The CPU suite runs every generated kernel in the interpreter; GPU runs pass TRITON_INTERPRET=0 (tests/gpu).
# Ahead-of-time compilation for sm_80/sm_90 runs in subprocesses without the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The interpreter the ahead-of-time compilation workers run under: this one, or PATTERNCC_AOT_PYTHON, e.g. a
# virtual environment holding another Triton release (the GPU machines run Triton 3.6; this one may be newer).
AOT_PYTHON = os.environ.get("PATTERNCC_AOT_PYTHON", sys.executable)
EXAMPLES_DIR = ROOT / "examples"
AOT_WORKER = Path(__file__).with_name("aot_worker.py")
EXAMPLE_FILES = sorted(EXAMPLES_DIR.glob("*.attn"))

# Property tests run the same examples on every machine: derandomized, no example database, no deadline and no
# input-generation speed check (CI machines are slow and shared: a starved run once took 34 s to draw two inputs);
# each test bounds its own example count.
settings.register_profile("patterncc", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("patterncc")


def run_aot_worker(source: str, capabilities=("90", "80"), dtypes=("fp16", "bf16", "fp32"),
                   head_dims=(16, 32, 64, 128), timeout=3000, dropout=False) -> list[dict]:
    """Ahead-of-time compile reports (tests/aot_worker.py) for `source`, one subprocess per capability, two at a
    time (this machine has two cores); the workers run the real compiler, not the interpreter."""
    import json
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])

    def run(capability):
        command = [AOT_PYTHON, str(AOT_WORKER), str(source), str(capability), "--dtypes", ",".join(dtypes),
                   "--head-dims", ",".join(map(str, head_dims))] + (["--dropout"] if dropout else [])
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        assert result.returncode == 0, f"{source} sm_{capability}: ahead-of-time compilation failed:\n" \
                                       f"{result.stderr[-4000:]}"
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return [report for reports in pool.map(run, capabilities) for report in reports]


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    assert EXAMPLE_FILES, f"no .attn files in {EXAMPLES_DIR}"
    return EXAMPLES_DIR


@pytest.fixture(params=EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def example_file(request) -> Path:
    """Each file in examples/, one test per file."""
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
