"""SERDataModule: corpus scanning, cached features, k-fold splits and padded batches."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from .audio import AudioError, load_audio
from .cache import FeatureCache
from .corpora import CORPORA, scan_corpus
from .features import NORMALIZATION_MODES, FeatureConfig, FeatureExtractor, SpecAugment, SpecAugmentConfig
from .features import feature_stats as compute_feature_stats
from .folds import PROTOCOLS, SPLITS, FoldPlan, format_fold_plan, make_fold_plan
from .records import Utterance, resolve_emotions
from .synth import default_cache_dir, ensure_synthetic_corpus

log = logging.getLogger(__name__)
SYNTHETIC_SAMPLE_RATE = 16000


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (per-file feature extraction is fastest on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def collate_utterances(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack items {features (F, n), length, label, index} into a zero-padded batch.

    Returns features (B, F, N) float32, lengths (B,) int64 (valid frames), labels (B,) int64 and
    index (B,) int64 (positions in the datamodule's utterance list).
    """
    if not items:
        raise ValueError("collate_utterances got an empty batch")
    num_frames = max(item["features"].shape[1] for item in items)
    features = torch.zeros(len(items), items[0]["features"].shape[0], num_frames)
    for b, item in enumerate(items):
        features[b, :, : item["features"].shape[1]] = item["features"]
    return {
        "features": features,
        "lengths": torch.tensor([int(item["length"]) for item in items], dtype=torch.int64),
        "labels": torch.tensor([int(item["label"]) for item in items], dtype=torch.int64),
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
    }


class UtteranceDataset(Dataset):
    """The utterances of one split: optional crop/pad to ``crop_frames`` and augmentation."""

    def __init__(
        self,
        features: Sequence[torch.Tensor],
        labels: Sequence[int],
        indices: Sequence[int],
        *,
        crop_frames: int | None = None,
        random_crop: bool = False,
        augment: SpecAugment | None = None,
    ) -> None:
        self.features, self.labels, self.indices = features, labels, list(indices)
        self.crop_frames, self.random_crop, self.augment = crop_frames, random_crop, augment

    def __len__(self) -> int:
        return len(self.indices)

    def length(self, k: int) -> int:
        """Frames of item ``k`` after cropping."""
        n = self.features[self.indices[k]].shape[1]
        return min(n, self.crop_frames) if self.crop_frames else n

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        x = self.features[i]
        n = x.shape[1]
        if self.crop_frames and n > self.crop_frames:
            extra = n - self.crop_frames
            start = int(torch.randint(0, extra + 1, ())) if self.random_crop else extra // 2
            x, n = x[:, start : start + self.crop_frames], self.crop_frames
        if self.augment is not None:
            x = self.augment(x)
        if self.crop_frames and n < self.crop_frames:
            x = torch.nn.functional.pad(x, (0, self.crop_frames - n))
        return {"features": x, "length": n, "label": self.labels[i], "index": i}


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length: shuffle, sort within pools of ``pool_batches`` batches, shuffle batches."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool_batches: int = 20
    ) -> None:
        self.lengths, self.batch_size, self.generator, self.pool = list(lengths), batch_size, generator, pool_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        pool = self.batch_size * self.pool
        batches = []
        for p in range(0, len(order), pool):
            chunk = sorted(order[p : p + pool], key=lambda k: self.lengths[k])
            batches += [chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


class SERDataModule(pl.LightningDataModule):
    """Speech emotion data: corpus scan, cached features, one cross-validation fold, padded batches.

    Args (the ``data:`` section of a config):
        root: corpus folder (e.g. the extracted ``Audio_Speech_Actors_01-24``); None = built-in synthetic corpus.
        corpus: file-name convention of ``root`` (``ravdess``).
        emotions: ``default`` (neutral, happy, sad, angry), ``all`` (the 8) or a list of emotion names.
        feature: feature settings (name: logmel | spectrogram | seed_contour, and its parameters).
        normalization: ``global`` (training-split mean/std), ``utterance`` (per utterance) or ``none``; applied by the model.
        protocol: ``speaker_independent`` (speakers never shared between splits) or ``random`` (speaker-dependent, leaks).
        num_folds: number of cross-validation folds.
        fold: which fold (0 .. num_folds-1) is the test set.
        num_val_speakers: speakers held out of training for validation (early stopping, checkpoint choice).
        seed: seed of the fold assignment and of the training-batch order.
        batch_size: utterances per batch.
        num_workers: DataLoader worker processes (0 = in the main process).
        cache_dir: folder for the feature cache and the synthetic corpus (default ``$SER_LIGHTNING_CACHE`` or ``~/.cache/ser_lightning``).
        crop_seconds: fixed length in seconds (random crop when training, centre crop otherwise, zero-pad short clips); None = whole utterances, padded per batch.
        bucketing: group training utterances of similar length into batches (less padding).
        augment: SpecAugment masking of training batches (``freq_mask_param``, ``time_mask_param``, ``num_masks``); None = off.
        lenient: skip (and report) files with malformed names or undecodable audio instead of stopping.
        synthetic_actors: actors of the built-in synthetic corpus (used when root is None).
        synthetic_seed: seed of the built-in synthetic corpus.
    """

    def __init__(
        self,
        root: str | None = None,
        corpus: str = "ravdess",
        emotions: str | list[str] = "default",
        feature: FeatureConfig = FeatureConfig(),
        normalization: Literal["global", "utterance", "none"] = "global",
        protocol: Literal["speaker_independent", "random"] = "speaker_independent",
        num_folds: int = 5,
        fold: int = 0,
        num_val_speakers: int = 2,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
        crop_seconds: float | None = None,
        bucketing: bool = False,
        augment: SpecAugmentConfig | None = None,
        lenient: bool = False,
        synthetic_actors: int = 24,
        synthetic_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.feature_config = feature if isinstance(feature, FeatureConfig) else FeatureConfig(**feature)
        if isinstance(augment, dict):
            augment = SpecAugmentConfig(**augment)
        self.augment_config = augment
        self._class_names = list(resolve_emotions(emotions))
        checks = [
            (corpus in CORPORA, f"data.corpus: unknown corpus '{corpus}'; choose from {sorted(CORPORA)}"),
            (normalization in NORMALIZATION_MODES, f"data.normalization: '{normalization}' is not one of {list(NORMALIZATION_MODES)}"),
            (protocol in PROTOCOLS, f"data.protocol: '{protocol}' is not one of {list(PROTOCOLS)}"),
            (num_folds >= 2, f"data.num_folds={num_folds}: at least 2 folds are needed"),
            (0 <= fold < num_folds, f"data.fold={fold} is out of range for data.num_folds={num_folds} (use 0..{num_folds - 1})"),
            (num_val_speakers >= 1, f"data.num_val_speakers={num_val_speakers}: at least 1 is needed"),
            (batch_size >= 1, f"data.batch_size={batch_size}: must be at least 1"),
            (num_workers >= 0, f"data.num_workers={num_workers}: must be >= 0"),
            (crop_seconds is None or crop_seconds > 0, f"data.crop_seconds={crop_seconds}: must be positive (or null)"),
            (synthetic_actors >= 2, f"data.synthetic_actors={synthetic_actors}: at least 2 actors are needed"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if root is not None and not Path(root).expanduser().is_dir():
            raise ValueError(f"data.root: '{root}' is not an existing folder")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.utterances: list[Utterance] = []
        self.features: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.skipped: list[tuple[Path, str]] = []
        self.fold_plan: FoldPlan | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- available before setup -------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def num_features(self) -> int:
        return self.feature_config.num_features

    # -- data preparation -------------------------------------------------------------------
    def _corpus_root(self) -> Path:
        if self.hparams.root is not None:
            return Path(self.hparams.root).expanduser()
        return ensure_synthetic_corpus(
            self.cache_dir, actors=self.hparams.synthetic_actors, sample_rate=SYNTHETIC_SAMPLE_RATE,
            seed=self.hparams.synthetic_seed,
        )

    def prepare_data(self) -> None:
        """Generate the synthetic corpus once when no data root is given."""
        self._corpus_root()

    def setup(self, stage: str | None = None) -> None:
        """Scan, load all features once (through the disk cache), split into folds, compute statistics."""
        if self.fold_plan is not None:
            return
        hp = self.hparams
        scan = scan_corpus(hp.corpus, self._corpus_root(), self._class_names, lenient=hp.lenient)
        plan_options = dict(
            num_folds=hp.num_folds, fold=hp.fold, protocol=hp.protocol, seed=hp.seed,
            num_val_speakers=hp.num_val_speakers,
        )
        make_fold_plan(scan.utterances, self._class_names, **plan_options)  # fail early, before decoding
        utterances, features, skipped = self._load_features(scan.utterances)
        self.skipped = scan.skipped + skipped
        if self.skipped:
            rank_zero_warn(f"data: skipped {len(self.skipped)} file(s), e.g. {self.skipped[0][1]}")
        self.utterances, self.features = utterances, features
        self.labels = [self._class_names.index(u.emotion) for u in utterances]
        self.fold_plan = make_fold_plan(utterances, self._class_names, **plan_options)
        for split in SPLITS:
            if not self.fold_plan.split(split):
                raise ValueError(f"data: the {split} split of fold {hp.fold} is empty; use fewer folds or more data")
        rank_zero_info(format_fold_plan(self.fold_plan, self._class_names))
        self._stats = compute_feature_stats([features[i] for i in self.fold_plan.train])

    def _load_features(
        self, utterances: list[Utterance]
    ) -> tuple[list[Utterance], list[torch.Tensor], list[tuple[Path, str]]]:
        """Features of every utterance; files that fail are collected (and fatal unless lenient)."""
        cfg = self.feature_config
        extractor = FeatureExtractor(cfg)
        cache = FeatureCache(self.cache_dir, cfg.key())
        kept, features, failed = [], [], []
        with torch.no_grad(), torch_threads(1):
            for u in utterances:
                try:
                    compute = partial(self._extract, extractor, u.path)
                    features.append(cache.get_or_compute(u.path, compute, extractor.num_features))
                    kept.append(u)
                except AudioError as err:
                    failed.append((u.path, str(err)))
        log.info("features: %d from cache, %d computed", cache.hits, cache.misses)
        if failed and not self.hparams.lenient:
            listing = "\n  ".join(reason for _, reason in failed[:10])
            raise AudioError(
                f"{len(failed)} of {len(utterances)} audio files could not be used "
                f"(set data.lenient=true to skip them):\n  {listing}"
            )
        return kept, features, failed

    def _extract(self, extractor: FeatureExtractor, path: Path) -> torch.Tensor:
        wave = load_audio(path, extractor.sample_rate, trim_silence=self.feature_config.trim_silence)
        return extractor(wave)

    # -- results of setup -------------------------------------------------------------------
    @property
    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) per feature over the training split of the current fold."""
        if self._stats is None:
            raise RuntimeError("SERDataModule.feature_stats is available after setup()")
        return self._stats

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """Utterances per class (num_classes,) int64 in ``split`` (train, val or test)."""
        if self.fold_plan is None:
            raise RuntimeError("SERDataModule.class_counts is available after setup()")
        self.fold_plan.split(split)  # validates the name
        counts = self.fold_plan.counts[split]
        return torch.tensor([counts[c] for c in self._class_names], dtype=torch.int64)

    # -- loaders ----------------------------------------------------------------------------
    def _dataset(self, split: str) -> UtteranceDataset:
        if self.fold_plan is None:
            raise RuntimeError("call SERDataModule.setup() before asking for data loaders")
        crop = None
        if self.hparams.crop_seconds is not None:
            crop = max(1, round(self.hparams.crop_seconds / FeatureExtractor(self.feature_config).hop_seconds))
        train = split == "train"
        augment = SpecAugment(self.augment_config) if train and self.augment_config is not None else None
        return UtteranceDataset(
            self.features, self.labels, self.fold_plan.split(split), crop_frames=crop, random_crop=train, augment=augment
        )

    def _loader(self, dataset: UtteranceDataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset, collate_fn=collate_utterances, num_workers=workers, persistent_workers=workers > 0, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        generator = torch.Generator().manual_seed(self.hparams.seed)
        if self.hparams.bucketing:
            lengths = [dataset.length(k) for k in range(len(dataset))]
            sampler = BucketBatchSampler(lengths, self.hparams.batch_size, generator)
            return self._loader(dataset, batch_sampler=sampler, generator=generator)
        return self._loader(dataset, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), batch_size=self.hparams.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
