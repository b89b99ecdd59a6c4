r"""What the estimators consume: labelled pairs, reference pairs, and a finite-response population.

``theory`` never imports ``simulate``: simulators, file loaders and users build these containers.
Every array has a leading replication axis ``R`` (``R = 1`` for one data set).

Reference pairs carry a prompt id ``ref_row`` (DESIGN.md 3.4): a value ``i`` in ``[0, n)`` means the
pair was drawn on the prompt of labelled row ``i``; a value ``>= n`` names an unlabelled prompt
(pairs with the same value share it); ``-1`` means an independent prompt of its own. The sandwich
covariance treats each prompt as one independent cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError

__all__ = ["PairData", "PairPopulation", "as_probabilities", "check_probability", "check_solver", "failure_probability",
           "check_weight", "rank_deficient"]


def check_probability(name: str, values: np.ndarray) -> None:
    """Raise ``InputError`` naming the first entry of ``values`` that is NaN or outside [0, 1]."""
    bad = ~((values >= 0.0) & (values <= 1.0))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name}: entry {idx} is {float(values[idx])!r}, but probabilities must lie in [0, 1]")


def failure_probability(delta: object) -> float:
    """``delta`` as a number in the open interval (0, 1), or an ``InputError`` naming it."""
    try:
        x = float(delta)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"delta: must be a number in (0, 1), got {delta!r}") from None
    if not 0.0 < x < 1.0:
        raise InputError(f"delta: the failure probability must lie in (0, 1), got {delta!r}")
    return x


def check_solver(tol: object, max_iter: object) -> tuple[float, int]:
    """An iterative solver's settings: ``tol`` a finite number > 0 and ``max_iter`` an integer >= 1."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (np.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive number, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise InputError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    return float(tol), int(max_iter)


def check_clip(name: str, clip: object) -> tuple[float, float] | None:
    """``clip``: None (no clipping), or a pair of finite numbers ``low <= high``."""
    if clip is None:
        return None
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected None or a pair (low, high), got {clip!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise InputError(f"{name}: need finite low <= high, got {clip!r}")
    return lo, hi


def check_weight(name: str, weight: object, d: int) -> np.ndarray:
    """``W`` of a weighted trace ``tr(W Cov)``: the identity for None, ``e_j e_j^T`` for a coordinate index
    ``j``, else a nonzero symmetric positive semi-definite (d, d) array."""
    if weight is None:
        return np.eye(d)
    if isinstance(weight, (int, np.integer)) and not isinstance(weight, bool):
        if not 0 <= weight < d:
            raise InputError(f"{name}: coordinate index must be in [0, {d}), got {weight}")
        W = np.zeros((d, d))
        W[weight, weight] = 1.0
        return W
    if isinstance(weight, (bool, float, str)):
        raise InputError(f"{name}: expected None, a coordinate index or a ({d}, {d}) matrix, got {weight!r}")
    try:
        W = np.asarray(weight, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as numbers ({exc})") from None
    if W.shape != (d, d) or not np.isfinite(W).all():
        raise InputError(f"{name}: expected None, a coordinate index or a finite ({d}, {d}) matrix, got shape {W.shape}")
    scale = max(float(np.abs(W).max()), 1e-300)
    if not np.allclose(W, W.T, rtol=0.0, atol=1e-12 * scale):
        raise InputError(f"{name}: the matrix must be symmetric")
    if np.linalg.eigvalsh(W).min() < -1e-10 * scale:
        raise InputError(f"{name}: the matrix must be positive semi-definite")
    if not np.any(W):
        raise InputError(f"{name}: the matrix is zero")
    return W


def rank_deficient(dphi: np.ndarray, gram: np.ndarray | None = None) -> dict[int, int]:
    """``{r: rank}`` for every replication whose ``dphi_r`` (n x d) has rank below ``d``, so that ``theta``
    is not identified (a duplicated, all-zero or linearly dependent feature, or ``n < d``).

    The rank is numpy's (singular values above ``sigma_max max(n, d) eps``); it is computed only where
    the Gram matrix ``G = dphi_r^T dphi_r`` (``gram``, (R, d, d), when the caller has it) has a condition
    number above ``1e8``, which every full-rank design of condition number below ``1e4`` passes at the
    cost of one batched product. A Cholesky factor of ``G - 1e-8 tr(G) I`` clears a replication at once
    (``lambda_min > 1e-8 tr(G) >= 1e-8 lambda_max``): eigenvalues only for the others."""
    import torch

    R, n, d = dphi.shape
    if n < d:
        return {r: int(np.linalg.matrix_rank(dphi[r])) for r in range(R)}
    G = np.matmul(dphi.transpose(0, 2, 1), dphi) if gram is None else gram
    shift = 1e-8 * np.trace(G, axis1=1, axis2=2)[:, None, None] * np.eye(d)
    _, info = torch.linalg.cholesky_ex(torch.from_numpy(np.ascontiguousarray(G - shift)))
    unclear = np.flatnonzero(info.numpy() != 0)
    eig = np.linalg.eigvalsh(G[unclear]) if unclear.size else np.zeros((0, d))
    doubtful = unclear[eig[:, 0] <= 1e-8 * eig[:, -1]]
    ranks = {int(r): int(np.linalg.matrix_rank(dphi[r])) for r in doubtful}
    return {r: k for r, k in ranks.items() if k < d}


def _finite(name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name}: entry {idx} is {float(values[idx])!r}; all values must be finite")


def _check_labels(name: str, z: np.ndarray) -> None:
    """Labels in {0, 1}; the first other entry is named."""
    bad = ~np.isin(z, (0.0, 1.0))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name}: entry {idx[0] if len(idx) == 1 else idx} is {float(z[idx])!r}; labels must be 0 or 1")


def as_probabilities(name: str, values: object, shape: tuple[int, ...] | None = None, match: str = "") -> np.ndarray:
    """``values`` as a float array (of ``shape``, that of ``match``, when given) with entries in [0, 1]; anything
    else (text, ragged lists, NaN, a wrong shape) is an ``InputError`` naming ``name``."""
    arr = _as_float(name, values, None if shape is None else len(shape))
    if shape is not None and arr.shape != shape:
        raise InputError(f"{name}: expected shape {shape}{f' to match {match}' if match else ''}, got {arr.shape}")
    check_probability(name, arr)
    return arr


def _check_ref_row(ref_row: object, N: int) -> np.ndarray:
    """``N`` prompt ids of reference pairs (see the module docstring) as int64."""
    try:
        rows = np.asarray(ref_row)
    except ValueError as exc:  # a ragged list
        raise InputError(f"ref_row: need {N} integers ({exc})") from None
    if rows.shape != (N,) or not np.issubdtype(rows.dtype, np.integer):
        raise InputError(f"ref_row: need {N} integers, got shape {rows.shape} dtype {rows.dtype}")
    if (rows < -1).any():
        raise InputError(f"ref_row: entry {int(np.argmax(rows < -1))} is below -1")
    return rows.astype(np.int64)


def _check_indices(name: str, values: object, shape: tuple[int | None, ...], K: int, axes: tuple[str, ...],
                   lead: bool = False) -> np.ndarray:
    """Integer response indices in ``[0, K)`` of ``shape`` (None: any size >= 1), as int64, with a leading axis of
    one added first when ``lead``; else an ``InputError`` naming the first bad index by ``axes`` (the names of all
    but the last axis)."""
    try:
        arr = np.asarray(values)
    except ValueError as exc:  # a ragged list
        raise InputError(f"{name}: need integer response indices ({exc})") from None
    arr = arr[None] if lead else arr
    fits = arr.ndim == len(shape) and all(s == t if s is not None else t >= 1 for s, t in zip(shape, arr.shape))
    if not fits or not np.issubdtype(arr.dtype, np.integer):
        free = None in shape
        expected = "(" + ", ".join("m" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
        raise InputError(f"{name}: expected integer indices of shape {expected}{', m >= 1' if free else ''}, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
    out = (arr < 0) | (arr >= K)
    if out.any():
        where = np.argwhere(out)[0]
        at = ", ".join(f"{axis} {int(i)}" for axis, i in zip(axes, where[:-1]))
        raise InputError(f"{name}: {at}: response index {int(arr[tuple(where)])} outside [0, {K})")
    return arr.astype(np.int64)


#: Largest magnitude accepted for features: squares and products of a few thousand such values stay
#: finite in float64 (about 1.8e308), so the fits' sums of squares cannot overflow. Rescale larger data.
MAX_FEATURE = 1e100


def _as_float(name: str, values: object, ndim: int | None = None) -> np.ndarray:
    """``values`` as float64 (with ``ndim`` axes, when given), or an ``InputError`` naming ``name``."""
    try:
        raw = values if isinstance(values, np.ndarray) else np.asarray(values)
        complex_ = raw.dtype.kind == "c"
        arr = None if complex_ else np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as numbers ({exc})") from None
    if complex_:
        raise InputError(f"{name}: complex values (dtype {raw.dtype}); expected real numbers")
    if ndim is not None and arr.ndim != ndim:
        raise InputError(f"{name}: expected {ndim} axes, got shape {arr.shape}")
    return arr


def _bounded(name: str, values: np.ndarray) -> None:
    """Finite features of magnitude at most ``MAX_FEATURE``."""
    _finite(name, values)
    big = np.abs(values) > MAX_FEATURE
    if big.any():
        idx = tuple(int(i) for i in np.argwhere(big)[0])
        raise InputError(f"{name}: entry {idx} is {float(values[idx])!r}, too large for the fits' float64 arithmetic "
                         f"(|values| must be at most {MAX_FEATURE:g}); rescale the features")


@dataclass(frozen=True)
class PairData:
    r"""Labelled and reference pairs for R replications.

    Attributes
    ----------
    dphi : (R, n, d) feature differences ``phi(x, y1) - phi(x, y2)`` of the labelled pairs.
    z : (R, n) labels, 1 if the first response won.
    g : (R, n) or None, auxiliary probability ``g_hat(x, y1, y2)`` that the first response wins.
    dphi_ref : (R, N, d) or None, feature differences of the reference pairs.
    g_ref : (R, N) or None, ``g_hat`` on the reference pairs. Reference pairs without ``g`` and ``g_ref``
        serve the method that learns ``g_hat`` from the data (``vrpo_crossfit``).
    ref_weight : (N,) or (R, N) weights of the reference pairs, summing to 1 (default uniform);
        stored as (R, N).
    ref_row : (N,) prompt id of each reference pair (see the module docstring).
    features, features_ref : optional (R, n, q) / (R, N, q) pair features for learning ``g_hat``
        (cross-fitted VRPO); default ``dphi``.
    swap_features : optional map of pair features (..., q) to those of the same pairs in the other
        order; with it cross-fitting gives ``g_hat(b, a) = 1 - g_hat(a, b)`` (``theory.crossfit``). With
        the default features ``dphi`` the swap is the negation.
    """

    dphi: np.ndarray
    z: np.ndarray
    g: np.ndarray | None = None
    dphi_ref: np.ndarray | None = None
    g_ref: np.ndarray | None = None
    ref_weight: np.ndarray | None = None
    ref_row: np.ndarray | None = None
    features: np.ndarray | None = field(default=None, repr=False)
    features_ref: np.ndarray | None = field(default=None, repr=False)
    swap_features: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.swap_features is not None and not callable(self.swap_features):
            raise InputError(f"swap_features: expected a function of the pair features, got "
                             f"{type(self.swap_features).__name__}")
        dphi = _as_float("dphi", self.dphi, 3)
        R, n, d = dphi.shape
        if R < 1 or n < 1 or d < 1:
            raise InputError(f"dphi: need at least one replication, one pair and one feature, got shape {dphi.shape}")
        _bounded("dphi", dphi)
        z = _as_float("z", self.z, 2)
        if z.shape != (R, n):
            raise InputError(f"z: expected shape {(R, n)} to match dphi, got {z.shape}")
        _check_labels("z", z)
        object.__setattr__(self, "dphi", dphi)
        object.__setattr__(self, "z", z)
        if self.g is not None:
            object.__setattr__(self, "g", as_probabilities("g", self.g, (R, n), "dphi"))
        if self.dphi_ref is None:
            for name in ("g_ref", "ref_weight", "ref_row", "features_ref"):
                if getattr(self, name) is not None:
                    raise InputError(f"{name} is given without dphi_ref")
        else:
            dref = _as_float("dphi_ref", self.dphi_ref, 3)
            if dref.shape[0] != R or dref.shape[2] != d:
                raise InputError(f"dphi_ref: expected shape (R={R}, N, d={d}), got {dref.shape}")
            N = dref.shape[1]
            if N == 0:
                raise InputError("dphi_ref: no reference pairs (N = 0); for labelled pairs only, give neither g, "
                                 "dphi_ref nor g_ref")
            _bounded("dphi_ref", dref)
            object.__setattr__(self, "dphi_ref", dref)
            if (self.g is None) != (self.g_ref is None):
                raise InputError("g is given without g_ref" if self.g_ref is None else "g_ref is given without g")
            if self.g_ref is not None:
                object.__setattr__(self, "g_ref", as_probabilities("g_ref", self.g_ref, (R, N), "dphi_ref"))
            if self.ref_weight is None:
                w = np.full((R, N), 1.0 / N)
            else:
                w = _as_float("ref_weight", self.ref_weight)
                w = np.broadcast_to(w, (R, N)).copy() if w.shape in ((N,), (R, N)) else w
            if w.shape != (R, N) or (w < 0).any() or not np.isfinite(w).all() \
                    or (np.abs(w.sum(axis=1) - 1.0) > 1e-8).any():
                raise InputError(f"ref_weight: need {N} non-negative finite weights per replication summing to 1")
            object.__setattr__(self, "ref_weight", w)
            rows = np.full(N, -1, dtype=np.int64) if self.ref_row is None else self.ref_row
            object.__setattr__(self, "ref_row", _check_ref_row(rows, N))
        if self.dphi_ref is not None and (self.features is None) != (self.features_ref is None):
            given, missing = ("features", "features_ref") if self.features_ref is None else ("features_ref", "features")
            raise InputError(f"{given} is given without {missing}: the learner of g_hat needs the same features on "
                             "the labelled and the reference pairs")
        for name, rows in (("features", n), ("features_ref", self.n_ref)):
            val = getattr(self, name)
            if val is not None:
                arr = _as_float(name, val, 3)
                if arr.shape[:2] != (R, rows):
                    raise InputError(f"{name}: expected shape (R={R}, {rows}, q) to match the pairs, got {arr.shape}")
                _bounded(name, arr)
                object.__setattr__(self, name, arr)
        if self.features_ref is not None and self.features_ref.shape[2] != self.features.shape[2]:
            raise InputError(f"features_ref: {self.features_ref.shape[2]} features per pair, features has "
                             f"{self.features.shape[2]}")

    @property
    def reps(self) -> int:
        """Number of replications R."""
        return self.dphi.shape[0]

    @property
    def n(self) -> int:
        """Labelled pairs per replication."""
        return self.dphi.shape[1]

    @property
    def d(self) -> int:
        """Feature dimension."""
        return self.dphi.shape[2]

    @property
    def n_ref(self) -> int:
        """Reference pairs per replication (0 when there are none)."""
        return 0 if self.dphi_ref is None else self.dphi_ref.shape[1]

    def replication(self, r: int) -> "PairData":
        """The ``r``-th replication as a one-replication data set."""
        return self.replications(slice(r, r + 1))

    def replications(self, idx: slice | np.ndarray) -> "PairData":
        """The replications ``idx`` (a slice or an index array) as a data set."""
        sl = idx
        take = lambda a: None if a is None else a[sl]  # noqa: E731
        return replace(
            self, dphi=self.dphi[sl], z=self.z[sl], g=take(self.g), dphi_ref=take(self.dphi_ref),
            g_ref=take(self.g_ref), ref_weight=take(self.ref_weight), features=take(self.features),
            features_ref=take(self.features_ref),
        )

    def with_g(self, g: np.ndarray, g_ref: np.ndarray) -> "PairData":
        """The same pairs with another auxiliary model's probabilities."""
        return replace(self, g=g, g_ref=g_ref)


@dataclass(frozen=True)
class PairPopulation:
    r"""A finite-response population: ``P`` prompt draws with ``K`` responses each.

    The exact asymptotics sum over the ``K x K`` response pairs of a prompt and average over the
    ``P`` prompts (a large-sample average whose Monte Carlo error is reported).

    Attributes
    ----------
    phi : (P, K, d) features ``phi(x_p, a)``.
    pi : (P, K) reference policy ``pi_ref(a | x_p)``.
    g_star : (P, K, K) ``g*(x_p, a, b)``, probability that ``a`` (shown first) beats ``b``.
    utility : (P, K) true utility ``r*(x_p, a)``, or None when the preferences have none.
    """

    phi: np.ndarray
    pi: np.ndarray
    g_star: np.ndarray
    utility: np.ndarray | None = None

    def __post_init__(self) -> None:
        phi = _as_float("phi", self.phi, 3)
        P, K, d = phi.shape
        if P < 1 or K < 1 or d < 1:
            raise InputError(f"phi: need at least one prompt, one response and one feature, got shape {phi.shape}")
        _bounded("phi", phi)
        pi = _as_float("pi", self.pi, 2)
        gs = _as_float("g_star", self.g_star, 3)
        if pi.shape != (P, K):
            raise InputError(f"pi: expected shape {(P, K)}, got {pi.shape}")
        if gs.shape != (P, K, K):
            raise InputError(f"g_star: expected shape {(P, K, K)}, got {gs.shape}")
        check_probability("pi", pi)
        if not np.allclose(pi.sum(axis=1), 1.0, atol=1e-8):
            raise InputError("pi: each prompt's reference probabilities must sum to 1")
        check_probability("g_star", gs)
        object.__setattr__(self, "phi", phi)
        object.__setattr__(self, "pi", pi)
        object.__setattr__(self, "g_star", gs)
        if self.utility is not None:
            u = _as_float("utility", self.utility, 2)
            if u.shape != (P, K):
                raise InputError(f"utility: expected shape {(P, K)}, got {u.shape}")
            _finite("utility", u)
            object.__setattr__(self, "utility", u)

    @property
    def size(self) -> int:
        """Number of prompt draws P."""
        return self.phi.shape[0]

    @property
    def K(self) -> int:
        """Responses per prompt."""
        return self.phi.shape[1]

    @property
    def d(self) -> int:
        """Feature dimension."""
        return self.phi.shape[2]
