r"""Hypothesis strategies for property-testing pairwise-preference estimators and losses.

Everything here shrinks towards the simplest readable case: the Bradley-Terry control with one
feature and two responses, the smallest sample, seed 0, the oracle ``g_hat``, the identity map,
no swaps and the identity permutation. Parameters are drawn from a short list of round values
first (the default value leading, so that is where shrinking ends) and from their whole valid
range after, so a counterexample reads ``{'model': 'probit', 'scale': 2.0}`` rather than
``scale=1.7320508075688772``.

- ``preference_specs``, ``scenario_specs``, ``scenarios``: every preference-model family of
  ``PREFERENCE_MODELS`` with its parameters in their valid ranges;
- ``aux_specs``: auxiliary models ``g_hat`` (the fixed ones by default);
- ``data_cases``: reproducible data sets (``DataCase``: a scenario spec and sampling settings whose
  ``pair_data()`` is what an estimator consumes), by default only those on which the MLE exists
  (``mle_exists``);
- ``feature_maps``: invertible linear maps of the features, by family;
- ``margins``, ``probabilities``, ``loss_batches``, ``margin_losses``: tensors and losses for
  loss-level tests.

Needs ``hypothesis`` (the ``test`` extra: ``pip install 'robust-rlhf[test]'``).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from robust_rlhf.theory.data import PairData
from robust_rlhf.theory.losses import Hinge, Logistic, MarginLoss, Squared, TruncatedHinge

from .auxiliary import AuxSpec
from .dataset import PreferenceData, sample
from .preferences import LINKS
from .scenario import PREFERENCE_MODELS, Scenario

__all__ = [
    "DEFAULT_AUX",
    "FIXED_AUX",
    "MAP_FAMILIES",
    "DataCase",
    "LossBatch",
    "aux_specs",
    "data_cases",
    "feature_maps",
    "loss_batches",
    "margin_losses",
    "margins",
    "mle_exists",
    "preference_specs",
    "probabilities",
    "scenario_specs",
    "scenarios",
]

#: auxiliary models that do not depend on the labelled data (``learned`` is cross-fitted on it)
FIXED_AUX = ("oracle", "noisy_oracle", "constant", "reversed", "random", "bt_plugin")
#: what ``aux_specs`` draws by default: the fixed models but ``bt_plugin`` (a BT fit on 500 extra pairs)
DEFAULT_AUX = ("oracle", "noisy_oracle", "constant", "reversed", "random")

#: families of invertible feature maps ``phi -> A phi`` (see ``feature_maps``)
MAP_FAMILIES = ("invertible", "similarity", "orthogonal", "diagonal")


def _value(nice: Sequence[float], low: float, high: float, *, exclude_high: bool = False) -> st.SearchStrategy[float]:
    """A round value from ``nice`` (shrinks to ``nice[0]``), else any float in ``[low, high]``, rounded to 3 digits."""
    def inside(v: float) -> bool:
        return low <= v < high if exclude_high else low <= v <= high

    anywhere = st.floats(low, high, allow_nan=False, allow_infinity=False, exclude_max=exclude_high)
    return st.one_of(st.sampled_from(list(nice)), anywhere.map(lambda v: round(v, 3)).filter(inside))


# --- scenarios ---------------------------------------------------------------------------------

def _params(model: str, d: int, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """Parameters of one preference model, in their valid ranges (``PREFERENCE_MODELS``)."""
    scale = _value([1.0, 2.0, 0.5, 4.0], 0.1, 8.0)
    link = st.sampled_from(list(LINKS))
    if model in ("bt",):
        return st.just({})
    if model in ("probit", "cauchy"):
        return st.fixed_dictionaries({"scale": scale})
    if model == "student_t":
        return st.fixed_dictionaries({"df": _value([2.0, 1.0, 5.0, 30.0], 0.5, 50.0), "scale": scale})
    if model == "temperature":
        return st.fixed_dictionaries({"temperature": _value([0.5, 1.0, 2.0, 0.25], 0.1, 5.0)})
    if model == "label_flip":
        return st.fixed_dictionaries({"eps": _value([0.2, 0.0, 0.1, 0.4], 0.0, 0.5, exclude_high=True),
                                      "base": _base(d, depth)})
    if model == "position_bias":
        return st.fixed_dictionaries({"bias": _value([1.0, 0.0, -1.0, 2.0], -3.0, 3.0), "base": _base(d, depth)})
    if model == "annotator_mixture":
        weights = st.sampled_from([[0.5, 0.5], [0.8, 0.2], [0.3, 0.3, 0.4]])
        return st.fixed_dictionaries({"weights": weights, "spread": _value([2.0, 0.0, 1.0, 3.0], 0.0, 4.0),
                                      "link": link})
    if model == "intransitive":
        return st.fixed_dictionaries({"strength": _value([1.0, 0.0, 0.5, 2.0], 0.0, 3.0), "link": link})
    if model == "near_deterministic":
        return st.fixed_dictionaries({"scale": _value([4.0, 1.0, 8.0], 0.5, 10.0),
                                      "spread": _value([1.5, 0.0, 0.5], 0.0, 2.0)})
    raise AssertionError(model)  # every model of PREFERENCE_MODELS has a branch (tested)


def _base(d: int, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """The base model of a label-flip or position-bias model: a link model (no deeper nesting)."""
    return preference_specs(["bt", "probit", "cauchy", "student_t", "temperature"], d=d, _depth=depth + 1)


def preference_specs(models: Sequence[str] | None = None, *, d: int = 3,
                     _depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Preference sub-specs ``{"model": NAME, ...parameters}`` of the given families (default: all of
    ``PREFERENCE_MODELS``; ``intransitive`` only when ``d >= 2``). Shrinks to ``{"model": "bt"}``."""
    names = list(PREFERENCE_MODELS) if models is None else list(models)
    unknown = [m for m in names if m not in PREFERENCE_MODELS]
    if unknown:
        raise ValueError(f"unknown preference model(s) {unknown}; allowed: {', '.join(PREFERENCE_MODELS)}")
    if d < 2:
        names = [m for m in names if m != "intransitive"]
    if not names:
        raise ValueError("no preference model applies (intransitive needs d >= 2)")
    return st.sampled_from(names).flatmap(
        lambda m: _params(m, d, _depth).map(lambda p, m=m: {"model": m, **p}))


def scenario_specs(
    models: Sequence[str] | None = None,
    *,
    d: st.SearchStrategy[int] | int = st.integers(1, 4),
    K: st.SearchStrategy[int] | int = st.integers(2, 5),
    feature_maps: Sequence[str] = ("gaussian", "linear", "tanh"),
    reference: Sequence[str] = ("uniform", "softmax"),
    identifiable: bool = True,
) -> st.SearchStrategy[dict[str, Any]]:
    """Valid scenario specs (``Scenario.from_spec``) over the preference families ``models``.

    With ``identifiable`` (default) the linear feature map gets ``prompt_dim >= d``: with fewer prompt
    dimensions every ``dphi`` of a two-response scenario lies in a ``prompt_dim``-dimensional
    subspace, so ``theta`` is not identified (a degenerate design, for hostile-input tests).
    Shrinks to ``{"d": 1, "K": 2, "preference": {"model": "bt"}}`` with Gaussian features, a uniform
    reference policy and ``structure_seed`` 0."""
    d_st = st.just(d) if isinstance(d, int) else d
    K_st = st.just(K) if isinstance(K, int) else K
    if models is not None and set(models) == {"intransitive"}:
        d_st = d_st.filter(lambda v: v >= 2)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        dd, kk = draw(d_st), draw(K_st)
        spec: dict[str, Any] = {"d": dd, "K": kk, "preference": draw(preference_specs(models, d=dd))}
        fmap = draw(st.sampled_from(list(feature_maps)))
        if fmap != "gaussian":
            low = dd if fmap == "linear" and identifiable else 1
            spec["features"] = {"map": fmap, "prompt_dim": draw(st.integers(low, low + 4))}
        policy = draw(st.sampled_from(list(reference)))
        if policy == "softmax":
            spec["reference"] = {"policy": "softmax", "temperature": draw(_value([1.0, 0.5, 2.0], 0.2, 5.0))}
        scale = draw(_value([1.5, 1.0, 3.0], 0.2, 4.0))
        if scale != 1.5:
            spec["reward_scale"] = scale
        seed = draw(st.integers(0, 3))
        if seed:
            spec["structure_seed"] = seed
        return spec

    return build()


def scenarios(models: Sequence[str] | None = None, **kwargs: Any) -> st.SearchStrategy[Scenario]:
    """Built ``Scenario`` objects from ``scenario_specs(models, **kwargs)``."""
    return scenario_specs(models, **kwargs).map(Scenario.from_spec)


def aux_specs(kinds: Sequence[str] = DEFAULT_AUX) -> st.SearchStrategy[AuxSpec]:
    """Auxiliary models ``g_hat`` of the given kinds with parameters in range (default ``DEFAULT_AUX``;
    ``FIXED_AUX`` adds ``bt_plugin``, and ``learned`` is cross-fitted on the labelled rows). Shrinks to the oracle."""
    options = {
        "oracle": st.just(AuxSpec("oracle")),
        "noisy_oracle": st.builds(lambda noise, seed: AuxSpec("noisy_oracle", noise=noise, seed=seed),
                                  _value([1.0, 0.5, 2.0], 0.0, 4.0), st.integers(0, 3)),
        "constant": st.builds(lambda v: AuxSpec("constant", value=v), _value([0.5, 0.9, 0.1, 0.0, 1.0], 0.0, 1.0)),
        "reversed": st.just(AuxSpec("reversed")),
        "random": st.builds(lambda scale, seed: AuxSpec("random", scale=scale, seed=seed),
                            _value([2.0, 1.0, 4.0], 0.0, 6.0), st.integers(0, 3)),
        "bt_plugin": st.builds(lambda seed: AuxSpec("bt_plugin", seed=seed), st.integers(0, 3)),
        "learned": st.builds(lambda folds: AuxSpec("learned", folds=folds), st.integers(2, 5)),
    }
    unknown = [k for k in kinds if k not in options]
    if unknown or not kinds:
        raise ValueError(f"aux kinds must be a non-empty subset of {', '.join(options)}, got {list(kinds)}")
    return st.one_of([options[k] for k in kinds])


# --- data sets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataCase:
    """A reproducible data set: a scenario ``spec`` and the arguments of ``simulate.sample``.

    ``pair_data()`` is what an estimator consumes; ``code()`` is Python that rebuilds it, so a
    shrunk counterexample can be pasted into a bug report.
    """

    spec: Mapping[str, Any]
    n: int
    seed: int = 0
    M: int | str = 1
    unlabelled: int = 0
    aux: Mapping[str, Any] | None = field(default_factory=lambda: {"kind": "oracle"})
    reps: int = 1

    @functools.cached_property
    def scenario(self) -> Scenario:
        """The built scenario."""
        return Scenario.from_spec(dict(self.spec))

    @functools.cached_property
    def preference_data(self) -> PreferenceData:
        """The simulated data set (with ``g*``, prompts and responses)."""
        return sample(self.scenario, self.n, self.seed, self.reps, M=self.M, unlabelled=self.unlabelled,
                      aux=None if self.aux is None else dict(self.aux))

    def pair_data(self) -> PairData:
        """The arrays the estimators consume (``PreferenceData.to_pair_data``)."""
        return self._pairs

    @functools.cached_property
    def _pairs(self) -> PairData:
        return self.preference_data.to_pair_data()

    def _kwargs(self) -> str:
        parts = [f"n={self.n}", f"seed={self.seed}"]
        if self.reps != 1:
            parts.append(f"reps={self.reps}")
        parts.append(f"M={self.M!r}")
        if self.unlabelled:
            parts.append(f"unlabelled={self.unlabelled}")
        parts.append(f"aux={None if self.aux is None else dict(self.aux)!r}")
        return ", ".join(parts)

    def code(self) -> str:
        """Python that rebuilds ``pair_data()``."""
        return (f"sample(Scenario.from_spec({json.dumps(dict(self.spec))}), {self._kwargs()}).to_pair_data()"
                "  # from robust_rlhf.simulate import Scenario, sample")

    def __repr__(self) -> str:
        return f"DataCase(spec={json.dumps(dict(self.spec))}, {self._kwargs()})"


def mle_exists(data: PairData) -> bool:
    r"""Whether the logistic MLE exists (is finite) on every replication of ``data``.

    It does not exactly when the labelled pairs are quasi-separated: some ``theta != 0`` has
    ``s_i theta . dphi_i >= 0`` for every pair, ``s_i = 2 Z_i - 1`` (Albert and Anderson 1984).
    Checked as the feasibility of that linear program with ``sum_i s_i theta . dphi_i = 1`` (pairs
    with ``dphi = 0``, the same response twice, carry no information and are left out)."""
    from scipy.optimize import linprog

    for r in range(data.reps):
        X = (2.0 * data.z[r] - 1.0)[:, None] * data.dphi[r]
        X = X[np.abs(X).max(axis=1) > 0]
        if X.shape[0] == 0:
            return False
        res = linprog(np.zeros(data.d), A_ub=-X, b_ub=np.zeros(X.shape[0]), A_eq=X.sum(0)[None], b_eq=[1.0],
                      bounds=[(None, None)] * data.d, method="highs")
        if res.status == 0:  # feasible: a (quasi-)separating direction exists
            return False
    return True


def data_cases(
    scenario: st.SearchStrategy[dict[str, Any]] | None = None,
    *,
    n: st.SearchStrategy[int] = st.integers(20, 120),
    M: st.SearchStrategy[int | str] = st.sampled_from([1, 2, 3, "exact"]),
    unlabelled: st.SearchStrategy[int] = st.one_of(st.just(0), st.integers(1, 20)),
    aux: st.SearchStrategy[AuxSpec] | None = None,
    seed: st.SearchStrategy[int] = st.integers(0, 2**16),
    reps: st.SearchStrategy[int] = st.just(1),
    separable: bool = False,
) -> st.SearchStrategy[DataCase]:
    """Data sets drawn from ``scenario`` specs (default: ``scenario_specs()``) with reference pairs and
    a fixed ``g_hat`` (default: ``aux_specs()``). Unless ``separable``, only data sets on which the
    MLE exists (``mle_exists``): on (quasi-)separated pairs a likelihood-based estimate does not
    exist, and an estimator must report that rather than return a number (``separable=True`` tests
    it). Shrinks to the BT control, ``n = 20``, ``M = 1``, no unlabelled prompts, seed 0 and the oracle."""
    scenario = scenario_specs() if scenario is None else scenario
    aux = aux_specs() if aux is None else aux
    cases = st.builds(DataCase, spec=scenario, n=n, seed=seed, M=M, unlabelled=unlabelled,
                      aux=aux.map(lambda a: a.to_dict()), reps=reps)
    return cases if separable else cases.filter(lambda c: mle_exists(c.pair_data()))


# --- feature maps ------------------------------------------------------------------------------

_NICE_SCALES = [1.0, 2.0, 0.5, 10.0, 0.1, 3.0]


def _orthogonal(d: int, perm: Sequence[int], signs: Sequence[int], angle: float) -> np.ndarray:
    """A signed permutation times a rotation by ``angle`` in the plane of the first two coordinates."""
    Q = np.zeros((d, d))
    Q[np.arange(d), list(perm)] = np.asarray(signs, dtype=float)
    if d >= 2 and angle:
        c, s = math.cos(angle), math.sin(angle)
        G = np.eye(d)
        G[:2, :2] = [[c, -s], [s, c]]
        Q = G @ Q
    return Q


def feature_maps(d: int, family: str = "invertible", *, max_condition: float = 100.0) -> st.SearchStrategy[np.ndarray]:
    r"""Invertible ``d x d`` matrices ``A`` for the map ``phi -> A phi`` (so ``dphi -> A dphi``).

    Families (each contains the next ones' identity-like members; all shrink to the identity):

    - ``invertible``: ``I + E`` with round entries of ``E``, condition number at most ``max_condition``;
    - ``similarity``: ``c Q``, a scale times an orthogonal matrix (signed permutation and a plane
      rotation); a criterion such as ``tr Cov`` changes only by the factor ``c^-2`` under these;
    - ``orthogonal``: ``Q`` alone (norm balls ``||theta|| <= B`` are preserved);
    - ``diagonal``: positive coordinate scales times a permutation (what tree-based learners, which
      are invariant to monotone maps of each feature, are equivariant under).
    """
    if family not in MAP_FAMILIES:
        raise ValueError(f"unknown map family {family!r}; allowed: {', '.join(MAP_FAMILIES)}")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    perm = st.permutations(list(range(d)))
    if family == "invertible":
        entries = st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.5, 2.0]), min_size=d * d, max_size=d * d)
        scale = st.sampled_from(_NICE_SCALES)
        return st.builds(lambda e, c: c * (np.eye(d) + np.reshape(e, (d, d))), entries, scale).filter(
            lambda A: np.linalg.cond(A) <= max_condition)
    if family == "diagonal":
        scales = st.lists(st.sampled_from(_NICE_SCALES), min_size=d, max_size=d)
        return st.builds(lambda s, p: np.diag(s)[:, list(p)], scales, perm)
    signs = st.lists(st.sampled_from([1, -1]), min_size=d, max_size=d)
    angle = st.sampled_from([0.0, math.pi / 6, math.pi / 4, math.pi / 3, math.pi / 2])
    Q = st.builds(lambda p, s, a: _orthogonal(d, p, s, a), perm, signs, angle)
    if family == "orthogonal":
        return Q
    return st.builds(lambda q, c: c * q, Q, st.sampled_from(_NICE_SCALES))


# --- loss-level tensors ------------------------------------------------------------------------

def margins(shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] = (5,), *, max_abs: float = 30.0,
            dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of margins in ``[-max_abs, max_abs]`` (shrink to zeros). Use ``max_abs=1e6`` for enormous
    margins: a stable loss must stay finite there."""
    shapes = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))
    elements = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=64)
    return shapes.flatmap(lambda s: hnp.arrays(np.float64, s, elements=elements)).map(
        lambda a: torch.as_tensor(a, dtype=dtype))


def probabilities(shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] = (5,), *,
                  dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of probabilities in ``[0, 1]``, endpoints and 1/2 included (shrink to zeros)."""
    shapes = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))
    elements = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0, allow_nan=False, width=64))
    return shapes.flatmap(lambda s: hnp.arrays(np.float64, s, elements=elements)).map(
        lambda a: torch.as_tensor(a, dtype=dtype))


@dataclass(frozen=True)
class LossBatch:
    """One batch for a loss-level test: labelled ``margin`` (B,), labels ``z`` (B,), ``g`` (B,);
    reference ``ref_margin`` and ``ref_g`` (B, M)."""

    margin: torch.Tensor
    z: torch.Tensor
    g: torch.Tensor
    ref_margin: torch.Tensor
    ref_g: torch.Tensor


def loss_batches(B: st.SearchStrategy[int] = st.integers(1, 6), M: st.SearchStrategy[int] = st.integers(1, 4),
                 *, max_abs: float = 30.0) -> st.SearchStrategy[LossBatch]:
    """Consistent tensors for a VR objective: margins, 0/1 labels and probabilities (shrink to B = M = 1)."""
    @st.composite
    def build(draw: st.DrawFn) -> LossBatch:
        b, m = draw(B), draw(M)
        z = draw(hnp.arrays(np.float64, (b,), elements=st.sampled_from([1.0, 0.0])))
        return LossBatch(margin=draw(margins((b,), max_abs=max_abs)), z=torch.as_tensor(z), g=draw(probabilities((b,))),
                         ref_margin=draw(margins((b, m), max_abs=max_abs)), ref_g=draw(probabilities((b, m))))

    return build()


def margin_losses(names: Sequence[str] = ("logistic", "truncated_hinge", "hinge", "ipo")) -> st.SearchStrategy[MarginLoss]:
    """Margin losses of ``theory.losses`` (the truncated hinge with its truncation ``s`` in ``[-2, 1)``)."""
    options = {
        "logistic": st.just(Logistic()),
        "hinge": st.just(Hinge()),
        "ipo": st.just(Squared()),
        "truncated_hinge": _value([-0.5, 0.0, -1.0], -2.0, 1.0, exclude_high=True).map(lambda s: TruncatedHinge(s=s)),
    }
    unknown = [k for k in names if k not in options]
    if unknown or not names:
        raise ValueError(f"losses must be a non-empty subset of {', '.join(options)}, got {list(names)}")
    return st.one_of([options[k] for k in names])
