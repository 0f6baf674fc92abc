"""What the data layer hands the models: one utterance (``Item``) and a zero-padded batch (``Batch``).

Both sides read these records, so they live below both: ``models`` never imports ``data``.
"""
from __future__ import annotations

from typing import NotRequired, TypedDict

from torch import Tensor


class Item(TypedDict):
    """One utterance of a split."""

    features: Tensor  # (F, n) float32
    label: int
    index: int  # position in the datamodule's utterance list
    speaker_stats: NotRequired[Tensor]  # (2, F) mean and std of its speaker (normalization: speaker)


class Batch(TypedDict):
    """A zero-padded batch, as every model step receives it."""

    features: Tensor  # (B, F, N) float32, zero past lengths[b]
    lengths: Tensor  # (B,) int64 valid frames
    labels: Tensor  # (B,) int64
    index: Tensor  # (B,) int64
    speaker_stats: NotRequired[Tensor]  # (B, 2, F)
