r"""Linear-reward estimators fitted on a leading replication axis (DESIGN.md 3.4, 4).

For replication ``r`` with margins ``u_i = theta . dphi_i`` (labelled) and ``u_j = theta . dphi_j``
(reference), every method minimises the VR objective of ``theory.losses``

.. math::
    L(\theta) = \frac1n \sum_i [m_{Z_i}(u_i) - \lambda m_{\hat g_i}(u_i)] + \lambda \sum_j v_j m_{\hat g_j}(u_j)

- ``mle``: ``lambda = 0``; ``vrpo``: ``lambda = 1`` (or the given ``lam``);
- ``vrpo_tuned``: ``lambda`` minimising the estimated ``tr(W Cov)`` (``W = I`` or ``e_j e_j^T``),
  closed form from the cluster influence terms at the MLE, clipped to ``[0, 1]``;
- ``vrpo_crossfit``: ``g_hat`` learned from the labelled rows with K-fold cross-fitting, then ``vrpo``;
  with ``lam="auto"`` its ``lambda`` is power-tuned as in ``vrpo_tuned``, which keeps it asymptotically
  no worse than the MLE however poor the learned ``g_hat`` (a flexible learner needs many rows to beat
  the BT fit, DESIGN.md 3.5).

Smooth losses are minimised by a batched damped Newton method (all R replications at once) to a
gradient norm below ``tol``; the derivatives of ``L`` in the margins come from ``vr_derivatives``
beside ``vr_objective`` (checked against automatic differentiation of it). Non-smooth losses (hinge, truncated
hinge) are minimised by Gaussian-smoothing continuation (``SmoothedTruncatedHinge`` with bandwidths
``CONTINUATION``), each stage by the same Newton method, started from the logistic fit. With
``bound`` the norm-constrained problem ``||theta|| <= B`` is solved with cvxpy where the constraint
binds.

Performance (``benchmarks/``): Newton runs on blocks of about ``CACHE_BLOCK`` bytes of features, each
block iterated to convergence while its data stay in cache; every other pass over the data takes the
replication axis in chunks within ``MEMORY_BUDGET`` bytes of working memory. With ``lambda = 0`` on
every replication (the MLE) the reference pairs are not read (their terms are multiplied by zero),
and a Hessian product whose margin curvatures are all zero (logistic VRPO at ``lambda = 1``: the
labelled ``m''_Z = m''_g``) is skipped; both shortcuts give the same numbers. A cold start (``theta = 0``)
of a convex objective split into several blocks starts the blocks after the first at the mean of the
first block's estimates (two Newton iterations fewer for Monte Carlo replications of one design). For the
logistic loss the compiled kernels of ``theory.kernels`` run the Newton loop itself, one replication per
thread, as long as plain Newton steps do (each evaluation forms the margins, derivatives, gradient, the
Hessian's distinct entries and the existence certificates in one pass), and hand a replication that needs
a safeguard back to the Python loop, which evaluates with the same kernel; the sandwich's meat is one
more kernel. Without a C++ compiler the torch path gives the same numbers to rounding, 3-4 times slower.

The covariance is the cluster sandwich ``H^{-1} V H^{-1}``: ``H`` the Hessian of ``L`` (for
non-smooth losses, of a smoothed loss with a rule-of-thumb bandwidth), ``V`` the empirical covariance
of the per-prompt gradient sums (a labelled row and the reference pairs on its prompt form one
cluster; unlabelled and independent prompts their own), centred within each kind of cluster. It is
the covariance of ``theta_hat`` itself (already of order ``1/n``).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .data import PairData, check_clip, check_solver, check_weight, rank_deficient
from .errors import InputError, SeparableDataError
from .losses import Logistic, MarginLoss, VRDerivatives, get_loss, vr_derivatives, vr_objective

__all__ = ["METHODS", "FitResult", "fit", "tune_lambda", "CONTINUATION"]

METHODS = ("mle", "vrpo", "vrpo_tuned", "vrpo_crossfit")
CONTINUATION = (0.3, 0.1, 0.03, 0.01)
_DTYPE = torch.float64


@dataclass(frozen=True)
class FitResult:
    """Estimates for R replications.

    ``theta`` (R, d); ``cov`` (R, d, d) sandwich covariance of ``theta_hat``; ``lam`` (R,);
    ``converged``, ``separable``, ``at_bound`` (R,) flags; ``n_iter`` (R,); ``grad_norm`` (R,);
    ``cov_mle`` (R, d, d) the MLE's sandwich on the same data (VR methods), for variance ratios.
    """

    theta: np.ndarray
    cov: np.ndarray
    lam: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    grad_norm: np.ndarray
    separable: np.ndarray
    method: str
    loss: str
    bound: float | None = None
    at_bound: np.ndarray | None = field(default=None, repr=False)
    cov_mle: np.ndarray | None = field(default=None, repr=False)

    @property
    def se(self) -> np.ndarray:
        """Standard errors ``sqrt(diag(cov))``, (R, d)."""
        return np.sqrt(np.clip(np.diagonal(self.cov, axis1=-2, axis2=-1), 0.0, None))

    def variance_ratio(self, weight: int | np.ndarray | None = None) -> np.ndarray:
        """Estimated ``tr(W cov) / tr(W cov_mle)`` (``W = I``, ``e_j e_j^T`` for a coordinate ``weight = j``,
        or a PSD matrix ``weight``), (R,)."""
        weight = _weight(weight, self.theta.shape[1])
        if self.cov_mle is None:
            return np.ones(self.theta.shape[0])
        return _weighted_trace(self.cov, weight) / _weighted_trace(self.cov_mle, weight)


def _weight(weight: object, d: int) -> int | np.ndarray | None:
    """A checked ``weight``: None or a coordinate index as given, else its (d, d) matrix."""
    W = check_weight("weight", weight, d)
    return weight if weight is None or isinstance(weight, (int, np.integer)) else W


def _weighted_trace(cov: np.ndarray | Tensor, weight: int | np.ndarray | None):
    """``tr(W cov)`` over the last two axes: ``W = I`` (None), ``e_j e_j^T`` (an index) or a symmetric matrix."""
    if weight is None:
        return cov.diagonal(0, -2, -1).sum(-1)
    if isinstance(weight, (int, np.integer)):
        return cov[..., weight, weight]
    W = torch.as_tensor(weight, dtype=cov.dtype) if isinstance(cov, Tensor) else np.asarray(weight)
    return (cov * W).sum((-2, -1))


# --- tensors and clusters ---------------------------------------------------------------------

#: Working memory (bytes) the engine may allocate beyond its input arrays. Every pass over the data
#: (Newton blocks, bread Hessians, influence terms, sandwiches) takes the replication axis in chunks
#: whose temporaries fit in it; a replication whose own temporaries exceed it is processed alone. Small
#: chunks also keep each temporary below the size at which the C allocator maps fresh pages (page
#: faults cost more than the arithmetic on them).
MEMORY_BUDGET = 32 * 2**20


def _cache_block(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Half the largest processor cache Linux reports (sysfs), within [1 MB, MEMORY_BUDGET]; 4 MB when
    unknown. Measured on a 32 MB L3 (R = 1000, n = 2000, d = 10): 2 MB blocks 0.30 / 0.92 s (MLE / VRPO),
    4 MB 0.28 / 0.87 s, 8-32 MB 0.23-0.24 / 0.63-0.67 s, 64 MB 0.29 / 0.98 s."""
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text.rstrip("KkMmGg")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return min(max(max(sizes) // 2, 2**20), MEMORY_BUDGET) if sizes else 4 * 2**20


#: Bytes of pair features per Newton block: a block of replications is iterated to convergence while
#: its features stay in the processor's cache, so each feature is read from memory once per solve,
#: not once per iteration; fewer, larger blocks also cost less Python per Newton step.
CACHE_BLOCK = _cache_block()


@dataclass
class _Work:
    """Units of work done since ``reset()`` (the benchmarks turn them into flop counts).

    ``gram_pairs``: pairs x replications of derivative evaluations with a Hessian (margins ``X theta``,
    gradient ``X^T c``, Hessian ``X^T (h X)``); ``grad_pairs``: of evaluations with margins and gradient
    only (no Hessian asked, or ``h = 0`` on those pairs); ``value_pairs``: of
    objective values only (line searches); ``factorizations``: ``d x d`` Cholesky factorisations;
    ``cluster_rows``: cluster rows x replications entering a sandwich Gram ``G^T G``; ``kernel_pairs``: of
    evaluations by the compiled kernel with a Hessian (margins, gradient, weighting and only the
    Hessian's distinct entries); ``d``: the feature dimension of the last evaluation.
    """

    gram_pairs: int = 0
    kernel_pairs: int = 0
    grad_pairs: int = 0
    value_pairs: int = 0
    factorizations: int = 0
    cluster_rows: int = 0
    d: int = 0

    def reset(self) -> None:
        self.gram_pairs = self.grad_pairs = self.value_pairs = self.factorizations = self.cluster_rows = 0
        self.kernel_pairs = 0


_WORK = _Work()


@dataclass
class _KernelTerms:
    """A logistic objective as ``sum_i a_i softplus(u_i) - b_i u_i`` (the form ``kernels.logistic_eval``
    evaluates) over the labelled pairs ``X`` (R, n, d) and, when they enter, the reference pairs ``X_ref``, kept
    as the data the coefficients are made of (labels ``z``; for the VR objective weights ``lam`` (R,), ``g``,
    ``g_ref``, ``w_ref``):
    ``kernels.logistic_newton`` forms them replication by replication in its threads' caches; ``a``, ``b``,
    ``a_ref``, ``b_ref`` and ``y`` (the labels' signs ``2Z - 1``, for the overlap certificate) are made on
    first use, for ``logistic_eval``. By ``m_g(u) = softplus(u) - g u`` (logistic), a labelled pair contributes
    ``a = (1 - lam) / n``, ``b = (Z - lam g) / n`` and a reference pair ``a = lam v``, ``b = lam v g`` (``v`` the
    reference weight, ``1/N`` by default); without ``g`` (the MLE) ``a = 1 / n``, ``b = Z / n``.
    ``linear``: replications whose labelled ``a`` is zero (logistic VRPO at ``lam = 1``). ``rows``: the
    replications selected (None: all), so that a subset is an index, not a copy (a fresh copy of a Newton
    block per subset cost more in page faults than the kernel's arithmetic). ``logistic_eval`` reads the features
    as they come, so no transposed copy is made (at n = 10^6 the copies of a VRPO fit's 400 MB took a third of
    it). What is made on first use is shared by the selections."""

    X: Tensor
    z: Tensor
    lam: Tensor
    g: Tensor | None = None
    X_ref: Tensor | None = None
    g_ref: Tensor | None = None
    w_ref: Tensor | None = None
    rows: Tensor | None = None
    made: dict = field(default_factory=dict)

    def _made(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        if name not in self.made:
            self.made[name] = make()
        return self.made[name]

    @property
    def a(self) -> Tensor:
        R, n = self.z.shape
        if self.g is None:
            return self._made("a", lambda: torch.full((R, n), 1.0 / n, dtype=_DTYPE))
        return self._made("a", lambda: ((1.0 - self.lam[:, None]) / n).expand(R, n).contiguous())

    @property
    def b(self) -> Tensor:
        n = self.z.shape[1]
        if self.g is None:
            return self._made("b", lambda: (self.z / n).contiguous())
        return self._made("b", lambda: ((self.z - self.lam[:, None] * self.g) / n).contiguous())

    @property
    def y(self) -> Tensor:
        return self._made("y", lambda: (2.0 * self.z - 1.0).contiguous())

    @property
    def a_ref(self) -> Tensor | None:
        if self.X_ref is None:
            return None
        if self.w_ref is None:
            return self._made("a_ref", lambda: (self.lam[:, None] * (1.0 / self.g_ref.shape[1]))
                              .expand_as(self.g_ref).contiguous())
        return self._made("a_ref", lambda: (self.lam[:, None] * self.w_ref).contiguous())

    @property
    def b_ref(self) -> Tensor | None:
        return None if self.X_ref is None else self._made("b_ref", lambda: (self.a_ref * self.g_ref).contiguous())

    @property
    def linear(self) -> Tensor:
        """Which replications have a linear labelled term (the VR objective at ``lam = 1``)."""
        return self.lam == 1.0 if self.g is not None else torch.zeros(self.z.shape[0], dtype=torch.bool)

    def select(self, key: Tensor | slice, with_ref: bool = True) -> "_KernelTerms":
        """Replications ``key`` of the selected ones (indices into the same arrays: nothing is copied)."""
        current = self.rows if self.rows is not None else torch.arange(self.X.shape[0])
        if with_ref:
            return replace(self, rows=current[key])
        return replace(self, rows=current[key], X_ref=None, g_ref=None, w_ref=None)

    @property
    def selected_linear(self) -> Tensor:
        """Which selected replications have a linear labelled term."""
        return self.linear if self.rows is None else self.linear[self.rows]


def _compiled(loss: MarginLoss) -> bool:
    """Whether the compiled logistic kernels (Newton loop, evaluation, meat) apply: the logistic loss, a kernel
    built."""
    return type(loss) is Logistic and kernels.available()


def _kernel_terms(loss: MarginLoss, lam: Tensor, b: "_Batch") -> _KernelTerms | None:
    """The logistic objective of ``b`` at ``lam`` for the compiled kernels (``_KernelTerms``), or None where they
    do not apply (``_compiled``)."""
    if _compiled(loss):
        if not _uses_ref(b, lam):
            return _KernelTerms(b.dphi.contiguous(), b.z.contiguous(), lam.contiguous())
        w = None if b.w_ref is None else b.w_ref.contiguous()
        return _KernelTerms(b.dphi.contiguous(), b.z.contiguous(), lam.contiguous(), b.g.contiguous(),
                            b.dphi_ref.contiguous(), b.g_ref.contiguous(), w)
    return None


@dataclass
class _Batch:
    """Torch views of a PairData, plus the prompt clusters of the sandwich and, inside a Newton solve
    of the logistic loss, the compiled kernel's terms."""

    dphi: Tensor
    z: Tensor
    g: Tensor | None
    dphi_ref: Tensor | None
    g_ref: Tensor | None
    w_ref: Tensor | None
    lab_cluster: Tensor  # (n,) cluster of each labelled row = its index
    ref_cluster: Tensor | None  # (N,) cluster of each reference pair
    n_clusters: int
    kern: _KernelTerms | None = None

    @classmethod
    def from_data(cls, data: PairData, g: np.ndarray | None = None, g_ref: np.ndarray | None = None) -> "_Batch":
        t = lambda a: None if a is None else torch.as_tensor(np.ascontiguousarray(a), dtype=_DTYPE)  # noqa: E731
        g = data.g if g is None else g
        g_ref = data.g_ref if g_ref is None else g_ref
        n = data.n
        ref_cluster, n_clusters = None, n
        if data.dphi_ref is not None and data.ref_row.size and 0 <= data.ref_row.min() and data.ref_row.max() < n:
            ref_cluster = torch.tensor(data.ref_row)  # every reference pair's prompt is labelled: its cluster
        elif data.dphi_ref is not None:
            rows = data.ref_row
            other = rows >= n
            ids = np.empty_like(rows)
            ids[(rows >= 0) & ~other] = rows[(rows >= 0) & ~other]
            _, compact = np.unique(rows[other], return_inverse=True)
            ids[other] = n + compact
            n_other = int(compact.max()) + 1 if other.any() else 0
            lone = rows < 0
            ids[lone] = n + n_other + np.arange(lone.sum())
            ref_cluster = torch.as_tensor(ids)
            n_clusters = n + n_other + int(lone.sum())
        return cls(dphi=t(data.dphi), z=t(data.z), g=t(g), dphi_ref=t(data.dphi_ref), g_ref=t(g_ref),
                   w_ref=t(data.ref_weight), lab_cluster=torch.arange(n), ref_cluster=ref_cluster,
                   n_clusters=n_clusters)

    def subset(self, idx: Tensor, with_ref: bool = True) -> "_Batch":
        """Replications ``idx`` (a copy); without ``with_ref`` the reference pairs are left out. A batch with
        kernel terms selects those only (as indices): the kernel path reads nothing else."""
        if self.kern is not None:
            return replace(self, kern=self.kern.select(idx, with_ref))
        if idx.numel() == self.dphi.shape[0]:
            return self
        s = lambda a: None if a is None else a[idx]  # noqa: E731
        if not with_ref:
            return _Batch(self.dphi[idx], self.z[idx], None, None, None, None, self.lab_cluster, None,
                          self.dphi.shape[1])
        return _Batch(self.dphi[idx], self.z[idx], s(self.g), s(self.dphi_ref), s(self.g_ref), s(self.w_ref),
                      self.lab_cluster, self.ref_cluster, self.n_clusters)

    def rows(self, sl: slice) -> "_Batch":
        """Replications ``sl`` as views (no copy; kernel terms only, as in ``subset``)."""
        if self.kern is not None:
            return replace(self, kern=self.kern.select(sl))
        s = lambda a: None if a is None else a[sl]  # noqa: E731
        return _Batch(self.dphi[sl], self.z[sl], s(self.g), s(self.dphi_ref), s(self.g_ref), s(self.w_ref),
                      self.lab_cluster, self.ref_cluster, self.n_clusters)

    def with_kernel(self, loss: MarginLoss, lam: Tensor) -> "_Batch":
        """This batch with the compiled kernel's terms for ``loss`` at ``lam`` (itself where none apply)."""
        kern = _kernel_terms(loss, lam, self)
        return self if kern is None else replace(self, kern=kern)

    @property
    def has_ref(self) -> bool:
        return self.g is not None and self.dphi_ref is not None

    def pairs(self, with_ref: bool = True) -> int:
        """Pairs per replication that an evaluation reads (labelled, plus reference ones if used)."""
        return self.dphi.shape[1] + (self.dphi_ref.shape[1] if with_ref and self.has_ref else 0)

    def margins(self, theta: Tensor) -> tuple[Tensor, Tensor | None]:
        u = _margins(self.dphi, theta)
        u_ref = _margins(self.dphi_ref, theta) if self.has_ref else None
        return u, u_ref


def _margins(X: Tensor, theta: Tensor) -> Tensor:
    """``u_ri = X_ri . theta_r``, (R, P), as ``theta_r^T X_r^T`` (row times matrix: several times faster
    in batched BLAS than the equivalent matrix-vector product ``X_r theta_r``)."""
    return torch.bmm(theta.unsqueeze(1), X.transpose(1, 2)).squeeze(1)


MARGIN_MAX = 1e6


def _saturated(b: _Batch, theta: Tensor, with_ref: bool) -> Tensor:
    """(R,) whether some margin ``|x . theta|`` of a pair the objective reads passes ``MARGIN_MAX``: an
    iterate running off along a (quasi-)separating or recession direction, where every loss is flat."""
    u, u_ref = b.margins(theta)
    big = u.abs().amax(1) > MARGIN_MAX
    return big | (u_ref.abs().amax(1) > MARGIN_MAX) if with_ref and u_ref is not None else big


def _uses_ref(b: _Batch, lam: Tensor) -> bool:
    """Whether the reference pairs enter the objective: with ``lam = 0`` on every replication they are
    multiplied by zero (the MLE), so they are not read at all."""
    return b.has_ref and bool((lam != 0).any())


def _chunk_reps(b: _Batch, budget: int, pair_bytes: int, with_ref: bool = True, clusters: bool = True) -> int:
    """Replications per chunk so that ``pair_bytes`` per pair read (reference pairs only ``with_ref``) and,
    with ``clusters``, the sandwich's per-cluster gradient sums fit in ``budget``."""
    per_rep = b.pairs(with_ref) * pair_bytes + (8 * 4 * b.n_clusters * b.dphi.shape[2] if clusters else 0)
    return max(1, budget // max(per_rep, 1))


def _memory_chunks(b: _Batch, R: int, with_ref: bool = True, clusters: bool = True) -> list[slice]:
    """Slices of the replication axis whose working memory fits in ``MEMORY_BUDGET``: per pair, the
    weighted features ``[h X | c]`` (d + 1 numbers) and about 16 elementwise temporaries; with
    ``clusters``, the sandwich's cluster sums. Passes that skip the reference pairs (``lam = 0``) or
    form no sandwich take bigger chunks."""
    step = _chunk_reps(b, MEMORY_BUDGET, 8 * (b.dphi.shape[2] + 1 + 16), with_ref, clusters)
    return [slice(s, min(s + step, R)) for s in range(0, R, step)]


_SCRATCH = threading.local()


def _scratch_like(X: Tensor) -> Tensor:
    """A buffer of ``X``'s shape reused across evaluations (per thread, dropped when ``fit`` returns):
    a fresh multi-megabyte temporary per evaluation is paid in page faults."""
    numel = X.numel()
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != X.dtype:
        if numel * X.element_size() > MEMORY_BUDGET:
            return torch.empty(X.shape, dtype=X.dtype)
        buf = torch.empty(numel, dtype=X.dtype)
        _SCRATCH.buf = buf
    return buf[:numel].view(X.shape)


def _gram(X: Tensor, c: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Gradient ``X^T c`` (R, d) and Hessian ``X^T diag(h) X`` (R, d, d), each one batched product.

    (Appending ``c`` as an extra column of ``h X`` to get both from one product was measured slower:
    BLAS is tuned for ``d = 10``-wide operands better than for 11.)"""
    grad = torch.bmm(c.unsqueeze(1), X).squeeze(1)
    if h is None:
        return grad, None
    return grad, torch.bmm(X.transpose(1, 2), torch.mul(X, h.unsqueeze(-1), out=_scratch_like(X)))


def _gram_counted(X: Tensor, c: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``_gram``, skipping the Hessian's product where ``h`` is identically zero (the labelled pairs of
    logistic VRPO with ``lam = 1``: ``m''_Z = m''_g``), and counting the work."""
    R, P, d = X.shape
    if h is not None and not bool(h.any()):
        _WORK.grad_pairs += R * P
        return _gram(X, c, None)[0], torch.zeros(R, d, d, dtype=X.dtype)
    if h is None:
        _WORK.grad_pairs += R * P
    else:
        _WORK.gram_pairs += R * P
    return _gram(X, c, h)


def _evaluate(loss: MarginLoss, lam: Tensor, b: _Batch, theta: Tensor, hessian: bool = True,
              certificate: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Objective (R,), gradient (R, d), Hessian (R, d, d) and, with ``certificate``, whether ``theta``
    certifies that no minimiser exists (R,; all False without), in one pass over one chunk (chain rule
    through the margins; the compiled kernel where the batch carries its terms).

    Without reference pairs (the MLE) the certificate is the overlap condition of Albert and Anderson
    (1984): with ``dphi`` of rank ``d``, the logistic MLE exists iff no ``theta != 0`` has
    ``(2Z_i - 1) u_i >= 0`` on every row. The weak inequality counts a pair with ``dphi = 0`` (a response
    against itself) and a pair orthogonal to ``theta`` as not contradicting the separation
    (quasi-complete separation). With them (the VR objective, convex for ``lam <= 1``) it is a negative
    recession slope ``L_inf(theta) = lim_t L(t theta) / t < 0``: ``L`` then decreases without bound along
    ``theta`` from any point, though the labelled pairs need not be separable."""
    ref = _uses_ref(b, lam)
    _WORK.d = theta.shape[1]
    if b.kern is not None:
        return _kernel_evaluate(b, lam, theta, 2 if hessian else 1, certificate)
    u = _margins(b.dphi, theta)
    u_ref = None
    if ref:
        u_ref = _margins(b.dphi_ref, theta)
        der = vr_derivatives(loss, u, b.z, b.g, u_ref, b.g_ref, lam, ref_weight=b.w_ref)
    else:
        der = vr_derivatives(loss, u, b.z)
    c, c_ref = der.first(lam)
    grad, hess = _gram_counted(b.dphi, c, der.h if hessian else None)
    if ref:
        g_ref, h_ref = _gram_counted(b.dphi_ref, c_ref, der.h_ref if hessian else None)
        grad = grad + g_ref
        hess = hess + h_ref if hessian else None
    if certificate and ref:
        sep = _unbounded(loss, lam, b, u, u_ref)
    elif certificate:
        sep = ((2.0 * b.z - 1.0) * u >= 0).all(dim=1) & (theta != 0).any(dim=1)
    else:
        sep = torch.zeros(theta.shape[0], dtype=torch.bool)
    return der.value, grad, hess, sep


def _kernel_evaluate(b: _Batch, lam: Tensor, theta: Tensor, mode: int, certificate: bool = False
                     ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """``_evaluate`` by ``kernels.logistic_eval`` over the labelled and (if they enter) reference pairs of
    ``b.kern``: value, gradient (``mode >= 1``), Hessian (``mode == 2``) and the certificate (the kernel
    counts the labelled pairs with ``(2Z - 1) u < 0`` for the overlap condition, or returns the recession
    slope and the margins' size ``mean |u| + |lam| mean |u_ref|`` for the VR objective); the work counted."""
    k = b.kern
    theta = theta.contiguous()
    R, n = theta.shape[0], k.X.shape[1]
    with_ref = k.X_ref is not None
    rec = (torch.empty(R, dtype=_DTYPE), torch.empty(R, dtype=_DTYPE)) if certificate and with_ref else None
    against = (k.y, torch.empty(R, dtype=_DTYPE)) if certificate and not with_ref else None
    out = kernels.logistic_eval(k.X, k.a, k.b, theta, mode, recession=rec, against=against, rows=k.rows)
    N = 0
    if with_ref:
        N = k.X_ref.shape[1]
        rec_ref = (torch.zeros(R, dtype=_DTYPE), torch.zeros(R, dtype=_DTYPE)) if certificate else None
        kernels.logistic_eval(k.X_ref, k.a_ref, k.b_ref, theta, mode, out=out, recession=rec_ref, rows=k.rows)
    if mode == 0:
        _WORK.value_pairs += R * (n + N)
    elif mode == 1:
        _WORK.grad_pairs += R * (n + N)
    else:  # labelled pairs of linear replications get no Hessian
        linear = int(k.selected_linear.sum())
        _WORK.kernel_pairs += (R - linear) * n + R * N
        _WORK.grad_pairs += linear * n
    if not certificate:
        sep = torch.zeros(R, dtype=torch.bool)
    elif with_ref:
        size = rec[1] / n + lam.abs() * rec_ref[1] / N
        sep = rec[0] + rec_ref[0] < -1e-9 * size
    else:  # the overlap condition: no labelled pair against theta
        sep = (against[1] == 0) & (theta != 0).any(dim=1)
    return (*out, sep)


def _unbounded(loss: MarginLoss, lam: Tensor, b: _Batch, u: Tensor, u_ref: Tensor) -> Tensor:
    """Whether the VR objective's recession slope at the margins ``u``, ``u_ref`` of a point ``theta`` is
    negative, beyond rounding (a relative ``1e-9`` of the terms' size); False for a loss without linear
    growth (no recession loss)."""
    rec = loss.recession()
    if rec is None:
        return torch.zeros(u.shape[0], dtype=torch.bool)
    slope = vr_objective(rec, u, b.z, b.g, u_ref, b.g_ref, lam, ref_weight=b.w_ref)
    size = u.abs().mean(1) + lam.abs() * u_ref.abs().mean(1)
    return slope < -1e-9 * size


def _value(loss: MarginLoss, lam: Tensor, b: _Batch, theta: Tensor) -> Tensor:
    R = theta.shape[0]
    out = torch.empty(R, dtype=_DTYPE)
    for sl in _memory_chunks(b, R, _uses_ref(b, lam), clusters=False):
        bb, la, th = b.rows(sl), lam[sl], theta[sl]
        if bb.kern is not None:
            out[sl] = _kernel_evaluate(bb, la, th, 0)[0]
            continue
        u = _margins(bb.dphi, th)
        if _uses_ref(bb, la):
            out[sl] = vr_objective(loss, u, bb.z, bb.g, _margins(bb.dphi_ref, th), bb.g_ref, la, ref_weight=bb.w_ref)
        else:
            out[sl] = vr_objective(loss, u, bb.z)
        _WORK.value_pairs += th.shape[0] * bb.pairs(_uses_ref(bb, la))
    return out


def _margin_derivatives(loss: MarginLoss, lam: Tensor, b: _Batch, theta: Tensor) -> VRDerivatives:
    u, u_ref = b.margins(theta)
    if u_ref is None:
        return vr_derivatives(loss, u, b.z)
    return vr_derivatives(loss, u, b.z, b.g, u_ref, b.g_ref, lam, ref_weight=b.w_ref)


def _derivatives(loss: MarginLoss, lam: Tensor, b: _Batch, theta: Tensor,
                 hessian: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Objective (R,), gradient (R, d) and Hessian (R, d, d) by the chain rule through the margins,
    chunk by chunk of replications within ``MEMORY_BUDGET``."""
    R, d = theta.shape
    chunks = _memory_chunks(b, R, _uses_ref(b, lam), clusters=False)
    if len(chunks) == 1:
        return _evaluate(loss, lam, b, theta, hessian)[:3]
    value = torch.empty(R, dtype=_DTYPE)
    grad = torch.empty(R, d, dtype=_DTYPE)
    hess = torch.empty(R, d, d, dtype=_DTYPE) if hessian else None
    for sl in chunks:
        v, g_, h_, _ = _evaluate(loss, lam[sl], b.rows(sl), theta[sl], hessian)
        value[sl], grad[sl] = v, g_
        if hessian:
            hess[sl] = h_
    return value, grad, hess


def _damped_direction(hess: Tensor, grad: Tensor) -> Tensor:
    """Newton direction ``-(H + mu I)^{-1} g`` with the smallest ``mu`` in ``{0} U {s 10^(k-10)}`` (``s`` the
    mean absolute diagonal of ``H``) that makes ``H + mu I`` positive definite."""
    R, d = grad.shape
    eye = torch.eye(d, dtype=hess.dtype)
    scale = hess.diagonal(0, -2, -1).abs().mean(-1).clamp_min(1e-12)
    step = torch.empty_like(grad)
    idx = torch.arange(R)
    for k in range(31):
        shifted = hess if k == 0 else hess[idx] + (scale[idx] * 10.0 ** (k - 11))[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(shifted)
        _WORK.factorizations += idx.numel()
        ok = info == 0
        if k == 0 and bool(ok.all()):  # the usual case: every Hessian positive definite
            return -torch.cholesky_solve(grad[:, :, None], chol).squeeze(-1)
        step[idx[ok]] = -torch.cholesky_solve(grad[idx[ok], :, None], chol[ok]).squeeze(-1)
        idx = idx[~ok]
        if not idx.numel():
            return step
    step[idx] = -grad[idx]  # pathological curvature: steepest descent
    return step


@dataclass
class _NewtonState:
    theta: Tensor
    converged: Tensor
    separable: Tensor
    n_iter: Tensor
    grad_norm: Tensor
    hess: Tensor
    meat: Tensor | None = None  # the sandwich's meat at theta where the solver formed it (NaN elsewhere)


#: replications in the cold first block of a pooled start (``_blockwise``): the mean of their estimates starts the
#: others, within about 1/sqrt(32) of one replication's spread of the population's centre
POOL_REPS = 32


def _blockwise(solver, loss: MarginLoss, lam: Tensor, b: _Batch, theta0: Tensor, *args,
               pooled: bool = False) -> _NewtonState:
    """Run ``solver`` on blocks of replications of about ``CACHE_BLOCK`` bytes of features each, every
    block to convergence before the next (replications are independent); on the torch path also within the
    working memory of ``_memory_chunks`` (the compiled Newton loop needs none per block: its scratch is per
    thread and replication, and smaller blocks only add calls, each ending on its slowest replication).

    With ``pooled`` (a convex objective, the caller's choice) and a cold start (``theta0 = 0``), a first block
    of ``POOL_REPS`` replications is solved cold and the others start at the mean of its converged estimates
    (fewer cold replications: 3.4 -> 3.1 Newton iterations on average at R = 1000): Monte Carlo replications
    of one design lie within ``O(n^{-1/2})`` of each other, so Newton needs about two iterations fewer
    (3 against 5 for the logistic MLE at n = 2000, d = 10). The compiled logistic loop also takes a pre-step
    with the mean Hessian of those estimates (``kernels.logistic_newton``'s ``pre_hess``): a gradient-only
    evaluation for most of a Newton iteration (3.07 -> 2.22 iterations after it, same setting). The minimiser
    does not depend on the start; the estimate moves within the gradient tolerance."""
    R, d = theta0.shape
    with_ref = _uses_ref(b, lam)
    step = _chunk_reps(b, CACHE_BLOCK, 8 * b.dphi.shape[2], with_ref, clusters=False)
    if not _compiled(loss):
        step = min(step, _memory_chunks(b, R, with_ref, clusters=False)[0].stop)
    cold = pooled and not bool(theta0.any())
    first = min(step, POOL_REPS) if cold else step  # a cold first block: only as large as the mean needs
    if first >= R:
        return solver(loss, lam, b, theta0, *args)
    parts = [solver(loss, lam[:first], b.rows(slice(0, first)), theta0[:first], *args)]
    ok = parts[0].converged & ~parts[0].separable
    pre = {}
    if cold and bool(ok.any()):
        theta0 = parts[0].theta[ok].mean(0).expand(R, d)
        if solver is _newton_block and _compiled(loss):
            pre["pre_hess"] = parts[0].hess[ok].mean(0)
    parts += [solver(loss, lam[s:s + step], b.rows(slice(s, s + step)), theta0[s:s + step], *args, **pre)
              for s in range(first, R, step)]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    meat = None
    if any(p.meat is not None for p in parts):
        meat = torch.cat([p.meat if p.meat is not None else torch.full_like(p.hess, math.nan) for p in parts])
    return _NewtonState(cat("theta"), cat("converged"), cat("separable"), cat("n_iter"), cat("grad_norm"),
                        cat("hess"), meat)


def _newton(loss: MarginLoss, lam: Tensor, b: _Batch, theta0: Tensor, tol: float, max_iter: int,
            certificate: bool, theta_max: float, meat: bool = False) -> _NewtonState:
    """Batched damped Newton with Armijo backtracking (``_newton_block``), block by block of replications
    (a cold start of a convex objective pooled across blocks: ``_blockwise``)."""
    pooled = (loss.convex and not bool(lam.any())) or (type(loss) is Logistic and bool(((lam >= 0) & (lam <= 1)).all()))
    return _blockwise(_newton_block, loss, lam, b, theta0, tol, max_iter, certificate, theta_max, meat,
                      pooled=pooled)


def _newton_block(loss: MarginLoss, lam: Tensor, b: _Batch, theta0: Tensor, tol: float, max_iter: int,
                  certificate: bool, theta_max: float, meat: bool = False,
                  pre_hess: Tensor | None = None) -> _NewtonState:
    """Batched damped Newton with Armijo backtracking, replication by replication until converged.

    The first trial point of a step is evaluated with its derivatives, which the next step reuses
    when the full step is accepted (the usual case near the optimum). With ``meat``, the replications the
    compiled loop takes to convergence also get the sandwich's meat at ``lam`` (``_NewtonState.meat``, NaN for
    the others): formed from the last evaluation while the features are in the cache. ``pre_hess``: the
    compiled loop's pre-step (``kernels.logistic_newton``; the Python loop starts at ``theta0``)."""
    R, d = theta0.shape
    theta = theta0.clone()
    converged = torch.zeros(R, dtype=torch.bool)
    separable = torch.zeros(R, dtype=torch.bool)
    n_iter = torch.zeros(R, dtype=torch.long)
    grad_norm = torch.full((R,), math.inf, dtype=_DTYPE)
    hess_out = torch.zeros(R, d, d, dtype=_DTYPE)
    active = torch.arange(R)
    with_ref = _uses_ref(b, lam)
    meat_out = None
    plain = b
    b = b.with_kernel(loss, lam)
    sub = b
    # the compiled loop takes every replication as far as plain Newton steps go, one per thread: with fewer
    # replications than threads the Python loop's evaluations split each replication's pairs over them instead
    if b.kern is not None and R >= torch.get_num_threads():
        fast = _kernel_newton(b, lam, theta, tol, max_iter, certificate, theta_max, meat, pre_hess)
        theta, n_iter, meat_out = fast.theta, fast.iters.clone(), fast.meat
        done = fast.converged
        converged[done], grad_norm[done], hess_out[done] = True, fast.grad[done].norm(dim=1), fast.hess[done]
        active = (~done).nonzero().squeeze(1)
        if not active.numel():
            return _NewtonState(theta, converged, separable, n_iter, grad_norm, hess_out, meat_out)
        sub = b.subset(active, with_ref)
    # The VR objective's recession certificate costs about a tenth of a VRPO fit when evaluated at every
    # point. An unbounded objective keeps a large Newton decrement (its gradient stays away from zero
    # while its curvature vanishes), so the certificate is skipped at the warm start and at steps whose
    # decrement is already small: half the evaluations.
    lazy = certificate and with_ref
    value, grad, hess, sep = _evaluate(loss, lam[active], sub, theta[active], True, certificate and not lazy)
    while active.numel():
        gnorm = grad.norm(dim=1)
        grad_norm[active] = gnorm
        hess_out[active] = hess
        done = gnorm < tol
        # theta certifies that no minimiser exists (separated labelled pairs, or an unbounded VR objective)
        sep = sep & ~done
        separable[active[sep]] = True
        done = done | sep
        blown = theta[active].norm(dim=1) > theta_max
        if blown.any():  # a large norm alone is a finite MLE of mis-scaled or nearly collinear features
            far = active[blown]
            blown[blown.clone()] = _saturated(plain.subset(far, with_ref), theta[far], with_ref)
        separable[active[blown & ~done]] = True
        converged[active[done & ~separable[active]]] = True
        keep = ~(done | blown) & (n_iter[active] < max_iter)
        if not keep.any():
            break
        if not keep.all():
            active, value, grad, hess = active[keep], value[keep], grad[keep], hess[keep]
            sub = b.subset(active, with_ref)
        lam_a = lam[active]
        th = theta[active]
        step = _damped_direction(hess, grad)
        slope = (grad * step).sum(1)
        slack = 1e-12 * value.abs().clamp_min(1.0)
        check = certificate and not (lazy and bool((-slope <= 1e-8 * value.abs().clamp_min(1.0)).all()))
        full_value, full_grad, full_hess, full_sep = _evaluate(loss, lam_a, sub, th + step, True, check)
        ok = full_value <= value + 1e-4 * slope + slack
        t = torch.where(ok, 1.0, 0.5).to(_DTYPE)
        new = torch.where(ok[:, None], th + step, th)
        pending = ~ok
        for _ in range(50):
            if not pending.any():
                break
            trial = th + t[:, None] * step
            accept = pending & (_value(loss, lam_a, sub, trial) <= value + 1e-4 * t * slope + slack)
            new[accept] = trial[accept]
            pending &= ~accept
            t = torch.where(pending, t * 0.5, t)
        theta[active] = new
        n_iter[active] += 1
        # no decrease possible at float precision: stop those replications where they are
        stalled = pending
        moved = ~ok & ~stalled
        if moved.any():  # a shortened step: derivatives at its end
            at = sub.subset(moved.nonzero().squeeze(1), with_ref)
            mv, mg, mh, ms = _evaluate(loss, lam_a[moved], at, new[moved], True, certificate)
            full_value[moved], full_grad[moved], full_hess[moved], full_sep[moved] = mv, mg, mh, ms
        value, grad, hess, sep = full_value, full_grad, full_hess, full_sep
        if stalled.any():
            # a certificate at the rejected trial point proves non-existence all the same
            separable[active[stalled & sep]] = True
            grad_norm[active[stalled]] = grad[stalled].norm(dim=1)
            keep = ~stalled
            active, value, grad, hess = active[keep], value[keep], grad[keep], hess[keep]
            sep = sep[keep]
            sub = b.subset(active, with_ref)
    return _NewtonState(theta, converged, separable, n_iter, grad_norm, hess_out, meat_out)


def _kernel_newton(b: _Batch, lam: Tensor, theta0: Tensor, tol: float, max_iter: int, certificate: bool,
                   theta_max: float, meat: bool = False, pre_hess: Tensor | None = None) -> kernels.NewtonResult:
    """``kernels.logistic_newton`` on ``b``'s kernel terms (``_newton_block``'s loop while it needs no safeguard),
    its work counted as ``_kernel_evaluate`` counts it; with ``meat``, the meat at ``lam`` over ``b``'s prompt
    clusters (the labelled pairs alone without reference pairs, as ``_meat_moments`` without control terms)."""
    k = b.kern
    with_ref = k.X_ref is not None
    n, N = k.X.shape[1], k.X_ref.shape[1] if with_ref else 0
    clusters = b.n_clusters if with_ref else n
    res = kernels.logistic_newton(k.X, k.z, theta0.contiguous(), tol=tol, theta_max=theta_max, max_iter=max_iter,
                                  certificate=certificate, g=k.g, X_ref=k.X_ref, g_ref=k.g_ref, w_ref=k.w_ref,
                                  lam=lam.contiguous() if k.g is not None else None, rows=k.rows,
                                  meat=meat, cluster=b.ref_cluster if with_ref else None, n_clusters=clusters,
                                  pre_hess=pre_hess)
    if pre_hess is not None:  # the pre-steps' gradient-only evaluations
        _WORK.grad_pairs += int(res.presteps.sum()) * (n + N)
    if meat:
        _WORK.cluster_rows += int(res.converged.sum()) * clusters
    linear = k.selected_linear
    _WORK.d = theta0.shape[1]
    _WORK.kernel_pairs += int((res.evals * (N + n * (~linear).long())).sum())
    _WORK.grad_pairs += int((res.evals * n * linear.long()).sum())
    _WORK.factorizations += int(res.iters.sum()) + int((~res.converged).sum())
    return res


def _project(theta: Tensor, bound: float) -> Tensor:
    norm = theta.norm(dim=1, keepdim=True)
    return theta * torch.clamp(bound / norm.clamp_min(1e-300), max=1.0)


def _ball_model_minimiser(hess: Tensor, grad: Tensor, theta: Tensor, bound: float) -> Tensor:
    """``argmin_{||t|| <= bound} g.(t - theta) + (t - theta)^T H+ (t - theta) / 2`` with ``H+`` the
    Hessian shifted to be positive definite; by the secular equation ``||(H+ + mu I)^-1 c|| = bound``,
    ``c = H+ theta - g``, solved for ``mu >= 0`` by bisection."""
    evals, Q = torch.linalg.eigh(hess)
    scale = evals.abs().max(dim=1).values.clamp_min(1e-12)
    shift = torch.clamp(-evals.min(dim=1).values + 1e-8 * scale, min=0.0)
    lam_ = evals + shift[:, None]
    c = torch.einsum("rde,re->rd", Q.transpose(1, 2), torch.einsum("rde,re->rd", hess, theta)
                     + shift[:, None] * theta - grad)

    def radius(mu: Tensor) -> Tensor:
        return (c / (lam_ + mu[:, None])).norm(dim=1)

    lo = torch.zeros_like(shift)
    hi = torch.where(radius(lo) > bound, c.norm(dim=1) / bound + 1e-300, lo)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        outside = radius(mid) > bound
        lo = torch.where(outside, mid, lo)
        hi = torch.where(outside, hi, mid)
    return torch.einsum("rde,re->rd", Q, c / (lam_ + hi[:, None]))


def _ball_newton(loss: MarginLoss, lam: Tensor, b: _Batch, theta0: Tensor, bound: float, tol: float,
                 max_iter: int) -> _NewtonState:
    """Newton within the ball ``||theta|| <= bound`` (``_ball_newton_block``), block by block of replications."""
    return _blockwise(_ball_newton_block, loss, lam, b, theta0, bound, tol, max_iter)


def _ball_newton_block(loss: MarginLoss, lam: Tensor, b: _Batch, theta0: Tensor, bound: float, tol: float,
                       max_iter: int) -> _NewtonState:
    """Batched Newton on ``||theta|| <= bound``: step to the ball-constrained minimiser of the
    convexified quadratic model, then Armijo backtracking. Converged when the KKT residual (the
    gradient, or on the boundary its tangential part with an outward-pointing descent) is below ``tol``."""
    R, d = theta0.shape
    b = b.with_kernel(loss, lam)
    theta = _project(theta0, bound)
    converged = torch.zeros(R, dtype=torch.bool)
    n_iter = torch.zeros(R, dtype=torch.long)
    resid = torch.full((R,), math.inf, dtype=_DTYPE)
    hess_out = torch.zeros(R, d, d, dtype=_DTYPE)
    active = torch.arange(R)
    for it in range(max_iter + 1):
        sub = b.subset(active)
        lam_a = lam[active]
        th = theta[active]
        value, grad, hess = _derivatives(loss, lam_a, sub, th)
        hess_out[active] = hess
        norm = th.norm(dim=1).clamp_min(1e-300)
        radial = (grad * th).sum(1) / norm
        tangential = grad - radial[:, None] * th / norm[:, None]
        boundary = (norm >= bound * (1 - 1e-9)) & (radial < 0)
        r = torch.where(boundary, tangential.norm(dim=1), grad.norm(dim=1))
        resid[active] = r
        done = r < tol
        converged[active[done]] = True
        keep = ~done
        if it == max_iter or not keep.any():
            break
        active, value, grad, hess, th = active[keep], value[keep], grad[keep], hess[keep], th[keep]
        sub = b.subset(active)
        lam_a = lam[active]
        direction = _ball_model_minimiser(hess, grad, th, bound) - th
        slope = (grad * direction).sum(1)
        t = torch.ones(active.numel(), dtype=_DTYPE)
        pending = torch.ones(active.numel(), dtype=torch.bool)
        new = th.clone()
        for _ in range(50):
            trial = th + t[:, None] * direction
            ok = pending & (_value(loss, lam_a, sub, trial) <= value + 1e-4 * t * slope
                            + 1e-12 * value.abs().clamp_min(1.0))
            new[ok] = trial[ok]
            pending &= ~ok
            if not pending.any():
                break
            t = torch.where(pending, 0.5 * t, t)
        theta[active] = _project(new, bound)
        n_iter[active] += 1
        active = active[~pending]
        if active.numel() == 0:
            break
    return _NewtonState(theta, converged, torch.zeros(R, dtype=torch.bool), n_iter, resid, hess_out)


# --- sandwich ---------------------------------------------------------------------------------

def _influence_coefficients(loss: MarginLoss, b: _Batch, theta: Tensor, control: bool,
                            margins=_margins) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-pair weights of the influence terms at ``theta``: ``A_i = cA_i x_i`` (labelled term) and
    ``B_c = cB_i x_i [c = i] + sum_{j in c} cR_j xref_j`` (control-variate terms), so that cluster ``c``'s
    gradient of ``L`` at weight ``lam`` is ``A_c + lam B_c``. ``cB``, ``cR`` are None without ``control``
    (only ``lam = 0`` wanted) or reference pairs; ``margins(X, theta)`` computes ``X theta``."""
    u = margins(b.dphi, theta)
    if not (control and b.has_ref):
        return vr_derivatives(loss, u, b.z).d_lab, None, None
    # the three derivative terms do not depend on lam
    der = vr_derivatives(loss, u, b.z, b.g, margins(b.dphi_ref, theta), b.g_ref, 0.0, ref_weight=b.w_ref)
    return der.d_lab, -der.d_ctrl, der.d_ref


def _influence_parts(loss: MarginLoss, b: _Batch, theta: Tensor, control: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-cluster gradient sums ``A_c`` and ``B_c`` of ``_influence_coefficients``; shapes (R, C, d).
    ``B`` is None when ``control`` is False."""
    R, n, d = b.dphi.shape
    cA, cB, cR = _influence_coefficients(loss, b, theta, control)
    A = torch.zeros(R, b.n_clusters, d, dtype=_DTYPE)
    torch.mul(cA[..., None], b.dphi, out=A[:, :n])
    if not control:
        return A, None
    B = torch.zeros_like(A)
    if cB is not None:
        torch.mul(cB[..., None], b.dphi, out=B[:, :n])
        B.index_add_(1, b.ref_cluster, torch.mul(cR[..., None], b.dphi_ref, out=_scratch_like(b.dphi_ref)))
    return A, B


def _cluster_cov(X: Tensor, Y: Tensor, n: int) -> Tensor:
    """``sum_c (X_c - Xbar)(Y_c - Ybar)^T`` centred within labelled / other clusters, with the
    small-sample factor ``C/(C-1)``; (R, d, d). Centring by the common mean takes each labelled prompt's
    share of reference weight ``W_c`` as drawn with the prompt: with fixed, uneven shares and a ``g_hat`` whose
    reference score ``mu`` is not zero, the clusters' means differ by ``lam (n W_c - 1) mu`` and that spread is
    counted as variance (conservative for the variance given the design; exact for equal shares)."""
    out = torch.zeros(X.shape[0], X.shape[2], X.shape[2], dtype=_DTYPE)
    for part in (slice(0, n), slice(n, X.shape[1])):
        Xp, Yp = X[:, part], Y[:, part]
        C = Xp.shape[1]
        if C == 0:
            continue
        Xc = Xp - Xp.mean(1, keepdim=True)
        Yc = Xc if Y is X else Yp - Yp.mean(1, keepdim=True)
        out += Xc.transpose(1, 2) @ Yc * (C / max(C - 1, 1))
        _WORK.cluster_rows += X.shape[0] * C
    return out


def _moments(A: Tensor, B: Tensor | None, n: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(V_AA, V_AB, V_BB)`` of the meat ``V(lam) = V_AA + lam (V_AB + V_AB^T) + lam^2 V_BB`` from the cluster
    sums (``_cluster_cov``); only ``V_AA`` without ``B``."""
    if B is None:
        return _cluster_cov(A, A, n), None, None
    return _cluster_cov(A, A, n), _cluster_cov(A, B, n), _cluster_cov(B, B, n)


def _meat_moments(loss: MarginLoss, b: _Batch, theta: Tensor, control: bool, lam: Tensor | None = None
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``_moments`` of the influence terms at ``theta``: by the compiled kernels (no (R, C, d) cluster
    arrays) when available, else from ``_influence_parts``. ``V_AB``, ``V_BB`` None without ``control``;
    zero without reference pairs. With ``lam`` (R,) the logistic kernel may return the meat at ``lam`` itself,
    ``(V(lam), None, None)`` (one Gram instead of three; ``_meat`` takes either)."""
    if not kernels.available():
        return _moments(*_influence_parts(loss, b, theta, control), b.dphi.shape[1])
    R, n, d = b.dphi.shape
    with_control = control and b.has_ref
    rows = 3 * n + 2 * (b.n_clusters - n) if with_control else n
    if type(loss) is Logistic:  # coefficients and moments in one pass over the pairs
        on = lambda t: t if with_control else None  # noqa: E731
        fused = None if lam is None else lam.contiguous()
        VAA, VAB, VBB = kernels.logistic_cluster_moments(b.dphi, b.z, theta.contiguous(), on(b.g), on(b.dphi_ref),
                                                         on(b.g_ref), on(b.w_ref), on(b.ref_cluster), b.n_clusters,
                                                         lam=on(fused))
        if with_control and fused is not None:
            rows = b.n_clusters
    else:
        cA, cB, cR = _influence_coefficients(loss, b, theta, control, margins=kernels.margins)
        VAA, VAB, VBB = kernels.cluster_moments(b.dphi, cA, cB, b.dphi_ref, cR, b.ref_cluster, b.n_clusters)
    _WORK.cluster_rows += R * rows
    if control and not with_control:
        VAB, VBB = torch.zeros_like(VAA), torch.zeros_like(VAA)
    return VAA, VAB, VBB


def _meat(moments: tuple[Tensor, Tensor | None, Tensor | None], lam: Tensor) -> Tensor:
    """``V(lam) = V_AA + lam (V_AB + V_AB^T) + lam^2 V_BB`` (R, d, d)."""
    VAA, VAB, VBB = moments
    if VAB is None:
        return VAA
    la = lam[:, None, None]
    return VAA + la * (VAB + VAB.transpose(1, 2)) + la * la * VBB


def _sandwich(hess: Tensor, A: Tensor, B: Tensor | None, lam: Tensor, n: int) -> Tensor:
    """``H^+ V(lam) H^+`` from the cluster sums ``A``, ``B`` (``_influence_parts``)."""
    return _sandwich_of(_pinv(hess), _moments(A, B, n), lam)


def _pinv(hess: Tensor) -> Tensor:
    """``H^+`` of each (symmetric) Hessian, the bread of the sandwich and of ``tune_lambda``: the inverse from a
    Cholesky factor where ``_clearly_regular`` (there pinv's cut-off ``d eps max|lambda|`` drops nothing), the
    eigendecomposition's pseudo-inverse elsewhere."""
    regular = _clearly_regular(hess)
    if not regular.all():
        out = torch.linalg.pinv(hess, hermitian=True)
        if regular.any():
            out[regular] = _spd_inverse(hess[regular])
        return out
    return _spd_inverse(hess)


def _spd_inverse(hess: Tensor) -> Tensor:
    """``H^{-1}`` of positive definite ``H`` (R, d, d) from its Cholesky factor (compiled where available)."""
    if kernels.available():
        return kernels.spd_factor(hess.contiguous(), inverse=True)[1]
    return torch.cholesky_inverse(torch.linalg.cholesky(hess))


def _exceeds(H: Tensor, S: Tensor) -> Tensor:
    """(R,) whether ``H - S`` is positive definite (a Cholesky factor exists; non-finite rows: False), i.e.
    ``v'Hv > v'Sv`` for every ``v != 0``: one factorisation, where testing an eigenvalue takes an eigendecomposition
    (ten times the time for d = 10)."""
    if kernels.available() and H.dim() == 3:  # a non-finite H or S makes H - S non-finite
        return kernels.spd_factor((H - S).contiguous())[0]
    ok = torch.isfinite(H).all(dim=(-2, -1)) & torch.isfinite(S).all(dim=(-2, -1))
    eye = torch.eye(H.shape[-1], dtype=H.dtype)
    _, info = torch.linalg.cholesky_ex(torch.where(ok[..., None, None], H - S, -eye))
    return ok & (info == 0)


def _clearly_regular(hess: Tensor) -> Tensor:
    """(R,) a sufficient test that a symmetric ``H`` is positive definite and not flat (``_flat_bread``): ``H - 2
    d eps tr(H) I`` positive definite puts every eigenvalue above ``2 d eps tr(H) >= 2 d eps lambda_max``."""
    d = hess.shape[-1]
    tr = hess.diagonal(0, -2, -1).sum(-1).clamp_min(0.0)
    return _exceeds(hess, (2 * d * torch.finfo(hess.dtype).eps * tr)[:, None, None] * torch.eye(d, dtype=hess.dtype))


def _sandwich_of(Hinv: Tensor, moments: tuple[Tensor, Tensor | None, Tensor | None], lam: Tensor) -> Tensor:
    """``H^+ V(lam) H^+`` (symmetrised) for ``Hinv = H^+`` and the meat's moments."""
    cov = Hinv @ _meat(moments, lam) @ Hinv
    return 0.5 * (cov + cov.transpose(1, 2))


def _sandwiches(loss: MarginLoss, b: _Batch, theta: Tensor, hess: Tensor, lam: Tensor, n: int,
                tune: tuple[int | None, tuple[float, float]] | None = None, meat: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """Sandwich covariances (R, d, d) at ``lam``, chunk by chunk within ``MEMORY_BUDGET``; with
    ``tune = (weight, clip)`` also ``tune_lambda`` on the same influence terms (R,). ``meat``: the meat at ``lam``
    where the solver formed it (``_NewtonState.meat``; NaN rows are formed here; not used with ``tune``)."""
    if tune is None:
        if meat is None:
            meat = _sandwiches_meat(loss, b, theta, lam)
        else:
            missing = torch.isnan(meat).any(dim=(1, 2)).nonzero().squeeze(1)
            if missing.numel():
                meat = meat.clone()
                meat[missing] = _sandwiches_meat(loss, b.subset(missing), theta[missing], lam[missing])
        return _sandwich_of(_pinv(hess), (meat, None, None), lam), None
    R, d = theta.shape
    cov = torch.empty(R, d, d, dtype=_DTYPE)
    tuned = torch.empty(R, dtype=_DTYPE)
    for sl in _meat_chunks(loss, b, R):
        moments = _meat_moments(loss, b.rows(sl), theta[sl], True)
        Hinv = _pinv(hess[sl])
        cov[sl] = _sandwich_of(Hinv, moments, lam[sl])
        tuned[sl] = _tuned_lambda(Hinv, moments, tune[0], tune[1])
    return cov, tuned


def _sandwiches_meat(loss: MarginLoss, b: _Batch, theta: Tensor, lam: Tensor) -> Tensor:
    """The meat ``V(lam)`` (R, d, d) at ``theta``, chunk by chunk (``_meat_chunks``)."""
    out = torch.empty(theta.shape[0], theta.shape[1], theta.shape[1], dtype=_DTYPE)
    for sl in _meat_chunks(loss, b, theta.shape[0]):
        control = bool((lam[sl] != 0).any())
        out[sl] = _meat(_meat_moments(loss, b.rows(sl), theta[sl], control, lam[sl]), lam[sl])
    return out


def _meat_chunks(loss: MarginLoss, b: _Batch, R: int) -> list[slice]:
    """The replication chunks of a meat computation: one for the compiled logistic moments (they form their
    coefficients and cluster sums per thread: no (R, P) arrays), ``_memory_chunks`` otherwise."""
    return [slice(0, R)] if _compiled(loss) else _memory_chunks(b, R)


def tune_lambda(hess: Tensor, A: Tensor, B: Tensor, n: int, weight: int | np.ndarray | None = None,
                clip: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    r"""``lambda* = argmin tr(W H^{-1} V(lambda) H^{-1})`` with ``V(lambda) = V_AA + lambda (V_AB + V_BA)
    + lambda^2 V_BB``: ``lambda* = -tr(W H^-1 (V_AB + V_BA) H^-1) / (2 tr(W H^-1 V_BB H^-1))``, clipped;
    ``A``, ``B`` the cluster sums of ``_influence_parts``."""
    return _tuned_lambda(_pinv(hess), _moments(A, B, n), weight, clip)


def _tuned_lambda(Hinv: Tensor, moments: tuple[Tensor, Tensor | None, Tensor | None], weight: int | np.ndarray | None,
                  clip: tuple[float, float]) -> Tensor:
    """``tune_lambda`` from ``Hinv = H^+`` and the meat's moments."""
    _, vab, vbb = moments
    num = _weighted_trace(Hinv @ (vab + vab.transpose(1, 2)) @ Hinv, weight)
    den = 2.0 * _weighted_trace(Hinv @ vbb @ Hinv, weight)
    lam = torch.where(den > 0, -num / den.clamp_min(1e-300), torch.zeros_like(num))
    return lam.clamp(*clip)


# --- the estimators ---------------------------------------------------------------------------

def _bread_bandwidth(b: _Batch, theta: Tensor) -> Tensor:
    """Rule-of-thumb bandwidth ``1.06 sd(y u) n^{-1/5}`` of each replication (R, 1), from its label-oriented
    margins ``y_i u_i`` (``y = 2Z - 1``): unchanged when a pair is presented the other way round."""
    yu = (2.0 * b.z - 1.0) * _margins(b.dphi, theta)
    sd = yu.std(dim=1, keepdim=True) if yu.shape[1] > 1 else torch.zeros_like(yu[:, :1])  # one pair: no spread
    return 1.06 * sd.clamp_min(1e-3) * b.dphi.shape[1] ** -0.2


def _minimise(loss: MarginLoss, lam: Tensor, b: _Batch, theta0: Tensor, tol: float, max_iter: int,
              certificate: bool, theta_max: float, bound: float | None = None, meat: bool = False) -> _NewtonState:
    """Newton for smooth losses, smoothing continuation for non-smooth ones; with ``bound``, Newton
    within the ball (the non-convex bounded problems). ``meat``: ask Newton for the sandwich's meat at ``lam``
    (``_newton_block``)."""
    stages = [loss] if loss.smooth else [loss.curvature_surrogate(h) for h in CONTINUATION]
    state = None
    theta = theta0
    for stage in stages:
        if bound is not None:
            state = _ball_newton(stage, lam, b, theta, bound, tol, max_iter)
        else:
            state = _newton(stage, lam, b, theta, tol, max_iter, certificate and loss.smooth, theta_max, meat)
        theta = state.theta
    return state


def _constrained(loss: MarginLoss, data: PairData, g, g_ref, lam: np.ndarray, bound: float,
                 reps: np.ndarray, theta: np.ndarray) -> None:
    """Solve ``min L(theta) s.t. ||theta|| <= bound`` with cvxpy for replications ``reps`` (in place).

    Uses ``m_g(u) = softplus(u) - g u`` (logistic) or ``g [1-u]_+ + (1-g) [1+u]_+`` (hinge, lam = 0)."""
    import cvxpy as cp

    for r in reps:
        th = cp.Variable(data.d)
        u = data.dphi[r] @ th
        lr = float(lam[r])
        if loss.name == "logistic":
            labelled = (1.0 - lr) * cp.sum(cp.logistic(u)) - (data.z[r] - (lr * g[r] if lr else 0.0)) @ u
            objective = labelled / data.n
            if lr:
                ur = data.dphi_ref[r] @ th
                objective = objective + lr * (data.ref_weight[r] @ cp.logistic(ur) - (data.ref_weight[r] * g_ref[r]) @ ur)
        else:
            objective = (data.z[r] @ cp.pos(1 - u) + (1 - data.z[r]) @ cp.pos(1 + u)) / data.n
        problem = cp.Problem(cp.Minimize(objective), [cp.norm(th, 2) <= bound])
        try:
            problem.solve(solver=cp.CLARABEL)
        except cp.SolverError:
            problem.solve(solver=cp.SCS, eps=1e-9)
        if th.value is None:
            raise InputError(f"replication {r}: the norm-constrained fit failed ({problem.status})")
        theta[r] = th.value


def _convex_program(loss: MarginLoss, lam: np.ndarray) -> bool:
    """Whether the norm-constrained problem is convex (and solved by cvxpy)."""
    return (loss.name == "logistic" and bool(((lam >= 0) & (lam <= 1)).all())) \
        or (loss.name == "hinge" and bool((lam == 0).all()))


def fit(
    data: PairData,
    method: str = "mle",
    loss: str | MarginLoss = "logistic",
    *,
    lam: float | str | None = None,
    bound: float | None = None,
    weight: int | np.ndarray | None = None,
    lam_clip: tuple[float, float] | None = (0.0, 1.0),
    folds: int = 5,
    seed: int = 0,
    learner: Callable[[int], Any] | None = None,
    tol: float = 1e-8,
    max_iter: int = 100,
    on_separable: str = "raise",
) -> FitResult:
    r"""Fit ``method`` (``mle``, ``vrpo``, ``vrpo_tuned``, ``vrpo_crossfit``) on every replication.

    ``lam`` overrides the control-variate weight of ``vrpo``/``vrpo_crossfit`` (default 1); ``lam="auto"``
    power-tunes it (``vrpo`` with ``"auto"`` is ``vrpo_tuned``; ``vrpo_crossfit`` tunes on the cross-fitted ``g_hat``);
    ``vrpo_crossfit`` learns ``g_hat`` with ``folds``-fold cross-fitting (``theory.crossfit``) by ``learner(seed + k)``
    on fold ``k``: a scikit-learn-style classifier (default ``crossfit.default_learner``);
    ``weight`` picks the tuning target ``tr(W Cov)`` of the tuned fits (None: the trace; ``j``: coordinate ``j``;
    a symmetric PSD (d, d) matrix ``W``, e.g. the Hessian of a regret), whose
    ``lam`` is clipped to ``lam_clip`` (None: not clipped);
    ``bound`` adds ``||theta|| <= bound`` (cvxpy for the convex cases: logistic with ``0 <= lam <= 1``,
    hinge MLE; a ball-constrained Newton method otherwise). The truncated hinge is bounded, so its empirical risk
    keeps decreasing as ``theta`` grows: it needs ``bound``. A replication whose MLE does not exist
    (separable labels) or whose objective is unbounded raises ``SeparableDataError``
    (``on_separable="raise"``) or is flagged in ``separable`` with NaN estimates and a warning naming
    it (``"warn"``); with ``bound`` the constrained fit is returned instead. Non-existence is certified at an
    iterate, by a margin above ``MARGIN_MAX``, or, for quasi-complete separation (where Newton stops at a
    vanishing gradient), by a linear program run where the MLE's Hessian is flat in some direction. At the
    boundary the sandwich does not apply: ``cov`` is NaN where ``at_bound``, where the Hessian at the estimate
    is singular (``theta`` not identified in some direction), and with ``d`` or fewer independent clusters (the
    meat's rank is below ``d``), with a warning. For the non-smooth losses,
    separated labels (certified by the logistic fit that starts the continuation) leave an unbounded set
    of minimisers: no estimate without ``bound``, as for the logistic loss.

    ``dphi`` must identify ``theta`` (rank ``d`` on every replication), else ``InputError``. The
    estimators are equivariant under ``dphi -> c Q dphi`` (``Q`` orthogonal; ``theta -> Q theta / c``,
    ``cov -> Q cov Q^T / c^2``, bound ``B / c``, gradient ``c Q grad``), and so is the stopping rule: a
    replication has converged when ``||grad|| < tol * rms(dphi)``, the gradient tolerance ``tol`` of the
    same problem with features of unit root mean square (replications whose scales differ by more than a
    factor 2 are fitted in separate groups, each at its own scale). Features whose root mean square lies outside
    ``[2^-10, 2^10]`` are also rescaled by the power of two nearest to it (exact in floating point) for
    the solve, and the results mapped back. ``grad_norm`` is the gradient in the caller's units.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if on_separable not in ("raise", "warn"):
        raise InputError(f"on_separable must be 'raise' or 'warn', got {on_separable!r}")
    if lam is not None and method in ("mle", "vrpo_tuned"):
        raise InputError(f"lam cannot be set for method {method!r}")
    if learner is not None and (method != "vrpo_crossfit" or not callable(learner)):
        raise InputError("learner must be a callable seed -> classifier, for method 'vrpo_crossfit' only; got "
                         f"{learner!r} with method {method!r}")
    lam = _check_lam(lam)
    if lam == "auto" and method == "vrpo":
        method, lam = "vrpo_tuned", None
    weight = _weight(weight, data.d)
    lam_clip = check_clip("lam_clip", lam_clip) or (-math.inf, math.inf)
    check_solver(tol, max_iter)
    loss = get_loss(loss)
    if not loss.convex and bound is None:
        raise InputError(f"the {loss.name} loss is bounded, so a linear fit drifts to infinite scale: "
                         "give a norm bound (bound=B, --bound B)")
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float, np.integer, np.floating))
                              or not (math.isfinite(bound) and bound > 0)):
        raise InputError(f"bound must be a positive number, got {bound!r}")
    if method != "mle" and data.dphi_ref is None:
        raise InputError(f"method {method!r} needs reference pairs ("
                         + ("dphi_ref)" if method == "vrpo_crossfit" else "dphi_ref, g_ref)"))
    gram = _gram_matrices(data.dphi)
    deficient = rank_deficient(data.dphi, gram)
    if deficient:
        r, rank = next(iter(deficient.items()))
        where = f" (replication {r}{f' and {len(deficient) - 1} more' if len(deficient) > 1 else ''})" \
            if data.reps > 1 else ""
        raise InputError(f"dphi{where} has rank {rank} < d = {data.d}: a feature is duplicated, all zero or a "
                         "combination of others (or n < d), so theta is not identifiable; drop it")
    mean_squares = _mean_squares(gram, data.n)
    if (mean_squares == 0).any():  # all-zero features are rank deficient: these are below float64's squares
        r = int(np.flatnonzero(mean_squares == 0)[0])
        raise InputError(f"dphi (replication {r}): features too small for float64 arithmetic (their squares "
                         "underflow to 0; root mean square below about 1e-162); rescale the features")
    groups = _scale_groups(mean_squares)  # each group's stopping rule and rescaling at its own scale
    parts = []
    try:
        for rows in groups:
            part = data if len(groups) == 1 else data.replications(rows)
            rms = math.sqrt(float(mean_squares[rows].mean()))
            s = _unit_scale(rms)
            if s != 1.0:
                part = replace(part, dphi=part.dphi / s, dphi_ref=None if part.dphi_ref is None else part.dphi_ref / s)
            # rescaled features get the Gram matrices of their own (those of tiny ones lost digits to underflow)
            res = _fit(part, method, loss, lam, None if bound is None else bound * s, weight, lam_clip,
                       (folds, seed, learner), tol, max_iter, on_separable, rms / s, rows, data.reps,
                       gram[rows] if s == 1.0 else _gram_matrices(part.dphi))
            if s != 1.0:
                res = replace(res, theta=res.theta / s, cov=res.cov / s**2, grad_norm=res.grad_norm * s, bound=bound,
                              cov_mle=None if res.cov_mle is None else res.cov_mle / s**2)
            parts.append(res)
    finally:
        _SCRATCH.buf = None
    return parts[0] if len(parts) == 1 else _stitch(parts, groups)


def _check_lam(lam: object) -> float | str | None:
    """``lam`` as a float (numpy scalars and 0-d arrays included), ``"auto"`` or None; else ``InputError``."""
    if lam is None or (isinstance(lam, str) and lam == "auto"):
        return lam
    value = math.nan
    if not isinstance(lam, (bool, np.bool_, str, bytes)) and np.ndim(lam) == 0:
        try:
            value = float(lam)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(value):
        raise InputError(f"lam must be a finite number or 'auto' (power tuning), got {lam!r}")
    return value


def _gram_matrices(dphi: np.ndarray) -> np.ndarray:
    """``dphi_r^T dphi_r`` of each replication, (R, d, d): once per fit, for the rank check, the features'
    scale (its trace) and the overlap check."""
    X = torch.as_tensor(dphi)
    return torch.bmm(X.transpose(1, 2), X).numpy()


def _mean_squares(gram: np.ndarray, n: int) -> np.ndarray:
    """``mean(dphi_r^2)`` of each replication from its Gram matrix (``n`` pairs), (R,)."""
    return np.trace(gram, axis1=1, axis2=2) / (n * gram.shape[-1])


def _scale_groups(mean_squares: np.ndarray) -> list[np.ndarray]:
    """Replications in groups whose features' root mean squares (from ``mean_squares``) lie within a factor
    2 of each other (in order of scale): one group for the replications of one design, several where
    scales differ."""
    R = mean_squares.size
    log_rms = 0.5 * np.log2(mean_squares)
    order = np.argsort(log_rms, kind="stable")
    cuts = [0]
    for k in range(1, R):
        if log_rms[order[k]] - log_rms[order[cuts[-1]]] > 1.0:
            cuts.append(k)
    return [np.sort(order[a:b]) for a, b in zip(cuts, cuts[1:] + [R])]


def _stitch(parts: list[FitResult], groups: list[np.ndarray]) -> FitResult:
    """One ``FitResult`` from the fits of replication groups ``groups``."""
    R = sum(len(g) for g in groups)
    first = parts[0]

    def join(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        if values[0] is None:
            return None
        out = np.empty((R, *values[0].shape[1:]), dtype=values[0].dtype)
        for idx, v in zip(groups, values):
            out[idx] = v
        return out

    arrays = {f.name: join(f.name) for f in fields(FitResult) if isinstance(getattr(first, f.name), np.ndarray)}
    return replace(first, **arrays)


def _rms(dphi: np.ndarray) -> float:
    """Root mean square of all of ``dphi`` (what ``fit`` scales the tolerance by for one scale group)."""
    return math.sqrt(float(_mean_squares(_gram_matrices(dphi), dphi.shape[1]).mean()))


def _unit_scale(rms: float) -> float:
    """1, or the power of two nearest the features' root mean square ``rms`` when that lies outside
    ``[2^-10, 2^10]``."""
    return 1.0 if rms == 0 or 2.0**-10 <= rms <= 2.0**10 else 2.0 ** round(math.log2(rms))


def _fit(data: PairData, method: str, loss: MarginLoss, lam: float | str | None, bound: float | None,
         weight: int | np.ndarray | None, lam_clip: tuple[float, float], crossfit: tuple[int, int, Any], tol: float,
         max_iter: int, on_separable: str, rms: float, rows: np.ndarray, total: int, gram: np.ndarray) -> FitResult:
    """``fit`` on validated arguments and features of unit scale (root mean square ``rms``, Gram matrices
    ``gram``); the data are the replications ``rows`` of ``total`` (the numbers the warnings give)."""
    R, d = data.reps, data.d
    g, g_ref = data.g, data.g_ref
    if method != "mle":
        if method == "vrpo_crossfit":
            g, g_ref = _crossfit(data, *crossfit)
        elif g is None:
            raise InputError(f"method {method!r} needs the auxiliary probabilities g and g_ref (or use vrpo_crossfit, "
                             "which learns them from the labelled pairs)")
    b = _Batch.from_data(data, g, g_ref)
    theta_max = 1e6 / max(rms, 1e-12)
    tol = tol * rms  # the tolerance of the unit-rms problem, in the units of this one
    lam0 = torch.zeros(R, dtype=_DTYPE)
    # The MLE first: the estimate of `mle`, the warm start and the reference covariance of the others.
    start = torch.zeros(R, d, dtype=_DTYPE)
    logistic = None
    if not loss.smooth:  # start the continuation at the logistic fit
        logistic = _newton(Logistic(), lam0, b, start, tol, max_iter, True, theta_max)
        start = logistic.theta
    pg_bound = None if bound is None or _convex_program(loss, np.zeros(1)) else bound
    tuned = method == "vrpo_tuned" or lam == "auto"
    mle = _minimise(loss, lam0, b, start, tol, max_iter, True, theta_max, pg_bound, meat=not tuned)
    if loss.recession() is not None:
        _check_overlap(b, logistic if logistic is not None else mle, max(FLAT_CURVATURE, 100 * tol / rms), gram)
    if logistic is not None and pg_bound is None:
        # separated labels (the logistic fit's certificate): a non-smooth loss's minimisers are unbounded too;
        # within the ball (the non-convex losses' Newton) the constrained fit exists all the same
        mle.separable |= logistic.separable
        mle.converged &= ~logistic.separable
    mle_hess = _bread_hessian(loss, lam0, b, mle)
    tune = (weight, lam_clip) if tuned else None
    cov_mle_t, lam_tuned = _sandwiches(loss, b, mle.theta, mle_hess, lam0, data.n, tune, mle.meat)
    if method == "mle":
        lam_t, state, cov_t = lam0, mle, cov_mle_t
    else:
        if tuned:
            lam_t = lam_tuned
        else:
            lam_t = torch.full((R,), 1.0 if lam is None else float(lam), dtype=_DTYPE)
        pg_bound = None if bound is None or _convex_program(loss, lam_t.numpy()) else bound
        state = _minimise(loss, lam_t, b, mle.theta, tol, max_iter, True, theta_max, pg_bound, meat=True)
        if isinstance(loss, Logistic) and _uses_ref(b, lam_t):
            _check_overlap(b, state, max(FLAT_CURVATURE, 100 * tol / rms), gram, lam_t)
        # the tuned lam is a function of the MLE: without it the tuned estimate does not exist either
        state.separable |= mle.separable & (~state.converged if not tuned else True)
        state.converged &= ~state.separable
        hess = _bread_hessian(loss, lam_t, b, state)
        cov_t, _ = _sandwiches(loss, b, state.theta, hess, lam_t, data.n, meat=state.meat)
    theta = state.theta.numpy().copy()
    cov = cov_t.numpy()
    flat = _flat_bread(hess if method != "mle" else mle_hess)
    if flat.any():  # a direction the objective does not curve in: theta is not identified there
        cov[flat] = np.nan
        warnings.warn(f"{int(flat.sum())} of {total} replication(s) have a singular Hessian at the estimate (first: "
                      f"{int(rows[np.flatnonzero(flat)[0]])}): theta is not identified in some direction (e.g. lam = 1 "
                      "with g_hat = z leaves only the reference pairs, which do not span the features); cov is NaN "
                      "there", RuntimeWarning, stacklevel=3)
    clusters = data.n if method == "mle" else b.n_clusters  # the MLE's scores: its labelled pairs only
    if clusters <= d:  # the cluster scores sum to zero at the estimate: the meat has rank < d
        cov[:] = np.nan
        warnings.warn(f"{clusters} independent cluster(s) (pairs, or prompts with reference pairs) for d = {d} "
                      "coordinates: the sandwich needs more than d (its meat has rank at most clusters - 1), so cov is "
                      "NaN", RuntimeWarning, stacklevel=3)
    cov_mle = None if method == "mle" else cov_mle_t.numpy()
    if cov_mle is not None and data.n <= d:
        cov_mle[:] = np.nan
    if cov_mle is not None:
        cov_mle[mle.separable.numpy()] = np.nan  # no MLE to compare with (its sandwich at a stopped iterate)
    separable = state.separable.numpy().copy()
    converged = state.converged.numpy().copy()
    lam_np = lam_t.numpy().copy()
    at_bound = None
    if bound is not None:
        if pg_bound is None:  # convex: cvxpy where the unconstrained fit leaves the ball or does not exist
            outside = np.flatnonzero(separable | (np.linalg.norm(theta, axis=1) > bound))
            _constrained(loss, data, g, g_ref, lam_np, bound, outside, theta)
            separable[outside] = False
            converged[outside] = True
            if outside.size and loss.smooth:  # the interior-point solution to the gradient tolerance
                idx = torch.as_tensor(outside)
                polished = _ball_newton(loss, lam_t[idx], b.subset(idx), torch.as_tensor(theta[outside]), bound,
                                        tol, max_iter)
                theta[outside] = polished.theta.numpy()
                converged[outside] = polished.converged.numpy()
                state.grad_norm[idx], state.n_iter[idx] = polished.grad_norm, polished.n_iter
        at_bound = np.linalg.norm(theta, axis=1) >= bound * (1 - 1e-6)
        cov[at_bound] = np.nan
    if separable.any():
        reps = rows[np.flatnonzero(separable)]
        shown = ", ".join(map(str, reps[:10])) + (" ..." if reps.size > 10 else "")
        msg = (f"{reps.size} of {total} replication(s) have separable labelled pairs or an objective without a "
               f"minimiser (replication {shown}): the unconstrained estimate does not exist; pass bound=B (--bound B) "
               "for a norm-constrained fit")
        if on_separable == "raise":
            raise SeparableDataError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        theta[separable] = np.nan
        cov[separable] = np.nan
    no_mle = np.flatnonzero(mle.separable.numpy() & ~separable) if cov_mle is not None else np.zeros(0, int)
    if no_mle.size:
        warnings.warn(f"{no_mle.size} of {total} replication(s) (replication {rows[no_mle[0]]}) have separable labelled pairs: "
                      f"the {method} estimate exists but the MLE does not, so cov_mle and the variance ratios are "
                      "NaN there", RuntimeWarning, stacklevel=3)
    stuck = np.flatnonzero(~converged & ~separable)
    if stuck.size:
        r = stuck[np.argmax(state.grad_norm.numpy()[stuck])]
        warnings.warn(f"{stuck.size} of {total} replication(s) did not reach the gradient tolerance "
                      f"tol x rms(dphi) = {tol:.3g} (replication {rows[r]}: gradient norm "
                      f"{float(state.grad_norm[r]):.3g} after {int(state.n_iter[r])} of max_iter = {max_iter} "
                      "iterations): their estimates are returned with converged = False", RuntimeWarning,
                      stacklevel=3)
    return FitResult(theta=theta, cov=cov, lam=lam_np, converged=converged, n_iter=state.n_iter.numpy().copy(),
                     grad_norm=state.grad_norm.numpy().copy(), separable=separable, method=method, loss=loss.name,
                     bound=bound, at_bound=at_bound, cov_mle=cov_mle)


#: the least relative curvature ``_check_overlap`` takes for flat (at the default tolerance; 100 tol above it)
FLAT_CURVATURE = 1e-6


def _least_relative_curvature(H: Tensor, S: Tensor) -> Tensor:
    """``min_v v'Hv / v'Sv`` of each pair of (..., d, d) symmetric matrices (``S`` positive semi-definite): the
    smallest eigenvalue of ``S^-1/2 H S^-1/2``, formed on the unit-diagonal scale of ``S`` (the ratio does not
    depend on the features' scales) with ``S``'s eigenvalues floored at ``1e-12`` of its largest."""
    D = S.diagonal(0, -2, -1).clamp_min(torch.finfo(S.dtype).tiny).rsqrt()
    scale = D[..., :, None] * D[..., None, :]
    ev, V = torch.linalg.eigh(S * scale)
    P = V * ev.clamp_min(1e-12 * ev[..., -1:]).rsqrt()[..., None, :]
    return torch.linalg.eigvalsh(P.transpose(-2, -1) @ (H * scale) @ P)[..., 0]


def _check_overlap(b: _Batch, state: _NewtonState, flat: float, gram: np.ndarray, lam: Tensor | None = None) -> None:
    """Flag ``state``'s converged fits whose minimiser does not exist. For the MLE: labels separated except
    on pairs where the separating margin is zero (quasi-complete separation) stop the Newton iterations by a
    vanishing gradient, with no certificate at the iterate. There the separated pairs' weights ``s'(u_i)`` are
    of the order of the gradient tolerance, so the Hessian has almost no curvature along the separating
    direction ``w``: ``min_v v'Hv / v'Sv`` with ``S = X'X / n`` is below ``flat``. Such replications (rare
    otherwise) are settled by ``_separating_direction`` (``gram``: the Gram matrices ``X'X``).

    With ``lam`` (the logistic VR objective, convex for ``0 <= lam <= 1``) the same vanishing curvature marks a
    direction of zero recession slope along which the objective decreases without end (an oracle ``g_hat``
    of exactly 0 or 1 on separated reference pairs), settled by ``_recession_direction``. A Hessian singular
    at rounding level is left to ``_flat_bread``: there the objective is constant along a direction (``theta``
    not identified), not decreasing."""
    todo = state.converged & ~state.separable
    if lam is not None:
        todo &= (lam >= 0) & (lam <= 1) & ~torch.as_tensor(_flat_bread(state.hess))
    idx = torch.nonzero(todo).squeeze(1)
    if not idx.numel():
        return
    S = torch.as_tensor(gram)[idx] / b.dphi.shape[1]
    # curvature above 2 flat relative to S needs no eigendecomposition (the usual case); S is padded by what
    # _least_relative_curvature's eigenvalue floor can add, at most 1e-12 d diag(S) (d bounds the largest
    # eigenvalue of S on its unit-diagonal scale)
    floor = torch.diag_embed(1e-12 * S.shape[-1] * S.diagonal(0, -2, -1))
    doubt = ~_exceeds(state.hess[idx], 2 * flat * (S + floor))
    idx, S = idx[doubt], S[doubt]
    if not idx.numel():
        return
    least = _least_relative_curvature(state.hess[idx], S)
    for r in idx[least < flat].tolist():
        if lam is None:
            found = _separating_direction(b.dphi[r].numpy(), b.z[r].numpy())
        else:
            found = _recession_direction(b.dphi[r].numpy(), b.z[r].numpy(), b.g[r].numpy(), b.dphi_ref[r].numpy(),
                                         b.g_ref[r].numpy(), b.w_ref[r].numpy(), float(lam[r]))
        if found:
            state.separable[r], state.converged[r] = True, False


def _recession_direction(X: np.ndarray, z: np.ndarray, g: np.ndarray, X_ref: np.ndarray, g_ref: np.ndarray,
                         w_ref: np.ndarray, lam: float) -> bool:
    r"""Whether some ``w != 0`` has recession slope ``L_inf(w) <= 0`` for the logistic VR objective with
    ``0 <= lam <= 1``. Its pair losses are ``softplus(u) - y u``, so
    ``L_inf(w) = sum_k a_k [v_k]_+ + c . w`` with ``v_k = x_k . w``, ``a = (1 - lam) / n`` on labelled and
    ``lam w_j`` on reference pairs, and ``c = -sum_i (z_i - lam g_i) x_i / n - lam sum_j w_j g_j x_j``. The cone
    ``{w : L_inf(w) <= 0}`` (a linear program through ``t_k >= [v_k]_+``) is ``{0}`` iff ``e . w`` and
    ``-e . w`` both have maximum 0 on it within ``|w|_inf <= 1``, for a fixed ``e`` off every hyperplane
    through 0 (almost every ``e``). As the objective is convex, ``L(theta + s w) <= L(theta) + s L_inf(w)``:
    it does not increase along ``w`` from any point, and with curvature left along ``w`` it strictly
    decreases, so no minimiser exists."""
    from scipy import sparse
    from scipy.optimize import linprog

    n = len(z)
    pairs = np.concatenate([X, X_ref]) if lam < 1 else X_ref
    a = np.concatenate([np.full(n, (1.0 - lam) / n), lam * w_ref]) if lam < 1 else lam * w_ref
    c = -((z - lam * g) @ X) / n - lam * ((w_ref * g_ref) @ X_ref)
    keep = a > 0
    pairs, a = pairs[keep], a[keep]
    K, d = pairs.shape
    A_ub = sparse.bmat([[sparse.csr_array(pairs), -sparse.eye_array(K)], [c[None, :], a[None, :]]], format="csr")
    e = np.random.default_rng(0).uniform(0.5, 1.5, d)
    bounds = [(-1.0, 1.0)] * d + [(0.0, None)] * K
    for sign in (1.0, -1.0):
        res = linprog(np.concatenate([-sign * e, np.zeros(K)]), A_ub=A_ub, b_ub=np.zeros(K + 1), bounds=bounds,
                      method="highs")
        if res.status == 0 and -res.fun > 1e-6 * e.sum():
            return True
    return False


def _separating_direction(X: np.ndarray, z: np.ndarray) -> bool:
    """Whether some ``w`` has ``y_i x_i . w >= 0`` on every pair with a sure label (``y = 2z - 1``,
    ``x_i . w = 0`` where ``0 < z_i < 1``) and ``> 0`` on one: then no logistic MLE exists (Albert and
    Anderson 1984). The linear program maximises ``sum_i y_i x_i . w`` over ``|w|_inf <= 1``."""
    from scipy.optimize import linprog

    sure = (z == 0) | (z == 1)
    A = -(2.0 * z[sure] - 1.0)[:, None] * X[sure]
    if not sure.any():
        return False
    soft = X[~sure] if not sure.all() else None
    res = linprog(A.sum(0), A_ub=A, b_ub=np.zeros(len(A)), A_eq=soft,
                  b_eq=None if soft is None else np.zeros(len(soft)), bounds=(-1, 1), method="highs")
    return res.status == 0 and -res.fun > 1e-6 * np.abs(A).sum()


def _flat_bread(hess: Tensor) -> np.ndarray:
    """(R,) whether a finite bread is singular where ``_pinv`` takes it to be: an eigenvalue of modulus at
    most ``d eps`` times the largest (the directions ``H^+`` drops, so the sandwich would report zero
    variance in them)."""
    d = hess.shape[-1]
    doubt = torch.isfinite(hess).all(dim=(1, 2)) & ~_clearly_regular(hess)  # the rest need their eigenvalues
    flat = torch.zeros(hess.shape[0], dtype=torch.bool)
    if doubt.any():
        ev = torch.linalg.eigvalsh(hess[doubt]).abs()
        flat[doubt] = ev.min(1).values <= d * torch.finfo(hess.dtype).eps * ev.max(1).values
    return flat.numpy()


def _bread_hessian(loss: MarginLoss, lam: Tensor, b: _Batch, state: _NewtonState) -> Tensor:
    """The sandwich bread: the Hessian of a smooth loss, else that of its Gaussian smoothing with each
    replication's own ``_bread_bandwidth``."""
    if loss.smooth:
        return state.hess
    R, d = state.theta.shape
    hess = torch.empty(R, d, d, dtype=_DTYPE)
    for sl in _memory_chunks(b, R, _uses_ref(b, lam), clusters=False):
        bb, th = b.rows(sl), state.theta[sl]
        hess[sl] = _evaluate(loss.curvature_surrogate(_bread_bandwidth(bb, th)), lam[sl], bb, th)[2]
    return hess


def _crossfit(data: PairData, folds: int, seed: int, learner: Callable[[int], Any] | None
              ) -> tuple[np.ndarray, np.ndarray]:
    from .crossfit import crossfit_predict, default_learner, negate

    feats = data.dphi if data.features is None else data.features
    feats_ref = data.dphi_ref if data.features_ref is None else data.features_ref
    swap = negate if data.features is None else data.swap_features
    g = np.empty((data.reps, data.n))
    g_ref = np.empty((data.reps, data.n_ref))
    for r in range(data.reps):
        g[r], g_ref[r] = crossfit_predict(feats[r], data.z[r], feats_ref[r], data.ref_row, folds=folds, seed=seed,
                                          learner=learner or default_learner,
                                          swap=swap)
    return g, g_ref
