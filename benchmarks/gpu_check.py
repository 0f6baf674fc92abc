"""The GPU check: verify and measure the fused CUDA kernels in the few minutes a GPU is at hand.

A two-step flow (docs/gpu_check.md):

1. On any machine with the CUDA toolkit (no GPU needed), build the extension for the GPU's
   architecture only, so that the GPU machine compiles nothing (9.0: H100, H200):

       TORCH_CUDA_ARCH_LIST=9.0 SER_LIGHTNING_CUDA=1 python setup.py build_ext --inplace

   The extension lands in the source tree (ser_lightning/_C.abi3.so); a copy of the tree with it runs
   on the GPU machine, in a Python environment with the same packages (torch 2.11).

2. On the GPU machine, one command:

       python benchmarks/gpu_check.py --out gpu-report/ [--quick]

The steps run in order, each in its own process group under a time limit; at its limit the whole group
is ended (pytest and anything it started, the sanitized process and its children), and processes a
finished step left behind are ended too. The limits of the full check sum to at most 300 s (--quick:
under 120 s), printed at the start. A step starts only when the budget (--budget-s, default: that sum)
still holds its limit; otherwise it reads "skipped: no time left". A step whose Python packages or
tools are missing, or that needs a GPU the machine lacks, is skipped with one line saying so.

    environment      GPU, driver, torch, CUDA, the extension and whether its kernels run on this GPU
    tests            pytest -m cuda tests/test_ops.py (--quick: without the torch.compile and
                     device-assertion tests)
    sanitizer        compute-sanitizer memcheck, racecheck, synccheck and initcheck side by side (--quick:
                     memcheck) on a small workload, with PyTorch's caching allocator off
    bench_attention  bench_attention.py --device cuda: float32 and bfloat16, GB/s against the peak
    bench_train      bench_train.py --device cuda: precision 32 and bf16-mixed (not in --quick)
    fit              python -m ser_lightning fit on the GPU, bf16-mixed, 3 epochs of a small synthetic corpus

Everything goes into --out: summary.md (the report: every number under a heading naming its step and
device), gpu_check.json (the same, and a flat list of numbers) and logs/ (each command's output).
Without a GPU the GPU steps are skipped, each saying why, in seconds (tests/test_gpu_check.py).
The exit status is 0 when no step failed or timed out, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
FORMAT = 1
GRACE_S = 3.0  # a group past its limit gets SIGTERM this long before the limit, SIGKILL at it
START_FRACTION = 0.9  # a step starts when the remaining budget holds this share of its limit
PROJECT_KERNEL_MARKS = ("ser_lightning", "attention_pool.cu")  # in a sanitizer report: the project's kernels
PIP_NAMES = {"sklearn": "scikit-learn", "yaml": "pyyaml"}  # import name -> distribution, where they differ


# --------------------------------------------------------------------------------------------
# Records

@dataclass(frozen=True)
class Command:
    """One process of a step: its log name, argument list, time limit and extra environment."""

    name: str
    argv: tuple[str, ...]
    limit_s: float
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class CommandResult:
    name: str
    command: str
    log: str  # relative to the output folder
    limit_s: float
    seconds: float
    returncode: int | None  # None: it reached its limit and its process group was ended
    leftovers: int  # processes of its group still running after it exited (ended then)
    output: str = field(default="", repr=False)

    @property
    def status(self) -> str:
        return "timed out" if self.returncode is None else ("passed" if self.returncode == 0 else "failed")


@dataclass(frozen=True)
class Number:
    """One measured value, with the step and the device that produced it."""

    step: str
    device: str
    metric: str
    value: float
    unit: str


@dataclass
class Outcome:
    """What a step's summary function makes of its commands."""

    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    numbers: list[Number] = field(default_factory=list)


@dataclass
class StepResult:
    name: str
    status: str  # passed | failed | timed out | skipped
    limit_s: float | None
    seconds: float
    detail: str
    commands: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What the steps share: the output folder, the mode, a scratch folder and the probed environment."""

    out: Path
    mode: str
    scratch: Path
    python: str = sys.executable
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        gpus = self.environment.get("gpus") or []
        return gpus[0]["name"] if gpus else "no CUDA device"


@dataclass(frozen=True)
class StepSpec:
    """A step: its commands in a mode ([] = not part of that mode), what must hold before it starts,
    and how its results are read."""

    name: str
    what: str
    commands: Callable[[Context], list[Command]]
    summarise: Callable[[Context, list[CommandResult]], Outcome]
    precondition: Callable[[Context], str | None] | None = None  # a reason to skip, or None
    modules: tuple[str, ...] = ()  # Python modules its commands import (checked without importing)
    parallel: bool = False  # commands side by side (limit: the largest) or one after another (the sum)

    def limit_s(self, commands: list[Command]) -> float:
        limits = [c.limit_s for c in commands]
        return (max(limits) if self.parallel else sum(limits)) if limits else 0.0


@dataclass
class Report:
    mode: str
    budget_s: float
    limits_s: dict[str, float | None]
    total_s: float
    environment: dict[str, Any]
    device: str
    steps: list[StepResult]
    numbers: list[Number]
    interrupted: bool = False

    @property
    def limits_sum_s(self) -> float:
        return sum(limit for limit in self.limits_s.values() if limit)

    @property
    def not_run(self) -> list[StepResult]:
        return [s for s in self.steps if s.status == "skipped"]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "mode": self.mode, "budget_s": self.budget_s, "limits_s": self.limits_s,
                "limits_sum_s": self.limits_sum_s, "total_s": round(self.total_s, 1), "device": self.device,
                "interrupted": self.interrupted, "environment": self.environment,
                "steps": [asdict(s) for s in self.steps],
                "not_run": [{"step": s.name, "reason": s.detail} for s in self.not_run],
                "timed_out": [s.name for s in self.steps if s.status == "timed out"],
                "numbers": [asdict(n) for n in self.numbers]}

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(s.status in ("passed", "skipped") for s in self.steps)


# --------------------------------------------------------------------------------------------
# Process groups

def group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are alive (zombies excluded). Reads /proc; where there is none,
    any process the group can be signalled through counts."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if state != "Z" and int(pgrp) == pgid:
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_group(proc: subprocess.Popen, until: float) -> bool:
    """Reap the leader and wait until no process of its group is alive, or `until`; True if none is."""
    while True:
        proc.poll()
        if proc.returncode is not None and not group_members(proc.pid):
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(0.05)


@dataclass
class Running:
    command: Command
    proc: subprocess.Popen
    log: Path
    handle: Any
    started: float


def start(command: Command, ctx: Context) -> Running:
    """Start a command from the repository root in a new session (its own process group), output to its log."""
    log = ctx.out / "logs" / f"{command.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("w")
    handle.write("$ " + " ".join(command.argv) + "\n\n")
    handle.flush()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **dict(command.env)}
    proc = subprocess.Popen(command.argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return Running(command, proc, log, handle, time.monotonic())


def finish(run: Running, ctx: Context, end_at: float, grace_s: float) -> CommandResult:
    """Wait for the command until `end_at`; past it, end its whole group (SIGTERM, then SIGKILL at
    end_at). A command that exited in time may leave processes behind in its group: they are ended."""
    proc, pgid = run.proc, run.proc.pid
    term_at = end_at - min(grace_s, 0.25 * run.command.limit_s)
    try:
        proc.wait(timeout=max(0.0, term_at - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    leftovers = 0
    if proc.returncode is None:  # past its limit
        signal_group(pgid, signal.SIGTERM)
        if not wait_for_group(proc, end_at):
            signal_group(pgid, signal.SIGKILL)
            wait_for_group(proc, time.monotonic() + 5.0)  # SIGKILL is not refused; a few seconds at most
        returncode = None
    else:
        returncode = proc.returncode
        leftovers = len(group_members(pgid))
        if leftovers:
            signal_group(pgid, signal.SIGKILL)
            wait_for_group(proc, time.monotonic() + 5.0)
    seconds = time.monotonic() - run.started
    run.handle.close()
    return CommandResult(name=run.command.name, command=" ".join(run.command.argv),
                         log=str(run.log.relative_to(ctx.out)), limit_s=run.command.limit_s,
                         seconds=round(seconds, 1), returncode=returncode, leftovers=leftovers,
                         output=run.log.read_text(errors="replace"))


def run_commands(spec: StepSpec, commands: list[Command], ctx: Context, deadline: float,
                 grace_s: float) -> list[CommandResult]:
    """Run a step's commands (side by side or in turn), none past its own limit or `deadline`. On any
    exception (an interrupt) every group started is ended before it propagates."""
    running: list[Running] = []
    results = []
    try:
        if spec.parallel:
            running = [start(c, ctx) for c in commands]
            for run in running:
                results.append(finish(run, ctx, min(run.started + run.command.limit_s, deadline), grace_s))
        else:
            for command in commands:
                running = [start(command, ctx)]
                results.append(finish(running[0], ctx, min(running[0].started + command.limit_s, deadline),
                                      grace_s))
    except BaseException:
        for run in running:  # children of a command that has exited may still run
            signal_group(run.proc.pid, signal.SIGKILL)
            wait_for_group(run.proc, time.monotonic() + 5.0)
            run.handle.close()
        raise
    return results


# --------------------------------------------------------------------------------------------
# The check

def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def skip_reason(spec: StepSpec, commands: list[Command], ctx: Context, skip: tuple[str, ...]) -> str | None:
    """Why a step cannot start (time aside), or None."""
    if spec.name in skip:
        return "skipped: --skip"
    if not commands:
        return f"skipped: not part of the {ctx.mode} check"
    if spec.precondition is not None and (reason := spec.precondition(ctx)):
        return reason
    missing = missing_modules(spec.modules)
    if missing:
        names = [PIP_NAMES.get(m, m) for m in missing]
        return f"skipped: missing Python packages: {', '.join(names)} (pip install {' '.join(names)})"
    return None


def say_now(line: str) -> None:
    print(line, flush=True)


def run_check(specs: list[StepSpec], ctx: Context, budget_s: float | None = None, skip: tuple[str, ...] = (),
              grace_s: float = GRACE_S, say: Callable[[str], None] = say_now) -> Report:
    """Run the steps in order within the budget (default: the sum of their limits) and report."""
    plans = {spec.name: spec.commands(ctx) for spec in specs}
    limits = {spec.name: (spec.limit_s(plans[spec.name]) or None) for spec in specs}
    limits_sum = sum(limit for limit in limits.values() if limit)
    budget = limits_sum if budget_s is None else budget_s
    say(f"GPU check, {ctx.mode} mode: the step limits sum to {limits_sum:.0f} s; budget {budget:.0f} s")
    for spec in specs:
        limit = limits[spec.name]
        say(f"  {spec.name:<16} {'-' if limit is None else f'{limit:.0f} s':>6}  {spec.what}")
    started = time.monotonic()
    deadline = started + budget
    results: list[StepResult] = []
    numbers: list[Number] = []
    interrupted = False
    for spec in specs:
        if interrupted:
            results.append(StepResult(spec.name, "skipped", limits[spec.name], 0.0, "skipped: interrupted"))
            continue
        try:
            result, found = run_step(spec, plans[spec.name], limits[spec.name], ctx, deadline, budget, skip,
                                     grace_s, say)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the step's process groups are already ended
            interrupted = True
            result, found = StepResult(spec.name, "skipped", limits[spec.name], 0.0,
                                       "skipped: interrupted (its processes were ended)"), []
        results.append(result)
        numbers += found
        say(f"{spec.name}: " + (result.detail if result.status == "skipped"
                                else f"{result.status} in {result.seconds:.0f} s ({result.detail})"))
    return Report(mode=ctx.mode, budget_s=budget, limits_s=limits, total_s=time.monotonic() - started,
                  environment=ctx.environment, device=ctx.device, steps=results, numbers=numbers,
                  interrupted=interrupted)


def run_step(spec: StepSpec, commands: list[Command], limit: float | None, ctx: Context, deadline: float,
             budget: float, skip: tuple[str, ...], grace_s: float,
             say: Callable[[str], None]) -> tuple[StepResult, list[Number]]:
    """One step: skipped with its reason, or run within its limit and the budget's deadline."""
    reason = skip_reason(spec, commands, ctx, skip)
    remaining = deadline - time.monotonic()
    if reason is None and remaining < START_FRACTION * limit:
        reason = (f"skipped: no time left ({max(remaining, 0.0):.0f} s of the {budget:.0f} s budget remain; "
                  f"the step's limit is {limit:.0f} s)")
    if reason is not None:
        return StepResult(spec.name, "skipped", limit, 0.0, reason), []
    say(f"... {spec.name} (limit {min(limit, remaining):.0f} s)")
    started = time.monotonic()
    done = run_commands(spec, commands, ctx, min(started + limit, deadline), grace_s)
    outcome = spec.summarise(ctx, done)
    left = sum(c.leftovers for c in done)
    detail = outcome.detail + (f"; ended {left} process(es) it left running" if left else "")
    commands_json = [{k: v for k, v in asdict(c).items() if k != "output"} for c in done]
    return StepResult(spec.name, outcome.status, limit, round(time.monotonic() - started, 1), detail, commands_json,
                      outcome.data), outcome.numbers


def status_of(results: list[CommandResult], failed: bool = False) -> str:
    """A step's status from its commands: timed out if any did, else failed if any failed (or `failed`)."""
    statuses = [r.status for r in results]
    if "timed out" in statuses:
        return "timed out"
    return "failed" if failed or "failed" in statuses else "passed"


def tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_cuda_tool(name: str) -> str | None:
    """An executable of the CUDA toolkit: on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    return None


def gpu_ready(ctx: Context) -> str | None:
    """Why the GPU steps cannot run here, or None."""
    env = ctx.environment
    if not env:
        return "skipped: the environment step did not complete, so the GPU is unknown"
    if not env.get("cuda_available"):
        return "skipped: no CUDA device (torch.cuda.is_available() is False)"
    if not env.get("extension_cuda_kernels"):
        return (f"skipped: the extension has no CUDA kernels ({env.get('extension')}); build it with "
                "TORCH_CUDA_ARCH_LIST=<the GPU's capability> SER_LIGHTNING_CUDA=1 (docs/gpu_check.md)")
    if env.get("kernels_run") != "yes":
        capability = env["gpus"][0]["capability"]
        return (f"skipped: the extension's CUDA kernels do not run on {ctx.device} (sm {capability}): "
                f"{env.get('kernels_run')}; rebuild with TORCH_CUDA_ARCH_LIST={capability}")
    return None


# --------------------------------------------------------------------------------------------
# Step: environment

def environment_commands(ctx: Context) -> list[Command]:
    return [Command("environment", (ctx.python, str(SCRIPT), "--probe", str(ctx.out / "environment.json")), 15.0)]


def tool_version(name: str, pattern: str) -> str | None:
    tool = find_cuda_tool(name) if name != "nvidia-smi" else shutil.which(name)
    if tool is None:
        return None
    args = ["--query-gpu=driver_version", "--format=csv,noheader"] if name == "nvidia-smi" else ["--version"]
    try:
        out = subprocess.run([tool, *args], capture_output=True, text=True, timeout=3).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, out)
    return match.group(1) if match else None


def probe_environment(path: Path) -> None:
    """The environment step's process: versions, GPUs, the extension, and whether its kernels run on GPU 0."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "gpus": [],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "driver": tool_version("nvidia-smi", r"^\s*(\S+)"), "nvcc": tool_version("nvcc", r"release ([\d.]+)"),
        "compute_sanitizer": tool_version("compute-sanitizer", r"Version ([\d.]+)"),
        "packages": {},
    }
    for name in ("lightning", "torchmetrics", "jsonargparse", "soundfile", "pytest", "numpy", "triton"):
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    try:
        from ser_lightning.ops import fused
    except Exception as err:  # reported, not raised: the report says what is wrong
        env.update(extension=f"ser_lightning.ops cannot be imported: {err}", extension_cuda_kernels=False)
    else:
        env.update(extension=fused.LOAD_ERROR or "loaded", extension_cuda_kernels=fused.has_kernel("cuda"))
    env["kernels_run"] = None
    if env["cuda_available"]:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            env["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(props.total_memory / 2**30, 1)})
        if env["extension_cuda_kernels"]:
            try:  # a kernel image for this GPU's architecture, loadable and running
                torch.ops.ser_lightning._tanh(torch.zeros(8, device="cuda"))
                torch.cuda.synchronize()
                env["kernels_run"] = "yes"
            except RuntimeError as err:
                env["kernels_run"] = str(err).strip().splitlines()[0]
    path.write_text(json.dumps(env, indent=2))
    print(json.dumps(env, indent=2))


def summarise_environment(ctx: Context, results: list[CommandResult]) -> Outcome:
    (result,) = results
    env = read_json(ctx.out / "environment.json") if result.status == "passed" else None
    if env is None:
        return Outcome(status_of(results, failed=True), tail(result.output))
    ctx.environment.update(env)
    gpus = ", ".join(f"{g['name']} (sm {g['capability']})" for g in env["gpus"]) or "no CUDA device"
    return Outcome("passed", f"{gpus}; torch {env['torch']}, CUDA {env['torch_cuda'] or '-'}; driver "
                             f"{env['driver'] or '-'}; extension {env['extension']}, CUDA kernels run: "
                             f"{env['kernels_run'] or '-'}")


# --------------------------------------------------------------------------------------------
# Step: the CUDA tests

def tests_commands(ctx: Context) -> list[Command]:
    argv = [ctx.python, "-m", "pytest", "-m", "cuda", "tests/test_ops.py", "-q", "-ra", "-o", "addopts=",
            "-p", "no:cacheprovider", "--noconftest", f"--junitxml={ctx.out / 'cuda_tests.xml'}"]
    if ctx.mode == "quick":  # the cold inductor compile and the device-assertion subprocesses take longest
        argv += ["-k", "not inductor and not assert_on_cuda"]
    return [Command("tests", tuple(argv), 70.0 if ctx.mode == "full" else 30.0)]


def summarise_tests(ctx: Context, results: list[CommandResult]) -> Outcome:
    (result,) = results
    try:
        suite = ElementTree.parse(ctx.out / "cuda_tests.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return Outcome(status_of(results), tail(result.output))
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["skipped"] - counts["failures"] - counts["errors"]
    data = {"passed": passed, "failed": len(failed), "skipped": counts["skipped"], "failed_tests": failed}
    detail = (f"{passed} passed, {len(failed)} failed, {counts['skipped']} skipped"
              + (f": {', '.join(failed[:8])}" if failed else ""))
    numbers = [Number("tests", ctx.device, f"CUDA tests {key}", float(data[key]), "tests")
               for key in ("passed", "failed", "skipped")]
    if passed == 0:  # every CUDA test skipped: on a GPU machine that proves nothing
        detail += " (no CUDA test ran: see the skip reasons in the log)"
    return Outcome(status_of(results, failed=bool(failed) or passed == 0), detail, data, numbers)


# --------------------------------------------------------------------------------------------
# Step: compute-sanitizer

SANITIZER_TOOLS = {"full": ("memcheck", "racecheck", "synccheck", "initcheck"), "quick": ("memcheck",)}
# Shared-memory races and barrier misuse matter in the project's kernels, not in cuBLAS's: these tools
# check kernels whose names contain the namespace only (much faster). memcheck and initcheck see all,
# so an out-of-bounds or uninitialised read that the project's buffers cause in a library kernel shows.
KERNEL_FILTERED = ("racecheck", "synccheck")


def sanitizer_commands(ctx: Context) -> list[Command]:
    tool = find_cuda_tool("compute-sanitizer") or "compute-sanitizer"
    limit = 50.0 if ctx.mode == "full" else 25.0
    commands = []
    for name in SANITIZER_TOOLS[ctx.mode]:
        kernel_filter = ("--kernel-name", "kns=ser_lightning") if name in KERNEL_FILTERED else ()
        argv = (tool, "--tool", name, "--error-exitcode", "99", "--print-limit", "20", *kernel_filter,
                ctx.python, str(SCRIPT), "--sanitizer-workload")
        # Without the caching allocator every tensor is its own cudaMalloc: memcheck sees an access past a
        # tensor's end, initcheck a read of memory nothing wrote, instead of the allocator's pool.
        commands.append(Command(f"sanitizer_{name}", argv, limit, (("PYTORCH_NO_CUDA_MEMORY_CACHING", "1"),)))
    return commands


def sanitizer_precondition(ctx: Context) -> str | None:
    if reason := gpu_ready(ctx):
        return reason
    if find_cuda_tool("compute-sanitizer") is None:
        return "skipped: compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
    return None


def sanitizer_reports(output: str) -> list[str]:
    """The reports in compute-sanitizer's output: each a header line ("========= Invalid __global__
    read ...") with its indented lines, leaving out its banner and summary lines."""
    reports: list[list[str]] = []
    for line in output.splitlines():
        if not line.startswith("========="):
            continue
        text = line[len("========="):]
        if text.startswith(" ") and text.strip() and not text.startswith("  "):
            header = text.strip()
            if header.startswith(("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY",
                                  "Target application returned")):
                continue
            reports.append([header])
        elif reports and text.strip():
            reports[-1].append(text.strip())
    return ["\n".join(report) for report in reports]


def sanitizer_verdict(result: CommandResult) -> dict[str, Any]:
    """One tool's verdict. It passes when the workload completed and no kernel error was reported: the
    reports shown are split into the project's kernels, other kernels and CUDA API calls ("Program hit
    ..."), and errors the tool counted beyond the API reports shown fail it too."""
    output = result.output
    summary = re.search(r"ERROR SUMMARY: (\d+) errors?", output) or re.search(
        r"RACECHECK SUMMARY: .*?\((\d+) errors?", output)
    errors = int(summary.group(1)) if summary else None
    reports = sanitizer_reports(output)
    api = [r for r in reports if r.startswith("Program hit")]
    kernel = [r for r in reports if not r.startswith("Program hit")]
    project = [r for r in kernel if any(mark in r for mark in PROJECT_KERNEL_MARKS)]
    status, verdict = "failed", None
    if result.status == "timed out":
        status, verdict = "timed out", "timed out"
    elif kernel:
        verdict = (f"{len(kernel)} kernel error report(s) shown: {len(project)} in the project's kernels, "
                   f"{len(kernel) - len(project)} in others")
    elif errors is not None and errors > len(api):
        verdict = f"{errors} error(s) counted, {len(api)} shown as CUDA API reports: see the log"
    elif "WORKLOAD OK" not in output:
        verdict = "the workload did not complete: " + tail(output, 2)
    else:
        status = "passed"
        verdict = "no kernel errors" + (f" ({len(api)} CUDA API error report(s), see the log)" if api else "")
    return {"status": status, "verdict": verdict, "seconds": result.seconds, "errors_counted": errors,
            "project_kernel_reports": len(project), "other_kernel_reports": len(kernel) - len(project),
            "api_reports": len(api), "first_report": (kernel or api or [None])[0]}


def summarise_sanitizer(ctx: Context, results: list[CommandResult]) -> Outcome:
    verdicts = {r.name.removeprefix("sanitizer_"): sanitizer_verdict(r) for r in results}
    statuses = [v["status"] for v in verdicts.values()]
    status = "failed" if "failed" in statuses else ("timed out" if "timed out" in statuses else "passed")
    detail = "; ".join(f"{name}: {v['verdict']}" for name, v in verdicts.items())
    numbers = [Number("sanitizer", ctx.device, f"{name} kernel error reports",
                      float(v["project_kernel_reports"] + v["other_kernel_reports"]), "reports")
               for name, v in verdicts.items() if v["status"] != "timed out"]
    return Outcome(status, detail, verdicts, numbers)


def sanitizer_workload() -> None:
    """Forward and backward of the fused CUDA kernels on small inputs reaching every code path: one and
    several tiles, C > 256, lane groups below a warp (C = 7), waves that split utterances, bfloat16,
    the tanh op."""
    import torch

    from ser_lightning.ops import attention_pool, fused

    g = torch.Generator().manual_seed(0)
    cases = [  # (B, L, C, D), dtype, wave budget (0 = default)
        ((3, 70, 30, 30), torch.float32, 0),
        ((3, 130, 7, 9), torch.float32, 0),
        ((2, 150, 260, 70), torch.float32, 150),  # C > 256; waves split every utterance
        ((4, 70, 30, 30), torch.bfloat16, 0),
    ]
    for (B, L, C, D), dtype, wave in cases:
        previous = fused.set_wave_elements(wave)
        params = [torch.randn(*shape, generator=g).to("cuda", dtype).requires_grad_()
                  for shape in ((B, L, C), (D, C), (D,), (D,))]
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        lengths[0] = L
        context, alpha = attention_pool(*params, 0.8, lengths.cuda(), backend="fused")
        torch.autograd.grad((context.float().sum() + alpha.float().square().sum()), params)
        fused.set_wave_elements(previous)
    torch.ops.ser_lightning._tanh(torch.linspace(-9, 9, 1000, device="cuda"))
    torch.cuda.synchronize()
    print("WORKLOAD OK")


# --------------------------------------------------------------------------------------------
# Step: the attention benchmark

def bench_attention_commands(ctx: Context) -> list[Command]:
    base = (ctx.python, "benchmarks/bench_attention.py", "--device", "cuda")
    if ctx.mode == "quick":
        variants = {"float32": (("--dtype", "float32", "--shapes", "logmel-1d", "large", "--no-compile",
                                 "--repeats", "20", "--rounds", "2"), 20.0)}
    else:  # torch.compile (a cold compile per shape) only where the goals compare against it
        shapes = ("--shapes", "seed1d", "logmel-1d", "zhang2d", "large", "--repeats", "40", "--rounds", "4")
        variants = {"float32": (("--dtype", "float32", *shapes, "--compile-shapes", "seed1d", "logmel-1d"), 50.0),
                    "bfloat16": (("--dtype", "bfloat16", *shapes, "--no-compile"), 25.0)}
    return [Command(f"bench_attention_{key}", (*base, *args, "--json", str(ctx.out / f"bench_attention_{key}.json")),
                    limit) for key, (args, limit) in variants.items()]


# A contender's forward+backward results in the report: JSON key -> (metric, unit, scale).
ATTENTION_METRICS = {
    "forward_backward_s": ("forward+backward time", "ms", 1e3),
    "forward_backward_x_eager": ("speed-up over eager", "x", 1.0),
    "forward_backward_x_compiled": ("speed-up over torch.compile", "x", 1.0),
    "forward_backward_gbs": ("achieved bandwidth", "GB/s", 1.0),
    "forward_backward_peak_fraction": ("share of peak bandwidth", "%", 100.0),
}


def summarise_variants(ctx: Context, results: list[CommandResult], step: str,
                       read: Callable[[str, dict[str, Any]], tuple[dict[str, Any], list[Number], str]]) -> Outcome:
    """A benchmark step's commands, one per variant (dtype, precision), each writing out/<command>.json:
    `read(variant, payload)` gives its data, numbers and a phrase; a command that failed gives its error."""
    data, numbers, parts = {}, [], []
    for result in results:
        variant = result.name.removeprefix(f"{step}_")
        payload = read_json(ctx.out / f"{result.name}.json") if result.status == "passed" else None
        if payload is None:
            data[variant] = {"status": result.status, "error": tail(result.output)}
            parts.append(f"{variant} {result.status}: {tail(result.output, 1)}")
            continue
        data[variant], found, part = read(variant, payload)
        numbers += found
        parts.append(part)
    return Outcome(status_of(results), "; ".join(parts), data, numbers)


def read_bench_attention(dtype: str, payload: dict[str, Any]) -> tuple[dict[str, Any], list[Number], str]:
    run = payload["runs"][0]
    device = run["environment"]["device_name"]
    keys = (*ATTENTION_METRICS, "compile_forward_backward_s", "max_abs_diff_vs_eager")
    shapes = {r["shape"]: {label: {key: e.get(key) for key in keys} for label, e in r["contenders"].items()}
              for r in run["results"]}
    numbers = [Number("bench_attention", device, f"{dtype} {shape} {label} {metric}", scale * e[key], unit)
               for shape, contenders in shapes.items() for label, e in contenders.items()
               for key, (metric, unit, scale) in ATTENTION_METRICS.items() if e.get(key) is not None]
    met = sum(g["passed"] is True for g in run["goals"])
    data = {"status": "passed", "device": device, "peak_bandwidth_gbs": run["peak_bandwidth_gbs"], "shapes": shapes,
            "goals": run["goals"]}
    return data, numbers, f"{dtype}: {len(shapes)} shapes, goals met {met} of {len(run['goals'])}"


def summarise_bench_attention(ctx: Context, results: list[CommandResult]) -> Outcome:
    return summarise_variants(ctx, results, "bench_attention", read_bench_attention)


# --------------------------------------------------------------------------------------------
# Step: the training benchmark

def bench_train_commands(ctx: Context) -> list[Command]:
    if ctx.mode == "quick":
        return []
    base = (ctx.python, "benchmarks/bench_train.py", "--device", "cuda", "--repeats", "20", "--rounds", "2")
    return [Command(f"bench_train_{precision}", (*base, "--precision", precision, "--json",
                                                 str(ctx.out / f"bench_train_{precision}.json")), 20.0)
            for precision in ("32", "bf16-mixed")]


def read_bench_train(precision: str, payload: dict[str, Any]) -> tuple[dict[str, Any], list[Number], str]:
    device = payload["environment"]["device_name"]
    models, numbers = {}, []
    for r in payload["results"]:
        models[r["arch"]] = {"throughput_ratio": r["throughput_ratio"]}
        for backend, e in r["backends"].items():
            models[r["arch"]][f"{backend}_step_ms"] = 1e3 * e["step_s"]
            numbers.append(Number("bench_train", device, f"precision {precision} {r['arch']} {backend} step time",
                                  1e3 * e["step_s"], "ms"))
        if r["throughput_ratio"] is not None:
            numbers.append(Number("bench_train", device, f"precision {precision} {r['arch']} fused / reference "
                                                         "throughput", r["throughput_ratio"], "x"))
    phrase = f"precision {precision}: " + ", ".join(
        f"{arch} fused {m['throughput_ratio']:.2f}x reference" if m["throughput_ratio"] else f"{arch} reference"
        for arch, m in models.items())
    return {"status": "passed", "device": device, "models": models}, numbers, phrase


def summarise_bench_train(ctx: Context, results: list[CommandResult]) -> Outcome:
    return summarise_variants(ctx, results, "bench_train", read_bench_train)


# --------------------------------------------------------------------------------------------
# Step: a short real training run

FIT_MODULES = ("lightning", "torchmetrics", "jsonargparse", "soundfile", "torchaudio", "matplotlib", "sklearn",
               "yaml", "tensorboard")
TEST_LINE = re.compile(r"^\s*test: WA ([\d.]+) %, UA ([\d.]+) %, F1 ([\d.]+) %", re.MULTILINE)


def fit_commands(ctx: Context) -> list[Command]:
    argv = (ctx.python, "-m", "ser_lightning", "fit", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
            "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar",
            "false", "--data.synthetic_actors", "10", "--data.cache_dir", str(ctx.scratch / "fit_cache"),
            "--trainer.default_root_dir", str(ctx.scratch / "fit_runs"))
    return [Command("fit", argv, 50.0 if ctx.mode == "full" else 25.0)]


def summarise_fit(ctx: Context, results: list[CommandResult]) -> Outcome:
    (result,) = results
    output = result.output
    data = {"wall_s": result.seconds, "gpu_used": bool(re.search(r"GPU available: True.*used: True", output)),
            "bf16_mixed": "bfloat16 Automatic Mixed Precision" in output}
    match = TEST_LINE.search(output)
    if result.status != "passed" or match is None:
        return Outcome(status_of(results, failed=match is None), tail(output), data)
    data.update(zip(("test_wa", "test_ua", "test_f1"), map(float, match.groups())))
    if not data["gpu_used"]:
        return Outcome("failed", "the run finished, but Lightning did not report using the GPU", data)
    numbers = [Number("fit", ctx.device, "fit wall time (3 epochs, bf16-mixed, 10 synthetic actors)", result.seconds,
                      "s")]
    numbers += [Number("fit", ctx.device, f"fit test {name}", data[f"test_{name.lower()}"], "%")
                for name in ("WA", "UA", "F1")]
    detail = (f"wall {result.seconds:.0f} s; test WA {data['test_wa']} %, UA {data['test_ua']} %, "
              f"F1 {data['test_f1']} %" + ("" if data["bf16_mixed"] else "; bf16-mixed not confirmed in the log"))
    return Outcome("passed", detail, data, numbers)


STEPS = [
    StepSpec("environment", "GPU, driver, torch, CUDA, the extension, whether its kernels run here",
             environment_commands, summarise_environment, modules=("torch",)),
    StepSpec("tests", "pytest -m cuda tests/test_ops.py", tests_commands, summarise_tests, gpu_ready,
             ("pytest", "numpy")),
    StepSpec("sanitizer", "compute-sanitizer on a small workload, caching allocator off", sanitizer_commands,
             summarise_sanitizer, sanitizer_precondition, parallel=True),
    StepSpec("bench_attention", "bench_attention.py --device cuda: times, speed-ups, GB/s vs peak",
             bench_attention_commands, summarise_bench_attention, gpu_ready, ("numpy",)),
    StepSpec("bench_train", "bench_train.py --device cuda: fused vs reference training steps",
             bench_train_commands, summarise_bench_train, gpu_ready, ("numpy",)),
    StepSpec("fit", "python -m ser_lightning fit on the GPU, bf16-mixed", fit_commands, summarise_fit, gpu_ready,
             FIT_MODULES),
]


# --------------------------------------------------------------------------------------------
# Report

def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(scale * value, spec)


def summary_markdown(report: Report) -> str:
    env = report.environment
    gpus = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)"
                     for g in env.get("gpus", [])) or "none"
    lines = ["# GPU check of the fused attention kernels", "",
             f"- mode: {report.mode}; step limits sum to {report.limits_sum_s:.0f} s, budget {report.budget_s:.0f} s; "
             f"total {report.total_s:.0f} s" + ("; interrupted" if report.interrupted else ""),
             f"- GPU: {gpus}; driver {env.get('driver') or '-'}"]
    if env:
        lines += [f"- torch {env['torch']}, CUDA (torch) {env['torch_cuda'] or '-'}, cuDNN {env['cudnn'] or '-'}, "
                  f"Python {env['python']}; nvcc {env['nvcc'] or '-'}, "
                  f"compute-sanitizer {env['compute_sanitizer'] or '-'}",
                  f"- extension: {env['extension']}; CUDA kernels: {'yes' if env['extension_cuda_kernels'] else 'no'}, "
                  f"run on this GPU: {env['kernels_run'] or '-'}; float32 matmul precision "
                  f"{env['float32_matmul_precision']}"]
    reasons: dict[str, list[str]] = {}
    for s in report.not_run:
        reasons.setdefault(s.detail, []).append(s.name)
    timed_out = [s.name for s in report.steps if s.status == "timed out"]
    lines.append("- did not run: " + ("; ".join(f"{', '.join(names)} ({reason})" for reason, names in reasons.items())
                                      or "none") + ("; timed out: " + ", ".join(timed_out) if timed_out else ""))
    lines += ["", "| step | status | limit | time | result |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {f'{s.limit_s:.0f} s' if s.limit_s else '-'} | {s.seconds:.0f} s | "
              f"{s.detail} |" for s in report.steps]
    for s in report.steps:
        lines += step_tables(s, report.device)
    lines += ["", "Each command's output: logs/; every result and a flat list of the numbers (step, device, metric, "
                  "value, unit): gpu_check.json."]
    return "\n".join(lines) + "\n"


def step_tables(step: StepResult, device: str) -> list[str]:
    """The tables of one step's numbers, each headed by the step and the device that measured them."""
    lines: list[str] = []
    if step.name == "sanitizer" and step.data:
        lines += ["", f"## sanitizer on {device}", "", "| tool | status | verdict | errors counted | seconds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {tool} | {v['status']} | {v['verdict']} | {fmt(v['errors_counted'], 'd')} | "
                  f"{v['seconds']:.0f} |" for tool, v in step.data.items()]
    if step.name == "bench_attention":
        for dtype, run in step.data.items():
            if "shapes" not in run:
                continue
            lines += ["", f"## bench_attention, {dtype}, on {run['device']} (forward+backward; peak "
                          f"{fmt(run['peak_bandwidth_gbs'], '.0f')} GB/s)", "",
                      "| shape | contender | ms | x eager | x compiled | GB/s | % of peak |",
                      "|---|---|---|---|---|---|---|"]
            for shape, contenders in run["shapes"].items():
                for label, e in contenders.items():
                    lines.append(f"| {shape} | {label} | {fmt(e['forward_backward_s'], '.3f', 1e3)} | "
                                 f"{fmt(e['forward_backward_x_eager'], '.2f')} | "
                                 f"{fmt(e['forward_backward_x_compiled'], '.2f')} | "
                                 f"{fmt(e['forward_backward_gbs'], '.0f')} | "
                                 f"{fmt(e['forward_backward_peak_fraction'], '.1f', 100)} |")
            verdict = {True: "PASS", False: "FAIL", None: "N/A"}
            lines += [""] + [f"- [{verdict[g['passed']]}] {g['goal']}: {fmt(g['value'], '.2f')}"
                             for g in run["goals"]]
    if step.name == "bench_train":
        for precision, run in step.data.items():
            if "models" not in run:
                continue
            lines += ["", f"## bench_train, precision {precision}, on {run['device']}", "",
                      "| model | fused step ms | reference step ms | fused / reference throughput |",
                      "|---|---|---|---|"]
            lines += [f"| {arch} | {fmt(m.get('fused_step_ms'), '.1f')} | {fmt(m.get('reference_step_ms'), '.1f')} | "
                      f"{fmt(m['throughput_ratio'], '.2f')} |" for arch, m in run["models"].items()]
    if step.name == "fit" and "test_ua" in step.data:
        d = step.data
        lines += ["", f"## fit on {device} (bf16-mixed, 3 epochs, 10 synthetic actors)", "",
                  "| wall s | test WA % | test UA % | test F1 % |", "|---|---|---|---|",
                  f"| {d['wall_s']:.0f} | {d['test_wa']} | {d['test_ua']} | {d['test_f1']} |"]
    return lines


def write_report(report: Report, out: Path) -> None:
    (out / "summary.md").write_text(summary_markdown(report))
    (out / "gpu_check.json").write_text(json.dumps(report.to_json(), indent=2))


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the check the way Ctrl-C does: groups ended, report written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for summary.md, gpu_check.json and logs/ (required)")
    parser.add_argument("--quick", action="store_true", help="a first look, under 120 s (fewer tests and shapes, "
                                                             "memcheck only, no training benchmark)")
    parser.add_argument("--skip", nargs="+", choices=[s.name for s in STEPS], default=[], help="steps to leave out")
    parser.add_argument("--budget-s", type=float,
                        help="wall-clock budget in seconds (default: the sum of the step limits); a step starts "
                             "only if the budget still holds its limit")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sanitizer-workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_environment(args.probe)
        return
    if args.sanitizer_workload:
        sanitizer_workload()
        return
    if args.out is None:
        parser.error("--out DIR is required")
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    out = args.out.resolve()  # the steps run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, interrupt)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        ctx = Context(out=out, mode="quick" if args.quick else "full", scratch=Path(scratch))
        report = run_check(STEPS, ctx, args.budget_s, tuple(args.skip))
    write_report(report, out)
    print(f"wrote {out / 'summary.md'} and {out / 'gpu_check.json'} ({report.total_s:.0f} s)")
    sys.exit(130 if report.interrupted else (0 if report.ok else 1))


if __name__ == "__main__":
    main()
