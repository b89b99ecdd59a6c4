r"""The pessimism part of a validation study: the finite-sample regret bound checked by simulation.

Pessimism cells are their own units of a study (``StudySpec.pessimism``), on their own scenario:
on a finite prompt population (``P`` prompts drawn once from the scenario, then sampled uniformly;
``theory.bounds`` needs bounded features, ``||phi|| <= L``, and computes the design constants exactly
over the population), each replication

1. fits the norm-constrained estimator ``theta_hat = argmin_{||theta|| <= B} L_n`` (MLE, or VRPO with
   its fixed ``g_hat``), ``B = bound_scale ||theta_dagger||``;
2. computes the explicit radius ``Gamma`` of ``theory.bounds.estimation_radius`` (with probability
   ``>= 1 - delta``, ``||theta_hat - theta_dagger||_M <= Gamma``), and the self-concordant one of
   ``theory.bounds.local_estimation_radius`` in the norm of the Hessian at ``theta_hat`` (columns ``*_local``);
3. builds the pessimistic policy of Zhu, Jordan and Jiao (2023) over each ellipsoid;
4. records its regret under the utility ``theta_dagger . phi`` against the comparator
   ``argmax theta_dagger . phi`` and the bound ``2 Gamma ||w(pi_comp)||_{M^-1}``
   (``pessimistic_regret_bound``), and whether the bound held; the regret of ``pi_ref`` itself
   (``regret_reference``: a vacuous radius certifies nothing better); and, with the asymptotic sandwich
   ellipsoid of the unconstrained fit, the pessimistic policy's regret under ``theta_dagger . phi``
   (``regret_pessimistic_dagger``) and under the true utility (``regret_pessimistic``).

The bound must hold in at least a share ``1 - delta`` of the replications. ``max_regret`` (the mean
over prompts of the utility range) is the regret no policy can exceed: a bound above it says nothing.
The bound follows from the radius event ``||theta_hat - theta_dagger||_M <= Gamma`` (``in_radius``),
which can fail only where ``Gamma`` is below the radius that holds with certainty (both in the ball:
``2 B sqrt(lambda_max(M))``, ``certain``; ``informative``): the claim is tested on those replications.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .scenario import SpecError
from .substudy import SubStudySpec

__all__ = ["PessimismSpec", "run_pessimism", "NEWEST_COLUMNS"]

#: the columns the newest pessimism tables hold that older ones lack: a table without them is recomputed by
#: a study and left out of its checks when only read
NEWEST_COLUMNS = ("in_radius", "informative", "certain", "regret_reference", "regret_pessimistic_dagger",
                  "radius_local", "in_radius_local", "informative_local", "held_local")

_PESS_SEED = 20_250_405


_DEFAULT_SCENARIO = {"name": "label_flip_tanh", "features": {"map": "tanh", "prompt_dim": 3},
                     "preference": {"model": "label_flip", "eps": 0.2},
                     "description": "BT labels flipped at rate 0.2 on bounded tanh features (||phi|| <= sqrt d)"}


@dataclass(frozen=True)
class PessimismSpec(SubStudySpec):
    """Where and how the bound is checked: a ``scenario`` (registered name or spec; the bound needs
    bounded features, so tanh features by default), ``estimators`` (catalogue names or settings), sample
    sizes ``n``, ``reps`` replications per cell, a population of ``prompts`` prompts, level ``delta``,
    ridge ``mu`` of ``M = Sigma + mu I`` (default ``d/n``: a fixed ridge adds ``2 sqrt(mu) B`` to the
    radius, which then stops shrinking with n) and ``B = bound_scale * ||theta_dagger||``."""

    scenario: Any = field(default_factory=lambda: dict(_DEFAULT_SCENARIO))
    estimators: tuple = ("mle", "vrpo_M4")
    n: tuple[int, ...] = (800, 1600)
    reps: int = 20
    prompts: int = 60
    delta: float = 0.1
    mu: float | None = None
    bound_scale: float = 1.5

    FIELD = "pessimism"

    def __post_init__(self) -> None:
        from .study import EstimatorSetting

        self._check_common(min_n=1)
        if isinstance(self.estimators, (str, bytes)) or not isinstance(self.estimators, (list, tuple)):
            raise SpecError(f"study field 'pessimism.estimators' = {self.estimators!r} must be a list of estimators")
        ests = tuple(e if isinstance(e, EstimatorSetting) else EstimatorSetting.parse(e) for e in self.estimators)
        for est in ests:
            if est.method not in ("mle", "vrpo") or est.M == "exact" or not est.g_hat_is_fixed \
                    or (est.lam is not None and not 0 <= est.lam <= 1) or est.unlabelled > 0:
                raise SpecError(f"study field 'pessimism.estimators': the bound covers the MLE and VRPO with M pairs "
                                f"per labelled prompt (no unlabelled prompts: its clusters are a labelled pair with "
                                f"its reference pairs), a fixed g_hat and lam in [0, 1]; {est.name!r} is not one")
        object.__setattr__(self, "estimators", ests)
        self._check_numbers((("delta", lambda v: 0 < v < 1, "in (0, 1)"),
                             ("bound_scale", lambda v: v >= 1, ">= 1 (B must bound ||theta_dagger||)")))
        if self.mu is not None:
            self._check_numbers((("mu", lambda v: v > 0, "> 0, or null for d/n"),))

    def units(self) -> tuple:
        """The estimators whose bound is checked."""
        return self.estimators

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"scenario": self.scenario, "estimators": [asdict(e) for e in self.estimators], "n": list(self.n),
                "reps": self.reps, "prompts": self.prompts, "delta": self.delta, "mu": self.mu,
                "bound_scale": self.bound_scale}


def run_pessimism(ps: PessimismSpec, n: int, est: Any, seed: int) -> pd.DataFrame:
    """The per-replication table of one pessimism cell (see the module docstring)."""
    from robust_rlhf.theory.bounds import (
        design_constants,
        empirical_design,
        empirical_hessian,
        estimation_radius,
        local_estimation_radius,
    )
    from robust_rlhf.theory.asymptotics import population_target
    from robust_rlhf.theory.fitting import fit
    from robust_rlhf.theory.policies import greedy_policy, pessimistic_policy, regret, value

    from .auxiliary import aux_population
    from .dataset import sample_population

    scenario = ps.build_scenario()
    pop = scenario.population(size=ps.prompts, seed=_PESS_SEED)
    theta_dag = population_target(pop).theta
    lam = 0.0 if est.method == "mle" else (1.0 if est.lam is None else float(est.lam))
    g_hat = None if est.method == "mle" else aux_population(scenario, est.aux, ps.prompts, _PESS_SEED)
    B = ps.bound_scale * float(np.linalg.norm(theta_dag))
    L = float(np.linalg.norm(pop.phi, axis=-1).max())
    mu = pop.d / n if ps.mu is None else ps.mu
    design = design_constants(pop, theta_dag, mu=mu, lam=lam, g_hat=g_hat)
    M = 0 if est.method == "mle" else int(est.M)
    data = sample_population(pop, n, seed=seed, reps=ps.reps, M=M, g_hat=g_hat)
    method = "mle" if est.method == "mle" else "vrpo"
    constrained = fit(data, method, lam=None if method == "mle" else lam, bound=B, on_separable="warn")
    free = fit(data, method, lam=None if method == "mle" else lam, on_separable="warn")
    comparator = greedy_policy(theta_dag, pop.phi)
    r_dag = pop.phi @ theta_dag
    best = value(comparator, r_dag).mean
    reference_regret = float(best - value(pop.pi, r_dag).mean)  # what a policy that stays at pi_ref loses
    rows = []
    for r in range(ps.reps):
        sigma_d = empirical_design(data.dphi[r])
        sigma_ref = None if M == 0 else empirical_design(data.dphi_ref[r])
        radius = estimation_radius(sigma_d, n, B=B, L=L, mu=mu, delta=ps.delta, lam=lam,
                                   sigma_ref=sigma_ref, design=design)
        th = constrained.theta[r]
        hessian = empirical_hessian(th, data.dphi[r], None if M == 0 else data.dphi_ref[r], lam)
        local = local_estimation_radius(sigma_d, hessian, n, design=design, delta=ps.delta, mu=mu, B=B)
        row: dict[str, Any] = {"scenario": ps.scenario_name, "n": n, "estimator": est.name, "rep": r,
                               "B": B, "L": L, "max_regret": float(np.ptp(r_dag, axis=1).mean()),
                               "regret_reference": reference_regret}
        for suffix, rad in (("", radius), ("_local", local)):
            row.update({f"{k}{suffix}": v for k, v in _certified(rad, th, theta_dag, pop, comparator, r_dag,
                                                                  best).items()})
        if not free.separable[r] and np.isfinite(free.cov[r]).all():
            asym = pessimistic_policy(free.theta[r], free.cov[r], pop.phi, pi_ref=pop.pi, delta=ps.delta)
            target = pop if pop.utility is not None else None
            row["regret_pessimistic"] = (float(regret(asym, target).mean) if target is not None else math.nan)
            row["regret_pessimistic_dagger"] = float(best - value(asym, r_dag).mean)
        else:
            row["regret_pessimistic"] = row["regret_pessimistic_dagger"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _certified(radius: Any, theta_hat: np.ndarray, theta_dag: np.ndarray, pop: Any, comparator: np.ndarray,
               r_dag: np.ndarray, best: float) -> dict[str, Any]:
    """One radius's columns: the radius event, and the pessimistic policy over its ellipsoid with its regret
    under ``theta_dagger . phi`` and the bound on it."""
    from robust_rlhf.theory.bounds import pessimistic_regret_bound
    from robust_rlhf.theory.policies import pessimistic_policy, value

    # the probabilistic statement itself: theta_hat in the ellipsoid around theta_dagger
    err = theta_hat - theta_dag
    in_radius = bool(math.sqrt(max(float(err @ radius.matrix @ err), 0.0)) <= radius.radius * (1 + 1e-9))
    policy = pessimistic_policy(theta_hat, radius.cov, pop.phi, pi_ref=pop.pi, gamma=radius.radius)
    # the bound under theta_dagger's reward needs no utility (a scenario without one, e.g. intransitive)
    bound = pessimistic_regret_bound(radius, pop.phi, comparator, pi_ref=pop.pi).bound_dagger
    regret = float(best - value(policy, r_dag).mean)
    return {"radius": radius.radius, "certain": radius.certain, "informative": radius.informative,
            "in_radius": in_radius, "regret_dagger": regret, "bound_dagger": bound, "held": bool(regret <= bound + 1e-9)}
