"""Collating items into batches, the per-split dataset, and length-bucketed batch sampling."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, Sampler

from ser_lightning.batch import Batch, Item
from ser_lightning.padding import pad_last

from .features import SpecAugment


def collate_utterances(items: Sequence[Item]) -> Batch:
    """Stack items into a zero-padded Batch."""
    if not items:
        raise ValueError("collate_utterances got an empty batch")
    features, lengths = pad_last([item["features"] for item in items])
    batch = Batch(
        features=features,
        lengths=lengths,
        labels=torch.tensor([item["label"] for item in items], dtype=torch.int64),
        index=torch.tensor([item["index"] for item in items], dtype=torch.int64),
    )
    if "speaker_stats" in items[0]:
        batch["speaker_stats"] = torch.stack([item["speaker_stats"] for item in items])
    return batch


class UtteranceDataset(Dataset):
    """The utterances of one split: optional crop/pad to ``crop_frames`` and augmentation."""

    def __init__(
        self,
        features: Sequence[Tensor],
        labels: Sequence[int],
        indices: Sequence[int],
        *,
        speaker_stats: Sequence[Tensor] | None = None,
        crop_frames: int | None = None,
        random_crop: bool = False,
        augment: SpecAugment | None = None,
    ) -> None:
        self.features, self.labels, self.indices = features, labels, list(indices)
        self.speaker_stats = speaker_stats
        self.crop_frames, self.random_crop, self.augment = crop_frames, random_crop, augment

    def __len__(self) -> int:
        return len(self.indices)

    def length(self, position: int) -> int:
        """Frames of item ``position`` after cropping."""
        frames = self.features[self.indices[position]].shape[1]
        return min(frames, self.crop_frames) if self.crop_frames else frames

    def __getitem__(self, position: int) -> Item:
        index = self.indices[position]
        features = self.features[index]
        frames = features.shape[1]
        if self.crop_frames and frames > self.crop_frames:
            extra = frames - self.crop_frames
            start = int(torch.randint(0, extra + 1, ())) if self.random_crop else extra // 2
            features, frames = features[:, start : start + self.crop_frames], self.crop_frames
        if self.augment is not None:
            features = self.augment(features)
        if self.crop_frames and frames < self.crop_frames:
            features = torch.nn.functional.pad(features, (0, self.crop_frames - frames))
        item = Item(features=features, label=self.labels[index], index=index)
        if self.speaker_stats is not None:
            item["speaker_stats"] = self.speaker_stats[index]
        return item


class BucketBatchSampler(BatchSampler):
    """Batches of utterances of similar length (less padding), drawn from any index sampler.

    The indices ``sampler`` yields are taken ``pool_batches`` batches at a time, sorted by length
    within the pool and cut into batches; the batches of an epoch are then shuffled with
    ``generator``. Because it is a ``BatchSampler`` over a sampler, Lightning can swap in a
    ``DistributedSampler`` under DDP: every process then buckets its own shard.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: Sequence[int],
        pool_batches: int = 20,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.pool_batches, self.generator = list(lengths), pool_batches, generator

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        pool = self.batch_size * self.pool_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda index: self.lengths[index])
            batches += [chunk[first : first + self.batch_size] for first in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        for position in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[position]
