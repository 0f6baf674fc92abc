"""Calibration: temperature scaling on validation speakers, ECE and Brier, abstention, and where the temperature goes."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from ser_lightning import EmotionRecognizer
from ser_lightning.cli import main
from ser_lightning.evaluation.calibration import (
    brier_score, calibration_summary, expected_calibration_error, fit_temperature, selective, softmax,
)
from ser_lightning.run.training import NETWORK_WEIGHTS, SplitPredictions, choose_network_weight, store_calibration


def tempered(temperature: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): calibrated at exactly that temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, 4))
    probabilities = softmax(logits, temperature)
    labels = np.array([rng.choice(4, p=p) for p in probabilities])
    return logits, labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_recovers_the_true_one_and_lowers_ece(temperature):
    logits, labels = tempered(temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.1)
    summary = calibration_summary(logits, labels, fitted)
    assert summary["ece_after"] < 0.03
    if temperature != 1.0:
        assert summary["ece_after"] < summary["ece_before"] and summary["brier_after"] < summary["brier_before"]


def test_ece_and_brier_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([0, 1, 1, 0])
    # 15 bins: confidences 0.9, 0.6, 0.8, 0.7 fall in four bins; accuracy 1, 0, 1, 1
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected, abs=1e-6)
    assert brier_score(probabilities, labels) == pytest.approx(
        np.mean([0.01 + 0.01, 0.36 + 0.36, 0.04 + 0.04, 0.09 + 0.09]))


def test_abstention_gives_coverage_and_accuracy_of_the_answered():
    probabilities = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.65, 0.35]])
    labels = np.array([0, 1, 1, 1])
    rows = {row["threshold"]: row for row in selective(probabilities, labels, (0.5, 0.6, 0.8, 0.95))}
    assert rows[0.5]["coverage"] == 1.0 and rows[0.5]["accuracy"] == 0.5
    assert rows[0.6]["coverage"] == 0.75 and rows[0.6]["accuracy"] == pytest.approx(2 / 3)
    assert rows[0.8]["coverage"] == 0.25 and rows[0.8]["accuracy"] == 1.0
    assert rows[0.95]["coverage"] == 0.0 and np.isnan(rows[0.95]["accuracy"])


def test_the_network_share_is_the_validation_best_and_ties_go_to_the_smaller():
    labels = np.array([0, 1, 0, 1])
    statistics = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 0.0]])  # right on two, wrong on two
    network = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # fixes the two it gets wrong
    parts = np.stack([network, statistics], axis=1)
    assert choose_network_weight(SplitPredictions(np.arange(4), labels, network + statistics, parts)) == 0.25
    useless = np.stack([np.zeros_like(network), statistics], axis=1)  # every share ties: the smallest
    assert choose_network_weight(SplitPredictions(np.arange(4), labels, statistics, useless)) == NETWORK_WEIGHTS[0]
    assert choose_network_weight(SplitPredictions(np.arange(4), labels, statistics, None)) == 1.0


@pytest.fixture(scope="module")
def calibrated(seed1d_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a temperature of 4 and a network share of 0.5 written into it."""
    from ser_lightning.checkpoints import load_module

    path = tmp_path_factory.mktemp("calibrated") / "model.ckpt"
    shutil.copy(seed1d_checkpoint.parent / "last.ckpt", path)
    module = load_module(path)
    store_calibration(module, str(path), 4.0, 0.5)
    return path


def test_the_temperature_travels_in_the_checkpoint_to_predictions(seed1d_checkpoint, calibrated, tiny_corpus):
    plain = EmotionRecognizer.from_checkpoint(seed1d_checkpoint.parent / "last.ckpt")
    scaled = EmotionRecognizer.from_checkpoint(calibrated)
    assert float(scaled.module.temperature) == 4.0 and float(scaled.module.network_weight) == 0.5
    features = plain.extractor(torch.from_numpy(
        __import__("soundfile").read(next(tiny_corpus.rglob("*.wav")), dtype="float32")[0])).unsqueeze(0)
    with torch.no_grad():
        raw = plain.module(features).logits  # temperature 1, share 1 (no statistics head here: the share is unused)
        calibrated_logits = scaled.module(features).logits
    torch.testing.assert_close(calibrated_logits, raw / 4.0)


def test_min_confidence_reports_uncertain_in_csv_and_json(seed1d_checkpoint, tiny_corpus, tmp_path, capsys):
    files = sorted(tiny_corpus.rglob("*.wav"))[:6]
    checkpoint = str(seed1d_checkpoint.parent / "last.ckpt")
    recognizer = EmotionRecognizer.from_checkpoint(checkpoint)
    top = sorted(max(recognizer.predict_file(f).probabilities.values()) for f in files)
    threshold = (top[2] + top[3]) / 2  # half the files below it, half above
    for suffix in ("csv", "json"):
        output = tmp_path / f"results.{suffix}"
        main(["predict", f"--ckpt_path={checkpoint}", *map(str, files), f"--output={output}",
              f"--min_confidence={threshold}"])
        if suffix == "csv":
            rows = [r for r in csv.DictReader(output.open()) if r["window"] == "all"]
            pairs = [(r["emotion"], max(float(r[k]) for k in r if k.startswith("p_"))) for r in rows]
        else:
            pairs = [(r["emotion"], max(r["probabilities"].values())) for r in json.loads(output.read_text())]
        assert sum(emotion == "uncertain" for emotion, _ in pairs) == 3
        for emotion, p in pairs:
            assert (emotion == "uncertain") == (p < threshold)
            assert emotion == "uncertain" or emotion in recognizer.class_names
    capsys.readouterr()
