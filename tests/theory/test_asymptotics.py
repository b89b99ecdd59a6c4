"""Exact asymptotics of the MLE and VRPO on finite-response populations (theory/asymptotics.py).

The module's formulas are checked against (i) closed forms derived by hand, (ii) brute force on explicit
(P, K, K, d) pair arrays and exact enumeration of the joint law of (labelled pair, label, M reference
pairs), (iii) the special cases of DESIGN.md 3.5, and (iv) Monte Carlo fits of the actual estimators
(``losses.vr_objective``) on data drawn from the population.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_rlhf.theory import asymptotics as asy
from robust_rlhf.theory import second_order as so
from robust_rlhf.theory.data import PairPopulation
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.losses import (
    Logistic, Recession, SmoothedTruncatedHinge, Squared, TruncatedHinge, pair_loss, vr_objective,
)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _mixture_population(seed: int, P: int, K: int, d: int, sharp: float = 4.0, bias: float = 0.0) -> PairPopulation:
    """Two annotators with different reward vectors and sharp links (far from BT), plus position bias.

    ``g*(a, b) = (1 - bias) [sig(sharp t1.dphi) + sig(sharp t2.dphi)] / 2 + bias * 0.7``: with bias > 0
    the first position wins more often and ``g*(a,b) + g*(b,a) != 1``.
    """
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.full(K, 2.0), size=P)
    t1, t2 = rng.normal(size=d), rng.normal(size=d)
    dphi = phi[:, :, None, :] - phi[:, None, :, :]
    g = 0.5 * _sigmoid(sharp * dphi @ t1) + 0.5 * _sigmoid(sharp * dphi @ t2)
    return PairPopulation(phi, pi, (1.0 - bias) * g + bias * 0.7)


def _noisy(g: np.ndarray, sd: float, seed: int) -> np.ndarray:
    """An auxiliary model: ``sig(logit(g) + N(0, sd^2))`` (clipped away from 0 and 1 first)."""
    rng = np.random.default_rng(seed)
    gc = np.clip(g, 1e-6, 1 - 1e-6)
    return _sigmoid(np.log(gc / (1 - gc)) + sd * rng.normal(size=g.shape))


# ------------------------------------------------------------------------------------------ brute force


def _pairs(pop: PairPopulation) -> tuple[np.ndarray, np.ndarray]:
    """Explicit ``dphi`` (P, K, K, d) and pair weights ``pi_a pi_b`` (P, K, K)."""
    return pop.phi[:, :, None, :] - pop.phi[:, None, :, :], pop.pi[:, :, None] * pop.pi[:, None, :]


def _brute_grad(pop: PairPopulation, theta: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Logistic population gradient ``E[(s - g) dphi]``."""
    dphi, w = _pairs(pop)
    s = _sigmoid(dphi @ theta)
    return np.einsum("pab,pabi->i", w * (s - g), dphi) / pop.size


def _within_cov(pop: PairPopulation, theta: np.ndarray) -> np.ndarray:
    """``E_x[Cov_{pair|x}((g* - s) dphi)]`` (logistic), by explicit pair arrays."""
    dphi, w = _pairs(pop)
    v = (pop.g_star - _sigmoid(dphi @ theta))[..., None] * dphi
    mean = np.einsum("pab,pabi->pi", w, v)
    second = np.einsum("pab,pabi,pabj->pij", w, v, v)
    return (second - mean[:, :, None] * mean[:, None, :]).mean(axis=0)


def _enumerated_omega(
    pop: PairPopulation, theta: np.ndarray, g_hat: np.ndarray | None, lam: float, M: int | None, rho: float
) -> np.ndarray:
    """Meat by exact enumeration of the law of the per-prompt gradient contributions (logistic loss).

    A labelled prompt contributes ``v = A + kappa B`` with ``A = ((s - Z) - lam (s - g_hat)) dphi`` for
    its pair and label, and ``B`` the mean of ``(s - g_hat) dphi`` over its ``M`` reference pairs (the
    exact conditional mean when ``M`` is None); an unlabelled prompt contributes ``kappa B``. The meat
    is ``Cov(v) + rho Cov(kappa B)`` over the uniform law on prompts x all outcomes -- no conditional
    covariance algebra is used.
    """
    P, K, d = pop.phi.shape
    gh = np.zeros((P, K, K)) if g_hat is None else g_hat
    kappa = lam / (1.0 + rho)
    mom = {k: np.zeros(d) for k in ("v", "u")} | {k + "2": np.zeros((d, d)) for k in ("v", "u")}
    for p in range(P):
        dp = pop.phi[p][:, None, :] - pop.phi[p][None, :, :]
        s = _sigmoid(dp @ theta)
        A, pA = [], []
        for a, b, z in itertools.product(range(K), range(K), (0, 1)):
            pz = pop.g_star[p, a, b] if z else 1.0 - pop.g_star[p, a, b]
            A.append(((s[a, b] - z) - lam * (s[a, b] - gh[p, a, b])) * dp[a, b])
            pA.append(pop.pi[p, a] * pop.pi[p, b] * pz)
        one = [((s[a, b] - gh[p, a, b]) * dp[a, b], pop.pi[p, a] * pop.pi[p, b]) for a in range(K) for b in range(K)]
        if M is None:
            B = [sum(pr * vec for vec, pr in one)]
            pB = [1.0]
        else:
            B = [np.mean([vec for vec, _ in combo], axis=0) for combo in itertools.product(one, repeat=M)]
            pB = [math.prod(pr for _, pr in combo) for combo in itertools.product(one, repeat=M)]
        A, pA, B, pB = np.array(A), np.array(pA), np.array(B), np.array(pB)
        v = (A[:, None, :] + kappa * B[None, :, :]).reshape(-1, d)
        pv = (pA[:, None] * pB[None, :]).reshape(-1)
        u = kappa * B
        mom["v"] += pv @ v / P
        mom["v2"] += np.einsum("k,ki,kj->ij", pv, v, v) / P
        mom["u"] += pB @ u / P
        mom["u2"] += np.einsum("k,ki,kj->ij", pB, u, u) / P
    cov_v = mom["v2"] - np.outer(mom["v"], mom["v"])
    cov_u = mom["u2"] - np.outer(mom["u"], mom["u"])
    return cov_v + rho * cov_u


# ------------------------------------------------------------------------------------------ golden


def _two_response_population(pi0: float, p: float, q: float) -> PairPopulation:
    """K = 2, d = 1, one fixed prompt: phi = (+1/2, -1/2), g*(0,1) = p, g*(1,0) = q."""
    return PairPopulation(
        phi=np.array([[[0.5], [-0.5]]]), pi=np.array([[pi0, 1.0 - pi0]]),
        g_star=np.array([[[0.5, p], [q, 0.5]]]),
    )


@pytest.mark.parametrize("p,q", [(0.8, 0.2), (0.8, 0.3), (0.35, 0.9)])
def test_golden_two_responses_logistic(p: float, q: float) -> None:
    # Pairs (0,1): dphi = +1, u = theta; (1,0): dphi = -1, u = -theta; each with weight w = pi0 pi1.
    # The diagonal pairs have dphi = 0 and contribute nothing. Logistic: m'_g(u) = sig(u) - g.
    # Gradient: w[(s - p)(+1) + (sig(-theta) - q)(-1)] = w[2s - 1 - p + q] = 0
    #   => s = sig(theta_dag) = (1 + p - q)/2; antisymmetric q = 1 - p gives theta_dag = logit(p).
    # Bread: H = w[s(1-s) + s(1-s)] = 2 w s(1-s).
    # MLE meat: E[{g*(1-g*) + (g* - s_pair)^2} dphi^2] = w[p(1-p) + (p-s)^2 + q(1-q) + (q-(1-s))^2].
    # VR with a FIXED prompt: Cov_x terms vanish, E_x Cov(b|x) = Cov(b), so with c = 1/(1+rho)
    #   Omega(lam) = Omega_MLE - 2 lam X + lam^2 Cov(b) (1 + c/M)      (1/M -> 0 for the exact M),
    #   b on (0,1): (s - h01)(+1);  b on (1,0): (1 - s - h10)(-1) = s + h10 - 1,
    #   E b = w[(s - h01) + (s + h10 - 1)], E b^2 = w[(s - h01)^2 + (s + h10 - 1)^2], Cov(b) = E b^2 - (E b)^2,
    #   X = Cov(a, b) = w[(s - p)(s - h01) + (s + q - 1)(s + h10 - 1)]   (E a = 0 at theta_dag).
    pi0 = 0.3
    w = pi0 * (1.0 - pi0)
    pop = _two_response_population(pi0, p, q)
    s = (1.0 + p - q) / 2.0
    theta = _logit(s)
    H = 2.0 * w * s * (1.0 - s)
    omega_mle = w * (p * (1 - p) + (p - s) ** 2 + q * (1 - q) + (q - (1 - s)) ** 2)

    tgt = asy.population_target(pop)
    assert tgt.theta[0] == pytest.approx(theta, abs=1e-10)
    if q == 1.0 - p:
        assert tgt.theta[0] == pytest.approx(_logit(p), abs=1e-10)
    assert tgt.grad_norm < 1e-10
    assert np.isnan(tgt.se).all()  # one prompt: no Monte Carlo error to estimate
    np.testing.assert_allclose(asy.bread(pop, np.array([theta])), [[H]], atol=1e-12)

    mle = asy.mle_covariance(pop)
    np.testing.assert_allclose(mle.H, [[H]], atol=1e-12)
    np.testing.assert_allclose(mle.Omega, [[omega_mle]], atol=1e-12)
    assert mle.trace == pytest.approx(omega_mle / H**2, abs=1e-10)
    assert math.isnan(mle.trace_se) and mle.n_batches == 0 and "too few" in mle.mc_note

    for h01, h10 in [(0.5, 0.5), (0.9, 0.9), (p, q)]:  # constant g_hat, constant 0.9, oracle g_hat = g*
        g_hat = np.array([[[0.5, h01], [h10, 0.5]]])
        Eb = w * ((s - h01) + (s + h10 - 1))
        cov_b = w * ((s - h01) ** 2 + (s + h10 - 1) ** 2) - Eb**2
        X = w * ((s - p) * (s - h01) + (s + q - 1) * (s + h10 - 1))
        for lam, M, rho in [(1.0, 1, 0.0), (1.0, 4, 0.0), (0.6, None, 0.0), (1.0, 3, 2.0), (-0.4, 2, 0.5)]:
            c = 1.0 / (1.0 + rho)
            inv_M = 0.0 if M is None else 1.0 / M
            omega = omega_mle - 2 * lam * X + lam**2 * cov_b * (1 + c * inv_M)
            res = asy.vr_covariance(pop, g_hat, lam=lam, M=M, rho=rho)
            np.testing.assert_allclose(res.Omega, [[omega]], atol=1e-12)
            assert res.trace == pytest.approx(omega / H**2, abs=1e-10)
            assert (res.lam, res.M, res.rho) == (lam, M, rho)
    # oracle, lam = 1, rho = 0: Omega_MLE - Omega_VR = (1 - 1/M) w[(s-p)^2 + (s+q-1)^2]
    within = w * ((s - p) ** 2 + (s + q - 1) ** 2)
    oracle = np.array([[[0.5, p], [q, 0.5]]])
    for M in (1, 2, 7):
        res = asy.vr_covariance(pop, oracle, lam=1.0, M=M)
        assert res.Omega[0, 0] == pytest.approx(omega_mle - (1 - 1 / M) * within, abs=1e-12)


def test_golden_two_responses_squared_loss() -> None:
    # IPO loss l(z) = (z - 1/2)^2: m'_g(u) = 2g(u - 1/2) + 2(1-g)(u + 1/2) = 2u + 1 - 2g, m''_g = 2g + 2(1-g) = 2.
    # Gradient: w[(2 theta + 1 - 2p) - (-2 theta + 1 - 2q)] = w[4 theta - 2p + 2q] => theta_dag = (p - q)/2.
    # Bread H = w (2 + 2) = 4w (dphi^2 = 1 on both pairs). MLE meat: m'_1 = 2u - 1, m'_0 = 2u + 1:
    #   w[p (2t - 1)^2 + (1-p)(2t + 1)^2 + q(-2t - 1)^2 + (1-q)(-2t + 1)^2], t = theta_dag.
    pi0, p, q = 0.4, 0.75, 0.35
    w = pi0 * (1 - pi0)
    pop = _two_response_population(pi0, p, q)
    t = (p - q) / 2
    H = 4 * w
    omega = w * (p * (2 * t - 1) ** 2 + (1 - p) * (2 * t + 1) ** 2 + q * (2 * t + 1) ** 2 + (1 - q) * (1 - 2 * t) ** 2)
    tgt = asy.population_target(pop, loss="ipo")
    assert tgt.theta[0] == pytest.approx(t, abs=1e-12)
    res = asy.mle_covariance(pop, loss=Squared())
    np.testing.assert_allclose(res.H, [[H]], atol=1e-12)
    np.testing.assert_allclose(res.Omega, [[omega]], atol=1e-12)
    assert res.loss == "ipo"


# ------------------------------------------------------------------------------------------ brute force checks


@given(
    seed=st.integers(0, 10_000), K=st.integers(2, 3), d=st.integers(1, 2), lam=st.floats(-0.5, 1.5),
    M=st.sampled_from([1, 2, None]), rho=st.sampled_from([0.0, 0.5, 3.0]),
    aux=st.sampled_from(["noisy", "half", "random"]), bias=st.sampled_from([0.0, 0.3]),
)
def test_covariance_matches_exact_enumeration(
    seed: int, K: int, d: int, lam: float, M: int | None, rho: float, aux: str, bias: float
) -> None:
    pop = _mixture_population(seed, P=4, K=K, d=d, bias=bias)
    g_hat = {
        "noisy": _noisy(pop.g_star, 0.7, seed + 1),
        "half": np.full(pop.g_star.shape, 0.5),
        "random": np.random.default_rng(seed + 2).uniform(size=pop.g_star.shape),
    }[aux]
    res = asy.vr_covariance(pop, g_hat, lam=lam, M=M, rho=rho)
    theta = res.theta_dagger
    assert np.abs(_brute_grad(pop, theta, pop.g_star)).max() < 1e-10
    dphi, w = _pairs(pop)
    s = _sigmoid(dphi @ theta)
    H = np.einsum("pab,pabi,pabj->ij", w * s * (1 - s), dphi, dphi) / pop.size
    np.testing.assert_allclose(res.H, H, rtol=1e-10, atol=1e-13)
    omega = _enumerated_omega(pop, theta, g_hat, lam, M, rho)
    scale = np.abs(omega).max()
    np.testing.assert_allclose(res.Omega, omega, rtol=0, atol=1e-10 * scale)
    Hinv = np.linalg.inv(H)
    np.testing.assert_allclose(res.cov, Hinv @ omega @ Hinv, rtol=1e-9, atol=1e-10 * np.abs(res.cov).max())


def test_mle_meat_formula_logistic() -> None:
    # Omega_MLE = E[{g*(1-g*) + (g* - s)^2} dphi dphi^T], written out on explicit pairs
    pop = _mixture_population(3, P=40, K=4, d=3, bias=0.2)
    res = asy.mle_covariance(pop)
    dphi, w = _pairs(pop)
    g = pop.g_star
    s = _sigmoid(dphi @ res.theta_dagger)
    want = np.einsum("pab,pabi,pabj->ij", w * (g * (1 - g) + (g - s) ** 2), dphi, dphi) / pop.size
    np.testing.assert_allclose(res.Omega, want, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(res.Omega, _enumerated_omega(pop, res.theta_dagger, None, 0.0, 1, 0.0), rtol=1e-10)


@pytest.mark.parametrize("loss", [Squared(), SmoothedTruncatedHinge(s=-0.5, bandwidth=0.3), Logistic()])
def test_bread_matches_autograd_hessian(loss) -> None:
    # H(theta) = Hessian of (1/P) sum_p sum_ab w m_{g*}(theta . dphi), by torch autograd through pair_loss
    pop = _mixture_population(5, P=6, K=3, d=2, bias=0.1)
    theta = np.array([0.3, -0.7])
    dphi, w = (torch.as_tensor(a) for a in _pairs(pop))
    g = torch.as_tensor(pop.g_star)

    def objective(th: torch.Tensor) -> torch.Tensor:
        return (w * pair_loss(loss, dphi @ th, g)).sum() / pop.size

    want = torch.autograd.functional.hessian(objective, torch.as_tensor(theta)).numpy()
    np.testing.assert_allclose(asy.bread(pop, theta, loss=loss), want, rtol=1e-10, atol=1e-13)


def test_population_target_soft_label_g() -> None:
    # the target of a soft-label fit on g (here an auxiliary model) solves E[(s - g) dphi] = 0
    pop = _mixture_population(11, P=30, K=4, d=3)
    g = _noisy(pop.g_star, 1.0, 12)
    tgt = asy.population_target(pop, g=g)
    assert tgt.grad_norm < 1e-10 and tgt.iterations >= 1
    assert np.abs(_brute_grad(pop, tgt.theta, g)).max() < 1e-10
    assert np.abs(tgt.theta - asy.population_target(pop).theta).max() > 1e-3


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    pop = _mixture_population(8, P=60, K=5, d=3, bias=0.2)
    g_hat = _noisy(pop.g_star, 0.5, 9)
    ref = asy.vr_covariance(pop, g_hat, lam=0.8, M=3, rho=1.0)
    monkeypatch.setattr(asy, "_CHUNK_ENTRIES", 7 * 25)  # 7 prompts per chunk, not dividing P or batches
    monkeypatch.setattr(asy, "_FITS", {})  # the targets fitted again, in the new chunks
    got = asy.vr_covariance(pop, g_hat, lam=0.8, M=3, rho=1.0)
    np.testing.assert_allclose(got.Omega, ref.Omega, rtol=1e-12)
    np.testing.assert_allclose(got.cov, ref.cov, rtol=1e-12)
    np.testing.assert_allclose(got.batch_cov, ref.batch_cov, rtol=1e-9)


def test_target_fits_are_reused_only_for_identical_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every covariance on a population needs the same targets: the second call reuses the fits
    (no Newton step taken) and gives the numbers of a cold call; a population changed in place, or
    another loss, is fitted afresh."""
    monkeypatch.setattr(asy, "_FITS", {})
    pop = _mixture_population(3, P=40, K=4, d=2, bias=0.3)
    g_hat = _noisy(pop.g_star, 0.3, 4)
    first = asy.vr_covariance(pop, g_hat, lam=1.0, M=2)
    calls = []
    monkeypatch.setattr(asy, "_newton", lambda *a: calls.append(1) or _real_newton(*a))
    again = asy.vr_covariance(pop, g_hat, lam=1.0, M=2)
    assert not calls
    monkeypatch.setattr(asy, "_FITS", {})
    cold = asy.vr_covariance(pop, g_hat, lam=1.0, M=2)
    assert calls
    for got in (again, cold):
        np.testing.assert_array_equal(got.cov, first.cov)
        np.testing.assert_array_equal(got.batch_cov, first.batch_cov)
    calls.clear()
    pop.phi[0, 0, 0] += 0.5  # same object, new content
    moved = asy.mle_covariance(pop)
    assert calls and not np.allclose(moved.theta_dagger, first.theta_dagger)
    calls.clear()
    asy.mle_covariance(pop, loss=Squared())
    assert calls


_real_newton = asy._newton


def test_feature_rescaling_equivariance() -> None:
    # phi -> phi D (D diagonal) maps theta_dagger -> D^-1 theta_dagger and cov -> D^-1 cov D^-1, even when
    # the scales differ by 12 orders of magnitude (rank and Newton decisions are scale-free)
    pop = _mixture_population(3, P=40, K=4, d=3, bias=0.2)
    g_hat = _noisy(pop.g_star, 0.5, 4)
    D = np.array([1e-7, 1.0, 1e5])
    scaled = PairPopulation(pop.phi * D, pop.pi, pop.g_star)
    a = asy.vr_covariance(pop, g_hat, lam=0.7, M=2, rho=1.0)
    b = asy.vr_covariance(scaled, g_hat, lam=0.7, M=2, rho=1.0)
    np.testing.assert_allclose(b.theta_dagger * D, a.theta_dagger, rtol=1e-10)
    np.testing.assert_allclose(b.cov * np.outer(D, D), a.cov, rtol=1e-9)
    ch_a = asy.optimal_lambda(pop, g_hat, M=2, rho=1.0, weight=1, clip=None)
    ch_b = asy.optimal_lambda(scaled, g_hat, M=2, rho=1.0, weight=1, clip=None)
    assert ch_b.lam_unclipped == pytest.approx(ch_a.lam_unclipped, rel=1e-9)


# ------------------------------------------------------------------------------------------ special cases


def test_oracle_vrpo_identity_psd_and_limits() -> None:
    # g_hat = g*, lam = 1, rho = 0: Omega_MLE - Omega_VR = (1 - 1/M) E_x Cov_{pair|x}((g* - s) dphi)
    pop = _mixture_population(21, P=50, K=4, d=3, bias=0.1)
    mle = asy.mle_covariance(pop)
    within = _within_cov(pop, mle.theta_dagger)
    assert np.linalg.eigvalsh(within).min() > 0
    for M in (1, 2, 5, None):
        vr = asy.vr_covariance(pop, pop.g_star, lam=1.0, M=M, rho=0.0)
        factor = 1.0 if M is None else 1.0 - 1.0 / M
        np.testing.assert_allclose(mle.Omega - vr.Omega, factor * within, rtol=1e-10, atol=1e-13)
        assert np.linalg.eigvalsh(mle.cov - vr.cov).min() >= -1e-12
    # one reference pair per prompt (the published configuration): exactly the MLE's covariance
    np.testing.assert_allclose(asy.vr_covariance(pop, pop.g_star, 1.0, 1).cov, mle.cov, rtol=1e-11, atol=1e-14)
    # M -> infinity approaches the exact expectation at rate 1/M
    big = asy.vr_covariance(pop, pop.g_star, 1.0, 10**6)
    exact = asy.vr_covariance(pop, pop.g_star, 1.0, None)
    np.testing.assert_allclose(big.Omega, exact.Omega, atol=2e-6 * np.abs(within).max())
    assert asy.vr_covariance(pop, pop.g_star, 1.0, math.inf).M is None


@pytest.mark.parametrize("P", [1, 3, 40])
def test_bradley_terry_population_has_no_gain(P: int) -> None:
    rng = np.random.default_rng(P)
    K, d = 4, 3
    phi = rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.ones(K), size=P)
    theta_star = np.array([0.8, -1.2, 0.4])
    g = _sigmoid((phi[:, :, None, :] - phi[:, None, :, :]) @ theta_star)
    pop = PairPopulation(phi, pi, g)
    # the per-prompt score vanishes at theta*, so theta_dagger = theta* for every prompt sample
    tgt = asy.population_target(pop)
    np.testing.assert_allclose(tgt.theta, theta_star, atol=1e-9)
    if P > 1:
        np.testing.assert_allclose(tgt.se, 0.0, atol=1e-9)
    mle = asy.mle_covariance(pop)
    np.testing.assert_allclose(mle.Omega, mle.H, rtol=1e-9)  # information equality under BT
    for M, rho in [(1, 0.0), (4, 0.0), (None, 0.0), (3, 2.0)]:
        vr = asy.vr_covariance(pop, g, lam=1.0, M=M, rho=rho)
        np.testing.assert_allclose(vr.cov, mle.cov, rtol=1e-9)


def test_lambda_zero_and_no_auxiliary_model_are_the_mle() -> None:
    pop = _mixture_population(4, P=30, K=3, d=2)
    g_hat = _noisy(pop.g_star, 1.0, 5)
    mle = asy.mle_covariance(pop)
    for M, rho in [(1, 0.0), (3, 1.5), (None, 0.0)]:
        res = asy.vr_covariance(pop, g_hat, lam=0.0, M=M, rho=rho)
        np.testing.assert_array_equal(res.Omega, mle.Omega)
        np.testing.assert_array_equal(res.cov, mle.cov)
    none = asy.vr_covariance(pop, None, lam=1.0, M=4)
    np.testing.assert_array_equal(none.cov, mle.cov)
    assert none.lam == 0.0


# ------------------------------------------------------------------------------------------ optimal lambda


def test_oracle_optimal_lambda_is_M_over_M_plus_1() -> None:
    # g_hat = g*, rho = 0: X = E_x Cov(b|x) =: E1 and Y = E1 (1 + 1/M), so lam* = M/(M+1) for every W
    pop = _mixture_population(31, P=40, K=4, d=3, bias=0.2)
    for M in (1, 3):
        for weight in (None, 0, 2, np.diag([1.0, 2.0, 0.5])):
            ch = asy.optimal_lambda(pop, pop.g_star, M=M, rho=0.0, weight=weight, clip=None)
            assert ch.lam_unclipped == pytest.approx(M / (M + 1), abs=1e-10)
    assert asy.optimal_lambda(pop, pop.g_star, M=None).lam == pytest.approx(1.0, abs=1e-10)


@given(seed=st.integers(0, 10_000), M=st.sampled_from([1, 2, 5, None]), rho=st.sampled_from([0.0, 1.0, 4.0]),
       coord=st.sampled_from([None, 0, 1]))
def test_optimal_lambda_minimises_the_weighted_trace(seed: int, M: int | None, rho: float, coord: int | None) -> None:
    pop = _mixture_population(seed, P=12, K=3, d=2, bias=0.2)
    g_hat = _noisy(pop.g_star, 1.5, seed + 7)
    ch = asy.optimal_lambda(pop, g_hat, M=M, rho=rho, weight=coord, clip=None)

    def f(lam: float) -> float:
        return asy.vr_covariance(pop, g_hat, lam=lam, M=M, rho=rho).weighted_trace(coord)

    lam = ch.lam_unclipped
    # f is a convex quadratic: f(lam +- h) - f(lam) = a h^2 exactly, with a = (f(l+1) + f(l-1))/2 - f(l) >= 0
    a = 0.5 * (f(lam + 1.0) + f(lam - 1.0)) - f(lam)
    assert a >= 0
    for h in (0.3, -0.7):
        assert f(lam + h) - f(lam) == pytest.approx(a * h * h, rel=1e-7, abs=1e-9 * f(lam))
    assert ch.value == pytest.approx(f(lam), rel=1e-12)
    assert ch.value_mle == pytest.approx(f(0.0), rel=1e-12)
    assert ch.ratio <= 1.0 + 1e-12
    clipped = asy.optimal_lambda(pop, g_hat, M=M, rho=rho, weight=coord, clip=(0.0, 0.5))
    assert clipped.lam == pytest.approx(min(max(lam, 0.0), 0.5), abs=1e-12)
    assert clipped.lam_unclipped == pytest.approx(lam, abs=1e-12)


def test_variance_ratio_and_reported_errors() -> None:
    pop = _mixture_population(41, P=400, K=4, d=3, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.5, 42)
    vr = asy.vr_covariance(pop, g_hat, lam=0.9, M=4, rho=1.0)
    mle = asy.mle_covariance(pop)
    ratio = asy.variance_ratio(pop, g_hat, lam=0.9, M=4, rho=1.0)
    assert ratio.ratio == pytest.approx(vr.trace / mle.trace, rel=1e-12)
    assert ratio.vr == pytest.approx(vr.trace, rel=1e-12) and ratio.mle == pytest.approx(mle.trace, rel=1e-12)
    r1 = asy.variance_ratio(pop, g_hat, lam=0.9, M=4, rho=1.0, weight=1)
    assert r1.ratio == pytest.approx(vr.cov[1, 1] / mle.cov[1, 1], rel=1e-12)
    assert vr.weighted_trace(1) == pytest.approx(vr.cov[1, 1], rel=1e-14)
    for se in (ratio.se, r1.se, vr.trace_se, vr.weighted_trace_se(1)):
        assert math.isfinite(se) and se > 0
    assert vr.n_batches == 20 and vr.batch_cov.shape == (20, 3, 3) and "batches of only 20 prompts" in vr.mc_note
    assert vr.weighted_trace_se() == pytest.approx(vr.trace_se, rel=1e-12)


# ------------------------------------------------------------------------------------------ existence


def test_separable_population_has_no_finite_minimiser() -> None:
    # K = 2, g*(0,1) = 1, g*(1,0) = 0: the margin theta . (+1) should go to +infinity
    pop = _two_response_population(0.5, 1.0, 0.0)
    with pytest.raises(InputError, match="no finite"):
        asy.population_target(pop)
    with pytest.raises(InputError, match="no finite"):
        asy.mle_covariance(pop)


def test_separable_population_refused_for_every_loss_with_linear_recession() -> None:
    """The smoothed hinge has the logistic's recession ``[-z]_+``: on deterministic separable preferences it
    is refused too (it was fitted to a point on a flat ray, with a negative covariance trace and no warning)."""
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(20, 3, 2))
    r = phi @ np.array([1.0, -0.5])
    g = (r[:, :, None] > r[:, None, :]).astype(float)
    g[:, range(3), range(3)] = 0.5
    pop = PairPopulation(phi, rng.dirichlet(np.ones(3), size=20), g)
    loss = SmoothedTruncatedHinge(s=-math.inf, bandwidth=0.3)
    assert isinstance(loss.recession(), Recession)
    for call in (asy.population_target, asy.mle_covariance):
        with pytest.raises(InputError, match="no finite unique minimiser"):
            call(pop, loss=loss)


@pytest.mark.parametrize("seed", [0, 2, 4, 5])
def test_a_flat_stationary_point_is_refused(seed: int) -> None:
    """The bounded smoothed truncated hinge on deterministic separable preferences: its infimum lies at
    infinity, and Newton stops where the Gaussian-tailed curvature has vanished. Judged on its own diagonal
    that Hessian passed, and mle_covariance returned a negative trace (these four seeds); relative to the
    pairs' spread it is flat."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(20, 3, 2))
    r = phi @ np.array([1.0, -0.5])
    g = (r[:, :, None] > r[:, None, :]).astype(float)
    g[:, range(3), range(3)] = 0.5
    pop = PairPopulation(phi, rng.dirichlet(np.ones(3), size=20), g)
    with pytest.raises(InputError, match="not positive definite relative to the pairs' spread"):
        asy.mle_covariance(pop, loss=SmoothedTruncatedHinge(s=-0.5, bandwidth=0.3), n_batches=2)


def test_boundary_probabilities_without_separation_have_a_minimiser() -> None:
    # d = 1, phi = (0, 1, 2); every g* is 0 or 1 but inconsistent with one direction:
    # (0,1): dphi = -1, g = 1 needs v <= 0; (1,2): dphi = -1, g = 0 needs v >= 0 -> only v = 0.
    g = np.array([[[0.5, 1.0, 1.0], [0.0, 0.5, 0.0], [0.0, 1.0, 0.5]]])
    pop = PairPopulation(np.array([[[0.0], [1.0], [2.0]]]), np.full((1, 3), 1 / 3), g)
    tgt = asy.population_target(pop)
    assert abs(_brute_grad(pop, tgt.theta, g)[0]) < 1e-10 and abs(tgt.theta[0]) < 10


def test_separable_direction_inside_the_null_space_of_interior_pairs() -> None:
    # d = 2: pairs that move only the first feature have interior g; pairs that move only the
    # second feature have g = 1 whenever the first response has the larger second feature: v = e2 separates.
    phi = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    g = np.full((1, 3, 3), 0.5)
    g[0, 0, 1], g[0, 1, 0] = 0.3, 0.7  # interior, dphi = -e1 / +e1
    g[0, 2, 0], g[0, 0, 2] = 1.0, 0.0  # dphi = +e2 -> first wins; -e2 -> second wins
    g[0, 2, 1], g[0, 1, 2] = 0.6, 0.4  # dphi = (-1, 1) / (1, -1): interior, so interior pairs span R^2
    pop_ok = PairPopulation(phi, np.full((1, 3), 1 / 3), g)
    assert asy.population_target(pop_ok).grad_norm < 1e-10  # interior pairs span R^2
    g2 = g.copy()
    g2[0, 2, 1], g2[0, 1, 2] = 1.0, 0.0  # now only +-e1 pairs are interior; every boundary pair agrees with v = e2
    with pytest.raises(InputError, match="no finite"):
        asy.population_target(PairPopulation(phi, np.full((1, 3), 1 / 3), g2))


def test_separable_batches_leave_the_error_unestimated() -> None:
    # 1-D, K = 2: on prompts 0-3 response 0 always wins, on prompts 4-7 response 1 always wins. The whole
    # population has a finite minimiser (theta_dagger = 0 by symmetry); each half alone is separable.
    phi = np.tile(np.array([[[0.5], [-0.5]]]), (8, 1, 1))
    g = np.full((8, 2, 2), 0.5)
    g[:4, 0, 1], g[:4, 1, 0], g[4:, 0, 1], g[4:, 1, 0] = 1.0, 0.0, 0.0, 1.0
    pop = PairPopulation(phi, np.full((8, 2), 0.5), g)
    res = asy.mle_covariance(pop, n_batches=2)
    assert abs(res.theta_dagger[0]) < 1e-12 and math.isfinite(res.trace)
    assert math.isnan(res.trace_se) and res.batch_cov is None and "no finite" in res.mc_note


def test_collinear_features_are_not_identified() -> None:
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(5, 3, 1)) * np.array([1.0, 2.0])  # second feature = 2 x first
    pop = PairPopulation(phi, np.full((5, 3), 1 / 3), np.full((5, 3, 3), 0.5))
    with pytest.raises(InputError, match="not identified"):
        asy.population_target(pop)


# ------------------------------------------------------------------------------------------ validation


def test_input_validation() -> None:
    pop = _mixture_population(1, P=6, K=3, d=2)
    gh = pop.g_star
    cases = [
        (lambda: asy.vr_covariance(pop, gh[:, :2], lam=1.0), "g_hat"),
        (lambda: asy.vr_covariance(pop, gh + 0.6, lam=1.0), "g_hat"),
        (lambda: asy.vr_covariance(pop, np.where(gh > 0.5, np.nan, gh), lam=1.0), "g_hat"),
        (lambda: asy.vr_covariance(pop, gh, lam=1.0, M=0), "M"),
        (lambda: asy.vr_covariance(pop, gh, lam=1.0, M=2.5), "M"),
        (lambda: asy.vr_covariance(pop, gh, lam=1.0, M=True), "M"),
        (lambda: asy.vr_covariance(pop, gh, lam=1.0, rho=-0.1), "rho"),
        (lambda: asy.vr_covariance(pop, gh, lam=float("nan")), "lam"),
        (lambda: asy.vr_covariance(pop, gh, lam=1.0, n_batches=1), "n_batches"),
        (lambda: asy.vr_covariance(pop, gh, lam=1.0, loss="hinge"), "not smooth"),
        (lambda: asy.mle_covariance(pop, loss=TruncatedHinge()), "not smooth"),
        (lambda: asy.mle_covariance(pop, loss="nope"), "unknown loss"),
        (lambda: asy.population_target(pop, g=gh[0]), "g:"),
        (lambda: asy.population_target(pop.phi), "PairPopulation"),
        (lambda: asy.population_target(pop, tol=0.0), "tol"),
        (lambda: asy.bread(pop, np.zeros(3)), "theta"),
        (lambda: asy.optimal_lambda(pop, None), "g_hat"),
        (lambda: asy.optimal_lambda(pop, gh, weight=2), "weight"),
        (lambda: asy.optimal_lambda(pop, gh, weight=np.array([[1.0, 2.0], [2.0, 1.0]])), "positive semi-definite"),
        (lambda: asy.optimal_lambda(pop, gh, weight=np.array([[1.0, 0.5], [0.0, 1.0]])), "symmetric"),
        (lambda: asy.optimal_lambda(pop, gh, clip=(1.0, 0.0)), "clip"),
        (lambda: asy.variance_ratio(pop, gh, M=-1), "M"),
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match):
            call()


# ------------------------------------------------------------------------------------------ Monte Carlo errors


def _super_population_draw(rng: np.random.Generator, P: int, K: int = 3, d: int = 2) -> PairPopulation:
    """P prompts from a fixed prompt law (features N(0, I), Dirichlet policy, fixed two-annotator links)."""
    phi = rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.full(K, 2.0), size=P)
    dphi = phi[:, :, None, :] - phi[:, None, :, :]
    g = 0.5 * _sigmoid(4.0 * dphi @ np.array([1.0, 0.3])) + 0.5 * _sigmoid(4.0 * dphi @ np.array([-0.4, 1.0]))
    return PairPopulation(phi, pi, g)


def _check_se(values: np.ndarray, ses: np.ndarray) -> None:
    """Reported standard errors vs the spread over independent prompt samples.

    With D draws, sd_hat has relative standard error ~ 1/sqrt(2(D-1)) (normal theory) and mean(se) has
    relative standard error sd(se)/(mean(se) sqrt(D)); log(sd_hat / mean(se)) must lie within 4 of the
    combined standard errors.
    """
    D = values.shape[0]
    sd = values.std(axis=0, ddof=1)
    mse = ses.mean(axis=0)
    tol = 4.0 * np.sqrt(1.0 / (2 * (D - 1)) + (ses.std(axis=0, ddof=1) / mse) ** 2 / D)
    assert (np.abs(np.log(sd / mse)) <= tol).all(), (sd, mse, tol)


def test_monte_carlo_errors_match_spread_over_prompt_samples() -> None:
    # 8 batches of 50 prompts (with 20 batches of 20 prompts the batch-means error is ~15% too large here)
    rng = np.random.default_rng(2024)
    thetas, ses, traces, trace_ses = [], [], [], []
    for _ in range(120):
        pop = _super_population_draw(rng, P=400)
        res = asy.vr_covariance(pop, pop.g_star, lam=1.0, M=None, n_batches=8)
        assert res.n_batches == 8 and res.mc_note == ""
        thetas.append(res.theta_dagger)
        ses.append(res.theta_se)
        traces.append(res.trace)
        trace_ses.append(res.trace_se)
    np.testing.assert_array_equal(asy.population_target(pop).se, res.theta_se)
    _check_se(np.array(thetas), np.array(ses))
    _check_se(np.array(traces)[:, None], np.array(trace_ses)[:, None])


# ------------------------------------------------------------------------------------------ simulation


def _draw(rng: np.random.Generator, cum: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """One response per prompt id in ``idx`` from the reference policy (cumulative probabilities ``cum``)."""
    K = cum.shape[1]
    return np.minimum((rng.random(idx.shape)[..., None] > cum[idx]).sum(-1), K - 1)


def _fit_newton(objective, hessian, theta0: torch.Tensor, tol: float = 1e-10, max_iter: int = 30) -> torch.Tensor:
    """Newton per replication: gradient of ``objective(theta) -> (R,)`` by autograd, ``hessian(theta) -> (R, d, d)``.

    The fixed point (gradient zero) is defined by autograd of the estimator's objective alone; the Hessian
    only sets the speed of convergence.
    """
    theta = theta0.clone()
    for _ in range(max_iter):
        th = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(th).sum(), th)
        if float(grad.abs().max()) < tol:
            return theta
        theta = theta - torch.linalg.solve(hessian(theta), grad)
    raise AssertionError(f"Newton did not converge: max |grad| = {float(grad.abs().max()):.3g}")


def _curvature(loss: Logistic, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``m''_g(u) = g l''(u) + (1 - g) l''(-u)`` from the loss's derivatives."""
    return g * loss.derivatives(u)[2] + (1.0 - g) * loss.derivatives(-u)[2]


def _weighted_gram(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean_i h_i x_i x_i^T`` per replication: (R, m), (R, m, d) -> (R, d, d)."""
    return torch.einsum("rm,rmi,rmj->rij", h, x, x) / x.shape[1]


def _simulate_fits(pop: PairPopulation, designs: dict, n: int, R: int, seed: int, block: int = 400) -> dict:
    """R replications of n labelled pairs; MLE and each VR design fitted on the same labelled data.

    Prompts are drawn uniformly from the P prompts of ``pop``, so the population's exact asymptotics
    are exactly those of this sampling design (no prompt Monte Carlo error in the prediction).
    ``designs``: name -> (g_hat, lam, M, rho) with M reference pairs on every labelled and unlabelled prompt.
    """
    rng = np.random.default_rng(seed)
    P = pop.size
    cum = np.cumsum(pop.pi, axis=1)
    loss = Logistic()
    out: dict[str, list[np.ndarray]] = {name: [] for name in ["mle", *designs]}
    for start in range(0, R, block):
        r = min(block, R - start)
        idx = rng.integers(P, size=(r, n))
        a, b = _draw(rng, cum, idx), _draw(rng, cum, idx)
        z = (rng.random((r, n)) < pop.g_star[idx, a, b]).astype(np.float64)
        dphi = torch.as_tensor(pop.phi[idx, a] - pop.phi[idx, b])
        zt = torch.as_tensor(z)
        margin = lambda th: torch.einsum("rnd,rd->rn", dphi, th)  # noqa: E731
        mle = _fit_newton(lambda th: vr_objective(loss, margin(th), zt),
                          lambda th: _weighted_gram(_curvature(loss, margin(th), zt), dphi),
                          torch.zeros((r, pop.d), dtype=torch.float64))
        out["mle"].append(mle.numpy())
        for name, (g_hat, lam, M, rho) in designs.items():
            unl = rng.integers(P, size=(r, int(round(rho * n))))
            ridx = np.repeat(np.concatenate([idx, unl], axis=1), M, axis=1)
            ra, rb = _draw(rng, cum, ridx), _draw(rng, cum, ridx)
            rdphi = torch.as_tensor(pop.phi[ridx, ra] - pop.phi[ridx, rb])
            g_lab = torch.as_tensor(g_hat[idx, a, b])
            g_ref = torch.as_tensor(g_hat[ridx, ra, rb])

            def objective(th: torch.Tensor) -> torch.Tensor:
                return vr_objective(loss, margin(th), zt, g_lab, torch.einsum("rnd,rd->rn", rdphi, th), g_ref, lam=lam)

            def hessian(th: torch.Tensor) -> torch.Tensor:
                u, u_ref = margin(th), torch.einsum("rnd,rd->rn", rdphi, th)
                h_lab = _curvature(loss, u, zt) - lam * _curvature(loss, u, g_lab)
                return _weighted_gram(h_lab, dphi) + lam * _weighted_gram(_curvature(loss, u_ref, g_ref), rdphi)

            out[name].append(_fit_newton(objective, hessian, mle).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _check_against_simulation(n: int, R: int, seed: int) -> None:
    pop = _mixture_population(77, P=2000, K=3, d=2, sharp=6.0, bias=0.1)
    noisy = _noisy(pop.g_star, 0.5, 78)
    designs = {"oracle_M4": (pop.g_star, 1.0, 4, 0.0), "noisy_M2_rho1": (noisy, 0.8, 2, 1.0)}
    fits = _simulate_fits(pop, designs, n=n, R=R, seed=seed)
    predicted = {"mle": asy.mle_covariance(pop).trace}
    for name, (g_hat, lam, M, rho) in designs.items():
        predicted[name] = asy.vr_covariance(pop, g_hat, lam=lam, M=M, rho=rho).trace
    emp = {}
    for name, th in fits.items():
        S = np.cov(th, rowvar=False)
        emp[name] = n * np.trace(S)
        # normal theory: Var(tr S) = 2 tr(Sigma^2) / (R - 1) for the sample covariance S of R draws
        se = n * math.sqrt(2.0 * np.trace(S @ S) / (R - 1))
        assert abs(emp[name] - predicted[name]) <= 4.0 * se, (name, emp[name], predicted[name], se)
    # the efficiency gain: ratio of empirical traces (paired over replications) vs predicted, bootstrap se
    boot_rng = np.random.default_rng(seed + 1)
    for name in designs:
        boots = []
        for _ in range(200):
            k = boot_rng.integers(R, size=R)
            boots.append(np.trace(np.cov(fits[name][k], rowvar=False)) / np.trace(np.cov(fits["mle"][k], rowvar=False)))
        se = float(np.std(boots, ddof=1))
        ratio = emp[name] / emp["mle"]
        assert abs(ratio - predicted[name] / predicted["mle"]) <= 4.0 * se, (name, ratio, predicted, se)


def test_covariance_matches_simulated_estimators() -> None:
    _check_against_simulation(n=2000, R=400, seed=5)


@pytest.mark.slow
def test_covariance_matches_simulated_estimators_long() -> None:
    _check_against_simulation(n=4000, R=5000, seed=6)


# ------------------------------------------------------------------------------------------ second-order bias


def _cluster_outcomes(pop: PairPopulation, g_hat: np.ndarray, kappa: float, M: int | None,
                      labelled: bool) -> tuple[torch.Tensor, ...]:
    """Every outcome of a labelled cluster (prompt, labelled pair, label, ``M`` reference pairs; the exact
    expectation for M None) or of an unlabelled one: probability, labelled dphi, Z, g_hat, whether
    labelled; reference dphi, g_hat, weights (``kappa / M``, or ``kappa pi_a pi_b`` for M None)."""
    P, K, d = pop.phi.shape
    pairs = [(a, b) for a in range(K) for b in range(K)]
    w = pop.pi[:, :, None] * pop.pi[:, None, :]
    rows = []
    for p in range(P):
        refs = [tuple(pairs)] if M is None else list(itertools.product(pairs, repeat=M))
        labs = [(ab, z) for ab in pairs for z in (0, 1)] if labelled else [((0, 0), 0)]
        for (ab, z), ref in itertools.product(labs, refs):
            pr = 1.0 / P
            if labelled:
                pr *= w[p][ab] * (pop.g_star[p][ab] if z else 1.0 - pop.g_star[p][ab])
            if M is None:
                rw = [kappa * w[p][r] for r in ref]
            else:
                pr *= np.prod([w[p][r] for r in ref])
                rw = [kappa / M] * M
            rows.append((pr, pop.phi[p, ab[0]] - pop.phi[p, ab[1]], z, g_hat[p][ab], float(labelled),
                         [pop.phi[p, r[0]] - pop.phi[p, r[1]] for r in ref], [g_hat[p][r] for r in ref], rw))
    cols = list(zip(*rows))
    return tuple(torch.as_tensor(np.array(c, dtype=np.float64)) for c in cols)


def _cluster_derivatives(pop: PairPopulation, loss, g_hat: np.ndarray, lam: float, M: int | None, rho: float,
                         order: int) -> list[tuple[float, torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Per sample (labelled, weight 1; unlabelled, weight rho), every cluster outcome's probability and the
    cluster loss's derivatives of orders 1..``order`` at ``theta_dagger``, by torch.func."""
    kappa = lam / (1.0 + rho)

    def cluster_loss(th, x, z, g, lab, xr, gr, rw):
        u = x @ th
        labelled = pair_loss(loss, u, z) - lam * pair_loss(loss, u, g)
        return lab * labelled + (rw * pair_loss(loss, xr @ th, gr)).sum()

    theta = torch.as_tensor(asy.population_target(pop, loss).theta)
    fs = [torch.func.grad(cluster_loss)]
    while len(fs) < order:  # reverse mode: forward mode's import scripts torch decompositions
        fs.append(torch.func.jacrev(fs[-1]))
    samples = [(1.0, True)] + ([(rho, False)] if rho > 0 and kappa else [])
    out = []
    for weight, labelled in samples:
        pr, *data = _cluster_outcomes(pop, g_hat, kappa, M, labelled)
        derivs = tuple(torch.func.vmap(f, in_dims=(None, 0, 0, 0, 0, 0, 0, 0))(theta, *data) for f in fs)
        out.append((weight, pr / pr.sum(), derivs))
    return out


def _enumerated_moments(pop: PairPopulation, loss, g_hat: np.ndarray, lam: float, M: int | None,
                        rho: float) -> dict[str, np.ndarray]:
    """The second-order bias from the definition, by brute force: every outcome of a labelled cluster
    and of an unlabelled one (``_cluster_outcomes``), the cluster loss differentiated by torch.func
    (gradient G, Hessian J, third derivative tensor T), and ``b = H^-1 (sum_s rho_s [E(J H^-1 G) - E J
    H^-1 E G] - T[Sigma] / 2)``; also the pooled moments ``H``, ``Omega``, ``T = sum_s rho_s E T_s`` and
    ``K_ijk = sum_s rho_s Cov_s(J_ij, G_k)``."""
    moments = [(wt, pr, G, J, T) for wt, pr, (G, J, T) in _cluster_derivatives(pop, loss, g_hat, lam, M, rho, 3)]
    H = sum(wt * torch.einsum("n,nij->ij", pr, J) for wt, pr, _, J, _ in moments)
    Hi = torch.linalg.inv(H)
    EG = [torch.einsum("n,ni->i", pr, G) for _, pr, G, _, _ in moments]
    Omega = sum(wt * (torch.einsum("n,ni,nj->ij", pr, G, G) - torch.outer(eg, eg))
                for (wt, pr, G, _, _), eg in zip(moments, EG))
    Sigma = Hi @ Omega @ Hi
    C = sum(wt * (torch.einsum("n,nij,jk,nk->i", pr, J, Hi, G) - torch.einsum("n,nij->ij", pr, J) @ Hi @ eg)
            for (wt, pr, G, J, _), eg in zip(moments, EG))
    T3 = sum(wt * torch.einsum("n,nijk,jk->i", pr, T, Sigma) for wt, pr, _, _, T in moments)
    Tm = sum(wt * torch.einsum("n,nijk->ijk", pr, T) for wt, pr, _, _, T in moments)
    K = sum(wt * (torch.einsum("n,nij,nk->ijk", pr, J, G) - torch.einsum("n,nij->ij", pr, J)[:, :, None] * eg)
            for (wt, pr, G, J, _), eg in zip(moments, EG))
    return {"bias": (Hi @ (C - 0.5 * T3)).numpy(), "H": H.numpy(), "Omega": Omega.numpy(), "T": Tm.numpy(),
            "K": K.numpy()}


def _enumerated_bias(*args) -> np.ndarray:
    return _enumerated_moments(*args)["bias"]


@pytest.mark.parametrize("loss", [Logistic(), SmoothedTruncatedHinge(s=-math.inf, bandwidth=0.4)], ids=repr)
@pytest.mark.parametrize("lam,M,rho", [(0.0, 1, 0.0), (1.0, 1, 0.0), (0.7, 2, 0.0), (1.0, None, 0.0),
                                       (0.8, 1, 1.5), (1.0, None, 2.0)])
def test_bias_matches_brute_force_enumeration(loss, lam: float, M: int | None, rho: float) -> None:
    # two prompts, K = 3, d = 2 (matrix order matters), a noisy g_hat, position bias (g* + g*^T != 1)
    pop = _mixture_population(5, P=2, K=3, d=2, sharp=2.0, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.7, 6)
    got = asy.vr_bias(pop, g_hat, lam=lam, M=M, rho=rho, loss=loss)
    want = _enumerated_bias(pop, loss, g_hat, lam, M, rho)
    np.testing.assert_allclose(got.bias, want, rtol=1e-8, atol=1e-10)
    assert np.isnan(got.bias_se).all() and "too few" in got.mc_note  # two prompts: no batch means
    plain = asy.vr_covariance(pop, g_hat, lam=lam, M=M, rho=rho, loss=loss)
    np.testing.assert_allclose(got.cov, plain.cov, rtol=1e-12)
    assert plain.bias is None and got.trace == plain.trace and got.lam == plain.lam


@pytest.mark.parametrize("p,q,pi0", [(0.8, 0.2, 0.3), (0.8, 0.3, 0.5), (0.35, 0.9, 0.2)])
def test_golden_two_responses_bias(p: float, q: float, pi0: float) -> None:
    # Pairs (0,1): dphi = +1, u = theta, Z ~ B(p); (1,0): dphi = -1, u = -theta, Z ~ B(q), weight w each.
    # Both have J = v = s(1-s) and third derivative v (1 - 2s) (the sign of dphi^3 cancels that of
    # l'''(-theta)); E[J H^-1 G] = v H^-1 E[G] = 0, so b = -H^-1 T Sigma / 2 with H = 2wv,
    # T = 2wv(1 - 2s), Sigma = Omega / H^2: b = -(1 - 2s) Omega / (8 w^2 v^2). Well specified
    # (q = 1 - p): Cox and Snell's (2p - 1) / (2 n_eff p (1 - p)) with n_eff = 2 w n informative pairs.
    w = pi0 * (1.0 - pi0)
    pop = _two_response_population(pi0, p, q)
    s = (1.0 + p - q) / 2.0
    v = s * (1.0 - s)
    omega = w * (p * (1 - p) + (p - s) ** 2 + q * (1 - q) + (q - (1 - s)) ** 2)
    res = asy.vr_bias(pop)
    assert res.bias[0] == pytest.approx(-(1 - 2 * s) * omega / (8 * w**2 * v**2), rel=1e-10)
    if q == 1.0 - p:
        assert res.bias[0] == pytest.approx((2 * p - 1) / (4 * w * p * (1 - p)), rel=1e-10)
    # g_hat None and lam = 0 are the MLE
    assert asy.vr_bias(pop, np.full((1, 2, 2), 0.5), lam=0.0).bias == pytest.approx(res.bias, rel=1e-12)


def test_exact_expectation_is_the_limit_of_many_reference_pairs() -> None:
    pop = _mixture_population(3, P=200, K=4, d=3, sharp=3.0)
    g_hat = _noisy(pop.g_star, 0.5, 4)
    exact = asy.vr_bias(pop, g_hat, lam=1.0, M=None).bias
    # b is affine in 1/M: b(M) = b(inf) + c / M
    b1, b2 = asy.vr_bias(pop, g_hat, lam=1.0, M=1).bias, asy.vr_bias(pop, g_hat, lam=1.0, M=2).bias
    np.testing.assert_allclose(exact, 2 * b2 - b1, rtol=1e-9, atol=1e-12)
    big = asy.vr_bias(pop, g_hat, lam=1.0, M=10**6).bias
    np.testing.assert_allclose(big, exact, rtol=1e-5, atol=1e-8)


def _check_bias_against_simulation(n: int, R: int, seed: int) -> None:
    # n (theta_hat - theta_dagger) averaged over R replications, against b (+ O(1/n)): the mean's
    # Monte Carlo error is sd / sqrt(R); 4 of them plus the measured O(1/n) remainder at this n
    # (0.1 to 0.2 per coordinate at n = 400 with R = 40000) bound the difference.
    pop = _mixture_population(77, P=2000, K=3, d=2, sharp=6.0, bias=0.1)
    noisy = _noisy(pop.g_star, 0.5, 78)
    designs = {"oracle_M4": (pop.g_star, 1.0, 4, 0.0), "noisy_M2_rho1": (noisy, 0.8, 2, 1.0)}
    fits = _simulate_fits(pop, designs, n=n, R=R, seed=seed)
    theta = asy.population_target(pop).theta
    for name, th in fits.items():
        g_hat, lam, M, rho = designs.get(name, (None, 0.0, 1, 0.0))
        pred = asy.vr_bias(pop, g_hat, lam=lam, M=M, rho=rho).bias
        err = n * (th - theta)
        se = err.std(axis=0, ddof=1) / math.sqrt(R)
        assert (np.abs(err.mean(axis=0) - pred) <= 4.0 * se + 0.2).all(), (name, err.mean(axis=0), pred, se)
        # and the estimators' difference, paired over the same labelled data: far more precise
        if name != "mle":
            diff = n * (th - fits["mle"])
            dse = diff.std(axis=0, ddof=1) / math.sqrt(R)
            want = pred - asy.vr_bias(pop).bias
            assert (np.abs(diff.mean(axis=0) - want) <= 4.0 * dse + 0.05).all(), (name, diff.mean(axis=0), want, dse)


def test_bias_matches_simulated_estimators() -> None:
    _check_bias_against_simulation(n=400, R=4000, seed=12)


@pytest.mark.slow
def test_bias_matches_simulated_estimators_long() -> None:
    _check_bias_against_simulation(n=400, R=40000, seed=13)


def _enumerated_tuning_bias(pop: PairPopulation, loss, g_hat: np.ndarray, M: int | None, rho: float,
                            W: np.ndarray) -> np.ndarray:
    """``b_lam``, the bias of estimating ``lam*``, from its definition: ``lam_hat = tr(W' X) / tr(W' Y)`` as a
    functional of the outcome probabilities ``p_L``, ``p_U`` of labelled and unlabelled clusters
    (``_cluster_outcomes``; the MLE by Newton, ``H`` its Hessian, ``X = -Cov_L(A, B)``, ``Y = Cov_L(B) +
    rho Cov_U(B)`` with ``A`` the cluster's MLE gradient and ``B`` the ``lam``-derivative of its VR gradient,
    all at the MLE), its influence functions ``IF_s(c) = d lam / d p_s . (e_c - p_s)`` by autograd, and
    ``b_lam = -H^-1 sum_s E_s[IF_s B~]`` (``B~`` centred within each sample) at ``theta_dagger``."""
    c = 1.0 / (1.0 + rho)

    def labelled_loss(th, x, z, g, lab, xr, gr, rw):
        return lab * pair_loss(loss, x @ th, z)

    def control_loss(th, x, z, g, lab, xr, gr, rw):  # d/d lam of the cluster loss (rw carries c = kappa / lam)
        return -lab * pair_loss(loss, x @ th, g) + (rw * pair_loss(loss, xr @ th, gr)).sum()

    dims = (None, 0, 0, 0, 0, 0, 0, 0)
    A_of = torch.func.vmap(torch.func.grad(labelled_loss), in_dims=dims)
    J_of = torch.func.vmap(torch.func.jacrev(torch.func.grad(labelled_loss)), in_dims=dims)
    B_of = torch.func.vmap(torch.func.grad(control_loss), in_dims=dims)
    samples = [_cluster_outcomes(pop, g_hat, c, M, True)] + ([_cluster_outcomes(pop, g_hat, c, M, False)]
                                                             if rho > 0 else [])
    probs = [(s[0] / s[0].sum()).clone().requires_grad_(True) for s in samples]
    data = [s[1:] for s in samples]
    theta0 = torch.as_tensor(asy.population_target(pop, loss).theta)
    Wt = torch.as_tensor(W)

    def functional(probs):
        th = theta0
        for _ in range(3):  # Newton from the exact root: its derivatives in p to second order
            grad = torch.einsum("n,ni->i", probs[0], A_of(th, *data[0]))
            th = th - torch.linalg.solve(torch.einsum("n,nij->ij", probs[0], J_of(th, *data[0])), grad)
        H = torch.einsum("n,nij->ij", probs[0], J_of(th, *data[0]))
        A = A_of(th, *data[0])
        A = A - probs[0] @ A
        Bs = [B_of(th, *dat) for dat in data]
        Bs = [B - p @ B for B, p in zip(Bs, probs)]
        X = -torch.einsum("n,ni,nj->ij", probs[0], A, Bs[0])
        Y = sum(wt * torch.einsum("n,ni,nj->ij", p, B, B) for wt, p, B in zip((1.0, rho), probs, Bs))
        Hi = torch.linalg.inv(H)
        Wp = Hi @ Wt @ Hi
        return torch.trace(Wp @ X) / torch.trace(Wp @ Y), H, Bs

    lam, H, Bs = functional(probs)
    grads = torch.autograd.grad(lam, probs)
    total = torch.zeros(pop.d, dtype=torch.float64)
    for p, g, B in zip(probs, grads, Bs):
        infl = (g - g @ p).detach()
        total = total + torch.einsum("n,n,ni->i", p.detach(), infl, B.detach())
    return (-torch.linalg.solve(H.detach(), total)).numpy()


@pytest.mark.parametrize("loss", [Logistic(), SmoothedTruncatedHinge(s=-math.inf, bandwidth=0.4)], ids=repr)
@pytest.mark.parametrize("M,rho,weight", [(1, 0.0, None), (2, 0.0, None), (None, 0.0, None), (2, 0.0, 1),
                                          (1, 1.5, None), (None, 2.0, 0)])
def test_tuned_bias_matches_brute_force_enumeration(loss, M: int | None, rho: float, weight: int | None) -> None:
    pop = _mixture_population(5, P=2, K=3, d=2, sharp=2.0, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.7, 6)
    got = asy.tuned_bias(pop, g_hat, M=M, rho=rho, weight=weight, clip=None, loss=loss)
    lam = asy.optimal_lambda(pop, g_hat, M=M, rho=rho, weight=weight, clip=None, loss=loss)
    fixed = asy.vr_bias(pop, g_hat, lam=lam.lam, M=M, rho=rho, loss=loss)
    assert got.lam == lam.lam and got.trace == pytest.approx(fixed.trace, rel=1e-12)
    W = np.eye(2) if weight is None else np.diag(np.eye(2)[weight])
    want = _enumerated_tuning_bias(pop, loss, g_hat, M, rho, W)
    assert np.abs(want).max() > 0.01  # the term is not negligible here
    np.testing.assert_allclose(got.bias - fixed.bias, want, rtol=1e-7, atol=1e-9)


def _check_tuned_bias_against_simulation(cases: tuple[tuple[str, int], ...]) -> None:
    # The fitted power-tuned VRPO against VRPO at the fixed lam*, paired over the same data, n = 1600:
    # n (theta_tuned - theta_fixed) averages to b_lam + O(n^-1/2). Its Monte Carlo error is about
    # 3.5 / sqrt(R) per coordinate; 4 of them plus 0.05 for the remainder bound the difference. Inside the
    # clip the full term (about 0.5 per coordinate), with lam* on the clip's bound half of it, with the
    # clip below lam* none.
    from robust_rlhf.simulate.dataset import sample_population
    from robust_rlhf.theory.fitting import fit

    n, M = 1600, 2
    pop = _mixture_population(77, P=2000, K=3, d=2, sharp=6.0, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.5, 78)
    lam = asy.optimal_lambda(pop, g_hat, M=M).lam
    assert 0.3 < lam < 0.6
    full = asy.tuned_bias(pop, g_hat, M=M).bias - asy.vr_bias(pop, g_hat, lam=lam, M=M).bias
    assert (np.abs(full) > 0.4).all()
    settings = {"inside": ((0.0, 1.0), 1.0), "on_bound": ((0.0, lam), 0.5), "cut": ((0.0, lam - 0.3), 0.0)}
    for name, reps in cases:
        clip, share = settings[name]
        tuned = asy.tuned_bias(pop, g_hat, M=M, clip=clip)
        want = tuned.bias - asy.vr_bias(pop, g_hat, lam=tuned.lam, M=M).bias
        np.testing.assert_allclose(want, share * full, rtol=1e-9, atol=1e-12)
        data = sample_population(pop, n, seed=3, reps=reps, M=M, g_hat=g_hat)
        diff = n * (fit(data, "vrpo_tuned", lam_clip=clip).theta - fit(data, "vrpo", lam=tuned.lam).theta)
        se = diff.std(axis=0, ddof=1) / math.sqrt(reps)
        assert (np.abs(diff.mean(axis=0) - want) <= 4.0 * se + 0.05).all(), (name, diff.mean(axis=0), want, se)


def test_tuned_bias_matches_simulated_estimators() -> None:
    _check_tuned_bias_against_simulation((("inside", 4000), ("cut", 1000)))


@pytest.mark.slow
def test_tuned_bias_matches_simulated_estimators_long() -> None:
    # R = 16000: the tolerance (about 0.16) separates half the term (0.25) from none and from all of it
    _check_tuned_bias_against_simulation((("inside", 16000), ("on_bound", 16000), ("cut", 4000)))


def test_tuned_bias_without_a_limit_of_lam_is_nan_and_checks_input() -> None:
    # an oracle g_hat under BT: the control terms vanish at theta_dagger, tr(W' Y) = 0, lam_hat has no limit
    rng = np.random.default_rng(4)
    phi = rng.normal(size=(30, 3, 2))
    dphi = phi[:, :, None, :] - phi[:, None, :, :]
    pop = PairPopulation(phi, rng.dirichlet(np.ones(3), size=30), _sigmoid(dphi @ np.array([1.0, -0.5])))
    res = asy.tuned_bias(pop, pop.g_star, M=2, n_batches=2)
    assert res.lam == 0.0 and np.isnan(res.bias).all()
    with pytest.raises(InputError, match="g_hat"):
        asy.tuned_bias(pop, None)
    with pytest.raises(InputError, match="clip"):
        asy.tuned_bias(pop, pop.g_star, clip=(1.0, 0.0))


@given(seed=st.integers(0, 10_000), M=st.sampled_from([1, 3, None]), rho=st.sampled_from([0.0, 2.0]))
def test_tuned_bias_is_equivariant_under_a_change_of_features(seed: int, M: int | None, rho: float) -> None:
    # phi -> phi A: theta -> A^-1 theta, and with the weight W -> A^T W A the tuned lam* is unchanged, so
    # every term of the bias is a vector in theta's coordinates: b -> A^-1 b. A missing or extra H^-1 (a
    # term in the wrong coordinates) breaks it; the brute-force test above catches the rest.
    rng = np.random.default_rng(seed)
    pop = _mixture_population(seed, P=30, K=3, d=2, sharp=2.0, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.6, seed + 1)
    A = rng.normal(size=(2, 2)) + 2.0 * np.eye(2)
    W = np.diag([1.0, 0.5])
    moved = PairPopulation(pop.phi @ A, pop.pi, pop.g_star)
    base = asy.tuned_bias(pop, g_hat, M=M, rho=rho, weight=W, clip=None, n_batches=2)
    other = asy.tuned_bias(moved, g_hat, M=M, rho=rho, weight=A.T @ W @ A, clip=None, n_batches=2)
    assert other.lam == pytest.approx(base.lam, rel=1e-8, abs=1e-10)
    np.testing.assert_allclose(A @ other.bias, base.bias, rtol=1e-7, atol=1e-8 * np.abs(base.bias).max())


# ------------------------------------------------------------------------------------------ second-order covariance

_SECOND_CASES = [(0.0, 1, 0.0), (1.0, 1, 0.0), (0.7, 2, 0.0), (1.0, None, 0.0), (0.8, 1, 1.5), (1.0, None, 2.0)]


def _enumerated_second_order(pop: PairPopulation, loss, g_hat: np.ndarray, lam: float, M: int | None,
                             rho: float) -> dict[str, np.ndarray]:
    """``second_order_terms`` of the pooled cluster moments computed from their definition: every cluster
    outcome (``_cluster_outcomes``) with its gradient, Hessian and third and fourth derivatives by torch.func,
    central moments within each sample, pooled with weights 1 and ``rho``."""
    acc: dict[str, torch.Tensor] = {}
    for wt, pr, (G, J, T, F) in _cluster_derivatives(pop, loss, g_hat, lam, M, rho, 4):
        mean = lambda X: torch.einsum("n,n...->...", pr, X)  # noqa: E731
        Gc, Jc, Tc = G - mean(G), J - mean(J), T - mean(T)
        terms = {"H": mean(J), "T": mean(T), "F": mean(F), "Om": mean(torch.einsum("ni,nj->nij", Gc, Gc)),
                 "Vs": mean(torch.einsum("nij,nk->nijk", Jc, Gc)), "VV": mean(torch.einsum("nij,nkl->nijkl", Jc, Jc)),
                 "Ws": mean(torch.einsum("nijk,nl->nijkl", Tc, Gc)),
                 "sss": mean(torch.einsum("ni,nj,nk->nijk", Gc, Gc, Gc)),
                 "sVs": mean(torch.einsum("ni,njk,nl->nijkl", Gc, Jc, Gc))}
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + wt * v
    return so.second_order_terms({k: v.numpy()[None] for k, v in acc.items()})


@pytest.mark.parametrize("loss", [Logistic(), SmoothedTruncatedHinge(s=-math.inf, bandwidth=0.4)], ids=repr)
@pytest.mark.parametrize("lam,M,rho", _SECOND_CASES)
def test_second_order_moments_match_brute_force_enumeration(loss, lam: float, M: int | None, rho: float) -> None:
    # the cluster moments of orders 3 and 4 (the pair sums with 1/M and 1/M^2 terms) against the enumerated
    # clusters; Sigma and b from the same moments against vr_covariance and vr_bias
    pop = _mixture_population(5, P=2, K=3, d=2, sharp=2.0, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.7, 6)
    got = so.vr_second_order(pop, g_hat, lam=lam, M=M, rho=rho, loss=loss)
    want = _enumerated_second_order(pop, loss, g_hat, lam, M, rho)
    np.testing.assert_allclose(got.second, want["second"][0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.cov, want["Sigma"][0], rtol=1e-10)
    np.testing.assert_allclose(got.bias, want["bias"][0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.bias, asy.vr_bias(pop, g_hat, lam=lam, M=M, rho=rho, loss=loss).bias, rtol=1e-10)
    assert got.second.shape == (2, 2) and np.allclose(got.second, got.second.T)


def _binomial_support(n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy import stats

    k = np.arange(n + 1)
    pmf = stats.binom.pmf(k, n, p)
    keep = pmf > 1e-17
    return k[keep], pmf[keep]


def _exact_variance(n: int, pi0: float, p: float, lam: float, h: float, M: int | None, rho: float) -> float:
    """The exact variance of the estimate on ``_two_response_population(pi0, p, 1 - p)`` with
    ``g_hat(0,1) = h = 1 - g_hat(1,0)``. Each of the n labelled pairs is informative (dphi = +-1) with probability
    2w, w = pi0 (1 - pi0), and response 0 wins it with probability p; a pair in either order gives the same
    loss, so only the counts matter: N informative pairs, k wins, N_R informative reference pairs among the
    (1 + rho) n M. The VR equation is then ``sig(theta) [(1 - lam) N + lam r] = k - lam h (N - r)`` with
    ``r = N_R / ((1 + rho) M)`` (``r = 2 w n`` for the exact expectation): summed over the joint law of
    the counts (terms below 1e-17 dropped), conditional on the estimate existing."""
    w = pi0 * (1.0 - pi0)
    Ns, pN = _binomial_support(n, 2.0 * w)
    grid = [(N, *_binomial_support(int(N), p)) for N in Ns]
    N = np.concatenate([np.full(len(k), N) for N, k, _ in grid]).astype(float)
    k = np.concatenate([k for _, k, _ in grid]).astype(float)
    pr = np.concatenate([pn * pk for pn, (_, _, pk) in zip(pN, grid)])
    if lam == 0.0 or M is None:
        refs = [(2.0 * w * n, 1.0)]
    else:
        NR, pR = _binomial_support(int(round((1 + rho) * n)) * M, 2.0 * w)
        refs = list(zip(NR / ((1 + rho) * M), pR))
    m0 = m1 = m2 = 0.0
    for r, p_r in refs:
        den = (1.0 - lam) * N + lam * r
        s = (k - lam * h * (N - r)) / np.where(den > 0, den, 1.0)
        ok = (den > 0) & (s > 0) & (s < 1)
        th, wt = np.log(s[ok] / (1.0 - s[ok])), p_r * pr[ok]
        m0, m1, m2 = m0 + wt.sum(), m1 + (wt * th).sum(), m2 + (wt * th * th).sum()
    assert 1.0 - m0 < 1e-9  # an estimate exists except on events too rare to matter here
    return m2 / m0 - (m1 / m0) ** 2


@pytest.mark.parametrize("lam,h,M,rho", [(0.0, 0.5, 1, 0.0), (1.0, 0.62, 1, 0.0), (1.0, 0.62, None, 0.0),
                                         (0.7, 0.5, 2, 0.0), (1.0, 0.6, 1, 1.0)])
def test_second_order_golden_two_responses_exact(lam: float, h: float, M: int | None, rho: float) -> None:
    # d = 1, K = 2: the exact finite-sample variance by enumeration of the counts. e(n) = n (n Var_n -
    # Sigma) = C + D / n + E / n^2 + O(n^-3); two Richardson steps over n = 250, 500, 1000 remove D and E.
    # The extrapolation's error is O(1/n^3) (measured: 3e-5 to 2e-4 of C; 4e-3 of C before the second
    # step), far below any single term of C.
    pi0, p = 0.4, 0.65
    pop = _two_response_population(pi0, p, 1.0 - p)
    g_hat = np.array([[[0.5, h], [1.0 - h, 0.5]]])
    res = so.vr_second_order(pop, None if lam == 0.0 else g_hat, lam=lam, M=M, rho=rho)
    sigma, C = res.cov[0, 0], res.second[0, 0]
    e = np.array([n * (n * _exact_variance(n, pi0, p, lam, h, M, rho) - sigma) for n in (250, 500, 1000)])
    r1 = 2.0 * e[1:] - e[:-1]
    extrapolated = (4.0 * r1[1] - r1[0]) / 3.0
    assert abs(e[-1] - C) > 0.01 * C  # the extrapolation is needed: the O(1/n^2) term is visible at n = 1000
    assert extrapolated == pytest.approx(C, rel=1e-3)


@given(seed=st.integers(0, 10_000), case=st.sampled_from(_SECOND_CASES))
def test_second_order_is_equivariant_under_a_change_of_features(seed: int, case: tuple) -> None:
    # phi -> phi A: theta_hat -> A^-1 theta_hat for every sample, so C -> A^-1 C A^-T
    lam, M, rho = case
    rng = np.random.default_rng(seed)
    pop = _mixture_population(seed, P=20, K=3, d=2, sharp=2.0, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.6, seed + 1)
    A = rng.normal(size=(2, 2)) + 2.0 * np.eye(2)
    base = so.vr_second_order(pop, g_hat, lam=lam, M=M, rho=rho, n_batches=2)
    other = so.vr_second_order(PairPopulation(pop.phi @ A, pop.pi, pop.g_star), g_hat, lam=lam, M=M, rho=rho,
                               n_batches=2)
    np.testing.assert_allclose(A @ other.second @ A.T, base.second, rtol=1e-7, atol=1e-9 * np.abs(base.second).max())


def _check_second_order_against_simulation(n: int, R: int, seed: int) -> None:
    # n Cov of the simulated estimates against cov + C / n, entry by entry, within 4 normal-theory errors
    # (Var(S_ij) = (S_ij^2 + S_ii S_jj) / (R - 1)); the first-order limit is several errors away
    pop = _mixture_population(77, P=2000, K=3, d=2, sharp=6.0, bias=0.1)
    noisy = _noisy(pop.g_star, 0.5, 78)
    designs = {"oracle_M1": (pop.g_star, 1.0, 1, 0.0), "noisy_M2_rho1": (noisy, 0.8, 2, 1.0)}
    fits = _simulate_fits(pop, designs, n=n, R=R, seed=seed)
    for name, th in fits.items():
        g_hat, lam, M, rho = designs.get(name, (None, 0.0, 1, 0.0))
        res = so.vr_second_order(pop, g_hat, lam=lam, M=M, rho=rho)
        S = n * np.cov(th, rowvar=False)
        se = np.sqrt((S ** 2 + np.outer(np.diag(S), np.diag(S))) / (R - 1))
        pred = res.cov + res.second / n
        assert (np.abs(S - pred) <= 4.0 * se).all(), (name, S, pred, se)
        assert abs(np.trace(S) - res.trace) > 3.0 * abs(np.trace(S) - np.trace(pred)), (name, S, pred, res.cov)
        assert res.weighted_trace(None, n) == pytest.approx(np.trace(pred), rel=1e-12)


def test_second_order_matches_simulated_estimators() -> None:
    _check_second_order_against_simulation(n=300, R=6000, seed=21)


@pytest.mark.slow
def test_second_order_matches_simulated_estimators_long() -> None:
    _check_second_order_against_simulation(n=400, R=40000, seed=22)


def test_second_order_trace_at_n_and_its_errors() -> None:
    pop = _mixture_population(8, P=400, K=3, d=2, sharp=3.0)
    res = so.vr_second_order(pop, pop.g_star, lam=1.0, M=2, n_batches=10)
    W = np.diag([1.0, 2.0])
    assert res.weighted_trace(W, 50) == pytest.approx(np.trace(W @ (res.cov + res.second / 50)), rel=1e-12)
    assert res.weighted_trace(W) == pytest.approx(np.trace(W @ res.cov), rel=1e-12)
    vals = np.einsum("ij,bji->b", W, res.batch_cov + res.batch_second / 50)
    assert res.weighted_trace_se(W, 50) == pytest.approx(vals.std(ddof=1) / math.sqrt(10), rel=1e-12)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="n: expected"):
            res.weighted_trace(None, bad)
    with pytest.raises(InputError, match="no second-order term"):
        asy.vr_covariance(pop).weighted_trace(None, 100)
