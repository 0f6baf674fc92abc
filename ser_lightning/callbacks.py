"""The project's callbacks: figures in TensorBoard and a progress bar, both drawn only now and then.

FigureCallback: drawing figures costs far more than a validation epoch of a small model, so the
callback keeps what it needs every epoch (a confusion-matrix update per batch and the first
validation batch's attention) and renders only every ``every_n_epochs`` epochs and once at the end
of fitting, on global rank 0 only. The configuration section is ``figures:``.

ThrottledProgressBar: Lightning's tqdm bars, redrawn at most a few times a second.

RandomStates: the random states of torch, NumPy and Python kept in every checkpoint and restored on
resume, so that a resumed run continues exactly as an uninterrupted one.
DivergenceCheck: stops a run whose training loss is no longer finite, before anything uses the broken weights.
"""
from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics.classification import MulticlassConfusionMatrix

from ser_lightning.batch import Batch
from ser_lightning.errors import DataError
from ser_lightning.models.layers import ModelOutput
from ser_lightning.padding import pad_last


class FigureCallback(Callback):
    """Validation/test confusion matrices and attention maps of fixed validation utterances.

    Args:
        every_n_epochs: draw the validation figures every this many epochs (and after the last one); 0 = only
            at the end of fitting.
        num_attention_maps: attention maps of the first validation utterances (the loader is not shuffled,
            so they are the same utterances every time); 0 = none.
    """

    def __init__(self, every_n_epochs: int = 0, num_attention_maps: int = 4) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"figures.every_n_epochs must be >= 0, got {every_n_epochs}")
        if num_attention_maps < 0:
            raise ValueError(f"figures.num_attention_maps must be >= 0, got {num_attention_maps}")
        self.every_n_epochs, self.num_attention_maps = every_n_epochs, num_attention_maps
        self._confusion: dict[str, MulticlassConfusionMatrix] = {}
        self._pending: tuple[torch.Tensor, dict[str, Any] | None, int, int] | None = None  # not drawn yet
        self._samples: dict[str, Any] | None = None

    # ----------------------------------------------------------------- collecting
    def _metric(self, stage: str, module: LightningModule) -> MulticlassConfusionMatrix:
        if stage not in self._confusion:
            metric = MulticlassConfusionMatrix(module.hparams.num_classes, validate_args=False)
            self._confusion[stage] = metric.to(module.device)
        return self._confusion[stage]

    def on_validation_batch_end(self, trainer: Trainer, module: LightningModule, outputs: ModelOutput,
                                batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._metric("val", module).update(outputs.logits.detach(), batch["labels"])
        if batch_idx == 0 and self.num_attention_maps > 0 and trainer.is_global_zero:
            self._samples = _first_samples(batch, outputs, self.num_attention_maps)

    def on_test_batch_end(self, trainer: Trainer, module: LightningModule, outputs: ModelOutput, batch: Batch,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._metric("test", module).update(outputs.logits.detach(), batch["labels"])

    # ----------------------------------------------------------------- drawing
    def on_validation_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        confusion = self._metric("val", module).compute().cpu()  # every rank: synchronises under DDP
        self._metric("val", module).reset()
        samples, self._samples = self._samples, None
        if trainer.sanity_checking:
            return
        self._pending = (confusion, samples, module.current_epoch, module.global_step)
        epoch = module.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if last or (self.every_n_epochs and epoch % self.every_n_epochs == 0):
            self._draw_pending(trainer, module)

    def on_fit_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._draw_pending(trainer, module)  # e.g. when early stopping ended training between drawings

    def on_test_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        confusion = self._metric("test", module).compute().cpu()
        self._metric("test", module).reset()
        writer = _tensorboard(trainer)
        if writer is not None:
            from ser_lightning.plotting import confusion_matrix_figure

            figure = confusion_matrix_figure(confusion, module.class_names, title="test")
            writer.add_figure("test/confusion_matrix", figure, global_step=module.global_step, close=True)

    def _draw_pending(self, trainer: Trainer, module: LightningModule) -> None:
        pending, self._pending = self._pending, None
        writer = _tensorboard(trainer)
        if pending is None or writer is None:
            return
        from ser_lightning.plotting import attention_figure, confusion_matrix_figure

        confusion, samples, epoch, step = pending
        figure = confusion_matrix_figure(confusion, module.class_names, title=f"validation, epoch {epoch}")
        writer.add_figure("val/confusion_matrix", figure, global_step=step, close=True)
        if samples is None:
            return
        min_frames = module.model.min_input_frames
        for row in range(len(samples["labels"])):
            length, positions = int(samples["lengths"][row]), int(samples["positions"][row])
            # the model pads clips shorter than its receptive field with silence: show that padding too
            (features,), _ = pad_last([samples["features"][row, :, :length]], min_size=min_frames)
            grid = samples["grid"]
            shape = (positions,) if grid is None else (grid[0], positions // grid[0])
            figure = attention_figure(
                features, samples["alpha"][row, :positions], shape, module.hparams.arch,
                probabilities=samples["probabilities"][row], class_names=module.class_names,
                title=f"val utterance {row} (true {module.class_names[int(samples['labels'][row])]})",
            )
            writer.add_figure(f"val/attention_{row}", figure, global_step=step, close=True)


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bars, redrawn at most every ``min_interval_s`` seconds and at each loop's end.

    Lightning redraws a bar after every ``refresh_rate`` batches. A small model trains a hundred
    batches a second on a CPU, and redrawing (formatting the metrics, writing the terminal line) then
    takes about 5 % of the demo's epoch; no one reads a bar faster than this anyway. The commands use
    this bar unless ``trainer.enable_progress_bar`` is false or the configuration brings its own bar.
    """

    def __init__(self, min_interval_s: float = 0.25, refresh_rate: int = 1, process_position: int = 0,
                 leave: bool = False) -> None:
        if min_interval_s < 0:
            raise ValueError(f"ThrottledProgressBar: min_interval_s must be >= 0, got {min_interval_s}")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.min_interval_s = min_interval_s
        self._last_draw = -float("inf")

    def _should_update(self, current: int, total: int | None) -> bool:
        if not super()._should_update(current, total):
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            return True
        return False


class RandomStates(Callback):
    """Keeps the random states of torch (CPU and CUDA), NumPy and Python's ``random`` in every checkpoint.

    Restored when a run resumes from the checkpoint, before the next epoch's data loader iterates:
    the dropout masks, random crops, SpecAugment masks and mixup pairs of the resumed epochs are
    then those of an uninterrupted run (the training order's own generator is kept by the
    datamodule). The states are stored as tensors and plain lists, so the checkpoint still loads
    with ``torch.load(weights_only=True)``. Exact for one process with ``num_workers: 0``; worker
    processes keep their own random states, which no checkpoint holds.
    """

    def state_dict(self) -> dict[str, Any]:
        return random_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_random_states(state_dict)


def random_states() -> dict[str, Any]:
    """This process's random states as tensors and plain values."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what ``random_states`` returned (a state the checkpoint lacks is left as it is)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        name, keys, position, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    if "python" in states:
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "torch.cuda" in states and torch.cuda.is_available() and len(states["torch.cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
class DivergenceCheck(Callback):
    """Stops training with ``DataError("training diverged (loss is NaN at epoch E) ...")`` once a loss is not finite.

    Each training batch's loss is checked on its device (no synchronisation per step); the flag is read
    before each validation loop and at the end of each training epoch, so that neither validation,
    the figures nor a checkpoint choice ever see a diverged model.
    """

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None  # the first non-finite loss seen (NaN or inf), on the loss's device

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float()
        if self._bad is None:
            self._bad = torch.zeros((), device=loss.device)
        # keep the first non-finite value: NaN or +-inf tells the user which way it went
        self._bad = torch.where((self._bad == 0) & ~torch.isfinite(loss), loss, self._bad)

    def _check(self, trainer: Trainer, module: LightningModule) -> None:
        if self._bad is None or trainer.sanity_checking:
            return
        value = float(self._bad)
        if value == 0:
            return
        kind = "NaN" if value != value else ("inf" if value > 0 else "-inf")
        raise DataError(f"training diverged (loss is {kind} at epoch {trainer.current_epoch}); lower model.lr "
                        f"(now {module.hparams.get('lr')}) or check the input features")

    def on_validation_start(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check(trainer, module)

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._check(trainer, module)


def _first_samples(batch: Batch, output: ModelOutput, count: int) -> dict[str, Any]:
    """The first ``count`` utterances of a batch with their attention, on the CPU."""
    return {
        "features": batch["features"][:count].detach().cpu(),
        "lengths": batch["lengths"][:count].detach().cpu(),
        "labels": batch["labels"][:count].detach().cpu(),
        "alpha": output.alpha[:count].detach().float().cpu(),
        "positions": output.positions[:count].detach().cpu(),
        "probabilities": output.logits[:count].detach().float().softmax(dim=1).cpu(),
        "grid": output.grid,
    }


def _tensorboard(trainer: Trainer) -> Any:
    """The TensorBoard SummaryWriter on global rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
