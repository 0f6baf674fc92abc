"""Speaker-level normalisation statistics: each speaker's own recordings, never their labels.

``normalization: speaker`` standardises every utterance with the per-row mean and standard
deviation of all recordings of its speaker (training, validation and test speakers alike: a
speaker's unlabelled audio is available at test time, as in any deployment that enrols a speaker).
The functions here take features and speaker ids only, so they cannot read a label, and a speaker's
statistics depend on that speaker's recordings alone.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from ser_lightning.models.normalization import feature_stats


def speaker_statistics(features: Sequence[Tensor], speakers: Sequence[Hashable]) -> dict[Hashable, Tensor]:
    """Speaker id -> (2, F) tensor of per-row mean and std over all frames of that speaker's utterances."""
    if len(features) != len(speakers):
        raise ValueError(f"speaker_statistics: {len(features)} feature tensors but {len(speakers)} speaker ids")
    groups: dict[Hashable, list[Tensor]] = {}
    for tensor, speaker in zip(features, speakers):
        groups.setdefault(speaker, []).append(tensor)
    return {speaker: torch.stack(feature_stats(group)) for speaker, group in groups.items()}


def per_utterance(statistics: dict[Hashable, Tensor], speakers: Sequence[Hashable]) -> list[Tensor]:
    """The (2, F) statistics of each utterance's speaker, in utterance order."""
    return [statistics[speaker] for speaker in speakers]
