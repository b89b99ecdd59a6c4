"""Preference models: ranges, antisymmetry where claimed, reductions to closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import expit
from scipy.stats import norm, t as student

from robust_rlhf.simulate import PREFERENCE_MODELS, Scenario, get_scenario, link_function, scenario_names
from robust_rlhf.theory.errors import InputError

FEATURES = st.integers(0, 2**31 - 1).map(lambda s: np.random.default_rng(s))


def _random_pairs(scenario: Scenario, rng: np.random.Generator, m: int = 64):
    x = scenario.prompts(rng, (m,))
    phi = scenario.phi(x)
    return x, phi[:, 0], phi[:, 1]


@pytest.mark.parametrize("name", scenario_names())
@given(rng=FEATURES)
def test_probabilities_in_range_and_antisymmetry_as_documented(name: str, rng: np.random.Generator) -> None:
    scenario = get_scenario(name)
    x, a, b = _random_pairs(scenario, rng)
    gab = scenario.preference.prob(x, a, b)
    gba = scenario.preference.prob(x, b, a)
    assert gab.shape == (64,)
    assert ((gab >= 0) & (gab <= 1)).all()
    if scenario.antisymmetric:
        np.testing.assert_allclose(gab + gba, 1.0, atol=1e-12)
    else:
        assert np.abs(gab + gba - 1.0).max() > 1e-3
    # identical responses tie exactly, except under position bias
    gaa = scenario.preference.prob(x, a, a)
    if scenario.antisymmetric:
        np.testing.assert_allclose(gaa, 0.5, atol=1e-12)


@pytest.mark.parametrize("name", scenario_names())
def test_utility_documented(name: str) -> None:
    scenario = get_scenario(name)
    x, a, _ = _random_pairs(scenario, np.random.default_rng(0), 5)
    u = scenario.preference.utility(x, scenario.phi(x))
    assert (u is not None) == scenario.has_utility
    assert scenario.has_utility == (name != "intransitive")


def test_bt_is_the_sigmoid_of_the_reward_difference() -> None:
    scenario = get_scenario("bt")
    x, a, b = _random_pairs(scenario, np.random.default_rng(1))
    np.testing.assert_allclose(scenario.preference.prob(x, a, b), expit((a - b) @ scenario.theta_star), rtol=1e-14)


@pytest.mark.parametrize("link,cdf", [
    ("logistic", expit), ("probit", norm.cdf), ("cauchy", lambda u: 0.5 + np.arctan(u) / np.pi),
    ("student_t", lambda u: student.cdf(u, 3.0)),
])
def test_links_are_symmetric_cdfs(link: str, cdf) -> None:
    u = np.linspace(-30, 30, 121)
    F = link_function(link, df=3.0)
    np.testing.assert_allclose(F(u), cdf(u), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(F(-u), 1 - F(u), atol=1e-14)
    assert F(np.array(0.0)) == 0.5


def test_label_flip_and_position_bias_formulas() -> None:
    rng = np.random.default_rng(2)
    flip = Scenario.from_spec({"preference": {"model": "label_flip", "eps": 0.1}})
    x, a, b = _random_pairs(flip, rng)
    np.testing.assert_allclose(flip.preference.prob(x, a, b), 0.1 + 0.8 * expit((a - b) @ flip.theta_star))
    pos = Scenario.from_spec({"preference": {"model": "position_bias", "bias": 0.7, "base": {"model": "probit"}}})
    np.testing.assert_allclose(pos.preference.prob(x, a, b),
                               expit(np.log(norm.cdf((a - b) @ pos.theta_star) / norm.sf((a - b) @ pos.theta_star)) + 0.7))
    assert not pos.antisymmetric and pos.has_utility


def test_position_bias_keeps_the_log_odds_of_a_saturated_base() -> None:
    """``sigmoid(logit(g) + bias)`` lost the logit where ``g`` rounds to 1 (a margin of 40 with bias -40 gave
    1 instead of 1/2); an antisymmetric base's log-odds are ``log g(a,b) - log g(b,a)``."""
    for m, bias in [(20.0, -10.0), (25.0, -15.0), (30.0, -30.0), (36.0, -36.0), (40.0, -40.0), (-40.0, 45.0)]:
        sc = Scenario.from_spec({"d": 1, "K": 2, "theta_star": [1.0],
                                 "preference": {"model": "position_bias", "bias": bias}})
        g = sc.preference.prob(np.zeros(2), np.array([m]), np.array([0.0]))
        assert g == pytest.approx(expit(m + bias), rel=1e-14)
    # a base that is not antisymmetric (a position bias itself) keeps logit(g): the biases add
    nested = Scenario.from_spec({"d": 1, "K": 2, "theta_star": [1.0], "preference": {
        "model": "position_bias", "bias": 0.5, "base": {"model": "position_bias", "bias": -2.0}}})
    u = np.linspace(-8.0, 8.0, 17)[:, None]
    np.testing.assert_allclose(nested.preference.prob(np.zeros(2), u, np.zeros_like(u)), expit(u[:, 0] - 1.5),
                               rtol=1e-12)


def test_link_function_errors_name_the_problem() -> None:
    with pytest.raises(InputError, match="link: unknown link 'gumbel'; allowed: logistic, probit"):
        link_function("gumbel")
    for df in (-1.0, 0.0, float("nan"), float("inf"), "three"):
        with pytest.raises(InputError, match="df: the Student-t link needs finite degrees of freedom > 0"):
            link_function("student_t", df=df)


def test_mixture_intransitive_and_context_dependent_formulas() -> None:
    rng = np.random.default_rng(3)
    mix = Scenario.from_spec({"preference": {"model": "annotator_mixture", "weights": [0.3, 0.7],
                                             "thetas": [[1, 0, 0], [0, 0, -2]]}})
    x, a, b = _random_pairs(mix, rng)
    dphi = a - b
    np.testing.assert_allclose(mix.preference.prob(x, a, b), 0.3 * expit(dphi[:, 0]) + 0.7 * expit(-2 * dphi[:, 2]))
    np.testing.assert_allclose(mix.preference.utility(x, mix.phi(x)), mix.phi(x) @ np.array([0.3, 0, -1.4]))
    # a Student-t link takes the spec's degrees of freedom, for the mixture and the intransitive model
    mix_t = Scenario.from_spec({"preference": {"model": "annotator_mixture", "weights": [0.3, 0.7], "link": "student_t",
                                               "df": 5.0, "thetas": [[1, 0, 0], [0, 0, -2]]}})
    np.testing.assert_allclose(mix_t.preference.prob(x, a, b),
                               0.3 * student.cdf(dphi[:, 0], 5.0) + 0.7 * student.cdf(-2 * dphi[:, 2], 5.0))
    intr_t = get_scenario("intransitive", preference={"model": "intransitive", "link": "student_t", "df": 7.0})
    np.testing.assert_allclose(intr_t.preference.prob(x, a, b), student.cdf(
        dphi @ intr_t.theta_star + np.einsum("mi,ij,mj->m", a, intr_t.preference.skew, b), 7.0))

    intr = get_scenario("intransitive")
    A = intr.preference.skew
    np.testing.assert_allclose(A, -A.T)
    np.testing.assert_allclose(intr.preference.prob(x, a, b),
                               expit(dphi @ intr.theta_star + np.einsum("mi,ij,mj->m", a, A, b)))
    # a preference cycle exists among the responses of some prompt (no utility can explain it)
    big = get_scenario("intransitive", preference={"model": "intransitive", "strength": 4.0})
    xs = big.prompts(np.random.default_rng(0), (400,))
    G = big.g_star_matrix(xs, big.phi(xs)) > 0.5
    cyc = G[:, 0, 1] & G[:, 1, 2] & G[:, 2, 0] | G[:, 0, 2] & G[:, 2, 1] & G[:, 1, 0]
    assert cyc.any()

    nd = get_scenario("near_deterministic")
    kappa = nd.preference.sharpness(x)
    np.testing.assert_allclose(nd.preference.prob(x, a, b), expit(kappa * (dphi @ nd.theta_star)))
    # log kappa ~ N(log 4, 1.5^2): the sd of 64 draws has relative se 1/sqrt(128) ~ 9%, 25% is ~2.8 se
    assert np.std(np.log(kappa)) == pytest.approx(1.5, rel=0.25)


def test_every_model_is_registered_or_composable() -> None:
    assert set(PREFERENCE_MODELS) == set(scenario_names())


def test_near_deterministic_ties_stay_one_half_at_any_sharpness() -> None:
    """kappa(x) = scale exp(spread v . x) overflows to inf at a large spread; inf times the margin 0 of a
    response against itself was NaN, and ``sample`` drew its label as ``U < NaN`` = 0 without a word."""
    from robust_rlhf.simulate import sample

    sc = Scenario.from_spec({"preference": {"model": "near_deterministic", "spread": 500.0}})
    data = sample(sc, n=4000, seed=0, M=2)
    tie = data.y[..., 0] == data.y[..., 1]
    assert tie.any() and np.isinf(sc.preference.sharpness(data.x)).any()
    assert (data.g_star[tie] == 0.5).all() and np.isin(data.g_star[~tie], (0.0, 1.0)).any()
    assert ((data.g_star >= 0) & (data.g_star <= 1)).all()
    assert np.isfinite(data.ref_g_star).all() and np.isfinite(data.g_hat).all()
