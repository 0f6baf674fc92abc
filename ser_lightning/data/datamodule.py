"""SERDataModule: corpus scanning, cached features, k-fold or cross-corpus splits and padded batches."""
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
from .corpora import corpus_classes, corpus_info, scan_corpus
from .features import NORMALIZATION_MODES, FeatureConfig, FeatureExtractor, SpecAugment, SpecAugmentConfig
from .features import feature_stats as compute_feature_stats
from .folds import PROTOCOLS, SPLITS, FoldPlan, format_fold_plan, make_cross_corpus_plan, make_fold_plan
from .records import Utterance, resolve_emotions
from .synth import default_cache_dir, ensure_synthetic_corpus

log = logging.getLogger(__name__)
SYNTHETIC_SAMPLE_RATE = 16000


def _check_root(root: str | None, corpus: str, option: str) -> None:
    """A manifest root must be an existing file, any other root an existing folder."""
    if root is None:
        return
    path = Path(root).expanduser()
    if corpus_info(corpus).root_is_file:
        if not path.is_file():
            raise ValueError(f"{option}: '{root}' is not an existing file (corpus '{corpus}' expects a CSV file)")
    elif not path.is_dir():
        raise ValueError(f"{option}: '{root}' is not an existing folder")


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

    Corpora (``corpus``): ravdess, cremad, tess, savee, emodb (folders, names per their conventions:
    see ``ser_lightning.data.corpora``) and manifest (``root`` is a CSV file ``path,label,speaker``).
    Asking for an emotion the corpus lacks (e.g. calm on cremad) is an error that lists its classes;
    ``emotions: all`` means all of the corpus's classes. Speaker-independent folds need at least
    ``num_val_speakers + 2`` speakers (a test, validation and training speaker per fold): TESS has
    only 2, so on TESS use ``protocol: random`` (speaker-dependent) or test on it cross-corpus.

    Cross-corpus evaluation: with ``test_root`` set, the whole of ``corpus``/``root`` trains and
    validates (``num_val_speakers`` speakers held out for validation) and every file of
    ``test_corpus``/``test_root`` tests; ``fold``, ``num_folds`` and ``protocol`` do not apply.
    The classes are the requested emotions that both corpora have (those the test corpus lacks are
    dropped with a warning); normalisation statistics come from the training split only.

    Args (the ``data:`` section of a config):
        root: corpus folder (e.g. the extracted ``Audio_Speech_Actors_01-24``), or the CSV file for
            ``corpus: manifest``; None = built-in synthetic corpus (RAVDESS layout).
        corpus: file-name convention of ``root``: ravdess, cremad, tess, savee, emodb or manifest.
        test_corpus: convention of ``test_root`` (default: same as ``corpus``).
        test_root: a second corpus used only as the test set (cross-corpus evaluation); None = k-fold on ``root``.
        emotions: ``default`` (neutral, happy, sad, angry), ``all`` (the corpus's classes) or a list of emotion names.
        feature: feature settings (name: logmel | spectrogram | seed_contour, and its parameters).
        normalization: ``global`` (training-split mean/std), ``utterance`` (per utterance) or ``none``; applied by the model.
        protocol: ``speaker_independent`` (speakers never shared between splits) or ``random`` (speaker-dependent, leaks).
        num_folds: number of cross-validation folds.
        fold: which fold (0 .. num_folds-1) is the test set.
        num_val_speakers: speakers held out of training for validation (early stopping, checkpoint choice);
            with protocol random, the validation share is num_val_speakers / speakers of the utterances.
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
        test_corpus: str | None = None,
        test_root: str | None = None,
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
        self.test_corpus = test_corpus or corpus
        corpus_info(corpus)
        corpus_info(self.test_corpus, "data.test_corpus")
        checks = [
            (test_corpus is None or test_root is not None, f"data.test_corpus={test_corpus} needs data.test_root"),
            (test_root is None or protocol == "speaker_independent",
             f"data.protocol={protocol} does not apply to cross-corpus runs (data.test_root set): validation holds out speakers"),
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
        if root is None and corpus != "ravdess":
            raise ValueError(
                f"data.root: corpus '{corpus}' needs data.root (the built-in synthetic corpus has the RAVDESS layout; "
                f"`python -m ser_lightning synth DIR --layout {corpus}` writes a synthetic one)"
            )
        _check_root(root, corpus, "data.root")
        _check_root(test_root, self.test_corpus, "data.test_root")
        self._class_names = self._select_classes(emotions)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.utterances: list[Utterance] = []
        self.features: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.skipped: list[tuple[Path, str]] = []
        self.fold_plan: FoldPlan | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _select_classes(self, emotions: str | list[str]) -> list[str]:
        """The requested emotions, checked against the corpus (and intersected with the test corpus)."""
        hp = self.hparams
        requested = resolve_emotions(emotions)
        available = corpus_classes(hp.corpus, hp.root)
        title = corpus_info(hp.corpus).title
        if isinstance(emotions, str) and emotions.strip().lower() == "all":
            requested = tuple(e for e in requested if e in available)
        missing = [e for e in requested if e not in available]
        if missing:
            raise ValueError(f"data.emotions: {title} has no {missing}; its classes are {list(available)}")
        chosen = list(requested)
        if hp.test_root is not None:
            test_available = corpus_classes(self.test_corpus, hp.test_root)
            dropped = [e for e in chosen if e not in test_available]
            chosen = [e for e in chosen if e in test_available]
            if dropped:
                rank_zero_warn(
                    f"data: the test corpus ({corpus_info(self.test_corpus).title}) has no {dropped}; "
                    "they are left out of training and testing"
                )
            rank_zero_info(f"data: cross-corpus classes {chosen}")
        if len(chosen) < 2:
            raise ValueError(
                f"data.emotions: fewer than two classes remain ({chosen}) after matching the requested "
                f"emotions with the classes of the corpora"
            )
        return chosen

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
        scans = [scan_corpus(hp.corpus, self._corpus_root(), self._class_names, lenient=hp.lenient)]
        if hp.test_root is not None:
            scans.append(scan_corpus(self.test_corpus, hp.test_root, self._class_names, lenient=hp.lenient))
        self._plan([scan.utterances for scan in scans])  # fail early, before decoding
        parts, self.skipped, self.features = [], [], []
        for scan in scans:
            utterances, features, skipped = self._load_features(scan.utterances)
            parts.append(utterances)
            self.features += features
            self.skipped += scan.skipped + skipped
        if self.skipped:
            rank_zero_warn(f"data: skipped {len(self.skipped)} file(s), e.g. {self.skipped[0][1]}")
        self.utterances = [u for part in parts for u in part]
        self.labels = [self._class_names.index(u.emotion) for u in self.utterances]
        self.fold_plan = self._plan(parts)
        for split in SPLITS:
            if not self.fold_plan.split(split):
                raise ValueError(f"data: the {split} split of fold {hp.fold} is empty; use fewer folds or more data")
        rank_zero_info(format_fold_plan(self.fold_plan, self._class_names))
        self._stats = compute_feature_stats([self.features[i] for i in self.fold_plan.train])

    def _plan(self, parts: list[list[Utterance]]) -> FoldPlan:
        """The fold plan of [training corpus] or [training corpus, test corpus]."""
        hp = self.hparams
        if len(parts) == 2:
            return make_cross_corpus_plan(
                parts[0], parts[1], self._class_names, seed=hp.seed, num_val_speakers=hp.num_val_speakers
            )
        speakers = len({u.speaker for u in parts[0]})
        if hp.protocol == "speaker_independent" and speakers < hp.num_val_speakers + 2:
            title = corpus_info(hp.corpus).title
            raise ValueError(
                f"data.num_folds={hp.num_folds}: {title} has only {speakers} speakers, too few for speaker-independent "
                f"folds with data.num_val_speakers={hp.num_val_speakers} (each fold needs a test speaker, "
                f"{hp.num_val_speakers} validation speaker(s) and a training speaker). Use data.protocol=random "
                f"(speaker-dependent: speakers leak between splits) or test on {title} with a model trained on "
                f"another corpus (data.test_corpus, data.test_root)"
            )
        return make_fold_plan(
            parts[0], self._class_names, num_folds=hp.num_folds, fold=hp.fold, protocol=hp.protocol, seed=hp.seed,
            num_val_speakers=hp.num_val_speakers,
        )

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
