"""Several trained models of one configuration (typically seeds) used as one: their class probabilities averaged.

This is the seed ensemble that ``cv --repeats R`` scores in its report (the mean of the runs' test
probabilities), made usable for prediction: ``predict --ckpt_path A.ckpt B.ckpt C.ckpt``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ser_lightning.functionals import prosodic_functionals
from ser_lightning.models.layers import ModelOutput

MATCHING_HPARAMS = ("arch", "class_names", "normalization")
"""What every member must share with the first: the same classes, the same input normalisation and attention layout."""


class SeedEnsemble(nn.Module):
    """Members' mean class probabilities (returned as their log, so ``softmax`` gives the mean) and mean attention.

    Exposes the first member's ``hparams`` and ``model`` (receptive field), so it stands in for a single
    ``SERModule`` wherever a trained model is used for prediction.
    """

    def __init__(self, members: Sequence[Any]) -> None:
        if len(members) < 2:
            raise ValueError(f"a seed ensemble needs at least two models, got {len(members)}")
        first = members[0]
        for index, member in enumerate(members[1:], start=1):
            for key in MATCHING_HPARAMS:
                if member.hparams[key] != first.hparams[key]:
                    raise ValueError(f"ensemble member {index}: {key} {member.hparams[key]!r} differs from member 0's "
                                     f"{first.hparams[key]!r}")
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def hparams(self) -> Any:
        return self.members[0].hparams

    @property
    def model(self) -> nn.Module:
        return self.members[0].model

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def reads_functionals(self) -> bool:
        return any(getattr(member, "reads_functionals", False) for member in self.members)

    def forward(self, features: Tensor, lengths: Tensor | None = None, speaker_stats: Tensor | None = None,
                functionals: Tensor | None = None) -> ModelOutput:
        """The members' mean; the prosodic functionals their statistics heads read are computed once for all."""
        if functionals is None and self.reads_functionals:
            if lengths is None:
                lengths = torch.full((features.shape[0],), features.shape[-1], dtype=torch.int64, device=features.device)
            functionals = prosodic_functionals(features, lengths)
        outputs = [member(features, lengths, speaker_stats, functionals) for member in self.members]
        probabilities = torch.stack([output.logits.float().softmax(dim=1) for output in outputs]).mean(dim=0)
        first = outputs[0]
        alpha = first.alpha
        if all(output.alpha.shape == alpha.shape for output in outputs):  # the same layout: average the maps too
            alpha = torch.stack([output.alpha for output in outputs]).mean(dim=0)
        return ModelOutput(probabilities.log(), alpha, first.positions, first.grid)
