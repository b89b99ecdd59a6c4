r"""Policies from a reward estimate, their values, regret, the preference gap and the pessimistic policy.

A finite-response population (``PairPopulation``, DESIGN.md 3.5) has ``P`` prompt draws ``x_p`` with ``K``
responses, features ``phi(x, a)`` in R^d, a reference policy ``pi_ref`` and a true utility ``U(x, a)`` (or
none). A *policy* is a ``(P, K)`` array of probabilities whose rows sum to one; every function also takes a
leading batch axis ``(R, P, K)``, and a reward estimate ``theta`` may be ``(d,)`` or a batch ``(R, d)``.

Every population quantity is an average over the ``P`` prompts, ``E_x f(x) ~ (1/P) sum_p f(x_p)``; it is
returned as ``PromptMean(mean, se)`` with the Monte Carlo standard error ``sd_p f(x_p) / sqrt(P)`` of that
average as an estimate of the expectation over the prompt law (``se`` is NaN when ``P = 1``).

Formulas
--------
* reward ``r_theta(x, a) = theta . phi(x, a)``;
* greedy ``pi(a|x) = 1{a in A(x)} / |A(x)|`` with ``A(x) = argmax_a r_theta(x, a)`` (ties split evenly);
* KL-regularised ``pi(a|x) = pi_ref(a|x) exp(r_theta(x,a)/beta) / sum_b pi_ref(b|x) exp(r_theta(x,b)/beta)``;
* value ``J(pi) = E_x sum_a pi(a|x) U(x, a)`` and ``J_beta(pi) = J(pi) - beta E_x KL(pi(.|x) || pi_ref(.|x))``;
* regret ``J(pi_opt) - J(pi)`` with ``pi_opt`` greedy in ``U``, ``= E_x sum_a pi(a|x) (max_b U(x,b) - U(x,a))``;
  KL regret ``J_beta(pi*_beta) - J_beta(pi) = beta E_x KL(pi(.|x) || pi*_beta(.|x))`` with
  ``pi*_beta ~ pi_ref exp(U / beta)`` (the Gibbs variational identity; both are >= 0 prompt by prompt);
* preferences: order-averaged ``gbar(a, b) = (g*(a, b) + 1 - g*(b, a)) / 2``, win rate
  ``P(pi > pi_ref) = E_x sum_ab pi(a|x) pi_ref(b|x) gbar(a, b) = E_x sum_a pi(a|x) u(x, a)`` with the
  preference utility ``u(x, a) = sum_b pi_ref(b|x) gbar(a, b)``. ``P(pi > pi_ref)`` is linear in each
  ``pi(.|x)``, so its maximum is the best response ``argmax_a u(x, a)`` and the preference gap is the greedy
  regret under ``u``;
* pessimistic policy (Zhu, Jordan and Jiao 2023): ``argmax_pi min_{theta in C} theta . w(pi)`` over the
  ellipsoid ``C = {(theta - theta_hat)^T cov^-1 (theta - theta_hat) <= gamma^2}``, i.e.
  ``argmax_pi theta_hat . w(pi) - gamma ||cov^{1/2} w(pi)||`` with ``w(pi) = E_x phi(x, pi) - v`` and
  ``phi(x, pi) = sum_a pi(a|x) phi(x, a)``; a second-order cone program.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import warnings
from typing import NamedTuple

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats

from . import kernels
from .data import PairPopulation, _as_float, check_probability, failure_probability
from .errors import InputError

__all__ = [
    "PromptMean",
    "rewards",
    "greedy_policy",
    "kl_policy",
    "policy_from_theta",
    "optimal_policy",
    "value",
    "kl_divergence",
    "kl_value",
    "regret",
    "theta_regret",
    "order_averaged_preference",
    "preference_utility",
    "win_rate",
    "best_response",
    "preference_gap",
    "confidence_radius",
    "policy_features",
    "lower_confidence_value",
    "pessimistic_policy",
    "POLICY_KINDS",
    "REGRET_MEASURES",
]

#: policy classes built from a reward estimate
POLICY_KINDS = ("greedy", "kl")
#: ``value``: greedy-class regret under ``U``; ``kl``: KL-regularised regret; ``preference``: preference gap
REGRET_MEASURES = ("value", "kl", "preference")

# Rewards within TIE_RTOL * max_a |reward| of the maximum count as tied (greedy and best response): relative to
# the rewards' own size, so the argmax does not change when theta is scaled by a positive factor.
TIE_RTOL = 1e-12


class PromptMean(NamedTuple):
    """An average over prompts ``mean = (1/P) sum_p f(x_p)`` and its Monte Carlo error ``sd_p / sqrt(P)``."""

    mean: np.ndarray | float
    se: np.ndarray | float


# ----------------------------------------------------------------------------------------------- checks


def _finite(name: str, arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name}: entry {idx} is {arr[idx]!r}; all values must be finite")


def _check_phi(phi: object) -> np.ndarray:
    arr = _as_float("phi", phi)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise InputError(f"phi: expected a non-empty (P, K, d) array, got shape {arr.shape}")
    _finite("phi", arr)
    return arr


def _check_theta(theta: object, d: int, name: str = "theta") -> tuple[np.ndarray, bool]:
    """``theta`` as ``(R, d)`` and whether it was given as a batch."""
    arr = _as_float(name, theta)
    if arr.ndim == 1:
        arr, batched = arr[None, :], False
    elif arr.ndim == 2:
        batched = True
    else:
        raise InputError(f"{name}: expected shape (d,) or (R, d), got {arr.shape}")
    if arr.shape[1] != d:
        raise InputError(f"{name}: has {arr.shape[1]} coordinates but the features have d={d}")
    _finite(name, arr)
    return arr, batched


def _check_table(name: str, values: object, P: int, K: int) -> np.ndarray:
    """A finite ``(P, K)`` table such as a utility."""
    arr = _as_float(name, values)
    if arr.shape != (P, K):
        raise InputError(f"{name}: expected shape {(P, K)}, got {arr.shape}")
    _finite(name, arr)
    return arr


def _check_distribution(name: str, values: object, K: int | None = None, P: int | None = None) -> np.ndarray:
    """A policy-like array ``(..., P, K)`` of probabilities whose rows sum to one."""
    arr = _as_float(name, values)
    if arr.ndim < 2:
        raise InputError(f"{name}: expected a (P, K) or (R, P, K) array, got shape {arr.shape}")
    if K is not None and arr.shape[-1] != K:
        raise InputError(f"{name}: has {arr.shape[-1]} responses per prompt, expected K={K}")
    if P is not None and arr.shape[-2] != P:
        raise InputError(f"{name}: has {arr.shape[-2]} prompts, expected P={P}")
    check_probability(name, arr)
    sums = arr.sum(axis=-1)
    bad = np.abs(sums - 1.0) > 1e-8
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name}: row {idx} sums to {sums[idx]!r}; each prompt's probabilities must sum to 1")
    return arr


def _check_beta(beta: object, weight: bool = False) -> float:
    """``beta > 0``; ``inf`` only for a policy (``pi_ref``), not as the ``weight`` of a value or regret."""
    try:
        b = float(beta)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"beta: must be a positive number, got {beta!r}") from None
    if not b > 0:  # also rejects NaN
        raise InputError(f"beta: the KL weight must be > 0, got {beta!r}")
    if weight and np.isinf(b):
        raise InputError("beta: a KL-regularised value or regret needs a finite weight (beta = inf weighs a KL of 0 "
                         "by infinity); use the greedy measure, or a finite beta")
    return b


def _unbatch(arr: np.ndarray, batched: bool) -> np.ndarray:
    return arr if batched else arr[0]


def _prompt_mean(per_prompt: np.ndarray) -> PromptMean:
    """Mean over the last (prompt) axis and its standard error ``sd(ddof=1) / sqrt(P)``.

    A row with an infinite value (a KL regret outside the reference support) has that infinite mean and
    a NaN standard error.
    """
    vals = np.asarray(per_prompt, dtype=np.float64)
    P = vals.shape[-1]
    finite = np.isfinite(vals).all(axis=-1)
    with np.errstate(invalid="ignore"):
        mean = vals.mean(axis=-1)
    safe = np.where(finite[..., None], vals, 0.0)
    if P > 1:
        se = np.where(finite, safe.std(axis=-1, ddof=1) / np.sqrt(P), np.nan)
    else:
        se = np.full(mean.shape, np.nan)
    if mean.ndim == 0:
        return PromptMean(float(mean), float(se))
    return PromptMean(mean, se)


def _utility_target(target: object, pi_ref: object | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(utility, pi_ref)`` from a ``PairPopulation`` (its ``pi`` is the default reference) or a table."""
    if isinstance(target, PairPopulation):
        if target.utility is None:
            raise InputError(
                "population.utility is None: the preferences have no utility; use preference_gap / "
                "measure='preference'"
            )
        ref = target.pi if pi_ref is None else _check_distribution("pi_ref", pi_ref, target.K, target.size)
        return target.utility, ref
    util = _as_float("utility", target)
    if util.ndim != 2:
        raise InputError(f"utility: expected a (P, K) array, got shape {util.shape}")
    _finite("utility", util)
    ref = None if pi_ref is None else _check_distribution("pi_ref", pi_ref, util.shape[1], util.shape[0])
    if ref is not None and ref.ndim != 2:
        raise InputError(f"pi_ref: expected shape (P, K), got {ref.shape}")
    return util, ref


# ---------------------------------------------------------------------------------------------- policies


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A float64 torch view of ``a`` (a copy only if it is not contiguous float64). The (R, P, K) tables of
    the policies are reduced over their short last axis in torch: numpy's reductions over an axis of a
    few entries take about ten times longer."""
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _rewards(th: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """``theta_r . phi(x_p, a)`` (R, P, K) for checked ``th`` (R, d) and ``ph`` (P, K, d), one matrix product."""
    P, K, d = ph.shape
    return (th @ ph.reshape(P * K, d).T).reshape(th.shape[0], P, K)


def rewards(theta: object, phi: object) -> np.ndarray:
    """Linear rewards ``r_theta(x_p, a) = theta . phi(x_p, a)``: ``(P, K)``, or ``(R, P, K)`` for a batch."""
    ph = _check_phi(phi)
    th, batched = _check_theta(theta, ph.shape[2])
    return _unbatch(_rewards(th, ph), batched)


def _argmax_policy(values: np.ndarray) -> np.ndarray:
    """Uniform over ``argmax_a values[..., a]``, ties within ``TIE_RTOL * max_a |values|`` split evenly."""
    v = _tensor(values)
    top = v.amax(dim=-1, keepdim=True)
    tied = (v >= top - TIE_RTOL * v.abs().amax(dim=-1, keepdim=True)).to(v.dtype)
    return (tied / tied.sum(dim=-1, keepdim=True)).numpy()


def _log_ref(pi_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(support mask, log pi_ref)`` with ``log pi_ref = -inf`` off the support, without warnings."""
    mask = pi_ref > 0
    return mask, np.where(mask, np.log(np.where(mask, pi_ref, 1.0)), -np.inf)


def _gibbs(values: np.ndarray, pi_ref: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``pi ~ pi_ref exp(values / beta)`` by a max-shifted softmax, and ``log pi`` (``-inf`` off support)."""
    with np.errstate(over="ignore"):
        top = float(np.abs(values).max(initial=0.0)) / beta
    if not math.isfinite(top):
        raise InputError(f"rewards / beta overflow (largest |reward| {float(np.abs(values).max()):.3g}, beta = "
                         f"{beta!r}): use a larger beta or the greedy policy")
    logits = _tensor(_log_ref(pi_ref)[1]) + _tensor(values) / beta
    logits = logits - logits.amax(dim=-1, keepdim=True)  # each row has support, so the max is finite
    weights = logits.exp()
    total = weights.sum(dim=-1, keepdim=True)
    return (weights / total).numpy(), (logits - total.log()).numpy()


def _check_reward_scale(th: np.ndarray, ph: np.ndarray, beta: float | None) -> None:
    """Rewards ``theta . phi`` (over ``beta``, for a KL policy) that cannot overflow: ``|theta . phi| <=
    ||theta|| ||phi||`` (Cauchy-Schwarz, which bounds every partial sum too)."""
    with np.errstate(over="ignore"):
        top = float(np.linalg.norm(th, axis=-1).max()) * float(np.linalg.norm(ph, axis=-1).max())
        if beta is not None and not math.isinf(beta):
            top /= beta
    if not math.isfinite(top):
        scaled = " / beta" if beta is not None and not math.isinf(beta) else ""
        raise InputError(f"theta: the rewards theta . phi{scaled} can overflow (largest |theta| entry "
                         f"{float(np.abs(th).max()):.3g}, largest |phi| entry {float(np.abs(ph).max()):.3g}, beta = "
                         f"{beta!r}); rescale theta" + (" or use the greedy policy" if scaled else ""))


def _policy(th: np.ndarray, ph: np.ndarray, kind: str, pi_ref: np.ndarray | None, beta: float | None) -> np.ndarray:
    """The ``kind`` policy (R, P, K) of checked ``th`` (R, d) on checked ``ph`` (P, K, d)."""
    _check_reward_scale(th, ph, beta if kind == "kl" else None)
    r = _rewards(th, ph)
    return _argmax_policy(r) if kind == "greedy" else _gibbs(r, pi_ref, beta)[0]


def greedy_policy(theta: object, phi: object) -> np.ndarray:
    """Greedy policy ``argmax_a theta . phi(x, a)`` on each prompt, ties split evenly (deterministic).

    Returns ``(P, K)``, or ``(R, P, K)`` for ``theta`` of shape ``(R, d)``.
    """
    ph = _check_phi(phi)
    th, batched = _check_theta(theta, ph.shape[2])
    return _unbatch(_policy(th, ph, "greedy", None, None), batched)


def kl_policy(theta: object, phi: object, pi_ref: object, beta: float) -> np.ndarray:
    """KL-regularised policy ``pi(a|x) = pi_ref(a|x) exp(theta . phi(x,a) / beta) / Z(x)`` (stable softmax).

    ``beta`` in ``(0, inf]``; ``beta = inf`` gives ``pi_ref``. Responses outside the support of ``pi_ref``
    get probability 0. As ``beta -> 0`` it tends to the greedy policy restricted to that support.
    """
    ph = _check_phi(phi)
    P, K, _ = ph.shape
    ref = _check_distribution("pi_ref", pi_ref, K, P)
    if ref.ndim != 2:
        raise InputError(f"pi_ref: expected shape {(P, K)}, got {ref.shape}")
    b = _check_beta(beta)
    th, batched = _check_theta(theta, ph.shape[2])
    return _unbatch(_policy(th, ph, "kl", ref, b), batched)


def policy_from_theta(
    theta: object, phi: object, kind: str = "greedy", pi_ref: object | None = None, beta: float | None = None
) -> np.ndarray:
    """``greedy_policy`` (``kind='greedy'``) or ``kl_policy`` (``kind='kl'``, needs ``pi_ref`` and ``beta``)."""
    _check_kind(kind, pi_ref, beta)
    return greedy_policy(theta, phi) if kind == "greedy" else kl_policy(theta, phi, pi_ref, beta)


def _check_kind(kind: str, pi_ref: object | None, beta: float | None) -> None:
    if kind not in POLICY_KINDS:
        raise InputError(f"kind: unknown policy class {kind!r}; allowed: {', '.join(POLICY_KINDS)}")
    if kind == "kl" and (pi_ref is None or beta is None):
        raise InputError("kind='kl': the KL policy needs pi_ref and beta")


def optimal_policy(target: object, beta: float | None = None, pi_ref: object | None = None) -> np.ndarray:
    """The optimal policy under the true utility ``U`` in the class of the estimate.

    ``beta=None``: greedy ``argmax_a U(x, a)`` (ties split evenly), the maximiser of ``J``.
    ``beta > 0``: ``pi*_beta ~ pi_ref exp(U / beta)``, the maximiser of ``J_beta``.
    ``target`` is a ``PairPopulation`` (utility and default ``pi_ref`` from it) or a ``(P, K)`` utility.
    """
    util, ref = _utility_target(target, pi_ref)
    if beta is None:
        return _argmax_policy(util)
    if ref is None:
        raise InputError("optimal_policy with beta: pi_ref is needed")
    return _gibbs(util, ref, _check_beta(beta))[0]


# ------------------------------------------------------------------------------------ values and regret


def value(policy: object, utility: object) -> PromptMean:
    """``J(pi) = E_x sum_a pi(a|x) U(x, a)``; ``utility`` is a ``(P, K)`` table or a ``PairPopulation``."""
    util, _ = _utility_target(utility, None)
    pol = _check_distribution("policy", policy, util.shape[1], util.shape[0])
    return _prompt_mean((pol * util).sum(axis=-1))


def _kl_rows(pol: np.ndarray, log_other: np.ndarray) -> np.ndarray:
    """``sum_a pi(a) (log pi(a) - log q(a))`` per row, with ``0 log 0 = 0`` and ``inf`` off q's support.

    Summed as ``sum_{pi > 0} pi (r + e^{-r} - 1) + sum_{pi = 0} q`` with ``r = log pi - log q`` (equal, as
    ``sum_{pi > 0} pi e^{-r} = sum_{pi > 0} q``): every term is >= 0, so a ``pi`` close to ``q`` keeps the KL's
    relative precision, where ``sum pi r`` adds terms of order ``r`` to a total of order ``r^2`` (a KL policy's
    regret kept about 3 significant digits that way at ``beta = 1e6``, none at ``1e8``)."""
    p, other = _tensor(pol), _tensor(log_other)
    inside = torch.isfinite(other)
    outside = ((p > 0) & ~inside).any(dim=-1)
    on = (p > 0) & inside
    q = torch.where(inside, other, -torch.inf).exp()
    r = torch.where(on, torch.log(torch.where(on, p, 1.0)) - torch.where(inside, other, 0.0), 0.0)
    # e^-r overflows only where r < -700; there pi e^-r = q is taken instead
    terms = torch.where(r > -700.0, p * (r + torch.expm1(-r)), p * r + q - p)
    terms = torch.where(on, terms, torch.where(inside & (p == 0), q, 0.0))
    # a KL divergence is >= 0; rounding can leave -1e-17 when pi == q
    return torch.where(outside, torch.inf, terms.sum(dim=-1).clamp_min(0.0)).numpy()


def kl_divergence(policy: object, pi_ref: object) -> np.ndarray:
    """Per-prompt ``KL(pi(.|x) || pi_ref(.|x))``: shape ``(..., P)``; ``inf`` if ``pi`` leaves the support."""
    ref = _check_distribution("pi_ref", pi_ref)
    if ref.ndim != 2:
        raise InputError(f"pi_ref: expected a (P, K) array, got shape {ref.shape}")
    pol = _check_distribution("policy", policy, ref.shape[1], ref.shape[0])
    return _kl_rows(pol, _log_ref(ref)[1])


def kl_value(policy: object, utility: object, pi_ref: object | None, beta: float) -> PromptMean:
    """``J_beta(pi) = E_x [sum_a pi(a|x) U(x, a) - beta KL(pi(.|x) || pi_ref(.|x))]``."""
    util, ref = _utility_target(utility, pi_ref)
    if ref is None:
        raise InputError("kl_value: pi_ref is needed")
    b = _check_beta(beta, weight=True)
    pol = _check_distribution("policy", policy, util.shape[1], util.shape[0])
    kl = _kl_rows(pol, _log_ref(ref)[1])
    return _prompt_mean((pol * util).sum(axis=-1) - b * kl)


def _regret_target(util: np.ndarray, ref: np.ndarray | None, beta: float | None) -> torch.Tensor:
    """What a policy's regret compares it with: the gaps ``max_b U - U(a)`` (``beta=None``; >= 0
    entrywise, so the regret is >= 0 exactly) or ``log pi*_beta``."""
    if beta is None:
        return _tensor(util.max(axis=-1, keepdims=True) - util)
    assert ref is not None
    return _tensor(_gibbs(util, ref, beta)[1])


def _regret_rows(pol: np.ndarray, target: torch.Tensor, beta: float | None) -> np.ndarray:
    """Per-prompt regret: ``sum_a pi(a)(max U - U(a))`` or ``beta KL(pi || pi*_beta)`` (``target`` from
    ``_regret_target``)."""
    if beta is None:
        return (_tensor(pol) * target).sum(dim=-1).numpy()
    return beta * _kl_rows(pol, target)


def regret(policy: object, target: object, *, beta: float | None = None, pi_ref: object | None = None) -> PromptMean:
    """Regret of ``policy`` against the optimal policy of its class under the true utility.

    ``beta=None``: ``J(pi_opt) - J(pi) = E_x sum_a pi(a|x) (max_b U(x, b) - U(x, a))``.
    ``beta > 0``: ``J_beta(pi*_beta) - J_beta(pi) = beta E_x KL(pi || pi*_beta)`` (``inf`` if ``pi`` puts
    mass outside the support of ``pi_ref``). ``target``: ``PairPopulation`` or ``(P, K)`` utility.
    """
    util, ref = _utility_target(target, pi_ref)
    pol = _check_distribution("policy", policy, util.shape[1], util.shape[0])
    if beta is not None:
        if ref is None:
            raise InputError("regret with beta: pi_ref is needed")
        beta = _check_beta(beta, weight=True)
    return _prompt_mean(_regret_rows(pol, _regret_target(util, ref, beta), beta))


#: Entries of the (replications, prompts, responses) tables ``theta_regret`` forms at once.
_REGRET_CHUNK = 2**16


def _default_measure(pop: PairPopulation, kind: str, measure: str | None) -> str:
    if measure is None:
        if pop.utility is None:
            return "preference"
        return "kl" if kind == "kl" else "value"
    if measure not in REGRET_MEASURES:
        raise InputError(f"measure: unknown regret measure {measure!r}; allowed: {', '.join(REGRET_MEASURES)}")
    return measure


def theta_regret(
    theta: object,
    population: PairPopulation,
    *,
    kind: str = "greedy",
    beta: float | None = None,
    measure: str | None = None,
) -> PromptMean:
    """Regret of the policy built from ``theta`` (``(d,)`` or ``(R, d)``) on ``population``.

    ``kind``: ``greedy`` or ``kl`` (with ``beta``; the reference is ``population.pi``). ``measure``:
    ``value`` (``J(argmax U) - J(pi_theta)``), ``kl`` (``J_beta`` regret, needs ``beta``) or
    ``preference`` (the preference gap). Default: ``kl`` for a KL policy, ``value`` for greedy, and
    ``preference`` when the population has no utility. Computed by ``kernels.policy_regret`` when the
    compiled kernels are built (no ``(R, P, K)`` tables), else by the policies' torch tables; the two
    agree to rounding.
    """
    if not isinstance(population, PairPopulation):
        raise InputError(f"population: expected a PairPopulation, got {type(population).__name__}")
    th, batched = _check_theta(theta, population.d)
    meas = _default_measure(population, kind, measure)
    beta_ = None if beta is None else _check_beta(beta)  # checked where unused too
    ref, b = None, None
    if meas == "preference":
        util = preference_utility(population)
    elif population.utility is None:
        raise InputError(f"measure={meas!r} needs population.utility, which is None")
    else:
        util = population.utility
    if meas == "kl":
        if beta is None:
            raise InputError("measure='kl': the KL-regularised regret needs beta")
        ref, b = population.pi, _check_beta(beta_, weight=True)
    _check_kind(kind, population.pi, beta)
    pol_beta = beta_ if kind == "kl" else None
    _check_reward_scale(th, population.phi, pol_beta)  # the policy's rewards first: theta is what the user passed
    target = _regret_target(util, ref, b)
    if kernels.available():
        support = torch.isfinite(target) if b is not None else None
        per = kernels.policy_regret(
            _tensor(th), _tensor(population.phi), target,
            tie=TIE_RTOL, pi_ref=_tensor(population.pi) if pol_beta is not None else None, policy_beta=pol_beta,
            opt_support=support, measure_beta=b).numpy()
        return _prompt_mean(_unbatch(per, batched))
    # replications in chunks whose (r, P, K) tables stay in cache (fresh multi-megabyte temporaries are
    # paid in page faults): 3 x faster for 500 draws on 1000 prompts
    step = max(1, _REGRET_CHUNK // (population.size * population.K))
    per = np.concatenate([_regret_rows(_policy(th[s:s + step], population.phi, kind, population.pi, pol_beta), target, b)
                          for s in range(0, th.shape[0], step)])
    return _prompt_mean(_unbatch(per, batched))


# ---------------------------------------------------------------------------------------------- preferences


def order_averaged_preference(g_star: object) -> np.ndarray:
    """``gbar(a, b) = (g*(a, b) + 1 - g*(b, a)) / 2`` over the last two axes (``gbar(a, a) = 1/2``)."""
    g = _as_float("g_star", g_star)
    if g.ndim < 2 or g.shape[-1] != g.shape[-2]:
        raise InputError(f"g_star: expected (..., K, K), got shape {g.shape}")
    check_probability("g_star", g)
    return 0.5 * (g + 1.0 - np.swapaxes(g, -1, -2))


def _against(population: PairPopulation, against: object | None) -> np.ndarray:
    if against is None:
        return population.pi
    ag = _check_distribution("against", against, population.K, population.size)
    if ag.ndim != 2:
        raise InputError(f"against: expected shape {(population.size, population.K)}, got {ag.shape}")
    return ag


def preference_utility(population: PairPopulation, against: object | None = None) -> np.ndarray:
    """``u(x, a) = sum_b against(b|x) gbar(x, a, b)``, the win probability of ``a`` over a draw of ``against``.

    ``against`` defaults to ``population.pi`` (``pi_ref``). Shape ``(P, K)``.
    """
    if not isinstance(population, PairPopulation):
        raise InputError(f"population: expected a PairPopulation, got {type(population).__name__}")
    gbar = order_averaged_preference(population.g_star)
    return np.einsum("pab,pb->pa", gbar, _against(population, against))


def win_rate(policy: object, population: PairPopulation, against: object | None = None) -> PromptMean:
    """``P(pi > against) = E_x sum_ab pi(a|x) against(b|x) gbar(x, a, b)`` (``against`` default ``pi_ref``)."""
    u = preference_utility(population, against)
    pol = _check_distribution("policy", policy, population.K, population.size)
    return _prompt_mean((pol * u).sum(axis=-1))


def best_response(population: PairPopulation, against: object | None = None) -> np.ndarray:
    """The maximiser of ``P(pi > against)``: ``argmax_a u(x, a)`` on each prompt (ties split evenly)."""
    return _argmax_policy(preference_utility(population, against))


def preference_gap(policy: object, population: PairPopulation, against: object | None = None) -> PromptMean:
    """``max_pi P(pi > against) - P(policy > against) = E_x sum_a policy(a|x) (max_b u(x,b) - u(x,a))`` >= 0."""
    u = preference_utility(population, against)
    pol = _check_distribution("policy", policy, population.K, population.size)
    return _prompt_mean(_regret_rows(pol, _regret_target(u, None, None), None))


# ------------------------------------------------------------------------------------------- pessimism


def confidence_radius(d: int, delta: float) -> float:
    """``gamma = sqrt(chi2_d quantile(1 - delta))``: the asymptotic ``1 - delta`` Wald ellipsoid radius."""
    if not (isinstance(d, (int, np.integer)) and d >= 1):
        raise InputError(f"d: the dimension must be a positive integer, got {d!r}")
    return float(np.sqrt(stats.chi2.ppf(1.0 - failure_probability(delta), int(d))))


def _cov_sqrt(cov: object, d: int, reps: int) -> np.ndarray:
    """``(R, d, d)`` matrices ``S`` with ``S^T S = cov`` (symmetric PSD check, eigenvalues clipped at 0)."""
    c = _as_float("cov", cov)
    if c.shape == (d, d):
        c = np.broadcast_to(c, (reps, d, d))
    if c.shape != (reps, d, d):
        raise InputError(f"cov: expected shape {(d, d)} or {(reps, d, d)}, got {c.shape}")
    _finite("cov", c)
    scale = np.maximum(np.abs(c).max(axis=(1, 2)), 1e-300)
    asym = np.abs(c - np.swapaxes(c, 1, 2)).max(axis=(1, 2))
    if (asym > 1e-10 * scale).any():
        raise InputError(f"cov: replication {int(np.argmax(asym > 1e-10 * scale))} is not symmetric")
    evals, evecs = np.linalg.eigh(0.5 * (c + np.swapaxes(c, 1, 2)))
    if (evals.min(axis=1) < -1e-10 * scale).any():
        r = int(np.argmax(evals.min(axis=1) < -1e-10 * scale))
        raise InputError(f"cov: replication {r} has eigenvalue {evals[r].min():.3g} < 0; need a PSD covariance")
    return np.sqrt(np.clip(evals, 0.0, None))[:, :, None] * np.swapaxes(evecs, 1, 2)


def _check_gamma(gamma: object, reps: int) -> np.ndarray:
    g = _as_float("gamma", gamma)
    if g.ndim == 0:
        g = np.full(reps, float(g))
    if g.shape != (reps,):
        raise InputError(f"gamma: expected a number or shape {(reps,)}, got {g.shape}")
    if not (np.isfinite(g).all() and (g >= 0).all()):
        raise InputError("gamma: the confidence radius must be finite and >= 0")
    return g


def _reference_point(phi: np.ndarray, pi_ref: object | None, v: object | None, per_prompt: bool) -> np.ndarray:
    """``v`` (d,) for the aggregate set or (P, d) per prompt; default ``phi(x, pi_ref)`` (0 without pi_ref)."""
    P, K, d = phi.shape
    if v is not None:
        vv = _as_float("v", v)
        _finite("v", vv)
        if per_prompt:
            if vv.shape == (d,):
                vv = np.broadcast_to(vv, (P, d))
            if vv.shape != (P, d):
                raise InputError(f"v: expected shape {(d,)} or {(P, d)} for the per-prompt set, got {vv.shape}")
        elif vv.shape != (d,):
            raise InputError(f"v: expected shape {(d,)}, got {vv.shape}")
        return np.array(vv)
    if pi_ref is None:
        return np.zeros((P, d) if per_prompt else d)
    ref = _check_distribution("pi_ref", pi_ref, K, P)
    if ref.ndim != 2:
        raise InputError(f"pi_ref: expected shape {(P, K)}, got {ref.shape}")
    per = np.einsum("pk,pkd->pd", ref, phi)
    return per if per_prompt else per.mean(axis=0)


def policy_features(policy: object, phi: object) -> np.ndarray:
    """``E_x phi(x, pi) = (1/P) sum_p sum_a pi(a|x_p) phi(x_p, a)``: ``(d,)`` or ``(R, d)``."""
    ph = _check_phi(phi)
    pol = _check_distribution("policy", policy, ph.shape[1], ph.shape[0])
    return np.einsum("...pk,pkd->...d", pol, ph) / ph.shape[0]


def lower_confidence_value(
    policy: object,
    theta_hat: object,
    cov: object,
    phi: object,
    gamma: object,
    *,
    pi_ref: object | None = None,
    v: object | None = None,
    per_prompt: bool = False,
) -> np.ndarray | float:
    """The pessimistic objective ``min_{theta in C} theta . w(pi) = theta_hat . w - gamma sqrt(w^T cov w)``.

    Aggregate: ``w = E_x phi(x, pi) - v``. ``per_prompt``: ``E_x [theta_hat . w_x - gamma ||cov^{1/2} w_x||]``
    with ``w_x = phi(x, pi) - v_x``. ``policy`` ``(P, K)`` pairs with ``theta_hat`` ``(d,)``; a batch
    ``(R, P, K)`` with ``(R, d)``. ``v`` defaults to ``phi(., pi_ref)`` (zero when ``pi_ref`` is None).
    """
    ph = _check_phi(phi)
    P, K, d = ph.shape
    th, batched = _check_theta(theta_hat, d, "theta_hat")
    R = th.shape[0]
    pol = _check_distribution("policy", policy, K, P)
    if pol.shape[:-2] != ((R,) if batched else ()):
        raise InputError(f"policy: shape {pol.shape} does not match theta_hat of shape {np.shape(theta_hat)}")
    pol = pol.reshape(R, P, K)
    S = _cov_sqrt(cov, d, R) * _check_gamma(gamma, R)[:, None, None]
    vv = _reference_point(ph, pi_ref, v, per_prompt)
    if per_prompt:
        w = np.einsum("rpk,pkd->rpd", pol, ph) - vv
        lcb = (np.einsum("rpd,rd->rp", w, th) - np.linalg.norm(np.einsum("rij,rpj->rpi", S, w), axis=-1)).mean(-1)
    else:
        w = np.einsum("rpk,pkd->rd", pol, ph) / P - vv
        lcb = np.einsum("rd,rd->r", w, th) - np.linalg.norm(np.einsum("rij,rj->ri", S, w), axis=-1)
    return lcb if batched else float(lcb[0])


# Tight tolerances (the output is a policy, checked against closed forms); an "inaccurate" status then
# still means gap and feasibility within 1e-8.
_SOLVER_OPTIONS: dict[str, dict[str, float]] = {
    "CLARABEL": {
        "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8,
        "reduced_tol_gap_abs": 1e-8, "reduced_tol_gap_rel": 1e-8, "reduced_tol_feas": 1e-8,
        "reduced_tol_ktratio": 1e-6,
    },
    "SCS": {"eps": 1e-9, "max_iters": 200_000},
}
# the canonical policy must reproduce the cone solution's features to this relative accuracy
_FEATURE_RTOL = 1e-7


class _PessimisticProgram:
    """The SOCP ``max_x theta . w(x) - ||S w(x) - C||`` over per-prompt simplices, compiled once (DPP).

    ``x`` is ``vec(pi)`` (row-major, ``P K``); the parameters ``theta``, ``S = gamma cov^{1/2}`` and
    ``C = S v`` change between replications without recompiling. The LCB depends on ``pi`` only through
    its features (``d`` numbers, or ``P d`` per prompt, for ``P (K - 1)`` free probabilities), so a
    maximiser is rarely unique; a second program (a QP) returns the canonical one: the policy closest to
    ``anchor`` in squared distance with the same features as the cone program's solution.
    """

    def __init__(self, phi: np.ndarray, per_prompt: bool) -> None:
        P, K, d = phi.shape
        self.P, self.K, self.per_prompt = P, K, per_prompt
        self.phi = phi
        self.phi_scale = float(np.abs(phi).max())
        self.x = cp.Variable(P * K, nonneg=True)
        self.theta = cp.Parameter(d)
        self.S = cp.Parameter((d, d))
        rows = sp.kron(sp.eye(P), np.ones((1, K)), format="csr")
        simplex = [rows @ self.x == 1]
        if per_prompt:
            self.feat = sp.block_diag([phi[p].T for p in range(P)], format="csr")  # (P d, P K)
            W = cp.reshape(self.feat @ self.x, (P, d), order="C")  # row p: phi(x_p, pi)
            self.C = cp.Parameter((P, d))
            lcb = (cp.sum(W @ self.theta) - cp.sum(cp.norm(W @ self.S.T - self.C, 2, axis=1))) / P
        else:
            self.feat = sp.csr_matrix(phi.reshape(P * K, d).T / P)  # (d, P K): E_x phi(x, pi)
            w = self.feat @ self.x
            self.C = cp.Parameter(d)
            lcb = self.theta @ w - cp.norm(self.S @ w - self.C, 2)
        self.problem = cp.Problem(cp.Maximize(lcb), simplex)
        self.target = cp.Parameter(self.feat.shape[0])
        self.anchor = cp.Parameter(P * K)
        self.canonical = cp.Problem(
            cp.Minimize(cp.sum_squares(self.x - self.anchor)), [*simplex, self.feat @ self.x == self.target]
        )

    def _run(self, problem: cp.Problem, solver: str) -> np.ndarray:
        status = None
        for name in dict.fromkeys((solver, "CLARABEL", "SCS")):
            try:
                with warnings.catch_warnings():  # "inaccurate" is accepted: see _SOLVER_OPTIONS
                    warnings.filterwarnings("ignore", message="Solution may be inaccurate")
                    # cold starts: a solution must not depend on what this cached program solved before
                    problem.solve(solver=name, warm_start=False, **_SOLVER_OPTIONS.get(name, {}))
                status = problem.status
            except cp.error.SolverError as exc:
                status = f"solver error ({exc})"
                continue
            if status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and self.x.value is not None:
                pol = np.clip(np.asarray(self.x.value).reshape(self.P, self.K), 0.0, None)
                return pol / pol.sum(axis=1, keepdims=True)
        raise RuntimeError(f"pessimistic policy: the cone program was not solved (last status: {status})")

    def solve(self, theta: np.ndarray, S: np.ndarray, v: np.ndarray, anchor: np.ndarray, solver: str) -> np.ndarray:
        # The maximiser does not change with a positive scale of the objective, but the solver's tolerances
        # are absolute: the objective is brought to order one (at |theta| ~ 1e-8 the policy was off by 0.4)
        scale = max(float(np.linalg.norm(theta)), float(np.linalg.norm(S, 2))) * self.phi_scale
        if scale > 0 and math.isfinite(scale):
            theta, S = theta / scale, S / scale
        self.theta.value = theta
        self.S.value = S
        self.C.value = v @ S.T
        best = self._run(self.problem, solver)
        target = self.feat @ best.ravel()
        self.target.value = target
        self.anchor.value = anchor.ravel()
        try:
            pol = self._run(self.canonical, solver)
        except RuntimeError:
            return best
        scale = max(1.0, float(np.abs(target).max()))
        return pol if np.abs(self.feat @ pol.ravel() - target).max() <= _FEATURE_RTOL * scale else best


_PROGRAMS = threading.local()


@functools.cache
def _installed_solvers() -> tuple[str, ...]:
    """cvxpy's installed solvers, looked up once per process (each lookup tries the solvers' imports:
    3 ms, more than a small cone program takes to solve)."""
    return tuple(cp.installed_solvers())


def _program(phi: np.ndarray, per_prompt: bool) -> _PessimisticProgram:
    """The compiled program of ``phi``, kept for the next call in this thread (a study solves one per
    replication on the same population; compiling costs more than solving). The last 4 are kept."""
    cache: dict = _PROGRAMS.__dict__.setdefault("cache", {})
    key = (hashlib.sha1(np.ascontiguousarray(phi).tobytes()).digest(), phi.shape, per_prompt)
    program = cache.pop(key, None) or _PessimisticProgram(phi, per_prompt)
    cache[key] = program  # most recently used last
    while len(cache) > 4:
        del cache[next(iter(cache))]
    return program


def pessimistic_policy(
    theta_hat: object,
    cov: object,
    phi: object,
    pi_ref: object | None = None,
    gamma: object | None = None,
    delta: float = 0.05,
    v: object | None = None,
    *,
    per_prompt: bool = False,
    solver: str = "CLARABEL",
) -> np.ndarray:
    r"""Pessimistic policy of Zhu, Jordan and Jiao (2023): the maximiser of the lower confidence bound.

    ``argmax_pi theta_hat . w(pi) - gamma ||cov^{1/2} w(pi)||``, ``w(pi) = E_x phi(x, pi) - v``, which is
    ``argmax_pi min_{theta in C} theta . w(pi)`` for ``C = {||theta - theta_hat||_{cov^-1} <= gamma}``; over
    all policies (one distribution per prompt of the finite set), solved as a second-order cone program
    (CLARABEL, SCS as fallback). ``per_prompt=True`` maximises ``E_x min_{theta in C} theta . w_x(pi)``
    with ``w_x = phi(x, pi) - v_x`` instead (the set is applied prompt by prompt).

    ``cov`` is the covariance of ``theta_hat`` itself (already divided by n), ``(d, d)`` or ``(R, d, d)``.
    ``gamma`` defaults to ``confidence_radius(d, delta)``; ``v`` to ``phi(., pi_ref)`` (aggregate: its prompt
    mean), or 0 when ``pi_ref`` is None. ``gamma = 0`` gives the greedy policy (up to how ties are split).
    Returns ``(P, K)`` or ``(R, P, K)`` for ``theta_hat`` of shape ``(R, d)``.

    The LCB depends on the policy only through ``w(pi)`` (``w_x(pi)`` per prompt), so the maximiser is
    rarely unique; the one returned is canonical: the policy closest to ``pi_ref`` (uniform if None) in
    squared distance among those with the same ``w`` as the cone program's solution. A linear utility
    ``theta . phi`` gives all of them the same value; a non-linear true utility need not.
    """
    ph = _check_phi(phi)
    P, K, d = ph.shape
    th, batched = _check_theta(theta_hat, d, "theta_hat")
    R = th.shape[0]
    if solver not in _installed_solvers():
        raise InputError(f"solver: {solver!r} is not installed; available: {', '.join(_installed_solvers())}")
    if gamma is None:
        gamma = confidence_radius(d, delta)
    S = _cov_sqrt(cov, d, R) * _check_gamma(gamma, R)[:, None, None]
    vv = _reference_point(ph, pi_ref, v, per_prompt)
    anchor = np.full((P, K), 1.0 / K) if pi_ref is None else _check_distribution("pi_ref", pi_ref, K, P)
    program = _program(ph, per_prompt)
    out = np.stack([program.solve(th[r], S[r], vv, anchor, solver) for r in range(R)])
    return _unbatch(out, batched)
