r"""Scenarios: named, documented, reproducible data-generating processes (DESIGN.md 3.1, 3.6).

A scenario is given by a spec, a plain nested dict (written in Python, YAML or JSON)::

    name: my_probit
    d: 3                      # feature dimension
    K: 4                      # responses per prompt
    features: {map: gaussian} # or {map: linear|tanh, prompt_dim: 5}
    reference: {policy: uniform}   # or {policy: softmax, temperature: 1.0, theta: [...]}
    theta_star: [1.0, -0.5, 0.8]   # true reward vector; default: random direction of norm reward_scale
    reward_scale: 1.5
    preference: {model: probit, scale: 1.0}
    structure_seed: 0         # draws the fixed random structure (weights, annotators, skew term)

Prompts are ``x ~ N(0, I_p)``. ``PREFERENCE_MODELS`` lists every preference model and its parameters.
Bad specs raise ``SpecError`` naming the field and the allowed values.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robust_rlhf.theory.data import PairPopulation
from robust_rlhf.theory.errors import InputError

from .features import FEATURE_MAPS, FeatureMap, build_feature_map
from .preferences import (
    LINKS,
    AnnotatorMixture,
    ContextDependent,
    Intransitive,
    LabelFlip,
    LinkPreference,
    PositionBias,
    PreferenceModel,
)
from .reference import REFERENCE_POLICIES, ReferencePolicy, SoftmaxReference, UniformReference

__all__ = ["SpecError", "Scenario", "PREFERENCE_MODELS", "load_spec", "structure_rng", "check_memory", "check_seed",
           "MEMORY_LIMIT", "SEED_LIMIT"]


class SpecError(InputError):
    """A scenario spec (or a sampling parameter) is invalid; the message names the field."""


#: Largest working set (bytes) a simulation may ask for before it is refused with a clear error
#: rather than failing deep inside numpy (or swapping for hours).
MEMORY_LIMIT = 16 * 2**30


def check_memory(what: str, values: float) -> None:
    """Refuse a request whose main arrays hold about ``values`` float64 numbers beyond ``MEMORY_LIMIT``."""
    need = 8.0 * float(values)
    if need > MEMORY_LIMIT:
        raise SpecError(f"{what} would need about {need / 2**30:,.0f} GiB of memory (limit {MEMORY_LIMIT / 2**30:.0f} "
                        "GiB): reduce the sample size, replications, features or responses")


# --- parameter validation ----------------------------------------------------------------------

def _num(field_: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SpecError(f"field '{field_}' = {value!r} must be a number")
    value = float(value)
    if not np.isfinite(value):
        raise SpecError(f"field '{field_}' = {value!r} must be finite")
    return value


def _positive(field_: str, value: Any) -> float:
    v = _num(field_, value)
    if v <= 0:
        raise SpecError(f"field '{field_}' = {value!r} must be > 0")
    return v


def _nonneg(field_: str, value: Any) -> float:
    v = _num(field_, value)
    if v < 0:
        raise SpecError(f"field '{field_}' = {value!r} must be >= 0")
    return v


def _flip_rate(field_: str, value: Any) -> float:
    v = _num(field_, value)
    if not 0.0 <= v < 0.5:
        raise SpecError(f"field '{field_}' = {value!r} is outside the allowed range [0, 1/2)")
    return v


def _simplex(field_: str, value: Any) -> list[float]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([np.nan])
    if arr.ndim != 1 or arr.size < 1 or not np.isfinite(arr).all() or (arr <= 0).any() or abs(arr.sum() - 1) > 1e-9:
        raise SpecError(f"field '{field_}' = {value!r} must be a list of positive numbers summing to 1")
    return [float(a) for a in arr]


def _link(field_: str, value: Any) -> str:
    if value not in LINKS:
        raise SpecError(f"field '{field_}' = {value!r} is not a link; allowed: {', '.join(LINKS)}")
    return value


#: A seed is one 32-bit word of a SeedSequence's entropy: a larger one spills into the next word and can give
#: another stream's numbers (data seed s + 2**32 drew auxiliary seed s's prompts and labels).
SEED_LIMIT = 2**32


def check_seed(what: str, value: Any) -> int:
    """``value`` as an int in ``[0, SEED_LIMIT)``; else a ``SpecError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < SEED_LIMIT:
        raise SpecError(f"{what} = {value!r} must be an integer in [0, 2**32)")
    return int(value)


def _int_at_least(field_: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SpecError(f"field '{field_}' = {value!r} must be an integer >= {low}")
    if value < low:
        raise SpecError(f"field '{field_}' = {value!r} must be an integer >= {low}")
    return int(value)


def _vector(field_: str, value: Any, d: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SpecError(f"field '{field_}' must be a list of {d} numbers, got {value!r}") from None
    if arr.shape != (d,) or not np.isfinite(arr).all():
        raise SpecError(f"field '{field_}' must be a list of {d} finite numbers, got {value!r}")
    return arr


def _matrix_or_none(field_: str, value: Any) -> list[list[float]] | None:
    """None, or a matrix of finite numbers as nested lists of floats (so the spec stays JSON-serialisable)."""
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.full(1, np.nan)
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise SpecError(f"field '{field_}' must be a matrix of finite numbers (one row per weight), got {value!r}")
    return arr.tolist()


@dataclass(frozen=True)
class Param:
    """One parameter of a preference model: default, validator and meaning."""

    default: Any
    check: Callable[[str, Any], Any] | None
    doc: str


#: Every preference model: its parameters, whether it has a utility, whether it is antisymmetric.
PREFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "bt": {"doc": "Bradley-Terry control: g* = sigmoid(theta*.dphi)", "params": {}},
    "probit": {
        "doc": "Thurstone/probit link: g* = Phi(scale theta*.dphi)",
        "params": {"scale": Param(1.0, _positive, "multiplies the reward difference")},
    },
    "cauchy": {
        "doc": "heavy-tailed Cauchy link: g* = 1/2 + arctan(scale theta*.dphi)/pi",
        "params": {"scale": Param(1.0, _positive, "multiplies the reward difference")},
    },
    "student_t": {
        "doc": "heavy-tailed Student-t link: g* = T_df(scale theta*.dphi)",
        "params": {
            "df": Param(2.0, _positive, "degrees of freedom (> 0)"),
            "scale": Param(1.0, _positive, "multiplies the reward difference"),
        },
    },
    "temperature": {
        "doc": "temperature mismatch: g* = sigmoid(theta*.dphi / temperature); BT-shaped, target theta*/T",
        "params": {"temperature": Param(0.5, _positive, "annotator temperature T (> 0)")},
    },
    "label_flip": {
        "doc": "symmetric label flips: g* = eps + (1 - 2 eps) g_base",
        "params": {
            "eps": Param(0.2, _flip_rate, "flip rate in [0, 1/2)"),
            "base": Param({"model": "bt"}, None, "the preference model whose labels are flipped"),
        },
    },
    "position_bias": {
        "doc": "position bias: g* = sigmoid(logit(g_base) + bias); not antisymmetric",
        "params": {
            "bias": Param(1.0, _num, "logit bonus of the response shown first"),
            "base": Param({"model": "bt"}, None, "the preference model that is biased"),
        },
    },
    "annotator_mixture": {
        "doc": "hidden context: g* = sum_k w_k F(theta_k.dphi); utility = mean annotator reward",
        "params": {
            "weights": Param([0.5, 0.5], _simplex, "annotator probabilities (positive, sum to 1)"),
            "spread": Param(2.0, _nonneg, "theta_k = theta* + spread * xi_k (xi_k ~ N(0, I), fixed)"),
            "thetas": Param(None, _matrix_or_none, "explicit annotator rewards (k x d); overrides spread"),
            "link": Param("logistic", _link, "link of every annotator"),
            "df": Param(2.0, _positive, "degrees of freedom of the student_t link (> 0; other links ignore it)"),
        },
    },
    "intransitive": {
        "doc": "BT plus skew-symmetric bilinear term: g* = F(theta*.dphi + phi_a^T A phi_b); no utility",
        "params": {
            "strength": Param(1.0, _nonneg, "A = strength * (G - G^T)/sqrt(2d), G ~ N(0,1) fixed"),
            "link": Param("logistic", _link, "link"),
            "df": Param(2.0, _positive, "degrees of freedom of the student_t link (> 0; other links ignore it)"),
        },
    },
    "near_deterministic": {
        "doc": "context-dependent sharpness: g* = sigmoid(kappa(x) theta*.dphi), kappa = scale exp(spread v.x)",
        "params": {
            "scale": Param(4.0, _positive, "median sharpness kappa"),
            "spread": Param(1.5, _nonneg, "standard deviation of log kappa across prompts"),
        },
    },
}

_TOP_KEYS = {
    "name": "scenario name",
    "description": "free text",
    "d": "feature dimension (integer >= 1)",
    "K": "responses per prompt (integer >= 2)",
    "features": "{map: gaussian|linear|tanh, prompt_dim: p (linear/tanh)}",
    "reference": "{policy: uniform|softmax, temperature: T, theta: [...]}",
    "theta_star": "true reward vector (d numbers); default: random direction of norm reward_scale",
    "reward_scale": "norm of the default theta_star",
    "preference": "{model: NAME, ...parameters}",
    "structure_seed": "seed of the fixed random structure",
}

# Independent generators for each random component of the structure (stable under spec edits).
_COMPONENT = {"theta_star": 0, "features": 1, "preference": 3, "auxiliary": 4}


def structure_rng(seed: int, component: str, *extra: int) -> np.random.Generator:
    """Generator for one random component of a scenario's fixed structure."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_COMPONENT[component], *extra)))


def _check_keys(where: str, spec: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    if not isinstance(spec, Mapping):
        raise SpecError(f"field '{where}' must be a mapping, got {spec!r}")
    for key in spec:
        if key not in allowed:
            raise SpecError(f"unknown field '{where + '.' if where else ''}{key}'; allowed: {', '.join(allowed)}")


def _normalise_preference(spec: Any, where: str = "preference") -> dict[str, Any]:
    if where.count(".base") > 4:
        raise SpecError(f"field '{where}': base models are nested more than 4 deep (a recursive spec?)")
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, Mapping) or "model" not in spec:
        raise SpecError(f"field '{where}' must be a mapping with a 'model' key; models: {', '.join(PREFERENCE_MODELS)}")
    model = spec["model"]
    if model not in PREFERENCE_MODELS:
        raise SpecError(f"field '{where}.model' = {model!r} is unknown; allowed: {', '.join(PREFERENCE_MODELS)}")
    params = PREFERENCE_MODELS[model]["params"]
    _check_keys(where, spec, {"model": None, **params})
    out: dict[str, Any] = {"model": model}
    for key, param in params.items():
        value = copy.deepcopy(spec.get(key, param.default))
        if key == "base":
            value = _normalise_preference(value, f"{where}.base")
        elif param.check is not None:
            value = param.check(f"{where}.{key}", value)
        out[key] = value
    return out


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """``json`` object hook: a key given twice is an error, not "the last one wins"."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SpecError(f"duplicate field {key!r}")
        out[key] = value
    return out


def _yaml_loader():
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN202 (PyYAML's signature)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: PyYAML reports it below
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate field {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a scenario (or study) spec from a YAML or JSON file.

    An empty, unreadable, non-UTF-8 or malformed file, a field given twice and a spec that is not a
    mapping raise ``SpecError`` naming the file."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path}: is a folder, not a spec file")
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file (a YAML or JSON spec is expected)") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror or exc})") from None
    if not text.strip():
        raise SpecError(f"{path}: the spec file is empty")
    try:
        if path.suffix == ".json":
            spec = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            spec = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot parse the spec ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise SpecError(f"{path}: the spec is nested too deeply (a recursive YAML alias?)") from None
    if not isinstance(spec, Mapping):
        raise SpecError(f"{path}: the spec must be a mapping of fields, got {type(spec).__name__}")
    return dict(spec)


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: its spec and the objects it builds (see module docstring)."""

    spec: dict[str, Any]
    features: FeatureMap = field(repr=False)
    reference: ReferencePolicy = field(repr=False)
    theta_star: np.ndarray = field(repr=False)
    preference: PreferenceModel = field(repr=False)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | str | Path) -> "Scenario":
        """Validate and build a scenario from a spec mapping or a YAML/JSON file path."""
        if isinstance(spec, (str, Path)):
            path = spec
            try:
                return cls.from_spec(load_spec(path))
            except SpecError as exc:
                raise SpecError(str(exc) if str(exc).startswith(f"{path}:") else f"{path}: {exc}") from None
        if not isinstance(spec, Mapping):
            raise SpecError(f"a scenario spec must be a mapping of fields (or a registered name), got {spec!r}")
        spec = dict(spec)
        _check_keys("", spec, _TOP_KEYS)
        d = _int_at_least("d", spec.get("d", 3), 1)
        K = _int_at_least("K", spec.get("K", 4), 2)
        seed = check_seed("field 'structure_seed'", spec.get("structure_seed", 0))
        reward_scale = _positive("reward_scale", spec.get("reward_scale", 1.5))

        feats = spec.get("features", {"map": "gaussian"})
        if not isinstance(feats, (str, Mapping)):
            raise SpecError(f"field 'features' = {feats!r} must be a map name or a mapping "
                            "{map: gaussian|linear|tanh, prompt_dim: p}")
        feats = {"map": feats} if isinstance(feats, str) else dict(feats)
        _check_keys("features", feats, {"map": None, "prompt_dim": None})
        fmap = feats.get("map", "gaussian")
        if fmap not in FEATURE_MAPS:
            raise SpecError(f"field 'features.map' = {fmap!r} is unknown; allowed: {', '.join(FEATURE_MAPS)}")
        p = feats.get("prompt_dim")
        if fmap == "gaussian" and p is not None:
            raise SpecError("field 'features.prompt_dim' does not apply to the gaussian map (its prompt is K*d)")
        if p is not None:
            p = _int_at_least("features.prompt_dim", p, 1)
        if fmap != "gaussian":
            check_memory("the feature map's weights", K * d * (d if p is None else p))
        features = build_feature_map(fmap, K, d, p, structure_rng(seed, "features"))

        if spec.get("theta_star") is None:
            v = structure_rng(seed, "theta_star").standard_normal(d)
            theta_star = reward_scale * v / np.linalg.norm(v)
        else:
            theta_star = _vector("theta_star", spec["theta_star"], d)

        ref = spec.get("reference", {"policy": "uniform"})
        if not isinstance(ref, (str, Mapping)):
            raise SpecError(f"field 'reference' = {ref!r} must be a policy name or a mapping "
                            "{policy: uniform|softmax, temperature: T, theta: [...]}")
        ref = {"policy": ref} if isinstance(ref, str) else dict(ref)
        _check_keys("reference", ref, {"policy": None, "temperature": None, "theta": None})
        policy = ref.get("policy", "uniform")
        if policy not in REFERENCE_POLICIES:
            raise SpecError(f"field 'reference.policy' = {policy!r} is unknown; allowed: {', '.join(REFERENCE_POLICIES)}")
        if policy == "uniform":
            if set(ref) - {"policy"}:
                raise SpecError("fields 'reference.temperature'/'reference.theta' apply only to policy: softmax")
            reference: ReferencePolicy = UniformReference()
        else:
            temp = _positive("reference.temperature", ref.get("temperature", 1.0))
            theta_ref = theta_star if ref.get("theta") is None else _vector("reference.theta", ref["theta"], d)
            reference = SoftmaxReference(theta=theta_ref, temperature=temp)

        pref = _normalise_preference(spec.get("preference", {"model": "bt"}))
        check_memory("the preference model", d * d)
        preference = _build_preference(pref, theta_star, d, features.prompt_dim, seed)
        canonical = {
            "name": str(spec.get("name", "custom")),
            "description": str(spec.get("description", PREFERENCE_MODELS[pref["model"]]["doc"])),
            "d": d,
            "K": K,
            "features": {"map": fmap, **({} if p is None else {"prompt_dim": p})},
            "reference": ref if policy == "softmax" else {"policy": "uniform"},
            "theta_star": [float(t) for t in theta_star],
            "reward_scale": reward_scale,
            "preference": pref,
            "structure_seed": seed,
        }
        if policy == "softmax":
            canonical["reference"] = {
                "policy": "softmax", "temperature": reference.temperature,
                "theta": [float(t) for t in reference.theta],
            }
        return cls(spec=canonical, features=features, reference=reference,
                   theta_star=theta_star, preference=preference)

    # -- properties ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def d(self) -> int:
        return self.spec["d"]

    @property
    def K(self) -> int:
        return self.spec["K"]

    @property
    def prompt_dim(self) -> int:
        """Dimension ``p`` of the prompts ``x ~ N(0, I_p)``."""
        return self.features.prompt_dim

    @property
    def has_utility(self) -> bool:
        return self.preference.has_utility

    @property
    def antisymmetric(self) -> bool:
        return self.preference.antisymmetric

    # -- the process -----------------------------------------------------------------------------
    def prompts(self, rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
        """Draw prompts ``x ~ N(0, I_p)`` of shape ``size + (p,)``."""
        return rng.standard_normal((*size, self.prompt_dim))

    def phi(self, x: np.ndarray) -> np.ndarray:
        """Features of every response, ``(..., K, d)``."""
        return self.features(x)

    def g_star_matrix(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """``g*(x, a, b)`` for every ordered pair, ``(..., K, K)``."""
        return self.preference.prob(x[..., None, None, :], phi[..., :, None, :], phi[..., None, :, :])

    def population(self, size: int = 20_000, seed: int = 12345) -> PairPopulation:
        """``size`` prompt draws with exact pair structure, for the exact asymptotics of ``theory``."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
            raise SpecError(f"population size must be an integer >= 2, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SpecError(f"population seed must be an integer >= 0, got {seed!r}")
        check_memory("the population", size * (self.prompt_dim + self.K * (self.d + self.K + 2)))
        x = self.prompts(np.random.default_rng(seed), (size,))
        phi = self.phi(x)
        utility = self.preference.utility(x, phi)
        return PairPopulation(phi=phi, pi=self.reference.probs(phi), g_star=self.g_star_matrix(x, phi),
                              utility=utility)

    def describe(self) -> str:
        """A readable multi-line description of the process and its properties."""
        import yaml

        pref = self.spec["preference"]
        lines = [
            f"scenario {self.name}: {self.spec['description']}",
            f"  true utility (for regret): {'yes' if self.has_utility else 'no (preference-based gap)'}",
            f"  g*(a,b) + g*(b,a) = 1: {'yes' if self.antisymmetric else 'no'}",
            f"  prompts x ~ N(0, I_{self.prompt_dim}); {self.K} responses; features in R^{self.d}",
            f"  preference model {pref['model']}: {PREFERENCE_MODELS[pref['model']]['doc']}",
            "spec:",
            yaml.safe_dump(self.spec, sort_keys=False, default_flow_style=None).rstrip(),
        ]
        return "\n".join(lines)


def _build_preference(pref: dict[str, Any], theta: np.ndarray, d: int, p: int, seed: int) -> PreferenceModel:
    """The preference model of ``pref``. A wrapper (label flips, position bias) draws nothing, and its base
    draws its structure from the same generator as unwrapped: wrapping changes only what the wrapper adds."""
    model = pref["model"]
    rng = structure_rng(seed, "preference", 0)
    if model == "bt":
        return LinkPreference(theta=theta)
    if model in ("probit", "cauchy", "student_t"):
        return LinkPreference(theta=theta, link=model, scale=pref["scale"], df=pref.get("df", 3.0))
    if model == "temperature":
        return LinkPreference(theta=theta, scale=1.0 / pref["temperature"])
    if model == "label_flip":
        return LabelFlip(base=_build_preference(pref["base"], theta, d, p, seed), eps=pref["eps"])
    if model == "position_bias":
        return PositionBias(base=_build_preference(pref["base"], theta, d, p, seed), bias=pref["bias"])
    if model == "annotator_mixture":
        weights = np.asarray(pref["weights"], dtype=np.float64)
        if pref["thetas"] is None:
            thetas = theta + pref["spread"] * rng.standard_normal((weights.size, d))
        else:
            thetas = np.asarray(pref["thetas"], dtype=np.float64)
            if thetas.shape != (weights.size, d):
                raise SpecError(f"field 'preference.thetas' must be {weights.size} x {d} finite numbers (one row per weight)")
        return AnnotatorMixture(thetas=thetas, weights=weights, link=pref["link"], df=pref["df"])
    if model == "intransitive":
        if d < 2:
            raise SpecError("preference model 'intransitive' needs d >= 2 (a skew-symmetric term is zero in 1-d)")
        G = rng.standard_normal((d, d))
        return Intransitive(theta=theta, skew=pref["strength"] * (G - G.T) / np.sqrt(2 * d), link=pref["link"],
                            df=pref["df"])
    if model == "near_deterministic":
        v = rng.standard_normal(p)
        return ContextDependent(theta=theta, direction=v / np.linalg.norm(v), scale=pref["scale"], spread=pref["spread"])
    raise AssertionError(model)  # unreachable: names are validated
