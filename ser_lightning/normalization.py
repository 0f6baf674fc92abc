"""Feature normalisation applied inside the model, so that checkpoints carry it.

Modes (``data.normalization``, linked to ``model.normalization``):

- ``global``: per-row mean/std of the training split (stored in the model as buffers);
- ``speaker``: per-row mean/std of the utterance's speaker, computed from all of that speaker's
  recordings without their labels (``ser_lightning.data.speakers``); they travel with each batch;
- ``utterance``: each utterance's own mean/std over its valid frames;
- ``none``: only the padding is zeroed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from torch import Tensor

from ser_lightning.padding import length_mask

Normalization = Literal["global", "speaker", "utterance", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
STD_FLOOR = 1e-5
"""Standard deviations are clamped to at least this, so constant rows do not divide by zero."""


def check_normalization(mode: str, option: str) -> None:
    """Raise ValueError naming ``option`` unless ``mode`` is a normalisation mode: the one check, made where the
    configuration enters (the ``data:`` and ``model:`` sections); ``normalize`` trusts its mode."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"{option}: '{mode}' is not one of {list(NORMALIZATIONS)}")


def feature_stats(features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row mean and std (F,) over all frames of a list of (F, n) tensors (float64 sums)."""
    if not features:
        raise ValueError("feature_stats needs at least one utterance")
    total = sum(f.shape[1] for f in features)
    first = sum(f.double().sum(dim=1) for f in features)
    second = sum(f.double().pow(2).sum(dim=1) for f in features)
    return stats_from_sums(total, first, second)


def stats_from_sums(count: int, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std (floored at ``STD_FLOOR``, float32) from a count and the float64 sums of values and squares."""
    mean = first / count
    var = (second / count - mean.pow(2)).clamp_min(0.0)
    return mean.float(), var.sqrt().clamp_min(STD_FLOOR).float()


def normalize(
    x: Tensor, lengths: Tensor, mode: Normalization, mean: Tensor | None = None, std: Tensor | None = None
) -> Tensor:
    """Normalise (B, F, N) features over their valid frames; padded frames come back exactly 0.

    ``mean``/``std`` are (F,) for ``global`` and (B, F) per utterance for ``speaker``.
    """
    mask = length_mask(lengths, x.shape[-1]).unsqueeze(1).to(x.dtype)  # (B, 1, N)
    if mode in ("global", "speaker"):
        if mean is None or std is None:
            raise ValueError(f"normalize(mode={mode!r}) needs the mean and std")
        mean, std = mean.to(x.dtype), std.to(x.dtype)
        shape = (-1, x.shape[1], 1) if mean.dim() == 2 else (1, -1, 1)
        x = (x - mean.reshape(shape)) / std.clamp_min(STD_FLOOR).reshape(shape)
    elif mode == "utterance":
        count = mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
        mu = (x * mask).sum(dim=-1, keepdim=True) / count
        var = ((x - mu).pow(2) * mask).sum(dim=-1, keepdim=True) / count
        x = (x - mu) / var.sqrt().clamp_min(STD_FLOOR)
    return x * mask
