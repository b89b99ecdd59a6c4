r"""Exact asymptotics of the MLE and of VRPO on a finite-response population.

Notation (DESIGN.md 3.3-3.5). A population (``PairPopulation``) holds ``P`` prompt draws with ``K``
responses each: features ``phi`` (P, K, d), reference policy ``pi`` (P, K) and true preference
probabilities ``g*`` (P, K, K). A pair ``(a, b) ~ pi x pi`` given the prompt has
``dphi = phi_a - phi_b`` and margin ``u = theta . dphi``. For a margin loss ``l`` and a probability
``g`` that ``a`` wins, the pair loss and its margin derivatives are

.. math::
    m_g(u) = g l(u) + (1-g) l(-u), \quad m'_g(u) = g l'(u) - (1-g) l'(-u), \quad
    m''_g(u) = g l''(u) + (1-g) l''(-u),

with ``(l, l', l'')`` always from ``MarginLoss.derivatives`` (logistic: ``m'_g = s - g``,
``m''_g = s(1-s)``, ``s = sigmoid(u)``). Expectations over pairs are exact sums over the ``K x K``
pairs with weights ``pi_a pi_b``; expectations over prompts are averages over the ``P`` draws.

Pair sums are never materialised as (P, K, K, d) arrays: for a weight matrix ``W`` (K, K) of a prompt
with features ``Phi`` (K, d),

.. math::
    \sum_{ab} W_{ab}\, dphi_{ab} = \Phi^T (W 1 - W^T 1), \qquad
    \sum_{ab} W_{ab}\, dphi_{ab} dphi_{ab}^T = \Phi^T (\mathrm{diag}(W 1 + W^T 1) - W - W^T) \Phi,

batched over prompts in torch float64 and processed in chunks of prompts to bound memory.

Asymptotic covariance of ``sqrt(n) (theta_hat - theta_dagger)`` for the VR estimator with weight
``lam``, auxiliary model ``g_hat``, ``M`` reference pairs per labelled prompt (``M = None``: the
exact expectation over ``pi x pi``) and ``N = rho n`` unlabelled prompts carrying ``M`` reference
pairs each, all reference pairs pooled with equal weight. The gradient of ``L_VR`` at
``theta_dagger`` is ``(1/n)[sum_i (A_i + kappa B_i) + sum_k kappa B_k]`` with ``kappa = lam/(1+rho)``,
``A = (m'_Z(u) - lam m'_ghat(u)) dphi`` (labelled pair, ``Z ~ Bernoulli(g*)``),
``B = (1/M) sum_m b_m``, ``b = m'_ghat(u) dphi`` on a reference pair. Hence

.. math::
    \Omega(\lambda) = \mathrm{Cov}(A + \kappa B) + \rho \kappa^2 \mathrm{Cov}(B), \qquad
    \mathrm{cov} = H^{-1} \Omega(\lambda) H^{-1}, \quad H = E[m''_{g^*}(u)\, dphi\, dphi^T].

Writing ``a = m'_Z(u) dphi``, ``bbar(x) = E[b|x]``, ``abar(x) = E[a|x]`` and ``c = 1/(1+rho)``,
``Omega`` is an exact quadratic in ``lam`` (``kappa`` and ``A`` both carry ``lam``):

.. math::
    \Omega(\lambda) = O_0 - \lambda (X + X^T) + \lambda^2 Y, \qquad O_0 = \mathrm{Cov}(a), \\
    X = \mathrm{Cov}(a, b) - c\, \mathrm{Cov}_x(\bar a, \bar b), \qquad
    Y = \mathrm{Cov}(b) - c\, \mathrm{Cov}_x(\bar b) + \frac{c}{M} E_x[\mathrm{Cov}(b | x)],

where ``E[a a^T | pair] = {g* m'_1(u)^2 + (1-g*) m'_0(u)^2} dphi dphi^T`` and
``E[a | pair] = m'_{g*}(u) dphi``. (``Y`` collects ``Cov(b) + c^2 Cov(B) - 2c Cov_x(bbar) +
rho c^2 Cov(B)`` with ``c^2 (1 + rho) = c`` and ``Cov(B) = Cov_x(bbar) + E_x Cov(b|x) / M``.)
``lam = 0`` or ``g_hat = None`` is the MLE: ``Omega_MLE = O_0`` (logistic:
``E[{g*(1-g*) + (g* - s)^2} dphi dphi^T]``).

Monte Carlo error of the prompt average. ``theta_dagger``: delta method,
``se = sqrt(diag(H^-1 Cov_p(G_p) H^-1 / P))`` with ``G_p = E[m'_{g*}(u) dphi | x_p]``. Traces,
optimal weights and variance ratios: batch means over ``B`` contiguous batches of prompts; on each
batch the whole computation is redone (its own ``theta_dagger`` by warm-started Newton, ``H``,
``Omega``), and ``se = sd_b(T_b) / sqrt(B)``. This captures the variability of ``theta_dagger``
too; it assumes the statistic is close to linear in the prompt averages at batch size ``P / B``.
Small batches make it conservative: on a K = 3, d = 2 test population the trace's error came out
about 15% too large with 20 prompts per batch and unbiased (within 2-4%) with 50 or 80, so
``mc_note`` flags batches of fewer than 50 prompts; pick ``n_batches`` <= P / 50.

Second-order bias (``vr_bias``): ``E[theta_hat_n] = theta_dagger + b / n + o(1/n)``, from the same pair
sums with the loss's third derivative and quadratic forms ``dphi^T A dphi = q_a + q_b - 2 phi_a^T A phi_b``
(``q_a = phi_a^T A phi_a``), again without (P, K, K, d) arrays. Under misspecification the regret's
gradient at ``theta_dagger`` is not zero, so ``b`` moves the expected regret at the same O(1/n) order as
the spread does (``bounds.gaussian_plugin_regret``).

Power-tuned VRPO (``tuned_bias``) adds to ``b(lam*)`` the bias of estimating ``lam*``: the covariance of
the influence function of ``lam_hat`` (a ratio of cluster covariances at the MLE) with the ``lam``-derivative
of the estimating equation, again from pair sums (third moments of the cluster terms given the prompt).

Only smooth losses are accepted (the sandwich needs ``l''``); pass a smooth surrogate such as
``TruncatedHinge().curvature_surrogate(h)`` explicitly to study that (different) estimator. For a
non-convex smooth loss Newton (saddle-free: ``|eigenvalues|`` of ``H``) finds a local minimiser
from ``theta = 0``. A population with no unique finite minimiser raises ``InputError``.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from scipy.optimize import linprog
from torch import Tensor

from .data import PairPopulation, _as_float, check_clip, check_probability, check_solver, check_weight
from .errors import InputError
from .fitting import _least_relative_curvature
from .losses import Logistic, MarginLoss, Recession, get_loss

__all__ = [
    "Target",
    "AsymptoticCovariance",
    "LambdaChoice",
    "VarianceRatio",
    "population_target",
    "bread",
    "vr_covariance",
    "vr_bias",
    "tuned_bias",
    "mle_covariance",
    "optimal_lambda",
    "variance_ratio",
]

_DT = torch.float64
# prompts per chunk are chosen so that one (chunk, K, K) tensor has at most this many entries: the
# elementwise passes over a chunk then run in cache (measured on K = 50, d = 20: 2^16 entries 2.1 s,
# 2^21 entries 5.5 s for the same mle_covariance); 2^17 has fewer chunks to pay Python for (the whole
# mle_covariance of the benchmark's 20 000 prompts 12.4-12.5 s against 14.2-14.9 s at 2^16; K = 4 unchanged)
_CHUNK_ENTRIES = 1 << 17
# relative eigenvalue threshold below which a d x d second-moment matrix counts as singular
_RANK_TOL = 1e-10


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Target:
    r"""Population target ``theta_dagger = argmin_theta E_x sum_ab pi_a pi_b m_g(theta . dphi_ab)``.

    Attributes
    ----------
    theta : (d,) the minimiser.
    se : (d,) Monte Carlo standard error from averaging over the P prompt draws,
        ``sqrt(diag(H^-1 Cov_p(G_p) H^-1 / P))`` (NaN when P < 2).
    mc_cov : (d, d) that Monte Carlo covariance ``H^-1 Cov_p(G_p) H^-1 / P`` (NaN when P < 2).
    H : (d, d) Hessian ``E[m''_g(u) dphi dphi^T]`` at ``theta``.
    iterations : Newton steps taken.
    grad_norm : Euclidean norm of the population gradient at ``theta``.
    objective : population objective at ``theta``.
    loss : name of the margin loss.
    prompts : P.
    """

    theta: np.ndarray
    se: np.ndarray
    H: np.ndarray
    iterations: int
    grad_norm: float
    objective: float
    loss: str
    prompts: int
    mc_cov: np.ndarray | None = None


@dataclass(frozen=True)
class AsymptoticCovariance:
    r"""Asymptotic covariance ``cov = H^-1 Omega H^-1`` of ``sqrt(n)(theta_hat - theta_dagger)``.

    Attributes
    ----------
    theta_dagger : (d,) population target (of ``g*``).
    theta_se : (d,) its delta-method Monte Carlo standard error over prompts (see ``Target.se``).
    theta_mc_cov : (d, d) the Monte Carlo covariance behind ``theta_se`` (``Target.mc_cov``).
    H : (d, d) bread ``E[m''_{g*}(u) dphi dphi^T]``.
    Omega : (d, d) meat ``Omega(lam) = O_0 - lam (X + X^T) + lam^2 Y`` (module docstring).
    cov : (d, d) ``H^-1 Omega H^-1``.
    trace : ``tr(cov)``.
    trace_se : batch-means Monte Carlo standard error of ``trace`` over prompts (NaN if unavailable).
    lam, M, rho : effective settings (``lam = 0`` when ``g_hat`` is None; ``M`` None is exact).
    loss : name of the margin loss.
    batch_cov : (B, d, d) the covariance recomputed on each prompt batch, or None.
    mc_note : why no Monte Carlo error is available (empty when it is).
    bias : (d,) the second-order bias ``b`` of ``E[theta_hat_n] = theta_dagger + b / n + o(1/n)``, filled
        by ``vr_bias`` (None from ``vr_covariance``); bias_se : (d,) its batch-means Monte Carlo error
        (NaN if unavailable); batch_bias : (B, d) the bias recomputed on each prompt batch, or None.
    second : (d, d) the second-order term ``C`` of ``n Cov(theta_hat_n) = cov + C / n + o(1/n)``, filled by
        ``second_order.vr_second_order`` (None otherwise); batch_second : (B, d, d) it on each prompt batch.
    """

    theta_dagger: np.ndarray
    theta_se: np.ndarray
    H: np.ndarray
    Omega: np.ndarray
    cov: np.ndarray
    trace: float
    trace_se: float
    lam: float
    M: int | None
    rho: float
    loss: str
    batch_cov: np.ndarray | None = None
    mc_note: str = ""
    theta_mc_cov: np.ndarray | None = None
    bias: np.ndarray | None = None
    bias_se: np.ndarray | None = None
    batch_bias: np.ndarray | None = None
    second: np.ndarray | None = None
    batch_second: np.ndarray | None = None

    @property
    def n_batches(self) -> int:
        """Number of prompt batches behind ``trace_se`` (0 when not estimated)."""
        return 0 if self.batch_cov is None else int(self.batch_cov.shape[0])

    def _at(self, n: int | None, batched: bool) -> np.ndarray | None:
        """``cov`` (``n`` None) or ``cov + C / n``; per batch when ``batched`` (None without batches)."""
        cov, second = (self.batch_cov, self.batch_second) if batched else (self.cov, self.second)
        if n is None:
            return cov
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n: expected a sample size >= 1, got {n!r}")
        if self.second is None:
            raise InputError("n: this covariance has no second-order term (see second_order.vr_second_order)")
        return None if cov is None or second is None else cov + second / n

    def weighted_trace(self, weight: np.ndarray | int | None = None, n: int | None = None) -> float:
        """``tr(W cov)``, or with ``n`` the finite-sample ``tr(W (cov + C / n))`` (needs ``second``);
        ``weight`` None is ``W = I``, an int ``j`` is ``e_j e_j^T``, or a PSD (d, d) array."""
        W = check_weight("weight", weight, self.cov.shape[0])
        return float(np.trace(W @ self._at(n, False)))

    def weighted_trace_se(self, weight: np.ndarray | int | None = None, n: int | None = None) -> float:
        """Batch-means standard error of ``weighted_trace(weight, n)``: ``sd_b(tr(W cov_b)) / sqrt(B)``."""
        return self._batch_trace_se(weight, self._at(n, True))

    def weighted_second_se(self, weight: np.ndarray | int | None = None) -> float:
        """Batch-means standard error of ``tr(W C)``, the second-order term (NaN without it or batches)."""
        return self._batch_trace_se(weight, self.batch_second)

    def _batch_trace_se(self, weight: np.ndarray | int | None, batch: np.ndarray | None) -> float:
        """``sd_b(tr(W X_b)) / sqrt(B)`` over per-batch matrices ``X_b`` (NaN when there are none)."""
        if batch is None:
            return math.nan
        return _batch_se(np.einsum("ij,bji->b", check_weight("weight", weight, self.cov.shape[0]), batch))


@dataclass(frozen=True)
class LambdaChoice:
    r"""The weight ``lam`` minimising ``f(lam) = tr(W H^-1 Omega(lam) H^-1)``.

    ``f(lam) = tr(W' O_0) - 2 lam tr(W' X) + lam^2 tr(W' Y)`` with ``W' = H^-1 W H^-1``, so
    ``lam* = tr(W' X) / tr(W' Y)`` (``lam_unclipped``); ``lam`` is ``lam*`` clipped to ``clip``,
    which is the constrained optimum because ``f`` is a convex quadratic.

    Attributes
    ----------
    lam : the chosen weight (clipped unless ``clip`` is None).
    lam_unclipped : ``lam*``; 0 when ``tr(W' Y) = 0`` (then ``f`` does not depend on ``lam``).
    lam_se : batch-means Monte Carlo standard error of ``lam_unclipped``.
    value : ``f(lam)``; value_mle : ``f(0)``.
    ratio : ``value / value_mle``; ratio_se : its batch-means standard error.
    clip, M, rho : settings.
    """

    lam: float
    lam_unclipped: float
    lam_se: float
    value: float
    value_mle: float
    ratio: float
    ratio_se: float
    clip: tuple[float, float] | None
    M: int | None
    rho: float


@dataclass(frozen=True)
class VarianceRatio:
    """``ratio = tr(W cov_VR) / tr(W cov_MLE)`` with its batch-means Monte Carlo standard error ``se``."""

    ratio: float
    se: float
    vr: float
    mle: float
    lam: float
    M: int | None
    rho: float


# --------------------------------------------------------------------------------------------
# validation


def _check_population(pop: object) -> PairPopulation:
    if not isinstance(pop, PairPopulation):
        raise InputError(f"pop: expected a PairPopulation, got {type(pop).__name__}")
    return pop


def _check_loss(loss: str | MarginLoss) -> MarginLoss:
    out = get_loss(loss)
    if not out.smooth:
        raise InputError(
            f"loss: {out!r} is not smooth, so its exact asymptotics (which need l'') are not defined; "
            "use a smooth loss such as 'logistic', or pass loss.curvature_surrogate(bandwidth) "
            "explicitly to study the smoothed estimator"
        )
    return out


def _check_pair_probs(name: str, values: object, pop: PairPopulation) -> np.ndarray:
    arr = _as_float(name, values)
    shape = (pop.size, pop.K, pop.K)
    if arr.shape != shape:
        raise InputError(f"{name}: expected shape (P, K, K) = {shape}, got {arr.shape}")
    check_probability(name, arr)
    return arr


def _check_M(M: object) -> int | None:
    if M is None:
        return None
    if isinstance(M, float) and math.isinf(M) and M > 0:
        return None
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)):
        raise InputError(f"M: reference pairs per prompt must be an integer >= 1 or None (exact), got {M!r}")
    if M < 1:
        raise InputError(f"M: reference pairs per prompt must be >= 1, got {M}")
    return int(M)


def _check_real(name: str, value: object, minimum: float | None = None) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise InputError(f"{name}: must be finite, got {value!r}")
    if minimum is not None and out < minimum:
        raise InputError(f"{name}: must be >= {minimum}, got {value!r}")
    return out


def _check_batches(n_batches: object) -> int:
    if isinstance(n_batches, bool) or not isinstance(n_batches, (int, np.integer)) or n_batches < 2:
        raise InputError(f"n_batches: need an integer >= 2, got {n_batches!r}")
    return int(n_batches)


# --------------------------------------------------------------------------------------------
# batched pair sums


@dataclass
class _Tensors:
    phi: Tensor  # (P, K, d)
    w: Tensor  # (P, K, K) pair weights pi_a pi_b
    g_star: Tensor  # (P, K, K)
    g_hat: Tensor | None  # (P, K, K)

    @property
    def P(self) -> int:
        return self.phi.shape[0]

    @property
    def K(self) -> int:
        return self.phi.shape[1]

    @property
    def d(self) -> int:
        return self.phi.shape[2]

    def chunks(self, per_prompt: int | None = None, budget: int = _CHUNK_ENTRIES) -> Iterator[slice]:
        """Slices of prompts whose largest intermediate, ``per_prompt`` entries per prompt (default ``K^2``),
        has at most ``budget`` entries."""
        step = max(1, budget // (per_prompt or self.K * self.K))
        for start in range(0, self.P, step):
            yield slice(start, min(start + step, self.P))


def _tensors(pop: PairPopulation, g_hat: np.ndarray | None) -> _Tensors:
    pi = torch.as_tensor(pop.pi, dtype=_DT)
    return _Tensors(
        phi=torch.as_tensor(pop.phi, dtype=_DT),
        w=pi[:, :, None] * pi[:, None, :],
        g_star=torch.as_tensor(pop.g_star, dtype=_DT),
        g_hat=None if g_hat is None else torch.as_tensor(g_hat, dtype=_DT),
    )


def _first(Wm: Tensor, phi: Tensor) -> Tensor:
    """``sum_ab W_ab dphi_ab = Phi^T (W 1 - W^T 1)`` per prompt: (p, K, K), (p, K, d) -> (p, d)."""
    return torch.einsum("pk,pkd->pd", Wm.sum(2) - Wm.sum(1), phi)


def _second(Wm: Tensor, phi: Tensor) -> Tensor:
    """``sum_ab W_ab dphi dphi^T = Phi^T (diag(W 1 + W^T 1) - W - W^T) Phi``: (p, K, K) -> (p, d, d)."""
    cross = phi.transpose(1, 2) @ (Wm @ phi)  # Phi^T W Phi
    diag = (phi * (Wm.sum(2) + Wm.sum(1))[:, :, None]).transpose(1, 2) @ phi
    out = diag - cross - cross.transpose(1, 2)
    return 0.5 * (out + out.transpose(1, 2))


def _outer(x: Tensor, y: Tensor) -> Tensor:
    return x[..., :, None] * y[..., None, :]


def _margins(phi: Tensor, theta_p: Tensor) -> Tensor:
    """``U_ab = theta . (phi_a - phi_b) = r_a - r_b`` with ``r = Phi theta``: (p, K, K)."""
    r = torch.einsum("pkd,pd->pk", phi, theta_p)
    return r[:, :, None] - r[:, None, :]


def _runs(rows: Tensor) -> list[tuple[int, int, int]]:
    """``(group, start, stop)`` of each run of equal consecutive group ids."""
    ids, counts = torch.unique_consecutive(rows, return_counts=True)
    stops = torch.cumsum(counts, 0).tolist()
    return [(gid, stop - cnt, stop) for gid, cnt, stop in zip(ids.tolist(), counts.tolist(), stops)]


def _run_sum(acc: dict[str, Tensor], name: str, val: Tensor, runs: list[tuple[int, int, int]], G: int) -> None:
    """``acc[name][group] += sum of val over the group's rows`` (index_add_ is slow on CPU for few groups)."""
    if name not in acc:
        acc[name] = torch.zeros((G,) + tuple(val.shape[1:]), dtype=_DT)
    for gid, lo, hi in runs:
        acc[name][gid] += val[lo:hi].sum(0)


def _group_means(
    T: _Tensors, loss: MarginLoss, g: Tensor, theta: Tensor, groups: Tensor, sizes: Tensor, what: frozenset[str]
) -> dict[str, Tensor]:
    r"""Per-group averages over prompts of the requested pair sums, each group at its own ``theta``.

    ``obj``: ``sum_ab w m_g(u)``; ``grad``: ``G_p = sum_ab w m'_g(u) dphi``; ``hess``:
    ``sum_ab w m''_g(u) dphi dphi^T``; ``gg``: ``G_p G_p^T``; ``moments`` (``g`` must be ``g*``):
    ``S0 = sum w {g m'_1^2 + (1-g) m'_0^2} dphi dphi^T`` and, with ``g_hat``, ``bbar = sum w m'_ghat dphi``,
    ``Sab = sum w m'_g m'_ghat dphi dphi^T``, ``Sbb = sum w m'_ghat^2 dphi dphi^T``, ``GB = G_p bbar^T``,
    ``BB = bbar bbar^T``.
    """
    G = theta.shape[0]
    acc: dict[str, Tensor] = {}
    derivs = bool(what & {"grad", "hess", "gg", "moments"})
    for sl in T.chunks():
        phi, w, gg, rows = T.phi[sl], T.w[sl], g[sl], groups[sl]
        runs = _runs(rows)

        def add(name: str, val: Tensor, runs: list[tuple[int, int, int]] = runs) -> None:
            _run_sum(acc, name, val, runs, G)

        U = _margins(phi, theta[rows])
        if "obj" in what:
            add("obj", (w * loss.pair_value(U, gg)).sum((1, 2)))
        if not derivs:
            continue
        # m'_g(u) = g l'(u) - (1-g) l'(-u), m''_g(u) = g l''(u) + (1-g) l''(-u), in the loss's closed form
        mp, mpp = loss.pair_slopes(U, gg)
        Gp = _first(w * mp, phi)
        add("grad", Gp)
        if "gg" in what:
            add("gg", _outer(Gp, Gp))
        if "hess" in what:
            add("hess", _second(w * mpp, phi))
        if "moments" in what:
            (_, d1, _), (_, d1t, _) = loss.derivatives_pm(U)  # l'(u), l'(-u)
            # m'_1(u) = l'(u), m'_0(u) = -l'(-u): E[m'_Z^2 | pair] = g l'(u)^2 + (1-g) l'(-u)^2
            add("S0", _second(w * (gg * d1 * d1 + (1.0 - gg) * d1t * d1t), phi))
            if T.g_hat is not None:
                gh = T.g_hat[sl]
                mh = gh * d1 - (1.0 - gh) * d1t
                bbar = _first(w * mh, phi)
                add("bbar", bbar)
                add("Sab", _second(w * mp * mh, phi))
                add("Sbb", _second(w * mh * mh, phi))
                add("GB", _outer(Gp, bbar))
                add("BB", _outer(bbar, bbar))
    return {k: v / sizes.reshape((G,) + (1,) * (v.dim() - 1)) for k, v in acc.items()}


# --------------------------------------------------------------------------------------------
# existence of a finite minimiser


def _unit_scale(S: Tensor) -> Tensor | None:
    """``diag(S)^(-1/2)``, or None when a diagonal entry is not positive (a feature that never varies)."""
    diag = torch.diagonal(S)
    if not bool((diag > 0).all()):
        return None
    return diag.rsqrt()


def _existence_problems(T: _Tensors, g: Tensor, groups: Tensor, G: int, recession: bool
                        ) -> tuple[list[str | None], Tensor]:
    r"""Per group, why the population objective has no unique finite minimiser (None: it has one), and the
    groups' ``E[dphi dphi^T]`` (G, d, d).

    Identification: ``E[dphi dphi^T]`` over pairs of positive weight must be non-singular.
    Recession ``[-z]_+`` (``recession``: the logistic loss, the smoothed hinge): the convex objective
    has no unique finite minimiser iff some ``v != 0``
    has ``v . dphi = 0`` on every pair with ``0 < g < 1`` and ``(2g - 1) v . dphi >= 0`` on every
    pair with ``g`` in {0, 1}. With ``N`` a basis of the null space of the interior pairs' span, the
    rows ``q = (2g - 1) N^T dphi`` of the boundary pairs span ``R^k``, so such ``v`` exists iff the
    LP ``max 1^T Q v`` s.t. ``Q v >= 0``, ``|v|_inf <= 1`` has a positive value.
    """
    d = T.d
    acc = {"all": torch.zeros((G, d, d), dtype=_DT), "int": torch.zeros((G, d, d), dtype=_DT)}
    for sl in T.chunks():
        w, phi, runs = T.w[sl], T.phi[sl], _runs(groups[sl])
        _run_sum(acc, "all", _second(w, phi), runs, G)
        if recession:
            interior = ((g[sl] > 0.0) & (g[sl] < 1.0)).to(_DT)
            _run_sum(acc, "int", _second(w * interior, phi), runs, G)
    S_all, S_int = acc["all"], acc["int"]
    out: list[str | None] = [None] * G
    need_lp: dict[int, Tensor] = {}
    for j in range(G):
        # rank decisions on the unit-diagonal rescaling D^-1/2 S D^-1/2, so feature scales do not matter
        scale = _unit_scale(S_all[j])
        if scale is None or float(torch.linalg.eigvalsh(S_all[j] * _outer(scale, scale))[0]) <= _RANK_TOL:
            out[j] = (
                "the feature differences dphi of the pairs with positive weight do not span R^d, "
                "so theta_dagger is not identified (drop or combine collinear features)"
            )
            continue
        if recession:
            evi, vec = torch.linalg.eigh(S_int[j] * _outer(scale, scale))
            null = scale[:, None] * vec[:, evi <= _RANK_TOL]  # S_int v = 0 for v = D^-1/2 y
            if null.shape[1] > 0:
                need_lp[j] = null
    for j, null in need_lp.items():
        Q = _boundary_rows(T, g, groups, j, null)
        if Q.shape[0] == 0:
            continue
        res = linprog(
            c=-Q.sum(axis=0), A_ub=-Q, b_ub=np.zeros(Q.shape[0]), bounds=[(-1.0, 1.0)] * Q.shape[1], method="highs"
        )
        if res.status == 0 and -res.fun > 1e-7:
            out[j] = (
                "g has entries exactly 0 or 1 on pairs that a direction of theta separates, so the population "
                "objective of this loss (it grows linearly, like the logistic) does not increase along that "
                "direction and has no finite unique minimiser; move those probabilities inside (0, 1)"
            )
    return out, S_all


def _boundary_rows(T: _Tensors, g: Tensor, groups: Tensor, group: int, null: Tensor) -> np.ndarray:
    """Unit rows ``(2g - 1) N^T dphi`` of the pairs with positive weight and ``g`` in {0, 1} of one group."""
    rows: list[Tensor] = []
    K = T.K
    off = ~torch.eye(K, dtype=torch.bool)
    for sl in T.chunks():
        sel = groups[sl] == group
        if not bool(sel.any()):
            continue
        proj = T.phi[sl][sel] @ null  # (p, K, k)
        gg = g[sl][sel]
        mask = (T.w[sl][sel] > 0) & ((gg == 0.0) | (gg == 1.0)) & off
        if not bool(mask.any()):
            continue
        D = proj[:, :, None, :] - proj[:, None, :, :]
        q = (2.0 * gg - 1.0)[mask][:, None] * D[mask]
        norm = q.norm(dim=1)
        keep = norm > 1e-12 * max(float(norm.max()), 1e-300)
        rows.append(q[keep] / norm[keep][:, None])
    if not rows:
        return np.zeros((0, null.shape[1]))
    return np.unique(np.round(torch.cat(rows).numpy(), 12), axis=0)


# --------------------------------------------------------------------------------------------
# Newton


def _newton_step(hess: Tensor, grad: Tensor) -> Tensor:
    """``-H^-1 grad`` per group, with ``|eigenvalues|`` (saddle-free) where ``H`` is not positive definite.

    Solved on the unit-diagonal rescaling ``D^-1/2 H D^-1/2`` so that feature scales do not matter.
    """
    scale = torch.diagonal(hess, dim1=1, dim2=2).abs().clamp_min(1e-300).rsqrt()
    hs = hess * _outer(scale, scale)
    ev, vec = torch.linalg.eigh(hs)
    top = ev.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    ev = ev.abs().clamp_min(1e-14 * top)
    gs = (scale * grad)[:, :, None]
    return -scale * (vec @ ((vec.transpose(1, 2) @ gs) / ev[:, :, None]))[:, :, 0]


@dataclass
class _Fit:
    theta: Tensor  # (G, d)
    grad: Tensor  # (G, d)
    hess: Tensor  # (G, d, d)
    iterations: int
    failed: list[str | None]


def _newton(
    T: _Tensors, loss: MarginLoss, g: Tensor, groups: Tensor, sizes: Tensor, theta0: Tensor, tol: float, max_iter: int
) -> _Fit:
    """Damped Newton per group: Armijo backtracking until ``|grad| < tol``, then one polishing Newton step."""
    G = theta0.shape[0]
    theta = theta0.clone()
    failed: list[str | None] = [None] * G
    alive = torch.ones(G, dtype=torch.bool)
    polished = torch.zeros(G, dtype=torch.bool)
    what = frozenset({"grad", "hess"})
    obj = frozenset({"obj"})
    f = _group_means(T, loss, g, theta, groups, sizes, obj)["obj"]
    it = 0
    while True:
        m = _group_means(T, loss, g, theta, groups, sizes, what)
        grad, hess = m["grad"], m["hess"]
        gnorm = grad.norm(dim=1)
        bad = ~torch.isfinite(gnorm) | ~torch.isfinite(theta).all(dim=1) | (theta.abs().amax(dim=1) > 1e12)
        for j in torch.nonzero(bad & alive).flatten().tolist():
            failed[j] = "Newton diverged (no finite minimiser, or features on a wildly different scale)"
        alive &= ~bad
        # once |grad| < tol, one more Newton step (quadratic convergence) takes theta to rounding level
        done = (gnorm < tol) & polished
        polished |= gnorm < tol
        active = alive & ~done
        if not bool(active.any()):
            break
        if it >= max_iter:
            for j in torch.nonzero(active).flatten().tolist():
                failed[j] = (
                    f"Newton did not reach gradient norm < {tol:g} in {max_iter} steps (|grad| = {gnorm[j]:.3g})"
                )
            break
        it += 1
        step = _newton_step(hess, grad)
        dec = -(grad * step).sum(dim=1)  # Newton decrement squared, > 0
        # below the rounding level of the objective Armijo cannot be resolved: take the full step
        ok = ~active | (dec <= 1e3 * torch.finfo(_DT).eps * f.abs().clamp_min(1.0))
        t = torch.ones(G, dtype=_DT)
        f_new = f.clone()
        for _ in range(60):
            if bool(ok.all()):
                break
            f1 = _group_means(T, loss, g, theta + t[:, None] * step, groups, sizes, obj)["obj"]
            newly = ~ok & (f1 <= f - 1e-4 * t * dec)
            f_new = torch.where(newly, f1, f_new)
            ok = ok | newly
            t = torch.where(ok, t, 0.5 * t)
        for j in torch.nonzero(active & ~ok).flatten().tolist():
            failed[j] = "the Newton line search stalled (objective not decreasing)"
        alive &= ok | ~active
        move = active & ok
        theta = torch.where(move[:, None], theta + t[:, None] * step, theta)
        f = torch.where(move, f_new, f)
    return _Fit(theta=theta, grad=grad, hess=hess, iterations=it, failed=failed)


#: The last fits of ``_fit_groups`` by the content of their inputs: every estimator's covariance on a
#: population needs the same target (``theta_dagger`` and its batch targets), fitted once.
_FITS: dict[bytes, _Fit] = {}
_FITS_LOCK = threading.Lock()
_FITS_KEPT = 8


def _fit_key(T: _Tensors, loss: MarginLoss, g: Tensor, groups: Tensor, G: int, theta0: Tensor, tol: float,
             max_iter: int) -> bytes | None:
    """A digest of everything ``_fit_groups`` reads, or None for a loss whose parameters are not plain numbers."""
    params = sorted(vars(loss).items())
    if not all(isinstance(v, (int, float, str, bool)) for _, v in params):
        return None
    h = hashlib.sha1(repr((type(loss).__name__, params, G, tol, max_iter, tuple(T.phi.shape))).encode())
    for t in (T.phi, T.w, g, groups, theta0):
        h.update(t.contiguous().numpy())  # the buffer itself: tobytes() would copy hundreds of MB first
    return h.digest()


def _fit_groups(
    T: _Tensors, loss: MarginLoss, g: Tensor, groups: Tensor, G: int, theta0: Tensor, tol: float, max_iter: int
) -> _Fit:
    """``_fit_groups_uncached``, reused for identical inputs (``_FITS``)."""
    key = _fit_key(T, loss, g, groups, G, theta0, tol, max_iter)
    with _FITS_LOCK:
        hit = _FITS.get(key) if key is not None else None
    if hit is not None:
        return replace(hit, failed=list(hit.failed))
    fit = _fit_groups_uncached(T, loss, g, groups, G, theta0, tol, max_iter)
    if key is not None:
        with _FITS_LOCK:
            _FITS[key] = replace(fit, failed=list(fit.failed))
            while len(_FITS) > _FITS_KEPT:
                del _FITS[next(iter(_FITS))]
    return fit


def _fit_groups_uncached(
    T: _Tensors, loss: MarginLoss, g: Tensor, groups: Tensor, G: int, theta0: Tensor, tol: float, max_iter: int
) -> _Fit:
    """Newton per group after the existence checks; any failing check skips the fit (``failed`` says why)."""
    sizes = torch.bincount(groups, minlength=G).to(_DT)
    problems, spread = _existence_problems(T, g, groups, G, recession=isinstance(loss.recession(), Recession))
    if any(p is not None for p in problems):
        nan = torch.full((G, T.d), math.nan, dtype=_DT)
        return _Fit(theta=nan, grad=nan, hess=nan[:, :, None] * nan[:, None, :], iterations=0, failed=problems)
    fit = _newton(T, loss, g, groups, sizes, theta0, tol, max_iter)
    failed = list(fit.failed)
    for j in range(G):
        if failed[j] is None:
            # curvature relative to the pairs' spread E[dphi dphi^T]: judged on H's own diagonal, a Hessian of
            # 1e-20 (an iterate far out where a loss with Gaussian tails is flat) passed
            curvature = float(_least_relative_curvature(fit.hess[j], spread[j]))
            if not curvature > _RANK_TOL:
                failed[j] = (f"the Hessian at the stationary point is not positive definite relative to the pairs' "
                             f"spread E[dphi dphi^T] (smallest relative curvature {curvature:.1e}): no strict "
                             "finite minimiser")
    fit.failed = failed
    return fit


_SMALL_BATCH = 50


def _batch_groups(P: int, n_batches: int) -> tuple[Tensor, int, str]:
    """Contiguous batch ids; ``B = min(n_batches, P // 2)`` (at least 2 prompts per batch)."""
    B = min(n_batches, P // 2)
    if B < 2:
        return torch.zeros(P, dtype=torch.long), 0, f"P = {P} prompts are too few for batch means (need >= 4)"
    sizes = [len(a) for a in np.array_split(np.arange(P), B)]
    note = ""
    if P // B < _SMALL_BATCH:
        note = (
            f"batches of only {P // B} prompts (< {_SMALL_BATCH}): the batch-means error tends to be too "
            "large (conservative); use fewer batches or more prompts"
        )
    return torch.repeat_interleave(torch.arange(B), torch.tensor(sizes)), B, note


def _batch_se(values: np.ndarray) -> float:
    """Batch-means standard error ``sd(values, ddof=1) / sqrt(B)``."""
    if values.shape[0] < 2 or not np.isfinite(values).all():
        return math.nan
    return float(values.std(ddof=1) / math.sqrt(values.shape[0]))


# --------------------------------------------------------------------------------------------
# the analysis shared by the public functions


@dataclass
class _Moments:
    H: np.ndarray  # (..., d, d)
    O0: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    eb: np.ndarray | None = None  # (..., d) E[m'_ghat(u) dphi], with g_hat

    def omega(self, lam: float) -> np.ndarray:
        """``Omega(lam) = O_0 - lam (X + X^T) + lam^2 Y``."""
        Xs = self.X + np.swapaxes(self.X, -1, -2)
        return self.O0 - lam * Xs + lam * lam * self.Y

    def cov(self, lam: float) -> np.ndarray:
        Hinv = np.linalg.inv(self.H)
        out = Hinv @ self.omega(lam) @ Hinv
        return 0.5 * (out + np.swapaxes(out, -1, -2))


def _assemble(m: dict[str, Tensor], has_ghat: bool, M: int | None, rho: float) -> _Moments:
    """Group moments -> ``H``, ``O_0``, ``X``, ``Y`` (module docstring), prompt covariances with 1/P."""
    Ea = m["grad"]
    O0 = m["S0"] - _outer(Ea, Ea)
    if has_ghat:
        Eb = m["bbar"]
        c = 1.0 / (1.0 + rho)
        inv_M = 0.0 if M is None else 1.0 / M
        cov_ab = m["Sab"] - _outer(Ea, Eb)
        covx_ab = m["GB"] - _outer(Ea, Eb)
        cov_b = m["Sbb"] - _outer(Eb, Eb)
        covx_b = m["BB"] - _outer(Eb, Eb)
        within_b = m["Sbb"] - m["BB"]
        X = cov_ab - c * covx_ab
        Y = cov_b - c * covx_b + c * inv_M * within_b
    else:
        X = torch.zeros_like(O0)
        Y = torch.zeros_like(O0)
    sym = lambda A: (0.5 * (A + A.transpose(-1, -2))).numpy()  # noqa: E731
    return _Moments(H=sym(m["hess"]), O0=sym(O0), X=X.numpy(), Y=sym(Y), eb=m["bbar"].numpy() if has_ghat else None)


@dataclass
class _Analysis:
    target: Target
    full: _Moments  # d x d
    batches: _Moments | None  # (B, d, d)
    note: str
    M: int | None
    rho: float
    loss: MarginLoss
    T: _Tensors
    theta: Tensor  # (1, d) theta_dagger
    batch_theta: Tensor | None = None  # (B, d) each batch's own target
    groups: Tensor | None = None  # (P,) batch of each prompt

    def whole(self) -> tuple[Tensor, Tensor]:
        """Every prompt in one group: ``(groups, sizes)`` for the per-group means."""
        return torch.zeros(self.T.P, dtype=torch.long), torch.tensor([float(self.T.P)], dtype=_DT)

    def batch_sizes(self) -> Tensor:
        """Prompts per batch (B,)."""
        return torch.bincount(self.groups, minlength=self.batch_theta.shape[0]).to(_DT)


_MOMENTS = frozenset({"grad", "hess", "moments"})


def _target_from_fit(
    T: _Tensors, loss: MarginLoss, g: Tensor, fit: _Fit, m: dict[str, Tensor] | None = None
) -> Target:
    """``Target`` of a full-population fit; ``m`` holds its ``obj`` and ``gg`` means if already computed."""
    P = T.P
    if m is None:
        groups = torch.zeros(P, dtype=torch.long)
        sizes = torch.tensor([float(P)], dtype=_DT)
        m = _group_means(T, loss, g, fit.theta, groups, sizes, frozenset({"obj", "gg"}))
    H = (0.5 * (fit.hess[0] + fit.hess[0].T)).numpy()
    grad = fit.grad[0].numpy()
    if P >= 2:
        cov_G = (m["gg"][0].numpy() - np.outer(m["grad"][0].numpy(), m["grad"][0].numpy())) * P / (P - 1)
        Hinv = np.linalg.inv(H)
        mc = Hinv @ cov_G @ Hinv / P
        mc = 0.5 * (mc + mc.T)
        se = np.sqrt(np.clip(np.diag(mc), 0.0, None))
    else:
        mc = np.full((T.d, T.d), math.nan)
        se = np.full(T.d, math.nan)
    return Target(
        theta=fit.theta[0].numpy().copy(), se=se, H=H, iterations=fit.iterations,
        grad_norm=float(np.linalg.norm(grad)), objective=float(m["obj"][0]), loss=loss.name, prompts=P, mc_cov=mc,
    )


def _fit_full(T: _Tensors, loss: MarginLoss, g: Tensor, tol: float, max_iter: int) -> _Fit:
    groups = torch.zeros(T.P, dtype=torch.long)
    fit = _fit_groups(T, loss, g, groups, 1, torch.zeros((1, T.d), dtype=_DT), tol, max_iter)
    if fit.failed[0] is not None:
        raise InputError(f"population target: {fit.failed[0]}")
    return fit


def _analyse(
    pop: PairPopulation, g_hat: object, M: object, rho: object, loss: str | MarginLoss, n_batches: object,
    tol: float = 1e-10, max_iter: int = 100,
) -> _Analysis:
    pop = _check_population(pop)
    lossf = _check_loss(loss)
    gh = None if g_hat is None else _check_pair_probs("g_hat", g_hat, pop)
    M_ = _check_M(M)
    rho_ = _check_real("rho", rho, minimum=0.0)
    B_req = _check_batches(n_batches)
    T = _tensors(pop, gh)
    has = gh is not None

    fit = _fit_full(T, lossf, T.g_star, tol, max_iter)
    zeros = torch.zeros(T.P, dtype=torch.long)
    m = _group_means(
        T, lossf, T.g_star, fit.theta, zeros, torch.tensor([float(T.P)], dtype=_DT), _MOMENTS | {"obj", "gg"}
    )
    target = _target_from_fit(T, lossf, T.g_star, fit, m)
    full = _assemble(m, has, M_, rho_)
    full = _Moments(H=full.H[0], O0=full.O0[0], X=full.X[0], Y=full.Y[0], eb=None if full.eb is None else full.eb[0])

    groups, B, note = _batch_groups(T.P, B_req)
    batches = None
    if B >= 2:
        theta0 = fit.theta.expand(B, T.d).clone()
        bfit = _fit_groups(T, lossf, T.g_star, groups, B, theta0, tol, max_iter)
        bad = [(j, f) for j, f in enumerate(bfit.failed) if f is not None]
        if bad:
            note = f"batch {bad[0][0]} of {B} ({T.P // B} prompts each): {bad[0][1]}; no batch-means error"
        else:
            sizes = torch.bincount(groups, minlength=B).to(_DT)
            batches = _assemble(_group_means(T, lossf, T.g_star, bfit.theta, groups, sizes, _MOMENTS), has, M_, rho_)
    return _Analysis(target=target, full=full, batches=batches, note=note, M=M_, rho=rho_, loss=lossf, T=T,
                     theta=fit.theta, batch_theta=None if batches is None else bfit.theta, groups=groups)


# --------------------------------------------------------------------------------------------
# second-order bias


def _quadratic(phi: Tensor, A: Tensor) -> Tensor:
    """``Q_ab = dphi_ab^T A dphi_ab = q_a + q_b - 2 phi_a^T A phi_b`` per prompt, ``A`` symmetric:
    (p, K, d), (p, d, d) -> (p, K, K)."""
    r = phi @ A @ phi.transpose(1, 2)
    q = torch.diagonal(r, dim1=1, dim2=2)
    return q[:, :, None] + q[:, None, :] - 2.0 * r


def _orders(loss: MarginLoss, U: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``(m^(k)_1)_k`` and ``(m^(k)_0)_k``, k = 1, 2, 3: the derivatives in ``u`` of ``l(u)`` and of ``l(-u)``,
    so that ``m^(k)_g = g m^(k)_1 + (1 - g) m^(k)_0`` (``_mixed``)."""
    (_, d1, d2), (_, d1t, d2t) = loss.derivatives_pm(U)
    return (d1, d2, loss.third(U)), (-d1t, d2t, -loss.third(-U))


def _mixed(g: Tensor, one: tuple[Tensor, ...], zero: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``m^(k)_g = g m^(k)_1 + (1 - g) m^(k)_0`` for each order given."""
    return tuple(g * x1 + (1.0 - g) * x0 for x1, x0 in zip(one, zero))


def _bias_means(
    T: _Tensors, loss: MarginLoss, theta: Tensor, Hinv: Tensor, Sig: Tensor, lam: Tensor, groups: Tensor, sizes: Tensor
) -> dict[str, Tensor]:
    r"""Per-group prompt averages of the second-order terms (``vr_bias``), each group at its own
    ``theta``, ``H^-1``, ``Sigma`` and ``lam`` (G,): for the labelled pair with ``alpha^(k) = m^(k)_Z - lam m^(k)_ghat``
    (expectations over ``Z ~ Bernoulli(g*)``) and a reference pair with ``beta^(k) = m^(k)_ghat``,

    ``ga = sum w E[alpha'] dphi``, ``Ja = sum w E[alpha''] dphi dphi^T``,
    ``Caa = sum w E[alpha'' alpha'] Q_H dphi``, ``Ta = sum w E[alpha'''] Q_S dphi``, likewise ``gb``,
    ``Jb``, ``Cbb``, ``Tb`` from ``beta``, and the per-prompt products ``Ja H^-1 gb``, ``Jb H^-1 ga``,
    ``Jb H^-1 gb``, where ``Q_H = dphi^T H^-1 dphi``, ``Q_S = dphi^T Sigma dphi``."""
    G = theta.shape[0]
    acc: dict[str, Tensor] = {}
    for sl in T.chunks():
        phi, w, gs, rows = T.phi[sl], T.w[sl], T.g_star[sl], groups[sl]
        runs = _runs(rows)

        def add(name: str, val: Tensor, runs: list[tuple[int, int, int]] = runs) -> None:
            _run_sum(acc, name, val, runs, G)

        U = _margins(phi, theta[rows])
        one, zero = _orders(loss, U)
        if T.g_hat is not None:
            b1, b2, b3 = _mixed(T.g_hat[sl], one, zero)
        else:
            b1 = b2 = b3 = torch.zeros_like(U)
        lr = lam[rows][:, None, None]
        a1, a2, a3 = (x - lr * b for x, b in zip(_mixed(gs, one, zero), (b1, b2, b3)))
        a21 = gs * (one[1] - lr * b2) * (one[0] - lr * b1) + (1.0 - gs) * (zero[1] - lr * b2) * (zero[0] - lr * b1)
        Hi, QH, QS = Hinv[rows], _quadratic(phi, Hinv[rows]), _quadratic(phi, Sig[rows])
        ga, Ja = _first(w * a1, phi), _second(w * a2, phi)
        add("ga", ga)
        add("Ja", Ja)
        add("Caa", _first(w * a21 * QH, phi))
        add("Ta", _first(w * a3 * QS, phi))
        if T.g_hat is not None:
            gb, Jb = _first(w * b1, phi), _second(w * b2, phi)
            add("gb", gb)
            add("Jb", Jb)
            add("Cbb", _first(w * b2 * b1 * QH, phi))
            add("Tb", _first(w * b3 * QS, phi))
            add("JaHgb", (Ja @ (Hi @ gb[:, :, None]))[:, :, 0])
            add("JbHga", (Jb @ (Hi @ ga[:, :, None]))[:, :, 0])
            add("JbHgb", (Jb @ (Hi @ gb[:, :, None]))[:, :, 0])
    return {k: v / sizes.reshape((G,) + (1,) * (v.dim() - 1)) for k, v in acc.items()}


def _mv(A: Tensor, x: Tensor) -> Tensor:
    """``A x`` batched: (..., d, d), (..., d) -> (..., d)."""
    return (A @ x[..., None])[..., 0]


def _bias_of(m: dict[str, Tensor], Hinv: Tensor, lam: Tensor, M: int | None, rho: float) -> np.ndarray:
    """``b = H^-1 (C - T[Sigma] / 2)`` (``vr_bias``) from the group means ``m`` and each group's ``lam``
    (G,); batched over groups."""
    lam = lam[:, None]
    C = m["Caa"] - _mv(m["Ja"], _mv(Hinv, m["ga"]))
    third = m["Ta"]
    if "gb" in m:
        kappa = lam / (1.0 + rho)
        inv_M = 0.0 if M is None else 1.0 / M
        ref = inv_M * m["Cbb"] + (1.0 - inv_M) * m["JbHgb"]  # E[J_B H^-1 B] over one prompt's reference pairs
        EJ, EG = m["Ja"] + kappa[..., None] * m["Jb"], m["ga"] + kappa * m["gb"]
        C = (m["Caa"] + kappa * (m["JaHgb"] + m["JbHga"]) + kappa**2 * ref - _mv(EJ, _mv(Hinv, EG))
             + rho * kappa**2 * (ref - _mv(m["Jb"], _mv(Hinv, m["gb"]))))
        third = third + lam * m["Tb"]
    return _mv(Hinv, C - 0.5 * third).numpy()


def _tuning_means(
    T: _Tensors, loss: MarginLoss, theta: Tensor, Wp: Tensor, Kq: Tensor, nu: Tensor, eb: Tensor, rho: float,
    M: int | None, groups: Tensor, sizes: Tensor,
) -> dict[str, Tensor]:
    r"""Per-group prompt averages (each group at its own ``theta``, ``W' = Wp``, ``K = Kq``, ``nu``,
    ``e_b``) of the third-order terms of ``tuned_bias``. With ``beta = m'_ghat(u) dphi`` on the labelled
    pair, ``a = m'_Z(u) dphi``, ``R`` the mean of the reference pairs' ``r = m'_ghat dphi``, ``c = 1/(1+rho)``
    and the centred control terms ``B~ = -beta + nu + c R`` (labelled) and ``c (R - e_b)`` (unlabelled):

    ``S1 = E[(a^T W' B~) B~]``, ``S2L``/``S2U = E[(B~^T W' B~) B~]``, ``S3 = E[m''_Z Q_K B~]``,
    ``G1_k = E[B~^T W' d_k a]``, ``G2_k = E[a^T W' d_k B~]``, ``G3L``/``G3U_k = E[B~^T W' d_k B~]``,
    ``G4_k = E[m'''_Z d_k Q_K]`` (``d_k`` the derivative along ``theta_k``, ``Q_A = dphi^T A dphi``). The
    labelled pair and the reference pairs are independent given the prompt, so each is a polynomial in
    the prompt's pair sums: ``m = E[r|x]``, ``E[r r^T|x]``, ``E[(r^T W' r) r|x]`` and their labelled
    counterparts, with ``E[R R^T|x] = m m^T + C / M``, ``E[(R^T W' R) R|x] = (m^T W' m) m +
    (tr(W' C) m + 2 C W' m) / M + k3 / M^2`` (``C``, ``k3`` the conditional covariance and third moment
    of one ``r``; ``1/M = 0`` for the exact expectation)."""
    G = theta.shape[0]
    inv_M = 0.0 if M is None else 1.0 / M
    c = 1.0 / (1.0 + rho)
    acc: dict[str, Tensor] = {}
    tr = lambda A, B: torch.einsum("pij,pji->p", A, B)[:, None]  # noqa: E731
    dot = lambda x, y: (x * y).sum(-1, keepdim=True)  # noqa: E731
    for sl in T.chunks():
        phi, w, gs, gh, rows = T.phi[sl], T.w[sl], T.g_star[sl], T.g_hat[sl], groups[sl]
        runs = _runs(rows)
        one, zero = _orders(loss, _margins(phi, theta[rows]))
        b1, b2 = _mixed(gh, one[:2], zero[:2])
        a1, h, t3 = _mixed(gs, one, zero)  # E over Z (linear in Z)
        W, v, e = Wp[rows], nu[rows], eb[rows]
        QW, QK = _quadratic(phi, W), _quadratic(phi, Kq[rows])
        Wv = lambda x: _mv(W, x)  # noqa: E731
        m, abar = _first(w * b1, phi), _first(w * a1, phi)
        Mbb, Mba = _second(w * b1 * b1, phi), _second(w * b1 * a1, phi)
        Jh, Jg = _second(w * h, phi), _second(w * b2, phi)
        Cr = Mbb - _outer(m, m)
        Sr = _outer(m, m) + inv_M * Cr
        c3b = _first(w * b1 ** 3 * QW, phi)
        lin = tr(W, Cr) * m + 2.0 * _mv(Cr, Wv(m))
        c3R = dot(m, Wv(m)) * m + inv_M * lin + inv_M ** 2 * (c3b - dot(m, Wv(m)) * m - lin)

        def cubic(EL: Tensor, ELL: Tensor, c3L: Tensor) -> Tensor:
            """``E[(V^T W' V) V | x]`` for ``V = L + c R``, ``L`` independent of ``R`` given ``x``."""
            return (c3L + c * tr(W, ELL) * m + 2.0 * c * _mv(ELL, Wv(m)) + 2.0 * c * c * _mv(Sr, Wv(EL))
                    + c * c * tr(W, Sr) * EL + c ** 3 * c3R)

        # labelled: L = -beta + nu
        vWv = dot(v, Wv(v))
        ELL = Mbb - _outer(m, v) - _outer(v, m) + _outer(v, v)
        c3L = -c3b + tr(W, Mbb) * v + 2.0 * _mv(Mbb, Wv(v)) - 2.0 * dot(m, Wv(v)) * v - vWv * m + vWv * v
        _run_sum(acc, "S2L", cubic(v - m, ELL, c3L), runs, G)
        ell = -c * e  # unlabelled: L = -c e_b
        _run_sum(acc, "S2U", cubic(ell, _outer(ell, ell), dot(ell, Wv(ell)) * ell), runs, G)
        aWv, trWMba = dot(abar, Wv(v)), tr(W, Mba)
        S1 = (_first(w * a1 * b1 * b1 * QW, phi) - trWMba * v - _mv(Mba, Wv(v)) + aWv * v
              + c * (aWv - trWMba) * m + c * _mv(_outer(v, abar) - Mba, Wv(m)) + c * c * _mv(Sr, Wv(abar)))
        _run_sum(acc, "S1", S1, runs, G)
        hQK = (w * h * QK).sum((1, 2))[:, None]
        _run_sum(acc, "S3", -_first(w * h * QK * b1, phi) + hQK * (v + c * m), runs, G)
        _run_sum(acc, "G1", -_first(w * b1 * h * QW, phi) + _mv(Jh, Wv(v + c * m)), runs, G)
        _run_sum(acc, "G2", -_first(w * a1 * b2 * QW, phi) + c * _mv(Jg, Wv(abar)), runs, G)
        f12 = _first(w * b1 * b2 * QW, phi)
        refs = c * c * (inv_M * f12 + (1.0 - inv_M) * _mv(Jg, Wv(m)))  # E[c R^T W' d_k (c R) | x]
        _run_sum(acc, "G3L", f12 - _mv(Jg, Wv(v)) + c * _mv(Jg, Wv(v - 2.0 * m)) + refs, runs, G)
        _run_sum(acc, "G3U", refs - c * c * _mv(Jg, Wv(e)), runs, G)
        _run_sum(acc, "G4", _first(w * t3 * QK, phi), runs, G)
    return {k: val / sizes[:, None] for k, val in acc.items()}


def _tuning_bias(an: _Analysis, mo: _Moments, theta: Tensor, lam_u: np.ndarray, clip: tuple[float, float] | None,
                 W: np.ndarray, groups: Tensor, sizes: Tensor) -> np.ndarray:
    r"""``b_lam = -H^-1 (Q / D + X^T H^-1 g)`` of ``tuned_bias`` per group (G, d) at each group's unclipped
    ``lam*`` (``lam_u``); 0 where ``clip`` cuts it, half where it lies on a bound, NaN where ``tr(W' Y) = 0``.
    ``mo``: the groups' moments (batched, or the full population's for one group)."""
    G = theta.shape[0]
    H, X, Y = (np.broadcast_to(a, (G,) + a.shape[-2:]) for a in (mo.H, mo.X, mo.Y))
    Hinv = np.linalg.inv(H)
    Wp = np.broadcast_to(_w_prime(mo, W), H.shape)
    flat = np.broadcast_to(_flat(mo, Wp), (G,))
    D = np.where(flat, 1.0, np.einsum("gij,gji->g", Wp, Y))
    ls = lam_u[:, None, None]
    E = 0.5 * (X + np.swapaxes(X, 1, 2)) - ls * Y
    Kq = Wp @ E @ Hinv + Hinv @ E @ Wp
    rho = an.rho
    eb = np.broadcast_to(mo.eb, (G, H.shape[-1]))
    nu = rho / (1.0 + rho) * eb
    t = lambda a: torch.tensor(np.array(a), dtype=_DT)  # noqa: E731
    m = {k: v.numpy() for k, v in _tuning_means(an.T, an.loss, theta, t(Wp), t(Kq), t(nu), t(eb), rho, an.M,
                                                 groups, sizes).items()}
    lv, Dv = lam_u[:, None], D[:, None]
    Q = -m["S1"] - lv * (m["S2L"] + rho * m["S2U"]) - m["S3"]
    grad = (-m["G1"] - m["G2"] - 2.0 * lv * (m["G3L"] + rho * m["G3U"]) - m["G4"]) / Dv
    inner = Q / Dv + np.einsum("gji,gjk,gk->gi", X, Hinv, grad)
    out = -np.einsum("gij,gj->gi", Hinv, inner)
    if clip is not None:
        on_bound = np.isclose(lam_u[:, None], np.array(clip), rtol=0.0, atol=1e-9).any(axis=1)
        out *= np.where(on_bound, 0.5, np.where(_clipped(lam_u, clip) != lam_u, 0.0, 1.0))[:, None]
    out[flat] = math.nan
    return out


# --------------------------------------------------------------------------------------------
# public API


def population_target(
    pop: PairPopulation, loss: str | MarginLoss = "logistic", g: np.ndarray | None = None, *,
    tol: float = 1e-10, max_iter: int = 100,
) -> Target:
    r"""``theta_dagger = argmin_theta (1/P) sum_p sum_ab pi_a pi_b m_{g(a,b)}(theta . dphi_ab)``.

    ``g`` defaults to ``g*`` (the KL projection of ``g*`` onto the linear BT model for the logistic
    loss); any other (P, K, K) probability array gives the target of a soft-label fit on it. Newton
    with Armijo backtracking in float64 from ``theta = 0`` until ``|grad| < tol``. Raises
    ``InputError`` when the minimiser is not finite and unique (pairs' ``dphi`` not spanning
    ``R^d``; logistic loss with ``g`` in {0, 1} on separable pairs) or Newton fails. The standard
    error is the delta method ``sqrt(diag(H^-1 Cov_p(G_p) H^-1 / P))``, ``G_p = sum_ab pi_a pi_b
    m'_g(u) dphi`` on prompt ``p``.
    """
    pop = _check_population(pop)
    lossf = _check_loss(loss)
    tol, max_iter = check_solver(tol, max_iter)
    gg = pop.g_star if g is None else _check_pair_probs("g", g, pop)
    T = _tensors(pop, None)
    gt = torch.as_tensor(gg, dtype=_DT)
    fit = _fit_full(T, lossf, gt, tol, max_iter)
    return _target_from_fit(T, lossf, gt, fit)


def bread(pop: PairPopulation, theta: np.ndarray, loss: str | MarginLoss = "logistic") -> np.ndarray:
    r"""``H(theta) = (1/P) sum_p sum_ab pi_a pi_b m''_{g*}(theta . dphi_ab) dphi_ab dphi_ab^T`` (d, d).

    Logistic: ``E[s (1 - s) dphi dphi^T]``, ``s = sigmoid(theta . dphi)``. At ``theta_dagger`` it is
    the bread of the sandwich for every ``lam``.
    """
    pop = _check_population(pop)
    lossf = _check_loss(loss)
    try:
        th = np.asarray(theta, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"theta: cannot be read as numbers ({exc})") from None
    if th.shape != (pop.d,) or not np.isfinite(th).all():
        raise InputError(f"theta: expected a finite vector of shape ({pop.d},), got shape {th.shape}")
    T = _tensors(pop, None)
    groups = torch.zeros(T.P, dtype=torch.long)
    sizes = torch.tensor([float(T.P)], dtype=_DT)
    m = _group_means(T, lossf, T.g_star, torch.as_tensor(th, dtype=_DT)[None], groups, sizes, frozenset({"hess"}))
    return m["hess"][0].numpy()


def vr_covariance(
    pop: PairPopulation, g_hat: np.ndarray | None = None, lam: float = 0.0, M: int | None = 1, rho: float = 0.0,
    loss: str | MarginLoss = "logistic", *, n_batches: int = 20,
) -> AsymptoticCovariance:
    r"""Asymptotic covariance ``H^-1 Omega(lam) H^-1`` of ``sqrt(n)(theta_hat_VR - theta_dagger)``.

    ``Omega(lam) = Cov(A + kappa B) + rho kappa^2 Cov(B) = O_0 - lam (X + X^T) + lam^2 Y``,
    ``kappa = lam / (1 + rho)`` (terms in the module docstring). ``M`` reference pairs per prompt
    (None or ``inf``: the exact expectation over ``pi x pi``), ``rho n`` unlabelled prompts.
    ``g_hat`` None (or ``lam = 0``) gives the MLE, ``Omega = E[E[m'_Z(u)^2 | pair] dphi dphi^T]``.
    ``trace_se`` is the batch-means error over ``n_batches`` contiguous prompt batches.
    """
    return _covariance(*_analysis_at(pop, g_hat, lam, M, rho, loss, n_batches))


def _analysis_at(pop: PairPopulation, g_hat: object, lam: object, M: object, rho: object, loss: str | MarginLoss,
                 n_batches: object) -> tuple[_Analysis, float]:
    """The analysis of the settings and the effective ``lam`` (0 without an auxiliary model)."""
    lam_ = _check_real("lam", lam)
    an = _analyse(pop, g_hat, M, rho, loss, n_batches)
    return an, (0.0 if g_hat is None else lam_)


def _covariance(an: _Analysis, lam: float, batch_lam: np.ndarray | None = None) -> AsymptoticCovariance:
    """The covariance at ``lam``; each batch's at ``batch_lam`` (B,) when given, else at ``lam``."""
    cov = an.full.cov(lam)
    at = lam if batch_lam is None else batch_lam[:, None, None]
    batch_cov = None if an.batches is None else an.batches.cov(at)
    trace_se = math.nan if batch_cov is None else _batch_se(np.trace(batch_cov, axis1=1, axis2=2))
    return AsymptoticCovariance(
        theta_dagger=an.target.theta, theta_se=an.target.se, H=an.full.H, Omega=an.full.omega(lam), cov=cov,
        trace=float(np.trace(cov)), trace_se=trace_se, lam=lam, M=an.M, rho=an.rho, loss=an.loss.name,
        batch_cov=batch_cov, mc_note=an.note, theta_mc_cov=an.target.mc_cov,
    )


def mle_covariance(
    pop: PairPopulation, loss: str | MarginLoss = "logistic", *, n_batches: int = 20
) -> AsymptoticCovariance:
    r"""MLE sandwich ``H^-1 Omega_MLE H^-1``, ``Omega_MLE = E[{g* m'_1(u)^2 + (1-g*) m'_0(u)^2} dphi dphi^T]``.

    Logistic: ``Omega_MLE = E[{g*(1-g*) + (g* - s)^2} dphi dphi^T]``. Same as ``vr_covariance(pop)``.
    """
    return vr_covariance(pop, None, 0.0, 1, 0.0, loss, n_batches=n_batches)


def _lam_star(mo: _Moments, W: np.ndarray) -> np.ndarray:
    """``tr(W' X) / tr(W' Y)``, ``W' = H^-1 W H^-1`` (0 where ``tr(W' Y) = 0``); batched."""
    Wp = _w_prime(mo, W)
    num = np.einsum("...ij,...ji->...", Wp, mo.X)
    den = np.einsum("...ij,...ji->...", Wp, mo.Y)
    flat = _flat(mo, Wp)
    return np.where(flat, 0.0, num / np.where(flat, 1.0, den))


def _w_prime(mo: _Moments, W: np.ndarray) -> np.ndarray:
    """``W' = H^-1 W H^-1``; batched."""
    Hinv = np.linalg.inv(mo.H)
    return Hinv @ W @ Hinv


def _flat(mo: _Moments, Wp: np.ndarray) -> np.ndarray:
    """Where ``tr(W' Y) = 0`` relative to ``tr(W' O_0)``: the weighted trace does not depend on ``lam``."""
    den = np.einsum("...ij,...ji->...", Wp, mo.Y)
    return den <= 1e-13 * (np.abs(np.einsum("...ij,...ji->...", Wp, mo.O0)) + 1e-300)


def _clipped(lam: np.ndarray, clip: tuple[float, float] | None) -> np.ndarray:
    return lam if clip is None else np.clip(lam, clip[0], clip[1])


def _wtrace(mo: _Moments, lam: float, W: np.ndarray) -> np.ndarray:
    return np.einsum("ij,...ji->...", W, mo.cov(lam))


def optimal_lambda(
    pop: PairPopulation, g_hat: np.ndarray, M: int | None = 1, rho: float = 0.0,
    weight: np.ndarray | int | None = None, clip: tuple[float, float] | None = (0.0, 1.0),
    loss: str | MarginLoss = "logistic", *, n_batches: int = 20,
) -> LambdaChoice:
    r"""``lam* = argmin_lam tr(W H^-1 Omega(lam) H^-1) = tr(W' X) / tr(W' Y)``, ``W' = H^-1 W H^-1``.

    ``weight`` None is ``W = I`` (trace), an int ``j`` is ``e_j e_j^T`` (coordinate ``j``), or a
    PSD (d, d) matrix. ``clip`` (default [0, 1]) clips ``lam*``; None keeps it unclipped. Monte
    Carlo errors by batch means (each batch its own ``lam*_b`` and ratio at the chosen ``lam``).
    """
    if g_hat is None:
        raise InputError("g_hat: optimal_lambda needs an auxiliary model (got None)")
    clip = check_clip("clip", clip)
    an = _analyse(pop, g_hat, M, rho, loss, n_batches)
    W = check_weight("weight", weight, pop.d)
    lam_u = float(_lam_star(an.full, W))
    lam = float(_clipped(lam_u, clip))
    value = float(_wtrace(an.full, lam, W))
    value_mle = float(_wtrace(an.full, 0.0, W))
    lam_se = ratio_se = math.nan
    if an.batches is not None:
        lam_se = _batch_se(_lam_star(an.batches, W))
        ratio_se = _batch_se(_wtrace(an.batches, lam, W) / _wtrace(an.batches, 0.0, W))
    return LambdaChoice(
        lam=lam, lam_unclipped=lam_u, lam_se=lam_se, value=value, value_mle=value_mle, ratio=value / value_mle,
        ratio_se=ratio_se, clip=clip, M=an.M, rho=an.rho,
    )


def variance_ratio(
    pop: PairPopulation, g_hat: np.ndarray | None, lam: float = 1.0, M: int | None = 1, rho: float = 0.0,
    weight: np.ndarray | int | None = None, loss: str | MarginLoss = "logistic", *, n_batches: int = 20,
) -> VarianceRatio:
    r"""``tr(W cov_VR(lam)) / tr(W cov_MLE)`` with its batch-means Monte Carlo error (both on each batch).

    Below 1: VRPO with these settings is asymptotically more efficient than the MLE in the ``W`` norm.
    """
    an, lam_ = _analysis_at(pop, g_hat, lam, M, rho, loss, n_batches)
    W = check_weight("weight", weight, pop.d)
    vr = float(_wtrace(an.full, lam_, W))
    mle = float(_wtrace(an.full, 0.0, W))
    se = math.nan
    if an.batches is not None:
        se = _batch_se(_wtrace(an.batches, lam_, W) / _wtrace(an.batches, 0.0, W))
    return VarianceRatio(ratio=vr / mle, se=se, vr=vr, mle=mle, lam=lam_, M=an.M, rho=an.rho)


def vr_bias(
    pop: PairPopulation, g_hat: np.ndarray | None = None, lam: float = 0.0, M: int | None = 1, rho: float = 0.0,
    loss: str | MarginLoss = "logistic", *, n_batches: int = 20,
) -> AsymptoticCovariance:
    r"""``vr_covariance`` with the second-order bias ``b`` of the VR estimator filled in (the MLE for
    ``g_hat`` None or ``lam = 0``): ``E[theta_hat_n - theta_dagger] = b / n + o(1/n)``.

    The estimating equation is a sum over ``n`` labelled clusters (a labelled pair and its ``M``
    reference pairs) and ``rho n`` unlabelled ones (``M`` reference pairs), with gradients ``G_i``,
    Hessians ``J_i`` and third-derivative tensors ``T_i`` at ``theta_dagger``. Expanding it to second
    order (Rilstone, Srivastava and Ullah 1996; for the logistic MLE it is Cox and Snell's bias
    ``H^-1 E[s(1-s)(s - 1/2) dphi^T H^-1 dphi dphi]`` under BT),

    .. math::
        b = H^{-1}\Big(C - \tfrac12 T[\Sigma]\Big),\qquad
        C = \sum_{s} \rho_s \big(E[J_s H^{-1} G_s] - E[J_s] H^{-1} E[G_s]\big),\qquad
        T[\Sigma]_a = \sum_s \rho_s E\big[\textstyle\sum_{bc} \partial^3_{abc} \ell_s\, \Sigma_{bc}\big],

    over the two samples ``s`` (``rho_s`` = 1 and ``rho``), ``Sigma = H^-1 Omega H^-1``. With the
    pair terms of ``_bias_means`` (``kappa = lam / (1 + rho)``, ``1/M = 0`` for the exact expectation),
    ``E[J_i H^-1 G_i] = Caa + kappa (Ja H^-1 gb + Jb H^-1 ga) + kappa^2 R``,
    ``E[J_k H^-1 G_k] = kappa^2 R``, ``R = Cbb / M + (1 - 1/M) Jb H^-1 gb`` (a pair with itself, and
    two pairs of one prompt, independent given it), ``E J_i = Ja + kappa Jb``, ``E G_i = ga + kappa gb``,
    ``E J_k = kappa Jb``, ``E G_k = kappa gb``, and ``T[Sigma] = Ta + lam Tb``. This is the bias of
    the expansion: it exists even where the finite-sample mean does not (a sample with no estimate
    has positive probability). ``bias_se`` comes from batch means (each batch its own target,
    ``H`` and ``Sigma``).
    """
    an, lam_ = _analysis_at(pop, g_hat, lam, M, rho, loss, n_batches)
    return _with_bias(an, lam_)


def _with_bias(an: _Analysis, lam: float, batch_lam: np.ndarray | None = None,
               extra: tuple[np.ndarray, np.ndarray | None] | None = None) -> AsymptoticCovariance:
    """``_covariance`` with ``vr_bias``'s ``b`` filled in, plus ``extra = (full, per batch)`` terms;
    each batch at ``batch_lam`` (B,) when given."""
    res = _covariance(an, lam, batch_lam)
    Hinv = torch.as_tensor(np.linalg.inv(an.full.H))[None]
    full_lam = torch.tensor([lam], dtype=_DT)
    m = _bias_means(an.T, an.loss, an.theta, Hinv, torch.as_tensor(res.cov)[None], full_lam, *an.whole())
    bias = _bias_of(m, Hinv, full_lam, an.M, an.rho)[0]
    if extra is not None:
        bias = bias + extra[0]
    batch_bias = None
    if an.batches is not None:
        B = an.batch_theta.shape[0]
        lam_b = torch.as_tensor(np.full(B, lam) if batch_lam is None else batch_lam, dtype=_DT)
        Hb = torch.as_tensor(np.linalg.inv(an.batches.H))
        mb = _bias_means(an.T, an.loss, an.batch_theta, Hb, torch.as_tensor(res.batch_cov), lam_b, an.groups,
                         an.batch_sizes())
        batch_bias = _bias_of(mb, Hb, lam_b, an.M, an.rho)
        if extra is not None:
            batch_bias = batch_bias + extra[1]
    return _bias_filled(res, bias, batch_bias)


def _bias_filled(res: AsymptoticCovariance, bias: np.ndarray, batch_bias: np.ndarray | None) -> AsymptoticCovariance:
    """``res`` with the bias, its per-batch values and their batch-means error per coordinate."""
    se = np.full(bias.shape[0], math.nan)
    if batch_bias is not None:
        se = np.array([_batch_se(batch_bias[:, j]) for j in range(bias.shape[0])])
    return replace(res, bias=bias, bias_se=se, batch_bias=batch_bias)


def tuned_bias(
    pop: PairPopulation, g_hat: np.ndarray, M: int | None = 1, rho: float = 0.0,
    weight: np.ndarray | int | None = None, clip: tuple[float, float] | None = (0.0, 1.0),
    loss: str | MarginLoss = "logistic", *, n_batches: int = 20,
) -> AsymptoticCovariance:
    r"""``vr_bias`` of power-tuned VRPO (``fitting``'s ``vrpo_tuned``): the covariance at ``lam*``
    (``optimal_lambda``) and the second-order bias ``b = b(lam*) + b_lam`` of ``E theta_hat_n =
    theta_dagger + b / n + o(1/n)``, where ``b(lam*)`` is the bias at the fixed ``lam*`` and ``b_lam`` that
    of estimating it.

    The fit plugs ``lam_hat = tr(W' X_hat) / tr(W' Y_hat)`` into the VR equation ``Psi_n(theta) + lam
    S_n(theta) = 0`` (``S_n`` its ``lam``-derivative, ``E S_n = 0`` and ``E dS_n/dtheta = 0`` at
    ``theta_dagger``; ``X_hat``, ``Y_hat`` the cluster covariances and ``H_hat`` the Hessian, all at the MLE), so
    ``theta_hat(lam_hat) - theta_hat(lam*) = -H^-1 S_n (lam_hat - lam*) + O_p(n^{-3/2})`` and, with the
    influence function ``psi`` of ``lam_hat`` over labelled (L) and unlabelled (U) clusters,

    .. math::
        b_\lambda = -H^{-1}\big(E_L[\psi \tilde B] + \rho E_U[\psi \tilde B]\big)
                  = -H^{-1}\big(Q / D + X^T H^{-1} g\big), \qquad D = tr(W' Y),

    ``psi = (tr(W' dX) - lam* tr(W' dY) - tr(dH K)) / D - g^T H^-1 a`` with ``K = W' E H^-1 + H^-1 E W'``,
    ``E = (X + X^T)/2 - lam* Y``, ``g = d lam* / d theta`` through the MLE, and ``Q = -S1 - lam* (S2L +
    rho S2U) - S3``, ``D g = -G1 - G2 - 2 lam* (G3L + rho G3U) - G4`` (``_tuning_means``). Where ``clip``
    cuts ``lam*``, ``b_lam = 0`` (``lam_hat`` sits at the bound with probability -> 1); where ``lam*`` lies on
    a bound (the oracle with the exact expectation: ``lam* = 1``) it is half the formula (``lam_hat - lam*
    = min(delta, 0)`` with ``delta`` asymptotically normal, and ``E[S_n min(delta, 0)] = Cov(S_n, delta) / 2``);
    where ``tr(W' Y) = 0`` (an oracle ``g_hat`` under BT: ``lam_hat`` has no limit) the bias is NaN.
    ``bias_se`` from batch means, each batch with its own ``lam*``.
    """
    if g_hat is None:
        raise InputError("g_hat: tuned_bias needs an auxiliary model (got None)")
    clip = check_clip("clip", clip)
    an = _analyse(pop, g_hat, M, rho, loss, n_batches)
    W = check_weight("weight", weight, pop.d)
    lam_u = np.atleast_1d(_lam_star(an.full, W))
    lam = _clipped(lam_u, clip)
    full = _tuning_bias(an, an.full, an.theta, lam_u, clip, W, *an.whole())[0]
    batch_lam, extra = None, None
    if an.batches is not None:
        lam_ub = _lam_star(an.batches, W)
        batch_lam = _clipped(lam_ub, clip)
        extra = _tuning_bias(an, an.batches, an.batch_theta, lam_ub, clip, W, an.groups, an.batch_sizes())
    return _with_bias(an, float(lam[0]), batch_lam, (full, extra))
