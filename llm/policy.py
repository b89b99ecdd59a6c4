r"""The policy step of the two-stage pipeline: best-of-n selection, or an RL trainer of TRL.

* ``best_of_n``: sample ``n`` responses per prompt from a policy and keep the one with the highest
  reward ``r(x, y)`` of our reward model (the no-RL baseline; ties go to the first sample).
* ``train_rl_policy``: TRL's ``GRPOTrainer`` or ``RLOOTrainer`` through their public API, with our
  reward model as the reward function ``(prompts, completions) -> [r(x, y)]``. TRL is imported only
  here and only when asked; no PPO is written in this package.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from robust_rlhf.theory.errors import InputError

from .auxiliary import RewardModelScorer
from .references import GenerationOptions, sample_responses

__all__ = ["best_of_n", "reward_function", "train_rl_policy", "RL_ALGORITHMS"]

RL_ALGORITHMS = {"grpo": ("GRPOTrainer", "GRPOConfig"), "rloo": ("RLOOTrainer", "RLOOConfig")}


def best_of_n(
    prompts: Sequence[Any],
    policy: torch.nn.Module,
    tokenizer: Any,
    scorer: RewardModelScorer,
    n: int,
    options: GenerationOptions = GenerationOptions(),
) -> list[dict[str, Any]]:
    """For each prompt: ``{"prompt", "response", "reward", "candidates", "rewards"}`` with the argmax-reward sample.

    Prompts are processed ``options.batch_size`` at a time with seed ``options.seed + first row``.
    """
    if n < 1:
        raise InputError(f"best-of-n needs n >= 1, got {n}")
    out: list[dict[str, Any]] = []
    for start in range(0, len(prompts), options.batch_size):
        chunk = list(prompts[start : start + options.batch_size])
        samples = sample_responses(policy, tokenizer, chunk, n, options, options.seed + start)
        flat_p = [p for p, cands in zip(chunk, samples) for _ in cands]
        flat_y = [y for cands in samples for y in cands]
        rewards = scorer.rewards(flat_p, flat_y).view(len(chunk), n)
        bad = torch.isnan(rewards).any(1)
        if bad.any():  # argmax would pick the NaN
            raise InputError(f"best-of-n: the reward model gave NaN for a response to prompt {start + int(bad.nonzero()[0]) + 1}")
        for p, cands, r in zip(chunk, samples, rewards):
            best = int(torch.argmax(r))
            out.append(
                {
                    "prompt": p,
                    "response": cands[best],
                    "reward": float(r[best]),
                    "candidates": cands,
                    "rewards": r.tolist(),
                }
            )
    return out


def reward_function(scorer: RewardModelScorer):
    """TRL's reward-function protocol ``f(prompts, completions, **kwargs) -> list[float]`` for our reward model.

    Prompts and completions are strings, or (conversational data) lists of messages, as our scorer takes.
    """

    def robust_rlhf_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return scorer.rewards(list(prompts), list(completions)).tolist()

    return robust_rlhf_reward


def train_rl_policy(
    algorithm: str,
    model: Any,
    scorer: RewardModelScorer,
    train_dataset: Any,
    output_dir: str,
    processing_class: Any = None,
    **config: Any,
) -> Any:
    """Train ``model`` (a name, folder or model) with TRL's GRPO or RLOO trainer; return the trainer.

    ``train_dataset`` needs a ``prompt`` column; ``config`` goes to ``GRPOConfig``/``RLOOConfig``.
    """
    if algorithm not in RL_ALGORITHMS:
        raise InputError(f"algorithm: unknown {algorithm!r}; allowed: {', '.join(RL_ALGORITHMS)}")
    try:
        trl = importlib.import_module("trl")
    except ImportError:
        raise InputError(
            f"the RL policy step ({algorithm}) uses TRL, which is not installed: pip install trl "
            "(or use best-of-n selection, which needs nothing more)"
        ) from None
    trainer_name, config_name = RL_ALGORITHMS[algorithm]
    trainer_cls = getattr(trl, trainer_name, None)
    config_cls = getattr(trl, config_name, None)
    if trainer_cls is None or config_cls is None:
        raise InputError(f"the installed TRL has no {trainer_name}/{config_name}; upgrade it (pip install -U trl)")
    args = config_cls(output_dir=output_dir, **config)
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward_function(scorer),
        args=args,
        train_dataset=train_dataset,
        processing_class=processing_class,
    )
    trainer.train()
    return trainer
