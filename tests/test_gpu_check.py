"""benchmarks/gpu_check.py end to end with the GPU hidden: the report is complete and every GPU step
says why it was skipped (on a GPU machine the real run is `python benchmarks/gpu_check.py --out DIR`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["tests", "sanitizer", "bench_attention", "bench_train", "fit"]


def test_gpu_check_without_a_gpu_skips_the_gpu_steps_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine: this test runs the CPU path
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    environment = report["environment"]
    assert environment["torch"] and environment["cuda_available"] is False and environment["gpus"] == []
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] == "skipped", step
        assert step["detail"] == "skipped: no CUDA device (torch.cuda.is_available() is False)"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check of the fused attention kernels")
    assert f"- torch {environment['torch']}" in summary
    for name in STEPS:
        assert f"| {name} | skipped | 0 s | skipped: no CUDA device" in summary


def test_gpu_check_requires_an_output_directory():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr
