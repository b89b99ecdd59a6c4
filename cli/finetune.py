"""``robust-rlhf finetune --config FILE``: train a policy (stage one) or reward model (stage two)."""

from __future__ import annotations

import argparse

from . import _json

NAME = "finetune"
HELP = "fine-tune a policy (DPO-style, VRPO, ...) or a reward model from a YAML config"
DESCRIPTION = """\
Fine-tune with the losses of robust_rlhf.theory on transformers' Trainer.

The YAML config holds the options of four groups (see robust_rlhf/llm/README.md):
model (model_name_or_path, use_peft, ...), data (train_data, fix_position_bias, ...),
estimator (stage one|two, method mle|vrpo|vrpo_tuned|cdpo|rdpo|dpo|ipo|hinge|drpo, loss, beta, lam,
g_source, drpo_samples, ...) and transformers' TrainingArguments (output_dir, learning_rate, bf16, ...).

Override single options with `--set key=value` (YAML-typed) or, after `--`, with
transformers-style flags:  robust-rlhf finetune --config run.yaml --set lam=0.5 -- --bf16 true
Several GPUs: accelerate launch --config_file llm/configs/multi_gpu.yaml -m robust_rlhf.cli finetune ..."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file of options")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option (repeatable); VALUE is read as YAML",
    )
    parser.add_argument("--dry-run", action="store_true", help="parse and validate the config and data, then stop")
    parser.add_argument(
        "--precompute-only",
        action="store_true",
        help="fill the cache (g_hat, reference log-probs) and stop; run before a DeepSpeed ZeRO-3 job",
    )
    parser.add_argument("overrides", nargs="*", help="after `--`: --key value flags of the config dataclasses")


def _merged_config(path: str, sets: list[str]) -> tuple[dict, dict[str, str]]:
    """The config file's values with the ``--set`` ones over them, and where each came from."""
    import yaml

    from robust_rlhf.llm.config import _load_yaml
    from robust_rlhf.theory.errors import InputError

    values = _load_yaml(path)
    origin = dict.fromkeys(values, str(path))
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise InputError(f"--set {key}: value is not valid YAML ({exc})") from None
        origin[key.strip()] = "--set"
    return values, origin


def run(args: argparse.Namespace) -> int:
    from robust_rlhf.llm.config import parse_config

    values, origin = _merged_config(args.config, args.set)
    model_args, data_args, pref_args, train_args = parse_config(values, args.overrides, origin)
    if args.dry_run:
        from robust_rlhf.llm.data import prepare_rows, summary
        from robust_rlhf.llm.pipeline import build_objective

        objective = build_objective(pref_args)
        needs_refs = objective is not None and objective.uses_control_variate
        rows, schema = prepare_rows(
            data_args.train_data,
            data_args.train_split,
            data_args.fix_position_bias,
            data_args.preference_tol,
            require_references=needs_refs,
            require_preferences=needs_refs and pref_args.g_source == "columns",
        )
        print(
            _json.dumps(
                {
                    "objective": "drpo" if objective is None else f"{objective.method}/{objective.loss!r}",
                    "stage": pref_args.stage,
                    **summary(rows, schema),
                }
            )
        )
        return 0
    from accelerate import PartialState

    from robust_rlhf.llm.pipeline import run_finetune

    try:
        result = run_finetune(model_args, data_args, pref_args, train_args, precompute_only=args.precompute_only)
    finally:
        # under torchrun, tear the process group down before exit: gloo's threads otherwise race
        # interpreter shutdown and abort a finished run ("terminate called without an active exception")
        PartialState().destroy_process_group()
    if train_args.process_index == 0:
        print(
            _json.dumps(
                {k: v for k, v in result.items() if k != "metrics"} | {"metrics": result["metrics"]}, default=str
            )
        )
    return 0
