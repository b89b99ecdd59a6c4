"""Policies, values, regret, preference gap and the pessimistic policy (theory/policies.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize

from robust_rlhf.theory import policies as pl
from robust_rlhf.theory.data import PairPopulation
from robust_rlhf.theory.errors import InputError

E = math.e


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# Two prompts, K = 2, d = 1: rewards at theta = 1 are (1, 0) and (0, 2); the utility disagrees on prompt 0.
PHI = np.array([[[1.0], [0.0]], [[0.0], [2.0]]])
PI_REF = np.array([[0.5, 0.5], [0.25, 0.75]])
UTIL = np.array([[0.0, 1.0], [3.0, 1.0]])
# position-biased preferences on prompt 0 (g(a,b) + g(b,a) != 1), BT-like on prompt 1
G_STAR = np.array([[[0.5, 0.7], [0.4, 0.5]], [[0.5, 0.2], [0.8, 0.5]]])


def _tiny_population() -> PairPopulation:
    return PairPopulation(PHI, PI_REF, G_STAR, UTIL)


def _random_population(seed: int, P: int = 5, K: int = 4, d: int = 3, utility: str = "linear") -> tuple:
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.full(K, 2.0), size=P)
    theta_star = rng.normal(size=d)
    x = phi[:, :, None, :] - phi[:, None, :, :]
    g = _sigmoid(x @ theta_star)
    util = phi @ theta_star if utility == "linear" else rng.normal(size=(P, K))
    return PairPopulation(phi, pi, g, util), theta_star


# ------------------------------------------------------------------------------------------ closed forms


def test_greedy_and_kl_policy_closed_form() -> None:
    np.testing.assert_array_equal(pl.greedy_policy(np.array([1.0]), PHI), [[1, 0], [0, 1]])
    # pi(a) = pi_ref(a) e^{r(a)/beta} / Z, beta = 1
    want = np.array([[E / (1 + E), 1 / (1 + E)], [0.25 / (0.25 + 0.75 * E**2), 0.75 * E**2 / (0.25 + 0.75 * E**2)]])
    np.testing.assert_allclose(pl.kl_policy(np.array([1.0]), PHI, PI_REF, 1.0), want, rtol=1e-14)
    # beta = 2 halves the rewards
    want2 = np.array([[E**0.5 / (1 + E**0.5), 1 / (1 + E**0.5)],
                      [0.25 / (0.25 + 0.75 * E), 0.75 * E / (0.25 + 0.75 * E)]])
    np.testing.assert_allclose(pl.kl_policy(np.array([1.0]), PHI, PI_REF, 2.0), want2, rtol=1e-14)
    np.testing.assert_allclose(pl.rewards(np.array([1.0]), PHI), [[1, 0], [0, 2]])


def test_greedy_ties_split_evenly() -> None:
    phi = np.array([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]])
    np.testing.assert_array_equal(pl.greedy_policy(np.array([1.0, 0.0]), phi), [[0.5, 0, 0, 0.5]])
    np.testing.assert_array_equal(pl.greedy_policy(np.array([1.0, 1.0]), phi), [[0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_array_equal(pl.greedy_policy(np.zeros(2), phi), np.full((1, 4), 0.25))


@pytest.mark.parametrize("compiled", [False, True])
def test_greedy_policy_does_not_depend_on_the_scale_of_theta(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ties were rewards within 1e-12 of the maximum whenever the rewards were below 1 in size: theta = 1e-13
    (1, 0.2) gave the uniform policy, (1, 0.2) the argmax. Now relative to the rewards' size, in the torch
    path and in the compiled regret kernel."""
    if compiled and not pl.kernels.available():
        pytest.skip("no compiled kernels")
    if not compiled:
        monkeypatch.setattr(pl.kernels, "available", lambda: False)
    phi = np.array([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.4]]])
    pop = PairPopulation(phi, np.full((1, 3), 1 / 3), np.full((1, 3, 3), 0.5), np.array([[0.0, 1.0, 0.5]]))
    for c in (1.0, 1e-13, 1e-200, 1e100):
        theta = c * np.array([1.0, 0.2])
        np.testing.assert_array_equal(pl.greedy_policy(theta, phi), [[1.0, 0.0, 0.0]])
        # the greedy policy picks response 0, whose utility is 0 against the best 1: regret 1 at every scale
        assert pl.theta_regret(theta[None], pop, kind="greedy").mean[0] == 1.0
    np.testing.assert_array_equal(pl.greedy_policy(np.zeros(2), phi), np.full((1, 3), 1 / 3))


def test_values_and_regret_closed_form() -> None:
    pop = _tiny_population()
    greedy = pl.greedy_policy(np.array([1.0]), PHI)
    # per-prompt values 0 and 1; per-prompt regrets 1 and 2 (se = sd([1, 2]) / sqrt(2) = 0.5)
    assert pl.value(greedy, UTIL) == pytest.approx((0.5, 0.5))
    assert pl.regret(greedy, pop) == pytest.approx((1.5, 0.5))
    assert pl.theta_regret(np.array([1.0]), pop) == pytest.approx((1.5, 0.5))
    np.testing.assert_array_equal(pl.optimal_policy(pop), [[0, 1], [1, 0]])
    assert pl.regret(pl.optimal_policy(pop), pop).mean == 0.0

    # KL: beta KL(pi || pi*) = beta [E_pi(r - U)/beta - log Z_r + log Z_U] per prompt (Gibbs identity)
    beta = 1.0
    r = np.array([[1.0, 0.0], [0.0, 2.0]])
    pi = pl.kl_policy(np.array([1.0]), PHI, PI_REF, beta)
    z_r = (PI_REF * np.exp(r / beta)).sum(1)
    z_u = (PI_REF * np.exp(UTIL / beta)).sum(1)
    per = (pi * (r - UTIL)).sum(1) - beta * np.log(z_r) + beta * np.log(z_u)
    assert per[0] == pytest.approx((E - 1) / (E + 1), rel=1e-13)  # prompt 0 by hand
    got = pl.regret(pi, pop, beta=beta)
    assert got.mean == pytest.approx(per.mean(), rel=1e-13)
    assert got.se == pytest.approx(abs(per[0] - per[1]) / 2, rel=1e-12)
    assert pl.theta_regret(np.array([1.0]), pop, kind="kl", beta=beta).mean == pytest.approx(per.mean(), rel=1e-13)
    # the same as a difference of J_beta values
    opt = pl.optimal_policy(pop, beta=beta)
    diff = pl.kl_value(opt, pop, None, beta).mean - pl.kl_value(pi, pop, None, beta).mean
    assert diff == pytest.approx(per.mean(), rel=1e-12)
    # J_beta(pi*) = beta E_x log Z_U
    assert pl.kl_value(opt, pop, None, beta).mean == pytest.approx(beta * np.log(z_u).mean(), rel=1e-13)
    # KL(pi || pi_ref) by hand on prompt 0: pi = (e, 1)/(1 + e), pi_ref uniform
    kl0 = E / (1 + E) * math.log(2 * E / (1 + E)) + 1 / (1 + E) * math.log(2 / (1 + E))
    assert pl.kl_divergence(pi, PI_REF)[0] == pytest.approx(kl0, rel=1e-13)
    # beta = inf is a policy (pi_ref), not a weight: a value or regret weighing KL = 0 by inf is refused
    np.testing.assert_allclose(pl.kl_policy(np.array([1.0]), PHI, PI_REF, math.inf), PI_REF)
    for call in (lambda: pl.regret(pi, pop, beta=math.inf), lambda: pl.kl_value(pi, pop, None, math.inf),
                 lambda: pl.theta_regret(np.array([1.0]), pop, kind="kl", beta=math.inf)):
        with pytest.raises(InputError, match="needs a finite weight"):
            call()


def test_kl_regret_infinite_outside_reference_support() -> None:
    pi_ref = np.array([[1.0, 0.0], [0.25, 0.75]])
    pop = PairPopulation(PHI, pi_ref, G_STAR, UTIL)
    greedy = pl.greedy_policy(np.array([-1.0]), PHI)  # picks response 1 on prompt 0, outside the support
    res = pl.regret(greedy, pop, beta=1.0)
    assert res.mean == math.inf and math.isnan(res.se)
    # the KL policy never leaves the support and its regret is finite; its optimum is pi_ref on prompt 0
    kl = pl.kl_policy(np.array([-1.0]), PHI, pi_ref, 1.0)
    assert kl[0, 1] == 0.0 and math.isfinite(pl.regret(kl, pop, beta=1.0).mean)
    np.testing.assert_array_equal(pl.optimal_policy(pop, beta=0.5)[0], [1.0, 0.0])


def test_preference_quantities_closed_form() -> None:
    pop = _tiny_population()
    gbar = pl.order_averaged_preference(G_STAR)
    assert gbar[0, 0, 1] == pytest.approx(0.65) and gbar[0, 1, 0] == pytest.approx(0.35)
    np.testing.assert_allclose(gbar + np.swapaxes(gbar, 1, 2), 1.0)
    # u(x0, .) = (0.5*0.5 + 0.5*0.65, 0.5*0.35 + 0.5*0.5); u(x1, .) = (0.25*0.5 + 0.75*0.2, 0.25*0.8 + 0.75*0.5)
    u = pl.preference_utility(pop)
    np.testing.assert_allclose(u, [[0.575, 0.425], [0.275, 0.575]], rtol=1e-14)
    np.testing.assert_array_equal(pl.best_response(pop), [[1, 0], [0, 1]])
    # P(pi_ref > pi_ref) = 1/2 for any preferences (gbar + gbar^T = 1)
    assert pl.win_rate(PI_REF, pop).mean == pytest.approx(0.5, abs=1e-15)
    assert pl.win_rate(pl.best_response(pop), pop) == pytest.approx((0.575, 0.0), abs=1e-15)
    gap = pl.preference_gap(PI_REF, pop)
    assert gap.mean == pytest.approx(0.075, rel=1e-12)
    assert pl.preference_gap(pl.best_response(pop), pop).mean == 0.0
    # greedy at theta = 1 takes response 0 then 1: gaps 0 and 0; theta = -1 takes 1 then 0: gaps 0.15, 0.3
    assert pl.theta_regret(np.array([1.0]), pop, measure="preference").mean == 0.0
    assert pl.theta_regret(np.array([-1.0]), pop, measure="preference") == pytest.approx((0.225, 0.075))


def test_intransitive_preferences() -> None:
    # rock-paper-scissors with no utility: against the uniform reference every response wins half the time
    rps = np.array([[0.5, 0.9, 0.1], [0.1, 0.5, 0.9], [0.9, 0.1, 0.5]])
    phi = np.eye(3)[None]
    pop = PairPopulation(phi, np.full((1, 3), 1 / 3), rps[None])
    np.testing.assert_allclose(pl.preference_utility(pop), 0.5)
    assert pl.theta_regret(np.array([3.0, 1.0, 0.0]), pop).mean == pytest.approx(0.0, abs=1e-15)  # default measure
    # against the reference (0.6, 0.3, 0.1) the best response is response 2 (it beats response 0)
    pop2 = PairPopulation(phi, np.array([[0.6, 0.3, 0.1]]), rps[None])
    u = 0.6 * rps[:, 0] + 0.3 * rps[:, 1] + 0.1 * rps[:, 2]
    np.testing.assert_allclose(pl.preference_utility(pop2)[0], u)
    np.testing.assert_array_equal(pl.best_response(pop2), [[0, 0, 1]])
    with pytest.raises(InputError, match="utility"):
        pl.theta_regret(np.zeros(3), pop2, measure="value")


def test_greedy_regret_zero_at_truth() -> None:
    pop, theta_star = _random_population(3, P=20)
    for scale in (1.0, 0.3, 7.0):  # any positive multiple of theta* gives the same greedy policy
        assert pl.theta_regret(scale * theta_star, pop).mean == 0.0
    assert pl.theta_regret(-theta_star, pop).mean > 0
    # KL regret is zero at theta* for the same beta, positive at a scaled theta*
    assert pl.theta_regret(theta_star, pop, kind="kl", beta=0.7).mean == pytest.approx(0.0, abs=1e-14)
    assert pl.theta_regret(2 * theta_star, pop, kind="kl", beta=0.7).mean > 1e-4


def test_kl_policy_limits() -> None:
    pop, theta_star = _random_population(4, P=10)
    theta = theta_star + 0.3
    greedy = pl.greedy_policy(theta, pop.phi)
    # gap between best and second-best reward >= 1e-2 here, so at beta = 1e-4 the error is <= e^{-100}
    r = np.sort(pl.rewards(theta, pop.phi), axis=1)
    assert (r[:, -1] - r[:, -2]).min() > 1e-2
    np.testing.assert_allclose(pl.kl_policy(theta, pop.phi, pop.pi, 1e-4), greedy, atol=1e-15)
    # beta -> inf: |pi - pi_ref| = O(max|r| / beta)
    np.testing.assert_allclose(pl.kl_policy(theta, pop.phi, pop.pi, 1e9), pop.pi, atol=1e-7)
    np.testing.assert_allclose(pl.kl_policy(theta, pop.phi, pop.pi, math.inf), pop.pi, rtol=1e-14)


def test_batched_theta_matches_loop() -> None:
    pop, theta_star = _random_population(5)
    thetas = theta_star + np.random.default_rng(0).normal(size=(6, pop.d))
    for kind, beta in (("greedy", None), ("kl", 0.5)):
        batch = pl.theta_regret(thetas, pop, kind=kind, beta=beta)
        for r in range(6):
            one = pl.theta_regret(thetas[r], pop, kind=kind, beta=beta)
            assert batch.mean[r] == pytest.approx(one.mean, rel=1e-13)
            assert batch.se[r] == pytest.approx(one.se, rel=1e-12)
        pols = pl.policy_from_theta(thetas, pop.phi, kind, pop.pi, beta)
        assert pols.shape == (6, pop.size, pop.K)


@pytest.mark.parametrize("chunk", [1, 7, 2**30])
def test_regret_chunks_change_nothing(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``theta_regret`` takes the replications in chunks of ``_REGRET_CHUNK`` table entries (one
    replication per chunk up to all at once): the same numbers up to rounding (the matrix product of the
    rewards may sum in another order for another shape)."""
    monkeypatch.setattr(pl.kernels, "available", lambda: False)  # the chunks are the torch path's
    pop, theta_star = _random_population(5)
    thetas = theta_star + np.random.default_rng(1).normal(size=(9, pop.d))
    want = {kind: pl.theta_regret(thetas, pop, kind=kind, beta=beta) for kind, beta in (("greedy", None), ("kl", 0.5))}
    monkeypatch.setattr(pl, "_REGRET_CHUNK", chunk)
    for kind, beta in (("greedy", None), ("kl", 0.5)):
        got = pl.theta_regret(thetas, pop, kind=kind, beta=beta)
        np.testing.assert_allclose(got.mean, want[kind].mean, rtol=1e-13, atol=1e-16)
        np.testing.assert_allclose(got.se, want[kind].se, rtol=1e-12, atol=1e-16)


@pytest.mark.skipif(not pl.kernels.available(), reason="no compiled kernels")
@given(seed=st.integers(0, 2**16), R=st.integers(1, 7), P=st.integers(1, 40), K=st.integers(1, 6),
       d=st.integers(1, 5), beta=st.sampled_from([1e-3, 0.5, 7.0]), ties=st.booleans())
def test_compiled_regret_matches_torch_path(seed: int, R: int, P: int, K: int, d: int, beta: float, ties: bool) -> None:
    """``theta_regret`` through ``kernels.policy_regret`` and through the torch tables: every policy class
    and measure, exact ties (integer features and rewards), reference policies with zeros (a greedy
    policy off their support has an infinite KL regret) and nearly deterministic KL policies."""
    rng = np.random.default_rng(seed)
    phi = rng.integers(-2, 3, size=(P, K, d)).astype(float) if ties else rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.ones(K), size=P) * (rng.uniform(size=(P, K)) < 0.7)
    pi[np.arange(P), rng.integers(0, K, P)] += 0.1  # every prompt keeps some support
    pi /= pi.sum(1, keepdims=True)
    util = rng.integers(-2, 3, size=(P, K)).astype(float) if ties else rng.normal(size=(P, K))
    pop = PairPopulation(phi, pi, rng.uniform(size=(P, K, K)), util)
    thetas = rng.integers(-1, 2, size=(R, d)).astype(float) if ties else rng.normal(size=(R, d))
    for kind, measure in itertools.product(("greedy", "kl"), ("value", "kl", "preference")):
        compiled = pl.theta_regret(thetas, pop, kind=kind, beta=beta, measure=measure)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pl.kernels, "available", lambda: False)
            want = pl.theta_regret(thetas, pop, kind=kind, beta=beta, measure=measure)
        np.testing.assert_allclose(compiled.mean, want.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(compiled.se, want.se, rtol=1e-9, atol=1e-14)


def _kl_regret_60_digits(rewards: np.ndarray, util: np.ndarray, pi: np.ndarray, beta: float) -> np.ndarray:
    """Per prompt ``beta KL(pi_r || pi_U)`` of the tilts ``pi_x ~ pi exp(x / beta)``, in 60-digit arithmetic."""
    import mpmath

    with mpmath.workdps(60):
        out = []
        for r_p, u_p, pi_p in zip(rewards, util, pi):
            tilt = lambda x: [mpmath.mpf(w) * mpmath.exp(mpmath.mpf(t) / beta) for w, t in zip(pi_p, x)]  # noqa: E731
            a, b = tilt(r_p), tilt(u_p)
            sa, sb = sum(a), sum(b)
            out.append(beta * sum(x / sa * mpmath.log((x / sa) / (y / sb)) for x, y in zip(a, b)))
        return np.array([float(x) for x in out])


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "torch"])
def test_kl_regret_keeps_its_precision_at_large_beta(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KL policy's KL regret ``beta KL(pi_theta || pi*_beta)`` near ``pi_ref``, against 60-digit arithmetic:
    the relative error is of order ``eps beta`` (the log-ratios' rounding, relative to ratios of order
    ``1 / beta``), bounded here by ``10 eps beta``; summing ``pi (log pi - log pi*)`` kept about 3 significant
    digits at ``beta = 1e6`` and none at 1e8 (terms of order ``1 / beta`` cancelling to ``1 / beta^2``)."""
    if compiled and not pl.kernels.available():
        pytest.skip("no compiled kernels")
    if not compiled:
        monkeypatch.setattr(pl.kernels, "available", lambda: False)
    pop, _ = _random_population(11, P=6, K=4, d=3, utility="random")
    theta = np.array([0.3, -1.2, 0.8])
    for beta in (1.0, 1e3, 1e6, 1e8):
        want = _kl_regret_60_digits(pop.phi @ theta, pop.utility, pop.pi, beta)
        got = pl.theta_regret(theta, pop, kind="kl", beta=beta, measure="kl")
        np.testing.assert_allclose(got.mean, want.mean(), rtol=max(1e-13, 1e-15 * beta))
        policy = pl.kl_policy(theta, pop.phi, pop.pi, beta)
        direct = pl.regret(policy, pop, beta=beta)
        np.testing.assert_allclose(direct.mean, want.mean(), rtol=max(1e-13, 1e-15 * beta))


@given(
    seed=st.integers(0, 10_000),
    K=st.integers(2, 5),
    beta=st.floats(1e-3, 1e3),
    scale=st.floats(0.0, 50.0),
)
def test_property_policies_are_distributions_and_regret_nonnegative(
    seed: int, K: int, beta: float, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    P, d = 4, 3
    phi = rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.ones(K), size=P)
    g = rng.uniform(size=(P, K, K))
    pop = PairPopulation(phi, pi, g, rng.normal(size=(P, K)))
    theta = scale * rng.normal(size=(3, d))
    for kind in pl.POLICY_KINDS:
        pol = pl.policy_from_theta(theta, phi, kind, pi, beta)
        assert (pol >= 0).all()
        np.testing.assert_allclose(pol.sum(-1), 1.0, atol=1e-12)
        for measure in pl.REGRET_MEASURES:
            res = pl.theta_regret(theta, pop, kind=kind, beta=beta, measure=measure)
            assert (np.asarray(res.mean) >= 0).all()
    assert pl.preference_gap(pl.best_response(pop), pop).mean == 0.0


# -------------------------------------------------------------------------------------------- pessimism


def test_confidence_radius_closed_form() -> None:
    assert pl.confidence_radius(1, 0.05) == pytest.approx(1.959963984540054, rel=1e-12)
    # chi2_2 has survival exp(-x/2): quantile -2 log(delta)
    assert pl.confidence_radius(2, 0.1) == pytest.approx(math.sqrt(-2 * math.log(0.1)), rel=1e-12)


def test_pessimistic_unknown_solver_is_named() -> None:
    with pytest.raises(InputError, match=r"solver: 'NOPE' is not installed; available: .*CLARABEL"):
        pl.pessimistic_policy(np.array([1.0]), np.eye(1), PHI, PI_REF, solver="NOPE")


def test_pessimistic_gamma_zero_is_greedy() -> None:
    pop, theta_star = _random_population(6, P=8)
    cov = np.diag([0.3, 0.1, 0.2])
    thetas = theta_star + 0.5 * np.random.default_rng(1).normal(size=(4, pop.d))
    for per_prompt in (False, True):
        got = pl.pessimistic_policy(thetas, cov, pop.phi, pop.pi, gamma=0.0, per_prompt=per_prompt)
        # an interior-point LP solution sits ~ tol / (reward gap) inside the optimal vertex (tol 1e-10)
        np.testing.assert_allclose(got, pl.greedy_policy(thetas, pop.phi), atol=1e-6)


def test_pessimistic_policy_does_not_depend_on_the_objective_scale() -> None:
    """``c (theta . w - gamma ||S w||)`` has the same maximiser for every ``c > 0``; the solver's absolute
    tolerances made the policy at ``c = 1e-8`` differ by 0.40 from that at ``c = 1``."""
    rng = np.random.default_rng(3)
    phi, ref = rng.normal(size=(8, 4, 3)), rng.dirichlet(np.ones(4), size=8)
    th, A = rng.normal(size=3), rng.normal(size=(3, 3))
    cov = 0.05 * A @ A.T
    base = pl.pessimistic_policy(th, cov, phi, ref, gamma=2.0)
    for c in (1e-6, 1e-8, 1e-9):
        np.testing.assert_allclose(pl.pessimistic_policy(c * th, c * c * cov, phi, ref, gamma=2.0), base, atol=1e-8)
    np.testing.assert_allclose(pl.pessimistic_policy(1e-9 * th, cov, phi, ref, gamma=0.0),
                               pl.greedy_policy(th, phi), atol=1e-6)


def test_kl_optimum_with_overflowing_rewards_is_named() -> None:
    """Utilities over beta beyond float range: an InputError (it returned NaN policies and an infinite
    regret), as for rewards theta . phi."""
    U, ref = np.array([[1e10, 0.0, -1e10]]), np.full((1, 3), 1 / 3)
    with pytest.raises(InputError, match=r"rewards / beta overflow \(largest \|reward\| 1e\+10, beta = 1e-300\)"):
        pl.optimal_policy(U, beta=1e-300, pi_ref=ref)


def _simplex_grid(K: int, steps: int) -> np.ndarray:
    pts = [c for c in itertools.product(range(steps + 1), repeat=K - 1) if sum(c) <= steps]
    return np.array([[*c, steps - sum(c)] for c in pts], dtype=float) / steps


def _refine(fun, x0: np.ndarray, P: int, K: int) -> float:
    """Local maximisation over the product of simplices from a starting policy (SLSQP)."""
    cons = [{"type": "eq", "fun": (lambda x, p=p: x[p * K:(p + 1) * K].sum() - 1.0)} for p in range(P)]
    def project(x: np.ndarray) -> np.ndarray:
        pol = np.clip(x.reshape(P, K), 0.0, None)
        return pol / pol.sum(axis=1, keepdims=True)

    res = optimize.minimize(lambda x: -fun(project(x)), x0.ravel(), method="SLSQP",
                            bounds=[(0, 1)] * (P * K), constraints=cons, options={"ftol": 1e-14, "maxiter": 500})
    return -float(res.fun)


def test_pessimistic_matches_brute_force_aggregate() -> None:
    # P = 2, K = 3, d = 2: all deterministic policies, a 1/30 simplex grid per prompt, then local polish
    rng = np.random.default_rng(11)
    phi = rng.normal(size=(2, 3, 2))
    pi = np.array([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]])
    theta_hat = np.array([1.0, 0.4])
    cov = np.array([[0.5, 0.2], [0.2, 0.3]])
    gamma = 1.7
    lcb = lambda pol: pl.lower_confidence_value(pol, theta_hat, cov, phi, gamma, pi_ref=pi)  # noqa: E731
    got = pl.pessimistic_policy(theta_hat, cov, phi, pi, gamma=gamma)
    best_det = max(lcb(np.eye(3)[[a, b]]) for a in range(3) for b in range(3))
    grid = _simplex_grid(3, 30)
    pols = np.stack(np.broadcast_arrays(grid[:, None, :], grid[None, :, :]), axis=2).reshape(-1, 2, 3)
    vals = pl.lower_confidence_value(pols, np.tile(theta_hat, (len(pols), 1)), cov, phi, gamma, pi_ref=pi)
    best_grid = vals.max()
    polished = _refine(lcb, pols[vals.argmax()], 2, 3)
    assert lcb(got) >= max(best_det, best_grid, polished) - 1e-8  # solver tolerance
    # here the optimum is a genuine mixture, strictly better than every deterministic policy
    assert lcb(got) > best_det + 1e-3
    np.testing.assert_allclose(got.sum(1), 1.0)


def test_pessimistic_matches_brute_force_per_prompt() -> None:
    rng = np.random.default_rng(12)
    phi = rng.normal(size=(2, 3, 2))
    pi = np.array([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]])
    theta_hat = np.array([0.8, -0.5])
    cov = np.array([[0.4, -0.1], [-0.1, 0.6]])
    gamma = 2.0
    got = pl.pessimistic_policy(theta_hat, cov, phi, pi, gamma=gamma, per_prompt=True)
    grid = _simplex_grid(3, 60)
    L = np.linalg.cholesky(cov)
    for p in range(2):  # the per-prompt objective is separable
        w = grid @ phi[p] - pi[p] @ phi[p]
        vals = w @ theta_hat - gamma * np.linalg.norm(w @ L, axis=1)
        wg = got[p] @ phi[p] - pi[p] @ phi[p]
        mine = wg @ theta_hat - gamma * np.linalg.norm(wg @ L)
        assert mine >= vals.max() - 1e-8  # solver gap tolerance 1e-10 (1e-8 if 'inaccurate')


def test_pessimistic_tradeoff_against_greedy() -> None:
    pop, theta_star = _random_population(7, P=6)
    thetas = theta_star + 0.4 * np.random.default_rng(2).normal(size=(5, pop.d))
    cov = np.diag([0.5, 0.2, 0.3])
    gamma = pl.confidence_radius(pop.d, 0.05)
    pess = pl.pessimistic_policy(thetas, cov, pop.phi, pop.pi)  # default gamma from delta = 0.05
    np.testing.assert_allclose(pess, pl.pessimistic_policy(thetas, cov, pop.phi, pop.pi, gamma=gamma), atol=1e-12)
    greedy = pl.greedy_policy(thetas, pop.phi)
    # no better in the estimated value theta_hat . E_x phi(x, pi) ...
    est = lambda pol: np.einsum("rd,rd->r", thetas, pl.policy_features(pol, pop.phi))  # noqa: E731
    assert (est(pess) <= est(greedy) + 1e-9).all()
    # ... but better in the lower confidence bound, strictly for at least one replication
    lcb_p = pl.lower_confidence_value(pess, thetas, cov, pop.phi, gamma, pi_ref=pop.pi)
    lcb_g = pl.lower_confidence_value(greedy, thetas, cov, pop.phi, gamma, pi_ref=pop.pi)
    assert (lcb_p >= lcb_g - 1e-9).all() and (lcb_p > lcb_g + 1e-3).any()
    # per-replication covariances and radii give the same answer as a loop
    covs = np.stack([cov * (1 + r) for r in range(5)])
    gammas = np.linspace(0.5, 2.5, 5)
    batch = pl.pessimistic_policy(thetas, covs, pop.phi, pop.pi, gamma=gammas)
    for r in (0, 4):
        one = pl.pessimistic_policy(thetas[r], covs[r], pop.phi, pop.pi, gamma=gammas[r])
        np.testing.assert_allclose(batch[r], one, atol=1e-8)


def test_pessimistic_canonical_policy_closed_form() -> None:
    # responses 0 and 1 share a feature, so only m = pi(0) + pi(1) matters: LCB = (m - 0.6) - 0.5 |m - 0.6|
    # (v = phi(pi_ref) = 0.6) is maximised at m = 1; among those policies the one closest to pi_ref in
    # squared distance is pi(0) = 0.5 + (1 - 0.6) / 2 = 0.7, pi(1) = 0.1 + 0.2 = 0.3
    phi = np.array([[[1.0], [1.0], [0.0]]])
    pi_ref = np.array([[0.5, 0.1, 0.4]])
    for per_prompt in (False, True):
        got = pl.pessimistic_policy(np.array([1.0]), np.eye(1), phi, pi_ref, gamma=0.5, per_prompt=per_prompt)
        np.testing.assert_allclose(got, [[0.7, 0.3, 0.0]], atol=1e-7)
    # without a reference the anchor is uniform: an even split (and v = 0)
    got = pl.pessimistic_policy(np.array([1.0]), np.eye(1), phi, gamma=0.5)
    np.testing.assert_allclose(got, [[0.5, 0.5, 0.0]], atol=1e-7)


def test_pessimistic_huge_radius_stays_at_reference_features() -> None:
    # gamma -> inf: the LCB is maximised by w(pi) = 0, i.e. E_x phi(x, pi) = E_x phi(x, pi_ref)
    pop, theta_star = _random_population(8, P=3)
    pol = pl.pessimistic_policy(theta_star, np.eye(pop.d), pop.phi, pop.pi, gamma=1e6)
    np.testing.assert_allclose(pl.policy_features(pol, pop.phi), pl.policy_features(pop.pi, pop.phi), atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_input_error() -> None:
    pop = _tiny_population()
    # rewards theta . phi (over beta) that overflow: NaN policies, and the compiled regret skipped the NaN
    # entries (a regret of 0 where the torch path gave NaN)
    with pytest.raises(InputError, match=r"theta: the rewards theta . phi / beta can overflow"):
        pl.kl_policy(np.array([1.0]), PHI, PI_REF, 1e-320)
    with pytest.raises(InputError, match=r"theta: the rewards theta . phi / beta can overflow"):
        pl.theta_regret(np.ones(pop.d), pop, kind="kl", beta=1e-320)
    with pytest.raises(InputError, match=r"theta: the rewards theta . phi can overflow"):
        pl.theta_regret(1e308 * np.ones(pop.d), pop)
    with pytest.raises(InputError, match=r"theta: the rewards theta . phi can overflow"):
        pl.greedy_policy(np.array([1e308]), 1e10 * PHI)
    for beta in (float("nan"), -3.0, "x"):  # checked although the greedy policy's value regret does not use it
        with pytest.raises(InputError, match="beta"):
            pl.theta_regret(np.ones(pop.d), pop, beta=beta)
    with pytest.raises(InputError, match="beta"):
        pl.kl_policy(np.array([1.0]), PHI, PI_REF, 0.0)
    with pytest.raises(InputError, match="theta"):
        pl.greedy_policy(np.array([1.0, 2.0]), PHI)
    with pytest.raises(InputError, match="policy"):
        pl.value(np.array([[0.5, 0.6], [0.5, 0.5]]), UTIL)
    with pytest.raises(InputError, match="policy"):
        pl.regret(np.ones((2, 3)) / 3, pop)
    with pytest.raises(InputError, match="phi"):
        pl.greedy_policy(np.array([1.0]), np.array([[np.nan], [1.0]])[None])
    with pytest.raises(InputError, match="cov"):
        pl.pessimistic_policy(np.array([1.0]), np.array([[-1.0]]), PHI, PI_REF)
    with pytest.raises(InputError, match="cov"):
        pl.pessimistic_policy(np.array([1.0, 0.0]), np.array([[1.0, 0.5], [0.0, 1.0]]), np.ones((2, 2, 2)))
    with pytest.raises(InputError, match="gamma"):
        pl.pessimistic_policy(np.array([1.0]), np.eye(1), PHI, PI_REF, gamma=-1.0)
    with pytest.raises(InputError, match="delta"):
        pl.confidence_radius(2, 1.5)
    with pytest.raises(InputError, match="kind"):
        pl.policy_from_theta(np.array([1.0]), PHI, "softmax")
    with pytest.raises(InputError, match="measure"):
        pl.theta_regret(np.array([1.0]), pop, measure="win")
    with pytest.raises(InputError, match="beta"):
        pl.theta_regret(np.array([1.0]), pop, kind="greedy", measure="kl")
    with pytest.raises(InputError, match="solver"):
        pl.pessimistic_policy(np.array([1.0]), np.eye(1), PHI, PI_REF, solver="NO_SUCH_SOLVER")
    with pytest.raises(InputError, match="v"):
        pl.pessimistic_policy(np.array([1.0]), np.eye(1), PHI, v=np.zeros(3))


def test_pessimistic_program_cache_changes_nothing() -> None:
    """The compiled program is kept per feature table: a replication solved after others on the same
    table, after one on another table, and by a freshly compiled program gives the same policy."""
    rng = np.random.default_rng(3)
    phi, other = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3, 2))
    pi = np.full((4, 3), 1 / 3)
    thetas = rng.normal(size=(3, 2))
    cov = np.array([[0.3, 0.1], [0.1, 0.2]])
    pl._PROGRAMS.__dict__.clear()
    fresh = pl.pessimistic_policy(thetas[2], cov, phi, pi_ref=pi, gamma=1.0)
    assert len(pl._PROGRAMS.cache) == 1
    pl.pessimistic_policy(thetas[0], cov, phi, pi_ref=pi, gamma=1.0)
    pl.pessimistic_policy(thetas[1], cov, other, pi_ref=pi, gamma=1.0)
    assert len(pl._PROGRAMS.cache) == 2
    np.testing.assert_array_equal(pl.pessimistic_policy(thetas[2], cov, phi, pi_ref=pi, gamma=1.0), fresh)
    for _ in range(5):  # at most 4 tables are kept
        pl.pessimistic_policy(thetas[0], cov, rng.normal(size=(4, 3, 2)), pi_ref=pi, gamma=1.0)
    assert len(pl._PROGRAMS.cache) == 4
