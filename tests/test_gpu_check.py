"""scripts/gpu_check.sh, the one command that verifies the project on a lent GPU machine: its --dry-run (wheel
install, test collection, the benchmarks' argument parsing, a CPU smoke run, the plan with its time caps) runs here
in well under a minute, and the planning pieces keep every family and dtype in the first test phase."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

HAS_WHEELS = any(gpu_check.WHEELS.glob("*.whl"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return done, out


def test_dry_run_passes_and_writes_what_comes_back(dry_run):
    done, out = dry_run
    assert done.returncode == 0, f"dry run failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    files = sorted(p.name for p in out.rglob("*"))
    assert files == ["bench.json", "env.json", "log.txt", "summary.md", "tests.json", "tests.txt"]
    env = json.loads((out / "env.json").read_text())
    assert {s["step"] for s in env["steps"]} >= {"probe", "collect", "bench-help", "cpu-smoke", "lsh-cpu-tiny",
                                                 "linear-cpu-tiny"}
    failed = [s for s in env["steps"] if s["status"] != "ok"]
    assert not failed, f"dry-run steps failed: {failed}"
    assert [p["phase"] for p in env["plan"]] == [p[0] for p in gpu_check.PHASES]
    tests = json.loads((out / "tests.json").read_text())
    assert tests and all(t["outcome"] == "not run" for t in tests)
    cases = {gpu_check.case_of(t["nodeid"])[::2] for t in tests if t["phase"] == "tests-core"}
    for family in ("strided", "reformer", "linear", "hybrid"):
        assert {(family, dtype) for dtype in gpu_check.DTYPES} <= cases, f"{family} missing from tests-core"
    smoke = json.loads((out / "bench.json").read_text())["cpu_smoke"]
    assert all(case["finite"] for name, case in smoke.items() if name.endswith(".attn"))
    summary = (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(f"files in {out}") and summary.splitlines()[0] in done.stdout
    assert env["wall_s"] < 120, f"the dry run took {env['wall_s']} s"


@pytest.mark.skipif(not HAS_WHEELS, reason="scripts/gpu_wheels/ holds no wheels (a clean clone): run "
                                           "`bash scripts/download_gpu_wheels.sh` to test the carried install")
def test_dry_run_uses_the_carried_wheels(dry_run):
    done, out = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["wheels"]["status"] == "installed"
    assert "/site/lark/" in env["lark_file"], "lark must come from the carried wheel, as on the GPU machine"
    assert env["dist reformer-pytorch"] and env["dist fla-core"]
    peer = json.loads((out / "bench.json").read_text())["lsh"]["cpu-tiny"]["rows"][0]["reformer_pytorch"]
    assert "error" not in peer, f"reformer-pytorch from the wheels did not run: {peer}"


def test_missing_wheels_are_reported_not_fatal(tmp_path):
    args = argparse.Namespace(dry_run=True, budget=60, out=str(tmp_path / "out"), run_dir=str(tmp_path / "run"))
    info = gpu_check.install_wheels(gpu_check.Check(args), tmp_path / "no_wheels")
    assert info["status"].startswith("missing") and "download_gpu_wheels.sh" in info["status"]


def test_first_phase_holds_every_case_and_dtype():
    ids = [f"tests/gpu/test_gpu.py::test_kernels_on_gpu[{case}-D{dim}-{dtype}]"
           for case in ("strided", "local") for dim in (16, 32, 64, 128) for dtype in gpu_check.DTYPES]
    ids += [f"tests/gpu/test_gpu.py::test_family_kernels_on_gpu[linear-D{dim}-{dtype}]"
            for dim in (32, 128) for dtype in gpu_check.DTYPES]
    core, rest = gpu_check.split_tests(ids)
    assert sorted(core + rest) == sorted(ids)
    assert {gpu_check.case_of(i) for i in core} == (
        {(case, 64, dtype) for case in ("strided", "local") for dtype in gpu_check.DTYPES}
        | {("linear", 128, dtype) for dtype in gpu_check.DTYPES})
    dims = [gpu_check.case_of(i)[1] for i in rest]
    assert dims == sorted(dims, key=gpu_check.DIM_ORDER.index)


def test_phases_fit_the_nine_minutes():
    """Every phase is clamped to the global deadline less the floors of the phases after it and the report's
    reserve; the default deadline, plus the 10 s a stopped phase may take to end, stays under 9 minutes."""
    assert gpu_check.BUDGET + 10 + gpu_check.FINAL_RESERVE <= 9 * 60

    class Clock:
        def left(self):
            return 100.0

    floors = sum(floor for _, _, floor, _ in gpu_check.PHASES[1:]) + gpu_check.FINAL_RESERVE
    assert gpu_check.phase_timeout(Clock(), 0) == max(0.0, min(gpu_check.PHASES[0][1], 100.0 - floors))
    last = len(gpu_check.PHASES) - 1
    assert gpu_check.phase_timeout(Clock(), last) == min(gpu_check.PHASES[last][1], 100.0 - gpu_check.FINAL_RESERVE)
