r"""DRPO (Xu et al. 2025, arXiv 2506.01183): a doubly robust estimate of a policy's win rate over the reference
policy, and the log-linear policy that maximises it less a KL penalty, on finite response sets.

Data (``DRPOData``): ``n`` labelled rows per replication. Row ``i`` has ``K`` responses with features ``phi_i``
(K, d), a *model* ``pi_hat_i`` (K) of the reference policy that drew its pair ``(y_i, y'_i)`` (the true one may
be unknown), the label ``Z_i = 1{y_i beats y'_i}`` and an auxiliary preference model ``g_hat_i(a, b)`` (K, K).

Target: the order-averaged win rate ``P(pi > pi_ref) = E_x sum_a pi(a|x) u(x, a)`` with ``u(x, a) = sum_b
pi_ref(b|x) gbar(a, b)`` and ``gbar(a, b) = (g*(a, b) + 1 - g*(b, a)) / 2`` (``policies.preference_utility``).
Each row gives the pseudo-reward of every response ``a``, a direct term from ``g_hat`` plus an importance-weighted
correction on the observed pair, averaged over the two orders in which the pair can be read
(``e_i = Z_i - g_hat(y_i, y'_i)``):

.. math::
    v_i(a) = \tfrac12\big[g_{hat}(a, y'_i) + 1 - g_{hat}(y_i, a)\big]
           + \tfrac12 e_i \Big[\frac{1\{a = y_i\}}{\hat\pi(y_i)} - \frac{1\{a = y'_i\}}{\hat\pi(y'_i)}\Big].

Given the prompt, ``E[v_i(a) | x] = ubar(x, a) = s_hat(a) + (pi_ref(a) / pi_hat(a)) (u(a) - s_hat(a))`` with
``s_hat(a) = sum_b pi_ref(b) gbar_hat(a, b)``: it equals ``u(x, a)`` when ``pi_hat = pi_ref`` (whatever
``g_hat``) or when ``gbar_hat = gbar`` (whatever ``pi_hat``), the double robustness. ``(1/n) sum_i sum_a
pi(a|x_i) v_i(a)`` is then an unbiased estimate of ``P(pi > pi_ref)`` for every policy ``pi``.

Policy class and estimator: ``pi_theta(a|x) = pi_hat(a|x) exp(theta . phi(x,a) / beta) / Z_theta(x)`` (the
KL-regularised policy of ``policies.kl_policy`` around ``pi_hat``), and

.. math::
    \hat\theta = \arg\max_\theta F_n(\theta), \quad F_n = \frac1n \sum_i f_i, \quad
    f_i(\theta) = \sum_a \pi_\theta(a|x_i) v_i(a) - \beta\,KL(\pi_\theta(\cdot|x_i) \| \hat\pi_i)
                = \sum_a \pi_\theta(a|x_i) r_i(a) + \beta \log Z_\theta(x_i),

``r_i(a) = v_i(a) - theta . phi_i(a)``. With ``w = pi_theta(.|x_i)``, centred features ``phi~ = phi - sum_a w_a
phi_a`` and ``rbar = sum_a w_a r_a``,

.. math::
    \nabla f_i = \frac1\beta \sum_a w_a r_a \tilde\phi_a, \qquad
    \nabla^2 f_i = \sum_a w_a \Big[\frac{r_a - \bar r}{\beta^2} - \frac1\beta\Big] \tilde\phi_a \tilde\phi_a^T.

``F_n`` is not concave in general (maximising it is a reverse-KL projection), so the fit is a local maximiser from
``theta = 0`` (``pi = pi_hat``) by scipy's ``trust-exact`` with this exact Hessian, checked to be negative definite
at the end. Its limit ``theta_dagger`` maximises ``F(theta) = E_x[sum_a pi_theta(a|x) ubar(x,a) - beta KL]``: the
best policy of the class for the true win rate when either model is right, and a biased one otherwise
(``drpo_target`` computes both cases exactly). ``sqrt(n)(theta_hat - theta_dagger) -> N(0, A^-1 B A^-1)`` with
``A = -E grad^2 f`` and ``B = E[grad f grad f^T]``; ``fit_drpo`` reports the sandwich with the sample
moments, ``drpo_target`` the exact one (sums over the ``K^2`` pairs and both labels of each prompt).

``F_n`` can have several local maxima when ``beta`` is small, and then the estimator's finite-sample law has
heavy tails that the sandwich does not describe: with both models wrong (``tests/theory/test_drpo.py``'s population,
reversed ``g_hat``, ``pi_hat`` tilted by ``exp(-4 u)``) and ``beta = 0.1``, ``n tr Cov`` over 200 fits was 22.4 at
n = 1500 and 4.5 at n = 6000 against 2.33 predicted (at ``beta = 0.3``: 0.73 and 0.65 against 0.63).

``g_hat`` and ``pi_hat`` are fixed here (fitted on other data, or known). ``crossfit.crossfit_drpo`` learns both
from the rows themselves with K-fold cross-fitting (a classifier for ``g_hat``, the conditional logit
``crossfit.reference_logit`` for ``pi_hat``); the estimate stays consistent for the oracle when the reference
policy lies in the logit's class, whatever the classifier, and ``fit_drpo(..., reference="logit")`` counts the
estimation of ``pi_hat`` in the sandwich (the two-step correction). It lowers the variance, as an estimated
propensity does for inverse weighting: with a wrong ``g_hat`` (``tests/theory/test_drpo.py``, beta = 3, n = 1000,
300 replications) the first coordinate's variance was 0.83 times that with the true ``pi_ref`` (99% interval
0.73-0.94), 0.86 by the corrected sandwich, 1.01 by the fixed-model one.

Policies that cannot enumerate their responses (language models) use ``drpo_sampled_loss``: a surrogate on
``S`` draws ``a_s ~ pi_theta(.|x_i)`` whose gradient is, in expectation over the draws, exactly ``-grad f_i``
for any differentiable policy (the score-function identity, with a leave-one-out baseline), or that of ``f_i``
with the observed pair's importance ratios capped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from .data import PairPopulation, _as_float, _bounded, _check_indices, as_probabilities, check_solver
from .errors import InputError
from .policies import _check_beta, _check_distribution, _log_ref, win_rate

__all__ = ["DRPOData", "DRPOFit", "DRPOTarget", "DRPOSampledLoss", "pseudo_rewards", "fit_drpo", "drpo_target",
           "expected_pseudo_rewards", "drpo_sampled_loss", "dr_win_rate"]


def _distribution(name: str, values: object, shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities of ``shape`` whose last axis sums to one (the first bad row named)."""
    arr = _check_distribution(name, values, shape[-1], shape[-2])
    if arr.shape != shape:
        raise InputError(f"{name}: expected shape {shape}, got {arr.shape}")
    return arr


@dataclass(frozen=True)
class DRPOData:
    """Labelled rows for DRPO, with a leading replication axis ``R`` (given without it, one is added).

    ``phi`` (R, n, K, d) features of every response; ``pi_hat`` (R, n, K) the model of the reference policy
    (rows summing to 1, positive on both observed responses); ``pair`` (R, n, 2) the indices ``(y_i, y'_i)``;
    ``z`` (R, n) in [0, 1], the probability that ``y_i`` won (a hard label is 0 or 1); ``g_hat`` (R, n, K, K)
    the auxiliary preference model, ``g_hat[..., a, b]`` the probability that ``a`` (shown first) beats ``b``.
    """

    phi: np.ndarray
    pi_hat: np.ndarray
    pair: np.ndarray
    z: np.ndarray
    g_hat: np.ndarray

    def __post_init__(self) -> None:
        phi = _as_float("phi", self.phi)
        if phi.ndim == 3:
            phi = phi[None]
        if phi.ndim != 4 or min(phi.shape) < 1:
            raise InputError(f"phi: expected a non-empty (n, K, d) or (R, n, K, d) array, got shape {phi.shape}")
        _bounded("phi", phi)
        R, n, K, _ = phi.shape
        lead = np.ndim(self.phi) == 3  # unbatched: every array gets the replication axis

        def batch(name: str, values: object) -> np.ndarray:
            arr = _as_float(name, values)
            return arr[None] if lead else arr

        pi = _distribution("pi_hat", batch("pi_hat", self.pi_hat), (R, n, K))
        z = as_probabilities("z", batch("z", self.z), (R, n))
        g = as_probabilities("g_hat", batch("g_hat", self.g_hat), (R, n, K, K))
        pair = _check_indices("pair", self.pair, (R, n, 2), K, ("replication", "row"), lead)
        seen = np.take_along_axis(pi, pair, axis=2)
        zero = seen <= 0
        if zero.any():
            r, i, j = (int(v) for v in np.argwhere(zero)[0])
            raise InputError(f"pi_hat: replication {r}, row {i} gives probability 0 to its observed response "
                             f"{int(pair[r, i, j])}; the importance weight 1/pi_hat is infinite (pi_hat must cover the "
                             "responses the data were drawn from)")
        for name, arr in (("phi", phi), ("pi_hat", pi), ("pair", pair), ("z", z), ("g_hat", g)):
            object.__setattr__(self, name, arr)

    @property
    def reps(self) -> int:
        return self.phi.shape[0]

    @property
    def n(self) -> int:
        return self.phi.shape[1]

    @property
    def K(self) -> int:
        return self.phi.shape[2]

    @property
    def d(self) -> int:
        return self.phi.shape[3]


def pseudo_rewards(data: DRPOData) -> np.ndarray:
    """``v_i(a)`` of the module docstring, (R, n, K)."""
    y, yp = data.pair[..., 0], data.pair[..., 1]
    take = lambda a, idx: np.take_along_axis(a, idx[..., None], axis=-1)[..., 0]  # noqa: E731
    g = data.g_hat
    g_vs_yp = np.take_along_axis(g, yp[..., None, None], axis=-1)[..., 0]  # g_hat(a, y'), (R, n, K)
    g_y_vs = np.take_along_axis(g, y[..., None, None], axis=-2)[..., 0, :]  # g_hat(y, a)
    v = 0.5 * (g_vs_yp + 1.0 - g_y_vs)
    half_e = 0.5 * (data.z - take(g_vs_yp, y))
    rows = np.arange(data.n)
    reps = np.arange(data.reps)[:, None]
    np.add.at(v, (reps, rows, y), half_e / take(data.pi_hat, y))
    np.add.at(v, (reps, rows, yp), -half_e / take(data.pi_hat, yp))
    return v


def _tilt(theta: np.ndarray, phi: np.ndarray, log_pi: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``pi_theta(.|x_i) = pi_hat exp(theta . phi / beta) / Z_theta`` (..., n, K) and ``log Z_theta`` (..., n)."""
    return _tilt_of(np.einsum("...kd,...d->...k", phi, theta), log_pi, beta)


def _tilt_of(u: np.ndarray, log_pi: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``_tilt`` from the rewards ``u = theta . phi`` (..., n, K). The maximum and sum over the few responses are
    taken column by column and as a product with ones: numpy's reductions over a short last axis cost several
    times more."""
    s = u / beta + log_pi
    # finite: pi_hat is positive somewhere on every row
    top = functools.reduce(np.maximum, (s[..., k] for k in range(s.shape[-1])))[..., None]
    e = np.exp(s - top)
    total = (e @ np.ones(e.shape[-1]))[..., None]
    return e / total, (top + np.log(total))[..., 0]


def _row_parts(theta: np.ndarray, phi: np.ndarray, log_pi: np.ndarray, v: np.ndarray, beta: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``f_i`` (n,), ``w`` (n, K), ``w r`` (n, K), ``phi~`` (n, K, d) and ``curve`` (n, K) of ``_row_terms``."""
    u = np.einsum("nkd,d->nk", phi, theta)
    w, lse = _tilt_of(u, log_pi, beta)
    r = v - u
    wr = w * r
    rbar = (wr @ np.ones(wr.shape[1]))[:, None]
    f = rbar[:, 0] + beta * lse
    centred = phi - np.einsum("nk,nkd->nd", w, phi)[:, None, :]
    curve = w * ((r - rbar) / beta**2 - 1.0 / beta)
    return f, w, wr, centred, curve


def _row_terms(theta: np.ndarray, phi: np.ndarray, log_pi: np.ndarray, v: np.ndarray, beta: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row (n rows): ``f_i``, ``grad f_i`` (n, d), and the Hessian's pieces ``w`` (n, K), the centred features
    ``phi~`` (n, K, d) and the weights ``w [(r - rbar) / beta^2 - 1 / beta]`` (n, K)."""
    f, w, wr, centred, curve = _row_parts(theta, phi, log_pi, v, beta)
    return f, np.einsum("nk,nkd->nd", wr, centred) / beta, w, centred, curve


def _mean_terms(theta: np.ndarray, phi: np.ndarray, log_pi: np.ndarray, v: np.ndarray, beta: float
                ) -> tuple[float, np.ndarray, np.ndarray]:
    """``F = (1/n) sum_i f_i``, its gradient (the rows' products summed in one pass) and Hessian."""
    f, _, wr, centred, curve = _row_parts(theta, phi, log_pi, v, beta)
    n, K, d = centred.shape
    grad = wr.reshape(1, n * K) @ centred.reshape(n * K, d) / (beta * n)
    return float(f.mean()), grad[0], _curvature(curve, centred)


def _reference_terms(data: DRPOData, rep: int, w: np.ndarray, centred: np.ndarray, curve: np.ndarray, beta: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""For ``pi_hat = softmax(gamma . phi)`` (``reference_logit``), per row of replication ``rep`` at the point whose
    ``w``, ``phi~`` and ``curve`` ``_row_terms`` gave: the Jacobian ``J_i = d grad f_i / d gamma`` (n, d, d), the
    score ``s_i`` of the row's pair under ``pi_hat`` (n, d) and its Fisher information (n, d, d). With
    ``psi_a = d log pi_hat(a) / d gamma = phi_a - E_pi_hat phi``, ``d w_a / d gamma = w_a phi~_a`` and
    ``d v_a / d gamma = -e/2 [1{a = y} psi_y / pi_hat(y) - 1{a = y'} psi_y' / pi_hat(y')]``,

    .. math::
        \beta J_i = \sum_a w_a (r_a - \bar r) \tilde\phi_a \tilde\phi_a^T
                   - \tfrac{e}{2}\Big[\frac{w_y \tilde\phi_y \psi_y^T}{\hat\pi(y)}
                                     - \frac{w_{y'} \tilde\phi_{y'} \psi_{y'}^T}{\hat\pi(y')}\Big],
        \qquad s_i = \psi_y + \psi_{y'}, \qquad I_i = 2 \sum_a \hat\pi_a \psi_a \psi_a^T."""
    phi, pi = data.phi[rep], data.pi_hat[rep]
    n = phi.shape[0]
    spread = beta**2 * curve + beta * w  # w (r - rbar), from curve = w [(r - rbar) / beta^2 - 1 / beta]
    J = np.einsum("nk,nkd,nke->nde", spread, centred, centred)
    psi = phi - np.einsum("nk,nkd->nd", pi, phi)[:, None, :]
    rows = np.arange(n)
    y, yp = data.pair[rep, :, 0], data.pair[rep, :, 1]
    half_e = 0.5 * (data.z[rep] - data.g_hat[rep, rows, y, yp])
    for idx, sign in ((y, 1.0), (yp, -1.0)):
        coef = -sign * half_e * w[rows, idx] / pi[rows, idx]
        J += coef[:, None, None] * centred[rows, idx][:, :, None] * psi[rows, idx][:, None, :]
    score = psi[rows, y] + psi[rows, yp]
    fisher = 2.0 * np.einsum("nk,nkd,nke->nde", pi, psi, psi)
    return J / beta, score, fisher


def _curvature(curve: np.ndarray, centred: np.ndarray) -> np.ndarray:
    """``(1/n) sum_i grad^2 f_i = (1/n) sum_i sum_a curve_ia phi~_ia phi~_ia^T`` (d, d), one product over the ``n K``
    rows (a three-operand ``einsum`` loops over them in Python's stead, several times slower)."""
    n, K, d = centred.shape
    X = centred.reshape(n * K, d)
    return X.T @ (curve.reshape(n * K, 1) * X) / n


def _maximise(phi: np.ndarray, log_pi: np.ndarray, v: np.ndarray, beta: float, tol: float, max_iter: int
              ) -> tuple[np.ndarray, bool, int]:
    """A local maximiser of ``F`` from 0 (``pi_hat``) by trust-exact: ``(theta, converged, iterations)``;
    converged means ``|grad F| < tol`` at a point where ``grad^2 F`` is negative definite."""
    d = phi.shape[-1]
    cache: dict[bytes, tuple[float, np.ndarray, np.ndarray]] = {}

    def terms(th: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        key = th.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = _mean_terms(th, phi, log_pi, v, beta)
        return cache[key]

    res = minimize(lambda th: -terms(th)[0], np.zeros(d), jac=lambda th: -terms(th)[1],
                   hess=lambda th: -terms(th)[2], method="trust-exact", options={"gtol": tol, "maxiter": max_iter})
    theta = res.x
    _, grad, hess = terms(theta)
    # near the maximiser F changes by less than its rounding error, where trust-exact stops: plain Newton steps
    # (judged by the gradient alone) finish the job while they shrink it
    for _ in range(8):
        if np.linalg.norm(grad) < tol or not _negative_definite(hess):
            break
        step = theta - np.linalg.solve(hess, grad)
        _, g_new, h_new = terms(step)
        if not np.linalg.norm(g_new) < np.linalg.norm(grad):
            break
        theta, grad, hess = step, g_new, h_new
    return theta, bool(np.linalg.norm(grad) < tol and _negative_definite(hess)), int(res.nit)


def _negative_definite(hess: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(hess))) and float(np.linalg.eigvalsh(hess).max()) < 0.0


@dataclass(frozen=True)
class DRPOFit:
    """``fit_drpo``'s result per replication: ``theta`` (R, d), the sandwich ``cov`` (R, d, d) of ``theta``,
    ``win_rate`` (R,) the DR estimate of ``P(pi_theta > pi_ref)`` at the estimate, ``objective`` (R,) ``F_n``,
    ``converged`` (R,) and ``n_iter`` (R,)."""

    theta: np.ndarray
    cov: np.ndarray
    win_rate: np.ndarray
    objective: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    beta: float

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(np.diagonal(self.cov, axis1=-2, axis2=-1))


def _gradient_tolerance(tol: object, max_iter: object, phi: np.ndarray) -> tuple[float, int]:
    """``check_solver``'s settings, ``tol`` scaled by the features' root mean square."""
    t, iters = check_solver(tol, max_iter)
    return t * max(float(np.sqrt(np.mean(phi**2))), 1e-300), iters


REFERENCES = ("fixed", "logit")


def fit_drpo(data: DRPOData, beta: float, *, tol: float = 1e-9, max_iter: int = 200,
             reference: str = "fixed") -> DRPOFit:
    r"""DRPO on each replication: ``theta_hat = argmax F_n`` (module docstring) from ``theta = 0``, with the
    sandwich ``cov = A_n^-1 B_n A_n^-1 / n``, ``A_n = -(1/n) sum grad^2 f_i``, ``B_n`` the sample covariance of
    ``grad f_i``, both at ``theta_hat``. ``tol`` bounds ``|grad F_n|`` relative to the features' root mean square.
    A replication that does not converge (or stops where ``F_n`` is not locally concave) has ``converged`` False.

    ``reference="fixed"``: ``g_hat`` and ``pi_hat`` were fitted on other data, or are known. ``"logit"``:
    ``pi_hat`` is the conditional logit ``softmax(gamma_hat . phi)`` fitted by maximum likelihood to these rows'
    pairs (``crossfit.crossfit_drpo``, or ``crossfit.reference_logit`` on all rows); ``B_n`` is then the sample
    covariance of ``grad f_i + G I^-1 s_i`` (the two-step correction for estimating ``gamma``: ``G`` the mean of
    ``_reference_terms``' Jacobians, ``s_i`` the rows' scores, ``I`` their mean Fisher information; with K equal
    folds the cross-fitted ``gamma`` of each row averages to the full-sample one's expansion). A learned ``g_hat``
    adds nothing to first order when ``pi_hat``'s class holds the reference policy (the pseudo-rewards are then
    orthogonal to ``g_hat``); otherwise its own estimation is not counted.
    """
    if not isinstance(data, DRPOData):
        raise InputError(f"data: expected DRPOData, got {type(data).__name__}")
    if reference not in REFERENCES:
        raise InputError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    b = _check_beta(beta, weight=True)
    gtol, max_iter = _gradient_tolerance(tol, max_iter, data.phi)
    v = pseudo_rewards(data)
    log_pi = _log_ref(data.pi_hat)[1]
    R, n, _, d = data.phi.shape
    theta = np.zeros((R, d))
    cov = np.full((R, d, d), np.nan)
    win, obj = np.full(R, np.nan), np.full(R, np.nan)
    converged, n_iter = np.zeros(R, dtype=bool), np.zeros(R, dtype=np.int64)
    for k in range(R):
        theta[k], converged[k], n_iter[k] = _maximise(data.phi[k], log_pi[k], v[k], b, gtol, max_iter)
        f, grad, w, centred, curve = _row_terms(theta[k], data.phi[k], log_pi[k], v[k], b)
        obj[k] = f.mean()
        win[k] = _win_rate(w, v[k])
        if converged[k]:
            Ainv = np.linalg.inv(-_curvature(curve, centred))
            if reference == "logit":
                J, score, fisher = _reference_terms(data, k, w, centred, curve, b)
                grad = grad + score @ np.linalg.solve(fisher.mean(0), J.mean(0).T)
            cov[k] = Ainv @ np.cov(grad, rowvar=False, bias=True).reshape(d, d) @ Ainv / n
    return DRPOFit(theta=theta, cov=cov, win_rate=win, objective=obj, converged=converged, n_iter=n_iter, beta=b)


def _win_rate(policy: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(1/n) sum_i sum_a pi(a|x_i) v_i(a)`` over the last two axes."""
    return (policy * v).sum(axis=-1).mean(axis=-1)


def dr_win_rate(data: DRPOData, theta: object, beta: float) -> np.ndarray:
    r"""The doubly robust estimate ``(1/n) sum_i sum_a pi_theta(a|x_i) v_i(a)`` of ``P(pi_theta > pi_ref)`` for
    each replication (R,), ``pi_theta = pi_hat exp(theta . phi / beta) / Z`` with ``theta`` (d,) shared or (R, d)
    per replication. For a ``theta`` chosen without the data it is unbiased at every ``n`` when ``g_hat`` or
    ``pi_hat`` is right (``E[v_i(a) | x] = u(x, a)``); at ``fit_drpo``'s estimate it is its ``win_rate``."""
    if not isinstance(data, DRPOData):
        raise InputError(f"data: expected DRPOData, got {type(data).__name__}")
    b = _check_beta(beta, weight=True)
    th = _as_float("theta", theta)
    if th.shape not in ((data.d,), (data.reps, data.d)):
        raise InputError(f"theta: expected shape {(data.d,)} or {(data.reps, data.d)}, got {th.shape}")
    _bounded("theta", th)
    th = np.broadcast_to(th, (data.reps, data.d))[:, None, :]  # (R, 1, d) against phi (R, n, K, d)
    w, _ = _tilt(th, data.phi, _log_ref(data.pi_hat)[1], b)
    return _win_rate(w, pseudo_rewards(data))


# --- the population ------------------------------------------------------------------------------------


def _population_models(pop: PairPopulation, g_hat: object, pi_hat: object) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(pop, PairPopulation):
        raise InputError(f"pop: expected a PairPopulation, got {type(pop).__name__}")
    P, K = pop.size, pop.K
    g = pop.g_star if g_hat is None else as_probabilities("g_hat", g_hat, (P, K, K))
    pi = pop.pi if pi_hat is None else _distribution("pi_hat", pi_hat, (P, K))
    where = (pop.pi > 0) & (pi <= 0)
    if where.any():
        p, a = (int(i) for i in np.argwhere(where)[0])
        raise InputError(f"pi_hat: prompt {p} gives probability 0 to response {a}, which pi_ref can draw; the "
                         "importance weight is infinite")
    return g, pi


def expected_pseudo_rewards(pop: PairPopulation, g_hat: np.ndarray | None = None,
                            pi_hat: np.ndarray | None = None) -> np.ndarray:
    """``ubar(x, a) = E[v(a) | x] = s_hat(a) + (pi_ref(a) / pi_hat(a)) (u(a) - s_hat(a))`` (P, K), with ``s_hat(a)
    = sum_b pi_ref(b) gbar_hat(a, b)`` and ``u`` the same with ``g*``; ``g_hat``/``pi_hat`` None are the true
    ``g*``/``pi_ref``. It equals ``u`` when either model is right."""
    g, pi = _population_models(pop, g_hat, pi_hat)
    order_avg = lambda m: 0.5 * (m + 1.0 - np.swapaxes(m, -1, -2))  # noqa: E731
    s_hat = np.einsum("pab,pb->pa", order_avg(g), pop.pi)
    u = np.einsum("pab,pb->pa", order_avg(pop.g_star), pop.pi)
    ratio = np.divide(pop.pi, pi, out=np.zeros_like(pi), where=pi > 0)
    return s_hat + ratio * (u - s_hat)


@dataclass(frozen=True)
class DRPOTarget:
    """``drpo_target``'s result: the limit ``theta`` (d,), the asymptotic covariance ``cov = A^-1 B A^-1`` (d, d)
    of ``sqrt(n)(theta_hat - theta)``, ``A`` and ``B``, the limit policy ``policy`` (P, K) (``pi_theta``), its
    true win rate ``win_rate`` over ``pi_ref`` and the win rate ``win_rate_estimated`` that DRPO's estimate of it
    converges to (equal when either model is right), and ``utility_hat`` = ``ubar`` (P, K)."""

    theta: np.ndarray
    cov: np.ndarray
    A: np.ndarray
    B: np.ndarray
    policy: np.ndarray
    win_rate: float
    win_rate_estimated: float
    utility_hat: np.ndarray
    beta: float


def drpo_target(pop: PairPopulation, beta: float, g_hat: np.ndarray | None = None, pi_hat: np.ndarray | None = None,
                *, tol: float = 1e-11, max_iter: int = 200) -> DRPOTarget:
    r"""The limit of ``fit_drpo`` on data drawn from ``pop`` (prompts uniform over its ``P`` rows, pairs from
    ``pop.pi``, labels ``Bernoulli(g*)``) with the models ``g_hat`` (P, K, K) and ``pi_hat`` (P, K) (None: the
    true ones): ``theta = argmax E_x[sum_a pi_theta(a|x) ubar(x, a) - beta KL(pi_theta || pi_hat)]`` from 0, and
    the exact sandwich. ``B = E[grad f grad f^T]`` sums, on each prompt, over the pairs ``(y, y')`` and both
    labels: with ``m_a = (g_hat(a, y') + 1 - g_hat(y, a)) / 2``, ``delta = e_y / pi_hat(y) - e_y' / pi_hat(y')``,
    ``mu = g*(y, y') - g_hat(y, y')``, ``E[e^2] = g*(1 - g*) + mu^2`` and ``C = diag(w) phi~``,
    ``beta^2 E[grad f grad f^T | y, y'] = q q^T + (mu / 2)(q s^T + s q^T) + (E[e^2] / 4) s s^T``,
    ``q = C^T (m - phi theta)``, ``s = C^T delta``.
    """
    b = _check_beta(beta, weight=True)
    g, pi = _population_models(pop, g_hat, pi_hat)
    ubar = expected_pseudo_rewards(pop, g_hat, pi_hat)
    log_pi = _log_ref(pi)[1]
    P, K, d = pop.phi.shape
    gtol, max_iter = _gradient_tolerance(tol, max_iter, pop.phi)
    theta, converged, _ = _maximise(pop.phi, log_pi, ubar, b, gtol, max_iter)
    if not converged:
        raise InputError(f"drpo_target: no locally concave maximiser found from theta = 0 (|grad| tolerance {gtol:.3g}"
                         f", beta = {b}); the population objective may be flat or unbounded in some direction")
    _, grad, w, centred, curve = _row_terms(theta, pop.phi, log_pi, ubar, b)
    A = -_curvature(curve, centred)
    C = w[..., None] * centred  # (P, K, d)
    m = 0.5 * (np.swapaxes(g, 1, 2)[:, None, :, :] + 1.0 - g[:, :, None, :])  # m[p, y, y', a]
    q = np.einsum("pyza,pad->pyzd", m - (pop.phi @ theta)[:, None, None, :], C)
    inv = np.divide(1.0, pi, out=np.zeros_like(pi), where=pi > 0)
    Cs = C * inv[..., None]  # rows C_a / pi_hat(a)
    s = Cs[:, :, None, :] - Cs[:, None, :, :]  # s[p, y, y'] = C_y / pi_hat(y) - C_y' / pi_hat(y')
    mu = pop.g_star - g
    e2 = pop.g_star * (1.0 - pop.g_star) + mu**2
    prob = pop.pi[:, :, None] * pop.pi[:, None, :]
    B = (np.einsum("pyz,pyzd,pyze->de", prob, q, q)
         + np.einsum("pyz,pyzd,pyze->de", prob * mu / 2.0, q, s) + np.einsum("pyz,pyzd,pyze->de", prob * mu / 2.0, s, q)
         + np.einsum("pyz,pyzd,pyze->de", prob * e2 / 4.0, s, s)) / (P * b**2)
    Ainv = np.linalg.inv(A)
    return DRPOTarget(theta=theta, cov=Ainv @ B @ Ainv, A=A, B=B, policy=w,
                      win_rate=float(win_rate(w, pop).mean), win_rate_estimated=float(_win_rate(w, ubar)),
                      utility_hat=ubar, beta=b)


# --- sampled responses (language models) --------------------------------------------------------------


@dataclass(frozen=True)
class DRPOSampledLoss:
    """``drpo_sampled_loss``'s result. ``loss`` is the scalar to minimise; per row (B,), without gradient: the
    estimates ``objective = win_rate - beta kl`` of ``f_i``, ``win_rate = direct + correction`` of ``P(pi_theta >
    pi_ref)``, ``kl`` of ``KL(pi_theta || pi_hat)``; ``ratio`` (B, 2) the importance ratios ``pi_theta / pi_hat``
    of ``(y, y')`` before capping and ``clipped`` (B, 2) whether each reached the cap."""

    loss: Tensor
    objective: Tensor
    win_rate: Tensor
    direct: Tensor
    correction: Tensor
    kl: Tensor
    ratio: Tensor
    clipped: Tensor


def _finite_tensor(name: str, values: Tensor, shape: tuple[int, ...], probability: bool = False) -> None:
    """``values`` of ``shape``, finite (and in [0, 1] for a ``probability``), else an ``InputError`` naming the row."""
    if not isinstance(values, Tensor):
        raise InputError(f"{name}: expected a tensor, got {type(values).__name__}")
    if tuple(values.shape) != shape:
        raise InputError(f"{name}: expected shape {shape}, got {tuple(values.shape)}")
    v = values.detach()
    bad = ~torch.isfinite(v) | ((v < 0) | (v > 1) if probability else torch.zeros_like(v, dtype=torch.bool))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        what = "a probability in [0, 1]" if probability else "finite"
        raise InputError(f"{name}: row {idx[0]}{f', entry {idx[1:]}' if len(idx) > 1 else ''} is "
                         f"{float(v[idx])!r}, but must be {what}")


def check_ratio_clip(ratio_clip: object) -> None:
    """``ratio_clip`` is None or a number >= 1 (a cap below 1 would cut the ratios of unchanged responses)."""
    if ratio_clip is not None and not (isinstance(ratio_clip, (int, float)) and not isinstance(ratio_clip, bool)
                                       and ratio_clip >= 1):
        raise InputError(f"ratio_clip: None or a number >= 1 (a cap below 1 would cut the ratios of unchanged "
                         f"responses), got {ratio_clip!r}")


def drpo_sampled_loss(
    logp_samples: Tensor, ref_logp_samples: Tensor, g_sample_vs_second: Tensor, g_first_vs_sample: Tensor,
    logp_pair: Tensor, ref_logp_pair: Tensor, g_pair: Tensor, z: Tensor, beta: float,
    ratio_clip: float | None = None,
) -> DRPOSampledLoss:
    r"""DRPO's loss for a policy known through ``S`` draws per row (a language model), on ``B`` rows.

    Inputs per row ``i``: ``logp_samples``, ``ref_logp_samples`` (B, S) ``log pi_theta(a_s)`` (with gradient) and
    ``log pi_hat(a_s)`` of the draws ``a_s ~ pi_theta(.|x_i)``; ``g_sample_vs_second = g_hat(a_s, y')`` and
    ``g_first_vs_sample = g_hat(y, a_s)`` (B, S); ``logp_pair``, ``ref_logp_pair`` (B, 2) the same log-probs of
    the observed pair ``(y, y')``; ``g_pair = g_hat(y, y')`` and ``z = P(y beat y')`` (B,) (1 for a chosen /
    rejected row). With ``d_s = [g_hat(a_s, y') + 1 - g_hat(y, a_s)] / 2``, ``k_s = log pi_theta(a_s) - log
    pi_hat(a_s)``, ``r_s = d_s - beta k_s``, the leave-one-out advantage ``A_s = r_s - mean_{t != s} r_t``
    (``A_s = r_s`` when ``S = 1``), ``e = z - g_hat(y, y')``, the ratios ``rho = exp(log pi_theta - log pi_hat)``
    of ``y`` and ``y'`` and their weights ``w = rho 1{rho < c}`` (stop-gradient; ``c = ratio_clip``, infinite when
    None),

    .. math::
        loss = -\frac1B \sum_i \Big[\frac1S \sum_s A_s \log\pi_\theta(a_s)
               + \frac{e_i}2 \big(w(y_i) \log\pi_\theta(y_i) - w(y'_i) \log\pi_\theta(y'_i)\big)\Big].

    Its gradient's expectation over the draws is ``-(1/B) sum_i grad f_i`` with ``f_i = sum_a pi_theta(a) v_i(a) -
    beta KL(pi_theta || pi_hat)`` of the module docstring (``E[A_s grad log pi(a_s)] = E[r(a) grad log pi(a)]``
    and ``grad KL = E[k(a) grad log pi(a)]``), exactly when ``c`` is infinite. A finite ``c`` caps each ratio in the
    objective at ``c``, ``(e/2)(min(rho(y), c) - min(rho(y'), c))``, whose gradient ``w`` vanishes beyond the cap: a
    sequence's ratio can grow as ``1 / pi_hat(y)``, and a language model can raise ``pi_theta(y)`` of one prompt's
    response without bound, so uncapped the correction term rewards memorising ``y``; the cap bounds it, at the
    price of a bias towards the direct term. The estimates: ``direct = mean_s d_s``, ``correction = (e/2)(min(rho(y),
    c) - min(rho(y'), c))``, ``kl = mean_s k_s``.
    """
    if not isinstance(logp_samples, Tensor) or logp_samples.ndim != 2 or min(logp_samples.shape) < 1:
        raise InputError("logp_samples: expected a (B, S) tensor with B, S >= 1, got "
                         f"{tuple(getattr(logp_samples, 'shape', ())) or type(logp_samples).__name__}")
    B, S = logp_samples.shape
    _finite_tensor("logp_samples", logp_samples, (B, S))
    _finite_tensor("ref_logp_samples", ref_logp_samples, (B, S))
    _finite_tensor("g_sample_vs_second", g_sample_vs_second, (B, S), probability=True)
    _finite_tensor("g_first_vs_sample", g_first_vs_sample, (B, S), probability=True)
    _finite_tensor("logp_pair", logp_pair, (B, 2))
    _finite_tensor("ref_logp_pair", ref_logp_pair, (B, 2))
    _finite_tensor("g_pair", g_pair, (B,), probability=True)
    _finite_tensor("z", z, (B,), probability=True)
    b = _check_beta(beta, weight=True)
    check_ratio_clip(ratio_clip)
    f64 = dict(dtype=torch.float64, device=logp_samples.device)
    with torch.no_grad():
        d = 0.5 * (g_sample_vs_second.to(**f64) + 1.0 - g_first_vs_sample.to(**f64))
        k = logp_samples.detach().to(**f64) - ref_logp_samples.to(**f64)
        r = d - b * k
        adv = r - (r.sum(1, keepdim=True) - r) / (S - 1) if S > 1 else r
        log_ratio = logp_pair.detach().to(**f64) - ref_logp_pair.to(**f64)
        ratio = torch.exp(log_ratio)
        if not torch.isfinite(ratio).all():
            row = int((~torch.isfinite(ratio)).any(1).nonzero()[0])
            raise InputError(f"row {row}: the importance ratio pi_theta / pi_hat of the observed pair overflows "
                             f"(log ratio {float(log_ratio[row].max()):.4g}); pi_hat is far from the policy: set "
                             "ratio_clip")
        clipped = ratio >= ratio_clip if ratio_clip is not None else torch.zeros_like(ratio, dtype=torch.bool)
        weight = torch.where(clipped, 0.0, ratio)
        capped = torch.where(clipped, float(ratio_clip or 0.0), ratio)
        half_e = 0.5 * (z.to(**f64) - g_pair.to(**f64))
        direct = d.mean(1)
        correction = half_e * (capped[:, 0] - capped[:, 1])
        kl = k.mean(1)
        win = direct + correction
    sampled = (adv * logp_samples).mean(1)
    weighted = half_e * (weight[:, 0] * logp_pair[:, 0] - weight[:, 1] * logp_pair[:, 1])
    loss = -(sampled + weighted).mean()
    return DRPOSampledLoss(loss=loss, objective=win - b * kl, win_rate=win, direct=direct, correction=correction,
                           kl=kl, ratio=ratio, clipped=clipped)
