r"""The DRPO part of a validation study: double robustness checked by simulation.

DRPO (``theory.drpo``) fits the tilt ``pi_theta = pi_hat exp(theta . phi / beta) / Z`` of a model ``pi_hat`` of the
reference policy to a doubly robust estimate of its win rate over ``pi_ref``, built with a preference model
``g_hat``. DRPO cells are their own units of a study (``StudySpec.drpo``), on a finite prompt population
(``P`` prompts drawn once from the scenario, then sampled uniformly), one per sample size and *case*:

- ``both_right``: ``g_hat = g*`` and ``pi_hat = pi_ref``;
- ``g_wrong``: ``g_hat`` wrong (``g_hat``, an auxiliary model of ``simulate.auxiliary``: ``1 - g*`` by default),
  ``pi_hat = pi_ref``;
- ``pi_wrong``: ``g_hat = g*``, ``pi_hat \propto pi_ref exp(-pi_tilt u)`` with ``u`` the true preference utility
  (a model of the reference policy that underrates its better responses);
- ``both_wrong``: both.

For each case ``drpo_target`` gives the estimator's limit ``theta_lim`` and its exact sandwich covariance, and the
*oracle* ``theta_orc`` (the same with ``g_hat = g*``): the maximiser of the true win rate less ``beta KL`` over the
tilts of the case's ``pi_hat``. Double robustness says ``theta_lim = theta_orc`` when either model is right; with
both wrong the limit is biased. Each replication records the fit (``theory.drpo.fit_drpo``), whether the sandwich
intervals cover ``theta_lim``, the true win rate and objective (win rate less ``beta KL(. || pi_hat)``) of the
fitted policy, and the doubly robust estimate of the win rate of the *fixed* policy ``pi_lim = pi_theta_lim``
(``theory.drpo.dr_win_rate``), which is unbiased at every ``n`` when either model is right.

``F_n`` is not concave and a fit can stop at a far local maximum now and then (more often at small ``beta`` and with
both models wrong), so ``simulate.checks`` judges the limit by the median and the interquartile scale, as it does
VRPO with a bad ``g_hat``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .scenario import SpecError
from .substudy import SubStudySpec

__all__ = ["DRPOStudySpec", "run_drpo", "CASES"]

#: the cases and which models are wrong in each: (g_hat wrong, pi_hat wrong)
CASES: dict[str, tuple[bool, bool]] = {"both_right": (False, False), "g_wrong": (True, False),
                                       "pi_wrong": (False, True), "both_wrong": (True, True)}

_DRPO_SEED = 20_250_406
_Z = 1.959963984540054


@dataclass(frozen=True)
class DRPOStudySpec(SubStudySpec):
    """Where and how DRPO's double robustness is checked: a ``scenario`` (registered name or spec), the ``cases``
    (of ``CASES``), the wrong ``g_hat`` (an auxiliary model spec), the wrong ``pi_hat``'s ``pi_tilt`` (> 0), the
    KL weight ``beta``, sample sizes ``n``, ``reps`` replications per cell and a population of ``prompts``."""

    scenario: Any = "annotator_mixture"
    cases: tuple[str, ...] = ("g_wrong", "pi_wrong", "both_wrong")
    g_hat: Any = field(default_factory=lambda: {"kind": "reversed"})
    pi_tilt: float = 4.0
    beta: float = 0.3
    n: tuple[int, ...] = (500, 1000, 2000)
    reps: int = 200
    prompts: int = 300

    FIELD = "drpo"

    def __post_init__(self) -> None:
        from .auxiliary import AuxSpec

        self._check_common(min_n=2)
        cases = (self.cases,) if isinstance(self.cases, str) else self.cases
        if not isinstance(cases, (list, tuple)) or not cases or any(c not in CASES for c in cases) \
                or len(set(cases)) != len(cases):
            raise SpecError(f"study field 'drpo.cases' = {self.cases!r} must list distinct cases of: "
                            f"{', '.join(CASES)}")
        object.__setattr__(self, "cases", tuple(cases))
        try:
            aux = AuxSpec.parse(self.g_hat)
        except SpecError as exc:
            raise SpecError(f"study field 'drpo.g_hat': {exc}") from None
        if aux.kind in ("oracle", "learned"):
            raise SpecError(f"study field 'drpo.g_hat' = {aux.kind!r}: the wrong g_hat must be a fixed model other "
                            "than the oracle (the cases with g_hat right use the oracle)")
        object.__setattr__(self, "g_hat", {k: v for k, v in asdict(aux).items()
                                           if k == "kind" or v != getattr(AuxSpec(), k)})
        self._check_numbers((("pi_tilt", lambda v: v > 0, "a number > 0"), ("beta", lambda v: v > 0, "a number > 0")))

    def units(self) -> tuple:
        """The cases."""
        return self.cases

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "cases": list(self.cases), "g_hat": dict(self.g_hat),
                "pi_tilt": self.pi_tilt, "beta": self.beta, "n": list(self.n), "reps": self.reps,
                "prompts": self.prompts}

    def models(self, case: str) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
        """The population and the case's ``g_hat`` (P, K, K) and ``pi_hat`` (P, K) (None: the true one)."""
        from robust_rlhf.theory.policies import preference_utility

        from .auxiliary import aux_population

        scenario = self.build_scenario()
        pop = scenario.population(size=self.prompts, seed=_DRPO_SEED)
        g_wrong, pi_wrong = CASES[case]
        g_hat = aux_population(scenario, self.g_hat, self.prompts, _DRPO_SEED) if g_wrong else None
        pi_hat = None
        if pi_wrong:
            log_pi = np.log(pop.pi) - self.pi_tilt * preference_utility(pop)
            pi_hat = np.exp(log_pi - log_pi.max(axis=1, keepdims=True))
            pi_hat /= pi_hat.sum(axis=1, keepdims=True)
        return pop, g_hat, pi_hat


def run_drpo(ds: DRPOStudySpec, n: int, case: str, seed: int) -> pd.DataFrame:
    """The per-replication table of one DRPO cell (module docstring): ``theta_k``, ``se_k``, ``covered_k`` (of
    ``theta_lim``), ``converged``, ``win_estimate`` (the DR estimate at the fit), ``win_true`` and
    ``objective_true`` (the fitted policy's true win rate, and that less ``beta KL(. || pi_hat)``), ``win_fixed``
    (the DR estimate of ``pi_lim``'s win rate) and, the same on every row, the predictions: ``limit_k``,
    ``oracle_k``, ``pred_var`` (``tr`` of the exact sandwich), ``win_fixed_expected`` (``E win_fixed``),
    ``win_limit`` and ``objective_limit`` (``pi_lim``'s truth), ``win_oracle`` and ``objective_oracle`` (the
    oracle's: the largest true objective of the class)."""
    from robust_rlhf.theory.drpo import dr_win_rate, drpo_target, fit_drpo
    from robust_rlhf.theory.policies import kl_divergence, kl_policy, win_rate

    from .dataset import sample_drpo

    pop, g_hat, pi_hat = ds.models(case)
    target = drpo_target(pop, ds.beta, g_hat, pi_hat)
    oracle = target if g_hat is None else drpo_target(pop, ds.beta, None, pi_hat)  # with g* the limit is the oracle
    data = sample_drpo(pop, n, seed=seed, reps=ds.reps, g_hat=g_hat, pi_hat=pi_hat)
    fit = fit_drpo(data, ds.beta)
    theta = np.where(fit.converged[:, None], fit.theta, np.nan)
    ref = pop.pi if pi_hat is None else pi_hat

    def truth(policy: np.ndarray) -> tuple[float, float]:
        """The true win rate over pi_ref and the true objective, less beta KL(policy || pi_hat)."""
        win = float(win_rate(policy, pop).mean)
        return win, win - ds.beta * float(np.mean(kl_divergence(policy, ref)))

    win_true, objective_true = np.full(ds.reps, np.nan), np.full(ds.reps, np.nan)
    for r in np.flatnonzero(fit.converged):
        win_true[r], objective_true[r] = truth(kl_policy(theta[r], pop.phi, ref, ds.beta))
    d = pop.d
    table = pd.DataFrame({"scenario": ds.scenario_name, "n": n, "case": case, "rep": np.arange(ds.reps),
                          "converged": fit.converged, "n_iter": fit.n_iter})
    se = fit.se
    for k in range(d):
        table[f"theta_{k}"] = theta[:, k]
        table[f"se_{k}"] = np.where(fit.converged, se[:, k], np.nan)
        covered = np.abs(theta[:, k] - target.theta[k]) <= _Z * se[:, k]
        table[f"covered_{k}"] = np.where(fit.converged, covered.astype(float), np.nan)
    table["win_estimate"] = np.where(fit.converged, fit.win_rate, np.nan)
    table["win_true"] = win_true
    table["objective_true"] = objective_true
    table["win_fixed"] = dr_win_rate(data, target.theta, ds.beta)
    for k in range(d):
        table[f"limit_{k}"] = target.theta[k]
        table[f"oracle_{k}"] = oracle.theta[k]
    table["pred_var"] = float(np.trace(target.cov))
    table["win_fixed_expected"] = target.win_rate_estimated
    table["win_limit"], table["objective_limit"] = truth(target.policy)
    table["win_oracle"], table["objective_oracle"] = truth(oracle.policy)
    table["beta"] = ds.beta
    return table

