"""Scenario specs: validation, round trips, files, the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from robust_rlhf.simulate import SCENARIOS, Scenario, SpecError, get_scenario


def test_spec_round_trip_is_canonical() -> None:
    for name in SCENARIOS:
        scenario = get_scenario(name)
        again = Scenario.from_spec(scenario.spec)
        assert again.spec == scenario.spec
        json.dumps(scenario.spec)  # JSON-serialisable provenance
        np.testing.assert_array_equal(again.theta_star, scenario.theta_star)


def test_structure_is_reproducible_and_seeded() -> None:
    a = Scenario.from_spec({"features": {"map": "tanh", "prompt_dim": 5}, "preference": "intransitive"})
    b = Scenario.from_spec({"features": {"map": "tanh", "prompt_dim": 5}, "preference": "intransitive"})
    c = Scenario.from_spec({"features": {"map": "tanh", "prompt_dim": 5}, "preference": "intransitive",
                            "structure_seed": 1})
    np.testing.assert_array_equal(a.features.weights, b.features.weights)
    np.testing.assert_array_equal(a.preference.skew, b.preference.skew)
    assert not np.array_equal(a.features.weights, c.features.weights)
    assert np.linalg.norm(a.theta_star) == pytest.approx(1.5)


@pytest.mark.parametrize("fmap,p", [("gaussian", 12), ("linear", 3), ("tanh", 3)])
def test_feature_maps(fmap: str, p: int) -> None:
    scenario = Scenario.from_spec({"features": {"map": fmap}})
    assert scenario.prompt_dim == p
    x = scenario.prompts(np.random.default_rng(0), (7, 5))
    phi = scenario.phi(x)
    assert phi.shape == (7, 5, 4, 3)
    if fmap == "tanh":
        assert np.abs(phi).max() <= 1
    if fmap == "gaussian":
        np.testing.assert_array_equal(phi[0, 0, 2], x[0, 0, 6:9])


def test_softmax_reference_policy() -> None:
    scenario = Scenario.from_spec({"reference": {"policy": "softmax", "temperature": 0.5}})
    x = scenario.prompts(np.random.default_rng(0), (10,))
    phi = scenario.phi(x)
    pi = scenario.reference.probs(phi)
    logits = phi @ scenario.theta_star / 0.5
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(pi, expected / expected.sum(-1, keepdims=True))
    assert scenario.spec["reference"]["theta"] == pytest.approx(list(scenario.theta_star))


@pytest.mark.parametrize("spec,match", [
    ({"preference": {"model": "label_flip", "eps": 0.5}}, r"'preference.eps' = 0.5 is outside the allowed range \[0, 1/2\)"),
    ({"preference": {"model": "label_flip", "eps": -0.1}}, r"preference.eps"),
    ({"K": 1}, r"field 'K' = 1 must be an integer >= 2"),
    ({"d": 0}, r"field 'd' = 0 must be an integer >= 1"),
    ({"d": 2.5}, r"field 'd' = 2.5 must be an integer"),
    ({"preference": {"model": "bogus"}}, r"'preference.model' = 'bogus' is unknown; allowed: bt, probit"),
    ({"preference": {"model": "probit", "sharpness": 2}}, r"unknown field 'preference.sharpness'; allowed: model, scale"),
    ({"colour": "red"}, r"unknown field 'colour'; allowed: name, description"),
    ({"features": {"map": "fourier"}}, r"'features.map' = 'fourier' is unknown; allowed: gaussian, linear, tanh"),
    ({"features": {"map": "gaussian", "prompt_dim": 4}}, "does not apply to the gaussian map"),
    ({"reference": {"policy": "uniform", "temperature": 2}}, "apply only to policy: softmax"),
    ({"reference": {"policy": "softmax", "temperature": 0}}, r"'reference.temperature' = 0 must be > 0"),
    ({"theta_star": [1, 2]}, r"'theta_star' must be a list of 3 finite numbers"),
    ({"preference": {"model": "student_t", "df": -1}}, r"'preference.df' = -1 must be > 0"),
    ({"preference": {"model": "annotator_mixture", "weights": [0.5, 0.6]}}, "positive numbers summing to 1"),
    ({"preference": {"model": "annotator_mixture", "thetas": [[1, 2, 3]]}}, r"2 x 3 finite numbers"),
    ({"preference": {"model": "annotator_mixture", "thetas": [[1, 2, "x"], [1, 2, 3]]}},
     r"'preference.thetas' must be a matrix of finite numbers"),
    ({"preference": {"model": "annotator_mixture", "thetas": [1, 2, 3]}}, r"'preference.thetas' must be a matrix"),
    ({"d": 1, "preference": "intransitive"}, "needs d >= 2"),
    ({"preference": {"model": "label_flip", "base": {"model": "probit", "scale": "big"}}},
     r"'preference.base.scale' = 'big' must be a number"),
])
def test_bad_specs_name_the_field(spec: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        Scenario.from_spec(spec)


def test_explicit_annotators_from_an_array_keep_the_spec_serialisable() -> None:
    """A numpy ``thetas`` is stored as lists of floats: the spec dumps to JSON and YAML (it was kept as an
    array, and ``json.dumps``, ``describe`` and ``save`` failed)."""
    thetas = np.array([[1.0, 0.0, 0.5], [-1.0, 2.0, 0.0]])
    sc = Scenario.from_spec({"preference": {"model": "annotator_mixture", "thetas": thetas}})
    assert sc.spec["preference"]["thetas"] == thetas.tolist()
    assert Scenario.from_spec(json.loads(json.dumps(sc.spec))).spec == sc.spec
    assert "thetas" in sc.describe()


@pytest.mark.parametrize("base", ["annotator_mixture", "intransitive", "near_deterministic"])
@pytest.mark.parametrize("wrap", [{"model": "label_flip", "eps": 0.0}, {"model": "position_bias", "bias": 0.0}],
                         ids=["label_flip", "position_bias"])
def test_a_neutral_wrapper_leaves_a_random_base_unchanged(base: str, wrap: dict) -> None:
    """Label flips at eps = 0 and a position bias of 0 give the base's g* exactly: the wrapper draws
    nothing, so the base's random structure (annotators, skew matrix, sharpness direction) is the same
    (it was redrawn, up to 1.0 apart in g*)."""
    plain = Scenario.from_spec({"preference": {"model": base}}).population(size=200, seed=1)
    wrapped = Scenario.from_spec({"preference": {**wrap, "base": {"model": base}}}).population(size=200, seed=1)
    np.testing.assert_allclose(wrapped.g_star, plain.g_star, rtol=0, atol=1e-15)


def test_unknown_scenario_lists_the_names() -> None:
    with pytest.raises(SpecError, match="unknown scenario 'bogus'; allowed: bt, probit, cauchy"):
        get_scenario("bogus")


def test_spec_files(tmp_path) -> None:
    spec = get_scenario("label_flip").spec
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert Scenario.from_spec(tmp_path / "s.yaml").spec == spec
    assert Scenario.from_spec(str(tmp_path / "s.json")).spec == spec
    (tmp_path / "bad.yaml").write_text("d: [1,\n  oops")
    with pytest.raises(SpecError, match="bad.yaml: cannot parse the spec"):
        Scenario.from_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a mapping of fields"):
        Scenario.from_spec(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError):
        Scenario.from_spec(tmp_path / "missing.yaml")


def test_describe_states_the_properties() -> None:
    text = get_scenario("position_bias").describe()
    assert "true utility (for regret): yes" in text
    assert "g*(a,b) + g*(b,a) = 1: no" in text
    assert "bias: 1.0" in text
    assert "no (preference-based gap)" in get_scenario("intransitive").describe()


def test_population_arrays() -> None:
    pop = get_scenario("position_bias").population(size=50, seed=1)
    assert pop.phi.shape == (50, 4, 3) and pop.pi.shape == (50, 4) and pop.g_star.shape == (50, 4, 4)
    assert pop.utility.shape == (50, 4)
    assert get_scenario("intransitive").population(size=10).utility is None
