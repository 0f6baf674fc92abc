"""`cv` and `cv-report`: the real entry point on a tiny corpus, and report merging on hand-written results."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import FINAL_WEIGHTS, failing_command, tiny_args

from ser_lightning.cli import main
from ser_lightning.errors import DataError
from ser_lightning.run.result import RESULT_FORMAT, RunResult
from ser_lightning.studies.report import TIE_TOLERANCE, _paired, _wins, summarize

CLASSES = ["neutral", "happy", "sad", "angry"]


def cv_args(corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["cv", "--folds=3", f"--out={out}", *tiny_args(corpus, out.parent, "--figures.every_n_epochs=0",
                                                           "--figures.num_attention_maps=0", cache=cache), *extra]


@pytest.fixture(scope="module")
def full_run(tiny_corpus, feature_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv_full") / "out"
    main(cv_args(tiny_corpus, out, feature_cache))
    return out


def test_report_covers_every_utterance_once_with_the_baseline_on_the_same_folds(full_run, tiny_corpus):
    report = json.loads((full_run / "cv_report.json").read_text())
    assert report["complete"] and report["protocol"] == "speaker_independent"
    assert (full_run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tested = [path for f in report["folds"] for path in f["test_utterances"]]
    assert sorted(tested) == sorted(str(p) for p in tiny_corpus.rglob("*.wav"))  # every utterance tested once
    assert sum(map(sum, report["confusion_matrix_sum"])) == len(tested)
    for name in ("WA", "UA", "F1"):
        values = [f["metrics"][name] for f in report["folds"]]
        assert report["mean"][name] == pytest.approx(sum(values) / len(values))
    for fold in report["folds"]:
        result = json.loads((full_run / f"fold_{fold['fold']}" / "result.json").read_text())
        baseline = result["baselines"]["pooled"]
        # the baseline was tested on exactly the model's test utterances
        assert sum(map(sum, baseline["confusion_matrix"])) == result["num_test_utterances"] == len(result["test_utterances"])
        assert [sum(row) for row in baseline["confusion_matrix"]] == [sum(row) for row in result["confusion_matrix"]]
    for fold in range(3):
        assert list((full_run / f"fold_{fold}" / "run").glob("events.out.tfevents.*"))


def test_paired_difference_and_wins_come_from_the_folds(full_run):
    report = json.loads((full_run / "cv_report.json").read_text())
    paired = report["baselines"]["pooled"]["UA_difference"]
    differences = [f["metrics"]["UA"] - f["baselines"]["pooled"]["metrics"]["UA"] for f in report["folds"]]
    assert paired["per_fold"] == pytest.approx(differences)
    assert paired["mean"] == pytest.approx(sum(differences) / 3)
    assert paired["wins"] == sum(d > TIE_TOLERANCE for d in differences) and paired["folds"] == 3
    assert paired["ties"] == sum(abs(d) <= TIE_TOLERANCE for d in differences)
    markdown = (full_run / "cv_report.md").read_text()
    assert f"the model wins {paired['wins']} of 3" in markdown and "pooled UA %" in markdown


@pytest.mark.parametrize("differences, wins, ties", [([0.05, -0.02, 2e-8], 1, 1), ([1e-5, -1e-5, 0.0], 1, 1)])
def test_differences_within_float_rounding_are_ties_not_wins(differences, wins, ties):
    paired = _paired(differences)
    assert (paired["wins"], paired["ties"], paired["folds"]) == (wins, ties, 3)
    assert _wins(paired) == f"wins {wins} of 3 folds ({ties} tied)"


def test_the_baseline_can_be_switched_off(tiny_corpus, feature_cache, tmp_path):
    out = tmp_path / "out"
    main(cv_args(tiny_corpus, out, feature_cache, "--only=1", "--baseline=false"))
    result = json.loads((out / "fold_1" / "result.json").read_text())
    assert result["baselines"] == {}
    assert "pooled" not in (out / "cv_report.md").read_text()


def kill_when_checkpointed(proc: subprocess.Popen, last: Path, epoch: int, timeout: float = 300) -> int:
    """SIGKILL ``proc`` as soon as ``last`` holds a checkpoint of ``epoch`` or later; returns the epoch it holds.

    Lightning writes a checkpoint to a temporary file and moves it into place (a rename: the tests' folders
    are on the temporary files' file system), so a ``last.ckpt`` that exists is whole.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if last.exists() and int(torch.load(last, weights_only=True)["epoch"]) >= epoch:
            break
        time.sleep(0.01)  # polling: what ends the wait is the checkpoint, not the time
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return int(torch.load(last, weights_only=True)["epoch"])


@pytest.mark.slow
def test_a_fold_killed_mid_run_resumes_to_the_uninterrupted_weights_and_metrics(tiny_corpus, feature_cache, tmp_path):
    # every random draw of training: data order, crops, SpecAugment masks, dropout and mixup
    epochs = ["--trainer.max_epochs=3", "--baseline=false", "--data.crop_seconds=1.5", "--data.augment={}",
              "--model.dropout=0.3", "--model.mixup_alpha=0.4"]
    whole, out = tmp_path / "whole", tmp_path / "out"
    main(cv_args(tiny_corpus, whole, feature_cache, "--only=1", *epochs, FINAL_WEIGHTS))
    args = cv_args(tiny_corpus, out, feature_cache, "--only=1", *epochs, FINAL_WEIGHTS)
    tests = str(Path(__file__).parent)  # where the run finds the FinalWeights callback
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, "-m", "ser_lightning", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    killed_at = kill_when_checkpointed(proc, out / "fold_1" / "run" / "checkpoints" / "last.ckpt", epoch=0)
    final = Path("fold_1") / "run" / "final.pt"
    assert killed_at < 2 and not (out / final).exists(), "fold 1 had finished training when it was killed"
    main(args)
    resumed, uninterrupted = (json.loads((folder / "fold_1" / "result.json").read_text()) for folder in (out, whole))
    assert resumed["resumed_from_epoch"] == killed_at and uninterrupted["resumed_from_epoch"] is None
    for key in ("metrics", "val_metrics", "test_probabilities", "best_val_UA", "epochs_trained", "confusion_matrix"):
        assert resumed[key] == uninterrupted[key], key
    weights = [torch.load(folder / final, weights_only=True) for folder in (out, whole)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])  # bit for bit


# ----------------------------------------------------------------------------- reports from hand-written results
def fake_result(fold: int, ua: float, baseline_ua: float, repeat: int = 0, config_key: str = "k") -> dict:
    confusion = [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]
    return {
        "fold": fold, "repeat": repeat, "num_folds": 3, "config_key": config_key, "config": {}, "protocol": "speaker_independent",
        "speaker_dependent": False, "seed_everything": repeat, "data_random_seed": 0, "class_names": CLASSES,
        "metrics": {"WA": ua, "UA": ua, "F1": ua}, "val_metrics": {"UA": ua}, "per_class_recall": dict.fromkeys(CLASSES, ua),
        "confusion_matrix": confusion, "num_test_utterances": 8, "test_utterances": [f"{fold}/{k}.wav" for k in range(8)],
        "test_speakers": [str(fold)], "epochs_trained": 3, "wall_seconds": 1.0,
        "baselines": {"pooled": {"C": 0.1, "selection": "validation", "metrics": {"WA": baseline_ua, "UA": baseline_ua,
                                 "F1": baseline_ua}, "per_class_recall": dict.fromkeys(CLASSES, baseline_ua)}},
    }


def records(results: list[dict]) -> list[RunResult]:
    return [RunResult.from_json(json.dumps(result), f"result {k}") for k, result in enumerate(results)]


def write_results(folder: Path, results: list[dict]) -> Path:
    for result in results:
        name = f"fold_{result['fold']}" + (f"_repeat_{result['repeat']}" if result["repeat"] else "")
        (folder / name).mkdir(parents=True)
        (folder / name / "result.json").write_text(json.dumps(result))
    return folder


def test_cv_report_merges_partial_runs_into_the_full_report(tmp_path):
    results = [fake_result(0, 0.8, 0.7), fake_result(1, 0.6, 0.65), fake_result(2, 0.9, 0.7)]
    write_results(tmp_path / "a", results[::2])
    write_results(tmp_path / "b", results[1:2])
    main(["cv-report", str(tmp_path / "a"), str(tmp_path / "b"), f"--out={tmp_path / 'merged'}"])
    merged = json.loads((tmp_path / "merged" / "cv_report.json").read_text())
    assert merged["complete"] and [f["fold"] for f in merged["folds"]] == [0, 1, 2]
    assert merged == json.loads(json.dumps(summarize(records(results))))
    assert merged["baselines"]["pooled"]["UA_difference"]["wins"] == 2
    main(["cv-report", str(tmp_path / "a")])
    alone = json.loads((tmp_path / "a" / "cv_report.json").read_text())
    assert not alone["complete"] and alone["folds_missing"] == [1]


def test_cv_report_refuses_different_configurations(tmp_path, capsys):
    write_results(tmp_path / "a", [fake_result(0, 0.8, 0.7)])
    write_results(tmp_path / "b", [fake_result(1, 0.8, 0.7, config_key="other")])
    status, err = failing_command(["cv-report", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    assert status == 2 and "different configurations" in err and err.count("\n") == 1


def test_repeats_separate_the_spread_over_seeds_from_the_spread_over_folds():
    # fold means 0.7, 0.8, 0.9 (spread over folds); within each fold the two seeds differ by 0.1 (spread over seeds)
    results = [fake_result(fold, mean + delta, 0.5, repeat)
               for fold, mean in enumerate((0.7, 0.8, 0.9)) for repeat, delta in enumerate((-0.05, 0.05))]
    summary = summarize(records(results))
    assert summary["repeats"] == 2 and summary["mean"]["UA"] == pytest.approx(0.8)
    assert summary["std"]["UA"] == pytest.approx(0.1)
    assert summary["std_over_seeds"]["UA"] == pytest.approx((0.1**2 / 2) ** 0.5)
    assert [f["metrics"]["UA"] for f in summary["folds"]] == pytest.approx([0.7, 0.8, 0.9])


# ----------------------------------------------------------------------------- result files
def test_a_run_writes_its_result_record_as_it_reads_it_back(full_run):
    path = full_run / "fold_0" / "result.json"
    written = json.loads(path.read_text())
    assert list(written) == [field.name for field in fields(RunResult)]  # every field, in order, format first
    assert written["format_version"] == RESULT_FORMAT
    result = RunResult.read(path)
    assert result.to_json() == path.read_text()
    assert result.baselines["pooled"].confusion_matrix == written["baselines"]["pooled"]["confusion_matrix"]
    assert result.seconds == written["run_seconds"] > written["wall_seconds"]


def test_results_written_before_the_format_had_a_version_load_with_defaults():
    old = fake_result(1, 0.8, 0.7)  # no format_version, and none of the keys added since (calibration, run_seconds, ...)
    result = RunResult.from_json(json.dumps(old), "old.json")
    assert result.format_version == 0 and result.fold == 1 and result.metrics["UA"] == 0.8
    assert result.calibration is None and result.shared_speakers == [] and result.head_metrics == {}
    assert result.seconds == old["wall_seconds"]  # the whole run's seconds were not counted then
    assert result.baselines["pooled"].val_metrics is None and result.baselines["pooled"].C == 0.1


@pytest.mark.parametrize("change, problem", [
    ({"format_version": RESULT_FORMAT + 1}, f"a run result of format {RESULT_FORMAT + 1}, newer than this version"),
    ({"format_version": "one"}, "not a run result (format_version 'one')"),
    ({"metrics": None, "fold": None}, "not a complete run result (the file lacks fold, metrics)"),
    ({"baselines": {"pooled": {"C": 1.0}}}, "not a complete run result (baseline pooled lacks selection, metrics"),
])
def test_a_result_of_a_newer_format_or_missing_keys_is_refused_in_one_line_naming_the_file(change, problem, tmp_path,
                                                                                            capsys):
    result = {key: value for key, value in {**fake_result(0, 0.8, 0.7), **change}.items() if value is not None}
    path = tmp_path / "fold_0" / "result.json"
    path.parent.mkdir()
    path.write_text(json.dumps(result))
    with pytest.raises(DataError, match=re.escape(problem)):
        RunResult.read(path)
    status, err = failing_command(["cv-report", str(tmp_path)], capsys)
    assert status == 1 and err.startswith(f"error: {path}: ") and problem in err and err.count("\n") == 1
