r"""Preference models: the true probability ``g*(x, a, b)`` that response ``a`` (shown first) beats ``b``.

Every model maps prompts ``x`` (..., p) and features ``phi_a``, ``phi_b`` (..., d) to probabilities
(...). It states whether it has a true utility ``U(x, a)`` (needed for regret; without one the
preference-based gap is used) and whether ``g*(a, b) + g*(b, a) = 1`` holds.

The links are the CDFs ``F`` of symmetric distributions, ``F(-u) = 1 - F(u)``; the same functions
define misspecification for the neural experiments (rewards there come from a scorer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logit, ndtr, stdtr

from robust_rlhf.theory.errors import InputError

__all__ = [
    "LINKS",
    "link_function",
    "PreferenceModel",
    "LinkPreference",
    "LabelFlip",
    "PositionBias",
    "AnnotatorMixture",
    "Intransitive",
    "ContextDependent",
]


def _cauchy(u: np.ndarray) -> np.ndarray:
    return 0.5 + np.arctan(u) / np.pi


LINKS: dict[str, str] = {
    "logistic": "F(u) = 1 / (1 + exp(-u)) (Bradley-Terry)",
    "probit": "F(u) = Phi(u), the standard normal CDF (Thurstone)",
    "cauchy": "F(u) = 1/2 + arctan(u) / pi (heavy tails)",
    "student_t": "F(u) = CDF of Student's t with df degrees of freedom",
}


def link_function(name: str, df: float = 3.0) -> Callable[[np.ndarray], np.ndarray]:
    """The CDF ``F`` of the named link (see ``LINKS``); ``df`` (finite, > 0) is used by ``student_t`` only."""
    if name == "logistic":
        return expit
    if name == "probit":
        return ndtr
    if name == "cauchy":
        return _cauchy
    if name == "student_t":
        try:
            ok = math.isfinite(float(df)) and float(df) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"df: the Student-t link needs finite degrees of freedom > 0, got {df!r}")
        return lambda u: stdtr(df, u)
    raise InputError(f"link: unknown link {name!r}; allowed: {', '.join(LINKS)}")


def _margin(theta: np.ndarray, phi_a: np.ndarray, phi_b: np.ndarray) -> np.ndarray:
    """``theta . (phi_a - phi_b)`` as ``phi_a theta - phi_b theta``: on the broadcast ``(..., K, 1, d)`` and
    ``(..., 1, K, d)`` of a population it never forms the ``(..., K, K, d)`` differences."""
    return phi_a @ theta - phi_b @ theta


@dataclass(frozen=True)
class PreferenceModel:
    """Base class of preference models."""

    has_utility: bool = field(default=True, init=False)
    antisymmetric: bool = field(default=True, init=False)

    def prob(self, x: np.ndarray, phi_a: np.ndarray, phi_b: np.ndarray) -> np.ndarray:
        """``g*(x, a, b)`` for features ``phi_a``, ``phi_b``."""
        raise NotImplementedError

    def utility(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray | None:
        """True utility ``U(x, a)`` for features ``phi`` (..., K, d) -> (..., K), or None."""
        return None


@dataclass(frozen=True)
class LinkPreference(PreferenceModel):
    r"""``g* = F(scale * theta* . (phi_a - phi_b))`` for a symmetric link ``F``.

    Logistic with scale 1 is Bradley-Terry; logistic with ``scale = 1/T`` is a temperature mismatch
    (still BT-shaped: the best BT fit is ``theta*/T``); probit, Cauchy and Student-t are link
    misspecifications. Utility ``U = theta* . phi``; antisymmetric."""

    theta: np.ndarray = None
    link: str = "logistic"
    scale: float = 1.0
    df: float = 3.0

    def prob(self, x, phi_a, phi_b):
        return link_function(self.link, self.df)(self.scale * _margin(self.theta, phi_a, phi_b))

    def utility(self, x, phi):
        return phi @ self.theta


@dataclass(frozen=True)
class LabelFlip(PreferenceModel):
    r"""Symmetric label noise at rate ``eps`` on a base model: ``g* = eps + (1 - 2 eps) g_base``.

    Keeps the base model's utility and antisymmetry."""

    base: PreferenceModel = None
    eps: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "has_utility", self.base.has_utility)
        object.__setattr__(self, "antisymmetric", self.base.antisymmetric)

    def prob(self, x, phi_a, phi_b):
        return self.eps + (1.0 - 2.0 * self.eps) * self.base.prob(x, phi_a, phi_b)

    def utility(self, x, phi):
        return self.base.utility(x, phi)


@dataclass(frozen=True)
class PositionBias(PreferenceModel):
    r"""The response shown first gets a bonus ``bias`` on the logit scale:
    ``g* = sigmoid(logit(g_base) + bias)``. Not antisymmetric: ``g*(a,b) + g*(b,a) != 1`` when
    ``bias != 0``. Keeps the base model's utility."""

    base: PreferenceModel = None
    bias: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "has_utility", self.base.has_utility)
        object.__setattr__(self, "antisymmetric", self.bias == 0.0 and self.base.antisymmetric)

    def prob(self, x, phi_a, phi_b):
        g = self.base.prob(x, phi_a, phi_b)
        with np.errstate(divide="ignore"):
            if self.base.antisymmetric:  # 1 - g(a, b) is g(b, a): the log-odds without cancellation near 1
                log_odds = np.log(g) - np.log(self.base.prob(x, phi_b, phi_a))
            else:
                log_odds = logit(g)
            return expit(log_odds + self.bias)

    def utility(self, x, phi):
        return self.base.utility(x, phi)


@dataclass(frozen=True)
class AnnotatorMixture(PreferenceModel):
    r"""Hidden context: annotator ``k`` (with probability ``w_k``) compares by reward ``theta_k``:
    ``g* = sum_k w_k F(theta_k . dphi)``. Antisymmetric; not BT in any single reward. Its utility is
    the mean annotator reward ``U = (sum_k w_k theta_k) . phi`` (utilitarian welfare)."""

    thetas: np.ndarray = None  # (k, d)
    weights: np.ndarray = None  # (k,)
    link: str = "logistic"
    df: float = 2.0

    def prob(self, x, phi_a, phi_b):
        F = link_function(self.link, self.df)
        return F(_margin(self.thetas.T, phi_a, phi_b)) @ self.weights

    def utility(self, x, phi):
        return phi @ (self.weights @ self.thetas)


@dataclass(frozen=True)
class Intransitive(PreferenceModel):
    r"""BT plus a skew-symmetric bilinear term (GPM-style):
    ``g* = F(theta* . dphi + phi_a^T A phi_b)`` with ``A^T = -A``. Antisymmetric (the bilinear term
    changes sign when ``a`` and ``b`` swap), cyclic preferences possible, no utility: regret is the
    preference-based gap against ``pi_ref``."""

    theta: np.ndarray = None
    skew: np.ndarray = None  # (d, d), skew-symmetric
    link: str = "logistic"
    df: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "has_utility", False)

    def prob(self, x, phi_a, phi_b):
        bilinear = np.einsum("...i,ij,...j->...", phi_a, self.skew, phi_b)
        return link_function(self.link, self.df)(_margin(self.theta, phi_a, phi_b) + bilinear)


@dataclass(frozen=True)
class ContextDependent(PreferenceModel):
    r"""Near-deterministic, context-dependent sharpness:
    ``g* = F(kappa(x) theta* . dphi)``, ``kappa(x) = scale * exp(spread * v . x)``, ``v`` a fixed unit
    vector in prompt space. Most comparisons are almost certain, with a prompt-dependent temperature
    no single BT model has. Utility ``U = theta* . phi`` (every annotator ranks by it); antisymmetric."""

    theta: np.ndarray = None
    direction: np.ndarray = None  # (p,), unit norm
    scale: float = 4.0
    spread: float = 1.5
    link: str = "logistic"

    def sharpness(self, x: np.ndarray) -> np.ndarray:
        """``kappa(x) = scale * exp(spread * v . x)`` (``inf`` past the float range: certain preferences)."""
        with np.errstate(over="ignore"):
            return self.scale * np.exp(self.spread * (x @ self.direction))

    def prob(self, x, phi_a, phi_b):
        margin = _margin(self.theta, phi_a, phi_b)
        with np.errstate(over="ignore", invalid="ignore"):  # kappa = inf on a tie: the tie stays 1/2, not NaN
            z = np.where(margin == 0, 0.0, self.sharpness(x) * margin)
        return link_function(self.link)(z)

    def utility(self, x, phi):
        return phi @ self.theta
