"""The linear baselines shown beside every result: fixed features -> standardisation -> logistic regression.

For each fold, on exactly the model's split: one row of features per utterance, a ``StandardScaler``
fitted on the training split, and a class-balanced ``LogisticRegression`` whose C is chosen by the
validation speakers' UA (ties: the smaller C). The test split is scored once, at the end.

The baselines (``BASELINES``; ``DEFAULT_BASELINES`` run in every report):

- ``pooled``: ``functionals.utterance_statistics`` of the raw input features (per-row mean, standard
  deviation and mean absolute change, the loudness dynamics and the log duration);
- ``pooled_speaker``: the same after speaker normalisation of the frames;
- ``egemaps_speaker`` / ``compare_speaker``: openSMILE eGeMAPSv02 (88) / ComParE_2016 (6373) functionals,
  z-normalised per speaker (each speaker's mean and standard deviation over that speaker's utterances,
  no labels: exactly as ``normalization: speaker`` treats a speaker) -- the field's standard recipe;
- ``egemaps`` / ``compare`` (``--baseline_extra``): the same functionals without speaker normalisation,
  with C chosen by speaker-grouped 5-fold CV on the training and validation speakers and the final model
  refitted on both: the field's classical recipe;
- ``egemaps_svm`` / ``egemaps_speaker_svm`` (``--baseline_extra``): eGeMAPSv02 functionals (as ``egemaps`` /
  as ``egemaps_speaker``) with a class-balanced RBF support vector machine instead of the logistic regression.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ser_lightning.data.folds import FoldPlan
from ser_lightning.evaluation.metrics import SplitScores, split_scores
from ser_lightning.functionals import utterance_statistics
from ser_lightning.models.logistic import C_GRID, best_on_validation, classifier, unweighted_accuracy
from ser_lightning.normalization import normalize

OPENSMILE_SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}
INNER_FOLDS = 5
SVM_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def rbf_svm(c: float) -> Any:
    """Class-balanced RBF support vector machine (gamma "scale") after a StandardScaler."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", gamma="scale", class_weight="balanced"))


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
            stats = speaker_stats[position][:, : utterance.shape[0]].double()  # the frame rows' statistics
            batch = normalize(batch, lengths, "speaker", stats[0].unsqueeze(0), stats[1].unsqueeze(0))
        rows.append(utterance_statistics(batch, lengths)[0])
    return torch.stack(rows).numpy()


def linear_baseline(name: str, inputs: np.ndarray, labels: Sequence[int], plan: FoldPlan, class_names: list[str],
                    *, selection: str = "validation", groups: Sequence[str] | None = None,
                    estimator: Callable[[float], Any] = classifier, grid: Sequence[float] = C_GRID) -> BaselineResult:
    """Fit the baseline on ``plan.train`` (C by ``selection``) and score validation and test.

    ``inputs`` (N, D) holds one row per utterance of the datamodule; ``estimator(C)`` makes the (unfitted)
    scikit-learn model, C taken from ``grid``. selection ``validation``: C maximises the validation split's UA
    (ties: the smaller C), the model is the one fitted on the training split. ``inner_cv``: C maximises the mean
    UA of a speaker-grouped ``INNER_FOLDS``-fold CV over the training and validation utterances (``groups``:
    their speakers), and the final model is refitted on both. The test split never takes part in a choice.
    """
    targets = np.asarray(labels)
    train, val, test = (np.asarray(indices) for indices in (plan.train, plan.val, plan.test))

    def fit(rows: np.ndarray, c: float) -> Any:
        return estimator(c).fit(inputs[rows], targets[rows])

    def ua(model: Any, rows: np.ndarray) -> float:
        return unweighted_accuracy(targets[rows], model.predict(inputs[rows]))

    if selection == "validation":
        model, best_c = best_on_validation(estimator, grid, inputs[train], targets[train], inputs[val], targets[val])
        val_scores = split_scores(targets[val], model.predict(inputs[val]), class_names)
    elif selection == "inner_cv":
        from sklearn.model_selection import GroupKFold

        pool = np.concatenate([train, val])
        speakers = np.asarray(groups)[pool]
        splits = list(GroupKFold(n_splits=min(INNER_FOLDS, len(set(speakers)))).split(pool, groups=speakers))
        means = [np.mean([ua(fit(pool[inner_train], c), pool[inner_val]) for inner_train, inner_val in splits])
                 for c in grid]
        best_c = grid[int(np.argmax(means))]
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


@dataclass(frozen=True)
class Baseline:
    """One baseline: its title in reports, its per-utterance inputs, and how C is chosen."""

    title: str
    inputs: Callable[[Any], np.ndarray]  # datamodule (after setup) -> (N, D)
    selection: str = "validation"
    estimator: Callable[[float], Any] = classifier  # C -> unfitted scikit-learn model
    grid: tuple[float, ...] = C_GRID


def _speakers(datamodule) -> list[str]:
    return [f"{u.corpus}/{u.speaker}" for u in datamodule.utterances]


def _pooled_speaker(datamodule) -> np.ndarray:
    from ser_lightning.data.speakers import per_utterance, speaker_statistics

    speakers = _speakers(datamodule)
    return pooled_statistics(datamodule.features, per_utterance(speaker_statistics(datamodule.features, speakers),
                                                                speakers))


def per_speaker_z(rows: np.ndarray, speakers: Sequence[str]) -> np.ndarray:
    """Rows z-normalised with the mean and standard deviation of their speaker's rows (no labels)."""
    from ser_lightning.data.speakers import functional_stats

    rows = np.asarray(rows, dtype=np.float64)
    result = np.empty_like(rows)
    speakers = np.asarray(speakers)
    for speaker in dict.fromkeys(speakers):
        mine = speakers == speaker
        stats = functional_stats(torch.from_numpy(rows[mine])).double().numpy()
        result[mine] = (rows[mine] - stats[0]) / stats[1]
    return result


def _opensmile(feature_set: str, per_speaker: bool) -> Callable[[Any], np.ndarray]:
    def inputs(datamodule) -> np.ndarray:
        rows = opensmile_functionals([u.path for u in datamodule.utterances], feature_set, datamodule.cache_dir)
        return per_speaker_z(rows, _speakers(datamodule)) if per_speaker else rows

    return inputs


BASELINES: dict[str, Baseline] = {
    "pooled": Baseline("pooled statistics + logistic regression", lambda dm: pooled_statistics(dm.features)),
    "pooled_speaker": Baseline("speaker-normalised pooled statistics + logistic regression", _pooled_speaker),
    "egemaps_speaker": Baseline("openSMILE eGeMAPSv02 functionals, z-normalised per speaker, + logistic regression",
                                _opensmile("egemaps", True)),
    "compare_speaker": Baseline("openSMILE ComParE_2016 functionals, z-normalised per speaker, + logistic regression",
                                _opensmile("compare", True)),
    "egemaps": Baseline("openSMILE eGeMAPSv02 functionals + logistic regression", _opensmile("egemaps", False),
                        "inner_cv"),
    "compare": Baseline("openSMILE ComParE_2016 functionals + logistic regression", _opensmile("compare", False),
                        "inner_cv"),
    "egemaps_svm": Baseline("openSMILE eGeMAPSv02 functionals + RBF SVM", _opensmile("egemaps", False), "inner_cv",
                            rbf_svm, SVM_C_GRID),
    "egemaps_speaker_svm": Baseline("openSMILE eGeMAPSv02 functionals, z-normalised per speaker, + RBF SVM",
                                    _opensmile("egemaps", True), "validation", rbf_svm, SVM_C_GRID),
}
DEFAULT_BASELINES = ("pooled", "pooled_speaker", "egemaps_speaker", "compare_speaker")


def run_baselines(datamodule, names: Sequence[str] = DEFAULT_BASELINES) -> list[BaselineResult]:
    """The requested baselines on the datamodule's current fold (after its ``setup``)."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"baseline: unknown {unknown}; choose from {list(BASELINES)}")
    plan, labels, class_names = datamodule.fold_plan, datamodule.labels, datamodule.class_names
    results = []
    for name in names:
        baseline = BASELINES[name]
        results.append(linear_baseline(name, baseline.inputs(datamodule), labels, plan, class_names,
                                       selection=baseline.selection, groups=_speakers(datamodule),
                                       estimator=baseline.estimator, grid=baseline.grid))
    return results
