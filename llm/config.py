r"""Configuration of a fine-tuning run: dataclasses read by ``HfArgumentParser`` from YAML plus overrides.

``robust-rlhf finetune --config run.yaml --learning_rate 1e-6`` reads every key of ``run.yaml`` into
one of ``ModelArguments``, ``DataArguments``, ``PreferenceArguments`` or transformers'
``TrainingArguments``; command-line ``--key value`` pairs override the file. An unknown key is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from robust_rlhf.theory.errors import InputError

__all__ = [
    "ModelArguments",
    "DataArguments",
    "PreferenceArguments",
    "G_SOURCES",
    "STAGES",
    "parse_config",
    "training_arguments",
]

STAGES = ("one", "two")
#: where ``g_hat`` comes from: data columns, a frozen copy of the trained model, a reward model, a
#: pairwise preference model, or a Python callable ``module:function``
G_SOURCES = ("columns", "frozen", "reward_model", "pairwise_model", "callable")
#: the sources that can score a response drawn during training (DRPO's judge)
JUDGES = ("reward_model", "pairwise_model", "callable")


@dataclass
class ModelArguments:
    """The model (a hub name or a local folder; safetensors only), its reference and LoRA."""

    model_name_or_path: str = field(
        default="", metadata={"help": "policy (stage one) or reward-model initialisation (stage two)"}
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "reference policy pi_ref; default: the initial policy (or the disabled LoRA adapter)"},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "default: model_name_or_path"})
    revision: str | None = field(default=None, metadata={"help": "hub revision"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code from the hub (off unless asked)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    use_peft: bool = field(
        default=False, metadata={"help": "train a LoRA adapter; the reference is the disabled adapter"}
    )
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "default: all-linear"})


@dataclass
class DataArguments:
    """Where the preference data comes from and how it is tokenised."""

    train_data: str = field(default="", metadata={"help": "JSONL, Parquet, a save_to_disk folder or a hub name"})
    eval_data: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    fix_position_bias: bool = field(
        default=False, metadata={"help": "symmetrise each pair's probabilities: g = (p + 1 - q) / 2"}
    )
    preference_tol: float = field(default=1e-3, metadata={"help": "tolerance on p + q = 1 for a pair's probabilities"})
    max_prompt_length: int | None = 512
    max_completion_length: int | None = 512
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder caching g_hat columns and precomputed reference log-probs (default: OUTPUT_DIR/cache)"
        },
    )


@dataclass
class PreferenceArguments:
    """The estimator: stage, method, margin loss and the auxiliary model ``g_hat``."""

    stage: str = field(default="one", metadata={"help": "one: DPO-style policy; two: reward model"})
    method: str = field(
        default="mle", metadata={"help": "mle, vrpo, vrpo_tuned, cdpo, rdpo, dpo/ipo/hinge, or drpo (online, stage one)"}
    )
    loss: str | None = field(
        default=None, metadata={"help": "logistic, truncated_hinge, hinge, ipo (default logistic)"}
    )
    truncation: float = field(default=-0.5, metadata={"help": "s of the truncated hinge [1-z]_+ - [s-z]_+"})
    beta: float = field(default=0.1, metadata={"help": "one-stage margin scale"})
    lam: float = field(default=1.0, metadata={"help": "VRPO weight lambda (starting value for vrpo_tuned)"})
    eps: float = field(default=0.0, metadata={"help": "cDPO label smoothing or rDPO flip rate"})
    lambda_target: str = field(
        default="loss", metadata={"help": "vrpo_tuned: loss, margin_shift or oriented_shift"}
    )
    lambda_ema: float = field(default=0.0, metadata={"help": "vrpo_tuned: EMA weight of the covariance estimates"})
    g_source: str = field(
        default="columns", metadata={"help": "columns, frozen, reward_model, pairwise_model, callable"}
    )
    g_model_name_or_path: str | None = field(default=None, metadata={"help": "reward/pairwise model for g_hat"})
    g_callable: str | None = field(default=None, metadata={"help": "module:function (prompt, a, b) -> P(a beats b)"})
    g_cross_fit_folds: int = field(default=0, metadata={"help": "0: no cross-fitting; K >= 2 folds otherwise"})
    frozen_refresh_steps: int = field(default=1, metadata={"help": "g_source=frozen: refresh the copy every k steps"})
    precompute_ref_log_probs: bool = field(default=True, metadata={"help": "score the reference once before training"})
    length_normalize: bool = field(
        default=False, metadata={"help": "mean instead of sum of token log-probs (TRL's IPO)"}
    )
    length_groups: int = field(
        default=4, metadata={"help": "forward passes per batch over sequences of similar length (1: one, padded)"}
    )
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "stage two: + c mean((r_c + r_r)^2)"}
    )
    drpo_samples: int = field(default=2, metadata={"help": "drpo: responses drawn from the policy per row and step"})
    drpo_max_new_tokens: int = field(default=64, metadata={"help": "drpo: longest draw"})
    drpo_ratio_clip: float | None = field(
        default=2.0, metadata={"help": "drpo: cap on pi_theta / pi_hat of the observed pair (null: none)"}
    )
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InputError(f"stage: unknown {self.stage!r}; allowed: {', '.join(STAGES)}")
        if self.g_source not in G_SOURCES:
            raise InputError(f"g_source: unknown {self.g_source!r}; allowed: {', '.join(G_SOURCES)}")
        if self.frozen_refresh_steps < 1:
            raise InputError(f"frozen_refresh_steps must be >= 1, got {self.frozen_refresh_steps}")
        if self.length_groups < 1:
            raise InputError(f"length_groups must be >= 1, got {self.length_groups}")
        if self.beta <= 0:
            raise InputError(f"beta must be > 0, got {self.beta}")
        if self.g_cross_fit_folds == 1 or self.g_cross_fit_folds < 0:
            raise InputError(f"g_cross_fit_folds must be 0 (off) or >= 2, got {self.g_cross_fit_folds}")
        if self.method == "drpo":
            if self.stage != "one":
                raise InputError("method drpo trains a policy: stage must be one")
            if self.g_source not in JUDGES:
                raise InputError(f"method drpo judges its draws while training: g_source must be one of "
                                 f"{', '.join(JUDGES)}, got {self.g_source!r}")
            if self.g_cross_fit_folds and self.g_source != "reward_model":
                raise InputError("method drpo: g_cross_fit_folds fits the judge, from g_model_name_or_path: it needs "
                                 f"g_source=reward_model, got {self.g_source!r}")
            if self.length_normalize:
                raise InputError("method drpo: length_normalize does not apply (its importance ratios need sequence "
                                 "log-probabilities)")


def _dataclass_types() -> tuple[type, ...]:
    from transformers import TrainingArguments

    return (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments)


def _load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the config must be a mapping of option names to values")
    return data


def parse_config(
    config: str | os.PathLike[str] | dict[str, Any] | None,
    overrides: Sequence[str] = (),
    origin: dict[str, str] | None = None,
) -> tuple[ModelArguments, DataArguments, PreferenceArguments, Any]:
    """``(model, data, preference, training)`` arguments from a YAML file (or dict) and ``--key value`` overrides.

    ``origin``: where each key of a dict ``config`` came from (a file, ``--set``), named when its value is bad."""
    from transformers import HfArgumentParser

    values = dict(config) if isinstance(config, dict) else (_load_yaml(config) if config else {})
    types = _dataclass_types()
    known = {f.name for t in types for f in dataclasses.fields(t) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown config key(s): {', '.join(unknown)}")
    values.setdefault("report_to", ["tensorboard"] if _tensorboard_available() else "none")
    values.setdefault("remove_unused_columns", False)
    parser = HfArgumentParser(types)
    parser.exit_on_error = False  # a bad value is an InputError naming it, not a usage dump and an exit
    # YAML values become the defaults, so command-line flags override them
    for action in parser._actions:
        if action.dest in values:
            action.default = values[action.dest]
            action.required = False
    try:
        parsed, remaining = parser.parse_known_args(list(overrides))
    except argparse.ArgumentError as exc:
        flags = (exc.argument_name or "").split("/")  # "--learning_rate/--learning-rate"
        given = any(o == f or o.startswith(f + "=") for o in overrides for f in flags) if flags[0] else bool(overrides)
        key = flags[0].lstrip("-")
        where = "command-line override" if given or not config else \
            ((origin or {}).get(key, "config") if isinstance(config, dict) else str(config))
        raise InputError(f"{where}: option {key or '?'}: {exc.message}") from None
    except SystemExit:
        raise InputError(f"bad command-line override in {' '.join(overrides)}") from None
    if remaining:
        raise InputError(f"unknown override(s): {' '.join(remaining)}")
    outs = []
    for t in types:
        names = {f.name for f in dataclasses.fields(t) if f.init}
        kwargs = {k: v for k, v in vars(parsed).items() if k in names}
        try:
            outs.append(t(**kwargs))
        except InputError:
            raise
        except (ValueError, TypeError) as exc:
            raise InputError(f"{t.__name__}: {exc}") from None
    model_args, data_args, pref_args, train_args = outs
    if not model_args.model_name_or_path:
        raise InputError("model_name_or_path is required (a hub name or a local folder)")
    if not data_args.train_data:
        raise InputError("train_data is required (JSONL, Parquet, a save_to_disk folder or a hub name)")
    return model_args, data_args, pref_args, train_args


def training_arguments(**kwargs: Any):
    """``transformers.TrainingArguments`` with the settings the preference trainers need.

    ``remove_unused_columns=False`` (the collator builds the batch), ``report_to`` TensorBoard when installed
    and nothing otherwise, safetensors checkpoints (transformers' default).
    """
    from transformers import TrainingArguments

    kwargs.setdefault("remove_unused_columns", False)
    if "report_to" not in kwargs:
        kwargs["report_to"] = ["tensorboard"] if _tensorboard_available() else "none"
    return TrainingArguments(**kwargs)


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
