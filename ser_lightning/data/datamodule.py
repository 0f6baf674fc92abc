"""SERDataModule: the ``data:`` section of a configuration, validated here, and the loaders of one fold.

Loading (scan, decode, features, cache, skipped files) is ``loading.load_features``; fold planning
is ``folds`` (its options are a ``folds.SplitConfig``, which checks them); the feature options are a
``features.FeatureConfig``; batches are ``batches``. This class checks the other options, runs those
once in ``setup`` and hands out loaders.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from ser_lightning.normalization import Normalization, check_normalization, feature_stats

from .batches import BucketBatchSampler, UtteranceDataset, collate_utterances
from .corpora import corpus_classes, corpus_info, scan_corpus
from .emobox import fold_folders
from .features import FeatureConfig, FeatureExtractor, SpecAugment, SpecAugmentConfig
from .folds import (
    SPLITS, FoldPlan, SplitConfig, SplitProtocol, check_fold_feasibility, format_fold_plan, make_cross_corpus_plan,
    make_fold_plan,
)
from .loading import load_features
from .records import UNUSABLE_AUDIO, Skipped, Utterance, resolve_emotions, unused_summary
from .speakers import per_utterance, speaker_statistics
from .synth import default_cache_dir, ensure_synthetic_corpus

SYNTHETIC_SAMPLE_RATE = 16000


def _check_root(root: str | None, corpus: str, option: str) -> None:
    """A manifest root must be an existing file, any other root an existing folder."""
    if root is None:
        return
    if not str(root).strip():
        raise ValueError(f"{option}: empty; give the corpus {'file' if corpus_info(corpus).root_is_file else 'folder'}"
                         f"{' (or null for the built-in synthetic corpus)' if option == 'data.root' else ''}")
    path = Path(root).expanduser()
    if corpus_info(corpus).root_is_file:
        if not path.is_file():
            raise ValueError(f"{option}: '{root}' is not an existing file (corpus '{corpus}' expects a CSV file)")
    elif not path.is_dir():
        raise ValueError(f"{option}: '{root}' is not an existing folder")


class SERDataModule(pl.LightningDataModule):
    """Speech emotion data: corpus scan, cached features, one cross-validation fold, padded batches.

    Corpora (``corpus``): ravdess, cremad, tess, savee, emodb (folders, names per their conventions:
    see ``ser_lightning.data.corpora``) and manifest (``root`` is a CSV file ``path,label,speaker``).
    Asking for an emotion the corpus lacks (e.g. calm on cremad) is an error that lists its classes;
    ``emotions: all`` means all of the corpus's classes. Speaker-independent folds need at least
    ``num_val_speakers + 2`` speakers (a test, validation and training speaker per fold): TESS has
    only 2, so on TESS use ``protocol: random`` (speaker-dependent) or test on it cross-corpus.

    Benchmark folds: ``protocol: emobox`` with ``corpus: emobox`` uses the folds of an EmoBox dataset
    folder as given (``num_folds`` = its number of fold_K folders; ``fold`` 0 is fold_1), and
    ``protocol: emobox_ravdess`` with ``corpus: ravdess`` uses EmoBox's six RAVDESS folds of four
    test actors. Validation speakers come from each fold's training speakers. A fold that puts a
    speaker in both training and test is reported (a warning, and in the printed fold plan).

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
        feature: feature settings (name: logmel | spectrogram | loudness_contour | ssl, their parameters, pitch;
            ssl_model, ssl_layer, ssl_weights, ssl_arch for the self-supervised front end).
        normalization: ``global`` (training-split mean/std), ``speaker`` (each speaker's own mean/std over
            all of that speaker's recordings, labels never used), ``utterance`` or ``none``; applied by the model.
        protocol: ``speaker_independent`` (speakers never shared between splits), ``random`` (speaker-dependent, leaks),
            ``emobox`` (an EmoBox folder's own folds) or ``emobox_ravdess`` (EmoBox's RAVDESS folds).
        num_folds: number of cross-validation folds.
        fold: which fold (0 .. num_folds-1) is the test set.
        num_val_speakers: speakers held out of training for validation (early stopping, checkpoint choice);
            with protocol random, the validation share is num_val_speakers / speakers of the utterances.
        random_seed: random seed of the fold assignment and of the training-batch order.
        batch_size: utterances per training batch.
        eval_batch_size: utterances per validation, test and prediction batch; None = twice ``batch_size``
            (evaluation keeps no activations for a backward pass). Evaluation visits utterances longest
            first, so each batch pads little (every result keeps its utterance's index).
        num_workers: DataLoader worker processes (0 = in the main process).
        cache_dir: folder for the feature cache and the synthetic corpus (default ``$SER_LIGHTNING_CACHE`` or ``~/.cache/ser_lightning``).
        crop_seconds: fixed length in seconds (random crop when training, centre crop otherwise, zero-pad short clips); None = whole utterances, padded per batch.
        bucketing: group training utterances of similar length into batches (less padding; works under DDP).
        augment: SpecAugment masking of training batches (``freq_mask_param``, ``time_mask_param``, ``num_masks``); None = off.
        lenient: skip (and report) files with malformed names or undecodable audio instead of stopping.
        allow_outside_root: let a manifest (``corpus: manifest``) or EmoBox folder list audio files outside the
            corpus root (the manifest's folder; the EmoBox folder); by default such entries are refused unopened.
        synthetic_actors: actors of the built-in synthetic corpus (used when root is None).
        synthetic_random_seed: random seed of the built-in synthetic corpus (another value gives other voices and files).
    """

    def __init__(
        self,
        root: str | None = None,
        corpus: str = "ravdess",
        test_corpus: str | None = None,
        test_root: str | None = None,
        emotions: str | list[str] = "default",
        feature: FeatureConfig = FeatureConfig(),
        normalization: Normalization = "global",
        protocol: SplitProtocol = "speaker_independent",
        num_folds: int = 5,
        fold: int = 0,
        num_val_speakers: int = 2,
        random_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        crop_seconds: float | None = None,
        bucketing: bool = False,
        augment: SpecAugmentConfig | None = None,
        lenient: bool = False,
        allow_outside_root: bool = False,
        synthetic_actors: int = 24,
        synthetic_random_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.feature = feature if isinstance(feature, FeatureConfig) else FeatureConfig(**feature)
        self.augment = SpecAugmentConfig(**augment) if isinstance(augment, dict) else augment
        # checkpoints hold plain values only, so that they load with torch.load(weights_only=True)
        self.hparams.feature = asdict(self.feature)
        self.hparams.augment = None if self.augment is None else asdict(self.augment)
        self.test_corpus = test_corpus or corpus
        corpus_info(corpus)
        corpus_info(self.test_corpus, "data.test_corpus")
        if test_corpus is not None and test_root is None:
            raise ValueError(f"data.test_corpus={test_corpus} needs data.test_root")
        check_normalization(normalization, "data.normalization")
        self.split = SplitConfig(protocol=protocol, num_folds=num_folds, fold=fold, num_val_speakers=num_val_speakers,
                                 random_seed=random_seed, corpus=corpus, cross_corpus=test_root is not None)
        checks = [
            (batch_size >= 1, f"data.batch_size={batch_size}: must be at least 1"),
            (eval_batch_size is None or eval_batch_size >= 1,
             f"data.eval_batch_size={eval_batch_size}: must be at least 1 (or null)"),
            (num_workers >= 0, f"data.num_workers={num_workers}: must be >= 0"),
            (crop_seconds is None or crop_seconds > 0, f"data.crop_seconds={crop_seconds}: must be positive (or null)"),
            (synthetic_actors >= 2, f"data.synthetic_actors={synthetic_actors}: at least 2 actors are needed"),
            (root is not None or corpus == "ravdess",
             f"data.root: corpus '{corpus}' needs data.root (the built-in synthetic corpus has the RAVDESS layout; "
             f"`python -m ser_lightning synth DIR --layout {corpus}` writes a synthetic one)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        _check_root(root, corpus, "data.root")
        _check_root(test_root, self.test_corpus, "data.test_root")
        given = len(fold_folders(root)) if self.split.protocol == "emobox" else num_folds
        if given != num_folds:
            raise ValueError(f"data.num_folds={num_folds} but the EmoBox folder '{root}' has {given} folds "
                             f"(fold_1 .. fold_{given}): set data.num_folds={given}")
        self._class_names = self._select_classes(emotions)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.utterances: list[Utterance] = []
        self.features: list[Tensor] = []
        self.labels: list[int] = []
        self.skipped: list[Skipped] = []
        self.ignored: list[Path] = []
        self.fold_plan: FoldPlan | None = None
        self._feature_stats: tuple[Tensor, Tensor] | None = None
        self._speaker_stats: list[Tensor] | None = None
        # the training order's generator lives as long as the datamodule: each epoch draws on from where the
        # last one stopped, and a checkpoint keeps its state (state_dict) so that a resumed run draws the same
        self._train_generator = torch.Generator().manual_seed(random_seed)

    def _select_classes(self, emotions: str | list[str]) -> list[str]:
        """The requested emotions, checked against the corpus (and intersected with the test corpus)."""
        hp = self.hparams
        requested = resolve_emotions(emotions)
        available = corpus_classes(hp.corpus, hp.root, hp.allow_outside_root)
        title = corpus_info(hp.corpus).title
        if isinstance(emotions, str) and emotions.strip().lower() == "all":
            requested = tuple(e for e in requested if e in available)
        missing = [e for e in requested if e not in available]
        if missing:
            raise ValueError(f"data.emotions: {title} has no {missing}; its classes are {list(available)}")
        chosen = list(requested)
        if hp.test_root is not None:
            test_available = corpus_classes(self.test_corpus, hp.test_root, hp.allow_outside_root)
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
        return self.feature.num_features

    @property
    def pitch_rows(self) -> bool:
        """Whether the last two feature rows are the pitch track (the prosodic functionals read them)."""
        return bool(self.feature.pitch)

    # -- data preparation -------------------------------------------------------------------
    def _corpus_root(self) -> Path:
        if self.hparams.root is not None:
            return Path(self.hparams.root).expanduser()
        return ensure_synthetic_corpus(
            self.cache_dir, actors=self.hparams.synthetic_actors, sample_rate=SYNTHETIC_SAMPLE_RATE,
            random_seed=self.hparams.synthetic_random_seed,
        )

    def prepare_data(self) -> None:
        """Generate the synthetic corpus once when no data root is given."""
        self._corpus_root()

    def setup(self, stage: str | None = None) -> None:
        """Scan, load every feature once (through the disk cache), plan the fold, compute statistics."""
        if self.fold_plan is not None:
            return
        hp = self.hparams
        scans = [scan_corpus(hp.corpus, self._corpus_root(), self._class_names, hp.lenient, hp.allow_outside_root)]
        if hp.test_root is not None:
            scans.append(scan_corpus(self.test_corpus, hp.test_root, self._class_names, hp.lenient,
                                     hp.allow_outside_root))
        else:  # fail before decoding when the corpus cannot be split as asked
            check_fold_feasibility(scans[0].utterances, self.split, title=corpus_info(hp.corpus).title)
        parts = []
        for scan in scans:
            loaded = load_features(scan.utterances, self.feature, self.cache_dir, lenient=hp.lenient)
            parts.append(loaded.utterances)
            self.features += loaded.features
            self.skipped += scan.skipped + [Skipped(path, reason, UNUSABLE_AUDIO) for path, reason in loaded.skipped]
            self.ignored += scan.ignored
        self.utterances = [u for part in parts for u in part]
        self._report_unused()
        self.labels = [self._class_names.index(u.emotion) for u in self.utterances]
        self.fold_plan = self._plan(parts)
        for split in SPLITS:
            if not self.fold_plan.split(split):
                raise ValueError(f"data: the {split} split of fold {self.split.fold} is empty; use fewer folds or more data")
        rank_zero_info(format_fold_plan(self.fold_plan, self._class_names))
        if self.fold_plan.shared_speakers and self.split.protocol != "random":
            rank_zero_warn(
                f"data: fold {self.split.fold} ({self.split.protocol}) puts speaker(s) {self.fold_plan.shared_speakers} in both training "
                "and test: its numbers are speaker-dependent, not comparable with speaker-independent folds"
            )
        self._feature_stats = feature_stats([self.features[i] for i in self.fold_plan.train])
        if hp.normalization == "speaker":
            speakers = [(u.corpus, u.speaker) for u in self.utterances]
            statistics = speaker_statistics(self.features, speakers, functionals=self.feature.pitch)
            self._speaker_stats = per_utterance(statistics, speakers)

    def _report_unused(self) -> None:
        """Count every file found but not used, by reason: a warning when audio was skipped, else a note."""
        if not self.skipped and not self.ignored:
            return
        header = (f"data: skipped {len(self.skipped)} file(s) and ignored {len(self.ignored)} non-audio file(s) "
                  f"({len(self.utterances)} used), by reason:")
        message = "\n  ".join([header, *unused_summary(self.skipped, self.ignored)])
        (rank_zero_warn if self.skipped else rank_zero_info)(message)

    def _plan(self, parts: list[list[Utterance]]) -> FoldPlan:
        """The fold plan of [training corpus] or [training corpus, test corpus]."""
        if len(parts) == 2:
            return make_cross_corpus_plan(parts[0], parts[1], self._class_names, self.split)
        return make_fold_plan(parts[0], self._class_names, self.split)

    # -- results of setup -------------------------------------------------------------------
    def _require_setup(self, what: str) -> FoldPlan:
        if self.fold_plan is None:
            raise RuntimeError(f"SERDataModule.{what} is available after setup()")
        return self.fold_plan

    @property
    def feature_stats(self) -> tuple[Tensor, Tensor]:
        """(mean, std) per feature row over the training split of the current fold."""
        self._require_setup("feature_stats")
        return self._feature_stats

    @property
    def speaker_stats(self) -> list[Tensor] | None:
        """Per utterance, its speaker's (2, W) statistics (``normalization: speaker``; see ``data.speakers``), else None."""
        self._require_setup("speaker_stats")
        return self._speaker_stats

    def utterances_of(self, split: str) -> list[tuple[Tensor, Tensor | None]]:
        """(features (F, n), speaker statistics (2, W) or None) of every utterance of ``split``, whole and unaugmented."""
        plan = self._require_setup("utterances_of")
        stats = self._speaker_stats
        return [(self.features[i], None if stats is None else stats[i]) for i in plan.split(split)]

    def labels_of(self, split: str) -> list[int]:
        """The class index of every utterance of ``split`` (in the order of ``utterances_of``)."""
        return [self.labels[i] for i in self._require_setup("labels_of").split(split)]

    def speakers_of(self, split: str) -> list[str]:
        """The speaker of every utterance of ``split`` (in the order of ``utterances_of``)."""
        return [self.utterances[i].speaker for i in self._require_setup("speakers_of").split(split)]

    def indices_of(self, split: str) -> list[int]:
        """The indices (into ``utterances``, as batches carry them) of the utterances of ``split``."""
        return list(self._require_setup("indices_of").split(split))

    @property
    def num_utterances(self) -> int:
        return len(self.utterances)

    def class_counts(self, split: str = "train") -> Tensor:
        """Utterances per class (num_classes,) int64 in ``split`` (train, val or test)."""
        plan = self._require_setup("class_counts")
        plan.split(split)  # validates the name
        return torch.tensor([plan.counts[split][c] for c in self._class_names], dtype=torch.int64)

    # -- loaders ----------------------------------------------------------------------------
    def dataset(self, split: str) -> UtteranceDataset:
        """The utterances of ``split`` as the loaders serve them (cropped and augmented for training)."""
        plan = self._require_setup("dataset")
        crop = None
        if self.hparams.crop_seconds is not None:
            crop = max(1, round(self.hparams.crop_seconds / FeatureExtractor(self.feature).hop_seconds))
        train = split == "train"
        return UtteranceDataset(
            self.features, self.labels, plan.split(split), speaker_stats=self._speaker_stats, crop_frames=crop,
            random_crop=train, augment=SpecAugment(self.augment) if train and self.augment is not None else None,
        )

    def _loader(self, dataset: UtteranceDataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset, collate_fn=collate_utterances, num_workers=workers, persistent_workers=workers > 0, **kwargs
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the state of the training order's generator (exact resume)."""
        return {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training order's generator from a checkpoint (before the next epoch's loader iterates)."""
        if "train_generator" in state_dict:  # checkpoints of earlier versions start the order afresh
            self._train_generator.set_state(state_dict["train_generator"])

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        generator = self._train_generator
        if self.hparams.bucketing:
            sampler = BucketBatchSampler(
                RandomSampler(dataset, generator=generator), self.hparams.batch_size,
                lengths=[dataset.length(k) for k in range(len(dataset))], generator=generator,
            )
            return self._loader(dataset, batch_sampler=sampler)
        return self._loader(dataset, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        longest_first = sorted(range(len(dataset)), key=dataset.length, reverse=True)
        batch_size = self.hparams.eval_batch_size or 2 * self.hparams.batch_size
        return self._loader(dataset, batch_size=batch_size, sampler=longest_first)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
