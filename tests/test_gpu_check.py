"""benchmarks/gpu_check.py: its plan fits the few minutes a GPU is at hand, it runs end to end without a GPU
(every GPU step skipped with its reason), its process groups and budget hold against steps that overrun or leave
processes behind, and its report names the step and device of every number."""

import importlib.util
import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = ["environment", "tests", "sanitizer", "bench_attention", "bench_train", "fit"]
GPU_STEPS = STEPS[1:]
NO_GPU = "skipped: no CUDA device (torch.cuda.is_available() is False)"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = load_gpu_check()


def context(tmp_path: Path, mode: str = "full", environment: dict | None = None):
    (tmp_path / "scratch").mkdir(exist_ok=True)
    return gc.Context(out=tmp_path, mode=mode, scratch=tmp_path / "scratch", environment=environment or {})


@pytest.mark.parametrize("mode,bound,within", [("full", 300.0, operator.le), ("quick", 120.0, operator.lt)])
def test_plan_fits_the_time_budget(tmp_path, mode, bound, within):
    """The full check's step limits sum to at most 300 s, the quick one's to under 120 s."""
    ctx = context(tmp_path, mode)
    limits = {spec.name: spec.limit_s(spec.commands(ctx)) for spec in gc.STEPS}
    assert list(limits) == STEPS
    assert within(sum(limits.values()), bound), limits
    assert all(limit > 0 for name, limit in limits.items() if mode == "full" or name != "bench_train")


def test_check_without_a_gpu_skips_the_gpu_steps_with_reasons_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine: this test runs the CPU path
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("GPU check, full mode: the step limits sum to 300 s; budget 300 s")
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["format"] == 1 and report["mode"] == "full" and report["limits_sum_s"] == 300
    assert report["device"] == "no CUDA device" and report["numbers"] == [] and not report["interrupted"]
    environment = report["environment"]
    assert environment["torch"] and environment["cuda_available"] is False and environment["gpus"] == []
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    assert steps["environment"]["status"] == "passed" and steps["environment"]["commands"][0]["returncode"] == 0
    assert 0 < steps["environment"]["seconds"] <= steps["environment"]["limit_s"]
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped" and steps[name]["detail"] == NO_GPU, steps[name]
        assert steps[name]["limit_s"] > 0 and steps[name]["commands"] == []
    assert report["not_run"] == [{"step": name, "reason": NO_GPU} for name in GPU_STEPS]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check of the fused attention kernels")
    assert "- mode: full; step limits sum to 300 s, budget 300 s" in summary
    assert f"- torch {environment['torch']}" in summary
    assert f"- did not run: {', '.join(GPU_STEPS)} ({NO_GPU})" in summary
    assert "| environment | passed | 15 s |" in summary
    for name in GPU_STEPS:
        assert f"| {name} | skipped | {steps[name]['limit_s']:.0f} s | 0 s | {NO_GPU} |" in summary
    assert (out / "logs" / "environment.log").read_text().startswith("$ ")


def test_check_requires_an_output_directory():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr


# --------------------------------------------------------------------------------------------
# Process groups and the budget, with fake steps

# A step process that starts a child (which ignores SIGTERM), writes the child's pid, then `TAIL`.
WITH_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(0.2)  # the child is running (and ignoring SIGTERM) by now
TAIL
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def summarise_by_status(ctx, results):
    return gc.Outcome(gc.status_of(results), gc.tail(results[0].output))


def fake_step(name: str, code: str, limit_s: float, *args: str, modules: tuple[str, ...] = ()):
    command = gc.Command(name, (sys.executable, "-c", code, *args), limit_s)
    return gc.StepSpec(name, f"fake step {name}", lambda ctx: [command], summarise_by_status, modules=modules)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_steps_past_their_limit_or_leaving_processes_are_ended_and_the_budget_holds(tmp_path):
    """A step that sleeps past its limit is ended with its whole group (its child ignores SIGTERM and
    needs SIGKILL); a step that exits leaving a child running gets the child ended; the next step still
    runs; a step the remaining budget cannot hold is skipped for lack of time, and the whole check stays
    within the budget."""
    slow_pid, orphan_pid = tmp_path / "slow.pid", tmp_path / "orphan.pid"
    specs = [fake_step("slow", WITH_CHILD.replace("TAIL", "time.sleep(60)"), 1.5, str(slow_pid)),
             fake_step("orphan", WITH_CHILD.replace("TAIL", "print('leaving')"), 1.5, str(orphan_pid)),
             fake_step("next", "print('next ran')", 1.5),
             fake_step("late", "print('late ran')", 6.0)]
    lines = []
    started = time.monotonic()
    report = gc.run_check(specs, context(tmp_path), budget_s=6.0, grace_s=0.5, say=lines.append)
    elapsed = time.monotonic() - started
    steps = {s.name: s for s in report.steps}
    assert steps["slow"].status == "timed out" and steps["slow"].commands[0]["returncode"] is None
    assert steps["slow"].seconds <= 1.5 + 0.5  # SIGKILL at the limit, then a few polls
    assert steps["orphan"].status == "passed"
    assert steps["orphan"].detail.endswith("; ended 1 process(es) it left running")
    assert steps["next"].status == "passed" and "next ran" in (tmp_path / "logs" / "next.log").read_text()
    assert steps["late"].status == "skipped" and steps["late"].detail.startswith("skipped: no time left (")
    assert not (tmp_path / "logs" / "late.log").exists()
    for pid_file in (slow_pid, orphan_pid):
        assert not alive(int(pid_file.read_text())), f"{pid_file.stem}'s child still runs"
    assert report.total_s <= 6.0 and elapsed <= 6.0
    assert lines[0] == "GPU check, full mode: the step limits sum to 10 s; budget 6 s"
    assert not report.ok and [s.name for s in report.not_run] == ["late"]


def test_missing_python_packages_skip_the_step_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    spec = fake_step("needs", f"open({str(marker)!r}, 'w')", 5.0,
                     modules=("json", "no_such_module_x", "yaml_no_x"))
    report = gc.run_check([spec], context(tmp_path), say=lambda line: None)
    (step,) = report.steps
    assert step.status == "skipped" and step.detail == (
        "skipped: missing Python packages: no_such_module_x, yaml_no_x (pip install no_such_module_x yaml_no_x)")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Reading the steps' results

BANNER = "========= COMPUTE-SANITIZER\n"
PROJECT_ERROR = """========= Invalid __global__ write of size 4 bytes
=========     at void ser_lightning::(anonymous namespace)::backward_tile_kernel<float>(...)+0x1f0 in x.cu:371
=========     by thread (3,0,0) in block (0,0,0)
=========     Address 0x7f0000000100 is out of bounds
"""
LIBRARY_ERROR = """========= Uninitialized __global__ memory read of size 4 bytes
=========     at sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32+0x2a0
=========     by thread (0,0,0) in block (0,0,0)
"""
API_ERROR = """========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to cuX.
=========     Saved host backtrace up to driver entry point at error
"""


@pytest.mark.parametrize("outputs,status,verdict", [
    ([BANNER + "WORKLOAD OK\n========= ERROR SUMMARY: 0 errors\n"], "passed", "no kernel errors"),
    ([BANNER + API_ERROR + "WORKLOAD OK\n========= ERROR SUMMARY: 1 error\n"], "passed",
     "no kernel errors (1 CUDA API error report(s), see the log)"),
    ([BANNER + PROJECT_ERROR + "WORKLOAD OK\n========= ERROR SUMMARY: 1 error\n"], "failed",
     "1 kernel error report(s) shown: 1 in the project's kernels, 0 in others"),
    ([BANNER + LIBRARY_ERROR + "WORKLOAD OK\n========= ERROR SUMMARY: 1 error\n"], "failed",
     "1 kernel error report(s) shown: 0 in the project's kernels, 1 in others"),
    ([BANNER + "WORKLOAD OK\n========= ERROR SUMMARY: 2 errors\n"], "failed",
     "2 error(s) counted, 0 shown as CUDA API reports: see the log"),
    ([BANNER + "Traceback (most recent call last):\nRuntimeError: CUDA error\n========= ERROR SUMMARY: 0 errors\n"],
     "failed", "the workload did not complete: "),
], ids=["clean", "api-only", "project-kernel", "library-kernel", "unattributed", "workload-failed"])
def test_sanitizer_verdict_counts_kernel_errors_by_kernel(tmp_path, outputs, status, verdict):
    results = [gc.CommandResult("sanitizer_memcheck", "compute-sanitizer ...", "logs/x.log", 50.0, 9.0,
                                0 if "ERROR SUMMARY: 0" in text else 99, 0, text) for text in outputs]
    outcome = gc.summarise_sanitizer(context(tmp_path, environment=GPU_ENVIRONMENT), results)
    assert outcome.status == status == outcome.data["memcheck"]["status"], outcome
    assert outcome.data["memcheck"]["verdict"].startswith(verdict), outcome
    assert outcome.detail.startswith(f"memcheck: {verdict}")


GPU_ENVIRONMENT = {"gpus": [{"name": "Test GPU", "capability": "9.0", "memory_gib": 79.1}], "cuda_available": True,
                   "extension_cuda_kernels": True, "kernels_run": "yes", "torch": "2.11.0", "torch_cuda": "13.0",
                   "cudnn": None, "python": "3.11", "nvcc": None, "compute_sanitizer": None, "driver": "1.0",
                   "extension": "loaded", "float32_matmul_precision": "highest"}


def test_report_names_the_step_and_device_of_every_number(tmp_path):
    """Benchmark JSON and a fit log read into numbers that carry step and device; the Markdown puts each
    table under a heading naming both."""
    ctx = context(tmp_path, environment=GPU_ENVIRONMENT)
    contender = {"forward_backward_s": 2e-3, "forward_backward_x_eager": 3.0, "forward_backward_x_compiled": None,
                 "forward_backward_gbs": 900.0, "forward_backward_peak_fraction": 0.3}
    (tmp_path / "bench_attention_float32.json").write_text(json.dumps({"runs": [{
        "environment": {"device_name": "Test GPU"}, "peak_bandwidth_gbs": 3000.0,
        "results": [{"shape": "large", "contenders": {"fused": contender}}],
        "goals": [{"goal": "GPU large: fused forward+backward >= 60 % of peak bandwidth", "value": 30.0,
                   "threshold": 60.0, "comparison": ">=", "passed": False}]}]}))
    (tmp_path / "bench_train_32.json").write_text(json.dumps({
        "environment": {"device_name": "Test GPU"},
        "results": [{"arch": "seed1d", "throughput_ratio": 1.2,
                     "backends": {"reference": {"step_s": 0.012}, "fused": {"step_s": 0.010}}}]}))

    def ran(name: str, output: str = "", seconds: float = 5.0):
        return gc.CommandResult(name, name, f"logs/{name}.log", 50.0, seconds, 0, 0, output)

    fit_log = ("GPU available: True (cuda), used: True\nUsing bfloat16 Automatic Mixed Precision (AMP)\n"
               "validation: WA 60.0 %, UA 55.0 %, F1 50.0 %\n      test: WA 58.9 %, UA 51.6 %, F1 46.1 % | baseline\n")
    outcomes = {"bench_attention": gc.summarise_bench_attention(ctx, [ran("bench_attention_float32")]),
                "bench_train": gc.summarise_bench_train(ctx, [ran("bench_train_32")]),
                "fit": gc.summarise_fit(ctx, [ran("fit", fit_log, 31.0)])}
    assert all(o.status == "passed" for o in outcomes.values()), outcomes
    numbers = [n for o in outcomes.values() for n in o.numbers]
    assert {n.step for n in numbers} == set(outcomes) and {n.device for n in numbers} == {"Test GPU"}
    assert gc.Number("bench_attention", "Test GPU", "float32 large fused share of peak bandwidth", 30.0, "%") in numbers
    assert gc.Number("bench_train", "Test GPU", "precision 32 seed1d fused / reference throughput", 1.2, "x") in numbers
    assert gc.Number("fit", "Test GPU", "fit test UA", 51.6, "%") in numbers
    report = gc.Report(mode="full", budget_s=300.0, limits_s=dict.fromkeys(outcomes, 50.0), total_s=40.0,
                       environment=GPU_ENVIRONMENT, device="Test GPU", numbers=numbers,
                       steps=[gc.StepResult(name, o.status, 50.0, 10.0, o.detail, [], o.data)
                              for name, o in outcomes.items()])
    summary = gc.summary_markdown(report)
    for heading in ("## bench_attention, float32, on Test GPU (forward+backward; peak 3000 GB/s)",
                    "## bench_train, precision 32, on Test GPU", "## fit on Test GPU (bf16-mixed"):
        assert heading in summary
    assert "| large | fused | 2.000 | 3.00 | - | 900 | 30.0 |" in summary and "- did not run: none" in summary
    assert json.loads(json.dumps(report.to_json()))["numbers"][0]["device"] == "Test GPU"
