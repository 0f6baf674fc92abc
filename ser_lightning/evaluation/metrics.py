"""Classification metrics of one split from its predictions: WA, UA, macro-F1 and the confusion matrix.

WA (weighted accuracy) is the overall accuracy, UA (unweighted accuracy) the mean per-class recall
(balanced accuracy), F1 the macro-averaged F1; they are torchmetrics' definitions, the same ones
logged during training, and EmoBox's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix, multiclass_f1_score

METRICS = ("WA", "UA", "F1")


@dataclass(frozen=True)
class SplitScores:
    """Metrics of one split: WA, UA, F1 (fractions), the confusion matrix (rows: true) and per-class recall."""

    metrics: dict[str, float]
    confusion: list[list[int]]
    per_class_recall: dict[str, float]

    @property
    def UA(self) -> float:  # noqa: N802 (the field's own name)
        return self.metrics["UA"]


def split_scores(labels: np.ndarray | torch.Tensor, predictions: np.ndarray | torch.Tensor,
                 class_names: list[str]) -> SplitScores:
    """Scores of integer ``predictions`` against ``labels`` over the classes ``class_names``."""
    target, preds = torch.as_tensor(np.asarray(labels)).long(), torch.as_tensor(np.asarray(predictions)).long()
    classes = len(class_names)
    confusion = multiclass_confusion_matrix(preds, target, classes)
    recall = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    metrics = {
        "WA": float(multiclass_accuracy(preds, target, classes, average="micro")),
        "UA": float(multiclass_accuracy(preds, target, classes, average="macro")),
        "F1": float(multiclass_f1_score(preds, target, classes, average="macro")),
    }
    return SplitScores(metrics, confusion.tolist(), dict(zip(class_names, recall.tolist())))
