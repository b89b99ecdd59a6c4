r"""Regret predictions from the asymptotic law of theta_hat, and a finite-sample bound for pessimism.

Part (a): with ``sqrt(n) (theta_hat - theta_dag) -> N(0, Sigma)``, the expected regret of the policy built
from ``theta_hat`` is predicted two ways:

* ``kl_regret_delta_method``: second-order delta method for the (smooth) KL policy,
  ``E regret(theta_hat) ~ regret(theta_dag) + grad . b / n + tr(Hess Sigma) / (2 n)``, with the gradient and
  Hessian of ``theta -> regret(pi_theta)`` computed exactly by autograd on the population (this is the
  formula ``regret(theta_dag) - grad J . b/n - tr(Hess_J Sigma)/(2n)`` since ``regret = const - J``);
* ``gaussian_plugin_regret``: ``E regret(theta)`` over ``theta ~ N(theta_dag, Sigma / n)`` by a fixed-seed
  Monte Carlo over draws of theta (no data are simulated); valid for greedy and KL policies.

Part (b): ``estimation_radius`` and ``pessimistic_regret_bound`` give a high-probability bound for the
pessimistic policy of Zhu, Jordan and Jiao (2023) with every constant explicit; the derivation is in the
docstring of ``estimation_radius``. ``local_estimation_radius`` is its self-concordant counterpart, in the
norm of the Hessian at the estimate: the curvature at ``theta_dag`` replaces the ball's smallest one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import optimize

from .data import PairPopulation, as_probabilities, failure_probability
from .errors import InputError
from .losses import Logistic
from .policies import (
    REGRET_MEASURES,
    _check_distribution,
    _check_phi,
    _check_table,
    _check_theta,
    _gibbs,
    _prompt_mean,
    _reference_point,
    preference_utility,
    theta_regret,
)

__all__ = [
    "RegretDerivatives",
    "regret_derivatives",
    "DeltaMethodRegret",
    "kl_regret_delta_method",
    "PluginRegret",
    "gaussian_plugin_regret",
    "logistic_curvature",
    "empirical_design",
    "DesignConstants",
    "design_constants",
    "EstimationRadius",
    "estimation_radius",
    "empirical_hessian",
    "local_estimation_radius",
    "PessimisticRegretBound",
    "pessimistic_regret_bound",
]

_DT = torch.float64


# ----------------------------------------------------------------------------------------------- checks


def _population(population: object) -> PairPopulation:
    if not isinstance(population, PairPopulation):
        raise InputError(f"population: expected a PairPopulation, got {type(population).__name__}")
    return population


def _positive(name: str, value: object, allow_zero: bool = False) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{name}: must be a number, got {value!r}") from None
    ok = (x >= 0) if allow_zero else (x > 0)
    if not (ok and math.isfinite(x)):
        raise InputError(f"{name}: must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return x


def _psd(name: str, matrix: object, d: int | None = None) -> np.ndarray:
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as numbers ({exc})") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0 or (d is not None and m.shape[0] != d):
        want = "a non-empty square matrix" if d is None else f"shape {(d, d)}"
        raise InputError(f"{name}: expected {want}, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise InputError(f"{name}: all entries must be finite")
    scale = max(float(np.abs(m).max()), 1e-300)
    if np.abs(m - m.T).max() > 1e-10 * scale:
        raise InputError(f"{name}: must be symmetric")
    m = 0.5 * (m + m.T)
    if np.linalg.eigvalsh(m).min() < -1e-10 * scale:
        raise InputError(f"{name}: must be positive semi-definite")
    return m


def _n(n: object) -> float:
    x = _positive("n", n)
    return x


# ------------------------------------------------------------------------- (a) asymptotic predictions


@dataclass(frozen=True)
class RegretDerivatives:
    r"""``f(theta) = regret(pi_theta)`` of the KL policy and its exact derivatives (prompt averages).

    ``value``/``gradient``/``hessian`` are ``E_x`` of the per-prompt ``f_x``, ``grad f_x``, ``Hess f_x``
    (``per_prompt_*``); ``value_se`` is the Monte Carlo error over prompts.
    """

    value: float
    value_se: float
    gradient: np.ndarray
    hessian: np.ndarray
    per_prompt_value: np.ndarray = field(repr=False)
    per_prompt_gradient: np.ndarray = field(repr=False)
    per_prompt_hessian: np.ndarray = field(repr=False)


def _kl_regret_function(population: PairPopulation, beta: float, measure: str):  # noqa: ANN202
    """``theta (d,) -> per-prompt regret (P,)`` of ``pi_theta ~ pi_ref exp(theta . phi / beta)`` in torch.

    ``kl``: ``beta KL(pi_theta || pi*_beta)``; ``value``: ``sum_a pi_theta(a)(max U - U(a))``;
    ``preference``: the same with the preference utility ``u``. Responses outside the support of
    ``pi_ref`` get a constant logit ``1e4`` below the row maximum, so their weight is exactly 0 in
    float64 and every intermediate stays finite (autograd to any order without NaN).
    """
    pop = population
    phi = torch.as_tensor(pop.phi, dtype=_DT)
    mask_np = pop.pi > 0
    mask = torch.as_tensor(mask_np)
    log_ref = torch.as_tensor(np.log(np.where(mask_np, pop.pi, 1.0)), dtype=_DT)
    if measure == "kl":
        assert pop.utility is not None
        _, log_opt_np = _gibbs(pop.utility, pop.pi, beta)
        log_opt = torch.as_tensor(np.where(mask_np, log_opt_np, 0.0), dtype=_DT)
    else:
        util = preference_utility(pop) if measure == "preference" else pop.utility
        assert util is not None
        gap = torch.as_tensor(util.max(axis=1, keepdims=True) - util, dtype=_DT)

    def per_prompt(theta: torch.Tensor) -> torch.Tensor:
        logits = log_ref + (phi @ theta) / beta
        top = torch.where(mask, logits, torch.tensor(-torch.inf, dtype=_DT)).amax(dim=1, keepdim=True)
        logits = torch.where(mask, logits, (top - 1e4).detach())
        logp = torch.log_softmax(logits, dim=1)
        p = torch.exp(logp)
        if measure == "kl":
            return beta * torch.where(mask, p * (logp - log_opt), torch.zeros_like(p)).sum(dim=1)
        return (p * gap).sum(dim=1)

    return per_prompt


def _measure(population: PairPopulation, measure: str | None) -> str:
    if measure is None:
        measure = "preference" if population.utility is None else "kl"
    if measure not in REGRET_MEASURES:
        raise InputError(f"measure: unknown regret measure {measure!r}; allowed: {', '.join(REGRET_MEASURES)}")
    if measure != "preference" and population.utility is None:
        raise InputError(f"measure={measure!r} needs population.utility, which is None")
    return measure


def regret_derivatives(
    theta: object, population: PairPopulation, beta: float, measure: str | None = None
) -> RegretDerivatives:
    """Value, gradient and Hessian of ``theta -> regret(kl_policy(theta))`` by exact autograd (float64).

    ``measure``: ``kl`` (``J_beta`` regret, default with a utility), ``value`` (unregularised regret
    against ``argmax U``) or ``preference`` (preference gap, default without a utility).
    """
    pop = _population(population)
    meas = _measure(pop, measure)
    b = _positive("beta", beta)
    th, batched = _check_theta(theta, pop.d)
    if batched:
        raise InputError("theta: regret_derivatives takes one parameter vector of shape (d,)")
    f = _kl_regret_function(pop, b, meas)
    t = torch.as_tensor(th[0], dtype=_DT)
    vals = f(t).detach().numpy()
    grads = torch.func.jacrev(f)(t).detach().numpy()
    hess = torch.func.jacrev(torch.func.jacrev(f))(t).detach().numpy()
    hess = 0.5 * (hess + np.swapaxes(hess, 1, 2))
    mean = _prompt_mean(vals)
    return RegretDerivatives(
        value=float(mean.mean), value_se=float(mean.se), gradient=grads.mean(axis=0), hessian=hess.mean(axis=0),
        per_prompt_value=vals, per_prompt_gradient=grads, per_prompt_hessian=hess,
    )


@dataclass(frozen=True)
class DeltaMethodRegret:
    """Second-order delta-method prediction of ``E regret(theta_hat)`` (terms and their prompt-MC errors)."""

    limit: float
    limit_se: float
    bias_term: float
    curvature_term: float
    excess: float
    excess_se: float
    expected: float
    expected_se: float
    bias_included: bool
    n: float
    gradient: np.ndarray
    hessian: np.ndarray


def kl_regret_delta_method(
    theta_dagger: object,
    sigma: object,
    n: float,
    population: PairPopulation,
    beta: float,
    *,
    bias: object | None = None,
    measure: str | None = None,
) -> DeltaMethodRegret:
    r"""Delta-method expected regret of the KL policy built from ``theta_hat``.

    With ``f(theta) = regret(pi_theta)`` (``measure`` as in ``regret_derivatives``),
    ``E theta_hat = theta_dag + b/n + o(1/n)`` and ``Cov theta_hat = Sigma/n + o(1/n)``, a second-order Taylor
    expansion gives

    .. math::
        E f(\hat\theta) = f(\theta^\dagger) + \nabla f \cdot b / n + tr(\nabla^2 f\, \Sigma) / (2n) + o(1/n),

    i.e. ``regret(theta_dag) - grad J . b/n - tr(Hess_J Sigma)/(2n)`` with ``J = J_beta(pi_theta)`` for
    ``measure='kl'`` (regret = const - J). ``grad`` and ``Hess`` are exact (autograd on the population).

    The M-estimator's ``O(1/n)`` bias ``b`` (``asymptotics.vr_bias``) is **not** included unless ``bias``
    is given (then ``bias_term = grad . b / n``). When ``grad f(theta_dag) = 0`` the formula is complete
    without it: e.g. ``measure='kl'`` with BT well specified and ``U = theta* . phi`` (``theta_dag = theta*``
    minimises ``f``), or a link misspecification with elliptical features where ``theta_dag`` is parallel
    to ``theta*`` and the scale matches. ``limit = f(theta_dag)``; ``excess = bias_term + curvature_term``;
    the ``*_se`` are Monte Carlo errors of these prompt averages.
    """
    pop = _population(population)
    nn = _n(n)
    der = regret_derivatives(theta_dagger, pop, beta, measure)
    S = _psd("sigma", sigma, pop.d)
    per_curv = 0.5 * np.einsum("pij,ji->p", der.per_prompt_hessian, S) / nn
    if bias is None:
        per_bias = np.zeros_like(per_curv)
    else:
        bb, batched = _check_theta(bias, pop.d, "bias")
        if batched:
            raise InputError(f"bias: expected shape {(pop.d,)}, got {np.shape(bias)}")
        per_bias = der.per_prompt_gradient @ bb[0] / nn
    excess = _prompt_mean(per_bias + per_curv)
    expected = _prompt_mean(der.per_prompt_value + per_bias + per_curv)
    return DeltaMethodRegret(
        limit=der.value, limit_se=der.value_se, bias_term=float(per_bias.mean()),
        curvature_term=float(per_curv.mean()), excess=float(excess.mean), excess_se=float(excess.se),
        expected=float(expected.mean), expected_se=float(expected.se), bias_included=bias is not None,
        n=nn, gradient=der.gradient, hessian=der.hessian,
    )


@dataclass(frozen=True)
class PluginRegret:
    """Gaussian plug-in ``E regret(theta)``, ``theta ~ N(theta_dag + b/n, Sigma/n)``, with its Monte Carlo error.

    ``se`` is the standard error over the draws of theta (it is also the error of ``excess``, since
    ``limit = regret(theta_dag)`` is fixed); the prompt set is the same for every draw. ``target_se``
    is the error that ``theta_dag``'s own Monte Carlo error passes on to ``expected`` (NaN unless its
    covariance was given).
    """

    expected: float
    se: float
    limit: float
    excess: float
    draws: int
    antithetic: bool
    target_se: float = math.nan


def gaussian_plugin_regret(
    theta_dagger: object,
    sigma: object,
    n: float,
    population: PairPopulation,
    *,
    kind: str = "greedy",
    beta: float | None = None,
    measure: str | None = None,
    draws: int = 4000,
    seed: int = 0,
    antithetic: bool = True,
    chunk: int = 1024,
    bias: object = None,
    theta_mc_cov: object = None,
    target_draws: int = 100,
) -> PluginRegret:
    r"""Gaussian plug-in prediction ``E_{theta ~ N(theta_dag + b/n, Sigma/n)} regret(pi_theta)`` (greedy
    or KL), ``b`` = ``bias`` (default zero; the estimator's second-order bias, ``asymptotics.vr_bias``).

    Draws ``theta = theta_dag + b/n + Sigma^{1/2} z / sqrt(n)``, ``z ~ N(0, I)`` with ``numpy`` seed
    ``seed``; with ``antithetic`` (default) they come in pairs ``+-z`` and the Monte Carlo error is that of
    the pair means (odd-order Taylor terms cancel within a pair). ``kind``/``beta``/``measure`` as in
    ``theta_regret``; ``limit`` is the regret at ``theta_dag``. For a smooth ``f``,
    ``E f(theta_hat) = f + (grad f . b + tr(Hess f Sigma) / 2) / n + o(1/n)``: the mean shift matters at the
    same order as the spread wherever ``grad f != 0`` at ``theta_dag`` (a misspecified model), so with ``b``
    the prediction is correct to ``o(1/n)``, without it only when ``grad f = 0``. For the greedy policy
    ``f`` is piecewise constant and only the plug-in applies.

    ``theta_mc_cov`` (d, d), the Monte Carlo covariance ``C`` of a ``theta_dag`` computed on a finite
    population (``AsymptoticCovariance.theta_mc_cov``), gives ``target_se``: the prediction's standard
    error from it, ``sqrt(g^T C g)`` with ``g`` the gradient of the prediction in ``theta_dag``, by
    central differences ``+-sqrt(lambda_k) v_k`` along the eigenvectors of ``C`` on the first
    ``target_draws`` of the same draws (common random numbers: on the study's scenarios 100 draws give it
    within 20% of 4000 draws, enough for an error bar's own error).
    """
    pop = _population(population)
    nn = _n(n)
    th, batched = _check_theta(theta_dagger, pop.d, "theta_dagger")
    if batched:
        raise InputError(f"theta_dagger: expected shape {(pop.d,)}, got {np.shape(theta_dagger)}")
    S = _psd("sigma", sigma, pop.d)
    shift = np.zeros(pop.d)
    if bias is not None:
        shift, batched = _check_theta(bias, pop.d, "bias")
        if batched:
            raise InputError(f"bias: expected shape {(pop.d,)}, got {np.shape(bias)}")
        shift = shift[0] / nn
    centre = th[0] + shift
    if not (isinstance(draws, (int, np.integer)) and draws >= 2):
        raise InputError(f"draws: need an integer >= 2, got {draws!r}")
    if antithetic and draws % 2:
        raise InputError(f"draws: must be even with antithetic pairs, got {draws}")
    if isinstance(chunk, bool) or not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise InputError(f"chunk: need an integer >= 1 (draws per regret evaluation), got {chunk!r}")
    C = None if theta_mc_cov is None else _psd("theta_mc_cov", theta_mc_cov, pop.d)
    evals, evecs = np.linalg.eigh(S)
    root = evecs * np.sqrt(np.clip(evals, 0.0, None))  # root @ root.T = Sigma
    if isinstance(seed, bool) or not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise InputError(f"seed: need an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    m = draws // 2 if antithetic else draws
    z = rng.standard_normal((m, pop.d))

    def units_at(c: np.ndarray, m: int = m) -> np.ndarray:
        """The first ``m`` draws' regrets (pair means with ``antithetic``) around the centre ``c``."""
        units = []
        for start in range(0, m, chunk):
            e = z[start:min(start + chunk, m)] @ root.T / math.sqrt(nn)
            plus = np.asarray(theta_regret(c + e, pop, kind=kind, beta=beta, measure=measure).mean)
            if antithetic:
                minus = np.asarray(theta_regret(c - e, pop, kind=kind, beta=beta, measure=measure).mean)
                units.append(0.5 * (plus + minus))
            else:
                units.append(plus)
        return np.concatenate(units)

    u = units_at(centre)
    limit = float(theta_regret(th[0], pop, kind=kind, beta=beta, measure=measure).mean)
    mean = float(u.mean())
    target_se = math.nan
    if C is not None:
        if not (isinstance(target_draws, (int, np.integer)) and target_draws >= 2):
            raise InputError(f"target_draws: need an integer >= 2, got {target_draws!r}")
        k = min(m, target_draws // 2 if antithetic else target_draws)
        cvals, cvecs = np.linalg.eigh(C)
        steps = [math.sqrt(v) * cvecs[:, j] for j, v in enumerate(cvals) if v > 0]
        target_se = math.sqrt(sum((0.5 * (units_at(centre + h, k).mean() - units_at(centre - h, k).mean())) ** 2
                                  for h in steps))
    return PluginRegret(
        expected=mean, se=float(u.std(ddof=1) / math.sqrt(u.size)), limit=limit, excess=mean - limit,
        draws=int(draws), antithetic=bool(antithetic), target_se=target_se,
    )


# --------------------------------------------------------------- (b) finite-sample bound for pessimism


def logistic_curvature(B: float, L: float) -> float:
    """``kappa = min_{|u| <= 2 L B} l''(u) = l''(2 L B) = sigmoid(2LB)(1 - sigmoid(2LB))`` (logistic loss).

    ``l''`` comes from ``Logistic().derivatives``; it is even and decreasing in ``|u|``.
    """
    return float(_logistic_curvatures(np.array([2.0 * _positive("L", L) * _positive("B", B)]))[0])


def empirical_design(dphi: object, L: float | None = None, theta: object | None = None) -> np.ndarray:
    """``Sigma_D = (1/n) sum_i dphi_i dphi_i^T`` from ``(n, d)`` differences; checks ``||dphi_i|| <= 2L``.
    With ``theta``, the logistic loss's Hessian there: ``(1/n) sum_i l''(theta . dphi_i) dphi_i dphi_i^T``."""
    try:
        x = np.asarray(dphi, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"dphi: cannot be read as numbers ({exc})") from None
    if x.ndim != 2 or x.shape[0] < 1:
        raise InputError(f"dphi: expected a non-empty (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("dphi: all entries must be finite")
    if L is not None:
        norms = np.linalg.norm(x, axis=1)
        if norms.max() > 2.0 * _positive("L", L) * (1.0 + 1e-12):
            raise InputError(
                f"dphi: row {int(norms.argmax())} has norm {norms.max():.6g} > 2L = {2 * L:.6g}; "
                "the bound assumes ||phi|| <= L"
            )
    if theta is None:
        return x.T @ x / x.shape[0]
    th, batched = _check_theta(theta, x.shape[1], "theta")
    if batched:
        raise InputError(f"theta: expected shape {(x.shape[1],)}, got {np.shape(theta)}")
    return (x.T * _logistic_curvatures(x @ th[0])) @ x / x.shape[0]


def empirical_hessian(theta: object, dphi: object, dphi_ref: object | None = None, lam: float = 0.0) -> np.ndarray:
    """The Hessian at ``theta`` of the logistic VR objective (``lam = 0``: the MLE's), ``(1 - lam) (1/n) sum_i
    l''(theta . x_i) x_i x_i^T + lam (1/N) sum_j l''(theta . x_j) x_j x_j^T`` over the labelled pairs ``dphi``
    and the reference pairs ``dphi_ref`` (``empirical_design`` with ``theta``)."""
    lam_ = _positive("lam", lam, allow_zero=True)
    hess = (1.0 - lam_) * empirical_design(dphi, theta=theta)
    if lam_ > 0:
        if dphi_ref is None:
            raise InputError("dphi_ref: the reference pairs are needed when lam > 0")
        hess = hess + lam_ * empirical_design(dphi_ref, theta=theta)
    return hess


def _logistic_curvatures(margin: np.ndarray) -> np.ndarray:
    """``l''(margin)`` of the logistic loss, from ``Logistic().derivatives``."""
    return Logistic().derivatives(torch.as_tensor(margin, dtype=_DT))[2].numpy()


def _score_coefficient(margin: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``g - sigmoid(z) = -d/dz [g l(z) + (1 - g) l(-z)]`` for the logistic ``l``, from its derivatives."""
    loss = Logistic()
    z = torch.as_tensor(margin, dtype=_DT)
    _, d1_pos, _ = loss.derivatives(z)
    _, d1_neg, _ = loss.derivatives(-z)
    gt = torch.as_tensor(g, dtype=_DT)
    return -(gt * d1_pos - (1.0 - gt) * d1_neg).numpy()


@dataclass(frozen=True)
class DesignConstants:
    r"""Population constants of the random-design part of the score (see ``estimation_radius``).

    ``sigma = E[dphi dphi^T]`` over the pair law (prompt uniform over the ``P`` draws, ``a, b ~ pi_ref``);
    ``lam_min`` its smallest eigenvalue; ``rho = max ||dphi||^2_{(sigma + mu I)^-1}`` over pairs of positive
    probability; ``c_design`` the almost-sure bound on ``||psi_des||_{(sigma + mu I)^-1}`` and ``c_design_l2``
    that on ``||psi_des||_2``; ``var_design`` an upper bound on ``E ||psi_des||^2_{(sigma + mu I)^-1}``;
    ``max_dphi = max ||dphi||_2`` (at most ``2 L``);
    ``first_order_norm = ||E[(g* - s_dag) dphi]||_{(sigma + mu I)^-1}`` (0 at the population minimiser).

    For ``local_estimation_radius``, in the norm of the population Hessian ``hessian = H = E[l''(theta_dag .
    dphi) dphi dphi^T]`` (``hessian_lam_min`` its smallest eigenvalue): ``tau = max ||dphi||_{H^-1}``,
    ``curvature_leverage = max l''(theta_dag . dphi) ||dphi||^2_{H^-1}``, ``c_local``, the almost-sure bound
    on ``||psi_des||_{H^-1}`` (maxima over pairs of positive probability), and ``var_local`` the bound on
    ``E ||psi_des||^2_{H^-1}``.
    """

    theta_dagger: np.ndarray
    mu: float
    lam: float
    sigma: np.ndarray
    lam_min: float
    rho: float
    c_design: float
    c_design_l2: float
    var_design: float
    max_dphi: float
    first_order_norm: float
    hessian: np.ndarray
    hessian_lam_min: float
    tau: float
    curvature_leverage: float
    c_local: float
    var_local: float


def design_constants(
    population: PairPopulation,
    theta_dagger: object,
    *,
    mu: float,
    lam: float = 0.0,
    g_hat: object | None = None,
    tol: float = 1e-6,
) -> DesignConstants:
    r"""Constants of the design part of the score at ``theta_dag``, exactly over the finite population.

    With ``x = dphi``, ``s = sigmoid(theta_dag . x)``, ``m = g* - s`` and ``e = g_hat - s`` on each pair, the
    design part of a cluster (labelled pair ``x`` and reference pairs ``x_j`` on the same prompt) is
    ``psi_des = (m - lam e) x + lam mean_j(e_j x_j)`` and

    ``c_design = max |m - lam e| ||x||_{Sigma_mu^-1} + lam max |e| ||x||_{Sigma_mu^-1}``,
    ``Sigma_mu = E[x x^T] + mu I`` (maxima over pairs of positive probability), and ``c_design_l2`` the same
    with the Euclidean norm ``||x||_2``. The second moment, for any number of reference pairs: given the prompt,
    Minkowski's inequality and ``||mean_j v_j||^2 <= mean_j ||v_j||^2`` give
    ``E ||psi_des||^2 <= E_prompt[(a + lam b)^2]``, ``a^2 = E[(m - lam e)^2 ||x||^2 | prompt]``,
    ``b^2 = E[e^2 ||x||^2 | prompt]`` (``var_design``; equality for the MLE).

    ``theta_dag`` must be the (unconstrained) minimiser of the population logistic loss, so that
    ``E[m x] = 0``; this is checked (``first_order_norm <= tol``) and an ``InputError`` raised otherwise.
    ``g_hat`` ``(P, K, K)`` is needed when ``lam > 0``.
    """
    pop = _population(population)
    mu_ = _positive("mu", mu, allow_zero=True)
    lam_ = _positive("lam", lam, allow_zero=True)
    if lam_ > 1.0:
        raise InputError(f"lam: the bound needs lam in [0, 1] (a convex VR objective), got {lam}")
    th, batched = _check_theta(theta_dagger, pop.d, "theta_dagger")
    if batched:
        raise InputError(f"theta_dagger: expected shape {(pop.d,)}, got {np.shape(theta_dagger)}")
    P, K, d = pop.phi.shape
    if lam_ > 0:
        if g_hat is None:
            raise InputError("g_hat: the auxiliary model (P, K, K) is needed when lam > 0")
        gh = as_probabilities("g_hat", g_hat, (P, K, K))
    else:
        gh = np.zeros((P, K, K))
    x = pop.phi[:, :, None, :] - pop.phi[:, None, :, :]  # (P, K, K, d): phi(a) - phi(b)
    w = pop.pi[:, :, None] * pop.pi[:, None, :] / P
    sigma = np.einsum("pab,pabi,pabj->ij", w, x, x)
    sig_mu = sigma + mu_ * np.eye(d)
    lam_min = float(np.linalg.eigvalsh(sigma).min())
    if lam_min + mu_ <= 0:
        raise InputError("mu: the population design E[dphi dphi^T] is singular; use mu > 0")
    margin = x @ th[0]
    m = _score_coefficient(margin, pop.g_star)
    e = _score_coefficient(margin, gh) if lam_ > 0 else np.zeros_like(m)
    inv = np.linalg.inv(sig_mu)
    score_mean = np.einsum("pab,pab,pabi->i", w, m, x)
    fo = float(np.sqrt(score_mean @ inv @ score_mean))
    if fo > tol:
        raise InputError(
            f"theta_dagger: not the population logistic minimiser; ||E[(g* - s) dphi]||_(Sigma+mu I)^-1 = "
            f"{fo:.3g} > tol={tol}"
        )
    norms = np.sqrt(np.einsum("pabi,ij,pabj->pab", x, inv, x))
    support = w > 0
    rho = float((norms[support] ** 2).max())
    lengths = np.linalg.norm(x, axis=-1)
    curv = _logistic_curvatures(margin)
    hess = np.einsum("pab,pab,pabi,pabj->ij", w, curv, x, x)
    hess_min = float(np.linalg.eigvalsh(hess).min())
    identified = hess_min > 1e-12 * max(float(np.abs(hess).max()), 1e-300)
    if identified:
        lev = np.einsum("pabi,ij,pabj->pab", x, np.linalg.inv(hess), x).clip(0.0)
        local = np.sqrt(lev)
    else:  # a flat direction at theta_dag: no local radius (local_estimation_radius says so)
        lev = local = np.full_like(m, math.inf)

    def bound(nrm: np.ndarray) -> float:
        return float((np.abs(m - lam_ * e) * nrm)[support].max() + lam_ * (np.abs(e) * nrm)[support].max())

    def second_moment(sq: np.ndarray) -> float:
        within = pop.pi[:, :, None] * pop.pi[:, None, :]  # the pair's law given the prompt
        a = np.sqrt(np.einsum("pab,pab->p", within, (m - lam_ * e) ** 2 * sq))
        b = np.sqrt(np.einsum("pab,pab->p", within, e ** 2 * sq))
        return float(((a + lam_ * b) ** 2).mean())

    return DesignConstants(
        theta_dagger=th[0], mu=mu_, lam=lam_, sigma=sigma, lam_min=lam_min, rho=rho, c_design=bound(norms),
        c_design_l2=bound(lengths), var_design=second_moment(norms ** 2), max_dphi=float(lengths[support].max()), first_order_norm=fo, hessian=hess,
        hessian_lam_min=hess_min, tau=float(local[support].max()), curvature_leverage=float((curv * lev)[support].max()),
        c_local=bound(local) if identified else math.inf, var_local=second_moment(lev) if identified else math.inf,
    )


@dataclass(frozen=True)
class EstimationRadius:
    r"""``Gamma`` with ``||theta_hat - theta_dag||_M <= Gamma`` with probability >= 1 - delta, and its parts.

    ``matrix`` is ``M = (1 - lam) Sigma_D + lam Sigma_ref + mu I``; ``cov = M^-1`` is the matrix to pass to
    ``pessimistic_policy`` together with ``gamma = radius``. ``score_bound`` bounds
    ``||grad L(theta_dag)||_{M^-1}``; ``noise_term`` and ``design_term`` are its two parts.
    ``curvature`` says which argument gave it: ``"global"`` (``estimation_radius``, the curvature ``kappa`` of
    the whole ball) or ``"local"`` (``local_estimation_radius``: ``M`` is the Hessian at ``theta_hat`` plus
    ``mu I``, ``score_bound`` bounds the score in the population Hessian's dual norm, ``kappa = 2 phi(t rho_0)``
    and ``dikin = t rho_0``; ``L`` is NaN, and ``B`` infinite when not given).
    """

    radius: float
    matrix: np.ndarray
    kappa: float
    certain: float
    score_bound: float
    noise_term: float
    design_term: float
    chernoff_eps: float
    delta_noise: float
    delta_design: float
    delta_chernoff: float
    n: float
    B: float
    L: float
    mu: float
    lam: float
    curvature: str = "global"
    dikin: float = math.nan

    @property
    def informative(self) -> bool:
        """Whether the radius is below the one that holds with certainty (``2 B sqrt(lambda_max(M))``):
        only then can ``||theta_hat - theta_dag||_M <= radius`` fail."""
        return self.radius < self.certain

    @property
    def cov(self) -> np.ndarray:
        """``M^-1``: the ellipsoid ``{theta : ||theta - theta_hat||_M <= radius}`` in covariance form."""
        return np.linalg.inv(self.matrix)


def _chernoff_eps(tau: float) -> float:
    """The ``eps`` in [0, 1) with ``eps + (1 - eps) log(1 - eps) = tau``; 1.0 when ``tau >= 1``."""
    if tau >= 1.0:
        return 1.0
    if tau <= 0.0:
        return 0.0
    f = lambda e: e + (1.0 - e) * math.log1p(-e) - tau  # noqa: E731  increasing from -tau to 1 - tau
    top = 1.0 - 1e-15
    if f(top) < 0.0:  # tau within rounding of 1: the root is 1 to double precision
        return 1.0
    return float(optimize.brentq(f, 0.0, top, xtol=1e-15, rtol=1e-14))


def _pair_count(n: object) -> int:
    """``n``, the number of labelled pairs, checked to be an integer >= 1."""
    nn = int(n) if isinstance(n, (int, np.integer)) and not isinstance(n, bool) else None
    if nn is None or nn < 1:
        raise InputError(f"n: the number of labelled pairs must be a positive integer, got {n!r}")
    return nn


def _check_target_inside(design: DesignConstants, B: float) -> None:
    """The radii need ``theta_dag`` in the ball of radius ``B`` the estimate is minimised over."""
    norm = float(np.linalg.norm(design.theta_dagger))
    if norm > B * (1 + 1e-12):
        raise InputError(f"B: ||theta_dagger|| = {norm:.6g} exceeds B={B}; the bound needs the target inside the ball")


def _definite_eigenvalues(matrix: np.ndarray, message: str) -> np.ndarray:
    """The eigenvalues of the norm's symmetric ``matrix``; ``InputError(message)`` where it is singular."""
    evals = np.linalg.eigh(matrix)[0]
    if evals.min() <= 1e-14 * evals.max():  # relative: the norm's scale is the features' units squared
        raise InputError(message)
    return evals


def _noise_in_norm(sigma_d: np.ndarray, A: np.ndarray, delta: float, n: int) -> float:
    """``_noise_bound`` for the noise part's ``A^-1`` norm: ``S = A^{-1/2} Sigma_D A^{-1/2}`` (``A`` positive
    definite)."""
    evals, evecs = np.linalg.eigh(A)
    inv_half = evecs @ np.diag(evals ** -0.5) @ evecs.T
    S = inv_half @ sigma_d @ inv_half
    return _noise_bound(np.clip(np.linalg.eigvalsh(0.5 * (S + S.T)), 0.0, None), delta, n)


def _design_deviation(c: float, var: float, n: int, delta: float) -> float:
    r"""A bound, holding with probability ``>= 1 - delta``, on ``||(1/n) sum_i xi_i||`` for i.i.d. mean-zero
    ``xi_i`` in a Hilbert space with ``||xi|| <= c`` a.s. and ``E ||xi||^2 <= var``; ``t = log(2 / delta)``.
    Pinelis (1994): Hoeffding-type (Thm 3.5, ``D = 1``) ``P(||sum xi|| >= r) <= 2 exp(-r^2 / (2 n c^2))``, i.e.
    ``c sqrt(2 t / n)``; Bennett-type (Thm 3.4) in Bernstein's weaker form ``2 exp(-r^2 / (2 (n var + c r / 3)))``,
    i.e. ``(c t / 3 + sqrt((c t / 3)^2 + 2 n var t)) / n``. The smaller: both are fixed numbers, so the level
    stays ``delta``."""
    t = math.log(2.0 / delta)
    hoeffding = c * math.sqrt(2.0 * t / n)
    bernstein = (c * t / 3.0 + math.sqrt((c * t / 3.0) ** 2 + 2.0 * n * var * t)) / n
    return min(hoeffding, bernstein)


def _noise_bound(s_eig: np.ndarray, delta_1: float, n: int) -> float:
    """Hsu, Kakade and Zhang's bound on the noise part (``estimation_radius``) from the eigenvalues of ``S``."""
    t1 = math.log(1.0 / delta_1)
    return math.sqrt(
        (s_eig.sum() + 2.0 * math.sqrt(float((s_eig ** 2).sum()) * t1) + 2.0 * s_eig.max() * t1) / (4.0 * n)
    )


def estimation_radius(
    sigma_d: object,
    n: int,
    *,
    B: float,
    L: float,
    mu: float,
    delta: float,
    lam: float = 0.0,
    sigma_ref: object | None = None,
    design: DesignConstants | None = None,
) -> EstimationRadius:
    r"""Explicit high-probability radius ``Gamma`` of the norm-constrained logistic MLE (``lam = 0``) or VRPO.

    **Setting.** ``n`` labelled pairs with differences ``x_i = dphi_i``, ``||phi|| <= L`` (so ``||x_i|| <= 2L``),
    labels ``Z_i`` independent given the design with ``P(Z_i = 1 | design) = g_i = g*(pair_i)``.
    ``theta_hat = argmin_{||theta|| <= B} L_n(theta)`` with, for ``lam`` in ``[0, 1]``, the VR objective
    (``lam = 0``: the MLE) ``L_n = (1/n) sum_i [m_{Z_i} - lam m_{g_hat_i}](theta . x_i) + lam (1/N) sum_j
    m_{g_hat_j}(theta . x_j)``, ``m_g(z) = g l(z) + (1-g) l(-z)``, ``l`` logistic, ``g_hat`` fixed (not fitted
    on these labels), ``N = n M`` reference pairs, ``M`` per labelled prompt, drawn like the labelled pair.
    Target: ``theta_dag``, the minimiser of the population logistic loss, assumed ``||theta_dag|| <= B``.
    ``sigma_d = (1/n) sum_i x_i x_i^T``, ``sigma_ref = (1/N) sum_j x_j x_j^T`` (``lam > 0`` only).

    **Step 1 (curvature).** ``m_g''(z) = l''(z)`` for every ``g``, so
    ``Hess L_n(theta) = (1-lam)(1/n) sum_i l''(theta.x_i) x_i x_i^T + lam (1/N) sum_j l''(theta.x_j) x_j x_j^T``.
    On the ball ``|theta . x| <= 2LB`` and ``l''`` is even and decreasing in ``|u|``, so
    ``Hess L_n >= kappa Sigma_VR`` with ``kappa = l''(2LB)`` (``logistic_curvature``) and
    ``Sigma_VR = (1-lam) Sigma_D + lam Sigma_ref``; the ball is convex, so this holds on the whole segment
    from ``theta_dag`` to ``theta_hat``.

    **Step 2 (basic inequality).** ``L_n(theta_hat) <= L_n(theta_dag)`` and Taylor's theorem with the
    integral remainder give, with ``Delta = theta_hat - theta_dag`` and ``M = Sigma_VR + mu I``,
    ``(kappa/2) ||Delta||^2_{Sigma_VR} <= -grad L_n(theta_dag) . Delta <= G ||Delta||_M``,
    ``G = ||grad L_n(theta_dag)||_{M^-1}``. With ``||Delta|| <= 2B``,
    ``t^2 = ||Delta||_M^2 <= (2G/kappa) t + 4 mu B^2``, hence
    ``t <= Gamma = (a + sqrt(a^2 + 16 mu B^2)) / 2`` with ``a = 2 G_bound / kappa`` for any ``G <= G_bound``.
    Both ends lie in the ball, so ``t <= 2 B sqrt(lambda_max(M))`` always (``certain``): ``Gamma`` is capped
    there, and where the cap binds the statement holds with certainty (``informative`` is False).

    **Step 3 (score).** ``l'(z) = sigmoid(z) - 1`` gives ``-grad L_n(theta_dag) = (1/n) sum_i psi_i`` with
    ``psi_i = (Z_i - g_i) x_i + psi_des_i``, ``psi_des_i = (m_i - lam e_i) x_i + lam mean_{j in i}(e_j x_j)``,
    ``m = g* - s_dag``, ``e = g_hat - s_dag`` (cluster ``i`` = labelled prompt with its reference pairs).

    * *Noise part* (conditional on the whole design; any design). ``eps_i = Z_i - g_i`` are independent,
      mean zero, in an interval of length 1, so by Hoeffding's lemma ``eps`` is sub-Gaussian with variance
      proxy ``1/4``. With ``A = M^{-1/2} X^T / n``, ``||A eps||^2 = ||(1/n) sum eps_i x_i||^2_{M^-1}`` and
      ``A^T A`` has the non-zero eigenvalues of ``S / n``, ``S = M^{-1/2} Sigma_D M^{-1/2}``. Hsu, Kakade and
      Zhang (2012, Thm 1): with probability >= ``1 - delta_1``, ``t1 = log(1/delta_1)``,
      ``noise <= sqrt((tr S + 2 sqrt(tr(S^2) t1) + 2 ||S|| t1) / (4 n))``  (``tr S <= d`` for the MLE).
    * *Design part* (random design, i.i.d. clusters; needs ``design``). ``E psi_des = E[m x] = 0`` at the
      population minimiser (the ``lam`` terms cancel because the reference pairs have the law of the
      labelled pair), ``||psi_des||_{Sigma_mu^-1} <= c = design.c_design`` a.s. and ``E ||psi_des||^2 <= v =
      design.var_design``. With probability >= ``1 - delta_2``, ``||sum_i psi_des_i / n||_{Sigma_mu^-1} <=
      D(c, v, n, delta_2)`` (``_design_deviation``: the smaller of Pinelis's (1994) Hoeffding- and
      Bernstein-type bounds in a Hilbert space, a choice made from ``c`` and ``v`` alone).
      To pass to the data norm, the matrix Chernoff bound (Tropp 2012, Thm 1.1) for the independent PSD
      ``Y_i = Sigma_mu^{-1/2}[(1-lam) x_i x_i^T + lam mean_j x_j x_j^T + mu I] Sigma_mu^{-1/2} / n`` (sum with
      mean ``I``, ``lambda_max(Y_i) <= R = (rho + mu/(lam_min + mu)) / n``) gives, with probability
      >= ``1 - delta_3``, ``M >= (1 - eps) Sigma_mu`` where ``eps + (1-eps) log(1-eps) = R log(d/delta_3)``
      (no such ``eps < 1`` when the right side is >= 1: this bound is then infinite). Then ``||v||_{M^-1} <=
      ||v||_{Sigma_mu^-1} / sqrt(1 - eps)`` and ``design <= D(c, v, n, delta_2) / sqrt(1 - eps)``.
    * *Design part, surely.* ``M >= mu I``, so ``design <= max ||psi_des||_2 / sqrt(mu) <= c_design_l2 /
      sqrt(mu)`` on every sample (0 when ``c_design_l2 = 0``, and about 1e-16 under BT with ``lam = 0``),
      and the noise part gets the whole ``delta``. Of the two, the one with the smaller ``G_bound`` at the
      population design (``Sigma_D = Sigma_ref = E[x x^T]``) is used: a choice made from population
      constants only, never from the data, so that the level stays ``delta``.

    ``G_bound = noise + design``. Without ``design`` (``lam = 0`` only) the design part is taken as zero:
    that is exact when BT is well specified with ``theta_dag = theta*`` (then ``m = 0``), or for a fixed
    design with the design-conditional target; then ``delta_1 = delta`` and the bound holds conditionally
    on any design. With ``design`` and its high-probability bound, ``delta_1 = delta_2 = delta_3 = delta/3``
    (union bound); with its sure bound, ``delta_1 = delta``. Where the design term is infinite, so is
    ``Gamma`` before the cap: the radius is ``certain``.

    ``mu >= 0`` (``M`` must be positive definite). The misspecification price enters through ``c``
    (``m = g* - s_dag``) and, for VRPO, through ``lam e`` (the control variate's error).
    """
    nn = _pair_count(n)
    B_ = _positive("B", B)
    L_ = _positive("L", L)
    mu_ = _positive("mu", mu, allow_zero=True)
    dl = failure_probability(delta)
    lam_ = _positive("lam", lam, allow_zero=True)
    if lam_ > 1.0:
        raise InputError(f"lam: the bound needs lam in [0, 1] (a convex VR objective), got {lam}")
    SD = _psd("sigma_d", sigma_d)
    d = SD.shape[0]
    if lam_ > 0:
        if sigma_ref is None:
            raise InputError("sigma_ref: the reference-pair design is needed when lam > 0")
        if design is None:
            raise InputError("design: the design constants (design_constants) are needed when lam > 0")
        SR = _psd("sigma_ref", sigma_ref, d)
    else:
        SR = np.zeros((d, d))
    for name, S_ in (("sigma_d", SD), ("sigma_ref", SR)):  # ||dphi|| <= 2L bounds every second moment
        top = float(np.linalg.eigvalsh(S_).max())
        if top > 4.0 * L_ * L_ * (1 + 1e-9):
            raise InputError(f"{name}: largest eigenvalue {top:.6g} exceeds 4 L^2 = {4 * L_ * L_:.6g}, so the pairs' "
                             f"differences are not bounded by 2L (||phi|| <= L = {L_:g}); pass the features' bound L")
    if design is not None:
        if not isinstance(design, DesignConstants):
            raise InputError(f"design: expected the DesignConstants of design_constants, got {type(design).__name__}")
        if design.max_dphi > 2.0 * L_ * (1 + 1e-9):
            raise InputError(f"L: the population's pairs have ||dphi|| up to {design.max_dphi:.6g} > 2 L = "
                             f"{2 * L_:.6g}; pass the features' bound L (||phi|| <= L)")
        if design.sigma.shape != (d, d):
            raise InputError(f"design: built for d={design.sigma.shape[0]}, but sigma_d has d={d}")
        if abs(design.mu - mu_) > 1e-12 * max(1.0, mu_) or abs(design.lam - lam_) > 1e-12:
            raise InputError(f"design: built with mu={design.mu}, lam={design.lam}; here mu={mu_}, lam={lam_}")
        _check_target_inside(design, B_)
    Mmat = (1.0 - lam_) * SD + lam_ * SR + mu_ * np.eye(d)
    evals_M = _definite_eigenvalues(Mmat, "mu: M = Sigma_VR + mu I is singular; use mu > 0")
    kappa = logistic_curvature(B_, L_)

    eps = 0.0
    design_term = 0.0
    with_design = False  # the design part's high-probability bound, which takes 2 delta / 3
    if design is not None:
        sure = 0.0 if design.c_design_l2 == 0.0 else (design.c_design_l2 / math.sqrt(mu_) if mu_ > 0 else math.inf)
        R = (design.rho + mu_ / (design.lam_min + mu_)) / nn
        eps_hp = _chernoff_eps(R * math.log(d / (dl / 3.0)))
        likely = (math.inf if eps_hp >= 1.0
                  else _design_deviation(design.c_design, design.var_design, nn, dl / 3.0) / math.sqrt(1.0 - eps_hp))
        # chosen at the population design (S with eigenvalues s / (s + mu)), never from the data: a choice
        # made from the data would not keep the level delta
        s_pop = np.clip(np.linalg.eigvalsh(design.sigma), 0.0, None)
        s_pop = s_pop / (s_pop + mu_) if mu_ > 0 else (s_pop > 0).astype(float)
        with_design = _noise_bound(s_pop, dl / 3.0, nn) + likely < _noise_bound(s_pop, dl, nn) + sure
        design_term, eps = (likely, eps_hp) if with_design else (sure, 0.0)
    d1 = dl / 3.0 if with_design else dl
    d2 = d3 = dl / 3.0 if with_design else 0.0

    noise = _noise_in_norm(SD, Mmat, d1, nn)
    score = noise + design_term
    certain = 2.0 * B_ * math.sqrt(float(evals_M.max()))
    a = 2.0 * score / kappa if kappa > 0 else math.inf  # kappa underflows to 0 for 2LB beyond ~745
    radius = certain if math.isinf(a) else min(certain, 0.5 * (a + math.sqrt(a * a + 16.0 * mu_ * B_ * B_)))
    return EstimationRadius(
        radius=radius, matrix=Mmat, kappa=kappa, certain=certain, score_bound=score, noise_term=noise, design_term=design_term,
        chernoff_eps=eps, delta_noise=d1, delta_design=d2, delta_chernoff=d3, n=float(nn), B=B_, L=L_, mu=mu_,
        lam=lam_,
    )


def _phi(r: float) -> float:
    """``phi(r) = (e^-r + r - 1) / r^2 = int_0^1 (1 - s) e^{-s r} ds`` (its series below ``r = 1e-3``)."""
    if r < 1e-3:
        return 0.5 - r / 6.0 + r * r / 24.0 - r ** 3 / 120.0
    return (math.expm1(-r) + r) / (r * r)


def _dikin_radius(G: float, t: float) -> float:
    """The root ``rho_0`` of ``rho phi(t rho) = G`` (``local_estimation_radius``); ``inf`` when ``G t >= 1``
    (``rho phi(t rho)`` increases from 0 to ``1 / t``)."""
    if G <= 0.0:
        return 0.0
    if not G * t < 1.0:
        return math.inf
    f = lambda rho: rho * _phi(t * rho) - G  # noqa: E731
    hi = 2.0 * G  # phi <= 1/2, so f(2G) <= 0
    while f(hi) <= 0.0:
        hi *= 2.0
        if not math.isfinite(hi):  # G within rounding of 1 / t
            return math.inf
    return float(optimize.brentq(f, 0.5 * hi if hi > 2.0 * G else 0.0, hi, xtol=1e-300, rtol=1e-14))


def local_estimation_radius(
    sigma_d: object,
    hessian: object,
    n: int,
    *,
    design: DesignConstants,
    delta: float,
    mu: float = 0.0,
    B: float | None = None,
) -> EstimationRadius:
    r"""High-probability radius of the logistic MLE or VRPO by self-concordance: no ``kappa = l''(2 L B)``.

    Same setting and estimator as ``estimation_radius`` (``lam = design.lam``), minimised over any convex set
    containing ``theta_dag`` (the ball of radius ``B``, or all of R^d); the radius is in the norm of
    ``M = H_hat + mu I``, with ``hessian = H_hat = H_n(theta_hat)`` the objective's Hessian at the estimate
    (``empirical_hessian(theta_hat, dphi, dphi_ref, lam)``), computable from the data. ``H_n(theta) = sum_k w_k l''(theta . x_k) x_k x_k^T`` over the labelled and
    reference pairs (weights ``(1 - lam)/n`` and ``lam/N``), ``H_dag = H_n(theta_dag)``, ``Delta = theta_hat -
    theta_dag``.

    **Step 1 (self-concordance).** ``l''' = l''(1 - 2 sigmoid)``, so ``|l'''| <= l''`` and ``l''(u + a) >=
    e^{-|a|} l''(u)``. If ``|Delta . x_k| <= r`` on every pair, Taylor's theorem with the integral remainder gives
    ``L_n(theta_dag + Delta) >= L_n(theta_dag) + grad L_n(theta_dag) . Delta + phi(r) ||Delta||^2_{H_dag}``,
    ``phi(r) = int_0^1 (1 - s) e^{-s r} ds = (e^{-r} + r - 1) / r^2``, and ``H_n(theta_dag + Delta) <= e^r H_dag``.

    **Step 2 (localisation).** With ``G = ||grad L_n(theta_dag)||_{H_dag^-1}`` and ``t = max_k ||x_k||_{H_dag^-1}``
    (so ``|Delta . x_k| <= t ||Delta||_{H_dag}``), every ``Delta`` with ``||Delta||_{H_dag} = rho`` has
    ``L_n(theta_dag + Delta) - L_n(theta_dag) >= rho (rho phi(t rho) - G)``, positive for ``rho > rho_0``, the root
    of ``rho phi(t rho) = G``. ``rho phi(t rho)`` increases from 0 to ``1 / t``, so ``rho_0`` exists iff ``G < 1 / t``.
    Were ``||Delta||_{H_dag} > rho > rho_0``, the point of the segment from ``theta_dag`` to ``theta_hat`` at
    ``H_dag``-norm ``rho`` would lie in the convex set with, by convexity, ``L_n <= L_n(theta_dag)``: a contradiction.
    So ``||Delta||_{H_dag} <= rho_0``, and by step 1 with ``r = t rho_0``,
    ``||Delta||^2_M <= e^{t rho_0} rho_0^2 + mu min(4 B^2, rho_0^2 / lambda_min(H_dag))``.

    **Step 3 (the random parts).** ``E H_dag = H = design.hessian`` (the reference pairs have the labelled
    pair's law). Matrix Chernoff (Tropp 2012, Thm 1.1) for the independent clusters'
    ``Y_i = H^{-1/2} h_i H^{-1/2}``, ``lambda_max(Y_i) <= R = design.curvature_leverage / n``: with probability
    ``>= 1 - delta_3``, ``H_dag >= (1 - eps) H`` with ``eps + (1 - eps) log(1 - eps) = R log(d / delta_3)``. Then
    ``G <= ||grad L_n(theta_dag)||_{H^-1} / sqrt(1 - eps)``, ``t <= design.tau / sqrt(1 - eps)`` and
    ``lambda_min(H_dag) >= (1 - eps) lambda_min(H)``. The score's two parts in the ``H^-1`` norm, as in
    ``estimation_radius``: the noise part by Hsu, Kakade and Zhang with ``S = H^{-1/2} Sigma_D H^{-1/2}``
    (probability ``1 - delta_1``), the design part by ``_design_deviation(c_local, var_local, n, delta_2)``
    (``1 - delta_2``; zero, spending no ``delta``, when ``c_local = 0``: BT with ``lam = 0``). ``delta`` is split
    evenly between the parts used.

    Where ``G t >= 1`` (too few pairs for the localisation) or ``eps >= 1`` the radius is ``certain``, the one
    that holds surely (``2 B sqrt(lambda_max(M))``, infinite without ``B``). Unlike ``estimation_radius``,
    nothing depends on ``B`` except that cap, and the curvature is the one at ``theta_dag``, not the ball's
    smallest: the global radius grows like ``e^{2 L B}``, this one not at all.
    """
    if not isinstance(design, DesignConstants):
        raise InputError(f"design: expected the DesignConstants of design_constants, got {type(design).__name__}")
    nn = _pair_count(n)
    mu_ = _positive("mu", mu, allow_zero=True)
    dl = failure_probability(delta)
    B_ = math.inf if B is None else _positive("B", B)
    d = design.sigma.shape[0]
    SD = _psd("sigma_d", sigma_d, d)
    Hhat = _psd("hessian", hessian, d)
    if not math.isfinite(design.tau):
        raise InputError("design: the population Hessian at theta_dagger is singular (a direction with no "
                         "curvature); the local radius needs it positive definite")
    _check_target_inside(design, B_)
    Mmat = Hhat + mu_ * np.eye(d)
    evals_M = _definite_eigenvalues(Mmat, "hessian: H_hat + mu I is singular; use mu > 0")
    parts = 3 if design.c_local > 0 else 2
    dp = dl / parts
    eps = _chernoff_eps(design.curvature_leverage / nn * math.log(d / dp))
    noise = _noise_in_norm(SD, design.hessian, dp, nn)
    design_term = _design_deviation(design.c_local, design.var_local, nn, dp) if parts == 3 else 0.0
    certain = 2.0 * B_ * math.sqrt(float(evals_M.max()))
    rho0 = dikin = math.inf
    score = math.inf
    if eps < 1.0:
        score = (noise + design_term) / math.sqrt(1.0 - eps)
        t = design.tau / math.sqrt(1.0 - eps)
        rho0 = _dikin_radius(score, t)
        dikin = t * rho0
    radius = certain
    if math.isfinite(rho0):
        spread = min(4.0 * B_ * B_, rho0 * rho0 / ((1.0 - eps) * design.hessian_lam_min))
        radius = min(certain, math.sqrt(math.exp(dikin) * rho0 * rho0 + mu_ * spread))
    return EstimationRadius(
        radius=radius, matrix=Mmat, kappa=2.0 * _phi(dikin) if math.isfinite(dikin) else 0.0, certain=certain,
        score_bound=score, noise_term=noise, design_term=design_term, chernoff_eps=eps, delta_noise=dp,
        delta_design=dp if parts == 3 else 0.0, delta_chernoff=dp, n=float(nn), B=B_, L=math.nan, mu=mu_,
        lam=design.lam, curvature="local", dikin=dikin,
    )


@dataclass(frozen=True)
class PessimisticRegretBound:
    r"""High-probability regret bound of the pessimistic policy and its ingredients.

    ``bound_dagger = 2 Gamma comparator_norm`` bounds the regret against ``pi_comp`` under the utility
    ``theta_dag . phi``. Under the true utility: ``bound_true = scale * bound_dagger + bias`` (None when no
    utility is given), with ``bias = E_x[sum_a pi_comp(a|x) e(x,a) - min_a e(x,a)]``,
    ``e = U - scale theta_dag . phi``.
    """

    bound_dagger: float
    comparator_norm: float
    radius: float
    scale: float | None
    bias: float | None
    bound_true: float | None


def _bias(pi_comp: np.ndarray, util: np.ndarray, r_dag: np.ndarray, c: float) -> float:
    e = util - c * r_dag
    return float(((pi_comp * e).sum(axis=1) - e.min(axis=1)).mean())


def pessimistic_regret_bound(
    radius: EstimationRadius,
    phi: object,
    pi_comp: object,
    *,
    pi_ref: object | None = None,
    v: object | None = None,
    per_prompt: bool = False,
    utility: object | None = None,
    theta_dagger: object | None = None,
    scale: float | None = None,
) -> PessimisticRegretBound:
    r"""Regret bound, holding with probability >= ``1 - delta``, of the pessimistic policy with radius ``Gamma``.

    The policy is ``pessimistic_policy(theta_hat, radius.cov, phi, gamma=radius.radius, v=v, pi_ref=pi_ref,
    per_prompt=per_prompt)``, i.e. the LCB over ``C = {||theta - theta_hat||_M <= Gamma}``. On the event
    ``theta_dag in C`` of ``estimation_radius``, for any comparator ``pi_comp`` (aggregate set,
    ``w(pi) = E_x phi(x, pi) - v``):
    ``theta_dag . w(pi_hat) >= LCB(pi_hat) >= LCB(pi_comp) >= theta_dag . w(pi_comp) - 2 Gamma ||w(pi_comp)||_{M^-1}``,
    so the regret under ``theta_dag . phi`` is at most ``2 Gamma ||w(pi_comp)||_{M^-1}`` (the argument of
    Zhu, Jordan and Jiao 2023 for the pessimistic MLE, here with explicit constants). Per-prompt sets: ``2 Gamma E_x ||w_x(pi_comp)||_{M^-1}``.

    Under the true utility ``U`` (``utility`` and ``theta_dagger`` given): for any ``c >= 0`` and
    ``e = U - c theta_dag . phi``,
    ``J(pi_comp) - J(pi_hat) = c theta_dag . (w(pi_comp) - w(pi_hat)) + E_x sum_a (pi_comp - pi_hat)(a|x) e(x,a)
    <= c bound_dagger + E_x[sum_a pi_comp(a|x) e(x,a) - min_a e(x,a)]`` -- the misspecification bias.
    ``scale=None`` takes the ``c`` minimising the right side (a linear program; valid since the bound holds
    for all ``c`` at once).
    """
    if not isinstance(radius, EstimationRadius):
        raise InputError(f"radius: expected an EstimationRadius, got {type(radius).__name__}")
    ph = _check_phi(phi)
    P, K, d = ph.shape
    if radius.matrix.shape != (d, d):
        raise InputError(f"radius: built for d={radius.matrix.shape[0]}, but phi has d={d}")
    pc = _check_distribution("pi_comp", pi_comp, K, P)
    if pc.ndim != 2:
        raise InputError(f"pi_comp: expected shape {(P, K)}, got {pc.shape}")
    vv = _reference_point(ph, pi_ref, v, per_prompt)
    cov = radius.cov
    if per_prompt:
        w = np.einsum("pk,pkd->pd", pc, ph) - vv
        norm = float(np.sqrt(np.einsum("pi,ij,pj->p", w, cov, w).clip(0.0)).mean())
    else:
        w = np.einsum("pk,pkd->d", pc, ph) / P - vv
        norm = float(np.sqrt(max(w @ cov @ w, 0.0)))
    bound_dag = 2.0 * radius.radius * norm
    if utility is None:
        if scale is not None or theta_dagger is not None:
            raise InputError("utility: needed for the bound under the true utility (scale/theta_dagger given)")
        return PessimisticRegretBound(bound_dag, norm, radius.radius, None, None, None)
    if theta_dagger is None:
        raise InputError("theta_dagger: needed with utility for the misspecification bias")
    th, batched = _check_theta(theta_dagger, d, "theta_dagger")
    if batched:
        raise InputError(f"theta_dagger: expected shape {(d,)}, got {np.shape(theta_dagger)}")
    util = _check_table("utility", utility, P, K)
    r_dag = ph @ th[0]
    if scale is not None:
        c = _positive("scale", scale, allow_zero=True)
    else:
        # min_{c >= 0, t} c bound_dag + mean_p t_p  s.t.  t_p >= alpha_pa + c beta_pa  (all p, a)
        alpha = (pc * util).sum(axis=1, keepdims=True) - util
        beta = r_dag - (pc * r_dag).sum(axis=1, keepdims=True)
        A = np.zeros((P * K, 1 + P))
        A[:, 0] = beta.ravel()
        A[np.arange(P * K), 1 + np.repeat(np.arange(P), K)] = -1.0
        res = optimize.linprog(
            np.concatenate([[bound_dag], np.full(P, 1.0 / P)]), A_ub=A, b_ub=-alpha.ravel(),
            bounds=[(0, None)] + [(None, None)] * P, method="highs",
        )
        if res.status != 0:
            raise RuntimeError(f"pessimistic_regret_bound: the scale LP failed ({res.message})")
        c = float(res.x[0])
    bias = _bias(pc, util, r_dag, c)
    return PessimisticRegretBound(bound_dag, norm, radius.radius, c, bias, c * bound_dag + bias)
