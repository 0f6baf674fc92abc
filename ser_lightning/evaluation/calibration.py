"""Calibration: how far predicted probabilities can be trusted, temperature scaling, and abstention.

- ECE: the expected calibration error over 15 equal-width confidence bins (torchmetrics'
  ``multiclass_calibration_error``, L1 norm); Brier: the mean squared distance between the probability
  vector and the one-hot label, summed over classes (0 is perfect, 2 the worst).
- Temperature scaling (Guo et al. 2017): one scalar T > 0 dividing the logits, chosen to minimise the
  negative log-likelihood of the validation speakers' utterances. It never changes a prediction
  (argmax), only how sure the probabilities say it is.
- Abstention: below a minimum confidence the answer is "uncertain"; accuracy on the answered
  utterances and their share (coverage) at a few thresholds show the trade-off.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

ECE_BINS = 15
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
TEMPERATURE_RANGE = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The T in ``TEMPERATURE_RANGE`` minimising the mean negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(scaled).sum(axis=1)) - scaled[np.arange(len(y)), y]))

    low, high = np.log(TEMPERATURE_RANGE)
    return float(np.exp(minimize_scalar(nll, bounds=(low, high), method="bounded").x))


def expected_calibration_error(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    p = torch.as_tensor(np.asarray(probabilities, dtype=np.float64))
    return float(multiclass_calibration_error(p, torch.as_tensor(np.asarray(labels)).long(), p.shape[1],
                                              n_bins=ECE_BINS, norm="l1"))


def brier_score(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    p = np.asarray(probabilities, dtype=np.float64)
    onehot = np.eye(p.shape[1])[np.asarray(labels)]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def selective(probabilities: np.ndarray, labels: Sequence[int], thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """Per threshold: the share of utterances answered (max probability >= threshold) and their accuracy."""
    p, y = np.asarray(probabilities), np.asarray(labels)
    confidence, predicted = p.max(axis=1), p.argmax(axis=1)
    rows = []
    for threshold in thresholds:
        answered = confidence >= threshold
        accuracy = float(np.mean(predicted[answered] == y[answered])) if answered.any() else float("nan")
        rows.append({"threshold": threshold, "coverage": float(answered.mean()), "accuracy": accuracy})
    return rows


def calibration_summary(logits: np.ndarray, labels: Sequence[int], temperature: float) -> dict:
    """ECE and Brier before and after temperature scaling, and the selective accuracy after it."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {"temperature": temperature,
            "ece_before": expected_calibration_error(before, labels), "ece_after": expected_calibration_error(after, labels),
            "brier_before": brier_score(before, labels), "brier_after": brier_score(after, labels),
            "selective": selective(after, labels)}
