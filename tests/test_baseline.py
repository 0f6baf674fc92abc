"""The linear baseline: pooled statistics, and choices made without the test split."""

import numpy as np
import pytest
import torch

from ser_lightning.data.folds import FoldPlan
from ser_lightning.evaluation.baseline import SVM_C_GRID, linear_baseline, pooled_statistics, rbf_svm
from ser_lightning.functionals import utterance_statistics
from ser_lightning.models.logistic import C_GRID

CLASSES = ["a", "b", "c"]


def plan() -> FoldPlan:
    indices = list(range(90))
    return FoldPlan(fold=0, num_folds=3, protocol="speaker_independent", random_seed=0, train=indices[:60],
                    val=indices[60:75], test=indices[75:], train_speakers=[], val_speakers=[], test_speakers=[],
                    counts={})


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = np.arange(90) % 3
    inputs = rng.normal(size=(90, 6)) + labels[:, None] * np.array([1.0, 0.5, 0, 0, 0, 0])
    speakers = [f"s{k // 6}" for k in range(90)]
    return inputs, labels, speakers


@pytest.mark.parametrize("estimator", ["logistic", "rbf_svm"])
@pytest.mark.parametrize("selection", ["validation", "inner_cv"])
def test_choices_never_depend_on_the_test_split(selection, estimator):
    model = {"logistic": {}, "rbf_svm": {"estimator": rbf_svm, "grid": SVM_C_GRID}}[estimator]
    inputs, labels, speakers = data()
    first = linear_baseline("pooled", inputs, labels, plan(), CLASSES, selection=selection, groups=speakers, **model)
    scrambled_inputs, scrambled_labels = inputs.copy(), labels.copy()
    scrambled_inputs[75:] = np.random.default_rng(5).normal(size=(15, 6)) * 10
    scrambled_labels[75:] = scrambled_labels[75:][::-1]
    second = linear_baseline("pooled", scrambled_inputs, scrambled_labels, plan(), CLASSES, selection=selection,
                             groups=speakers, **model)
    assert first.C == second.C and first.selection == selection
    assert first.C in model.get("grid", C_GRID)
    assert (first.val is None) == (selection == "inner_cv")
    if first.val is not None:
        assert first.val.metrics == second.val.metrics
    assert sum(map(sum, first.test.confusion)) == 15 and first.test.metrics["UA"] > 0.5


def test_pooled_statistics_are_the_models_utterance_statistics():
    features = [torch.randn(4, n, generator=torch.Generator().manual_seed(n)) for n in (5, 9, 2)]
    rows = pooled_statistics(features)
    for row, utterance in zip(rows, features):
        expected = utterance_statistics(utterance.double().unsqueeze(0), torch.tensor([utterance.shape[-1]]))[0]
        np.testing.assert_allclose(row, expected.numpy())
    stats = [torch.stack([torch.full((4,), 1.0), torch.full((4,), 2.0)])] * 3
    normalised = pooled_statistics(features, stats)
    np.testing.assert_allclose(normalised[0][:4], (features[0].double().mean(1) - 1).numpy() / 2, atol=1e-12)
