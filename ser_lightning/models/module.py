"""SERModule: the ``model:`` section of a configuration, validated here, and the steps that train it.

Figures (attention maps, confusion matrices) are drawn by ``ser_lightning.callbacks.FigureCallback``;
fitting and testing the best checkpoint is ``ser_lightning.run.training.fit_and_test``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ser_lightning.batch import Batch
from ser_lightning.models.attention import BACKENDS, POOLINGS
from ser_lightning.models.layers import ModelOutput
from ser_lightning.models.heads import HEADS, PITCH_SETS, STATISTICS_SETS, StatisticsHead
from ser_lightning.normalization import Normalization, check_normalization, normalize
from ser_lightning.models.seed1d import Seed1D
from ser_lightning.models.zhang2d import Zhang2D

ARCHS = ("seed1d", "zhang2d")
DEFAULT_LAM = {"seed1d": 0.8, "zhang2d": 0.3}
DEFAULT_DROPOUT = {"seed1d": 0.0, "zhang2d": 0.5}
LR_SCHEDULES = ("constant", "cosine")
C_CHOICES = ("validation", "speakers")
MONITOR = "val/UA"
CHECKPOINT_FILENAME = "epoch{epoch:03d}-valUA{val/UA:.4f}"


def class_weights_from_counts(counts: Tensor) -> Tensor:
    """Inverse-frequency weights total / (K * count_k); classes without examples get weight 0."""
    counts = counts.to(torch.float64)
    weights = counts.sum() / (len(counts) * counts)
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def stage_metrics(num_classes: int) -> MetricCollection:
    """WA (overall accuracy), UA (mean per-class recall) and macro-F1.

    Updates skip torchmetrics' input validation (its checks read values back from the device on every
    step); the inputs are the model's own logits and the datamodule's labels.
    """
    return MetricCollection(
        {
            "WA": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "UA": MulticlassAccuracy(num_classes, average="macro", validate_args=False),
            "F1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
        }
    )


def check_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the `model.<option>` that is wrong (the only place these are checked)."""
    o = options  # noqa: E741 - short on purpose: the checks below read as a table
    checks = [
        (o["arch"] in ARCHS, f"model.arch must be one of {ARCHS}, got {o['arch']!r}"),
        (o["num_features"] >= 1, f"model.num_features must be >= 1, got {o['num_features']}"),
        (o["num_classes"] >= 2, f"model.num_classes must be >= 2, got {o['num_classes']}"),
        (o["class_names"] is None or len(o["class_names"]) == o["num_classes"],
         f"model.class_names has {len(o['class_names'] or [])} names but model.num_classes is {o['num_classes']}"),
        (o["lam"] is None or o["lam"] > 0, f"model.lam must be > 0, got {o['lam']}"),
        (o["attention_dim"] is None or o["attention_dim"] >= 1,
         f"model.attention_dim must be >= 1 or null, got {o['attention_dim']}"),
        (o["width"] > 0, f"model.width must be > 0, got {o['width']}"),
        (o["pretrained_alexnet"] is None or (o["arch"] == "zhang2d" and o["width"] == 1.0),
         f"model.pretrained_alexnet needs model.arch zhang2d and model.width 1.0, got {o['arch']} at {o['width']}"),
        (o["dropout"] is None or 0 <= o["dropout"] < 1, f"model.dropout must be in [0, 1) or null, got {o['dropout']}"),
        (o["backend"] in BACKENDS, f"model.backend must be one of {BACKENDS}, got {o['backend']!r}"),
        (o["attention_pooling"] in POOLINGS,
         f"model.attention_pooling must be one of {POOLINGS}, got {o['attention_pooling']!r}"),
        (o["mixup_alpha"] >= 0, f"model.mixup_alpha must be >= 0, got {o['mixup_alpha']}"),
        (o["statistics_head"] == "none" or o["statistics_head"] in HEADS,
         f"model.statistics_head must be one of {('none', *HEADS)}, got {o['statistics_head']!r}"),
        (len(o["statistics"]) >= 1 and all(name in STATISTICS_SETS for name in o["statistics"]),
         f"model.statistics must list one or more of {STATISTICS_SETS}, got {o['statistics']!r}"),
        (not set(PITCH_SETS) & set(o["statistics"]) or o["statistics_head"] == "none" or o["pitch_rows"],
         f"model.statistics {o['statistics']!r}: {', '.join(PITCH_SETS)} read the pitch rows: set data.feature.pitch true"),
        (o["statistics_c"] in C_CHOICES, f"model.statistics_c must be one of {C_CHOICES}, got {o['statistics_c']!r}"),
        (o["lr"] > 0, f"model.lr must be > 0, got {o['lr']}"),
        (o["weight_decay"] >= 0, f"model.weight_decay must be >= 0, got {o['weight_decay']}"),
        (o["lr_schedule"] in LR_SCHEDULES, f"model.lr_schedule must be one of {LR_SCHEDULES}, got {o['lr_schedule']!r}"),
        (o["early_stopping_patience"] is None or o["early_stopping_patience"] >= 1,
         f"model.early_stopping_patience must be >= 1 or null, got {o['early_stopping_patience']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_normalization(o["normalization"], "model.normalization")


class StepOutput(NamedTuple):
    """One forward pass: the model's output with the combined logits, and every head's own logits."""

    output: ModelOutput  # logits = the sum of the heads' logits
    head_logits: tuple[Tensor, ...]  # (attention head, statistics head) or (attention head,)

    def with_parts(self) -> ModelOutput:
        """The output with ``parts`` (B, H, K): each head's logits (uncalibrated), for the report's ablation."""
        return self.output._replace(parts=torch.stack(self.head_logits, dim=1).detach())


HEAD_NAMES = ("attention", "statistics")
"""The heads of ``StepOutput.head_logits`` / ``ModelOutput.parts``, in order."""


def _upgrade_state_dict(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:  # noqa: ARG001
    """Read checkpoints of earlier versions: the statistics head's old keys, no temperature or network weight (1)."""
    renames = {"statistics_head.weight": "statistics_head.linear.weight", "statistics_head.bias": "statistics_head.linear.bias",
               "statistics_mean": "statistics_head.mean", "statistics_std": "statistics_head.std"}
    for old, new in renames.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    state_dict.setdefault(prefix + "temperature", torch.ones(()))
    state_dict.setdefault(prefix + "network_weight", torch.ones(()))


class SERModule(LightningModule):
    """Speech emotion recognition with an attention FCN (the YAML `model:` section).

    Args:
        arch: "seed1d" (1-D FCN over feature rows as channels) or "zhang2d" (AlexNet-style 2-D FCN).
        num_features: feature rows F of the input (B, F, N); linked from the data config.
        num_classes: number of emotion classes K; linked from the data config.
        class_names: names of the K classes, for logs and figures (default class_0 ...).
        lam: attention softmax sharpness lambda (> 0); None uses the arch default (0.8 seed1d, 0.3 zhang2d).
        attention_dim: attention projection size; None uses the last map's channels.
        width: channel multiplier (> 0): 1.0 is the course project's 5-10-20-30 (seed1d) or the paper's
            96-256-384-384-256 (zhang2d).
        dropout: dropout before the attention head's classifier; None uses the arch default (0 seed1d, 0.5 zhang2d).
        lrn: zhang2d local response normalisation after convs 1 and 2.
        pretrained_alexnet: zhang2d: local torchvision AlexNet state dict to initialise the convs from (read when
            the module is built; give pretrained_alexnet=None to load_from_checkpoint where the file is absent).
        backend: attention implementation: "auto", "fused" or "reference".
        attention_pooling: what the attention gives the classifier: ``mean`` (the attention-weighted mean of the
            last map's positions) or ``mean_std`` (attentive statistics pooling: their weighted mean and spread).
        normalization: "global", "speaker", "utterance" or "none" (see ``ser_lightning.normalization``); linked from data.
        statistics_head: a linear head on utterance statistics, standardised with training-split statistics,
            whose logits are added to the attention head's: a key of ``ser_lightning.models.heads.HEADS``, or
            ``none`` for no such head. ``joint``: trained with the network, each head also getting its own loss (deep supervision).
            ``logistic``: fitted before training as a class-balanced logistic regression on the training split
            (scikit-learn; C chosen by the validation speakers' UA, as the baselines do), then frozen: the
            attention head learns what the statistics leave. ``stacked``: the same frozen regression, the network
            trained on its own logits; their combination (the network's share) is chosen on the validation speakers.
        statistics: what the statistics head reads: ``pooled`` (per-row mean, std and mean absolute change of
            the normalised input, loudness dynamics, log duration) and/or ``prosodic`` (voice-science
            functionals of the raw input: F0, voicing, loudness, rate, spectral slope; z-normalised per
            speaker under ``normalization: speaker``; needs the pitch rows) and/or ``voiced`` (each normalised row's
            mean and spread over the voiced frames only; needs the pitch rows).
        statistics_c: how a frozen head's C is chosen: ``validation`` (the validation speakers' UA, as the baselines)
            or ``speakers`` (the UA over the validation speakers and every training speaker held out in turn).
        pitch_rows: whether the input's last two rows are the pitch track; linked from data (``feature.pitch``).
        class_weighted_loss: weight the cross-entropy by inverse training-split class frequency.
        mixup_alpha: mixup of training batches (after normalisation) with a Beta(alpha, alpha) weight for the
            attention head; 0 = off. The statistics head always learns from the clean batch.
        lr: AdamW learning rate.
        weight_decay: AdamW (decoupled) weight decay.
        lr_schedule: "constant" or "cosine" (cosine decay to 0 over the trainer's steps).
        early_stopping_patience: stop after this many validation epochs without a better val/UA (None: never).
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
        dropout: float | None = None,
        lrn: bool = True,
        pretrained_alexnet: str | None = None,
        backend: Literal["auto", "fused", "reference"] = "auto",
        attention_pooling: Literal["mean", "mean_std"] = "mean",
        normalization: Normalization = "global",
        statistics_head: str = "none",
        statistics: list[Literal["pooled", "prosodic", "voiced"]] | None = None,
        statistics_c: Literal["validation", "speakers"] = "validation",
        pitch_rows: bool = False,
        class_weighted_loss: bool = True,
        mixup_alpha: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        early_stopping_patience: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.statistics = list(statistics or ["pooled"])
        check_options(self.hparams)
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(num_classes)]
        lam = DEFAULT_LAM[arch] if lam is None else lam
        dropout = DEFAULT_DROPOUT[arch] if dropout is None else dropout
        self.model: Seed1D | Zhang2D
        if arch == "seed1d":
            self.model = Seed1D(num_features, num_classes, lam=lam, attention_dim=attention_dim, width=width,
                                dropout=dropout, backend=backend, pooling=attention_pooling)
        else:
            self.model = Zhang2D(num_features, num_classes, width=width, lam=lam, lrn=lrn, dropout=dropout,
                                 attention_dim=attention_dim, pretrained_alexnet=pretrained_alexnet, backend=backend,
                                 pooling=attention_pooling)
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.statistics_head: StatisticsHead | None = None
        if statistics_head != "none":
            self.statistics_head = HEADS[statistics_head](num_features, num_classes, self.hparams.statistics,
                                                          c_choice=statistics_c)
        self.register_buffer("temperature", torch.ones(()))  # fitted on the validation speakers after training
        self.register_buffer("network_weight", torch.ones(()))  # the attention head's share, chosen likewise
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)
        self.register_buffer("class_weights", torch.ones(num_classes))
        metrics = stage_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # the training loss is keyed "fit": a ModuleDict key cannot be "train" (nn.Module.train)
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("fit", "val", "test")})
        self._epoch_outputs: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {"train": [], "val": [], "test": []}

    # ----------------------------------------------------------------- setup and model
    def setup(self, stage: str) -> None:
        """For fit: normalisation statistics and class weights from the datamodule's training split.

        The datamodule provides ``feature_stats`` (F,) mean and std, ``class_counts("train")`` and,
        for the statistics head, ``utterances_of(split)`` ((features, speaker statistics or None) pairs),
        ``labels_of(split)``, ``speakers_of(split)``, ``indices_of(split)`` (the indices batches carry) and
        ``num_utterances``.
        """
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            rank_zero_warn("SERModule: no datamodule, so training-split statistics and class weights stay unset")
            return
        mean, std = datamodule.feature_stats
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        if self.hparams.class_weighted_loss:
            counts = datamodule.class_counts("train")
            missing = [self.class_names[k] for k in range(len(counts)) if counts[k] == 0]
            if missing:
                rank_zero_warn(f"SERModule: no training examples of {missing}: their loss weight is 0")
            self.class_weights.copy_(class_weights_from_counts(counts))
        if self.statistics_head is not None:
            self.statistics_head.prepare(self._statistics_rows(datamodule.utterances_of("train")),
                                         datamodule.labels_of("train"),
                                         self._statistics_rows(datamodule.utterances_of("val")),
                                         datamodule.labels_of("val"), datamodule.speakers_of("train"),
                                         datamodule.indices_of("train"), datamodule.num_utterances)

    @torch.no_grad()
    def _statistics_rows(self, utterances: list[tuple[Tensor, Tensor | None]]) -> Tensor:
        """The statistics head's inputs (before standardisation) of whole, unaugmented utterances."""
        rows = []
        for features, speaker_stats in utterances:
            features = features.unsqueeze(0).to(self.feature_mean.device)
            lengths = torch.tensor([features.shape[-1]], device=features.device)
            stats = None if speaker_stats is None else speaker_stats.unsqueeze(0).to(features.device)
            x = self.normalize(features, lengths, stats)
            rows.append(self.statistics_head.inputs(features, x, lengths, stats))
        return torch.cat(rows)

    def normalize(self, features: Tensor, lengths: Tensor, speaker_stats: Tensor | None = None) -> Tensor:
        """Raw (B, F, N) features -> the model's input, per ``normalization`` (speaker: stats (B, 2, F) needed)."""
        mode = self.hparams.normalization
        if mode == "speaker":
            if speaker_stats is None:
                raise ValueError("normalization 'speaker' needs speaker_stats (B, 2, W): each utterance's speaker "
                                 "statistics (see ser_lightning.data.speakers)")
            rows = features.shape[1]
            return normalize(features, lengths, mode, speaker_stats[:, 0, :rows], speaker_stats[:, 1, :rows])
        return normalize(features, lengths, mode, self.feature_mean, self.feature_std)

    @property
    def reads_functionals(self) -> bool:
        """Whether the statistics head reads the prosodic functionals of the raw features (``forward`` takes them
        precomputed: a stream computes each window's once, for its running statistics too)."""
        return self.statistics_head is not None and self.statistics_head.reads_prosodic

    def heads(self, features: Tensor, lengths: Tensor, speaker_stats: Tensor | None = None,
              index: Tensor | None = None, functionals: Tensor | None = None) -> StepOutput:
        """Normalise raw (B, F, N) features and run the model and the statistics head (logits: their sum);
        ``index`` (training batches) lets a frozen head give its cross-fitted logits; ``functionals``: the features'
        (B, NUM_PROSODIC) prosodic functionals when the caller has them (computed by the head otherwise)."""
        x = self.normalize(features, lengths, speaker_stats)
        output = self.model(x, lengths)
        if self.statistics_head is None:
            return StepOutput(output, (output.logits,))
        statistics_logits = self.statistics_head(features, x, lengths, speaker_stats, index, functionals)
        combined = self.network_weight * output.logits + statistics_logits
        return StepOutput(output._replace(logits=combined), (output.logits, statistics_logits))

    def forward(self, features: Tensor, lengths: Tensor | None = None, speaker_stats: Tensor | None = None,
                functionals: Tensor | None = None) -> ModelOutput:
        """Calibrated logits (divided by the temperature fitted on the validation speakers) of raw (B, F, N)
        features; lengths default to every frame. ``softmax`` of them is what predictions report. ``functionals``:
        ``prosodic_functionals(features, lengths)``, if the caller has them already."""
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[-1], dtype=torch.int64, device=features.device)
        output = self.heads(features, lengths, speaker_stats, functionals=functionals).output
        return output._replace(logits=output.logits / self.temperature)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[Callback]:
        """One checkpoint callback (the best val/UA, plus `last.ckpt` for resuming) and optional early stopping.

        It replaces the trainer's default checkpoint; with `trainer.enable_checkpointing: false` or `fast_dev_run`
        none is added.
        """
        callbacks: list[Callback] = []
        if self.trainer.checkpoint_callback is not None and not self.trainer.fast_dev_run:
            callbacks.append(ModelCheckpoint(
                monitor=MONITOR, mode="max", filename=CHECKPOINT_FILENAME, auto_insert_metric_name=False, save_last=True
            ))
        if self.hparams.early_stopping_patience is not None:
            callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=self.hparams.early_stopping_patience))
        return callbacks

    # ----------------------------------------------------------------- steps
    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        weight = self.class_weights if self.hparams.class_weighted_loss else None
        return F.cross_entropy(logits, labels, weight=weight)

    def model_step(self, batch: Batch) -> tuple[StepOutput, Tensor]:
        """Forward pass and loss on an unmixed batch: the combined logits', plus each head's own when the statistics
        head is deep-supervised (``joint``)."""
        step = self.heads(batch["features"], batch["lengths"], batch.get("speaker_stats"), batch.get("index"))
        residual = self.statistics_head is None or self.statistics_head.residual or not self.training
        loss = self._loss(step.output.logits if residual else step.head_logits[0], batch["labels"])
        if self.statistics_head is not None and self.statistics_head.deep_supervision:
            loss = loss + sum(self._loss(logits, batch["labels"]) for logits in step.head_logits)
        return step, loss

    def _mixup_step(self, batch: Batch) -> tuple[StepOutput, Tensor]:
        """Loss with mixup: the attention head sees the batch mixed with a shuffled copy of itself (after
        normalisation) and learns both labels by their weights. A deep-supervised statistics head (``joint``), a
        linear model that mixing would only blur, learns from the clean batch; any other (the frozen ``logistic``)
        adds the same mix of its two utterances' logits to the attention head's."""
        features, lengths, labels, speaker_stats = batch["features"], batch["lengths"], batch["labels"], batch.get("speaker_stats")
        x = self.normalize(features, lengths, speaker_stats)
        alpha = torch.tensor(float(self.hparams.mixup_alpha))
        weight = float(torch.distributions.Beta(alpha, alpha).sample())
        order = torch.randperm(len(labels), device=labels.device)
        output = self.model(weight * x + (1 - weight) * x[order], torch.maximum(lengths, lengths[order]))

        def mixed_loss(logits: Tensor) -> Tensor:
            return weight * self._loss(logits, labels) + (1 - weight) * self._loss(logits, labels[order])

        if self.statistics_head is None or not self.statistics_head.residual:
            return StepOutput(output, (output.logits,)), mixed_loss(output.logits)
        statistics_logits = self.statistics_head(features, x, lengths, speaker_stats, batch.get("index"))
        if self.statistics_head.deep_supervision:
            loss = mixed_loss(output.logits) + self._loss(statistics_logits, labels)
            return StepOutput(output, (output.logits, statistics_logits)), loss
        combined = output.logits + weight * statistics_logits + (1 - weight) * statistics_logits[order]
        return StepOutput(output._replace(logits=combined), (output.logits, statistics_logits)), mixed_loss(combined)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        step, loss = self._mixup_step(batch) if self.hparams.mixup_alpha > 0 else self.model_step(batch)
        self._log_stage("train", step.output.logits, batch["labels"], loss)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> ModelOutput:
        step, loss = self.model_step(batch)
        self._log_stage("val", step.output.logits, batch["labels"], loss)
        return step.with_parts()

    def test_step(self, batch: Batch, batch_idx: int) -> ModelOutput:
        step, loss = self.model_step(batch)
        self._log_stage("test", step.output.logits, batch["labels"], loss)
        return step.with_parts()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Per utterance: index, class probabilities (B, K), predictions, attention alpha and valid positions."""
        output = self(batch["features"], batch["lengths"], batch.get("speaker_stats"))
        probabilities = output.logits.softmax(dim=1)
        return {
            "index": batch["index"],
            "probabilities": probabilities,
            "predictions": probabilities.argmax(dim=1),
            "alpha": output.alpha,
            "positions": output.positions,
        }

    def _log_stage(self, stage: str, logits: Tensor, labels: Tensor, loss: Tensor) -> None:
        """Keep the batch's logits, labels and loss; the epoch's metrics are computed from them once, at its end."""
        self._epoch_outputs[stage].append((logits.detach(), labels, loss.detach() * len(labels)))

    def _log_epoch(self, stage: str) -> None:
        """Log the stage's epoch metrics (computed across processes under DDP) and start the next epoch afresh."""
        outputs, self._epoch_outputs[stage] = self._epoch_outputs[stage], []
        if not outputs:
            return
        logits, labels, losses = (torch.cat(part) if part[0].dim() else torch.stack(part) for part in zip(*outputs))
        metrics, loss = getattr(self, f"{stage}_metrics"), self.losses["fit" if stage == "train" else stage]
        metrics.update(logits, labels)
        loss.update(losses.sum() / len(labels), weight=len(labels))
        values = {**metrics.compute(), f"{stage}/loss": loss.compute()}
        metrics.reset()
        loss.reset()
        # already reduced across processes by torchmetrics: the mean over ranks changes nothing, but says so
        self.log_dict(values, prog_bar=stage != "test", sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
