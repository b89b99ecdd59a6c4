r"""Cross-fitted auxiliary models ``g_hat`` learned from the labelled rows themselves.

With ``K`` folds, the rows of fold ``k`` (and the reference pairs on their prompts) get predictions
from a classifier trained on the other folds only, so ``g_hat`` is independent of the labels it
multiplies: the control variate of VRPO keeps zero mean (DESIGN.md 3.4). Reference pairs on
unlabelled or independent prompts are spread over the folds round-robin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["crossfit_predict", "fold_ids", "default_learner"]


def default_learner(seed: int) -> Any:
    """A regularised gradient-boosting classifier (scikit-learn), flexible enough for non-BT links."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=20,
                                          l2_regularization=1.0, early_stopping=False, random_state=seed)


def fold_ids(n: int, ref_row: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold of every labelled row (a seeded balanced permutation) and of every reference pair."""
    if folds < 2 or folds > n:
        raise InputError(f"cross-fitting: folds must be between 2 and n={n}, got {folds}")
    rng = np.random.default_rng(seed)
    rows = rng.permutation(np.arange(n) % folds)
    ref = np.where(ref_row < 0, np.arange(ref_row.size) % folds, (ref_row - n) % folds)
    on_labelled = (ref_row >= 0) & (ref_row < n)
    ref[on_labelled] = rows[ref_row[on_labelled]]
    return rows, ref


def crossfit_predict(
    features: np.ndarray,
    z: np.ndarray,
    features_ref: np.ndarray,
    ref_row: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    learner: Callable[[int], Any] = default_learner,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted ``P(first response wins | pair features)`` on labelled and reference pairs.

    ``features`` (n, q), ``z`` (n,), ``features_ref`` (N, q), ``ref_row`` (N,) prompt ids as in
    ``PairData``. ``learner(seed)`` returns an unfitted scikit-learn-style classifier.
    """
    n = features.shape[0]
    rows, ref = fold_ids(n, np.asarray(ref_row), folds, seed)
    g = np.empty(n)
    g_ref = np.empty(features_ref.shape[0])
    for k in range(folds):
        train = rows != k
        labels = z[train]
        if labels.min() == labels.max():  # one class only in the training folds: predict its rate
            g[~train], g_ref[ref == k] = labels[0], labels[0]
            continue
        model = learner(seed + k).fit(features[train], labels.astype(int))
        col = list(model.classes_).index(1)
        g[~train] = model.predict_proba(features[~train])[:, col]
        if (ref == k).any():
            g_ref[ref == k] = model.predict_proba(features_ref[ref == k])[:, col]
    return g, g_ref
