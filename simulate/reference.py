r"""Reference policies ``pi_ref(a | x)`` over the ``K`` responses, and sampling from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import softmax

__all__ = ["ReferencePolicy", "UniformReference", "SoftmaxReference", "sample_responses", "REFERENCE_POLICIES"]


@dataclass(frozen=True)
class ReferencePolicy:
    """Base class: ``probs(phi)`` maps features ``(..., K, d)`` to probabilities ``(..., K)``."""

    def probs(self, phi: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class UniformReference(ReferencePolicy):
    """``pi_ref(a | x) = 1/K``."""

    def probs(self, phi: np.ndarray) -> np.ndarray:
        K = phi.shape[-2]
        return np.full(phi.shape[:-1], 1.0 / K)


@dataclass(frozen=True)
class SoftmaxReference(ReferencePolicy):
    r"""``pi_ref(a | x) \propto exp(theta_ref . phi(x, a) / temperature)``."""

    theta: np.ndarray = field(default=None)
    temperature: float = 1.0

    def probs(self, phi: np.ndarray) -> np.ndarray:
        return softmax(phi @ self.theta / self.temperature, axis=-1)


def sample_responses(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: ``probs`` ``(..., K)``, ``uniforms`` ``(..., m)`` -> indices ``(..., m)``.

    Index ``a`` is returned when ``F(a-1) <= u < F(a)`` with ``F`` the cumulative probabilities.
    """
    cdf = np.cumsum(probs, axis=-1)
    # count the bins passed, one comparison per inner bin boundary (the last bin takes the rest, so a
    # rounded F(K-1) < 1 cannot push an index past K - 1); K - 1 passes over (..., m) beat one reduction
    # over a (..., m, K) array
    idx = np.zeros(uniforms.shape, dtype=np.intp)
    for k in range(probs.shape[-1] - 1):
        idx += uniforms >= cdf[..., k:k + 1]
    return idx


REFERENCE_POLICIES = ("uniform", "softmax")
