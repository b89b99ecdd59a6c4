"""Golden tests of llm.objectives against theory.losses (no transformers needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_rlhf.llm.objectives import (
    LambdaEstimator,
    PreferenceObjective,
    margin_shift_scores,
    variance_summary,
)
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.losses import Logistic, Squared, TruncatedHinge, get_loss, pair_loss, vr_objective

LOSS_NAMES = ["logistic", "truncated_hinge", "hinge", "ipo"]


def _batch(seed: int, B: int = 6, M: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    margin = torch.randn(B, generator=g, dtype=torch.float64) * 1.5
    ref_margin = torch.randn(B, M, generator=g, dtype=torch.float64) * 1.5
    gl = torch.rand(B, generator=g, dtype=torch.float64)
    gr = torch.rand(B, M, generator=g, dtype=torch.float64)
    return margin, ref_margin, gl, gr


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_vrpo_equals_flattened_vr_objective(loss: str, lam: float) -> None:
    margin, ref_margin, g, ref_g = _batch(1)
    obj = PreferenceObjective.from_names("vrpo", loss, lam=lam)
    out = obj.evaluate(margin, ref_margin, g, ref_g)
    # the whole batch as one replication of theory's VR objective (n = B labelled, N = B M reference pairs)
    expected = vr_objective(
        obj.loss,
        margin[None],
        torch.ones_like(margin)[None],
        g[None],
        ref_margin.reshape(1, -1),
        ref_g.reshape(1, -1),
        lam=lam,
    )
    torch.testing.assert_close(out.loss, expected[0], rtol=0, atol=1e-12)
    # and the per-row pieces are theory's terms on each row
    lab = pair_loss(obj.loss, margin, 1.0)
    ctl = pair_loss(obj.loss, margin, g)
    ref = pair_loss(obj.loss, ref_margin, ref_g).mean(-1)
    torch.testing.assert_close(out.labelled, lab)
    torch.testing.assert_close(out.control, ctl)
    torch.testing.assert_close(out.reference, ref)
    torch.testing.assert_close(out.per_example, lab - lam * (ctl - ref))


def test_authors_truncated_hinge_formula_is_vr_objective_with_lambda_one() -> None:
    """``l1 - g1 l1 - g2 l2 + g1s l1s + g2s l2s`` (VRPO code) == vr_objective(Z=1, lam=1), row by row."""
    B = 64
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(B, generator=gen, dtype=torch.float64) * 2  # margin chosen vs rejected
    us = torch.randn(B, generator=gen, dtype=torch.float64) * 2  # margin a_1 vs a_2
    g1 = torch.rand(B, generator=gen, dtype=torch.float64)
    g1s = torch.rand(B, generator=gen, dtype=torch.float64)
    g2, g2s = 1 - g1, 1 - g1s  # rejected_preference, a_2_preference
    l = TruncatedHinge(s=-0.5)  # noqa: E741
    l1, l2, l1s, l2s = l(u), l(-u), l(us), l(-us)
    authors = l1 - g1 * l1 - g2 * l2 + g1s * l1s + g2s * l2s
    ours = vr_objective(
        l, u[:, None], torch.ones(B, 1, dtype=torch.float64), g1[:, None], us[:, None], g1s[:, None], lam=1.0
    )
    torch.testing.assert_close(ours, authors, rtol=0, atol=1e-12)
    # golden value at one hand-made point: u = 0.3, us = -0.8, g1 = 0.9, g1s = 0.25, s = -1/2
    # l(0.3) = 0.7, l(-0.3) = 1.3, l(-0.8) = 1.5, l(0.8) = 0.2
    # 0.7 - 0.9*0.7 - 0.1*1.3 + 0.25*1.5 + 0.75*0.2 = 0.465
    out = PreferenceObjective.from_names("vrpo", "truncated_hinge").evaluate(
        torch.tensor([0.3], dtype=torch.float64),
        torch.tensor([[-0.8]], dtype=torch.float64),
        torch.tensor([0.9], dtype=torch.float64),
        torch.tensor([[0.25]], dtype=torch.float64),
    )
    assert out.loss.item() == pytest.approx(0.465, abs=1e-12)


def test_lambda_zero_is_dpo_and_gradients_match() -> None:
    margin, ref_margin, g, ref_g = _batch(2)
    m1 = margin.clone().requires_grad_(True)
    m2 = margin.clone().requires_grad_(True)
    vr = PreferenceObjective.from_names("vrpo", lam=0.0).evaluate(m1, ref_margin, g, ref_g).loss
    dpo = PreferenceObjective.from_names("dpo").evaluate(m2).loss
    # DPO: -log sigmoid(z) averaged
    torch.testing.assert_close(dpo, -torch.nn.functional.logsigmoid(margin).mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(vr, dpo, rtol=0, atol=1e-12)
    vr.backward()
    dpo.backward()
    torch.testing.assert_close(m1.grad, m2.grad, rtol=0, atol=1e-12)


def test_baselines_closed_forms() -> None:
    z = torch.tensor([-1.2, 0.0, 0.4, 2.5], dtype=torch.float64)
    eps = 0.1
    cdpo = PreferenceObjective.from_names("cdpo", eps=eps).evaluate(z).per_example
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(cdpo, (1 - eps) * sp(-z) + eps * sp(z))  # TRL's label-smoothed sigmoid loss
    rdpo = PreferenceObjective.from_names("rdpo", eps=eps).evaluate(z).per_example
    torch.testing.assert_close(rdpo, ((1 - eps) * sp(-z) - eps * sp(z)) / (1 - 2 * eps))
    ipo = PreferenceObjective.from_names("ipo").evaluate(z).per_example
    torch.testing.assert_close(ipo, (z - 0.5) ** 2)  # beta^2 (h - 1/(2 beta))^2 with z = beta h
    hinge = PreferenceObjective.from_names("hinge").evaluate(z).per_example
    torch.testing.assert_close(hinge, torch.relu(1 - z))
    assert isinstance(PreferenceObjective.from_names("ipo").loss, Squared)
    assert PreferenceObjective.from_names("vrpo", "truncated_hinge", truncation=-1.0).loss.s == -1.0


def test_bad_options_raise() -> None:
    with pytest.raises(InputError, match="method"):
        PreferenceObjective.from_names("ppo")
    with pytest.raises(InputError, match="fixes loss"):
        PreferenceObjective.from_names("ipo", "logistic")
    with pytest.raises(InputError, match="unknown loss"):
        PreferenceObjective.from_names("mle", "cauchy")
    with pytest.raises(InputError, match="eps"):
        PreferenceObjective.from_names("rdpo", eps=0.5)
    with pytest.raises(InputError, match="lam"):
        PreferenceObjective.from_names("vrpo_tuned", lam=1.5)
    with pytest.raises(InputError, match="lambda_target"):
        PreferenceObjective.from_names("vrpo_tuned", lambda_target="trace")
    with pytest.raises(InputError, match="needs g_hat"):
        PreferenceObjective.from_names("vrpo").evaluate(torch.zeros(3))
    with pytest.raises(InputError, match="ref_margin"):
        PreferenceObjective.from_names("vrpo").evaluate(
            torch.zeros(3), torch.zeros(2, 1), torch.zeros(3), torch.zeros(2, 1)
        )


def test_margin_shift_scores_logistic_closed_form() -> None:
    """For the logistic loss a_i = -(1 - s_i), c_i = -(g_i - s_i) + mean_j (g_ij - s_ij), s = sigmoid(z)."""
    margin, ref_margin, g, ref_g = _batch(3)
    a, c = margin_shift_scores(Logistic(), margin, g, ref_margin, ref_g)
    s, sr = torch.sigmoid(margin), torch.sigmoid(ref_margin)
    torch.testing.assert_close(a, -(1 - s))
    torch.testing.assert_close(c, -(g - s) + (ref_g - sr).mean(-1))


def test_lambda_estimator_closed_form_and_clipping() -> None:
    a = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64)
    c = torch.tensor([0.5, 1.5, 2.0, 2.0], dtype=torch.float64)
    # by hand: a - 2.5 = (-1.5, -.5, 1.5, .5), c - 1.5 = (-1, 0, .5, .5); sum of products 2.5, sum of
    # squares of c 1.5, so Cov = 2.5/3, Var = 1.5/3 and lam = 5/3, clipped to 1
    est = LambdaEstimator(initial=0.3)
    assert est.update(a, c) == 1.0
    assert est.cov == pytest.approx(2.5 / 3) and est.var == pytest.approx(1.5 / 3)
    est2 = LambdaEstimator(initial=0.3)
    assert est2.update(a, 4 * c) == pytest.approx(5 / 12)  # Cov(a, 4c) / Var(4c) = (5/3) / 4
    assert est2.update(a, -c) == 0.0  # negative covariance: clipped to 0
    const = LambdaEstimator(initial=0.3)
    assert const.update(a, torch.ones(4)) == 0.3  # Var(c) = 0 keeps the previous value
    assert const.update(a[:1], c[:1]) == 0.3  # one row: nothing to estimate
    ema = LambdaEstimator(initial=0.5, ema=0.5)
    ema.update(a, 4 * c)
    ema.update(a, 2 * c)
    # cov: 0.5*(10/3) + 0.5*(5/3) = 2.5 ; var: 0.5*(8) + 0.5*(2) = 5  -> 0.5
    assert ema.value == pytest.approx(0.5)
    restored = LambdaEstimator(initial=0.0, ema=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.update(a, c) == ema.update(a, c)


@given(seed=st.integers(0, 10_000), B=st.integers(3, 40))
def test_tuned_lambda_minimises_the_empirical_variance(seed: int, B: int) -> None:
    """Var(a - lam c) at lam_hat is no larger than at any lam in a grid of [0, 1]."""
    gen = np.random.default_rng(seed)
    a = torch.tensor(gen.normal(size=B))
    c = torch.tensor(0.6 * a.numpy() + gen.normal(size=B))
    lam = LambdaEstimator(initial=0.5).update(a, c)
    best = variance_summary(a, c, lam)["with_cv"]
    for grid in np.linspace(0, 1, 21):
        assert best <= variance_summary(a, c, float(grid))["with_cv"] + 1e-12


def test_variance_summary_values() -> None:
    a = torch.tensor([1.0, 3.0])
    c = torch.tensor([1.0, 2.0])
    v = variance_summary(a, c, 1.0)
    assert v["without_cv"] == pytest.approx(2.0)  # (1 - 2)^2 + (3 - 2)^2, over n - 1 = 1
    assert v["with_cv"] == pytest.approx(0.5)  # a - c = (0, 1)
    assert variance_summary(a[:1], None, 1.0) == {}


def test_objective_works_for_every_loss_in_theory() -> None:
    for name in LOSS_NAMES:
        obj = PreferenceObjective.from_names("vrpo_tuned", name, lam=0.5)
        margin, ref_margin, g, ref_g = _batch(4)
        out = obj.evaluate(margin, ref_margin, g, ref_g, lam=0.25)
        assert out.lam == 0.25 and math.isfinite(out.loss.item())
        assert type(obj.loss) is type(get_loss(name))
