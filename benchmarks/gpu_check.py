"""One command for a machine with a GPU: the checks of the fused CUDA kernels, in one report.

    python benchmarks/gpu_check.py --out gpu-report/

Steps, in order, each with its own time limit; the whole run stays within --budget-s (default 465 s,
under 8 minutes on an H100/H200): a command still running then is stopped and reported as timed out,
and later steps are skipped.

1. environment: GPU, driver, torch and CUDA versions (torch's and nvcc's), the extension's kernels;
2. the CUDA tests: pytest -m cuda tests/test_ops.py;
3. compute-sanitizer memcheck, racecheck, synccheck and initcheck, run side by side on a small
   workload (this script with --sanitizer-workload: narrow and wide shapes, waves that split
   utterances, bfloat16, the tanh op); skipped with a note when compute-sanitizer is absent;
4. benchmarks/bench_attention.py --device cuda, all shapes, float32 (with torch.compile) and
   bfloat16: times, speed-ups and achieved GB/s against the device's peak bandwidth;
5. benchmarks/bench_train.py --device cuda: fused vs reference attention, both models, precision 32
   and bf16-mixed;
6. a short real training run on the GPU (python -m ser_lightning fit, bf16-mixed, 3 epochs): its
   wall time and the test UA line it prints.

Everything goes into --out: summary.md (the report), gpu_check.json (all parsed results) and logs/
(each step's full output). Subprocesses run this interpreter (sys.executable) from the repository
root. Without a GPU the GPU steps are skipped, each saying why, and the run takes seconds
(tests/test_gpu_check.py runs it that way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
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
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
STEPS = ("tests", "sanitizer", "bench_attention", "bench_train", "fit")
# Wall-clock limit of each command (seconds).
LIMITS = {"tests": 180, "sanitizer": 150, "bench_attention_float32": 150, "bench_attention_bfloat16": 75,
          "bench_train": 60, "fit": 150}


@dataclass
class Step:
    name: str
    status: str = "skipped"  # passed | failed | skipped | timed out
    seconds: float = 0.0
    detail: str = ""
    commands: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs commands from the repository root with this interpreter, keeping their output in out/logs;
    no command runs past the deadline (time.perf_counter() value)."""

    def __init__(self, out: Path, deadline: float = float("inf")) -> None:
        self.out = out
        self.deadline = deadline
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def start(self, step: Step, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path, float]:
        log = self.out / "logs" / f"{name}.log"
        step.commands.append(" ".join(cmd))
        step.logs.append(str(log.relative_to(self.out)))
        handle = log.open("w")
        handle.write("$ " + " ".join(cmd) + "\n\n")
        handle.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, text=True)
        return proc, log, time.perf_counter()

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def finish(self, proc: subprocess.Popen, log: Path, started: float, timeout: float) -> tuple[int | None, str, float]:
        """(return code, None if timed out; the output; seconds)."""
        try:
            code: int | None = proc.wait(timeout=max(1.0, min(timeout, self.remaining())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        return code, log.read_text(errors="replace"), time.perf_counter() - started

    def run(self, step: Step, name: str, cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
        return self.finish(*self.start(step, name, cmd), timeout)


def status_of(code: int | None) -> str:
    return "timed out" if code is None else ("passed" if code == 0 else "failed")


def overall(statuses: list[str]) -> str:
    if all(status == "passed" for status in statuses):
        return "passed"
    return "timed out" if "timed out" in statuses else "failed"


def run_variants(runner: Runner, step: Step, variants: dict[str, tuple[list[str], float]],
                 parse: Callable[[dict[str, Any]], dict[str, Any]]) -> Step:
    """One command per variant (command, time limit), each given `--json out/<step>_<variant>.json`;
    the parsed JSON of each goes to step.data[variant]."""
    for key, (cmd, limit) in variants.items():
        out = runner.out / f"{step.name}_{key}.json"
        code, output, seconds = runner.run(step, f"{step.name}_{key}", [*cmd, "--json", str(out)], limit)
        step.seconds += seconds
        step.data[key] = {"status": status_of(code), "seconds": round(seconds, 1)}
        if code == 0 and out.exists():
            step.data[key].update(parse(json.loads(out.read_text())))
        else:
            step.data[key]["error"] = tail(output)
    step.status = overall([r["status"] for r in step.data.values()])
    step.detail = ", ".join(f"{key} {r['status']}" for key, r in step.data.items())
    return step


def tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Steps

def environment() -> dict[str, Any]:
    import torch

    from ser_lightning.ops import cpu_capability, fused, fused_available

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "extension": fused.LOAD_ERROR or "loaded",
        "extension_cuda_kernels": fused.has_kernel("cuda"),
        "cpu_capability": cpu_capability(),
        "nvcc": None,
        "driver": None,
        "gpus": [],
    }
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if nvcc and Path(nvcc).exists():
        match = re.search(r"release ([\d.]+)", subprocess.run([str(nvcc), "--version"], capture_output=True,
                                                               text=True).stdout)
        env["nvcc"] = match.group(1) if match else None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        env["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
    if torch.cuda.is_available():
        env["fused_available_cuda"] = fused_available("cuda")
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            env["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(props.total_memory / 2**30, 1)})
    return env


def step_tests(runner: Runner) -> Step:
    step = Step("tests")
    junit = runner.out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_ops.py", "-q", "--noconftest",
           "-p", "no:cacheprovider", f"--junitxml={junit}"]
    code, output, step.seconds = runner.run(step, "tests", cmd, LIMITS["tests"])
    step.status = status_of(code)
    if junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        step.data = counts
        failed = [case.get("name") for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        step.data["failed"] = failed
        step.detail = (f"{counts['tests'] - counts['skipped'] - counts['failures'] - counts['errors']} passed, "
                       f"{counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
                       + (f": {', '.join(failed[:8])}" if failed else ""))
    else:
        step.detail = tail(output)
    return step


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "compute-sanitizer").exists():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


def step_sanitizer(runner: Runner) -> Step:
    step = Step("sanitizer")
    tool = find_sanitizer()
    if tool is None:
        step.detail = "skipped: compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
        return step
    started = time.perf_counter()
    procs = {}
    for name in SANITIZER_TOOLS:  # side by side: each is slow alone, the workload is small
        extra = ["--leak-check", "full"] if name == "memcheck" else []
        cmd = [tool, "--tool", name, "--error-exitcode", "99", "--print-limit", "20", *extra,
               sys.executable, str(Path(__file__).resolve()), "--sanitizer-workload"]
        procs[name] = runner.start(step, f"sanitizer_{name}", cmd)
    results = {}
    for name, (proc, log, t0) in procs.items():
        remaining = LIMITS["sanitizer"] - (time.perf_counter() - started)
        code, output, seconds = runner.finish(proc, log, t0, remaining)
        errors = [int(n) for n in re.findall(r"SUMMARY:.*?(\d+) errors?", output)]
        workload_ok = "WORKLOAD OK" in output
        results[name] = {"status": status_of(code) if workload_ok or code is None else "failed",
                         "errors": sum(errors) if errors else None, "seconds": round(seconds, 1)}
    step.seconds = time.perf_counter() - started
    step.data = results
    step.status = overall([r["status"] for r in results.values()])
    step.detail = ", ".join(f"{name} {r['status']} ({r['errors'] if r['errors'] is not None else '?'} errors)"
                            for name, r in results.items())
    return step


def parse_bench_attention(payload: dict[str, Any]) -> dict[str, Any]:
    run = payload["runs"][0]
    keys = ("forward_s", "forward_backward_s", "forward_backward_x_eager", "forward_backward_x_compiled",
            "forward_backward_gbs", "forward_backward_peak_fraction", "memory_bytes", "max_abs_diff_vs_eager")
    shapes = {r["shape"]: {label: {key: e.get(key) for key in keys} for label, e in r["contenders"].items()}
              for r in run["results"]}
    return {"peak_bandwidth_gbs": run["peak_bandwidth_gbs"], "shapes": shapes, "goals": run["goals"]}


def step_bench_attention(runner: Runner) -> Step:
    command = [sys.executable, "benchmarks/bench_attention.py", "--device", "cuda", "--repeats", "40", "--rounds", "4"]
    variants = {"float32": ([*command, "--dtype", "float32"], LIMITS["bench_attention_float32"]),
                "bfloat16": ([*command, "--dtype", "bfloat16", "--no-compile"], LIMITS["bench_attention_bfloat16"])}
    return run_variants(runner, Step("bench_attention"), variants, parse_bench_attention)


def parse_bench_train(payload: dict[str, Any]) -> dict[str, Any]:
    models = {}
    for r in payload["results"]:
        models[r["arch"]] = {"throughput_ratio": r["throughput_ratio"]}
        for backend, e in r["backends"].items():
            models[r["arch"]].update({f"{backend}_step_ms": 1e3 * e["step_s"],
                                      f"{backend}_utterances_per_s": e["utterances_per_s"]})
    return {"models": models}


def step_bench_train(runner: Runner) -> Step:
    command = [sys.executable, "benchmarks/bench_train.py", "--device", "cuda", "--repeats", "30", "--rounds", "3"]
    variants = {precision: ([*command, "--precision", precision], LIMITS["bench_train"])
                for precision in ("32", "bf16-mixed")}
    return run_variants(runner, Step("bench_train"), variants, parse_bench_train)


def step_fit(runner: Runner) -> Step:
    step = Step("fit")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ser_lightning", "fit", "--trainer.accelerator", "gpu",
               "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "3", "--data.cache_dir", f"{tmp}/cache",
               "--trainer.default_root_dir", f"{tmp}/runs"]
        code, output, step.seconds = runner.run(step, "fit", cmd, LIMITS["fit"])
    step.status = status_of(code)
    ua_lines = [line.strip() for line in output.splitlines() if re.search(r"\btest\b.*\bUA\b", line)]
    step.data = {"wall_s": round(step.seconds, 1), "test_ua_line": ua_lines[-1] if ua_lines else None}
    step.detail = (f"wall {step.seconds:.0f} s; " + (ua_lines[-1] if ua_lines else "no test UA line printed")
                   if code == 0 else tail(output))
    return step


STEP_FUNCTIONS = {"tests": step_tests, "sanitizer": step_sanitizer, "bench_attention": step_bench_attention,
                  "bench_train": step_bench_train, "fit": step_fit}


# --------------------------------------------------------------------------------------------
# The workload under compute-sanitizer

def sanitizer_workload() -> None:
    """Forward and backward of the fused CUDA kernels on small inputs reaching every code path."""
    import torch

    from ser_lightning.ops import attention_pool, fused

    g = torch.Generator().manual_seed(0)
    cases = [  # (B, L, C, D), dtype, wave budget (0 = default)
        ((3, 70, 30, 30), torch.float32, 0),
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
# Report

def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(scale * value, spec)


def summary_markdown(env: dict[str, Any], steps: list[Step], total_s: float) -> str:
    gpus = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in env["gpus"]) or "none"
    lines = ["# GPU check of the fused attention kernels", "",
             f"- GPU: {gpus}", f"- driver: {env['driver'] or '-'}",
             f"- torch {env['torch']}, CUDA (torch) {env['torch_cuda'] or '-'}, nvcc {env['nvcc'] or '-'}, "
             f"cuDNN {env['cudnn'] or '-'}, Python {env['python']}",
             f"- extension: {env['extension']}; CUDA kernels: {'yes' if env['extension_cuda_kernels'] else 'no'}; "
             f"CPU path: {env['cpu_capability'] or '-'}",
             f"- total time: {total_s:.0f} s", "",
             "| step | status | time | result |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} s | {s.detail} |" for s in steps]
    for s in steps:
        if s.name == "bench_attention":
            for dtype, run in s.data.items():
                if "shapes" not in run:
                    continue
                lines += ["", f"## bench_attention, {dtype} (forward+backward; peak {run['peak_bandwidth_gbs']} GB/s)", "",
                          "| shape | contender | ms | x eager | x compiled | GB/s | % of peak |", "|---|---|---|---|---|---|---|"]
                for shape, contenders in run["shapes"].items():
                    for label, e in contenders.items():
                        lines.append(f"| {shape} | {label} | {fmt(e['forward_backward_s'], '.3f', 1e3)} | "
                                     f"{fmt(e['forward_backward_x_eager'], '.2f')} | "
                                     f"{fmt(e['forward_backward_x_compiled'], '.2f')} | {fmt(e['forward_backward_gbs'], '.0f')} | "
                                     f"{fmt(e['forward_backward_peak_fraction'], '.1f', 100)} |")
                verdict = {True: "PASS", False: "FAIL", None: "N/A"}
                lines += [""] + [f"- [{verdict[g['passed']]}] {g['goal']}: {fmt(g['value'], '.2f')}"
                                 for g in run.get("goals", [])]
        if s.name == "bench_train":
            for precision, run in s.data.items():
                if "models" not in run:
                    continue
                lines += ["", f"## bench_train, precision {precision}", "",
                          "| model | fused step ms | reference step ms | fused / reference throughput |", "|---|---|---|---|"]
                for arch, m in run["models"].items():
                    lines.append(f"| {arch} | {fmt(m.get('fused_step_ms'), '.1f')} | {fmt(m.get('reference_step_ms'), '.1f')} | "
                                 f"{fmt(m['throughput_ratio'], '.2f')} |")
    lines += ["", "Full outputs: logs/; all parsed numbers: gpu_check.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory for summary.md, gpu_check.json and logs/ (required)")
    parser.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="steps to leave out")
    parser.add_argument("--budget-s", type=float, default=465.0,
                        help="wall-clock budget of the whole check in seconds (default 465): commands stop at it, "
                             "later steps are skipped")
    parser.add_argument("--sanitizer-workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sanitizer_workload:
        sanitizer_workload()
        return
    if args.out is None:
        parser.error("--out DIR is required")
    args.out = args.out.resolve()  # the steps run from the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = environment()
    print(f"GPU check: torch {env['torch']}, CUDA {env['torch_cuda']}, GPUs: "
          f"{', '.join(g['name'] for g in env['gpus']) or 'none'}", flush=True)
    runner = Runner(args.out, deadline=started + args.budget_s)
    steps = []
    for name in STEPS:
        if name in args.skip:
            steps.append(Step(name, detail="skipped: --skip"))
        elif runner.remaining() < 15:
            steps.append(Step(name, detail=f"skipped: the time budget ({args.budget_s:.0f} s, --budget-s) is spent"))
        elif not env["cuda_available"]:
            steps.append(Step(name, detail="skipped: no CUDA device (torch.cuda.is_available() is False)"))
        elif not env["extension_cuda_kernels"]:
            steps.append(Step(name, detail="skipped: the extension was built without CUDA kernels "
                                           f"({env['extension']}); rebuild with SER_LIGHTNING_CUDA=1"))
        else:
            print(f"... {name}", flush=True)
            steps.append(STEP_FUNCTIONS[name](runner))
        print(f"{name}: {steps[-1].status} ({steps[-1].detail})", flush=True)
    total = time.perf_counter() - started
    (args.out / "summary.md").write_text(summary_markdown(env, steps, total))
    (args.out / "gpu_check.json").write_text(json.dumps(
        {"environment": env, "total_s": total, "steps": [asdict(s) for s in steps]}, indent=2))
    print(f"wrote {args.out / 'summary.md'} and {args.out / 'gpu_check.json'} ({total:.0f} s)")


if __name__ == "__main__":
    main()
