"""The kit's hypothesis strategies: valid draws, every family covered, small readable shrinks."""

from __future__ import annotations

from random import Random

import numpy as np
import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from robust_rlhf.simulate import PREFERENCE_MODELS, AuxSpec, Scenario
from robust_rlhf.simulate.strategies import (
    DEFAULT_AUX,
    MAP_FAMILIES,
    DataCase,
    aux_specs,
    data_cases,
    feature_maps,
    loss_batches,
    margin_losses,
    margins,
    mle_exists,
    preference_specs,
    probabilities,
    scenario_specs,
)
from robust_rlhf.theory.data import PairData
from robust_rlhf.theory.losses import MarginLoss, pair_loss

QUIET = settings(database=None, deadline=None)


def _minimal(strategy, condition=lambda v: True):
    return find(strategy, condition, settings=settings(QUIET, max_examples=200), random=Random(0))


@given(spec=scenario_specs())
def test_scenario_specs_are_valid(spec: dict) -> None:
    scenario = Scenario.from_spec(spec)
    assert scenario.d == spec["d"] and scenario.K == spec["K"]
    assert scenario.spec["preference"]["model"] == spec["preference"]["model"]


@pytest.mark.parametrize("model", list(PREFERENCE_MODELS))
def test_every_family_has_valid_parameters(model: str) -> None:
    """Each family on its own: drawn specs build, and parameters other than the defaults occur."""
    seen = []

    @QUIET
    @given(spec=scenario_specs([model], d=st.integers(2, 3)))
    def check(spec: dict) -> None:
        Scenario.from_spec(spec)
        seen.append(spec["preference"])

    check()
    assert all(p["model"] == model for p in seen)
    if model != "bt":
        assert len({repr(sorted(p.items())) for p in seen}) > 1


def test_shrinks_to_the_simplest_case() -> None:
    assert _minimal(scenario_specs()) == {"d": 1, "K": 2, "preference": {"model": "bt"}}
    assert _minimal(preference_specs(["probit", "label_flip"])) == {"model": "probit", "scale": 1.0}
    flip = _minimal(preference_specs(["label_flip"]))
    assert flip == {"model": "label_flip", "eps": 0.2, "base": {"model": "bt"}}
    assert _minimal(aux_specs()) == AuxSpec("oracle")
    case = _minimal(data_cases(separable=True))  # (the default filter only moves the seed)
    assert repr(case) == ('DataCase(spec={"d": 1, "K": 2, "preference": {"model": "bt"}}, n=20, seed=0, M=1, '
                          "aux={'kind': 'oracle'})")
    # a counterexample that needs a parameter away from its default shrinks to a round value
    scale = _minimal(preference_specs(["probit"]), lambda p: p["scale"] > 1.0)
    assert scale == {"model": "probit", "scale": 2.0}


def test_intransitive_needs_two_features() -> None:
    with pytest.raises(ValueError, match="intransitive needs d >= 2"):
        preference_specs(["intransitive"], d=1)
    spec = _minimal(scenario_specs(["intransitive"]))
    assert spec["d"] == 2 and spec["preference"] == {"model": "intransitive", "strength": 1.0, "link": "logistic"}


@settings(max_examples=10)
@given(case=data_cases())
def test_data_cases_rebuild_from_their_code(case: DataCase) -> None:
    from robust_rlhf.simulate import Scenario, sample  # noqa: F401  (the names the code uses)

    data = case.pair_data()
    assert isinstance(data, PairData) and data.n == case.n and data.n_ref > 0
    again = eval(case.code().split("  #")[0])
    np.testing.assert_array_equal(again.dphi, data.dphi)
    np.testing.assert_array_equal(again.g_ref, data.g_ref)


def test_mle_exists() -> None:
    """Separated, quasi-separated (a tie) and overlapping labels; pairs with dphi = 0 are ignored."""
    x = np.array([[[1.0, 0.0], [2.0, 1.0], [-1.0, 0.5], [0.0, 0.0], [-2.0, -1.0]]])
    separated = PairData(dphi=x, z=np.array([[1.0, 1.0, 0.0, 1.0, 0.0]]))
    assert not mle_exists(separated)
    both = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    assert mle_exists(PairData(dphi=both, z=np.array([[1.0, 0.0, 1.0, 0.0, 1.0]])))  # both labels everywhere
    quasi = PairData(dphi=np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]]), z=np.ones((1, 3)))
    assert not mle_exists(quasi)  # theta = (t, 0) separates the first pair and ties the others: t -> inf


@given(aux=aux_specs())
def test_aux_specs_are_fixed_models(aux: AuxSpec) -> None:
    assert aux.kind in DEFAULT_AUX


def test_identifiable_linear_features() -> None:
    """With the default ``identifiable`` the linear map has prompt_dim >= d, so dphi spans R^d."""
    @QUIET
    @given(spec=scenario_specs(feature_maps=("linear",)))
    def check(spec: dict) -> None:
        assert spec["features"]["prompt_dim"] >= spec["d"]

    check()
    degenerate = _minimal(scenario_specs(feature_maps=("linear",), identifiable=False, d=3),
                          lambda s: s["features"]["prompt_dim"] < 3)
    assert degenerate["features"] == {"map": "linear", "prompt_dim": 1}


@pytest.mark.parametrize("family", MAP_FAMILIES)
def test_feature_maps(family: str) -> None:
    @QUIET
    @given(A=feature_maps(3, family))
    def check(A: np.ndarray) -> None:
        assert A.shape == (3, 3) and np.linalg.cond(A) <= 100
        s = np.linalg.svd(A, compute_uv=False)
        if family in ("similarity", "orthogonal"):
            np.testing.assert_allclose(s, s[0], rtol=1e-12)  # c Q: all singular values equal
        if family == "orthogonal":
            np.testing.assert_allclose(A @ A.T, np.eye(3), atol=1e-12)
        if family == "diagonal":
            assert ((A >= 0).all() and (np.count_nonzero(A, axis=0) == 1).all()
                    and (np.count_nonzero(A, axis=1) == 1).all())

    check()
    np.testing.assert_array_equal(_minimal(feature_maps(3, family)), np.eye(3))


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown preference model"):
        preference_specs(["logit"])
    with pytest.raises(ValueError, match="aux kinds"):
        aux_specs(["perfect"])
    with pytest.raises(ValueError, match="unknown map family"):
        feature_maps(2, "affine")
    with pytest.raises(ValueError, match="losses must be"):
        margin_losses(["squared"])


@given(batch=loss_batches(), loss=margin_losses())
def test_loss_batches_and_losses(batch, loss: MarginLoss) -> None:
    """The tensors are consistent, and the soft pair loss is invariant under a swap on them:
    ``m_{1-g}(-u) = m_g(u)`` for every loss of theory (a loss-level use of the strategies)."""
    B, M = batch.ref_margin.shape
    assert batch.margin.shape == batch.g.shape == batch.z.shape == (B,) and batch.ref_g.shape == (B, M)
    assert ((batch.g >= 0) & (batch.g <= 1)).all() and set(batch.z.tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(pair_loss(loss, -batch.ref_margin, 1 - batch.ref_g),
                               pair_loss(loss, batch.ref_margin, batch.ref_g), rtol=1e-12, atol=1e-12)


@given(u=margins((4,), max_abs=1e6), g=probabilities((4,)))
def test_enormous_margins_keep_the_logistic_pair_loss_finite(u: torch.Tensor, g: torch.Tensor) -> None:
    from robust_rlhf.theory.losses import Logistic

    assert torch.isfinite(pair_loss(Logistic(), u, g)).all()
