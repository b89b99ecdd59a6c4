r"""A short numerical summary of a simulated data set (what ``robust-rlhf simulate`` prints)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit

from robust_rlhf.theory.asymptotics import population_target

from .dataset import PreferenceData

__all__ = ["summarize"]


def summarize(data: PreferenceData, population_size: int = 20_000) -> dict[str, Any]:
    r"""Label balance, distance of ``g*`` from the best BT fit, and quality of ``g_hat``.

    - ``bt_misfit``: mean over the labelled pairs of ``(g* - sigmoid(theta_dagger . dphi))^2``, with
      ``theta_dagger`` the BT population target (exact over pairs, averaged over
      ``population_size`` prompts); zero under BT;
    - ``label_balance``: mean of ``Z``; ``mean_g_star``: mean of ``g*``;
    - ``ghat_disagreement``: share of labelled pairs with ``g* != 1/2`` where ``g_hat`` and ``g*``
      fall on different sides of 1/2; ``ghat_mae``: mean ``|g_hat - g*|``.
    """
    target = population_target(data.scenario.population(size=population_size, seed=12345))
    s_dag = expit(data.dphi @ target.theta)
    out: dict[str, Any] = {
        "scenario": data.scenario.name, "n": data.n, "reps": data.reps, "seed": data.seed,
        "reference_pairs": data.n_ref, "M": data.M, "unlabelled": data.n_unlabelled,
        "aux": None if data.aux is None else data.aux.to_dict(),
        "theta_star": [float(t) for t in data.scenario.theta_star],
        "theta_dagger": [float(t) for t in target.theta],
        "bt_misfit": float(np.mean((data.g_star - s_dag) ** 2)),
        "label_balance": float(data.z.mean()),
        "mean_g_star": float(data.g_star.mean()),
    }
    if data.g_hat is not None:
        informative = data.g_star != 0.5
        disagree = (data.g_hat - 0.5) * (data.g_star - 0.5) < 0  # g_hat = 1/2 takes no side
        out["ghat_disagreement"] = float(disagree[informative].mean()) if informative.any() else 0.0
        out["ghat_mae"] = float(np.abs(data.g_hat - data.g_star).mean())
    return out
