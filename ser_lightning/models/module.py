"""SERModule: the LightningModule that trains, evaluates and serves either model."""

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from ser_lightning.data.features import normalize
from ser_lightning.models.layers import ModelOutput
from ser_lightning.models.seed1d import Seed1D
from ser_lightning.models.zhang2d import Zhang2D
from ser_lightning.plotting import attention_figure, confusion_matrix_figure

ARCHS = ("seed1d", "zhang2d")
DEFAULT_LAM = {"seed1d": 0.8, "zhang2d": 0.3}
NORMALIZATIONS = ("global", "utterance", "none")


def class_weights_from_counts(counts: Tensor) -> Tensor:
    """Inverse-frequency weights total / (K * count_k); classes without examples get weight 0."""
    counts = counts.to(torch.float64)
    weights = counts.sum() / (len(counts) * counts)
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def stage_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """WA (overall accuracy), UA (mean per-class recall) and macro-F1, logged as `<prefix>WA` etc."""
    return MetricCollection(
        {
            "WA": MulticlassAccuracy(num_classes, average="micro"),
            "UA": MulticlassAccuracy(num_classes, average="macro"),
            "F1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


def check_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the `model.<option>` that is wrong."""
    o = options
    checks = [
        (o["arch"] in ARCHS, f"model.arch must be one of {ARCHS}, got {o['arch']!r}"),
        (o["num_features"] >= 1, f"model.num_features must be >= 1, got {o['num_features']}"),
        (o["num_classes"] >= 2, f"model.num_classes must be >= 2, got {o['num_classes']}"),
        (o["class_names"] is None or len(o["class_names"]) == o["num_classes"],
         f"model.class_names has {len(o['class_names'] or [])} names but model.num_classes is {o['num_classes']}"),
        (o["lam"] is None or o["lam"] > 0, f"model.lam must be > 0, got {o['lam']}"),
        (o["width"] > 0, f"model.width must be > 0, got {o['width']}"),
        (0 <= o["dropout"] < 1, f"model.dropout must be in [0, 1), got {o['dropout']}"),
        (o["normalization"] in NORMALIZATIONS,
         f"model.normalization must be one of {NORMALIZATIONS}, got {o['normalization']!r}"),
        (o["lr"] > 0, f"model.lr must be > 0, got {o['lr']}"),
        (o["weight_decay"] >= 0, f"model.weight_decay must be >= 0, got {o['weight_decay']}"),
        (o["early_stopping_patience"] is None or o["early_stopping_patience"] >= 1,
         f"model.early_stopping_patience must be >= 1 or null, got {o['early_stopping_patience']}"),
        (o["num_attention_maps"] >= 0, f"model.num_attention_maps must be >= 0, got {o['num_attention_maps']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class SERModule(LightningModule):
    """Speech emotion recognition with an attention FCN (the YAML `model:` section).

    Args:
        arch: "seed1d" (1-D FCN over feature rows as channels) or "zhang2d" (AlexNet-style 2-D FCN).
        num_features: feature rows F of the input (B, F, N); linked from the data config.
        num_classes: number of emotion classes K; linked from the data config.
        class_names: names of the K classes, for logs and figures (default class_0 ...).
        lam: attention softmax sharpness lambda (> 0); None uses the arch default (0.8 seed1d, 0.3 zhang2d).
        attention_dim: attention projection size; None uses the last map's channels.
        width: zhang2d channel multiplier (> 0); below 1 for CPU-sized models.
        dropout: zhang2d dropout before the classifier.
        lrn: zhang2d local response normalisation after convs 1 and 2.
        pretrained_alexnet: zhang2d: local torchvision AlexNet state dict to initialise the convs from (read when
            the module is built; give pretrained_alexnet=None to load_from_checkpoint where the file is absent).
        backend: attention implementation: "auto", "fused" or "reference".
        normalization: "global" (training-split mean/std per feature row), "utterance" or "none".
        class_weighted_loss: weight the cross-entropy by inverse training-split class frequency.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        early_stopping_patience: stop after this many validation epochs without a better val/UA (None: never).
        num_attention_maps: attention maps of the first validation utterances logged each validation epoch.
    """

    def __init__(
        self,
        arch: Literal["seed1d", "zhang2d"] = "seed1d",
        num_features: int = 64,
        num_classes: int = 4,
        class_names: list[str] | None = None,
        lam: float | None = None,
        attention_dim: int | None = None,
        width: float = 1.0,
        dropout: float = 0.5,
        lrn: bool = True,
        pretrained_alexnet: str | None = None,
        backend: Literal["auto", "fused", "reference"] = "auto",
        normalization: Literal["global", "utterance", "none"] = "global",
        class_weighted_loss: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        early_stopping_patience: int | None = None,
        num_attention_maps: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_options(self.hparams)
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(num_classes)]
        lam = DEFAULT_LAM[arch] if lam is None else lam
        self.model: Seed1D | Zhang2D
        if arch == "seed1d":
            self.model = Seed1D(num_features, num_classes, lam=lam, attention_dim=attention_dim, backend=backend)
        else:
            self.model = Zhang2D(num_features, num_classes, width=width, lam=lam, lrn=lrn, dropout=dropout,
                                 attention_dim=attention_dim, pretrained_alexnet=pretrained_alexnet, backend=backend)
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.register_buffer("class_weights", torch.ones(num_classes))

        self.train_metrics = stage_metrics(num_classes, "train/")
        self.val_metrics = stage_metrics(num_classes, "val/")
        self.test_metrics = stage_metrics(num_classes, "test/")
        self.val_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: Tensor | None = None  # (K, K) counts after a test epoch
        self.test_per_class_recall: Tensor | None = None  # (K,) after a test epoch
        self._attention_samples: dict[str, Any] | None = None  # first validation utterances, for figures

    # ----------------------------------------------------------------- setup and model
    def setup(self, stage: str) -> None:
        """For fit: take normalisation statistics and class weights from the datamodule's training split."""
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            if self.hparams.normalization == "global" or self.hparams.class_weighted_loss:
                rank_zero_warn("SERModule: no datamodule, so global feature statistics and class weights stay unset")
            return
        mean, std = datamodule.feature_stats
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(
                f"model.num_features is {self.hparams.num_features} but the data's feature statistics have "
                f"shape {tuple(mean.shape)}"
            )
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        if self.hparams.class_weighted_loss:
            counts = torch.as_tensor(datamodule.class_counts("train"))
            if counts.shape != self.class_weights.shape:
                raise ValueError(
                    f"model.num_classes is {self.hparams.num_classes} but the training split has counts "
                    f"for {len(counts)} classes"
                )
            missing = [self.class_names[k] for k in range(len(counts)) if counts[k] == 0]
            if missing:
                rank_zero_warn(f"SERModule: no training examples of {missing}: their loss weight is 0")
            self.class_weights.copy_(class_weights_from_counts(counts))

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> ModelOutput:
        """Normalise raw (B, F, N) features with the stored statistics and run the model."""
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[-1], dtype=torch.int64, device=features.device)
        x = normalize(features, lengths, self.hparams.normalization, self.feature_mean, self.feature_std)
        return self.model(x, lengths)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_callbacks(self) -> list[Callback]:
        """Checkpoints (the best val/UA, and `last.ckpt` after every epoch for resuming) and optional early stopping.

        They replace the trainer's default checkpoint; with `trainer.enable_checkpointing: false` none is added.
        """
        callbacks: list[Callback] = []
        if self.trainer.checkpoint_callback is not None:
            best = ModelCheckpoint(
                monitor="val/UA", mode="max", filename="epoch{epoch:03d}-valUA{val/UA:.4f}", auto_insert_metric_name=False
            )
            latest = ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False)
            callbacks += [best, latest]  # the first is `trainer.checkpoint_callback`
        if self.hparams.early_stopping_patience is not None:
            callbacks.append(EarlyStopping(monitor="val/UA", mode="max", patience=self.hparams.early_stopping_patience))
        return callbacks

    # ----------------------------------------------------------------- steps
    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[ModelOutput, Tensor]:
        output = self(batch["features"], batch["lengths"])
        weight = self.class_weights if self.hparams.class_weighted_loss else None
        loss = F.cross_entropy(output.logits, batch["labels"], weight=weight)
        return output, loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output, loss = self._shared_step(batch)
        batch_size = len(batch["labels"])
        self.train_metrics.update(output.logits, batch["labels"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        output, loss = self._shared_step(batch)
        batch_size = len(batch["labels"])
        self.val_metrics.update(output.logits, batch["labels"])
        self.val_confmat.update(output.logits, batch["labels"])
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        if batch_idx == 0 and self.hparams.num_attention_maps > 0:
            self._keep_attention_samples(batch, output)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        output, loss = self._shared_step(batch)
        batch_size = len(batch["labels"])
        self.test_metrics.update(output.logits, batch["labels"])
        self.test_confmat.update(output.logits, batch["labels"])
        self.log("test/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True, batch_size=batch_size)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per utterance: index, class probabilities (B, K), predictions, attention alpha and valid positions."""
        output = self(batch["features"], batch["lengths"])
        probabilities = output.logits.softmax(dim=1)
        return {
            "index": batch["index"],
            "probabilities": probabilities,
            "predictions": probabilities.argmax(dim=1),
            "alpha": output.alpha,
            "positions": output.positions,
        }

    # ----------------------------------------------------------------- epoch ends and figures
    def on_validation_epoch_end(self) -> None:
        confusion = self.val_confmat.compute()  # every rank computes: it synchronises under DDP
        self.val_confmat.reset()
        samples, self._attention_samples = self._attention_samples, None
        writer = self._tensorboard()
        if writer is None or self.trainer.sanity_checking:
            return
        figure = confusion_matrix_figure(confusion, self.class_names, title=f"validation, epoch {self.current_epoch}")
        writer.add_figure("val/confusion_matrix", figure, global_step=self.global_step, close=True)
        if samples is not None:
            self._log_attention_maps(writer, samples)

    def on_test_epoch_end(self) -> None:
        confusion = self.test_confmat.compute()
        self.test_confmat.reset()
        self.test_confusion = confusion.cpu()
        totals = self.test_confusion.sum(dim=1)
        recall = self.test_confusion.diagonal().double() / totals.clamp(min=1)
        self.test_per_class_recall = recall.float()
        for name, value in zip(self.class_names, self.test_per_class_recall):
            self.log(f"test/recall_{name}", value, sync_dist=True)
        writer = self._tensorboard()
        if writer is not None:
            figure = confusion_matrix_figure(confusion, self.class_names, title="test")
            writer.add_figure("test/confusion_matrix", figure, global_step=self.global_step, close=True)

    def _tensorboard(self) -> Any:
        """The TensorBoard SummaryWriter on global rank 0, else None."""
        if not self.trainer.is_global_zero:
            return None
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _keep_attention_samples(self, batch: dict[str, Tensor], output: ModelOutput) -> None:
        """Remember the first validation utterances (the loader is not shuffled, so they are fixed)."""
        n = self.hparams.num_attention_maps
        self._attention_samples = {
            "features": batch["features"][:n].detach().cpu(),
            "lengths": batch["lengths"][:n].detach().cpu(),
            "labels": batch["labels"][:n].detach().cpu(),
            "alpha": output.alpha[:n].detach().float().cpu(),
            "positions": output.positions[:n].detach().cpu(),
            "probabilities": output.logits[:n].detach().float().softmax(dim=1).cpu(),
            "grid": output.grid,
        }

    def _log_attention_maps(self, writer: Any, samples: dict[str, Any]) -> None:
        """One figure per kept utterance: its features with the attention weights over input time."""
        min_frames = self.model.min_input_frames
        for k in range(len(samples["labels"])):
            length, positions = int(samples["lengths"][k]), int(samples["positions"][k])
            # the model pads clips shorter than its receptive field with silence: show that padding too
            features = F.pad(samples["features"][k, :, :length], (0, max(0, min_frames - length)))
            grid = samples["grid"]
            shape = (positions,) if grid is None else (grid[0], positions // grid[0])
            figure = attention_figure(
                features,
                samples["alpha"][k, :positions],
                shape,
                self.hparams.arch,
                probabilities=samples["probabilities"][k],
                class_names=self.class_names,
                title=f"val utterance {k} (true {self.class_names[int(samples['labels'][k])]})",
            )
            writer.add_figure(f"val/attention_{k}", figure, global_step=self.global_step, close=True)
