"""DRPO: the doubly robust pseudo-rewards, the estimator and its exact limit (theory/drpo.py)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_rlhf.simulate.dataset import sample_drpo, sample_population
from robust_rlhf.theory import crossfit, drpo
from robust_rlhf.theory.data import PairPopulation
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.policies import _log_ref, kl_policy, preference_utility, win_rate


def _population(seed: int, P: int, K: int, d: int, bias: float = 0.0) -> PairPopulation:
    """Two annotators with sharp links (intransitive-free but far from BT), plus position bias ``bias``."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.full(K, 2.0), size=P)
    t1, t2 = rng.normal(size=d), rng.normal(size=d)
    dphi = phi[:, :, None, :] - phi[:, None, :, :]
    g = 0.5 / (1.0 + np.exp(-4.0 * dphi @ t1)) + 0.5 / (1.0 + np.exp(-4.0 * dphi @ t2))
    return PairPopulation(phi, pi, (1.0 - bias) * g + bias * 0.7)


def _wrong_models(pop: PairPopulation, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``g_hat`` unrelated to ``g*`` and a ``pi_hat`` unrelated to ``pi_ref`` (both positive everywhere)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.05, 0.95, size=pop.g_star.shape), rng.dirichlet(np.full(pop.K, 2.0), size=pop.size)


def _enumerated_mean(pop: PairPopulation, g_hat: np.ndarray, pi_hat: np.ndarray) -> np.ndarray:
    """``E[v(a) | x]`` (P, K) by listing every pair and label of each prompt as a one-row data set."""
    out = np.zeros((pop.size, pop.K))
    for p in range(pop.size):
        for y, yp, z in itertools.product(range(pop.K), range(pop.K), (0.0, 1.0)):
            g = pop.g_star[p, y, yp]
            prob = pop.pi[p, y] * pop.pi[p, yp] * (g if z else 1.0 - g)
            data = drpo.DRPOData(pop.phi[p][None], pi_hat[p][None], np.array([[y, yp]]), np.array([z]), g_hat[p][None])
            out[p] += prob * drpo.pseudo_rewards(data)[0, 0]
    return out


@pytest.mark.parametrize("bias", [0.0, 0.2])
def test_pseudo_rewards_are_doubly_robust(bias: float) -> None:
    # E[v(a)|x] by enumeration equals the closed form ubar; ubar is the true preference utility u when either
    # model is right (with position bias too), and not when both are wrong
    pop = _population(3, P=4, K=3, d=2, bias=bias)
    g_bad, pi_bad = _wrong_models(pop, 4)
    u = preference_utility(pop)
    for g_hat, pi_hat, right in ((g_bad, pop.pi, True), (pop.g_star, pi_bad, True), (g_bad, pi_bad, False)):
        ubar = drpo.expected_pseudo_rewards(pop, g_hat, pi_hat)
        np.testing.assert_allclose(_enumerated_mean(pop, g_hat, pi_hat), ubar, rtol=1e-12, atol=1e-13)
        if right:
            np.testing.assert_allclose(ubar, u, rtol=1e-12, atol=1e-13)
        else:
            assert np.abs(ubar - u).max() > 0.05


@given(seed=st.integers(0, 10_000), K=st.integers(1, 5), d=st.integers(1, 4),
       beta=st.floats(0.05, 5.0), off_support=st.booleans())
def test_objective_derivatives_match_autograd(seed: int, K: int, d: int, beta: float, off_support: bool) -> None:
    rng = np.random.default_rng(seed)
    n = 6
    phi = rng.normal(size=(n, K, d))
    pi = rng.dirichlet(np.ones(K), size=n)
    if off_support and K > 1:
        pi[:, 0] = 0.0  # a response the reference model never draws: probability 0 under every pi_theta
        pi /= pi.sum(axis=1, keepdims=True)
    v = rng.normal(size=(n, K))
    theta = rng.normal(size=d)
    log_pi = _log_ref(pi)[1]

    def objective(t: torch.Tensor) -> torch.Tensor:
        s = torch.tensor(phi) @ t / beta + torch.tensor(log_pi)
        w = torch.softmax(s, dim=1)
        on = torch.tensor(pi > 0)
        log_ratio = torch.where(on, s - torch.logsumexp(s, dim=1, keepdim=True), 0.0) - torch.tensor(
            np.where(pi > 0, log_pi, 0.0))
        kl = torch.where(on, w * log_ratio, 0.0).sum(1)  # KL(pi_theta || pi_hat), 0 log 0 = 0 off the support
        return ((w * torch.tensor(v)).sum(1) - beta * kl).mean()

    t = torch.tensor(theta)
    f, grad, hess = drpo._mean_terms(theta, phi, log_pi, v, beta)
    assert f == pytest.approx(float(objective(t)), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(grad, torch.autograd.functional.jacobian(objective, t).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hess, torch.autograd.functional.hessian(objective, t).numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("bias", [0.0, 0.2])
def test_exact_sandwich_matches_enumeration(bias: float) -> None:
    # A = -E grad^2 f and B = E[grad f grad f^T] at the limit, by listing every pair and label of every prompt
    # (one-row data sets through pseudo_rewards and the per-row derivatives); the mean gradient there is 0
    pop = _population(3, P=4, K=3, d=2, bias=bias)
    g_bad, pi_bad = _wrong_models(pop, 4)
    target = drpo.drpo_target(pop, 0.4, g_bad, pi_bad)
    A, B, G = np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2)
    for p in range(pop.size):
        for y, yp, z in itertools.product(range(pop.K), range(pop.K), (0.0, 1.0)):
            g = pop.g_star[p, y, yp]
            prob = pop.pi[p, y] * pop.pi[p, yp] * (g if z else 1.0 - g) / pop.size
            data = drpo.DRPOData(pop.phi[p][None], pi_bad[p][None], np.array([[y, yp]]), np.array([z]), g_bad[p][None])
            _, grad, _, centred, curve = drpo._row_terms(target.theta, data.phi[0], _log_ref(data.pi_hat[0])[1],
                                                         drpo.pseudo_rewards(data)[0], 0.4)
            G += prob * grad[0]
            B += prob * np.outer(grad[0], grad[0])
            A -= prob * np.einsum("k,kd,ke->de", curve[0], centred[0], centred[0])
    np.testing.assert_allclose(G, 0.0, atol=1e-12)
    np.testing.assert_allclose(target.A, A, rtol=1e-12)
    np.testing.assert_allclose(target.B, B, rtol=1e-12)


def test_dr_win_rate_is_unbiased_for_a_fixed_policy_when_either_model_is_right() -> None:
    # E[dr_win_rate] over one-row data sets (every prompt, pair and label listed) is the true win rate of the fixed
    # tilt pi_theta of pi_hat when either model is right, and sum pi_theta ubar when both are wrong; at fit_drpo's
    # estimate it is the fit's own win_rate
    pop = _population(5, P=4, K=3, d=2, bias=0.2)
    g_bad, pi_bad = _wrong_models(pop, 6)
    theta, beta = np.array([0.4, -0.7]), 0.5
    for g_hat, pi_hat, right in ((g_bad, pop.pi, True), (pop.g_star, pi_bad, True), (g_bad, pi_bad, False)):
        mean = 0.0
        for p in range(pop.size):
            for y, yp, z in itertools.product(range(pop.K), range(pop.K), (0.0, 1.0)):
                g = pop.g_star[p, y, yp]
                prob = pop.pi[p, y] * pop.pi[p, yp] * (g if z else 1.0 - g) / pop.size
                data = drpo.DRPOData(pop.phi[p][None], pi_hat[p][None], np.array([[y, yp]]), np.array([z]),
                                     g_hat[p][None])
                mean += prob * drpo.dr_win_rate(data, theta, beta)[0]
        policy = kl_policy(theta, pop.phi, pi_hat, beta)
        expected = (policy * drpo.expected_pseudo_rewards(pop, g_hat, pi_hat)).sum(axis=1).mean()
        assert mean == pytest.approx(expected, rel=1e-12)
        truth = win_rate(policy, pop).mean
        assert (mean == pytest.approx(truth, rel=1e-12)) if right else abs(mean - truth) > 0.02
    data = sample_drpo(pop, 300, seed=2, reps=3, g_hat=g_bad, pi_hat=pi_bad)
    fit = drpo.fit_drpo(data, beta)
    np.testing.assert_allclose(drpo.dr_win_rate(data, fit.theta, beta), fit.win_rate, rtol=1e-13)
    shared = drpo.dr_win_rate(data, theta, beta)
    np.testing.assert_array_equal(shared, drpo.dr_win_rate(data, np.tile(theta, (3, 1)), beta))
    with pytest.raises(InputError, match=r"theta: expected shape \(2,\) or \(3, 2\)"):
        drpo.dr_win_rate(data, np.zeros(3), beta)
    with pytest.raises(InputError, match="theta"):
        drpo.dr_win_rate(data, np.array([np.nan, 0.0]), beta)


# --- golden: two responses, phi = (0, 1) ------------------------------------------------------------------
# pi_theta(1) = p solves logit p = logit pi_hat(1) + theta / beta, and d/dp [p v1 + (1-p) v0 - beta KL(p || pi_hat)]
# = v1 - v0 - theta, so theta_hat = mean_i (v_i(1) - v_i(0)) for every beta and pi_hat: a sample mean, with
# sandwich Var_n(D) / n. With g_hat(0, 1) = h antisymmetric, D = v(1) - v(0) is 1/2 - h plus
# c (Z - 1 + h) on the pair (1, 0), -c (Z - h) on (0, 1) and 0 on (a, a), c = (1/pi_hat(0) + 1/pi_hat(1)) / 2.


def _golden_outcomes(pi: tuple[float, float], p: float, q: float, h: float, pi_hat: tuple[float, float]):
    c = 0.5 * (1.0 / pi_hat[0] + 1.0 / pi_hat[1])
    same = pi[0] ** 2 + pi[1] ** 2
    w = pi[0] * pi[1]
    # (pair, label, probability, D)
    return [((0, 0), 1.0, pi[0] ** 2, 0.5 - h), ((1, 1), 0.0, pi[1] ** 2, 0.5 - h),
            ((1, 0), 1.0, w * q, 0.5 - h + c * h), ((1, 0), 0.0, w * (1 - q), 0.5 - h + c * (h - 1.0)),
            ((0, 1), 1.0, w * p, 0.5 - h - c * (1.0 - h)), ((0, 1), 0.0, w * (1 - p), 0.5 - h + c * h)], same


@pytest.mark.parametrize("pi0,p,q,h,pi_hat0", [(0.3, 0.8, 0.2, 0.5, 0.3), (0.3, 0.8, 0.3, 0.65, 0.6),
                                               (0.55, 0.35, 0.9, 0.2, 0.5)])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_golden_two_responses(pi0: float, p: float, q: float, h: float, pi_hat0: float, beta: float) -> None:
    pi, pi_hat = (pi0, 1.0 - pi0), (pi_hat0, 1.0 - pi_hat0)
    outcomes, _ = _golden_outcomes(pi, p, q, h, pi_hat)
    prob = np.array([o[2] for o in outcomes])
    D = np.array([o[3] for o in outcomes])
    assert prob.sum() == pytest.approx(1.0)
    mean = prob @ D
    if pi_hat0 == pi0:  # the right reference model: the true utility gap (q - p) / 2, whatever h
        assert mean == pytest.approx(0.5 * (q - p), rel=1e-12)
    pop = PairPopulation(np.array([[[0.0], [1.0]]]), np.array([pi]), np.array([[[0.5, p], [q, 0.5]]]))
    g_hat = np.array([[[0.5, h], [1.0 - h, 0.5]]])
    target = drpo.drpo_target(pop, beta, g_hat, np.array([pi_hat]))
    assert target.theta[0] == pytest.approx(mean, rel=1e-9, abs=1e-11)
    assert target.cov[0, 0] == pytest.approx(prob @ (D - mean) ** 2, rel=1e-9)
    # a data set holding each outcome a chosen number of times
    counts = np.array([3, 4, 2, 5, 6, 1])
    rows = np.repeat(np.arange(len(outcomes)), counts)
    data = drpo.DRPOData(np.tile(pop.phi, (rows.size, 1, 1)), np.tile(pi_hat, (rows.size, 1)),
                         np.array([outcomes[i][0] for i in rows]), np.array([outcomes[i][1] for i in rows]),
                         np.tile(g_hat, (rows.size, 1, 1)))
    fit = drpo.fit_drpo(data, beta)
    Di = D[rows]
    assert fit.converged[0]
    assert fit.theta[0, 0] == pytest.approx(Di.mean(), rel=1e-9, abs=1e-11)
    assert fit.cov[0, 0, 0] == pytest.approx(Di.var() / rows.size, rel=1e-7)


# --- the estimator against its exact limit -----------------------------------------------------------------


def test_fit_matches_the_exact_limit_and_covariance_by_simulation() -> None:
    # R fits at n: the mean within 4 Monte Carlo errors of the limit (after an O(1/n) bias far below them), n Cov
    # entry by entry within 4 normal-theory errors of A^-1 B A^-1, the sandwich's 95% intervals within 4 binomial
    # errors of 0.95. When both models are wrong the limit differs from the doubly robust one by many errors and
    # the win rate DRPO estimates there is not the policy's true one.
    pop = _population(11, P=300, K=4, d=2)
    u = preference_utility(pop)
    g_bad = 1.0 - pop.g_star  # reversed preferences
    pi_bad = pop.pi * np.exp(-4.0 * u)  # a reference model that underrates the better responses
    pi_bad /= pi_bad.sum(axis=1, keepdims=True)
    beta, n, R = 0.3, 1500, 200
    right = drpo.drpo_target(pop, beta, g_bad, pop.pi)
    both = drpo.drpo_target(pop, beta, g_bad, pi_bad)
    assert right.win_rate_estimated == pytest.approx(right.win_rate, rel=1e-12)
    assert abs(both.win_rate_estimated - both.win_rate) > 0.01
    for target, pi_hat in ((right, None), (both, pi_bad)):
        fit = drpo.fit_drpo(sample_drpo(pop, n, seed=5, reps=R, g_hat=g_bad, pi_hat=pi_hat), beta)
        assert fit.converged.all()
        S = n * np.cov(fit.theta, rowvar=False)
        se = np.sqrt((S**2 + np.outer(np.diag(S), np.diag(S))) / (R - 1))
        assert (np.abs(S - target.cov) <= 4.0 * se).all(), (S, target.cov)
        mc = np.sqrt(np.diag(S) / n / R)
        assert (np.abs(fit.theta.mean(0) - target.theta) <= 4.0 * mc).all()
        cover = (np.abs(fit.theta - target.theta) <= 1.96 * fit.se).mean()
        assert abs(cover - 0.95) <= 4.0 * np.sqrt(0.95 * 0.05 / (R * 2))
    # the doubly robust limit of the same policy class (tilts of pi_bad): g_hat right, pi_hat wrong
    robust = drpo.drpo_target(pop, beta, None, pi_bad)
    assert robust.win_rate_estimated == pytest.approx(robust.win_rate, rel=1e-12)
    gap = np.abs(both.theta - robust.theta) / np.sqrt(np.diag(both.cov) / n / R)
    assert gap.max() > 10.0, gap


def test_sample_drpo_draws_the_pairs_of_sample_population() -> None:
    pop = _population(2, P=30, K=3, d=2)
    g_hat, pi_hat = _wrong_models(pop, 3)
    pairs = sample_population(pop, 50, seed=9, reps=3, first_rep=2)
    data = sample_drpo(pop, 50, seed=9, reps=3, first_rep=2, g_hat=g_hat, pi_hat=pi_hat)
    chosen = np.take_along_axis(data.phi, data.pair[..., None], axis=2)
    np.testing.assert_array_equal(chosen[..., 0, :] - chosen[..., 1, :], pairs.dphi)
    np.testing.assert_array_equal(data.z, pairs.z)
    # each row carries its own prompt's models
    prompt = np.abs(data.phi[:, :, None] - pop.phi[None, None]).sum(axis=(-1, -2)).argmin(axis=-1)
    np.testing.assert_array_equal(data.pi_hat, pi_hat[prompt])
    np.testing.assert_array_equal(data.g_hat, g_hat[prompt])


def test_unbatched_input_is_one_replication() -> None:
    pop = _population(6, P=20, K=3, d=2)
    data = sample_drpo(pop, 200, seed=1, reps=1)
    one = drpo.DRPOData(data.phi[0], data.pi_hat[0], data.pair[0], data.z[0], data.g_hat[0])
    np.testing.assert_array_equal(drpo.fit_drpo(one, 0.3).theta, drpo.fit_drpo(data, 0.3).theta)


def _valid(**change):
    pop = _population(1, P=5, K=3, d=2)
    data = sample_drpo(pop, 8, seed=0, reps=2)
    args = dict(phi=data.phi, pi_hat=data.pi_hat, pair=data.pair, z=data.z, g_hat=data.g_hat)
    args.update(change)
    return args


def test_bad_input_is_named() -> None:
    base = _valid()
    seen = base["pair"][1, 3]
    pi = base["pi_hat"].copy()
    pi[1, 3] = np.eye(3)[next(a for a in range(3) if a not in seen)]
    pair = base["pair"].copy()
    pair[0, 5, 1] = 3
    g = base["g_hat"].copy()
    g[0, 1, 2, 0] = np.nan
    phi = base["phi"].copy()
    phi[1, 0, 0, 0] = np.inf
    cases = {
        "pi_hat: replication 1, row 3 gives probability 0 to its observed response": dict(pi_hat=pi),
        "pair: replication 0, row 5: response index 3 outside [0, 3)": dict(pair=pair),
        "pi_hat: row (0, 0) sums to": dict(pi_hat=base["pi_hat"] * 1.5),
        "z: entry (0, 2) is 1.5": dict(z=np.where(np.arange(8) == 2, 1.5, base["z"])),
        "g_hat: entry (0, 1, 2, 0) is nan": dict(g_hat=g),
        "pair: expected integer indices": dict(pair=base["pair"].astype(float)),
        "phi: entry (1, 0, 0, 0) is inf": dict(phi=phi),
        "g_hat: expected shape (2, 8, 3, 3)": dict(g_hat=base["g_hat"][..., :2]),
    }
    for message, change in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            drpo.DRPOData(**{**base, **change})
    data = drpo.DRPOData(**base)
    for beta in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(InputError, match="beta"):
            drpo.fit_drpo(data, beta)
    with pytest.raises(InputError, match="tol"):
        drpo.fit_drpo(data, 1.0, tol=0.0)
    pop = _population(1, P=5, K=3, d=2)
    zero = pop.pi.copy()
    zero[2] = [1.0, 0.0, 0.0]
    with pytest.raises(InputError, match="pi_hat: prompt 2 gives probability 0 to response 1"):
        drpo.drpo_target(pop, 1.0, None, zero)


# --- the sampled-response loss (language models) -----------------------------------------------------------


def _sampled_case(seed: int, K: int, d: int, beta: float, z: float):
    """One row: features, pi_hat, g_hat, a pair, a label; a linear policy's parameters ``theta`` as a tensor."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(K, d))
    pi_hat = rng.dirichlet(np.full(K, 2.0))
    g_hat = rng.uniform(0.05, 0.95, size=(K, K))
    y, yp = rng.choice(K, size=2, replace=K == 1)
    theta = rng.normal(size=d) * beta
    return phi, pi_hat, g_hat, int(y), int(yp), z, theta


def _expected_sampled(phi, pi_hat, g_hat, y, yp, z, theta, beta, S, ratio_clip=None):
    """The expectation over every ``S``-tuple of draws from ``pi_theta`` of the loss's gradient in ``theta`` and of
    its estimates (objective, win rate, kl)."""
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    logits = torch.tensor(np.log(pi_hat)) + torch.tensor(phi) @ th / beta
    logp = torch.log_softmax(logits, 0)
    ref = torch.tensor(np.log(pi_hat))
    g = torch.tensor(g_hat)
    prob = logp.detach().exp().numpy()
    K = len(pi_hat)
    grad = np.zeros(len(theta))
    est = np.zeros(3)
    for draws in itertools.product(range(K), repeat=S):
        a = torch.tensor(draws)
        w = float(np.prod(prob[list(draws)]))
        out = drpo.drpo_sampled_loss(
            logp[a][None], ref[a][None], g[a, yp][None], g[y, a][None], logp[[y, yp]][None], ref[[y, yp]][None],
            g[y, yp].reshape(1), torch.tensor([z], dtype=torch.float64), beta, ratio_clip)
        (gr,) = torch.autograd.grad(out.loss, th, retain_graph=True)
        grad += w * gr.numpy()
        est += w * np.array([float(out.objective[0]), float(out.win_rate[0]), float(out.kl[0])])
    return grad, est, prob


def _capped_objective(phi, pi_hat, g_hat, y, yp, z, theta, beta, clip):
    """``f`` with each importance ratio capped at ``clip`` (its value and gradient), written out in torch."""
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(torch.tensor(np.log(pi_hat)) + torch.tensor(phi) @ th / beta, 0)
    p, g = logp.exp(), torch.tensor(g_hat)
    direct = p @ (0.5 * (g[:, yp] + 1.0 - g[y, :]))
    kl = p @ (logp - torch.tensor(np.log(pi_hat)))
    rho = torch.exp(logp[[y, yp]] - torch.tensor(np.log(pi_hat[[y, yp]])))
    rho = rho if clip is None else torch.clamp(rho, max=clip)
    f = direct + 0.5 * (z - g_hat[y, yp]) * (rho[0] - rho[1]) - beta * kl
    (grad,) = torch.autograd.grad(f, th)
    return float(f.detach()), grad.numpy()


@given(seed=st.integers(0, 10_000), K=st.integers(2, 4), d=st.integers(1, 3), S=st.integers(1, 3),
       beta=st.floats(0.05, 5.0), z=st.sampled_from([0.0, 1.0, 0.3]), clip=st.sampled_from([None, 1.0, 1.3, 3.0]))
def test_sampled_loss_gradient_is_unbiased_for_the_objective(seed: int, K: int, d: int, S: int, beta: float,
                                                             z: float, clip: float | None) -> None:
    # exactly, by listing every S-tuple of draws: E[grad loss] = -grad f (the linear DRPO objective of _row_terms)
    # and E[objective estimate] = f, E[win-rate estimate] = sum_a pi_theta(a) v(a), E[kl] = KL(pi_theta || pi_hat);
    # with a cap, the same for f with min(rho, cap) in place of each ratio
    phi, pi_hat, g_hat, y, yp, z, theta = _sampled_case(seed, K, d, beta, z)
    grad, (obj, win, kl), prob = _expected_sampled(phi, pi_hat, g_hat, y, yp, z, theta, beta, S, clip)
    f_cap, grad_cap = _capped_objective(phi, pi_hat, g_hat, y, yp, z, theta, beta, clip)
    np.testing.assert_allclose(-grad, grad_cap, rtol=1e-9, atol=1e-11)
    assert obj == pytest.approx(f_cap, rel=1e-10, abs=1e-12)
    if clip is not None:
        return
    data = drpo.DRPOData(phi[None], pi_hat[None], np.array([[y, yp]]), np.array([z]), g_hat[None])
    v = drpo.pseudo_rewards(data)[0]
    f, f_grad, w, _, _ = drpo._row_terms(theta, phi[None], np.log(pi_hat)[None], v, beta)
    np.testing.assert_allclose(w[0], prob, rtol=1e-12)
    np.testing.assert_allclose(-grad, f_grad[0], rtol=1e-9, atol=1e-11)
    assert obj == pytest.approx(float(f[0]), rel=1e-10, abs=1e-12)
    assert win == pytest.approx(float(prob @ v[0]), rel=1e-10, abs=1e-12)
    assert kl == pytest.approx(float(prob @ (np.log(prob) - np.log(pi_hat))), rel=1e-10, abs=1e-12)


def test_sampled_loss_golden_values_and_clipping() -> None:
    # two draws with hand-computed advantages and weights: r_s = d_s - beta k_s, A_1 = r_1 - r_2 = -A_2; a cap at
    # 1.2 holds rho(y) = e^0.5 at 1.2 in the objective and takes its gradient away, and leaves rho(y') = e^-1
    beta = 0.5
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref_s = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    g2, g1 = torch.tensor([[0.9, 0.2]], dtype=torch.float64), torch.tensor([[0.3, 0.6]], dtype=torch.float64)
    lpp = torch.tensor([[-0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    refp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    gp, z = torch.tensor([0.7], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    d = np.array([0.5 * (0.9 + 1 - 0.3), 0.5 * (0.2 + 1 - 0.6)])  # 0.8, 0.3
    k = np.array([0.5, -1.0])
    r = d - beta * k  # 0.55, 0.8
    rho = np.exp([0.5, -1.0])
    for clip, weight, capped in ((None, rho, rho), (1.2, rho * (rho < 1.2), np.minimum(rho, 1.2))):
        out = drpo.drpo_sampled_loss(lp, ref_s, g2, g1, lpp, refp, gp, z, beta, clip)
        gl, gpair = torch.autograd.grad(out.loss, (lp, lpp))
        np.testing.assert_allclose(gl.numpy()[0], -np.array([r[0] - r[1], r[1] - r[0]]) / 2, rtol=1e-14)
        np.testing.assert_allclose(gpair.numpy()[0], -0.15 * weight * np.array([1.0, -1.0]), rtol=1e-14)
        assert float(out.direct[0]) == pytest.approx(d.mean(), rel=1e-14)
        assert float(out.correction[0]) == pytest.approx(0.15 * (capped[0] - capped[1]), rel=1e-14)
        assert float(out.kl[0]) == pytest.approx(k.mean(), rel=1e-14)
        assert float(out.objective[0]) == pytest.approx(d.mean() + 0.15 * (capped[0] - capped[1]) - beta * k.mean())
        np.testing.assert_allclose(out.ratio.numpy()[0], rho, rtol=1e-14)
        assert out.clipped.tolist() == [[clip is not None, False]]


def test_sampled_loss_names_bad_input() -> None:
    B, S = 2, 3
    ok = dict(logp_samples=torch.zeros(B, S), ref_logp_samples=torch.zeros(B, S),
              g_sample_vs_second=torch.full((B, S), 0.5), g_first_vs_sample=torch.full((B, S), 0.5),
              logp_pair=torch.zeros(B, 2), ref_logp_pair=torch.zeros(B, 2), g_pair=torch.full((B,), 0.5),
              z=torch.ones(B), beta=0.1)
    assert torch.isfinite(drpo.drpo_sampled_loss(**ok).loss)
    cases = [
        (dict(logp_samples=torch.zeros(B)), re.escape("logp_samples: expected a (B, S) tensor with B, S >= 1, got (2,)")),
        (dict(ref_logp_samples=torch.zeros(B, S + 1)), re.escape("ref_logp_samples: expected shape (2, 3), got (2, 4)")),
        (dict(g_first_vs_sample=torch.tensor([[0.5, 0.5, 0.5], [0.5, 1.5, 0.5]])),
         re.escape("g_first_vs_sample: row 1, entry (1,) is 1.5, but must be a probability in [0, 1]")),
        (dict(ref_logp_pair=torch.tensor([[0.0, 0.0], [float("-inf"), 0.0]])), "ref_logp_pair: row 1, .* must be finite"),
        (dict(z=torch.tensor([1.0, float("nan")])), "z: row 1 is nan"),
        (dict(beta=0.0), "beta"),
        (dict(ratio_clip=0.5), "ratio_clip: None or a number >= 1"),
        (dict(logp_pair=torch.tensor([[0.0, 0.0], [800.0, 0.0]], dtype=torch.float64)), "row 1: the importance ratio"),
    ]
    for change, message in cases:
        with pytest.raises(InputError, match=message):
            drpo.drpo_sampled_loss(**{**ok, **change})


# --- models learned from the rows themselves (theory.crossfit) -------------------------------------------


def _log_linear_population(seed: int, P: int, K: int, gamma: np.ndarray) -> PairPopulation:
    """``_population``'s two sharp annotators, with the reference policy ``softmax(phi . gamma)``: the class of
    ``crossfit.reference_logit``, while a BT ``g_hat`` is misspecified."""
    pop = _population(seed, P, K, gamma.size)
    logits = pop.phi @ gamma
    pi = np.exp(logits - logits.max(1, keepdims=True))
    return PairPopulation(pop.phi, pi / pi.sum(1, keepdims=True), pop.g_star)


def _logistic(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(fit_intercept=False)


def test_reference_logit_recovers_a_log_linear_reference_policy() -> None:
    # 20000 rows of two draws from softmax(phi . gamma0): each coordinate's error within 4 standard errors of the
    # maximum-likelihood estimate (the inverse Fisher information at gamma0)
    gamma0 = np.array([0.8, -0.5, 0.3])
    pop = _log_linear_population(0, P=20000, K=4, gamma=gamma0)
    rng = np.random.default_rng(1)
    drawn = (rng.uniform(size=(pop.size, 2, 1)) >= pop.pi.cumsum(1)[:, None, :-1]).sum(-1)
    gamma = crossfit.reference_logit(pop.phi, drawn)
    centred = pop.phi - np.einsum("ik,ikd->id", pop.pi, pop.phi)[:, None]
    fisher = 2 * np.einsum("ik,ikd,ike->de", pop.pi, centred, centred)
    z = (gamma - gamma0) / np.sqrt(np.diag(np.linalg.inv(fisher)))
    assert np.abs(z).max() < 4, z
    # the same maximum from the draws listed one per row
    again = crossfit.reference_logit(np.repeat(pop.phi, 2, axis=0), drawn.reshape(-1, 1))
    np.testing.assert_allclose(again, gamma, rtol=1e-8)


def test_reference_logit_names_what_is_wrong() -> None:
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(50, 3, 2))
    drawn = rng.integers(0, 3, size=(50, 2))
    flat = phi.copy()
    flat[..., 1] = rng.normal(size=(50, 1))  # the same value for every response of a prompt
    with pytest.raises(InputError, match="span 1 < d = 2 dimensions"):
        crossfit.reference_logit(flat, drawn)
    best = np.repeat(phi[..., 0].argmax(1)[:, None], 2, axis=1)  # always the response with the largest feature 0
    with pytest.raises(InputError, match="likelihood has no maximum"):
        crossfit.reference_logit(phi, best)
    with pytest.raises(InputError, match="row 3: response index 3 outside"):
        crossfit.reference_logit(phi, np.where(np.arange(50)[:, None] == 3, 3, drawn))
    with pytest.raises(InputError, match="expected integer indices of shape"):
        crossfit.reference_logit(phi, drawn.astype(float))
    with pytest.raises(InputError, match="K >= 2"):
        crossfit.reference_logit(phi[:, :1], drawn[:, :1] * 0)
    with pytest.raises(InputError, match=re.escape("phi: entry (0, 0, 0) is nan")):
        crossfit.reference_logit(np.where(np.arange(2) == 0, np.nan, phi), drawn)


def _drpo_rows(seed: int, n: int) -> tuple[PairPopulation, drpo.DRPOData]:
    pop = _log_linear_population(seed, P=100, K=3, gamma=np.array([1.0, -0.5]))
    return pop, sample_drpo(pop, n, seed=seed)


def test_crossfit_drpo_fits_each_row_s_models_on_the_other_folds() -> None:
    _, data = _drpo_rows(3, 300)
    phi, pair, z = data.phi[0], data.pair[0], data.z[0]
    models = crossfit.crossfit_drpo(phi, pair, z, folds=3, learner=_logistic)
    g, pi, fold = models.g_hat, models.pi_hat, models.fold
    assert g.shape == (300, 3, 3) and pi.shape == (300, 3) and sorted(np.bincount(fold)) == [100, 100, 100]
    np.testing.assert_array_equal(g + g.transpose(0, 2, 1), 1.0)  # g_hat(b, a) = 1 - g_hat(a, b)
    np.testing.assert_array_equal(np.diagonal(g, axis1=1, axis2=2), 0.5)
    np.testing.assert_allclose(pi.sum(1), 1.0, rtol=1e-14)
    for k in range(3):
        held = fold == k
        gamma = crossfit.reference_logit(phi[~held], pair[~held])
        logits = phi[held] @ gamma
        expected = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(pi[held], expected / expected.sum(1, keepdims=True), rtol=1e-12)
        # the labels of fold k reach the other folds' g_hat, never their own
        flipped = crossfit.crossfit_drpo(phi, pair, np.where(held, 1.0 - z, z), folds=3, learner=_logistic)
        np.testing.assert_array_equal(flipped.fold, fold)
        np.testing.assert_array_equal(flipped.g_hat[held], g[held])
        assert np.abs(flipped.g_hat[~held] - g[~held]).max() > 1e-3


def test_crossfit_drpo_models_follow_the_rows_when_they_are_permuted() -> None:
    # distinct rows (rows identical in every feature are told apart by their order: crossfit.fold_ids)
    rng = np.random.default_rng(4)
    phi, pair, z = rng.normal(size=(120, 3, 2)), rng.integers(0, 3, size=(120, 2)), rng.integers(0, 2, 120) * 1.0
    order = np.random.default_rng(5).permutation(120)
    a = crossfit.crossfit_drpo(phi, pair, z, folds=2, seed=7, learner=_logistic)
    b = crossfit.crossfit_drpo(phi[order], pair[order], z[order], folds=2, seed=7, learner=_logistic)
    np.testing.assert_array_equal(b.fold, a.fold[order])
    np.testing.assert_allclose(b.g_hat, a.g_hat[order], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.pi_hat, a.pi_hat[order], rtol=1e-10)


def test_crossfit_drpo_checks_its_inputs() -> None:
    _, data = _drpo_rows(6, 40)
    phi, pair, z = data.phi[0], data.pair[0], data.z[0]
    with pytest.raises(InputError, match=re.escape("pair: expected integer indices of shape (40, 2), got shape "
                                                   "(40, 1)")):
        crossfit.crossfit_drpo(phi, pair[:, :1], z)
    with pytest.raises(InputError, match="labels must be 0 or 1"):
        crossfit.crossfit_drpo(phi, pair, np.full(40, 0.5))
    with pytest.raises(InputError, match="folds must be between 2 and n=40"):
        crossfit.crossfit_drpo(phi, pair, z, folds=41)
    best = np.repeat(phi[..., 0].argmax(1)[:, None], 2, axis=1)
    with pytest.raises(InputError, match="fold 0: the reference model on the other 20 rows: drawn: a direction"):
        crossfit.crossfit_drpo(phi, best, z, folds=2, learner=_logistic)


def test_drpo_with_cross_fitted_models_is_consistent_when_the_reference_model_is_right() -> None:
    # double robustness with both models learned: a BT g_hat (misspecified: two sharp annotators) and the log-linear
    # pi_hat (the reference policy's class), cross-fitted on the rows. Over 40 replications of n = 2000 the mean
    # estimate is within 4 Monte Carlo standard errors of the oracle limit in every coordinate; with the same
    # g_hat and a uniform pi_hat (both wrong) it is not
    gamma0 = np.array([1.5, -1.0, 0.5])
    pop = _log_linear_population(5, P=400, K=4, gamma=gamma0)
    beta, R, n = 0.3, 40, 2000
    oracle = drpo.drpo_target(pop, beta).theta
    data = sample_drpo(pop, n, seed=1, reps=R)
    learned, uniform = np.empty((R, 3)), np.empty((R, 3))
    for r in range(R):
        models = crossfit.crossfit_drpo(data.phi[r], data.pair[r], data.z[r], folds=2, learner=_logistic)
        for out, pi_hat in ((learned, models.pi_hat), (uniform, np.full((n, pop.K), 1 / pop.K))):
            fit = drpo.fit_drpo(drpo.DRPOData(data.phi[r], pi_hat, data.pair[r], data.z[r], models.g_hat), beta)
            assert fit.converged.all()
            out[r] = fit.theta[0]
    z_learned = (learned.mean(0) - oracle) / (learned.std(0, ddof=1) / np.sqrt(R))
    z_uniform = (uniform.mean(0) - oracle) / (uniform.std(0, ddof=1) / np.sqrt(R))
    assert np.abs(z_learned).max() < 4, z_learned
    assert np.abs(z_uniform).max() > 4, z_uniform


def test_reference_model_terms_are_the_derivatives_in_gamma() -> None:
    # _reference_terms against central differences in gamma of grad f_i (through pi_hat's importance weights and
    # the policy class around it), of the pair's log-likelihood (the score) and of the score (the Fisher information)
    rng = np.random.default_rng(0)
    n, K, d, beta = 7, 4, 3, 0.4
    phi = rng.normal(size=(n, K, d))
    pair, z = rng.integers(0, K, size=(n, 2)), rng.integers(0, 2, n) * 1.0
    g = rng.uniform(0.05, 0.95, size=(n, K, K))
    g = 0.5 * (g + 1.0 - g.transpose(0, 2, 1))
    theta, gamma = 0.5 * rng.normal(size=d), 0.5 * rng.normal(size=d)

    def data_at(gm: np.ndarray) -> drpo.DRPOData:
        logits = phi @ gm
        pi = np.exp(logits - logits.max(1, keepdims=True))
        return drpo.DRPOData(phi, pi / pi.sum(1, keepdims=True), pair, z, g)

    def grads(gm: np.ndarray) -> np.ndarray:
        data = data_at(gm)
        return drpo._row_terms(theta, phi, np.log(data.pi_hat[0]), drpo.pseudo_rewards(data)[0], beta)[1]

    def loglik(gm: np.ndarray) -> np.ndarray:
        pi = data_at(gm).pi_hat[0]
        return np.log(pi[np.arange(n), pair[:, 0]] * pi[np.arange(n), pair[:, 1]])

    def terms(gm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = data_at(gm)
        _, _, w, centred, curve = drpo._row_terms(theta, phi, np.log(data.pi_hat[0]), drpo.pseudo_rewards(data)[0],
                                                  beta)
        return drpo._reference_terms(data, 0, w, centred, curve, beta)

    J, score, fisher = terms(gamma)
    h = 1e-6
    steps = np.eye(d) * h
    dJ = np.stack([grads(gamma + e) - grads(gamma - e) for e in steps], axis=-1) / (2 * h)
    np.testing.assert_allclose(J, dJ, rtol=1e-6, atol=1e-7 * np.abs(J).max())
    ds = np.stack([loglik(gamma + e) - loglik(gamma - e) for e in steps], axis=-1) / (2 * h)
    np.testing.assert_allclose(score, ds, rtol=1e-6, atol=1e-8)
    # the score psi_y + psi_y' of a pair of draws has Jacobian -2 Cov_pi_hat(phi) whatever the pair: the Fisher
    # information is minus it
    dscore = np.stack([terms(gamma + e)[1] - terms(gamma - e)[1] for e in steps], axis=-1) / (2 * h)
    np.testing.assert_allclose(fisher, -dscore, rtol=1e-6, atol=1e-8)


def test_the_sandwich_counts_the_estimation_of_a_learned_reference_model() -> None:
    # A fixed wrong g_hat and a log-linear reference policy, n = 1000, 300 replications on common draws: fitted with
    # the true pi_ref, and with pi_hat the cross-fitted conditional logit. Estimating pi_hat lowers the variance
    # (as an estimated propensity does for inverse weighting); the paired variance ratio's 99% bootstrap interval
    # holds the ratio of the mean sandwiches with the correction (reference="logit") and leaves out that of the
    # fixed-model sandwich
    pop = _log_linear_population(5, P=400, K=4, gamma=np.array([1.5, -1.0, 0.5]))
    g_bad, _ = _wrong_models(pop, 4)
    beta, R, n = 3.0, 300, 1000
    data = sample_drpo(pop, n, seed=11, reps=R, g_hat=g_bad)
    known = drpo.fit_drpo(data, beta)
    pi_hat = np.stack([crossfit.crossfit_drpo(data.phi[r], data.pair[r], data.z[r], folds=2, learner=_logistic).pi_hat
                       for r in range(R)])
    learned = drpo.DRPOData(data.phi, pi_hat, data.pair, data.z, data.g_hat)
    corrected, plain = drpo.fit_drpo(learned, beta, reference="logit"), drpo.fit_drpo(learned, beta)
    assert known.converged.all() and corrected.converged.all()
    a, b = known.theta[:, 0], corrected.theta[:, 0]
    np.testing.assert_array_equal(plain.theta, corrected.theta)
    rng = np.random.default_rng(0)
    boot = [b[i].var() / a[i].var() for i in rng.integers(0, R, size=(2000, R))]
    low, high = np.percentile(boot, [0.5, 99.5])
    predicted = corrected.cov[:, 0, 0].mean() / known.cov[:, 0, 0].mean()
    uncorrected = plain.cov[:, 0, 0].mean() / known.cov[:, 0, 0].mean()
    assert low <= predicted <= high, (low, predicted, high)
    assert not low <= uncorrected <= high, (low, uncorrected, high)
    with pytest.raises(InputError, match="reference must be one of fixed, logit"):
        drpo.fit_drpo(learned, beta, reference="learned")
