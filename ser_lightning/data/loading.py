"""Features of a scanned corpus: decode each file once, through the on-disk feature cache.

A file that cannot be decoded never stops the others: every failure is collected with its reason,
then either raised together (the default) or returned as skipped files (``lenient``).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .audio import AudioError, load_audio
from .cache import FeatureCache
from .features import FeatureConfig, FeatureExtractor
from .records import Utterance

log = logging.getLogger(__name__)
MAX_LISTED = 10


@dataclass
class LoadedCorpus:
    """Utterances with their features (same order) and the files that were skipped, with reasons."""

    utterances: list[Utterance]
    features: list[Tensor]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (per-file feature extraction is fastest on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_features(
    utterances: Sequence[Utterance], feature: FeatureConfig, cache_dir: Path, *, lenient: bool = False
) -> LoadedCorpus:
    """Features of every utterance; AudioError listing every unusable file unless ``lenient``."""
    extractor = FeatureExtractor(feature)
    cache = FeatureCache(cache_dir, feature.key())
    loaded = LoadedCorpus([], [])
    with torch.no_grad(), torch_threads(1):
        for utterance in utterances:

            def compute(path: Path = utterance.path) -> Tensor:
                return extractor(load_audio(path, extractor.sample_rate, trim_silence=feature.trim_silence))

            try:
                loaded.features.append(cache.get_or_compute(utterance.path, compute, extractor.num_features))
                loaded.utterances.append(utterance)
            except AudioError as err:
                loaded.skipped.append((utterance.path, str(err)))
    log.info("features: %d from cache, %d computed", cache.hits, cache.misses)
    if loaded.skipped and not lenient:
        listing = "\n  ".join(reason for _, reason in loaded.skipped[:MAX_LISTED])
        raise AudioError(
            f"{len(loaded.skipped)} of {len(utterances)} audio files could not be used "
            f"(set data.lenient=true to skip them):\n  {listing}"
        )
    return loaded
