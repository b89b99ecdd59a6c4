r"""Preference scenarios of the text task: the preference models of ``simulate.preferences`` on reward components.

A text scenario is one of the simulator's preference models (``LinkPreference``, ``LabelFlip``,
``PositionBias``, ``AnnotatorMixture``) applied to ``phi(x, y)``, the vector of true reward
components of a response (``reward.TrueReward``; for VADER, ``phi = [compound]``). So the linear and
the neural worlds share one definition of every misspecification. With ``s`` the sharpness (margin
per unit of true reward) and ``e`` the unit vector picking the primary reward component:

| name | ``g*(x, a, b)`` |
|---|---|
| ``bt`` | ``sigmoid(s e.dphi)`` (the Bradley-Terry control) |
| ``probit`` | ``Phi(s e.dphi)`` |
| ``cauchy`` | ``1/2 + arctan(s e.dphi)/pi`` |
| ``label_flip`` | ``eps + (1 - 2 eps) sigmoid(s e.dphi)`` (``eps = 0.2``) |
| ``annotator_mixture`` | ``w sigmoid(2 s e.dphi) + (1 - w) sigmoid(-s e.dphi)`` (``w = 0.7``: a minority prefers the sadder text) |
| ``position_bias`` | ``sigmoid(s e.dphi + bias)`` for the response shown first (``bias = 1``) |

``dphi = phi(x, a) - phi(x, b)``. Every built-in scenario's utility ``U = theta_eff . phi`` is a
positive multiple of the primary component, so ranking by ``U`` is ranking by the true reward.
Labels ``Z ~ Bernoulli(g*(x, y_1, y_2))`` with ``y_1`` shown first; the oracle ``g_hat`` written on
training rows is the symmetrised ``(g*(a, b) + 1 - g*(b, a)) / 2`` (equal to ``g*`` when antisymmetric).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robust_rlhf.simulate.preferences import (
    AnnotatorMixture,
    LabelFlip,
    LinkPreference,
    PositionBias,
    PreferenceModel,
)
from robust_rlhf.theory.errors import InputError

from .reward import TrueReward

__all__ = ["TextScenario", "TEXT_SCENARIOS", "make_scenario", "OracleScorer", "text_scenario_names"]


@dataclass(frozen=True)
class TextScenario:
    """A named preference model over reward components ``phi`` (shape ``(n, d)``)."""

    name: str
    model: PreferenceModel
    description: str
    sharpness: float
    d: int = 1

    def _x(self, n: int) -> np.ndarray:
        return np.zeros((n, 1))

    def _check(self, phi_a: np.ndarray, phi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        phi_a = np.asarray(phi_a, dtype=np.float64)
        phi_b = np.asarray(phi_b, dtype=np.float64)
        if phi_a.shape != phi_b.shape or phi_a.ndim != 2 or phi_a.shape[1] != self.d:
            raise InputError(
                f"scenario {self.name}: phi_a and phi_b must both be (n, {self.d}); got {phi_a.shape}, {phi_b.shape}"
            )
        return phi_a, phi_b

    def prob(self, phi_a: np.ndarray, phi_b: np.ndarray) -> np.ndarray:
        """``g*(x, a, b)``: probability that ``a``, shown first, is preferred to ``b``."""
        phi_a, phi_b = self._check(phi_a, phi_b)
        return np.asarray(self.model.prob(self._x(len(phi_a)), phi_a, phi_b), dtype=np.float64)

    def symmetric_prob(self, phi_a: np.ndarray, phi_b: np.ndarray) -> np.ndarray:
        """``(g*(a, b) + 1 - g*(b, a)) / 2``, the order-free preference (``g*`` itself when antisymmetric)."""
        if self.model.antisymmetric:
            return self.prob(phi_a, phi_b)
        return 0.5 * (self.prob(phi_a, phi_b) + 1.0 - self.prob(phi_b, phi_a))

    def draw(self, phi_first: np.ndarray, phi_second: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Labels ``Z ~ Bernoulli(g*(x, first, second))`` (True: the first response won)."""
        g = self.prob(phi_first, phi_second)
        return rng.random(g.shape) < g

    def utility(self, phi: np.ndarray) -> np.ndarray:
        """The scenario's utility ``U(x, y)`` (``theta_eff . phi``)."""
        phi = np.asarray(phi, dtype=np.float64)
        return np.asarray(self.model.utility(self._x(len(phi)), phi), dtype=np.float64)


def _unit(d: int, primary: int) -> np.ndarray:
    e = np.zeros(d)
    e[primary] = 1.0
    return e


def _bt(s: float, e: np.ndarray, **_: Any) -> PreferenceModel:
    return LinkPreference(theta=s * e)


def _link(link: str) -> Callable[..., PreferenceModel]:
    def build(s: float, e: np.ndarray, **_: Any) -> PreferenceModel:
        return LinkPreference(theta=s * e, link=link)

    return build


def _flip(s: float, e: np.ndarray, eps: float = 0.2, **_: Any) -> PreferenceModel:
    if not 0.0 <= eps < 0.5:
        raise InputError(f"scenario label_flip: eps must lie in [0, 1/2), got {eps}")
    return LabelFlip(base=LinkPreference(theta=s * e), eps=eps)


def _mixture(s: float, e: np.ndarray, weight: float = 0.7, contrarian: float = 1.0, **_: Any) -> PreferenceModel:
    if not 0.5 < weight < 1.0 or contrarian < 0:
        raise InputError("scenario annotator_mixture: need 1/2 < weight < 1 and contrarian >= 0")
    if 2.0 * weight - contrarian * (1.0 - weight) <= 0:
        raise InputError("scenario annotator_mixture: the utility must rank by the true reward (2 w > contrarian (1 - w))")
    thetas = np.stack([2.0 * s * e, -contrarian * s * e])
    return AnnotatorMixture(thetas=thetas, weights=np.array([weight, 1.0 - weight]))


def _position(s: float, e: np.ndarray, bias: float = 1.0, **_: Any) -> PreferenceModel:
    return PositionBias(base=LinkPreference(theta=s * e), bias=bias)


TEXT_SCENARIOS: dict[str, tuple[str, Callable[..., PreferenceModel]]] = {
    "bt": ("Bradley-Terry in the true reward (control: VRPO cannot gain)", _bt),
    "probit": ("Thurstone/probit link in the true reward (mild link misspecification)", _link("probit")),
    "cauchy": ("Cauchy link: heavy tails, preferences far from 0/1 even for large reward gaps", _link("cauchy")),
    "label_flip": ("Bradley-Terry labels flipped with probability eps (default 0.2)", _flip),
    "annotator_mixture": (
        "hidden context: 70% of annotators prefer the happier text (sharpness 2s), 30% the sadder (s)",
        _mixture,
    ),
    "position_bias": ("Bradley-Terry plus a logit bonus (default 1) for the response shown first", _position),
}


def text_scenario_names() -> list[str]:
    """Names of the registered text scenarios."""
    return list(TEXT_SCENARIOS)


def make_scenario(name: str, sharpness: float = 4.0, d: int = 1, primary: int = 0, **params: Any) -> TextScenario:
    """Build a registered text scenario over ``d`` reward components (``primary`` is the true reward)."""
    if name not in TEXT_SCENARIOS:
        raise InputError(f"scenario: unknown {name!r}; allowed: {', '.join(TEXT_SCENARIOS)}")
    if not sharpness > 0:
        raise InputError(f"scenario sharpness must be > 0, got {sharpness}")
    if d < 1 or not 0 <= primary < d:
        raise InputError(f"scenario: need d >= 1 and 0 <= primary < d, got d={d}, primary={primary}")
    description, build = TEXT_SCENARIOS[name]
    return TextScenario(name, build(float(sharpness), _unit(d, primary), **params), description, float(sharpness), d)


@dataclass
class OracleScorer:
    """``g_hat = g*``: the scenario's symmetrised preference on the true reward components (a ``PreferenceScorer``)."""

    scenario: TextScenario
    reward: TrueReward

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> list[float]:
        phi_a = self.reward.components(list(prompts), list(firsts))
        phi_b = self.reward.components(list(prompts), list(seconds))
        return self.scenario.symmetric_prob(phi_a, phi_b).tolist()
