"""Class-balanced logistic regression with C chosen on validation speakers: the frozen statistics head
and the linear baselines fit it the same way."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def classifier(c: float, scaled: bool = False) -> Any:
    """Class-balanced logistic regression (after a StandardScaler unless the inputs are ``scaled`` already)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    return model if scaled else make_pipeline(StandardScaler(), model)


def unweighted_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, predictions))


def fit_logistic(train_inputs: np.ndarray, train_targets: Sequence[int], val_inputs: np.ndarray,
                 val_targets: Sequence[int], *, scaled: bool = False, train_groups: Sequence[str] | None = None) -> Any:
    """The classifier fitted on the training rows whose C maximises the validation UA (ties: the smaller C).

    With ``train_groups`` (the training rows' speakers; ``scaled`` inputs, targets 0..K-1), C maximises the UA over
    the validation rows and the training rows together, each training row predicted by a regression fitted without
    its speaker (``cross_fitted_logits``): many speakers' predictions instead of the few validation speakers'."""
    if train_groups is None:
        return best_on_validation(lambda c: classifier(c, scaled), C_GRID, train_inputs, train_targets, val_inputs,
                                  val_targets)[0]
    fitted = [classifier(c, scaled).fit(train_inputs, train_targets) for c in C_GRID]
    val_targets = np.asarray(val_targets)
    classes = int(max(np.max(train_targets), np.max(val_targets))) + 1
    targets = np.concatenate([np.asarray(train_targets), val_targets])
    scores = [unweighted_accuracy(targets, np.concatenate([
        cross_fitted_logits(train_inputs, train_targets, train_groups, c, classes).argmax(1),
        model.predict(val_inputs)])) for c, model in zip(C_GRID, fitted)]
    return fitted[int(np.argmax(scores))]


def best_on_validation(make: Callable[[float], Any], grid: Sequence[float], train_inputs: np.ndarray,
                       train_targets: Sequence[int], val_inputs: np.ndarray, val_targets: Sequence[int]) -> tuple[Any, float]:
    """``make(C)`` fitted on the training rows for each C of ``grid``: the one with the best validation UA (ties: the
    earlier C) and its C."""
    fitted = [make(c).fit(train_inputs, train_targets) for c in grid]
    val_targets = np.asarray(val_targets)
    best = int(np.argmax([unweighted_accuracy(val_targets, model.predict(val_inputs)) for model in fitted]))
    return fitted[best], grid[best]


def logit_weights(model: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) weights and (K,) biases giving a fitted LogisticRegression's logits (softmax = its probabilities);
    for two classes scikit-learn keeps one row, which becomes two opposite half-rows."""
    coef, intercept = np.asarray(model.coef_), np.asarray(model.intercept_)
    if num_classes == 2 and coef.shape[0] == 1:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept


CROSS_FIT_FOLDS = 5


def cross_fitted_logits(inputs: np.ndarray, targets: Sequence[int], groups: Sequence[str], c: float,
                        num_classes: int) -> np.ndarray:
    """(N, K) logits of each row from a regression (the given C) fitted on the other groups' rows only
    (speaker-grouped folds; every class must appear in each fold's training rows, else the full fit is used)."""
    from sklearn.model_selection import GroupKFold

    targets, groups = np.asarray(targets), np.asarray(groups)
    logits = np.zeros((len(targets), num_classes))
    folds = min(CROSS_FIT_FOLDS, len(set(groups.tolist())))
    full = None
    for train, held_out in GroupKFold(n_splits=folds).split(inputs, groups=groups):
        if folds < 2 or len(set(targets[train].tolist())) < num_classes:
            if full is None:
                full = classifier(c, scaled=True).fit(inputs, targets)
            model = full
        else:
            model = classifier(c, scaled=True).fit(inputs[train], targets[train])
        weight, bias = logit_weights(model, num_classes)
        logits[held_out] = inputs[held_out] @ weight.T + bias
    return logits
