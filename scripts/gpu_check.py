"""Verify patterncc on a lent GPU machine in one command, in under 9 minutes, Triton's JIT included.

    bash scripts/gpu_check.sh                # on the GPU machine, from the repository root (README, "On a GPU")
    bash scripts/gpu_check.sh --dry-run      # here, without a GPU: what it would run, and every step it can do

Phases, most informative first, each under its own time cap inside one global deadline (--budget; a phase is cut
short so that the phases after it keep their floor): setup (wheels carried in scripts/gpu_wheels installed with
`pip --target` into the run folder, never over the machine's torch or triton; versions and device; test collection),
tests-core (every family and example in fp32/fp16/bf16 at one head dim), the three benchmarks at the issues' sizes,
then tests-rest (the other head dims). Compiled kernels are cached in the run folder (.gpu_check/ in the checkout,
so a rerun on a still-warm machine skips the JIT). Results go to $OUT (default: a temporary folder) as at most 8
flat files: summary.md (also printed last), env.json, tests.txt, tests.json, bench.json, log.txt.

The module is also the pytest plugin the test phases load (`-p gpu_check`): it appends each test's outcome to the
file named by GPU_CHECK_RESULTS as it finishes, so a phase stopped at its cap keeps what it ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "scripts" / "gpu_wheels"
DTYPES = ("fp32", "fp16", "bf16")
DIM_ORDER = (64, 128, 32, 16)  # the first of these a case has goes into tests-core; the rest follow in this order
RESULTS_ENV = "GPU_CHECK_RESULTS"
PEERS = ("lark", "reformer-pytorch", "fla-core", "flash-linear-attention", "einops")
LOG_TAIL = 200_000  # bytes of each step's log kept in log.txt

# (name, cap s, floor s, what): a phase runs for at most its cap, and never into the floors of the phases after it.
PHASES = [
    ("tests-core", 150, 60, "tests/gpu: every family and example, fp32/fp16/bf16, at one head dim (D64)"),
    ("bench-set", 170, 60, "set heads vs dense causal SDPA and FlexAttention, n=16384, 16 heads, d=64, bf16"),
    ("bench-lsh", 85, 30, "hashed heads vs reformer-pytorch, n=16384 then 4096, 65536, bf16"),
    ("bench-linear", 85, 30, "kernel heads vs fla chunk_linear_attn and dense SDPA, n=16384 then 4096, 65536, bf16"),
    ("tests-rest", 240, 0, "tests/gpu: the other head dims (128, 32, 16)"),
]
FINAL_RESERVE = 10  # seconds kept for writing the report
# The default global deadline: a phase stopped at it takes up to 10 s more to end (SIGTERM, then SIGKILL), so the
# whole run stays under the 9 minutes (540 s) it is planned for.
BUDGET = 510.0


# -- the pytest plugin ------------------------------------------------------------------------------------------------

def pytest_runtest_logreport(report):
    path = os.environ.get(RESULTS_ENV)
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist, the controller writes
        return
    if report.when != "call" and report.outcome == "passed":
        return
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    message = crash.message if crash is not None else (report.longreprtext.strip().splitlines() or [""])[-1]
    record = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 2),
              "message": " ".join(message.split())[:500] if report.outcome != "passed" else ""}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# -- running steps under caps -----------------------------------------------------------------------------------------

class Check:
    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.deadline = self.t0 + args.budget
        self.run_dir = Path(args.run_dir or (tempfile.mkdtemp(prefix="gpu_check-") if args.dry_run
                                             else ROOT / ".gpu_check")).resolve()
        self.out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_out-")).resolve()
        for folder in (self.run_dir / "logs", self.out):
            folder.mkdir(parents=True, exist_ok=True)
        self.site = self.run_dir / "site"
        # A rerun on a still-warm machine reuses the run folder's caches, never an earlier run's results.
        for stale in [*self.run_dir.glob("bench-*.json"), *self.run_dir.glob("tests-*.jsonl"),
                      *(self.run_dir / "logs").glob("*.log")]:
            stale.unlink()
        self.steps, self.env_info, self.tests, self.bench = [], {}, {}, {}
        self.lock = threading.Lock()
        self.env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
                    "TRITON_CACHE_DIR": str(self.run_dir / "triton_cache"),
                    "TORCHINDUCTOR_CACHE_DIR": str(self.run_dir / "inductor_cache"),
                    "PATTERNCC_CACHE_DIR": str(self.run_dir / "patterncc_cache")}
        paths = [str(self.site), str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)

    def elapsed(self):
        return time.monotonic() - self.t0

    def left(self):
        return self.deadline - time.monotonic()

    def run(self, phase, label, command, timeout, env=None):
        """Run `command` in its own process group, killed with its children after `timeout` s; output to a log."""
        log = self.run_dir / "logs" / f"{label}.log"
        start = time.monotonic()
        step = {"phase": phase, "step": label, "command": " ".join(map(str, command)), "cap_s": round(timeout)}
        if timeout < 5:
            step.update(status="skipped (no time left)", seconds=0.0)
        else:
            with open(log, "w") as out:
                proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=env or self.env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc = proc.wait(timeout=timeout)
                    step["status"] = "ok" if rc == 0 else f"exit {rc}"
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    step["status"] = f"stopped at its cap ({timeout:.0f} s)"
            step["seconds"] = round(time.monotonic() - start, 1)
        step["log"] = str(log)
        with self.lock:
            self.steps.append(step)
        print(f"[{self.elapsed():6.1f} s] {phase}/{label}: {step['status']} ({step['seconds']} s)", flush=True)
        return step

    def python(self, phase, label, code_or_args, timeout):
        args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
        return self.run(phase, label, [sys.executable, *args], timeout)


def _kill_group(proc):
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def read_log(step, limit=LOG_TAIL):
    try:
        data = Path(step["log"]).read_bytes()
    except (OSError, KeyError):
        return ""
    return data[-limit:].decode(errors="replace")


def json_lines(text):
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# -- setup: wheels, environment, test collection ---------------------------------------------------------------------

def install_wheels(check, wheels_dir=WHEELS):
    """pip install --no-index --no-deps --target <run>/site every carried wheel; missing wheels are reported."""
    wheels = sorted(Path(wheels_dir).glob("*.whl"))
    info = {"folder": str(wheels_dir), "target": str(check.site), "wheels": [w.name for w in wheels]}
    if not wheels:
        info["status"] = (f"missing: no wheels in {wheels_dir} (run `bash scripts/download_gpu_wheels.sh` here and "
                          "carry scripts/gpu_wheels)")
        return info
    step = check.python("setup", "wheels", ["-m", "pip", "install", "-q", "--disable-pip-version-check",
                                            "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target",
                                            str(check.site), *wheels], min(60, check.left()))
    info["status"] = "installed" if step["status"] == "ok" else f"failed ({step['status']}): {read_log(step, 600)}"
    return info


PROBE = """
import importlib, importlib.metadata as md, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "triton", "patterncc", "lark"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "?")
        info[name + "_file"] = module.__file__
    except Exception as err:
        info[name] = f"not importable: {type(err).__name__}: {err}"
for dist in PEER_NAMES:
    try:
        info["dist " + dist] = md.version(dist)
    except md.PackageNotFoundError:
        info["dist " + dist] = None
import torch
info["cuda_available"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    info["capability"] = list(torch.cuda.get_device_capability())
    props = torch.cuda.get_device_properties(0)
    info["multiprocessors"], info["memory_gib"] = props.multi_processor_count, round(props.total_memory / 2**30, 1)
print(json.dumps(info))
""".replace("PEER_NAMES", repr(PEERS))


def record_environment(check):
    info = {"dry_run": check.args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host_python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "budget_s": check.args.budget, "run_dir": str(check.run_dir)}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        info["nvidia_smi"] = f"not available ({type(err).__name__})"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5,
                              check=False)
        info["commit"] = head.stdout.strip() or "unknown (no .git)"
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = "unknown (no git)"
    step = check.python("setup", "probe", PROBE, min(90, check.left()))
    probe = json_lines(read_log(step))
    info.update(probe[-1] if probe else {"probe_error": read_log(step, 2000)})
    return info


def collect_tests(check):
    """Node ids of tests/gpu and of `gpu`-marked tests elsewhere, in collection order."""
    paths = ["tests/gpu"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                                   if re.search(r"mark\.gpu\b", p.read_text(errors="replace")))
    step = check.python("setup", "collect", ["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                             "-m", "gpu", *paths], min(120, check.left()))
    ids = [line for line in read_log(step).splitlines() if re.fullmatch(r"[\w/.-]+\.py::\S+", line)]
    return ids, step


def case_of(nodeid):
    """(case, head dim, dtype) from ids such as test_kernels_on_gpu[strided-D64-bf16]; (test name, 0, '-') else."""
    match = re.search(r"\[(?P<case>[^\]]*?)-D(?P<dim>\d+)-(?P<dtype>fp32|fp16|bf16)\]$", nodeid)
    if match:
        return match["case"], int(match["dim"]), match["dtype"]
    return nodeid.split("::")[-1].split("[")[0], 0, "-"


def split_tests(ids):
    """tests-core: for every (case, dtype), its case at the first head dim of DIM_ORDER it has (and every test of
    unknown shape); tests-rest: the others, by DIM_ORDER."""
    rank = {dim: i for i, dim in enumerate(DIM_ORDER)}
    best = {}
    for nodeid in ids:
        case, dim, dtype = case_of(nodeid)
        key = (case, dtype)
        if key not in best or rank.get(dim, 99) < rank.get(case_of(best[key])[1], 99):
            best[key] = nodeid
    core = [i for i in ids if i in best.values() or case_of(i)[1] == 0]
    rest = sorted((i for i in ids if i not in core), key=lambda i: rank.get(case_of(i)[1], 99))
    return core, rest


# -- the plan ---------------------------------------------------------------------------------------------------------

def tests_command(check, ids, cap):
    command = [sys.executable, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider", "-q", "--tb=short",
               "-rN", "-o", "addopts="]
    have = check.env_info.get("pytest_plugins", [])
    if "xdist" in have:
        command += ["-n", str(max(1, min(12, (os.cpu_count() or 2) - 2))), "--dist", "load"]
    if "timeout" in have:
        command += [f"--timeout={int(min(120, cap))}"]
    return command + ids


def bench_steps(check, phase):
    out = check.run_dir
    if phase == "bench-set":
        return [("set", ["bench/gpu_attention.py", "--json", out / "bench-set.json"])]
    if phase == "bench-lsh":
        return [(f"lsh-n{n}", ["bench/lsh_attention.py", "--device", "cuda", "--dtype", "bf16", "--n", str(n),
                               "--repeats", "3", "--timeout", "40", "--peer-python", sys.executable,
                               "--json", out / f"bench-lsh-n{n}.json"]) for n in (16384, 4096, 65536)]
    return [(f"linear-n{n}", ["bench/linear_attention.py", "--device", "cuda", "--dtype", "bf16", "--heads", "16",
                              "--n", str(n), "--repeats", "3", "--dense-limit", "20",
                              "--json", out / f"bench-linear-n{n}.json"]) for n in (16384, 4096, 65536)]


def phase_timeout(check, index):
    name, cap, _, _ = PHASES[index]
    later = sum(floor for _, _, floor, _ in PHASES[index + 1:]) + FINAL_RESERVE
    return max(0.0, min(cap, check.left() - later))


def run_phases(check, core, rest):
    selected = set(check.args.phases.split(",")) if check.args.phases else None
    for index, (name, cap, _, _) in enumerate(PHASES):
        if selected is not None and name not in selected:
            continue
        until = time.monotonic() + phase_timeout(check, index)
        if name.startswith("tests"):
            ids = core if name == "tests-core" else rest
            results = check.run_dir / f"{name}.jsonl"
            results.unlink(missing_ok=True)
            if ids:
                check.run(name, name, tests_command(check, ids, until - time.monotonic()),
                          until - time.monotonic(), env={**check.env, RESULTS_ENV: str(results)})
            check.tests[name] = (ids, [json.loads(line) for line in results.read_text().splitlines()]
                                 if results.exists() else [])
        else:
            for label, args in bench_steps(check, name):
                if until - time.monotonic() < 15:
                    check.steps.append({"phase": name, "step": label, "status": "skipped (phase cap reached)",
                                        "seconds": 0.0, "cap_s": 0, "command": " ".join(map(str, args))})
                    continue
                check.python(name, label, [str(a) for a in args], until - time.monotonic())
        write_outputs(check)
        if name.startswith("tests"):
            print_tests_table(check)


def describe_plan(check, core, rest):
    plan = []
    for index, (name, cap, floor, what) in enumerate(PHASES):
        if name.startswith("tests"):
            ids = core if name == "tests-core" else rest
            commands = [" ".join(map(str, tests_command(check, [], cap))) + f" <{len(ids)} node ids>"]
            if len(check.env_info.get("pytest_plugins", [])) < 2:
                commands.append("(plus `-n 12 --dist load` and `--timeout=120` where pytest-xdist and "
                                "pytest-timeout are installed, as on the GPU machine)")
        else:
            commands = ["python " + " ".join(map(str, args)) for _, args in bench_steps(check, name)]
        plan.append({"phase": name, "cap_s": cap, "floor_s": floor, "what": what, "commands": commands})
    return plan


# -- the dry run's CPU work -------------------------------------------------------------------------------------------

SMOKE = """
import json, sys, torch
sys.path[:0] = ["bench", "tests"]
import lark
from common import EXAMPLES, PATTERNS
from patterncc.cache import load_module
cases = dict(PATTERNS.values()) | {"reformer.attn": {}, "linear.attn": {}, "hybrid.attn": {"w": 128, "l": 128}}
report = {"lark_file": lark.__file__}
for file, params in cases.items():
    module = load_module(EXAMPLES / file, **params)
    q, k, v = (torch.randn(1, module.NUM_HEADS, 256, 32, requires_grad=True) for _ in range(3))
    out = module.attention(q, k, v)
    out.sum().backward()
    # a hashed head with shared_qk ignores k, which then has no gradient
    grads = {name: x.grad for name, x in zip("qkv", (q, k, v)) if x.grad is not None}
    finite = bool(out.isfinite().all()) and all(bool(g.isfinite().all()) for g in grads.values())
    report[file] = {"params": params, "heads": module.NUM_HEADS, "grads": "".join(grads), "finite": finite}
    assert finite, file
print(json.dumps(report))
"""


# Each benchmark script's argument parsing, in one process (torch is imported once).
HELP = """
import contextlib, io, runpy, sys
sys.path.insert(0, "bench")  # as `python bench/X.py` would
for script in ("bench/gpu_attention.py", "bench/lsh_attention.py", "bench/linear_attention.py"):
    sys.argv, text = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as done:
            assert done.code in (0, None), f"{script} --help exited with {done.code}"
    print(f"{script} --help: ok, {len(text.getvalue().splitlines())} lines")
    print(text.getvalue())
"""


def dry_run_steps(check):
    """Everything the GPU run does that needs no GPU, two at a time (this machine has two cores)."""
    run = check.run_dir
    jobs = [
        ("help", lambda: [check.python("dry-run", "bench-help", HELP, 90)]),
        ("smoke", lambda: [check.python("dry-run", "cpu-smoke", SMOKE, 120)]),
        ("lsh", lambda: [check.python("dry-run", "lsh-cpu-tiny", [
            "bench/lsh_attention.py", "--n", "256", "--heads", "2", "--head-dim", "32", "--rounds", "2",
            "--chunk", "32", "--repeats", "1", "--timeout", "60", "--peer-python", sys.executable,
            "--json", str(run / "bench-lsh-cpu-tiny.json")], 120)]),
        ("linear", lambda: [check.python("dry-run", "linear-cpu-tiny", [
            "bench/linear_attention.py", "--n", "256", "--heads", "2", "--dim", "32", "--repeats", "1",
            "--json", str(run / "bench-linear-cpu-tiny.json")], 120)]),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: job[1](), jobs))
    smoke = next((s for s in check.steps if s["step"] == "cpu-smoke"), None)
    rows = json_lines(read_log(smoke)) if smoke else []
    check.bench["cpu_smoke"] = rows[-1] if rows else {"error": read_log(smoke, 2000) if smoke else "not run"}


# -- results ----------------------------------------------------------------------------------------------------------

def outcomes_by_test(check):
    """nodeid -> (phase, outcome, message) for every planned test; unreported ones are 'not run'."""
    outcomes = {}
    for phase, (ids, records) in check.tests.items():
        for nodeid in ids:
            outcomes[nodeid] = (phase, "not run", "")
        for record in records:
            previous = outcomes.get(record["nodeid"], (phase, "not run", ""))[1]
            outcome = "error" if record["outcome"] == "failed" and record["when"] != "call" else record["outcome"]
            if previous in ("not run", "passed") or outcome in ("failed", "error"):
                outcomes[record["nodeid"]] = (phase, outcome, record.get("message", ""))
    return outcomes


def tests_table(check):
    """Rows (case, {dtype: cell}) and failure lines."""
    outcomes, cells, failures = outcomes_by_test(check), {}, []
    for nodeid, (phase, outcome, message) in outcomes.items():
        case, _, dtype = case_of(nodeid)
        cell = cells.setdefault(case, {}).setdefault(dtype, {"passed": 0, "failed": 0, "skipped": 0, "not run": 0})
        cell["failed" if outcome in ("failed", "error") else outcome] += 1
        if outcome in ("failed", "error"):
            failures.append(f"{nodeid}: {outcome}: {message}")
    rows = []
    for case, by_dtype in cells.items():
        row = {}
        for dtype, c in by_dtype.items():
            total = sum(c.values())
            if check.args.dry_run:
                row[dtype] = f"{c['not run']} planned"
            else:
                row[dtype] = (f"{c['passed']}/{total}" + (f" FAIL {c['failed']}" if c["failed"] else "")
                              + (f" skip {c['skipped']}" if c["skipped"] else "")
                              + (f" unrun {c['not run']}" if c["not run"] else ""))
        rows.append((case, row))
    return rows, failures


def print_tests_table(check):
    rows, _ = tests_table(check)
    columns = list(DTYPES) + (["-"] if any("-" in r for _, r in rows) else [])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("case".ljust(12) + "".join(c.ljust(28) for c in columns))
        for case, row in rows:
            print(case.ljust(12) + "".join(row.get(c, "").ljust(28) for c in columns))
        return
    table = Table(title="tests/gpu: passed/total per case and dtype" + (" (dry run: planned)" if
                                                                          check.args.dry_run else ""))
    for column in ["case", *columns]:
        table.add_column(column)
    for case, row in rows:
        table.add_row(case, *(row.get(c, "") for c in columns))
    Console(width=120).print(table)


def gather_bench(check):
    run = check.run_dir
    set_steps = [s for s in check.steps if s["step"] == "set"]
    if set_steps:
        saved = run / "bench-set.json"
        check.bench["set"] = (json.loads(saved.read_text()) if saved.exists()
                              else {"results": json_lines(read_log(set_steps[-1])), "partial": True})
    for family in ("lsh", "linear"):
        for path in sorted(run.glob(f"bench-{family}-*.json")):
            check.bench.setdefault(family, {})[path.stem.removeprefix(f"bench-{family}-")] = json.loads(
                path.read_text())
    # A linear run stopped at its cap wrote no JSON, but printed each measurement as it went.
    for step in check.steps:
        label = step["step"].removeprefix("linear-")
        if step["step"].startswith("linear-") and label not in check.bench.get("linear", {}):
            rows = {}
            for n, key, seconds, mib in re.findall(r"^n=(\d+) (\w+): ([\d.]+) s, (\d+) MiB", read_log(step), re.M):
                rows.setdefault(n, {"n": int(n)})[key] = {"seconds": float(seconds), "peak_bytes": int(mib) << 20}
            if rows:
                check.bench.setdefault("linear", {})[label] = {"rows": list(rows.values()), "partial": True}


def bench_markdown(check):
    lines = []
    rows = check.bench.get("set", {}).get("results", [])
    if rows:
        lines += ["### Set heads (n=16384, 16 heads, d=64, bf16; ms, TFLOP/s on computed tiles)", "",
                  "| pattern | ours fwd | flex fwd | sdpa fwd | ours f+b | flex f+b | sdpa f+b | TFLOP/s fwd | "
                  "TFLOP/s f+b | sdpa TFLOP/s f+b |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            keys = ("patterncc_fwd_ms", "flex_fwd_ms", "sdpa_causal_fwd_ms", "patterncc_fwd_bwd_ms",
                    "flex_fwd_bwd_ms", "sdpa_causal_fwd_bwd_ms", "patterncc_fwd_tflops", "patterncc_fwd_bwd_tflops",
                    "sdpa_causal_fwd_bwd_tflops")
            lines.append(f"| {r.get('pattern')} | " + " | ".join(_num(r.get(k)) for k in keys) + " |")
        lines += ["", "Configs are BLOCK_M x BLOCK_N x warps x stages, by kernel, dtype, head_dim, n, batch x heads."]
        lines += [f"- {r.get('pattern')}{_configs(r) or ': -'}" for r in rows] + [""]
    for label, report in check.bench.get("lsh", {}).items():
        for row in report.get("rows", []):
            ours, peer = row.get("patterncc", {}), row.get("reformer_pytorch", {})
            lines.append(f"- hashed vs reformer-pytorch, {label} n={row['n']} (s): ours fwd {_num(ours.get('fwd_s'))}"
                         f" f+b {_num(ours.get('fwd_bwd_s'))}; reformer fwd {_num(peer.get('fwd_s'))} f+b "
                         f"{_num(peer.get('fwd_bwd_s'))}; reformer/ours f+b {_ratio(peer, ours, 'fwd_bwd_s')}"
                         + "".join(f"; {who}: {d['error']}" for who, d in (("ours", ours), ("peer", peer))
                                   if "error" in d) + _configs(ours))
    for label, report in check.bench.get("linear", {}).items():
        for row in report.get("rows", []):
            times = ", ".join(f"{k} {_num((row.get(k) or {}).get('seconds'))}" for k in row if k != "n")
            ratios = ", ".join(f"fla/ours {mode} {_ratio(row.get(f'fla_{mode}'), row.get(f'linear_{mode}'), 'seconds')}"
                               for mode in ("fwd", "fwdbwd") if row.get(f"fla_{mode}"))
            lines.append(f"- kernel heads, {label} n={row['n']} (s): {times}" + (f"; {ratios}" if ratios else "")
                         + _configs(row.get("linear_fwdbwd") or {}))
    if lines and lines[-1]:
        lines.append("")
    smoke = check.bench.get("cpu_smoke")
    if smoke:
        lines += ["### CPU smoke (n=256, d=32, forward+backward on the torch path)", "",
                  f"- {json.dumps(smoke)[:1500]}", ""]
    return lines


def _ratio(numerator, denominator, key):
    a, b = (numerator or {}).get(key), (denominator or {}).get(key)
    return f"{a / b:.2f}x" if a and b else "-"


def _configs(result):
    """The configs timed and chosen per shape, and the spill-free ones of kernels that had no candidates."""
    configs = result.get("configs", {})
    shown = {k.removeprefix("chosen "): v for k, v in configs.items() if k.startswith("chosen ")}
    timed = {k.split()[0] for k in shown}
    shown |= {k.removeprefix("spill-free "): v for k, v in configs.items()
              if k.startswith("spill-free ") and k.split()[1] not in timed}
    return "; configs " + ", ".join(f"{k}: {'x'.join(map(str, v))}" for k, v in shown.items()) if shown else ""


def _num(value):
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def write_outputs(check, plan=None):
    """$OUT/{summary.md, env.json, tests.txt, tests.json, bench.json, log.txt}; rewritten after every phase."""
    gather_bench(check)
    env = {**check.env_info, "wall_s": round(check.elapsed(), 1), "steps": check.steps}
    if plan is not None:
        env["plan"] = plan
    (check.out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    (check.out / "bench.json").write_text(json.dumps(check.bench, indent=1, default=str) + "\n")
    outcomes = outcomes_by_test(check)
    (check.out / "tests.json").write_text(json.dumps(
        [{"nodeid": k, "phase": p, "outcome": o, "message": m} for k, (p, o, m) in outcomes.items()], indent=1))
    rows, failures = tests_table(check)
    columns = list(DTYPES) + (["-"] if any("-" in r for _, r in rows) else [])
    table = ["| case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [f"| {case} | " + " | ".join(row.get(c, "") for c in columns) + " |" for case, row in rows]
    counts = {o: sum(1 for _, oo, _ in outcomes.values() if oo == o) for o in
              ("passed", "failed", "error", "skipped", "not run")}
    tests_text = table + ["", "totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()), ""] + failures
    (check.out / "tests.txt").write_text("\n".join(tests_text) + "\n")
    log = []
    for step in check.steps:
        log += [f"===== {step['phase']}/{step['step']}: {step['status']} ({step['seconds']} s)",
                f"$ {step['command'][:3000]}", read_log(step)]
    (check.out / "log.txt").write_text("\n".join(log) + "\n")

    info = check.env_info
    device = info.get("device") or ("none (dry run on CPU)" if check.args.dry_run else "no CUDA device")
    summary = [f"# patterncc GPU check{' (dry run)' if check.args.dry_run else ''}: {device}", "",
               f"- {info.get('started')}, wall {check.elapsed():.1f} s of a {check.args.budget:.0f} s budget; "
               f"commit {info.get('commit')}",
               f"- driver: {info.get('nvidia_smi')}",
               f"- Python {info.get('python')}, torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), triton "
               f"{info.get('triton')}, patterncc {info.get('patterncc')}, lark {info.get('lark')} from "
               f"{info.get('lark_file')}",
               f"- wheels: {info.get('wheels', {}).get('status')}; peers: "
               + ", ".join(f"{p} {info.get('dist ' + p)}" for p in PEERS[1:]), "",
               "## Steps", "", "| phase | step | cap s | took s | status |", "|---|---|---|---|---|"]
    summary += [f"| {s['phase']} | {s['step']} | {s['cap_s']} | {s['seconds']} | {s['status']} |"
                for s in check.steps]
    summary += ["", "## Tests" + (" (planned, not run)" if check.args.dry_run else ""), ""] + table + [""]
    summary += [tests_text[len(table) + 1]] + [f"- {f[:240]}" for f in failures[:10]]
    summary += ([f"- ... {len(failures) - 10} more in tests.txt"] if len(failures) > 10 else []) + [""]
    if plan is not None:
        summary += ["## What the GPU run would do (phases in order; caps in s, floors kept for later phases)", ""]
        for p in plan:
            summary += [f"- **{p['phase']}** (cap {p['cap_s']}, floor {p['floor_s']}): {p['what']}"]
            summary += [f"  - {c}" if c.startswith("(") else f"  - `{c}`" for c in p["commands"]]
        summary += [f"- global deadline {check.args.budget:.0f} s after start, {FINAL_RESERVE} s kept for the "
                    "report; a phase past its cap is stopped with its children and the next one starts", ""]
    summary += ["## Benchmarks", ""] + (bench_markdown(check) or ["(none run)", ""])
    summary += [f"Files: {check.out}/{{summary.md, env.json, tests.txt, tests.json, bench.json, log.txt}}; run "
                f"folder {check.run_dir}" + (" (temporary, removed)" if check.args.dry_run and not check.args.run_dir
                                             else "")]
    (check.out / "summary.md").write_text("\n".join(summary) + "\n")
    return "\n".join(summary)


# -- main -------------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no CUDA work: install, collect, parse, CPU smoke")
    parser.add_argument("--budget", type=float, default=BUDGET, help=f"global deadline in s (default {BUDGET:.0f})")
    parser.add_argument("--phases", help="comma-separated subset of: " + ", ".join(p[0] for p in PHASES))
    parser.add_argument("--out", help="results folder (default: $OUT, else a temporary folder)")
    parser.add_argument("--run-dir", help="work folder: site/, caches, logs (default .gpu_check/; dry run: temp)")
    parser.add_argument("--wheels", default=str(WHEELS), help="folder of carried wheels (default scripts/gpu_wheels)")
    args = parser.parse_args(argv)
    check = Check(args)
    print(f"gpu_check: run folder {check.run_dir}, results in {check.out}, budget {args.budget:.0f} s", flush=True)

    wheels = install_wheels(check, Path(args.wheels))
    with ThreadPoolExecutor(max_workers=2) as pool:
        environment = pool.submit(record_environment, check)
        ids, collect = collect_tests(check)
        check.env_info = environment.result()
    check.env_info["wheels"] = wheels
    check.env_info["pytest_plugins"] = [name for name, module in (("xdist", "xdist"), ("timeout", "pytest_timeout"))
                                        if importlib.util.find_spec(module) is not None]
    core, rest = split_tests(ids)
    check.tests = {"tests-core": (core, []), "tests-rest": (rest, [])}
    print(f"gpu_check: {len(ids)} GPU tests collected ({len(core)} core, {len(rest)} rest); wheels "
          f"{wheels['status'].split(':')[0]}; lark {check.env_info.get('lark')}", flush=True)

    failed = []
    if collect["status"] != "ok" or not ids:
        failed.append(f"test collection: {collect['status']}, {len(ids)} tests")
    if args.dry_run:
        dry_run_steps(check)
        print_tests_table(check)
        failed += [f"{step['step']}: {step['status']}" for step in check.steps if step["status"] != "ok"]
        peer = check.run_dir / "bench-lsh-cpu-tiny.json"
        if wheels["wheels"] and peer.exists() and "error" in json.dumps(json.loads(peer.read_text())["rows"]):
            failed.append("reformer-pytorch from the carried wheels did not run (bench-lsh-cpu-tiny.json)")
        summary = write_outputs(check, plan=describe_plan(check, core, rest))
    else:
        info = check.env_info
        problem = ("the environment probe failed (log.txt, setup/probe)" if "probe_error" in info
                   else "lark is not importable: carry scripts/gpu_wheels" if "not importable" in str(info["lark"])
                   else f"patterncc is not importable: {info['patterncc']}" if "not importable" in
                   str(info["patterncc"]) else None if info.get("cuda_available") else "torch sees no CUDA device")
        if problem:
            failed.append(problem)
        else:
            run_phases(check, core, rest)
        summary = write_outputs(check)
        outcomes = outcomes_by_test(check).values()
        failed += [f"{sum(o in ('failed', 'error') for _, o, _ in outcomes)} tests failed"] if any(
            o in ("failed", "error") for _, o, _ in outcomes) else []
    print(summary)
    if args.dry_run and not args.run_dir:  # a temporary folder: its logs are in log.txt
        shutil.rmtree(check.run_dir, ignore_errors=True)
    if failed:
        print("gpu_check: FAILED: " + "; ".join(failed))
    print(f"gpu_check: done in {check.elapsed():.1f} s; files in {check.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
