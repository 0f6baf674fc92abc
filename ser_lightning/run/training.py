"""Fit one fold, then evaluate the checkpoint the validation speakers chose: the one place this happens.

``fit`` (the command line) and ``run.fold.run_fold`` (every run of a study) both call ``fit_and_test``; what they
report comes from the returned ``FitOutcome``, built from the evaluation loops' own outputs.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ser_lightning.batch import Batch
from ser_lightning.checkpoints import safe_loading
from ser_lightning.errors import DataError
from ser_lightning.evaluation.calibration import fit_temperature, softmax
from ser_lightning.evaluation.metrics import METRICS, SplitScores, split_scores
from ser_lightning.models.layers import ModelOutput
from ser_lightning.outputs import atomic_write_bytes


@dataclass
class SplitPredictions:
    """What a model predicted for every utterance of a split (indices into the datamodule's utterances)."""

    index: np.ndarray  # (N,) int
    labels: np.ndarray  # (N,) int
    logits: np.ndarray  # (N, K) float, uncalibrated
    parts: np.ndarray | None = None  # (N, H, K) each head's own logits (``SERModule.HEAD_NAMES``), or None

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        return softmax(self.logits, temperature)


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
    temperature: float = 1.0  # fitted on the validation predictions; stored in the module and the best checkpoint
    network_weight: float = 1.0  # the attention head's share in the logits, chosen on the validation predictions


class PredictionCollector(Callback):
    """Collects the probabilities of every validation or test batch of one evaluation loop."""

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def _collect(self, outputs: ModelOutput, batch: Batch) -> None:
        row = (batch["index"].cpu(), batch["labels"].cpu(), outputs.logits.detach().float().cpu())
        self.rows.append(row if outputs.parts is None else (*row, outputs.parts.float().cpu()))

    def on_validation_batch_end(self, trainer: Trainer, module: LightningModule, outputs: ModelOutput, batch: Batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._collect(outputs, batch)

    def on_test_batch_end(self, trainer: Trainer, module: LightningModule, outputs: ModelOutput, batch: Batch,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs, batch)

    def take(self) -> SplitPredictions:
        columns = [torch.cat(column).numpy() for column in zip(*self.rows)]
        self.rows = []
        return SplitPredictions(*columns)


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
    scores = split_scores(predictions.labels, predictions.logits.argmax(1), list(datamodule.class_names))
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
    weight = choose_network_weight(val_predictions)
    if weight != 1.0:  # the validation logits with the chosen share
        parts = val_predictions.parts
        val_predictions.logits = weight * parts[:, 0] + parts[:, 1]
        val = split_scores(val_predictions.labels, val_predictions.logits.argmax(1), list(datamodule.class_names))
    temperature = fit_temperature(val_predictions.logits, val_predictions.labels)
    if trainer.is_global_zero:
        store_calibration(module, best, temperature, weight)
    trainer.strategy.barrier()
    test_scores, test_predictions = evaluate(trainer, module, datamodule, "test", best) if test else (None, None)
    return FitOutcome(best, best_score, epochs, time.monotonic() - start, val, test_scores, val_predictions,
                      test_predictions, temperature, weight)


NETWORK_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def choose_network_weight(predictions: SplitPredictions) -> float:
    """With a statistics head: the share of the attention head's logits (``NETWORK_WEIGHTS``) that maximises the
    validation UA, ties going to the smaller share (stacking: a network that does not help the validation speakers
    gets less say); 1 without a statistics head."""
    if predictions.parts is None or predictions.parts.shape[1] < 2:
        return 1.0
    from ser_lightning.models.logistic import unweighted_accuracy

    scores = [unweighted_accuracy(predictions.labels, (w * predictions.parts[:, 0] + predictions.parts[:, 1]).argmax(1))
              for w in NETWORK_WEIGHTS]
    return NETWORK_WEIGHTS[int(np.argmax(scores))]


def store_calibration(module: LightningModule, checkpoint: str | None, temperature: float, weight: float) -> None:
    """Set the module's temperature and network weight and write them into the chosen checkpoint (atomically), so
    that ``predict``, the Python API and the ONNX export use them."""
    module.temperature.fill_(temperature)
    module.network_weight.fill_(weight)
    if checkpoint is None:
        return
    with safe_loading():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["state_dict"]["temperature"] = torch.tensor(temperature)
    state["state_dict"]["network_weight"] = torch.tensor(weight)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(checkpoint), buffer.getvalue())
