"""`cv` and `cv-report` through the real entry point on a tiny generated corpus."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ser_lightning.cli import main


def cv_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cv", "--folds=3", f"--out={out}",
        f"--data.root={corpus}", f"--data.cache_dir={out.parent / 'cache'}",
        "--data.num_val_speakers=1", "--data.batch_size=16",
        "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *extra,
    ]


@pytest.fixture(scope="module")
def full_run(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv_full") / "out"
    main(cv_args(tiny_corpus, out))
    return out


def metrics_of(report: dict) -> list:
    return [(f["fold"], f["metrics"], f["confusion_matrix"]) for f in report["folds"]]


def test_report_files_are_consistent(full_run, tiny_corpus):
    report = json.loads((full_run / "cv_report.json").read_text())
    assert report["complete"] and report["protocol"] == "speaker_independent"
    assert (full_run / "cv_report.md").read_text().count("| ") > 5
    assert (full_run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("WA", "UA", "F1"):
        values = [f["metrics"][name] for f in report["folds"]]
        assert report["mean"][name] == pytest.approx(sum(values) / len(values))
    tested = [path for f in report["folds"] for path in f["test_utterances"]]
    all_files = sorted(str(p) for p in tiny_corpus.rglob("*.wav"))
    assert sorted(tested) == all_files  # every utterance tested exactly once
    assert report["num_test_utterances"] == len(all_files)
    assert sum(map(sum, report["confusion_matrix_sum"])) == len(all_files)
    speakers = [s for f in report["folds"] for s in f["test_speakers"]]
    assert len(speakers) == len(set(speakers)) == 6
    for fold in range(3):
        assert list((full_run / f"fold_{fold}" / "run").glob("events.out.tfevents.*"))


def test_only_runs_merge_into_the_full_report(full_run, tiny_corpus, tmp_path):
    main(cv_args(tiny_corpus, tmp_path / "a", "--only=0,2"))
    main(cv_args(tiny_corpus, tmp_path / "b", "--only=1"))
    partial = json.loads((tmp_path / "a" / "cv_report.json").read_text())
    assert not partial["complete"] and partial["folds_missing"] == [1]
    main(["cv-report", str(tmp_path / "a"), str(tmp_path / "b"), f"--out={tmp_path / 'merged'}"])
    merged = json.loads((tmp_path / "merged" / "cv_report.json").read_text())
    full = json.loads((full_run / "cv_report.json").read_text())
    assert merged["complete"]
    assert metrics_of(merged) == metrics_of(full)  # same seed: same numbers, run split or whole
    assert merged["mean"] == full["mean"] and merged["confusion_matrix_sum"] == full["confusion_matrix_sum"]


def test_merge_refuses_different_configurations(tiny_corpus, tmp_path):
    main(cv_args(tiny_corpus, tmp_path / "a", "--only=0"))
    main(cv_args(tiny_corpus, tmp_path / "b", "--only=1", "--model.lr=0.01"))
    with pytest.raises(ValueError, match="different configurations"):
        main(["cv-report", str(tmp_path / "a"), str(tmp_path / "b")])


def test_killed_run_resumes_without_redoing_complete_folds(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ser_lightning", *cv_args(tiny_corpus, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    first = out / "fold_0" / "result.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "fold 0 did not complete before the kill"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    main(cv_args(tiny_corpus, out))
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    report = json.loads((out / "cv_report.json").read_text())
    assert report["complete"] and [f["fold"] for f in report["folds"]] == [0, 1, 2]
