"""The statistics head: a linear classifier on utterance statistics whose logits join the attention head's.

What it reads (``model.statistics``, a list; their columns concatenated, then standardised with the
training split's mean and standard deviation):

- ``pooled``: ``functionals.utterance_statistics`` of the normalised input;
- ``prosodic``: ``functionals.prosodic_functionals`` of the raw input (needs the pitch rows), z-normalised
  per speaker with that speaker's functional statistics under ``normalization: speaker`` (the columns
  after the frame rows of ``speaker_stats``).

How it is trained (``model.statistics_head``), one class each:

- ``joint`` (``JointHead``): trained with the network, each head also getting its own loss;
- ``logistic`` (``LogisticHead``): fitted before training as a class-balanced logistic regression on the
  training split (C chosen by the validation speakers' UA, as the baselines do), then frozen, so that the
  attention head learns what the statistics leave.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ser_lightning.functionals import NUM_PROSODIC, num_statistics, prosodic_functionals, utterance_statistics

STATISTICS_SETS = ("pooled", "prosodic")


def set_width(name: str, num_features: int) -> int:
    return num_statistics(num_features) if name == "pooled" else NUM_PROSODIC


class StatisticsHead(nn.Module):
    """Standardised statistics -> logits. Subclasses say how it is trained (``trainable``, ``prepare``)."""

    trainable = True

    def __init__(self, num_features: int, num_classes: int, sets: Sequence[str]) -> None:
        super().__init__()
        self.num_features, self.sets = num_features, tuple(sets)
        width = sum(set_width(name, num_features) for name in self.sets)
        self.linear = nn.Linear(width, num_classes)
        self.linear.requires_grad_(self.trainable)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def inputs(self, raw: Tensor, x: Tensor, lengths: Tensor, speaker_stats: Tensor | None) -> Tensor:
        """(B, D) statistics before standardisation, from raw and normalised (B, F, N) features."""
        columns = []
        for name in self.sets:
            if name == "pooled":
                columns.append(utterance_statistics(x, lengths))
                continue
            functionals = prosodic_functionals(raw, lengths).to(x.dtype)
            if speaker_stats is not None and speaker_stats.shape[-1] > self.num_features:
                own = speaker_stats[..., self.num_features :].to(x.dtype)  # (B, 2, G)
                functionals = (functionals - own[:, 0]) / own[:, 1]
            columns.append(functionals)
        return torch.cat(columns, dim=1)

    def forward(self, raw: Tensor, x: Tensor, lengths: Tensor, speaker_stats: Tensor | None) -> Tensor:
        return self.linear((self.inputs(raw, x, lengths, speaker_stats) - self.mean) / self.std)

    def standardise(self, rows: Tensor) -> np.ndarray:
        return ((rows - self.mean) / self.std).double().cpu().numpy()

    @torch.no_grad()
    def prepare(self, train: Tensor, train_labels: Sequence[int], val: Tensor, val_labels: Sequence[int]) -> None:
        """Before training: the standardisation from the training rows (and, for a frozen head, its weights)."""
        self.mean.copy_(train.mean(0))
        self.std.copy_(train.std(0, unbiased=False).clamp_min(1e-5))


class JointHead(StatisticsHead):
    """Trained with the network (deep supervision: the head's own loss is added to the combined one)."""


class LogisticHead(StatisticsHead):
    """A logistic regression fitted before training (C by the validation speakers' UA) and then frozen."""

    trainable = False

    @torch.no_grad()
    def prepare(self, train: Tensor, train_labels: Sequence[int], val: Tensor, val_labels: Sequence[int]) -> None:
        from ser_lightning.models.logistic import fit_logistic, logit_weights

        super().prepare(train, train_labels, val, val_labels)
        fitted = fit_logistic(self.standardise(train), train_labels, self.standardise(val), val_labels, scaled=True)
        weight, bias = logit_weights(fitted, self.linear.out_features)
        self.linear.weight.copy_(torch.as_tensor(weight))
        self.linear.bias.copy_(torch.as_tensor(bias))


HEADS: dict[str, Callable[..., StatisticsHead]] = {"joint": JointHead, "logistic": LogisticHead}
"""``model.statistics_head`` -> its class (``none``: no head)."""
