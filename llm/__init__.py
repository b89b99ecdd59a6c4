"""llm: the estimators of ``theory`` lifted to transformers fine-tuning (needs the ``llm`` extra).

Importing this package is light: the submodules that need transformers load on first use.

* ``data``: the preference format (TRL columns + VRPO's ``a_k`` and ``*_preference``), loading, validation;
* ``objectives``: methods (MLE/DPO, VRPO, tuned VRPO, cDPO, rDPO, IPO, hinge) as calls to ``theory.losses``;
* ``tokenization``, ``logprobs``: one concatenated batch per step and its sequence log-probabilities;
* ``trainers``: ``PreferenceTrainer`` (one-stage) and ``RewardTrainer`` (two-stage) on ``transformers.Trainer``;
* ``drpo``: ``DRPOTrainer``, online DRPO (draws from the policy, a judge ``g_hat``, a model ``pi_hat`` of the
  data's policy);
* ``auxiliary``: ``g_hat`` from a reward model, a pairwise model, a callable; cross-fitting and caching;
* ``references``: sampling reference pairs from ``pi_ref`` (resumable);
* ``policy``: best-of-n selection and the optional TRL RL step;
* ``config``, ``pipeline``, ``models``: the configured run behind ``robust-rlhf finetune``;
* ``evaluate``: sampling, judges, win rates with intervals, KL (``robust-rlhf evaluate``);
* ``synthetic``: the end-to-end experiments on a task with a true reward (``robust-rlhf experiment``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PreferenceObjective": "objectives",
    "PreferenceSchema": "data",
    "load_preference_data": "data",
    "PreferenceTrainer": "trainers",
    "RewardTrainer": "trainers",
    "DRPOTrainer": "drpo",
    "run_finetune": "pipeline",
    "parse_config": "config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
