"""Speaker-level normalisation statistics: each speaker's own recordings, never their labels.

``normalization: speaker`` standardises every utterance with the per-row mean and standard
deviation of all recordings of its speaker (training, validation and test speakers alike: a
speaker's unlabelled audio is available at test time, as in any deployment that enrols a speaker).
With the pitch rows, a speaker's statistics also hold the mean and standard deviation of each
prosodic functional over that speaker's utterances (``ser_lightning.functionals``), so that the
statistics head reads functionals relative to the speaker's own voice: a (2, F + G) tensor, frame
rows first. The functions here take features and speaker ids only, so they cannot read a label, and a
speaker's statistics depend on that speaker's recordings alone.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from ser_lightning.functionals import prosodic_rows
from ser_lightning.normalization import STD_FLOOR, feature_stats


def speaker_statistics(features: Sequence[Tensor], speakers: Sequence[Hashable], *,
                       functionals: bool = False, rows: Tensor | None = None) -> dict[Hashable, Tensor]:
    """Speaker id -> (2, F) per-row mean and std over all frames of that speaker's utterances; with
    ``functionals``, (2, F + G): then also the mean and std of each utterance-level prosodic functional
    (``rows``: the utterances' ``prosodic_rows``, when computed already)."""
    if len(features) != len(speakers):
        raise ValueError(f"speaker_statistics: {len(features)} feature tensors but {len(speakers)} speaker ids")
    groups: dict[Hashable, list[int]] = {}
    for index, speaker in enumerate(speakers):
        groups.setdefault(speaker, []).append(index)
    rows = (prosodic_rows(list(features)) if rows is None else rows) if functionals else None
    statistics = {}
    for speaker, indices in groups.items():
        frames = torch.stack(feature_stats([features[i] for i in indices]))
        if rows is not None:
            frames = torch.cat([frames, functional_stats(rows[indices])], dim=1)
        statistics[speaker] = frames
    return statistics


def functional_stats(rows: Tensor) -> Tensor:
    """(2, G) mean and standard deviation (floored) of (n, G) utterance functionals."""
    rows = rows.double()
    return torch.stack([rows.mean(0), rows.std(0, unbiased=False).clamp_min(STD_FLOOR)]).float()


def per_utterance(statistics: dict[Hashable, Tensor], speakers: Sequence[Hashable]) -> list[Tensor]:
    """The statistics of each utterance's speaker, in utterance order."""
    return [statistics[speaker] for speaker in speakers]
