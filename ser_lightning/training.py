"""Fit one fold, then evaluate the checkpoint the validation speakers chose: the one place this happens.

``fit`` (the command line) and ``cv`` (every fold of a study) both call ``fit_and_test``; what they
report comes from the returned ``FitOutcome``, built from the evaluation loops' own outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ser_lightning.checkpoints import safe_loading
from ser_lightning.data.batches import Batch
from ser_lightning.errors import DataError
from ser_lightning.evaluation.metrics import METRICS, SplitScores, split_scores
from ser_lightning.models.layers import ModelOutput


@dataclass
class SplitPredictions:
    """What a model predicted for every utterance of a split (indices into the datamodule's utterances)."""

    index: np.ndarray  # (N,) int
    labels: np.ndarray  # (N,) int
    probabilities: np.ndarray  # (N, K) float


@dataclass
class FitOutcome:
    """The result of ``fit_and_test``: the chosen checkpoint and its validation and test results."""

    best_checkpoint: str | None
    best_val_UA: float | None  # noqa: N815 (the metric's name)
    epochs_trained: int
    wall_seconds: float
    val: SplitScores
    test: SplitScores | None
    val_predictions: SplitPredictions
    test_predictions: SplitPredictions | None


class PredictionCollector(Callback):
    """Collects the probabilities of every validation or test batch of one evaluation loop."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _collect(self, outputs: ModelOutput, batch: Batch) -> None:
        probabilities = outputs.logits.detach().float().softmax(dim=1)
        self.parts.append((batch["index"].cpu(), batch["labels"].cpu(), probabilities.cpu()))

    def on_validation_batch_end(self, trainer: Trainer, module: LightningModule, outputs: ModelOutput, batch: Batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._collect(outputs, batch)

    def on_test_batch_end(self, trainer: Trainer, module: LightningModule, outputs: ModelOutput, batch: Batch,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs, batch)

    def take(self) -> SplitPredictions:
        index, labels, probabilities = (torch.cat(column).numpy() for column in zip(*self.parts))
        self.parts = []
        return SplitPredictions(index, labels, probabilities)


def evaluate(trainer: Trainer, module: LightningModule, datamodule: Any, split: str,
             ckpt_path: str | None) -> tuple[SplitScores, SplitPredictions]:
    """Run the validation or test loop on ``ckpt_path`` and score it.

    WA, UA and F1 are the loop's own (synchronised across processes) metrics; the confusion matrix
    and per-class recall come from the predictions this process saw (all of them on one device).
    """
    collector = PredictionCollector()
    trainer.callbacks.append(collector)
    try:
        loop = trainer.validate if split == "val" else trainer.test
        with safe_loading():
            logged = loop(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True)[0]
    finally:
        trainer.callbacks.remove(collector)
    predictions = collector.take()
    scores = split_scores(predictions.labels, predictions.probabilities.argmax(1), list(datamodule.class_names))
    scores.metrics.update({name: float(logged[f"{split}/{name}"]) for name in METRICS})
    return scores, predictions


def fit_and_test(trainer: Trainer, module: LightningModule, datamodule: Any, *, resume_from: str | Path | None = None,
                 test: bool = True) -> FitOutcome:
    """Fit; then evaluate the best-validation-UA checkpoint on the validation and (once) the test split.

    Nothing about the test split feeds back: the checkpoint is chosen by the validation speakers'
    UA during fitting, before the test loop runs. Without a checkpoint callback the final weights
    are evaluated. A fit that took no optimizer step is a ``DataError``: an untrained model's metrics are
    not results.
    """
    start = time.monotonic()
    with safe_loading():
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)
    if trainer.global_step == 0:
        raise DataError(f"the run never trained (no optimizer step in {trainer.current_epoch} epoch(s)): check "
                        "trainer.max_epochs, trainer.max_steps, trainer.limit_train_batches and the training split")
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    best_score = None if best is None or checkpoint.best_model_score is None else float(checkpoint.best_model_score)
    epochs = trainer.current_epoch
    val, val_predictions = evaluate(trainer, module, datamodule, "val", best)
    test_scores, test_predictions = evaluate(trainer, module, datamodule, "test", best) if test else (None, None)
    return FitOutcome(best, best_score, epochs, time.monotonic() - start, val, test_scores, val_predictions,
                      test_predictions)
