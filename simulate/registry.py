r"""The registry of named scenarios (``robust-rlhf simulate --list``).

Every named scenario uses ``d = 3`` Gaussian features, ``K = 4`` responses per prompt, a uniform
reference policy and a random ``theta*`` of norm 1.5 (3 for the annotator mixture, whose two
annotators otherwise nearly cancel); only the preference model differs, so the scenarios isolate one
misspecification each.
"""

from __future__ import annotations

import copy
from typing import Any

from .scenario import PREFERENCE_MODELS, Scenario, SpecError

__all__ = ["SCENARIOS", "get_scenario", "scenario_names"]

_BASE: dict[str, Any] = {"d": 3, "K": 4, "features": {"map": "gaussian"}, "reference": {"policy": "uniform"},
                         "reward_scale": 1.5, "structure_seed": 0}

SCENARIOS: dict[str, dict[str, Any]] = {
    "bt": {"preference": {"model": "bt"},
           "description": "Bradley-Terry control: the BT model is right, VRPO cannot gain"},
    "probit": {"preference": {"model": "probit"},
               "description": "Thurstone (probit) link: a mild link misspecification"},
    "cauchy": {"preference": {"model": "cauchy"},
               "description": "Cauchy link: heavy tails, preferences far from 0/1 even for large reward gaps"},
    "student_t": {"preference": {"model": "student_t", "df": 2.0},
                  "description": "Student-t link with 2 degrees of freedom: heavy tails"},
    "temperature": {"preference": {"model": "temperature", "temperature": 0.5},
                    "description": "temperature mismatch T = 0.5: still BT-shaped, the target is theta*/T"},
    "label_flip": {"preference": {"model": "label_flip", "eps": 0.2},
                   "description": "BT labels flipped with probability 0.2"},
    "position_bias": {"preference": {"model": "position_bias", "bias": 1.0},
                      "description": "BT plus a logit bonus of 1 for the response shown first"},
    "annotator_mixture": {"preference": {"model": "annotator_mixture", "weights": [0.5, 0.5], "spread": 2.0},
                          "reward_scale": 3.0,
                          "description": "two annotators with very different rewards (hidden context)"},
    "intransitive": {"preference": {"model": "intransitive", "strength": 1.0},
                     "description": "BT plus a skew-symmetric bilinear term: cyclic preferences, no utility"},
    "near_deterministic": {"preference": {"model": "near_deterministic", "scale": 4.0, "spread": 1.5},
                           "description": "near-deterministic comparisons with a prompt-dependent sharpness"},
}


def scenario_names() -> list[str]:
    """Names of the registered scenarios."""
    return list(SCENARIOS)


def get_scenario(name: str, **overrides: Any) -> Scenario:
    """Build a registered scenario; ``overrides`` replace top-level spec fields (e.g. ``d=5``)."""
    if name not in SCENARIOS:
        raise SpecError(f"unknown scenario {name!r}; allowed: {', '.join(SCENARIOS)}")
    spec = copy.deepcopy(_BASE)
    spec.update(copy.deepcopy(SCENARIOS[name]))
    spec["name"] = name
    spec.update(overrides)
    return Scenario.from_spec(spec)


assert set(s["preference"]["model"] for s in SCENARIOS.values()) <= set(PREFERENCE_MODELS)
