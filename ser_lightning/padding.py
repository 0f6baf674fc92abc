"""Variable-length batches: zero-padded stacks along the last axis and their length masks.

Every batch in the project holds utterances of different lengths, zero-padded at the end of the
last (time) axis, with ``lengths`` (B,) int64 counting the valid positions of each row. These two
helpers are the only places that build such batches and masks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """(B,) lengths -> (B, size) boolean mask, True at positions t < lengths[b]."""
    return torch.arange(size, device=lengths.device) < lengths.unsqueeze(-1)


def pad_last(tensors: Sequence[Tensor], min_size: int = 0) -> tuple[Tensor, Tensor]:
    """Stack (..., n_b) tensors of equal leading shape into (B, ..., N), zero-padded at the end.

    N is the largest n_b (at least ``min_size``). Returns the batch and lengths (B,) int64 = n_b.
    """
    if not tensors:
        raise ValueError("pad_last needs at least one tensor")
    size = max(min_size, *(t.shape[-1] for t in tensors))
    first = tensors[0]
    batch = first.new_zeros(len(tensors), *first.shape[:-1], size)
    for row, tensor in enumerate(tensors):
        batch[row, ..., : tensor.shape[-1]] = tensor
    lengths = torch.tensor([t.shape[-1] for t in tensors], dtype=torch.int64, device=first.device)
    return batch, lengths
