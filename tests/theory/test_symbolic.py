"""Symbolic derivations (theory/symbolic.py) against exact identities and the project's numerical code.

Symbolic statements are checked as exact zeros (simplify / cancel / polynomial arithmetic), never by
sampling. Numerical comparisons are with ``losses`` (torch autograd of ``vr_objective``, the closed-form
``vr_derivatives``) and ``asymptotics`` (``vr_covariance``, ``mle_covariance``, ``optimal_lambda``,
``variance_ratio``). Both sides are exact float64 computations (no Monte Carlo: the two-type
population replicates each prompt type in proportion ``q``, so its prompt average is the exact
expectation), so they must agree to rounding; the asymptotics module's Newton stops at |grad| < 1e-10
and then takes one more Newton step, which puts theta_dagger at rounding level. Hence rtol = 1e-9.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from robust_rlhf.theory import asymptotics as asy
from robust_rlhf.theory import symbolic as sy
from robust_rlhf.theory.data import PairPopulation
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.losses import (
    Logistic, MarginLoss, pair_loss, pair_loss_derivatives, vr_derivatives, vr_objective,
)

RTOL = 1e-9

unit = st.floats(0.02, 0.98)
counts = st.tuples(st.integers(1, 6), st.integers(1, 6))
M_values = st.sampled_from([1, 2, 3, 5, None])


def _inf(M: int | None) -> float:
    """``M`` for the symbolic functions: ``None`` (the module's exact expectation) is ``math.inf``."""
    return math.inf if M is None else float(M)


def _assert_zero(residuals: dict) -> None:
    for name, res in residuals.items():
        if isinstance(res, sp.MatrixBase):
            assert all(e == 0 for e in res), f"residual {name} is not zero: {res}"
        else:
            assert res == 0, f"residual {name} is not zero: {res}"


# ------------------------------------------------------------------------------------------ 1. identity


def test_logistic_identity_is_proven() -> None:
    li = sy.logistic_identity()
    z, g = li.z, li.g
    _assert_zero(li.residuals)
    assert li.proven
    assert li.difference.expr == -z
    assert sp.simplify(li.pair_loss_reduced.expr - (sp.log(1 + sp.exp(z)) - g * z)) == 0
    assert sp.simplify(li.d1.expr - (1 / (1 + sp.exp(-z)) - g)) == 0
    # m_g'' does not depend on g (why the logistic VR objective's Hessian has no Z and no g_hat)
    assert li.d2.expr.free_symbols == {z}


@given(z=st.floats(-20.0, 20.0), g=st.floats(0.0, 1.0))
def test_logistic_formulas_match_losses(z: float, g: float) -> None:
    li = sy.logistic_identity()
    zt = torch.tensor([z], dtype=torch.float64)
    loss = Logistic()
    # direct translation of log(1 + e^-z): absolute rounding ~1e-16 when the value is tiny (z ~ 20)
    np.testing.assert_allclose(li.loss(z), float(loss(zt)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(li.difference(z), float(loss(zt) - loss(-zt)), rtol=1e-12, atol=1e-12)
    ref = float(pair_loss(loss, zt, g))
    np.testing.assert_allclose(li.pair_loss(z, g), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(li.pair_loss_reduced(z, g), ref, rtol=1e-12, atol=1e-12)
    _, d1, d2 = pair_loss_derivatives(loss, zt, g)
    np.testing.assert_allclose(li.d1(z, g), float(d1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(li.d2(z), float(d2), rtol=1e-12, atol=1e-15)
    # and the generic autograd derivatives of the base class (no closed-form override)
    _, a1, a2 = MarginLoss.derivatives(loss, zt)
    np.testing.assert_allclose(li.d1(z, 1.0), float(a1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(li.d2(z), float(a2), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------ 2. VR derivatives


@pytest.mark.parametrize("d,n,n_ref", [(2, 1, 1), (3, 2, 2)])
def test_vr_gradient_hessian_is_proven(d: int, n: int, n_ref: int) -> None:
    vg = sy.vr_gradient_hessian(d, n, n_ref)
    _assert_zero(vg.residuals)
    assert vg.proven
    assert vg.gradient_derived.shape == (d, 1) and vg.hessian_derived.shape == (d, d)
    # the labels Z enter the gradient only and never the Hessian
    assert not set(vg.z) & vg.hessian.expr.free_symbols


@given(seed=st.integers(0, 2**31 - 1), lam=st.floats(-1.0, 2.0), shape=st.sampled_from([(2, 1, 1), (3, 2, 2)]))
def test_vr_gradient_hessian_match_autograd_and_engine(seed: int, lam: float, shape: tuple[int, int, int]) -> None:
    d, n, N = shape
    vg = sy.vr_gradient_hessian(d, n, N)
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=d)
    dphi, dref = rng.normal(size=(n, d)), rng.normal(size=(N, d))
    z = rng.integers(0, 2, size=n).astype(float)
    g, gref = rng.uniform(size=n), rng.uniform(size=N)
    args = (theta, dphi, z, g, dref, gref, lam)

    T = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731

    def objective(th: torch.Tensor) -> torch.Tensor:
        return vr_objective(Logistic(), T(dphi) @ th, T(z), T(g), T(dref) @ th, T(gref), lam=lam)

    th = T(theta)
    grad = torch.autograd.functional.jacobian(objective, th).numpy()
    hess = torch.autograd.functional.hessian(objective, th).numpy()
    np.testing.assert_allclose(vg.objective(*args), float(objective(th)), rtol=1e-12)
    np.testing.assert_allclose(vg.gradient(*args), grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(vg.hessian(*args), hess, rtol=1e-10, atol=1e-13)

    # the closed-form margin derivatives used by the fitting engine, mapped to theta by the chain rule
    der = vr_derivatives(Logistic(), T(dphi) @ th, T(z), T(g), T(dref) @ th, T(gref), lam=lam)
    d_lab, d_ref = der.first(lam)
    eng_grad = dphi.T @ d_lab.numpy() + dref.T @ d_ref.numpy()
    eng_hess = dphi.T @ (der.h.numpy()[:, None] * dphi) + dref.T @ (der.h_ref.numpy()[:, None] * dref)
    np.testing.assert_allclose(vg.gradient(*args), eng_grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(vg.hessian(*args), eng_hess, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------------------ 3. two-type scenario


def test_two_type_scenario_is_proven() -> None:
    sc = sy.two_type_scenario()
    _assert_zero(sc.residuals)
    assert sc.difference_nonnegative is True
    assert sc.ratio_above_bound is True
    assert sc.proven
    S = sc.symbols
    q, p0, p1, r, M = S["q"], S["p0"], S["p1"], S["r"], S["M"]
    pbar = q * p0 + (1 - q) * p1
    assert sp.simplify(sc.theta_dagger.expr - sp.log(pbar / (1 - pbar))) == 0
    # the brief's uniform reference policy: Var_{pair|x}((g* - s) dphi) = (p_x - pbar)^2 / 4 (ties included)
    half = {r: sp.Rational(1, 2)}
    var_x = [(px - pbar) ** 2 / 4 for px in (p0, p1)]
    assert sp.cancel(sc.within.expr.subs(half) - (q * var_x[0] + (1 - q) * var_x[1])) == 0
    assert sp.cancel(sc.difference.expr.subs(half) - (1 - 1 / M) * q * (1 - q) * (p0 - p1) ** 2 / 4) == 0
    ratio_uniform = 1 - (1 - 1 / M) * q * (1 - q) * (p0 - p1) ** 2 / (2 * pbar * (1 - pbar))
    assert sp.cancel(sc.ratio.expr.subs(half) - ratio_uniform) == 0
    assert sp.limit(sc.ratio_bound.expr.subs(half), M, sp.oo) == sp.Rational(1, 2)
    # no gain with one reference pair per prompt (the published configuration) nor under BT
    assert sc.difference.expr.subs(M, 1) == 0
    assert sp.cancel(sc.difference.expr.subs(p1, p0)) == 0
    assert sp.cancel(sc.omega_mle.expr - sc.H.expr) == 0


@pytest.mark.parametrize("M", [1, 2, 3])
def test_total_variance_step_matches_brute_force_enumeration(M: int) -> None:
    en = sy.two_type_omega_enumerated(M)
    assert en.M == M and en.residual == 0
    # and numerically against the general formula at a point
    sc = sy.two_type_scenario()
    vals = dict(q=0.3, p0=0.9, p1=0.2, r=0.35, h0=0.7, k0=0.4, h1=0.25, k1=0.6, lam=0.8)
    np.testing.assert_allclose(en.omega(**vals), sc.omega(**vals, M=M, rho=0.0), rtol=1e-12)


def test_sign_and_bound_at_many_points() -> None:
    # besides the symbolic proof: 20000 random points, vectorised
    sc = sy.two_type_scenario()
    rng = np.random.default_rng(7)
    q, p0, p1, r = (rng.uniform(0.0, 1.0, 20_000) for _ in range(4))
    M = rng.choice([1.0, 2.0, 5.0, 50.0, math.inf], size=20_000)
    diff = sc.difference(q, p0, p1, r, M)
    assert (diff >= -1e-15).all()
    ratio, bound = sc.ratio(q, p0, p1, r, M), sc.ratio_bound(r, M)
    assert (ratio >= bound - 1e-12).all() and (ratio <= 1 + 1e-12).all()


@given(n=counts, p0=unit, p1=unit, r=st.floats(0.1, 0.9), h=st.tuples(unit, unit), k=st.tuples(unit, unit),
       lam=st.floats(-1.0, 2.0), M=M_values, rho=st.floats(0.0, 3.0))
def test_two_type_matches_asymptotics(n, p0, p1, r, h, k, lam, M, rho) -> None:
    sc = sy.two_type_scenario()
    pop = sy.two_type_population(n, (p0, p1), r)
    g_hat = sy.two_type_auxiliary(n, h, k)
    q = n[0] / (n[0] + n[1])
    vals = dict(q=q, p0=p0, p1=p1, r=r, h0=h[0], k0=k[0], h1=h[1], k1=k[1], lam=lam, M=_inf(M), rho=rho)

    res = asy.vr_covariance(pop, g_hat, lam=lam, M=M, rho=rho)
    np.testing.assert_allclose(res.theta_dagger[0], sc.theta_dagger(q, p0, p1), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(res.H[0, 0], sc.H(q, p0, p1, r), rtol=RTOL)
    np.testing.assert_allclose(res.Omega[0, 0], sc.omega(**vals), rtol=RTOL, atol=1e-13)
    np.testing.assert_allclose(res.cov[0, 0], sc.cov(**vals), rtol=RTOL, atol=1e-12)

    mle = asy.mle_covariance(pop)
    np.testing.assert_allclose(mle.Omega[0, 0], sc.omega_mle(q, p0, p1, r), rtol=RTOL)
    np.testing.assert_allclose(mle.cov[0, 0], sc.cov_mle(q, p0, p1, r), rtol=RTOL)

    # VRPO as published (lam = 1) with the oracle auxiliary model, rho = 0
    vr = asy.vr_covariance(pop, pop.g_star, lam=1.0, M=M)
    np.testing.assert_allclose(vr.Omega[0, 0], sc.omega_vr(q, p0, p1, r, _inf(M)), rtol=RTOL, atol=1e-13)
    np.testing.assert_allclose(vr.cov[0, 0], sc.cov_vr(q, p0, p1, r, _inf(M)), rtol=RTOL, atol=1e-12)
    # a difference of two O(1) numbers: rounding ~1e-16 absolute, hence the atol when the gain is ~0
    np.testing.assert_allclose(mle.Omega[0, 0] - vr.Omega[0, 0], sc.difference(q, p0, p1, r, _inf(M)),
                               rtol=RTOL, atol=1e-13)
    ratio = asy.variance_ratio(pop, pop.g_star, lam=1.0, M=M)
    np.testing.assert_allclose(ratio.ratio, sc.ratio(q, p0, p1, r, _inf(M)), rtol=RTOL)


@given(n=counts, p0=unit, p1=unit, r=st.floats(0.1, 0.9), h=st.tuples(unit, unit), k=st.tuples(unit, unit),
       M=M_values, rho=st.floats(0.0, 3.0), weight=st.sampled_from([None, 0]))
def test_two_type_optimal_lambda_matches_asymptotics(n, p0, p1, r, h, k, M, rho, weight) -> None:
    ol = sy.optimal_lambda_closed_form()
    pop = sy.two_type_population(n, (p0, p1), r)
    q = n[0] / (n[0] + n[1])
    vals = dict(q=q, p0=p0, p1=p1, r=r, h0=h[0], k0=k[0], h1=h[1], k1=k[1], M=_inf(M), rho=rho)
    # lam* = X / Y: keep Y away from 0, where lam* is ill-conditioned (the module then reports 0)
    assume(ol.two_type_Y(**vals) > 1e-4 * sy.two_type_scenario().omega_mle(q, p0, p1, r))
    ch = asy.optimal_lambda(pop, sy.two_type_auxiliary(n, h, k), M=M, rho=rho, weight=weight, clip=None)
    np.testing.assert_allclose(ch.lam_unclipped, ol.two_type_lam_star(**vals), rtol=RTOL, atol=1e-12)

    assume(abs(p0 - p1) > 0.05)
    oracle = asy.optimal_lambda(pop, pop.g_star, M=M, rho=rho, weight=weight, clip=None)
    np.testing.assert_allclose(oracle.lam_unclipped, ol.two_type_oracle(r, _inf(M), rho), rtol=RTOL)


def test_two_type_optimal_lambda_is_proven() -> None:
    ol = sy.optimal_lambda_closed_form()
    _assert_zero(ol.residuals)
    assert ol.proven
    S = sy.two_type_scenario().symbols
    M, rho = S["M"], S["rho"]
    assert sp.cancel(ol.two_type_oracle.expr.subs(S["r"], sp.Rational(1, 2))
                     - M * (1 + 2 * rho) / (M * (1 + 2 * rho) + 1)) == 0
    # a g_hat whose margin h_x - k_x does not depend on the prompt type gives X = 0: no gain, lam* = 0
    flat = ol.two_type_X.expr.subs({S["h1"]: S["h0"] + sp.Symbol("t"), S["k1"]: S["k0"] + sp.Symbol("t")})
    assert sp.cancel(flat) == 0
    vals = dict(q=0.4, p0=0.9, p1=0.3, r=0.5, h0=0.6, k0=0.4, h1=0.6, k1=0.4, M=3.0, rho=0.0)
    assert ol.two_type_lam_star(**vals) == 0.0


def test_exact_expectation_is_the_limit_in_M() -> None:
    sc = sy.two_type_scenario()
    pt = (0.3, 0.95, 0.1, 0.5)
    big = sc.omega_vr(*pt, 1e12)
    assert sc.omega_vr(*pt, math.inf) == pytest.approx(big, rel=1e-10)
    assert sc.omega_vr(*pt, math.inf) == pytest.approx(sc.omega_mle(*pt) - sc.within(*pt), rel=1e-12)
    assert sc.ratio(*pt, math.inf) == pytest.approx(1 - 0.5 * 0.21 * 0.85**2 / (0.355 * 0.645), rel=1e-12)


# ------------------------------------------------------------------------------------------ 4. general lambda*


def _mixture_population(seed: int, P: int, K: int, d: int) -> tuple[PairPopulation, np.ndarray]:
    """Two annotators with different reward vectors (far from BT) and a noisy auxiliary model."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(P, K, d))
    pi = rng.dirichlet(np.full(K, 2.0), size=P)
    t1, t2 = rng.normal(size=d), rng.normal(size=d)
    dphi = phi[:, :, None, :] - phi[:, None, :, :]
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    g = 0.5 * sig(4.0 * dphi @ t1) + 0.5 * sig(4.0 * dphi @ t2)
    g_hat = sig(np.log(g / (1 - g)) + 0.5 * rng.normal(size=g.shape))
    return PairPopulation(phi, pi, g), g_hat


@given(seed=st.integers(0, 10_000), M=st.sampled_from([1, 3, None]), rho=st.sampled_from([0.0, 2.0]),
       weight=st.sampled_from(["trace", "coord", "matrix"]))
def test_general_lambda_star_matches_optimal_lambda(seed: int, M, rho: float, weight: str) -> None:
    ol = sy.optimal_lambda_closed_form(2)
    pop, g_hat = _mixture_population(seed, P=8, K=3, d=2)
    W = {"trace": np.eye(2), "coord": np.diag([0.0, 1.0]), "matrix": np.array([[2.0, 0.5], [0.5, 1.0]])}[weight]
    # Omega(lam) = O_0 - lam S + lam^2 Y with S = X + X^T: recover O_0, S, Y from lam = 0, +1, -1
    om = {lam: asy.vr_covariance(pop, g_hat, lam=lam, M=M, rho=rho, n_batches=2) for lam in (0.0, 1.0, -1.0)}
    O0 = om[0.0].Omega
    S = 0.5 * (om[-1.0].Omega - om[1.0].Omega)
    Y = 0.5 * (om[1.0].Omega + om[-1.0].Omega) - O0
    Hinv = np.linalg.inv(om[0.0].H)
    Wp = Hinv @ W @ Hinv
    lam_star = ol.lam_star(Wp, 0.5 * S, Y)
    ch = asy.optimal_lambda(pop, g_hat, M=M, rho=rho, weight=W, clip=None, n_batches=2)
    # S and Y come from differences of O(|Omega|) numbers: entry errors up to a few eps |Omega|, so
    # lam* = tr(W'S) / (2 tr(W'Y)) carries an absolute rounding error up to ~ eps sum|W'| |Omega| (1 + |lam*|)
    # / tr(W'Y); 100x that bound (it matters only when lam* is near 0, where rtol is meaningless)
    size = max(float(np.abs(o.Omega).max()) for o in om.values())
    atol = 100 * np.finfo(float).eps * np.abs(Wp).sum() * size * (1 + abs(lam_star)) / abs(np.trace(Wp @ Y))
    np.testing.assert_allclose(ch.lam_unclipped, lam_star, rtol=RTOL, atol=atol)
    np.testing.assert_allclose(ch.value, ol.value(Wp, O0, 0.5 * S, Y), rtol=RTOL)


def test_general_lambda_star_is_proven() -> None:
    ol = sy.optimal_lambda_closed_form(2)
    _assert_zero({k: v for k, v in ol.residuals.items() if not k.startswith("two_type")})
    # only the symmetric part of X matters: adding a skew-symmetric matrix leaves lam* unchanged
    t = sp.Symbol("t", real=True)
    X = [[sp.Symbol(f"X_{i}_{j}", real=True) for j in range(2)] for i in range(2)]
    skewed = {X[0][1]: X[0][1] + t, X[1][0]: X[1][0] - t}
    assert sp.simplify(ol.lam_star.expr.xreplace(skewed) - ol.lam_star.expr) == 0
    assert ol.f.free_symbols >= {s for row in X for s in row}


# ------------------------------------------------------------------------------------------ input checks


def test_population_builders() -> None:
    pop = sy.two_type_population((2, 3), (0.8, 0.1), r=0.25)
    assert pop.size == 5 and pop.K == 2 and pop.d == 1
    np.testing.assert_array_equal(pop.g_star[:, 0, 1], [0.8, 0.8, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(pop.g_star[:, 1, 0], [0.2, 0.2, 0.9, 0.9, 0.9], rtol=1e-15)
    np.testing.assert_array_equal(pop.pi[0], [0.25, 0.75])
    g = sy.two_type_auxiliary((2, 3), (0.6, 0.3), (0.5, 0.4))
    np.testing.assert_array_equal(g[:, 0, 1], [0.6, 0.6, 0.3, 0.3, 0.3])
    np.testing.assert_array_equal(g[:, 1, 0], [0.5, 0.5, 0.4, 0.4, 0.4])


@pytest.mark.parametrize("call,match", [
    (lambda: sy.two_type_population((0, 0), (0.5, 0.5)), "at least one prompt"),
    (lambda: sy.two_type_population((1, -1), (0.5, 0.5)), r"counts\[1\]"),
    (lambda: sy.two_type_population((1, 1), (0.5, 1.5)), r"p\[1\]"),
    (lambda: sy.two_type_population((1, 1), (0.5,)), "p: expected two"),
    (lambda: sy.two_type_population((1, 1), (0.5, 0.5), r=1.0), "r: must lie in"),
    (lambda: sy.two_type_auxiliary((1, 1), (0.5, -0.1), (0.5, 0.5)), r"h\[1\]"),
    (lambda: sy.two_type_auxiliary((1, 1), (0.5, 0.5), 0.5), "k: expected two"),
    (lambda: sy.vr_gradient_hessian(d=0), "d: need an integer"),
    (lambda: sy.vr_gradient_hessian(n=5), "n: need an integer"),
    (lambda: sy.two_type_omega_enumerated(4), "M: need an integer"),
    (lambda: sy.optimal_lambda_closed_form(True), "d: need an integer"),
    (lambda: sy.two_type_scenario().omega_vr(0.5, 0.5, 0.5, 0.5, 0.5), "M: reference pairs"),
    (lambda: sy.two_type_scenario().omega(q=0.5, p0=0.5, p1=0.5, r=0.5, h0=0.5, k0=0.5, h1=0.5, k1=0.5,
                                          lam=1.0, M=2, rho=-1.0), "rho: unlabelled"),
    (lambda: sy.two_type_scenario().H(0.5, 0.5), "expected 4 arguments"),
    (lambda: sy.two_type_scenario().H(q=0.5, p0=0.5, p1=0.5), r"missing \['r'\]"),
    (lambda: sy.two_type_scenario().H(0.5, q=0.5), "either all by position"),
    (lambda: sy.two_type_scenario().H(q=1.5, p0=0.5, p1=0.5, r=0.5), r"q is a probability and must lie in \[0, 1\]"),
    (lambda: sy.two_type_scenario().H(q=0.5, p0=2.0, p1=0.5, r=0.5), "p0 is a probability"),
    (lambda: sy.two_type_scenario().omega(q=0.5, p0=0.5, p1=0.5, r=0.5, h0=0.5, k0=0.5, h1=0.5, k1=0.5,
                                          lam=1.0, M=1.5, rho=0.0), "M: reference pairs per prompt must be an integer"),
    (lambda: sy.two_type_scenario().omega(q=0.5, p0=0.5, p1=0.5, r=0.5, h0=0.5, k0=0.5, h1=0.5, k1=0.5,
                                          lam=1.0, M=True, rho=0.0), "M: reference pairs per prompt must be a number"),
])
def test_bad_input_raises_input_error(call, match: str) -> None:
    with pytest.raises(InputError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# 5. second-order bias


@pytest.mark.parametrize("d", [1, 2])
def test_second_order_bias_is_proven(d: int) -> None:
    res = sy.second_order_bias(d)
    assert res.proven, res.residual
    # d1 = -H^-1 W: linear in the gradient noise, free of the Hessian noise (so its mean is zero)
    for e in res.d1:
        num = sp.together(e).as_numer_denom()[0]
        assert not any(x.name.startswith("V_") for x in num.free_symbols)
        assert sp.Poly(num, *[x for x in num.free_symbols if x.name.startswith("W_")]).total_degree() == 1


def test_second_order_bias_formula_is_the_engines() -> None:
    """The derived formula on the pooled moments of a brute-force enumeration (two prompts, K = 3, d = 2,
    a noisy g_hat, labelled and unlabelled clusters) equals ``asymptotics.vr_bias``."""
    from test_asymptotics import _enumerated_moments, _mixture_population, _noisy

    from robust_rlhf.theory.losses import Logistic

    pop = _mixture_population(5, P=2, K=3, d=2, sharp=2.0, bias=0.1)
    g_hat = _noisy(pop.g_star, 0.7, 6)
    m = _enumerated_moments(pop, Logistic(), g_hat, 0.8, 2, 1.5)
    got = sy.second_order_bias(2).bias(H=m["H"], T=m["T"].reshape(2, 4), Omega=m["Omega"], K=m["K"].reshape(2, 4))
    np.testing.assert_allclose(got, m["bias"], rtol=1e-10)
    np.testing.assert_allclose(got, asy.vr_bias(pop, g_hat, lam=0.8, M=2, rho=1.5).bias, rtol=1e-8)
    with pytest.raises(InputError, match="d"):
        sy.second_order_bias(3)
