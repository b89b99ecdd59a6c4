r"""Auxiliary preference models ``g_hat(x, a, b)`` for the control variate of VRPO (DESIGN.md 3.6).

Fixed models (a function of the prompt and the two responses, independent of the labelled data):

- ``oracle``: ``g_hat = g*``;
- ``noisy_oracle``: ``g_hat = sigmoid(logit g* + noise * (eta(x,a) - eta(x,b)) / sqrt 2)``, where
  ``eta(x, a)`` is a fixed pseudo-random function of the prompt's bits and the response (a keyed
  hash turned into a normal draw): over prompts it is standard normal, independent across responses
  and independent of ``g*``, for every ``K`` and prompt dimension. The logit error of distinct
  responses is ``N(0, noise^2)`` and ``g_hat`` stays antisymmetric whenever ``g*`` is;
- ``constant``: ``g_hat = value`` (1/2 by default);
- ``reversed``: ``g_hat = 1 - g*``;
- ``random``: ``g_hat = sigmoid(scale * (eta'(x,a) - eta'(x,b)) / sqrt 2)`` with ``eta'`` another such
  function: independent of ``g*`` (a control with no information);
- ``bt_plugin``: ``g_hat = sigmoid(theta_aux . dphi)`` with ``theta_aux`` the BT MLE on a separate
  sample of ``n_fit`` labelled pairs (seeded by ``seed``).

Data-dependent model: ``learned``, a flexible classifier on pair features, cross-fitted with
``folds`` folds on the labelled rows themselves (``theory.crossfit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit, logit

from .scenario import SpecError, check_seed, structure_rng

if TYPE_CHECKING:
    from .scenario import Scenario

__all__ = ["AuxSpec", "AUX_MODELS", "FixedAux", "build_aux", "aux_population", "prompt_normals"]

AUX_MODELS: dict[str, str] = {
    "oracle": "the true preference probability g*",
    "noisy_oracle": "g* with logit noise of standard deviation `noise`",
    "constant": "the constant `value` (1/2 by default)",
    "reversed": "1 - g*",
    "random": "a random model unrelated to g* (logit scale `scale`)",
    "bt_plugin": "a BT fit on a separate sample of `n_fit` pairs",
    "learned": "gradient boosting on pair features, cross-fitted with `folds` folds",
}


@dataclass(frozen=True)
class AuxSpec:
    """Which auxiliary model to use, and its parameters (see the module docstring)."""

    kind: str = "oracle"
    noise: float = 1.0
    value: float = 0.5
    scale: float = 2.0
    n_fit: int = 500
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in AUX_MODELS:
            raise SpecError(f"auxiliary model {self.kind!r} is unknown; allowed: {', '.join(AUX_MODELS)}")
        for name in ("noise", "value", "scale", "n_fit", "folds", "seed"):
            value = getattr(self, name)
            integer = name in ("n_fit", "folds", "seed")
            kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise SpecError(f"auxiliary model field '{name}' = {value!r} must be "
                                f"{'an integer' if integer else 'a number'}")
        checks = {
            "noise": (self.noise >= 0, ">= 0"), "value": (0 <= self.value <= 1, "in [0, 1]"),
            "scale": (self.scale >= 0, ">= 0"), "n_fit": (self.n_fit >= 10, "an integer >= 10"),
            "folds": (self.folds >= 2, "an integer >= 2"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok or not np.isfinite(getattr(self, name)):
                raise SpecError(f"auxiliary model field '{name}' = {getattr(self, name)!r} must be {allowed}")
        check_seed("auxiliary model field 'seed'", self.seed)

    @classmethod
    def parse(cls, value: "AuxSpec | str | dict[str, Any]") -> "AuxSpec":
        """From an ``AuxSpec``, a name (``"oracle"``) or a mapping ``{kind: ..., noise: ...}``."""
        if isinstance(value, AuxSpec):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        if not isinstance(value, Mapping):
            raise SpecError(f"auxiliary model {value!r} must be a name ({', '.join(AUX_MODELS)}) or a mapping "
                            "{kind: ..., parameters}")
        allowed = {f.name for f in fields(cls)}
        unknown = set(value) - allowed
        if unknown:
            raise SpecError(f"unknown auxiliary model field {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(allowed))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """The kind and the parameters it uses."""
        used = {"noisy_oracle": ("noise", "seed"), "constant": ("value",), "random": ("scale", "seed"),
                "bt_plugin": ("n_fit", "seed"), "learned": ("folds", "seed")}
        out: dict[str, Any] = {"kind": self.kind}
        for name in used.get(self.kind, ()):
            out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class FixedAux:
    """A fixed auxiliary model of a scenario: ``g_hat`` as a function of prompt and responses."""

    scenario: "Scenario"
    spec: AuxSpec
    key: int | None = None  # the key of the pseudo-random functions eta
    theta: np.ndarray | None = None  # bt_plugin's fitted reward

    def _eta(self, x: np.ndarray) -> np.ndarray:
        return prompt_normals(x, self.scenario.K, self.key)  # (..., K)

    def matrix(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """``g_hat(x, a, b)`` for every ordered pair, ``(..., K, K)``."""
        kind = self.spec.kind
        if kind in ("oracle", "noisy_oracle", "reversed"):
            g = self.scenario.g_star_matrix(x, phi)
            if kind == "reversed":
                return 1.0 - g
            if kind == "oracle":
                return g
            eta = self._eta(x)
            with np.errstate(divide="ignore"):
                return expit(logit(g) + self.spec.noise * (eta[..., :, None] - eta[..., None, :]) / np.sqrt(2.0))
        if kind == "constant":
            return np.full((*phi.shape[:-2], self.scenario.K, self.scenario.K), self.spec.value)
        if kind == "random":
            eta = self._eta(x)
            return expit(self.spec.scale * (eta[..., :, None] - eta[..., None, :]) / np.sqrt(2.0))
        # bt_plugin
        s = phi @ self.theta
        return expit(s[..., :, None] - s[..., None, :])

    def pairs(self, x: np.ndarray, y: np.ndarray, phi_a: np.ndarray, phi_b: np.ndarray,
              g_star: np.ndarray | None = None) -> np.ndarray:
        """``g_hat`` on given pairs: prompts ``x`` (..., p) broadcasting against the pairs, responses
        ``y`` (..., 2), their features ``phi_a``, ``phi_b`` (..., d); ``g_star`` on the pairs, when
        already known, is reused by the models built on it. Returns (...)."""
        kind = self.spec.kind
        if kind == "constant":
            return np.full(y.shape[:-1], self.spec.value)
        if kind == "bt_plugin":
            return expit((phi_a - phi_b) @ self.theta)
        if kind == "random":
            return expit(self.spec.scale * self._eta_diff(x, y))
        g = self.scenario.preference.prob(x, phi_a, phi_b) if g_star is None else g_star
        if kind == "reversed":
            return 1.0 - g
        if kind == "oracle":
            return g
        with np.errstate(divide="ignore"):
            return expit(logit(g) + self.spec.noise * self._eta_diff(x, y))

    def _eta_diff(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``(eta(x, y1) - eta(x, y2)) / sqrt 2``."""
        eta = self._eta(x)
        eta = np.broadcast_to(eta, (*y.shape[:-1], eta.shape[-1])) if eta.ndim < y.ndim else eta
        return (np.take_along_axis(eta, y[..., :1], -1) - np.take_along_axis(eta, y[..., 1:], -1))[..., 0] / np.sqrt(2.0)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection of uint64 whose output bits all depend on every input bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def prompt_normals(x: np.ndarray, K: int, key: int) -> np.ndarray:
    """``eta(x, a)``, a = 0..K-1: standard normal draws that are a fixed function of the bits of the prompt
    ``x`` (..., p), the response ``a`` and ``key`` (Box-Muller on two hashed uniforms). Distinct prompts
    give (pseudo-)independent draws, so over a continuous prompt law they are i.i.d. N(0, 1). (..., K)."""
    x = np.ascontiguousarray(x, dtype=np.float64) + 0.0  # -0.0 -> 0.0: equal prompts, equal bits
    bits = x.reshape(-1, x.shape[-1]).view(np.uint64)
    with np.errstate(over="ignore"):
        h = np.full(bits.shape[0], np.uint64(key))
        for j in range(bits.shape[1]):
            h = _mix(h ^ (bits[:, j] + _GOLDEN * np.uint64(j + 1)))
        a = np.arange(1, 2 * K + 1, dtype=np.uint64) * _GOLDEN
        u = (_mix(h[:, None] + a[None, :]) >> np.uint64(11)).astype(np.float64)
    u = (u + 0.5) * 2.0**-53  # in (0, 1)
    z = np.sqrt(-2.0 * np.log(u[:, 0::2])) * np.cos(2.0 * np.pi * u[:, 1::2])
    return z.reshape(*x.shape[:-1], K)


def build_aux(scenario: "Scenario", spec: AuxSpec) -> FixedAux | None:
    """The fixed model for ``spec`` (None for ``learned``, which is fitted per data set)."""
    if spec.kind == "learned":
        return None
    key = theta = None
    if spec.kind in ("noisy_oracle", "random"):
        rng = structure_rng(scenario.spec["structure_seed"], "auxiliary", spec.seed, int(spec.kind == "random"))
        key = int(rng.integers(2**63))
    if spec.kind == "bt_plugin":
        from robust_rlhf.theory.errors import SeparableDataError
        from robust_rlhf.theory.fitting import fit

        from .dataset import sample

        aux_data = sample(scenario, n=spec.n_fit, seed=spec.seed, aux=None, M=0, namespace="auxiliary")
        try:
            theta = fit(aux_data.to_pair_data(), method="mle").theta[0]
        except SeparableDataError:
            raise SpecError(f"auxiliary model bt_plugin: its own fit sample of n_fit = {spec.n_fit} labelled pairs "
                            f"(seed {spec.seed}) of scenario {scenario.name!r} is separable, so its BT fit has no "
                            "finite estimate; raise n_fit or change the seed") from None
    return FixedAux(scenario=scenario, spec=spec, key=key, theta=theta)


def aux_population(scenario: "Scenario", spec: AuxSpec | str | dict, size: int, seed: int) -> np.ndarray | None:
    """``g_hat(x, a, b)`` for every ordered pair of the prompts of ``scenario.population(size, seed)``,
    (size, K, K); None for the data-dependent ``learned`` model."""
    model = build_aux(scenario, AuxSpec.parse(spec))
    if model is None:
        return None
    x = scenario.prompts(np.random.default_rng(seed), (size,))
    return model.matrix(x, scenario.phi(x))
