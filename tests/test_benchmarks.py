"""Smoke tests of the benchmark scripts: each runs with --quick (in this process) and writes JSON of the documented structure.

They check structure and sanity (positive times, finite ratios), never speed: speed depends on the machine.
"""

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_in_process(name: str, tmp_path: Path, monkeypatch, capsys, *args: str) -> tuple[dict, str]:
    """Run benchmarks/<name> with --quick --json in this process (torch is imported already: seconds saved) and
    return (the JSON, stdout); the torch thread count is restored."""
    out = tmp_path / f"{name}.json"
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name, "--quick", "--json", str(out), *args])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text()), capsys.readouterr().out


def check_environment(env: dict) -> None:
    assert env["device"] in ("cpu", "cuda")
    assert env["device_name"] and env["torch"]
    assert env["threads"] >= 1


def check_goals(goals: list[dict], expected: int) -> None:
    assert len(goals) == expected
    for g in goals:
        assert set(g) == {"goal", "value", "threshold", "comparison", "passed"}
        if g["value"] is None:
            assert g["passed"] is None
        else:
            assert isinstance(g["passed"], bool) and math.isfinite(g["value"])


@pytest.mark.slow
def test_bench_attention_quick(tmp_path, monkeypatch, capsys):
    """Without the torch.compile contender (a cold compile costs more than the rest; tests/test_ops.py compiles the
    operator), whose goals then read "not measured"."""
    data, stdout = run_in_process("bench_attention.py", tmp_path, monkeypatch, capsys, "--device", "cpu", "--no-compile")
    assert data["benchmark"] == "attention" and data["quick"] is True
    (run,) = data["runs"]
    check_environment(run["environment"])
    assert "saved for backward" in run["memory_measure"]
    assert [r["shape"] for r in run["results"]] == ["seed1d", "logmel-1d"]
    assert run["skipped"]["compiled"] == "--no-compile"
    for r in run["results"]:
        expected = {"eager", "fused"} - set(run["skipped"])
        assert set(r["contenders"]) == expected and "eager" in expected
        assert 1 <= r["lengths_mean"] <= r["L"]
        for label, e in r["contenders"].items():
            assert e["forward_s"] > 0 and e["forward_backward_s"] > 0 and e["memory_bytes"] > 0
            assert e["max_abs_diff_vs_eager"] < 1e-3, f"{label} disagrees with eager at {r['shape']}"
            assert math.isclose(e["forward_backward_x_eager"],
                                r["contenders"]["eager"]["forward_backward_s"] / e["forward_backward_s"])
            assert e["forward_backward_x_compiled"] is None
        assert r["contenders"]["eager"]["forward_x_eager"] == 1.0
    check_goals(run["goals"], 4)  # >= 3x eager at both quick shapes, >= 1x compiled not measured
    assert [g["value"] is None for g in run["goals"]] == [False, False, True, True] or "fused" in run["skipped"]
    assert "goals:" in stdout and "memory = bytes kept beyond the inputs" in stdout
    if "fused" in run["skipped"]:
        assert "fused: unavailable (" in stdout


@pytest.mark.slow
def test_bench_fit_quick(tmp_path, monkeypatch, capsys):
    data, stdout = run_in_process("bench_fit.py", tmp_path, monkeypatch, capsys, "--threads", "1")
    assert data["benchmark"] == "fit" and data["cv"] is None
    check_environment(data["environment"])
    demo = data["demo"]
    assert demo["epochs"] == 3 and demo["batches_per_epoch"] >= 1
    assert len(demo["epoch_wall_all_s"]) == len(demo["epoch_work_all_s"]) == 2  # epochs 0 and 1, each with its pair
    paired = [wall / work for wall, work in zip(demo["epoch_wall_all_s"][1:], demo["epoch_work_all_s"][1:])]
    assert demo["wall_x_work"] == pytest.approx(paired[0]) and demo["ratio_range"] == pytest.approx([paired[0]] * 2)
    assert 0 < demo["epoch_work_s"] and 0 < demo["epoch_wall_s"] < demo["fit_s"]
    check_goals(data["goals"], 1)
    assert "paired epoch by epoch" in stdout


@pytest.mark.slow
def test_bench_train_quick(tmp_path, monkeypatch, capsys):
    data, stdout = run_in_process("bench_train.py", tmp_path, monkeypatch, capsys, "--batch-size", "4", "--frames", "120")
    assert data["benchmark"] == "train"
    check_environment(data["environment"])
    assert [r["arch"] for r in data["results"]] == ["seed1d", "zhang2d"]
    for r in data["results"]:
        assert "reference" in r["backends"]
        for e in r["backends"].values():
            assert e["utterances_per_s"] > 0 and e["memory_bytes"] > 0
            assert math.isclose(e["utterances_per_s"], 4 / e["step_s"])
        if "fused" in r["backends"]:
            assert r["throughput_ratio"] > 0 and r["memory_ratio"] > 0
        else:
            assert r["throughput_ratio"] is None
    check_goals(data["goals"], 1)
    assert "utt/s" in stdout


@pytest.mark.slow
def test_bench_predict_quick(tmp_path, seed1d_checkpoint, monkeypatch, capsys):
    """With the session's checkpoint (the script's own 1-epoch training is what `fit` tests cover)."""
    data, stdout = run_in_process("bench_predict.py", tmp_path, monkeypatch, capsys, "--ckpt", str(seed1d_checkpoint))
    assert data["benchmark"] == "predict"
    check_environment(data["environment"])
    assert data["files"] == 12 and data["audio_s"] > 12
    assert data["checkpoint"] == str(seed1d_checkpoint)
    assert len(data["modes"]) == 3
    for m in data["modes"].values():
        assert m["wall_s"] > 0 and math.isclose(m["rtf"], data["audio_s"] / m["wall_s"])
    check_goals(data["goals"], 3)
    assert "real-time factor" in stdout


def test_bench_serve_times_a_hop_both_ways_and_an_uploads_work(seed1d_checkpoint, tiny_corpus, monkeypatch):
    """The serving benchmark's in-process parts (its server parts are what `serve`'s own tests cover)."""
    import soundfile as sf

    from ser_lightning import EmotionRecognizer

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench_serve = runpy.run_path(str(ROOT / "benchmarks" / "bench_serve.py"))
    audio = np.concatenate([sf.read(f, dtype="float32")[0] for f in sorted(tiny_corpus.rglob("*.wav"))[:3]])
    recognizer = EmotionRecognizer.from_checkpoint(seed1d_checkpoint.parent / "last.ckpt")
    hop = bench_serve["hop_times"](recognizer, audio)
    assert set(hop) == {"incremental_ms", "recompute_ms", "live_stream_ms"}
    hops = 1 + (len(audio) - 32000) // 8000 - 2  # the first two hops after the first window are not timed
    for times in hop.values():
        assert times["count"] == hops and 0 < times["p50"] <= times["p95"] <= times["p99"] <= times["max"]
    with open(sorted(tiny_corpus.rglob("*.wav"))[0], "rb") as handle:
        work = bench_serve["upload_work"](recognizer, handle.read(), 3)
    assert 0 < work["model_ms"] < work["upload_ms"] and work["model_share"] == pytest.approx(work["model_ms"] / work["upload_ms"])
    assert "forward" not in vars(recognizer.module)  # the timing wrapper is gone


@pytest.mark.parametrize("name, option", [("bench_attention.py", "--no-compile"), ("bench_train.py", "--precision"),
                                          ("bench_predict.py", "--ckpt"), ("bench_serve.py", "--ckpt_path")])
def test_help_documents_options(name, option, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert option in out and "--quick" in out and "--json" in out
