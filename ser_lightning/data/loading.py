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
BATCH_SECONDS = 256
"""Audio decoded ahead of extraction (bounds memory; the extractor forms its own batches within it)."""


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
    """Features of every utterance; AudioError listing every unusable file unless ``lenient``.

    Cached files are read first; the others are decoded and extracted in groups of about
    ``BATCH_SECONDS`` of audio (``FeatureExtractor.extract_many``: batched for a neural front end)
    and stored in the cache.
    """
    extractor = FeatureExtractor(feature)
    cache = FeatureCache(cache_dir, feature.key())
    features: dict[int, Tensor] = {}
    failures: dict[int, str] = {}
    missing = []
    for index, utterance in enumerate(utterances):
        cached = cache.lookup(utterance.path, extractor.num_features)
        if cached is None:
            missing.append(index)
        else:
            features[index] = cached
    if missing:
        log.info("features: computing %d of %d files (%s)", len(missing), len(utterances), feature.name)
    # per-file spectrograms are fastest on one thread; a neural front end uses them all
    threads = torch.get_num_threads() if extractor.neural else 1
    with torch.no_grad(), torch_threads(threads):
        for group in _decoded_groups(missing, utterances, extractor, feature.trim_silence, failures):
            for (index, _), values in zip(group, extractor.extract_many([wave for _, wave in group])):
                cache.store(utterances[index].path, values)
                features[index] = values
    log.info("features: %d from cache, %d computed", cache.hits, len(missing) - len(failures))
    loaded = LoadedCorpus([], [])
    for index, utterance in enumerate(utterances):
        if index in failures:
            loaded.skipped.append((utterance.path, failures[index]))
        else:
            loaded.utterances.append(utterance)
            loaded.features.append(features[index])
    if loaded.skipped and not lenient:
        listing = "\n  ".join(reason for _, reason in loaded.skipped[:MAX_LISTED])
        raise AudioError(
            f"{len(loaded.skipped)} of {len(utterances)} audio files could not be used "
            f"(set data.lenient=true to skip them):\n  {listing}"
        )
    return loaded


def _decoded_groups(
    indices: Sequence[int], utterances: Sequence[Utterance], extractor: FeatureExtractor, trim_silence: bool,
    failures: dict[int, str],
) -> Iterator[list[tuple[int, Tensor]]]:
    """(index, waveform) groups of about BATCH_SECONDS of audio; undecodable files go to ``failures``."""
    group: list[tuple[int, Tensor]] = []
    samples, budget = 0, BATCH_SECONDS * extractor.sample_rate
    for index in indices:
        try:
            wave = load_audio(utterances[index].path, extractor.sample_rate, trim_silence=trim_silence)
        except AudioError as err:
            failures[index] = str(err)
            continue
        group.append((index, wave))
        samples += wave.shape[-1]
        if samples >= budget:
            yield group
            group, samples = [], 0
    if group:
        yield group
