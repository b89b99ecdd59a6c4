"""The shared losses: closed forms against automatic differentiation, identities, stability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.losses import (
    Hinge,
    Logistic,
    MarginLoss,
    SmoothedTruncatedHinge,
    Squared,
    TruncatedHinge,
    get_loss,
    pair_loss,
    robust_pair_loss,
    vr_derivatives,
    vr_objective,
    vr_terms,
)

SMOOTH = [Logistic(), Squared(), SmoothedTruncatedHinge(s=-0.5, bandwidth=0.2),
          SmoothedTruncatedHinge(s=-math.inf, bandwidth=0.05)]
margins = arrays(np.float64, st.integers(1, 30), elements=st.floats(-30, 30))
probs = st.floats(0.0, 1.0)


@pytest.mark.parametrize("loss", SMOOTH, ids=repr)
@given(z=margins)
def test_closed_form_derivatives_match_autograd(loss: MarginLoss, z: np.ndarray) -> None:
    t = torch.as_tensor(z)
    closed = loss.derivatives(t)
    auto = MarginLoss.derivatives(loss, t)
    for c, a in zip(closed, auto):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    plus, minus = loss.derivatives_pm(t)
    for c, a in zip(plus + minus, auto + MarginLoss.derivatives(loss, -t)):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def _difference_tolerance(loss: MarginLoss, k: int, h: float) -> float:
    """The largest error of the central difference ``(l^(k-1)(z + h) - l^(k-1)(z - h)) / 2h`` against ``l^(k)``
    over the test's margins: ``h^2 sup|l^(k+2)| / 6`` (truncation) plus ``2 eps sup|l^(k-1)| / h`` (rounding),
    doubled for the grid's sampling of the sups (a relative tolerance fails where ``l^(k)`` crosses zero)."""
    key = (id(loss), k, h)
    if key not in _TOLERANCES:
        grid = torch.linspace(-31.0, 31.0, 62001, dtype=torch.float64)
        ders = MarginLoss._autograd(loss, grid, k + 2)
        eps = torch.finfo(torch.float64).eps
        _TOLERANCES[key] = 2.0 * (h * h * float(ders[k + 2].abs().max()) / 6
                                  + 2 * eps * float(ders[k - 1].abs().max()) / h)
    return _TOLERANCES[key]


_TOLERANCES: dict[tuple[int, int, float], float] = {}


@pytest.mark.parametrize("loss", SMOOTH, ids=repr)
@given(z=margins)
def test_third_derivative_matches_autograd(loss: MarginLoss, z: np.ndarray) -> None:
    t = torch.as_tensor(z)
    torch.testing.assert_close(loss.third(t), MarginLoss.third(loss, t), rtol=1e-9, atol=1e-12)
    h = 1e-4  # and a central difference of the closed-form l''
    diff = (loss.derivatives(t + h)[2] - loss.derivatives(t - h)[2]) / (2 * h)
    torch.testing.assert_close(loss.third(t), diff, rtol=0, atol=_difference_tolerance(loss, 3, h))


@pytest.mark.parametrize("loss", SMOOTH, ids=repr)
@given(z=margins)
def test_fourth_derivative_matches_autograd(loss: MarginLoss, z: np.ndarray) -> None:
    t = torch.as_tensor(z)
    torch.testing.assert_close(loss.fourth(t), MarginLoss.fourth(loss, t), rtol=1e-9, atol=1e-12)
    h = 1e-4  # a central difference of the closed-form third derivative
    torch.testing.assert_close(loss.fourth(t), (loss.third(t + h) - loss.third(t - h)) / (2 * h), rtol=0,
                               atol=_difference_tolerance(loss, 4, h))


@pytest.mark.parametrize("loss", SMOOTH, ids=repr)
@given(z=margins, g=probs)
def test_pair_derivatives_match_autograd(loss: MarginLoss, z: np.ndarray, g: float) -> None:
    t = torch.as_tensor(z).requires_grad_(True)
    value = pair_loss(loss, t, g)
    (d1,) = torch.autograd.grad(value.sum(), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), t)
    for closed, auto in zip(loss.pair_derivatives(t.detach(), g), (value.detach(), d1.detach(), d2)):
        torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-10)
    for slope, auto in zip(loss.pair_slopes(t.detach(), g), (d1.detach(), d2)):
        torch.testing.assert_close(slope, auto, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss.pair_value(t.detach(), g), value.detach(), rtol=1e-10, atol=1e-10)


@given(z=margins)
def test_logistic_identity(z: np.ndarray) -> None:
    """l(z) - l(-z) = -z, so m_g(z) = l(-z) - g z."""
    t = torch.as_tensor(z)
    torch.testing.assert_close(Logistic()(t) - Logistic()(-t), -t, rtol=0, atol=1e-12)


def test_logistic_is_stable_at_huge_margins() -> None:
    z = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=torch.float64)
    value, d1, d2 = Logistic().derivatives(z)
    assert torch.isfinite(value).all() and torch.isfinite(d1).all() and torch.isfinite(d2).all()
    assert value[0] == 1e4 and value[-1] == 0.0
    assert value[2] == pytest.approx(math.log(2.0))
    assert d1.tolist() == pytest.approx([-1.0, -1.0, -0.5, -math.exp(-50.0), 0.0], rel=1e-12, abs=1e-300)
    loss = vr_objective(Logistic(), z, torch.ones(5, dtype=torch.float64))
    assert torch.isfinite(loss)


def test_logistic_curvature_and_higher_derivatives_keep_relative_accuracy_in_both_tails() -> None:
    """``l'' = s (1 - s)`` with ``s`` rounded to 1 was 0 below z = -36.7 (true value e^z); each factor is now its
    own sigmoid. Against 50-digit values of the second to fourth derivatives and of the pair curvature."""
    import mpmath

    mpmath.mp.dps = 50
    z = np.array([-700.0, -200.0, -40.0, -37.0, -5.0, -0.5, 0.0, 0.5, 5.0, 37.0, 40.0, 200.0, 700.0])
    t = torch.as_tensor(z)
    loss = Logistic()

    def exact(zi: float) -> tuple[float, float, float]:
        s, t = 1 / (1 + mpmath.exp(zi)), 1 / (1 + mpmath.exp(-zi))  # sigmoid(-z) and 1 - it, each in full
        return float(s * t), float(-s * t * (t - s)), float(s * t * (1 - 6 * s * t))

    want = np.array([exact(mpmath.mpf(zi)) for zi in z])
    got = [loss.derivatives(t)[2], loss.third(t), loss.fourth(t), loss.pair_slopes(t, 0.3)[1],
           loss.derivatives_pm(t)[1][2], loss.pair_derivatives_many(t, (0.3,))[0][2]]
    for col, ref in zip(got, [want[:, 0], want[:, 1], want[:, 2], want[:, 0], want[:, 0], want[:, 0]]):
        np.testing.assert_allclose(col.numpy(), ref, rtol=1e-13, atol=0)


def test_truncated_hinge_values() -> None:
    z = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    assert TruncatedHinge()(z).tolist() == [1.5, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert TruncatedHinge(s=0.0)(z).tolist() == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert Hinge()(z).tolist() == [3.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    with pytest.raises(InputError, match="s must be < 1"):
        TruncatedHinge(s=1.0)


def test_smoothed_hinge_tends_to_hinge() -> None:
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)
    err = (SmoothedTruncatedHinge(s=-0.5, bandwidth=1e-4)(z) - TruncatedHinge()(z)).abs().max()
    # the Gaussian smoothing adds at most h * phi(0) = 4e-5 at a kink
    assert err < 1e-4 * 0.4 + 1e-12


@given(z=margins, g=probs)
def test_pair_loss_definition(z: np.ndarray, g: float) -> None:
    t = torch.as_tensor(z)
    for loss in (Logistic(), TruncatedHinge(), Squared()):
        torch.testing.assert_close(pair_loss(loss, t, g), g * loss(t) + (1 - g) * loss(-t))
    torch.testing.assert_close(pair_loss(Logistic(), t, 1.0), Logistic()(t))
    torch.testing.assert_close(pair_loss(Logistic(), t, g), Logistic()(-t) - g * t, rtol=1e-12, atol=1e-9)


@given(z=margins, eps=st.floats(0.0, 0.49))
def test_rdpo_loss_is_unbiased_under_flips(z: np.ndarray, eps: float) -> None:
    """E over a label flipped with probability eps of the rDPO loss equals the clean loss."""
    t = torch.as_tensor(z)
    loss = Logistic()
    expected = (1 - eps) * robust_pair_loss(loss, t, eps) + eps * robust_pair_loss(loss, -t, eps)
    torch.testing.assert_close(expected, loss(t), rtol=1e-9, atol=1e-8)


def test_rdpo_rejects_bad_rate() -> None:
    with pytest.raises(InputError, match=r"\[0, 1/2\)"):
        robust_pair_loss(Logistic(), torch.zeros(2), 0.5)


def _vr_case(rng: np.random.Generator, R: int = 3, n: int = 7, N: int = 11):
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    u, ur = t(rng.normal(0, 3, (R, n))), t(rng.normal(0, 3, (R, N)))
    z, g, gr = t(rng.integers(0, 2, (R, n)).astype(float)), t(rng.random((R, n))), t(rng.random((R, N)))
    w = rng.random((R, N))
    return u, ur, z, g, gr, t(w / w.sum(1, keepdims=True)), t(rng.random(R) * 2)


@pytest.mark.parametrize("loss", SMOOTH, ids=repr)
def test_vr_derivatives_match_autograd(loss: MarginLoss) -> None:
    u, ur, z, g, gr, w, lam = _vr_case(np.random.default_rng(0))
    u.requires_grad_(True)
    ur.requires_grad_(True)
    value = vr_objective(loss, u, z, g, ur, gr, lam, ref_weight=w)
    du, dur = torch.autograd.grad(value.sum(), [u, ur], create_graph=True)
    hu, hur = torch.autograd.grad(du.sum() + dur.sum(), [u, ur])
    der = vr_derivatives(loss, u.detach(), z, g, ur.detach(), gr, lam, ref_weight=w)
    first, first_ref = der.first(lam)
    torch.testing.assert_close(der.value, value.detach())
    torch.testing.assert_close(first, du.detach())
    torch.testing.assert_close(first_ref, dur.detach())
    torch.testing.assert_close(der.h, hu)
    torch.testing.assert_close(der.h_ref, hur)


def test_vr_objective_structure() -> None:
    u, ur, z, g, gr, w, lam = _vr_case(np.random.default_rng(1))
    loss = Logistic()
    mle = vr_objective(loss, u, z)
    torch.testing.assert_close(vr_objective(loss, u, z, g, ur, gr, 0.0, ref_weight=w), mle)
    lab, ctrl, ref = vr_terms(loss, u, z, g, ur, gr, ref_weight=w)
    torch.testing.assert_close(vr_objective(loss, u, z, g, ur, gr, lam, ref_weight=w), lab - lam * (ctrl - ref))
    torch.testing.assert_close(ref, (w * pair_loss(loss, ur, gr)).sum(-1))
    # uniform default weights are plain means
    torch.testing.assert_close(vr_terms(loss, u, z, g, ur, gr)[2], pair_loss(loss, ur, gr).mean(-1))
    with pytest.raises(InputError, match="no reference pairs"):
        vr_objective(loss, u, z, g)


def test_control_variate_has_zero_mean_when_laws_match() -> None:
    """For any fixed g, E[m_g(labelled pair)] = E[m_g(reference pair)] when the pairs share a law, so
    the VR objective's expectation equals the MLE objective's (DESIGN.md 3.4)."""
    rng = np.random.default_rng(2)
    R, n = 4000, 50
    u = torch.as_tensor(rng.normal(0.5, 2, (R, n)))
    ur = torch.as_tensor(rng.normal(0.5, 2, (R, n)))
    gfun = lambda m: torch.sigmoid(0.3 * m + 1.0)  # an arbitrary fixed auxiliary model  # noqa: E731
    z = torch.as_tensor((rng.random((R, n)) < torch.sigmoid(u).numpy()).astype(float))
    diff = vr_objective(Logistic(), u, z, gfun(u), ur, gfun(ur), 1.0) - vr_objective(Logistic(), u, z)
    # mean of R iid differences: |mean| < 4 standard errors
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(R)


def test_get_loss() -> None:
    assert isinstance(get_loss("logistic"), Logistic)
    assert get_loss("truncated_hinge", s=-1.0).s == -1.0
    loss = Hinge()
    assert get_loss(loss) is loss
    with pytest.raises(InputError, match="unknown loss 'bogus'; allowed: logistic, hinge"):
        get_loss("bogus")
