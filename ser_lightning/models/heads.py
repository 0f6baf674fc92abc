"""The statistics head: a linear classifier on utterance statistics whose logits join the attention head's.

What it reads (``model.statistics``, a list; their columns concatenated, then standardised with the
training split's mean and standard deviation):

- ``pooled``: ``functionals.utterance_statistics`` of the normalised input;
- ``prosodic``: ``functionals.prosodic_functionals`` of the raw input (needs the pitch rows), z-normalised
  per speaker with that speaker's functional statistics under ``normalization: speaker`` (the columns
  after the frame rows of ``speaker_stats``);
- ``voiced``: ``functionals.voiced_statistics``, each normalised row's mean and spread over the voiced frames
  only (needs the pitch rows).

How it is trained (``model.statistics_head``), one class each:

- ``joint`` (``JointHead``): trained with the network, each head also getting its own loss;
- ``logistic`` (``LogisticHead``): fitted before training as a class-balanced logistic regression on the
  training split (C chosen by the validation speakers' UA, as the baselines do), then frozen, so that the
  attention head learns what the statistics leave. While the network trains, each training utterance gets
  the head's *cross-fitted* logits (from regressions fitted without its speaker: speaker-grouped folds of
  the training speakers), not those of the regression that saw it: on its own training data a regression is
  more often right and surer than on a new speaker, and the network would learn to correct that optimism
  instead of the head's real errors (stacking, Wolpert 1992).
- ``stacked`` (``StackedHead``): the same frozen regression, but the network learns the task on its own logits
  (not what the head leaves); the two are combined afterwards, the network's share chosen on the validation
  speakers (stacking of two models trained apart).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ser_lightning.functionals import (NUM_PROSODIC, num_statistics, prosodic_functionals, utterance_statistics,
                                       voiced_statistics)

STATISTICS_SETS = ("pooled", "prosodic", "voiced")
PITCH_SETS = ("prosodic", "voiced")
"""The sets that read the pitch rows."""


def set_width(name: str, num_features: int) -> int:
    return {"pooled": num_statistics(num_features), "voiced": 2 * num_features}.get(name, NUM_PROSODIC)


class StatisticsHead(nn.Module):
    """Standardised statistics -> logits. Subclasses say how it is trained: ``trainable`` (its weights learn with
    the network), ``deep_supervision`` (its logits also get their own loss, from unmixed batches under mixup;
    otherwise they join the mixed ones), ``residual`` (the network's training loss is on the sum of both heads'
    logits; otherwise on the network's alone) and ``prepare`` (before training)."""

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True
    deep_supervision: ClassVar[bool] = False
    residual: ClassVar[bool] = True

    def __init__(self, num_features: int, num_classes: int, sets: Sequence[str], c_choice: str = "validation") -> None:
        super().__init__()
        self.num_features, self.sets, self.c_choice = num_features, tuple(sets), c_choice
        width = sum(set_width(name, num_features) for name in self.sets)
        self.linear = nn.Linear(width, num_classes)
        self.linear.requires_grad_(self.trainable)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @property
    def reads_prosodic(self) -> bool:
        """Whether the head reads the prosodic functionals (which a caller may compute once and pass in)."""
        return "prosodic" in self.sets

    def inputs(self, raw: Tensor, x: Tensor, lengths: Tensor, speaker_stats: Tensor | None,
               functionals: Tensor | None = None) -> Tensor:
        """(B, D) statistics before standardisation, from raw and normalised (B, F, N) features; ``functionals``:
        the (B, NUM_PROSODIC) ``prosodic_functionals`` of ``raw`` when the caller has them already (computed here
        otherwise)."""
        columns = []
        for name in self.sets:
            if name == "pooled":
                columns.append(utterance_statistics(x, lengths))
                continue
            if name == "voiced":
                columns.append(voiced_statistics(x, raw, lengths))
                continue
            functionals = (prosodic_functionals(raw, lengths) if functionals is None else functionals).to(x.dtype)
            if speaker_stats is not None and speaker_stats.shape[-1] > self.num_features:
                own = speaker_stats[..., self.num_features :].to(x.dtype)  # (B, 2, G)
                functionals = (functionals - own[:, 0]) / own[:, 1]
            columns.append(functionals)
        return torch.cat(columns, dim=1)

    def forward(self, raw: Tensor, x: Tensor, lengths: Tensor, speaker_stats: Tensor | None,
                index: Tensor | None = None, functionals: Tensor | None = None) -> Tensor:
        """Logits of a batch; ``index`` (the utterances' datamodule indices) selects training-time offsets, if any;
        ``functionals``: the prosodic functionals of ``raw``, if the caller has them (see ``inputs``)."""
        offsets = getattr(self, "offsets", None)
        if self.training and offsets is not None and index is not None:
            return offsets[index.to(offsets.device)].to(x.dtype)
        return self.linear((self.inputs(raw, x, lengths, speaker_stats, functionals) - self.mean) / self.std)

    def standardise(self, rows: Tensor) -> np.ndarray:
        return ((rows - self.mean) / self.std).double().cpu().numpy()

    @torch.no_grad()
    def prepare(self, train: Tensor, train_labels: Sequence[int], val: Tensor, val_labels: Sequence[int],
                train_groups: Sequence[str], train_index: Sequence[int], num_utterances: int) -> None:
        """Before training: the standardisation from the training rows (and, for a frozen head, its weights)."""
        self.mean.copy_(train.mean(0))
        self.std.copy_(train.std(0, unbiased=False).clamp_min(1e-5))


class JointHead(StatisticsHead):
    """Trained with the network (deep supervision: the head's own loss is added to the combined one)."""

    name = "joint"
    deep_supervision = True


class LogisticHead(StatisticsHead):
    """A logistic regression fitted before training and then frozen; C by the validation speakers' UA, or with
    ``c_choice="speakers"`` by the UA over the validation speakers and every training speaker held out in turn."""

    name = "logistic"
    trainable = False

    @torch.no_grad()
    def prepare(self, train: Tensor, train_labels: Sequence[int], val: Tensor, val_labels: Sequence[int],
                train_groups: Sequence[str], train_index: Sequence[int], num_utterances: int) -> None:
        from ser_lightning.models.logistic import cross_fitted_logits, fit_logistic, logit_weights

        super().prepare(train, train_labels, val, val_labels, train_groups, train_index, num_utterances)
        inputs = self.standardise(train)
        fitted = fit_logistic(inputs, train_labels, self.standardise(val), val_labels, scaled=True,
                              train_groups=train_groups if self.c_choice == "speakers" else None)
        classes = self.linear.out_features
        weight, bias = logit_weights(fitted, classes)
        self.linear.weight.copy_(torch.as_tensor(weight))
        self.linear.bias.copy_(torch.as_tensor(bias))
        if not self.residual:  # the network never trains on the head's logits
            return
        offsets = torch.zeros(num_utterances, classes)
        offsets[list(train_index)] = torch.as_tensor(
            cross_fitted_logits(inputs, train_labels, train_groups, fitted.C, classes), dtype=torch.float32)
        self.register_buffer("offsets", offsets, persistent=False)


class StackedHead(LogisticHead):
    """The frozen regression of ``LogisticHead``; the network trains on its own logits, not on the head's residual."""

    name = "stacked"
    residual = False


HEADS: dict[str, type[StatisticsHead]] = {head.name: head for head in (JointHead, LogisticHead, StackedHead)}
"""``model.statistics_head`` -> its class (``none``: no head): a new mode is one ``StatisticsHead`` subclass and its
entry here."""
