"""Every training objective of ``llm`` under the kit, through ``PreferenceObjective``'s public API only.

A linear data set becomes an LLM batch by orienting each pair chosen-first: the margin is
``(2Z - 1) theta . dphi`` and the auxiliary probability of the chosen response ``g`` (or ``1 - g``);
the ``M`` reference pairs of a row are its reference pairs. The batch loss is then exactly what a
trainer would minimise, and ``per_example`` averaged per replication is the kit's objective.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from robust_rlhf.llm.objectives import METHOD_ALIASES, PreferenceObjective
from robust_rlhf.simulate import properties as P
from robust_rlhf.simulate.strategies import data_cases
from robust_rlhf.theory.asymptotics import population_target
from robust_rlhf.theory.data import PairData


def as_kit_objective(objective: PreferenceObjective, name: str):
    """``PreferenceObjective.evaluate`` on the chosen-first orientation of every pair, per replication."""
    def fn(data: PairData, theta: torch.Tensor) -> torch.Tensor:
        R, n, _ = data.dphi.shape
        z = torch.as_tensor(data.z, dtype=theta.dtype)
        sign = 2.0 * z - 1.0
        margin = (sign * torch.einsum("rnd,rd->rn", torch.as_tensor(data.dphi, dtype=theta.dtype), theta)).reshape(-1)
        if not objective.uses_control_variate:
            return objective.evaluate(margin).per_example.reshape(R, n).mean(-1)
        order = np.argsort(data.ref_row, kind="stable")
        M = data.n_ref // n
        assert np.array_equal(data.ref_row[order], np.repeat(np.arange(n), M)), "needs M reference pairs per row"
        dref = torch.as_tensor(data.dphi_ref[:, order], dtype=theta.dtype)
        ref_margin = torch.einsum("rnd,rd->rn", dref, theta).reshape(R * n, M)
        g = torch.as_tensor(data.g, dtype=theta.dtype)
        g_chosen = torch.where(z == 1.0, g, 1.0 - g).reshape(-1)
        ref_g = torch.as_tensor(data.g_ref[:, order], dtype=theta.dtype).reshape(R * n, M)
        out = objective.evaluate(margin, ref_margin, g_chosen, ref_g)
        return out.per_example.reshape(R, n).mean(-1)

    fn.__qualname__ = fn.__name__ = name
    return fn


#: M reference pairs on every labelled prompt (the LLM batch layout)
CASES = data_cases(M=st.integers(1, 3), unlabelled=st.just(0))

OBJECTIVES = [
    *[(f"{m}[{loss}]", m, loss, {}) for m in ("mle", "vrpo", "vrpo_tuned")
      for loss in ("logistic", "truncated_hinge", "hinge", "ipo")],
    ("vrpo[logistic, lam=0.3]", "vrpo", "logistic", {"lam": 0.3}),
    ("cdpo[eps=0.1]", "cdpo", None, {"eps": 0.1}),
    ("rdpo[eps=0.2]", "rdpo", None, {"eps": 0.2}),
    *[(alias, alias, None, {}) for alias in METHOD_ALIASES],
]


@pytest.mark.parametrize("name,method,loss,kwargs", OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_llm_objectives_pass_the_objective_battery(name, method, loss, kwargs) -> None:
    objective = PreferenceObjective.from_names(method, loss, **kwargs)
    result = P.check_objective(as_kit_objective(objective, name), cases=CASES, max_examples=4, reps=400)
    assert result.passed, result.report()
    cv = result["control_variate"]
    # the control variate has mean zero for any fixed g_hat; methods without one do not depend on g_hat
    assert cv.verdict == ("pass" if objective.uses_control_variate else "skip"), cv.report()


def test_the_objective_equals_theory_on_the_same_pairs() -> None:
    """The chosen-first orientation loses nothing: llm's VRPO objective is theory's VR objective."""
    from robust_rlhf.simulate import get_scenario, sample

    pairs = sample(get_scenario("intransitive"), 60, seed=2, reps=3, M=2, aux="noisy_oracle").to_pair_data()
    theta = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0], [-0.3, 0.2, 0.7]], dtype=torch.float64)
    for lam in (0.0, 0.4, 1.0):
        llm = as_kit_objective(PreferenceObjective.from_names("vrpo", "logistic", lam=lam), "llm")(pairs, theta)
        torch.testing.assert_close(llm, P.fitting_objective("logistic", lam)(pairs, theta), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_llm_vrpo_as_an_estimator() -> None:
    """``argmin`` of llm's VRPO objective is theory's VRPO estimate, so it inherits its properties."""
    fit_fn = P.estimator_from_objective(as_kit_objective(PreferenceObjective.from_names("vrpo"), "llm vrpo"))
    result = P.check_estimator(fit_fn, properties=["swap_invariance", "reorder_invariance", "equivariance"],
                               cases=CASES, max_examples=4, shrink_budget=5)
    assert result.passed, result.report()


def _cdpo_target(eps: float):
    """cDPO's label smoothing is a soft label ``(1 - eps) g* + eps (1 - g*)`` for the logistic loss."""
    def target(scenario):
        pop = scenario.population(size=20_000, seed=P._POPULATION_SEED)
        return population_target(pop, "logistic", g=(1 - eps) * pop.g_star + eps * (1 - pop.g_star))

    return target


#: (name, objective, target, design): every method is consistent for its own population target. rDPO's
#: loss with the true flip rate eps has expectation m_{g_base}: on BT labels flipped at rate eps its
#: target is theta* itself.
CONSISTENCY = [
    ("dpo", PreferenceObjective.from_names("dpo"), None, P.Design(reps=50)),
    ("ipo", PreferenceObjective.from_names("ipo"), "ipo", P.Design(reps=50)),
    ("vrpo", PreferenceObjective.from_names("vrpo"), None, P.Design(reps=50)),
    ("cdpo", PreferenceObjective.from_names("cdpo", eps=0.1), _cdpo_target(0.1), P.Design(reps=50)),
    ("rdpo", PreferenceObjective.from_names("rdpo", eps=0.2), "theta_star", P.Design(scenario="label_flip", reps=50)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,objective,target,design", CONSISTENCY, ids=[c[0] for c in CONSISTENCY])
def test_llm_objectives_are_consistent_for_their_targets(name, objective, target, design) -> None:
    fit_fn = P.estimator_from_objective(as_kit_objective(objective, name))
    run = P.simulate_estimates(fit_fn, design)
    result = P.check_consistency(run=run, target=target)
    assert result.verdict == "pass", result.report()
