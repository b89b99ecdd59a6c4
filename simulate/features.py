r"""Feature maps ``phi(x, a)`` in R^d for a finite response set ``a = 0..K-1``.

Every map takes prompts ``x`` of shape ``(..., p)`` and returns features ``(..., K, d)``. Random
structure (weight matrices) comes from the scenario's structure generator, so a scenario is a fixed,
reproducible process; data seeds only draw prompts, responses and labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FeatureMap", "GaussianFeatures", "LinearFeatures", "TanhFeatures", "FEATURE_MAPS"]


@dataclass(frozen=True)
class FeatureMap:
    """Base class: ``K`` responses with ``d`` features, prompts in R^``prompt_dim``."""

    K: int
    d: int

    @property
    def prompt_dim(self) -> int:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class GaussianFeatures(FeatureMap):
    r"""Independent Gaussian features: the prompt is ``x = (x_0, ..., x_{K-1})``, ``x_a ~ N(0, I_d)``,
    and ``phi(x, a) = x_a``. So ``dphi`` of two distinct responses is ``N(0, 2 I_d)`` (elliptical)."""

    @property
    def prompt_dim(self) -> int:
        return self.K * self.d

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(*x.shape[:-1], self.K, self.d)


@dataclass(frozen=True)
class LinearFeatures(FeatureMap):
    r"""Linear Gaussian features ``phi(x, a) = W_a x / sqrt(p)``, ``W_a`` fixed with N(0,1) entries.

    Marginally ``phi(x, a) ~ N(0, (W_a W_a^T)/p)``; features of different responses are correlated
    through the shared prompt."""

    p: int = 3
    weights: np.ndarray = field(default=None, repr=False)  # (K, d, p)

    @property
    def prompt_dim(self) -> int:
        return self.p

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.einsum("kdp,...p->...kd", self.weights, x) / np.sqrt(self.p)


@dataclass(frozen=True)
class TanhFeatures(FeatureMap):
    r"""Nonlinear features ``phi(x, a) = tanh(W_a x / sqrt(p) + b_a)``, ``W_a``, ``b_a`` fixed N(0,1).

    Bounded in ``[-1, 1]^d`` and not elliptical, so a link misspecification also tilts the direction
    of the best BT fit."""

    p: int = 3
    weights: np.ndarray = field(default=None, repr=False)  # (K, d, p)
    bias: np.ndarray = field(default=None, repr=False)  # (K, d)

    @property
    def prompt_dim(self) -> int:
        return self.p

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(np.einsum("kdp,...p->...kd", self.weights, x) / np.sqrt(self.p) + self.bias)


def build_feature_map(name: str, K: int, d: int, p: int | None, rng: np.random.Generator) -> FeatureMap:
    """Construct the named map; ``rng`` draws its fixed structure (names validated by the spec)."""
    if name == "gaussian":
        return GaussianFeatures(K=K, d=d)
    p = d if p is None else p
    weights = rng.standard_normal((K, d, p))
    if name == "linear":
        return LinearFeatures(K=K, d=d, p=p, weights=weights)
    return TanhFeatures(K=K, d=d, p=p, weights=weights, bias=rng.standard_normal((K, d)))


FEATURE_MAPS = ("gaussian", "linear", "tanh")
