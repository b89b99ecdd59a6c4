r"""Cross-fitted auxiliary models ``g_hat`` learned from the labelled rows themselves.

With ``K`` folds, the rows of fold ``k`` (and the reference pairs on their prompts) get predictions
from a classifier trained on the other folds only, so ``g_hat`` is independent of the labels it
multiplies: the control variate of VRPO keeps zero mean (DESIGN.md 3.4).

Two symmetries of the data are kept exactly, so that the estimator built on ``g_hat`` has them too:

* a pair presented the other way round gets ``1 - g_hat``. Given ``swap`` (the map of a pair's
  features to those of the reversed pair; ``negate`` for feature differences) every pair is put in a
  canonical orientation, decided by the antisymmetric part ``v = f - swap(f)``: taking its coordinates
  in decreasing order of their ranks of ``|v|`` over all pairs, the first group of equal rank whose
  signs do not cancel must sum to a positive sign. The learner sees and predicts canonical pairs
  (labels flipped with the orientation). Where the signs cancel in every group (a pair that a
  permutation of the coordinates maps to its reverse, common for symmetric or one-hot features) no
  orientation is invariant: the learner sees such a pair both ways, ``(f, z)`` and ``(swap(f), 1 - z)``,
  and predicts ``(p(f) + 1 - p(swap(f))) / 2``. A pair equal to its own reverse (``v = 0``, such as a
  response against itself) is left out of the training and gets ``g_hat = 1/2``.
* rows in another order get the same ``g_hat``: folds are assigned from the content of the rows (a
  seeded hash of the ranks of each canonical row's ``|f|`` and of its prompt's reference pairs), not
  from their positions, and the learner sees its training rows in an order set by the same keys.

DRPO (``theory.drpo``) needs two models on each row's ``K`` responses: ``g_hat`` on every ordered pair, and a model
``pi_hat`` of the reference policy that drew the observed pair. ``crossfit_drpo`` learns both with the same folds:
``g_hat`` as above (the observed pairs are the labelled rows, each pair of a row's responses one of its reference
pairs), ``pi_hat`` as the conditional logit ``reference_logit`` fitted to the responses drawn on the other
folds' rows.

Ranks are unchanged by positive rescaling and permutation of the feature coordinates, under which
tree learners are invariant, so cross-fitted VRPO is equivariant under those maps. Rows identical in
every feature and in their reference pairs are told apart by their order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import log_softmax
from scipy.stats import rankdata

from .data import _as_float, _bounded, _check_indices, _check_labels, _check_ref_row, _finite, check_solver
from .errors import InputError

__all__ = ["crossfit_predict", "fold_ids", "orientation", "default_learner", "negate", "reference_logit", "DRPOModels",
           "crossfit_drpo"]

Swap = Callable[[np.ndarray], np.ndarray]


def default_learner(seed: int) -> Any:
    """A regularised gradient-boosting classifier (scikit-learn), flexible enough for non-BT links.

    Flexibility costs data: below a few thousand rows its ``g_hat`` is often further from ``g*`` than the BT
    fit, and VRPO at ``lam = 1`` then loses to the MLE; ``fit(..., "vrpo_crossfit", lam="auto")`` tunes
    ``lam`` and keeps the estimator asymptotically no worse than the MLE."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=20,
                                          l2_regularization=1.0, early_stopping=False, random_state=seed)


def negate(features: np.ndarray) -> np.ndarray:
    """The swap of feature differences: ``phi(b) - phi(a) = -(phi(a) - phi(b))``."""
    return -features


def _hash(data: bytes, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest(),
                          "little")


def _row_keys(features: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit key of each row, a function of the row's content only: the sorted vector of its
    ranks of ``|f_ij|`` within each column ``j`` (the same under row reordering, swaps that negate or
    permute columns, positive column scalings and column permutations)."""
    if features.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    ranks = np.sort(rankdata(np.abs(features), axis=0), axis=1)
    return np.array([_hash(row.tobytes(), seed) for row in ranks], dtype=np.uint64)


def _group_keys(own: np.ndarray, members: np.ndarray, group: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Key of each of ``size`` groups from its own key ``own`` (or 0) and the sorted keys of its members
    (``members[k]`` belongs to group ``group[k]``): rows that tie on their own features are told apart by
    the reference pairs on their prompts."""
    order = np.lexsort((members, group))
    bounds = np.searchsorted(group[order], np.arange(size + 1))
    return np.array([_hash(own[i:i + 1].tobytes() + members[order[bounds[i]:bounds[i + 1]]].tobytes(), seed)
                     for i in range(size)], dtype=np.uint64)


def _balanced(keys: np.ndarray, folds: int) -> np.ndarray:
    """Fold ``rank(key) mod folds``: balanced folds in an order set by the keys alone."""
    out = np.empty(keys.size, dtype=np.int64)
    out[np.argsort(keys, kind="stable")] = np.arange(keys.size) % folds
    return out


def fold_ids(features: np.ndarray, features_ref: np.ndarray, ref_row: np.ndarray, folds: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold of every labelled row and of every reference pair.

    Labelled rows: balanced folds ordered by content keys (of the row and of the reference pairs on
    its prompt). A reference pair on labelled row ``i`` joins row ``i``'s fold; the pairs of one
    unlabelled prompt share a fold; a pair on an independent prompt (``ref_row = -1``) gets its own.
    Rows identical in every feature, with identical reference pairs, are told apart by their order."""
    n = features.shape[0]
    if folds < 2 or folds > n:
        raise InputError(f"cross-fitting: folds must be between 2 and n={n}, got {folds}")
    ref_row = np.asarray(ref_row)
    ref_keys = _row_keys(features_ref, seed)
    on_labelled = (ref_row >= 0) & (ref_row < n)
    own = _row_keys(features, seed)
    rows = _balanced(_group_keys(own, ref_keys[on_labelled], ref_row[on_labelled], n, seed), folds)
    ref = np.empty(ref_row.size, dtype=np.int64)
    ref[on_labelled] = rows[ref_row[on_labelled]]
    others = np.flatnonzero(~on_labelled)
    if others.size:
        group = np.where(ref_row[others] < 0, -1 - np.arange(others.size), ref_row[others])
        ids, inverse = np.unique(group, return_inverse=True)
        keys = _group_keys(np.zeros(ids.size, dtype=np.uint64), ref_keys[others], inverse, ids.size, seed)
        ref[others] = _balanced(keys, folds)[inverse]
    return rows, ref


def orientation(features: np.ndarray, swap: Swap | None) -> np.ndarray:
    """``+1`` for a pair in canonical orientation, ``-1`` for one to be reversed, ``0`` for a pair equal to
    its own reverse (see the module docstring); all ``+1`` without ``swap``."""
    m, q = features.shape
    if swap is None:
        return np.ones(m, dtype=np.int64)
    v = features - swap(features)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    rank = rankdata(np.abs(v), axis=0)
    order = np.argsort(-rank, axis=1, kind="stable")
    r_sorted = np.take_along_axis(rank, order, axis=1)
    s_sorted = np.take_along_axis(np.sign(v), order, axis=1)
    group = np.concatenate([np.zeros((m, 1), dtype=np.int64),
                            np.cumsum(r_sorted[:, 1:] != r_sorted[:, :-1], axis=1)], axis=1)
    sums = np.zeros((m, q))
    np.add.at(sums, (np.repeat(np.arange(m), q), group.ravel()), s_sorted.ravel())
    decided = sums != 0
    first = np.argmax(decided, axis=1)
    return np.where(decided.any(axis=1), np.sign(sums[np.arange(m), first]), 0).astype(np.int64)


def _orient(features: np.ndarray, sign: np.ndarray, swap: Swap | None) -> np.ndarray:
    """The pairs in canonical orientation."""
    if swap is None or not (sign < 0).any():
        return features
    return np.where((sign < 0)[:, None], swap(features), features)


def _checked(features: object, z: object, features_ref: object, ref_row: object, folds: object,
             seed: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``crossfit_predict``'s arguments as arrays, or an ``InputError`` naming the first bad one."""
    def integer(name: str, value: object, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise InputError(f"cross-fitting: {name} must be an integer in [{low}, {high}], got {value!r}")
        return int(value)

    folds_ = integer("folds", folds, 2, 2**31)
    integer("seed", seed, 0, 2**32 - folds_)  # the learners get seed + k, k < folds (scikit-learn: < 2^32)
    feats, refs = _as_float("features", features, 2), _as_float("features_ref", features_ref, 2)
    _finite("features", feats)
    _finite("features_ref", refs)
    if refs.shape[1] != feats.shape[1]:
        raise InputError(f"features_ref: {refs.shape[1]} columns, but features has {feats.shape[1]}")
    labels = _as_float("z", z, 1)
    if labels.shape != (feats.shape[0],):
        raise InputError(f"z: expected {feats.shape[0]} labels, got shape {labels.shape}")
    _check_labels("z", labels)
    return feats, labels, refs, _check_ref_row(ref_row, refs.shape[0])


def crossfit_predict(
    features: np.ndarray,
    z: np.ndarray,
    features_ref: np.ndarray,
    ref_row: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    learner: Callable[[int], Any] = default_learner,
    swap: Swap | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted ``P(first response wins | pair features)`` on labelled and reference pairs.

    ``features`` (n, q), ``z`` (n,), ``features_ref`` (N, q), ``ref_row`` (N,) prompt ids as in
    ``PairData``. ``learner(seed)`` returns an unfitted scikit-learn-style classifier. ``swap`` maps
    pair features to those of the reversed pairs (``negate`` for feature differences); with it
    ``g_hat(b, a) = 1 - g_hat(a, b)`` exactly (see the module docstring).
    """
    g, g_ref, _ = _crossfit(*_checked(features, z, features_ref, ref_row, folds, seed), folds, seed, learner, swap)
    return g, g_ref


def _crossfit(features: np.ndarray, z: np.ndarray, features_ref: np.ndarray, ref_row: np.ndarray, folds: int,
              seed: int, learner: Callable[[int], Any], swap: Swap | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``crossfit_predict`` on checked arrays, and the fold of every labelled row."""
    n = features.shape[0]
    both = np.concatenate([features, features_ref])
    sign = orientation(both, swap)
    # no invariant orientation, yet not its own reverse: learnt and predicted both ways
    two_way = (sign == 0) & (both != swap(both)).any(axis=1) if swap is not None else np.zeros(sign.size, bool)
    sign_lab, sign_ref = sign[:n], sign[n:]
    two_lab, two_ref = two_way[:n], two_way[n:]
    lab, refs = _orient(features, sign_lab, swap), _orient(features_ref, sign_ref, swap)
    rows, ref = fold_ids(lab, refs, ref_row, folds, seed)
    z_canon = np.where(sign_lab < 0, 1.0 - z, z)
    keys = _row_keys(lab, seed)
    g = np.full(n, 0.5)
    g_ref = np.full(features_ref.shape[0], 0.5)
    for k in range(folds):
        train = np.flatnonzero((rows != k) & (sign_lab != 0))
        two = np.flatnonzero((rows != k) & two_lab)
        X = np.concatenate([lab[train], features[two], swap(features[two]) if two.size else features[two]])
        y = np.concatenate([z_canon[train], z[two], 1.0 - z[two]])
        order = np.lexsort((y, np.concatenate([keys[train], keys[two], keys[two]])))
        X, y = X[order], y[order]
        held, held_ref = (rows == k) & (sign_lab != 0), (ref == k) & (sign_ref != 0)
        held2, held2_ref = (rows == k) & two_lab, (ref == k) & two_ref
        if y.size == 0 or y.min() == y.max():  # one class only in the training folds: predict its rate
            rate = 0.5 if y.size == 0 else y[0]
            g[held], g_ref[held_ref] = rate, rate
            g[held2], g_ref[held2_ref] = 0.5, 0.5
            continue
        model = learner(seed + k).fit(X, y.astype(int))
        col = list(model.classes_).index(1)

        def prob(f: np.ndarray) -> np.ndarray:
            return model.predict_proba(f)[:, col] if f.shape[0] else np.zeros(0)

        g[held], g_ref[held_ref] = prob(lab[held]), prob(refs[held_ref])
        for out, f, mask in ((g, features, held2), (g_ref, features_ref, held2_ref)):
            if mask.any():
                out[mask] = 0.5 * (prob(f[mask]) + 1.0 - prob(swap(f[mask])))
    return np.where(sign_lab < 0, 1.0 - g, g), np.where(sign_ref < 0, 1.0 - g_ref, g_ref), rows


# a fitted reference model whose log-odds between two responses of one prompt exceed this is checked for separation
_SPREAD_CHECK = 30.0


def _responses(phi: object) -> np.ndarray:
    """Features ``(n, K, d)`` of every row's responses, ``n >= 1``, ``K >= 2``."""
    arr = _as_float("phi", phi, 3)
    if arr.shape[0] < 1 or arr.shape[1] < 2 or arr.shape[2] < 1:
        raise InputError(f"phi: expected an (n, K, d) array with n >= 1, K >= 2 responses and d >= 1, got shape "
                         f"{arr.shape}")
    _bounded("phi", arr)
    return arr


def _logit_terms(gamma: np.ndarray, phi: np.ndarray, counts: np.ndarray, m: int
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The conditional logit's mean negative log-likelihood over ``n m`` draws at ``gamma``, its gradient and
    Hessian, and the log-probabilities ``(n, K)``; ``counts`` (n, K) the draws of each response."""
    logp = log_softmax(phi @ gamma, axis=1)
    p = np.exp(logp)
    mean = np.einsum("ik,ikd->id", p, phi)
    centred = phi - mean[:, None, :]
    N = phi.shape[0] * m
    value = -float((counts * logp).sum()) / N
    grad = (m * mean - np.einsum("ik,ikd->id", counts, phi)).sum(0) / N
    hess = m * np.einsum("ik,ikd,ike->de", p, centred, centred) / N
    return value, grad, hess, logp


def _separable(phi: np.ndarray, drawn: np.ndarray) -> bool:
    """Whether some ``gamma`` ranks every drawn response at least as high as each other response of its prompt,
    ``gamma . (phi_i(a_ij) - phi_i(b)) >= 0`` for all ``i, j, b``, and strictly for one: then the likelihood
    increases without bound along ``gamma``. The linear program of the logistic MLE's separation
    (``fitting._separating_direction``) on these differences, each labelled a win."""
    from .fitting import _separating_direction  # not at import: fitting loads torch and the kernels

    rows = np.repeat(np.arange(phi.shape[0]), drawn.shape[1])
    diff = (phi[rows, drawn.ravel()][:, None, :] - phi[rows]).reshape(-1, phi.shape[2])
    return _separating_direction(diff, np.ones(diff.shape[0]))


def reference_logit(phi: object, drawn: object, *, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    r"""Maximum likelihood ``gamma`` (d,) of the conditional logit
    ``pi_gamma(a | x_i) = exp(gamma . phi_i(a)) / sum_b exp(gamma . phi_i(b))`` from the responses ``drawn``
    (n, m) on each row (features ``phi`` (n, K, d)): Newton on the convex mean negative log-likelihood
    ``L = (1/nm) sum_ij [log sum_b exp(gamma . phi_i(b)) - gamma . phi_i(a_ij)]``, gradient
    ``(1/nm) sum_i (m E_gamma phi_i - sum_j phi_i(a_ij))``, Hessian ``(1/n) sum_i Cov_gamma(phi_i)``, with
    backtracking, until ``|grad| < tol rms(phi)``.

    ``InputError`` where ``gamma`` is not identified (the features' differences between the responses of a prompt
    span fewer than ``d`` dimensions) or no maximum exists (a direction ranks every drawn response at least as high
    as the others of its prompt: ``_separable``)."""
    phi = _responses(phi)
    n, K, d = phi.shape
    drawn = _check_indices("drawn", drawn, (n, None), K, ("row",))
    gtol, max_iter = check_solver(tol, max_iter)
    gtol *= max(float(np.sqrt(np.mean(phi**2))), 1e-300)
    spread = phi - phi.mean(1, keepdims=True)
    rank = int(np.linalg.matrix_rank(spread.reshape(-1, d)))
    if rank < d:
        raise InputError(f"phi: the differences between a prompt's responses span {rank} < d = {d} dimensions (a "
                         "feature constant within every prompt, or a combination of others), so the reference "
                         "model's gamma is not identified")
    m = drawn.shape[1]
    counts = np.zeros((n, K))
    np.add.at(counts, (np.repeat(np.arange(n), m), drawn.ravel()), 1.0)
    gamma = np.zeros(d)
    value, grad, hess, logp = _logit_terms(gamma, phi, counts, m)
    for _ in range(max_iter):
        if np.linalg.norm(grad) < gtol:
            break
        try:
            step = -np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:  # flat in some direction: only on the way out along a separating one
            break
        slope, t = float(grad @ step), 1.0
        while t > 1e-10:
            trial = _logit_terms(gamma + t * step, phi, counts, m)
            if trial[0] <= value + 1e-4 * t * slope + 1e-15 * abs(value):
                break
            t *= 0.5
        else:
            break
        gamma = gamma + t * step
        value, grad, hess, logp = trial
    converged = np.linalg.norm(grad) < gtol
    if (not converged or np.ptp(logp, axis=1).max() > _SPREAD_CHECK) and _separable(phi, drawn):
        raise InputError("drawn: a direction gamma ranks every drawn response at least as high as the other "
                         "responses of its prompt, so the reference model's likelihood has no maximum (too few "
                         "rows, or a reference policy that always picks the best response of one feature)")
    if not converged:
        raise InputError(f"reference_logit: no convergence in {max_iter} Newton iterations (|grad| = "
                         f"{np.linalg.norm(grad):.3g}, tolerance {gtol:.3g})")
    return gamma


@dataclass(frozen=True)
class DRPOModels:
    """Cross-fitted models of ``crossfit_drpo``: ``g_hat`` (n, K, K), ``pi_hat`` (n, K) and each row's ``fold``
    (n,); row ``i``'s models were fitted on the rows of the other folds."""

    g_hat: np.ndarray
    pi_hat: np.ndarray
    fold: np.ndarray


def crossfit_drpo(
    phi: object,
    pair: object,
    z: object,
    folds: int = 5,
    seed: int = 0,
    learner: Callable[[int], Any] = default_learner,
) -> DRPOModels:
    r"""DRPO's two models learned from its own rows by ``folds``-fold cross-fitting (``theory.drpo.DRPOData`` takes
    them): ``g_hat[i, a, b]`` from the classifier ``learner(seed + k)`` on the feature differences
    ``phi_i(a) - phi_i(b)`` (``crossfit_predict`` with ``negate`` on the pairs ``a < b``, each row's reference
    pairs; ``g_hat(b, a) = 1 - g_hat(a, b)``, ``1/2`` on the diagonal), and ``pi_hat`` from ``reference_logit`` on
    the pairs ``(y_i, y'_i)`` drawn on the other folds.

    ``phi`` (n, K, d) every response's features, ``pair`` (n, 2) the observed responses, ``z`` (n,) labels in
    {0, 1} (``y_i`` won). The folds come from the rows' content (``fold_ids``), so permuting the rows permutes
    the models. DRPO stays consistent for the oracle when either model is consistent: ``pi_hat`` is when the
    reference policy is log-linear in ``phi``, whatever the learner; ``fit_drpo(..., reference="logit")`` then
    counts the estimation of ``pi_hat`` in the sandwich."""
    phi = _responses(phi)
    n, K, d = phi.shape
    pair = _check_indices("pair", pair, (n, 2), K, ("row",))
    rows = np.arange(n)
    features = phi[rows, pair[:, 0]] - phi[rows, pair[:, 1]]
    a, b = np.triu_indices(K, 1)  # the other orders follow: g_hat(b, a) = 1 - g_hat(a, b), g_hat(a, a) = 1/2
    upper = (phi[:, a] - phi[:, b]).reshape(n * a.size, d)
    feats, labels, refs, ref_row = _checked(features, z, upper, np.repeat(rows, a.size), folds, seed)
    _, g_ref, fold = _crossfit(feats, labels, refs, ref_row, int(folds), int(seed), learner, negate)
    g_hat = np.full((n, K, K), 0.5)
    g_hat[:, a, b] = g_ref.reshape(n, a.size)
    g_hat[:, b, a] = 1.0 - g_hat[:, a, b]
    pi_hat = np.empty((n, K))
    for k in range(int(folds)):
        held = fold == k
        try:
            gamma = reference_logit(phi[~held], pair[~held])
        except InputError as exc:
            raise InputError(f"cross-fitting fold {k}: the reference model on the other {int((~held).sum())} rows: "
                             f"{exc}") from None
        pi_hat[held] = np.exp(log_softmax(phi[held] @ gamma, axis=1))
    return DRPOModels(g_hat, pi_hat, fold)
