"""The linear baseline shown beside every result: pooled statistics -> standardisation -> logistic regression.

For each fold, on exactly the model's split: the utterance statistics of the configured input
(``models.normalization.utterance_statistics``: per-row mean, standard deviation and mean absolute
change over the valid frames, the loudness dynamics and the log duration), a ``StandardScaler``
fitted on the training split, and a class-balanced ``LogisticRegression`` whose C is chosen by the
validation speakers' UA (ties: the smaller C). The test split is scored once, at the end.

Variants (``baseline_features``):

- ``pooled``: the statistics of the raw features (the specified baseline, always first);
- ``pooled_speaker``: the same after speaker normalisation (added automatically when the model uses
  ``normalization: speaker``, so a reader sees how much of a gain the normalisation alone gives);
- ``egemaps`` / ``compare``: openSMILE eGeMAPSv02 / ComParE_2016 functionals (the ``opensmile``
  package, an optional extra), with C chosen by speaker-grouped 5-fold CV on the training and
  validation speakers and the final model refitted on both: the field's classical recipe.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ser_lightning.data.folds import FoldPlan
from ser_lightning.evaluation.metrics import SplitScores, split_scores
from ser_lightning.models.normalization import normalize, utterance_statistics

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
BASELINE_FEATURES = ("pooled", "pooled_speaker", "egemaps", "compare")
OPENSMILE_SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}
INNER_FOLDS = 5


@dataclass(frozen=True)
class BaselineResult:
    """One baseline on one fold: the C it chose, its validation and test scores."""

    name: str
    C: float  # noqa: N815 (scikit-learn's name)
    selection: str
    val: SplitScores | None  # None when C was chosen by inner cross-validation
    test: SplitScores


def pooled_statistics(features: Sequence[Tensor], speaker_stats: Sequence[Tensor] | None = None) -> np.ndarray:
    """(N, 3F + 2) statistics of each (F, n) utterance, optionally after speaker normalisation ((2, F) each)."""
    rows = []
    for position, utterance in enumerate(features):
        batch = utterance.double().unsqueeze(0)
        lengths = torch.tensor([utterance.shape[-1]])
        if speaker_stats is not None:
            stats = speaker_stats[position].double()
            batch = normalize(batch, lengths, "speaker", stats[0].unsqueeze(0), stats[1].unsqueeze(0))
        rows.append(utterance_statistics(batch, lengths)[0])
    return torch.stack(rows).numpy()


def _classifier(c: float, scaled: bool = False):
    """Class-balanced logistic regression (after a StandardScaler unless the inputs are ``scaled`` already)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    return model if scaled else make_pipeline(StandardScaler(), model)


def fit_logistic(train_inputs: np.ndarray, train_targets: Sequence[int], val_inputs: np.ndarray,
                 val_targets: Sequence[int], *, scaled: bool = False) -> Any:
    """The classifier fitted on the training rows whose C maximises the validation UA (ties: the smaller C)."""
    fitted = [_classifier(c, scaled).fit(train_inputs, train_targets) for c in C_GRID]
    return fitted[int(np.argmax([_ua(np.asarray(val_targets), model.predict(val_inputs)) for model in fitted]))]


def _ua(labels: np.ndarray, predictions: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, predictions))


def linear_baseline(name: str, inputs: np.ndarray, labels: Sequence[int], plan: FoldPlan, class_names: list[str],
                    *, selection: str = "validation", groups: Sequence[str] | None = None) -> BaselineResult:
    """Fit the baseline on ``plan.train`` (C by ``selection``) and score validation and test.

    ``inputs`` (N, D) holds one row per utterance of the datamodule. selection ``validation``: C
    maximises the validation split's UA, the model is the one fitted on the training split.
    ``inner_cv``: C maximises the mean UA of a speaker-grouped ``INNER_FOLDS``-fold CV over the
    training and validation utterances (``groups``: their speakers), and the final model is
    refitted on both. The test split never takes part in a choice.
    """
    targets = np.asarray(labels)
    train, val, test = (np.asarray(indices) for indices in (plan.train, plan.val, plan.test))

    def fit(rows: np.ndarray, c: float) -> Any:
        return _classifier(c).fit(inputs[rows], targets[rows])

    def ua(model: Any, rows: np.ndarray) -> float:
        return _ua(targets[rows], model.predict(inputs[rows]))

    if selection == "validation":
        model = fit_logistic(inputs[train], targets[train], inputs[val], targets[val])
        best_c = model[-1].C
        val_scores = split_scores(targets[val], model.predict(inputs[val]), class_names)
    elif selection == "inner_cv":
        from sklearn.model_selection import GroupKFold

        pool = np.concatenate([train, val])
        speakers = np.asarray(groups)[pool]
        splits = list(GroupKFold(n_splits=min(INNER_FOLDS, len(set(speakers)))).split(pool, groups=speakers))
        means = [np.mean([ua(fit(pool[inner_train], c), pool[inner_val]) for inner_train, inner_val in splits])
                 for c in C_GRID]
        best_c = C_GRID[int(np.argmax(means))]
        model, val_scores = fit(pool, best_c), None
    else:
        raise ValueError(f"baseline selection must be 'validation' or 'inner_cv', got {selection!r}")
    test_scores = split_scores(targets[test], model.predict(inputs[test]), class_names)
    return BaselineResult(name, best_c, selection, val_scores, test_scores)


def opensmile_functionals(paths: Sequence[Path], feature_set: str, cache_dir: Path) -> np.ndarray:
    """(N, D) openSMILE functionals of each file (cached on disk like the other features)."""
    try:
        import opensmile
    except ImportError as err:
        raise ImportError(
            f"baseline features '{feature_set}' need the opensmile package: pip install opensmile"
        ) from err
    from ser_lightning.data.audio import load_audio
    from ser_lightning.data.cache import FeatureCache

    smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, OPENSMILE_SETS[feature_set]),
                            feature_level=opensmile.FeatureLevel.Functionals)
    cache = FeatureCache(cache_dir, f"opensmile-{opensmile.__version__}-{OPENSMILE_SETS[feature_set]}-16k")

    def compute(path: Path) -> Tensor:
        wave = load_audio(path, 16000).numpy()
        values = smile.process_signal(wave, 16000).to_numpy(dtype=np.float64)[0]
        return torch.from_numpy(np.nan_to_num(values)).float().unsqueeze(1)

    return np.stack([cache.get_or_compute(path, lambda p=path: compute(p), None)[:, 0].numpy() for path in paths])


def run_baselines(datamodule, names: Sequence[str] = ("pooled",)) -> list[BaselineResult]:
    """The requested baselines on the datamodule's current fold (after its ``setup``)."""
    plan, labels, class_names = datamodule.fold_plan, datamodule.labels, datamodule.class_names
    results = []
    for name in names:
        if name == "pooled":
            results.append(linear_baseline(name, pooled_statistics(datamodule.features), labels, plan, class_names))
        elif name == "pooled_speaker":
            speakers = [(u.corpus, u.speaker) for u in datamodule.utterances]
            from ser_lightning.data.speakers import per_utterance, speaker_statistics

            stats = per_utterance(speaker_statistics(datamodule.features, speakers), speakers)
            results.append(linear_baseline(name, pooled_statistics(datamodule.features, stats), labels, plan,
                                           class_names))
        elif name in OPENSMILE_SETS:
            functionals = opensmile_functionals([u.path for u in datamodule.utterances], name, datamodule.cache_dir)
            groups = [f"{u.corpus}/{u.speaker}" for u in datamodule.utterances]
            results.append(linear_baseline(name, functionals, labels, plan, class_names, selection="inner_cv",
                                           groups=groups))
        else:
            raise ValueError(f"baseline: unknown features {name!r}; choose from {list(BASELINE_FEATURES)}")
    return results
