r"""One fine-tuning run from its configuration: data -> g_hat -> tokens -> trainer -> saved model.

``run_finetune`` is what ``robust-rlhf finetune`` calls:

1. read and validate every row (``fix_position_bias`` symmetrises first);
2. for VRPO, annotate ``g_hat`` from a reward model, a pairwise model or a callable (optionally
   cross-fitted, a fresh reward model per fold), cached in ``cache_dir``;
3. tokenise; for stage one, precompute the reference log-probabilities once, cached in ``cache_dir``;
4. build ``PreferenceTrainer`` (stage one) or ``RewardTrainer`` (stage two), train (resuming from a
   checkpoint when asked), save the model, tokenizer and ``trainer_state.json`` (logged metrics) to ``output_dir``.

``method: drpo`` skips steps 2 and 3: ``DRPOTrainer`` draws responses while training, judges them with the scorer
of ``g_source`` (a reward model, a pairwise model or a callable) and scores ``pi_hat`` (``ref_model_name_or_path``,
default the initial policy) on them live. With ``g_cross_fit_folds: K`` the judge is cross-fitted: ``K`` reward
models fitted from ``g_model_name_or_path`` on the rows outside each fold of the prompts, a row's draws and pair
judged by the model of its prompt's fold (``auxiliary.cross_fit_scorer``; saved, and loaded when a run resumes).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import set_seed

from robust_rlhf.theory.errors import InputError

from .auxiliary import (
    CallableScorer,
    PairwiseModelScorer,
    RewardModelScorer,
    annotate,
    cached_annotate,
    cross_fit,
    cross_fit_scorer,
    load_callable,
    rows_hash,
)
from .config import DataArguments, ModelArguments, PreferenceArguments
from .data import PreferenceSchema, infer_schema, prepare_rows, rows_to_dataset
from .drpo import DRPOTrainer
from .models import apply_lora, load_causal_lm, load_reward_model, load_tokenizer
from .objectives import PreferenceObjective
from .tokenization import REF_LOGPS, TokenizeOptions, tokenize_dataset
from .trainers import PreferenceTrainer, RewardTrainer

__all__ = ["build_objective", "build_scorer", "prepare_g_hat", "fit_reward_scorer", "run_finetune"]


#: the training arguments a cross-fitted reward model's fit depends on (part of its g_hat cache key)
_FIT_SETTINGS = (
    "learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "bf16", "fp16",
)


def build_objective(pref: PreferenceArguments) -> PreferenceObjective | None:
    """The ``PreferenceObjective`` named by the config (None for DRPO, whose trainer has its own loss)."""
    if pref.method == "drpo":
        return None
    return PreferenceObjective.from_names(
        pref.method, pref.loss, truncation=pref.truncation, lam=pref.lam, eps=pref.eps, lambda_target=pref.lambda_target
    )


def fit_reward_scorer(
    rows: list[dict[str, Any]],
    model_args: ModelArguments,
    pref: PreferenceArguments,
    tokenizer: Any,
    train_args: Any,
    output_dir: str,
    init: str,
    seed: int,
) -> RewardModelScorer:
    """A reward model initialised from ``init`` and fitted by the logistic MLE on ``rows``' labelled pairs
    (its new score head drawn with ``seed``, not with whatever the process drew before), with ``train_args``'
    optimiser and epochs; not its ``max_steps``, which caps the run the model serves (resuming that run with more
    steps keeps its fitted models)."""
    set_seed(seed)
    model = load_reward_model(
        init, tokenizer.pad_token_id, model_args.dtype, model_args.revision, model_args.trust_remote_code
    )
    schema = PreferenceSchema()
    ds = tokenize_dataset(
        rows_to_dataset([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
        tokenizer,
        schema,
        TokenizeOptions(add_eos=False),
    )
    args = copy.deepcopy(train_args)
    args.output_dir = output_dir
    args.max_steps = -1
    args.save_strategy = "no"
    args.report_to = []
    # a fit on the training rows alone: no evaluation set, best-model tracking or upload
    args.eval_strategy = "no"
    args.load_best_model_at_end = False
    args.push_to_hub = False
    trainer = RewardTrainer(
        model,
        args,
        objective=PreferenceObjective.from_names("mle", "logistic"),
        schema=schema,
        train_dataset=ds,
        processing_class=tokenizer,
        disable_model_dropout=pref.disable_dropout,
    )
    trainer.train()
    return RewardModelScorer(trainer.model, tokenizer)


def _fit_settings(model_args: ModelArguments, pref: PreferenceArguments, train_args: Any) -> dict[str, Any]:
    """What a fitted reward model depends on besides its rows, initial model and seed."""
    return {**{k: getattr(train_args, k, None) for k in _FIT_SETTINGS}, "dtype": model_args.dtype,
            "dropout": pref.disable_dropout}


def _fold_fitter(model_args: ModelArguments, pref: PreferenceArguments, tokenizer: Any, train_args: Any,
                 prefix: str, keep: bool = False) -> Callable[[list[dict[str, Any]]], RewardModelScorer]:
    """Cross-fitting's ``fit(rows)``: its ``k``-th call fits a reward model from ``g_model_name_or_path`` on
    ``rows`` (``fit_reward_scorer``, seed ``train_args.seed + k``) in ``output_dir/{prefix}{k}``. With ``keep`` the
    fitted model is saved there (``model``, then ``fit.json`` with a hash of its rows and settings), and a call
    with the same rows and settings (a resumed run) loads it instead of fitting it again."""
    init = _g_model_path(pref)
    calls = itertools.count(1)
    settings = {**_fit_settings(model_args, pref, train_args), "init": init}

    def fit(train_rows: list[dict[str, Any]]) -> RewardModelScorer:
        k = next(calls)
        out, seed = Path(train_args.output_dir) / f"{prefix}{k}", train_args.seed + k
        record = out / "fit.json"
        # the hash of the rows and settings, for keeping only (it reads every row)
        key = rows_hash(train_rows, json.dumps({**settings, "seed": seed}, sort_keys=True, default=str)) if keep else ""
        if keep and record.exists() and json.loads(record.read_text()).get("key") == key:
            model = load_reward_model(str(out / "model"), tokenizer.pad_token_id, model_args.dtype,
                                      trust_remote_code=model_args.trust_remote_code)
            return RewardModelScorer(model.to(train_args.device), tokenizer)
        scorer = fit_reward_scorer(train_rows, model_args, pref, tokenizer, train_args, str(out), init, seed)
        if keep and train_args.process_index == 0:  # the model first: a record names a complete model
            scorer.model.save_pretrained(out / "model")
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key}))
            os.replace(tmp, record)
        return scorer

    return fit


def _g_model_path(pref: PreferenceArguments) -> str:
    """The model of a model-based ``g_source`` (``g_model_name_or_path``), which it needs."""
    if not pref.g_model_name_or_path:
        raise InputError(f"g_source={pref.g_source} needs g_model_name_or_path")
    return pref.g_model_name_or_path


def build_scorer(pref: PreferenceArguments, model_args: ModelArguments, train_args: Any) -> Any:
    """The ``g_hat`` scorer named by ``pref.g_source`` (``callable``, ``pairwise_model`` or a fixed
    ``reward_model``), on the training device."""
    if pref.g_source == "callable":
        if not pref.g_callable:
            raise InputError("g_source=callable needs g_callable: 'module:function'")
        return CallableScorer(load_callable(pref.g_callable))
    path = _g_model_path(pref)
    g_tok = load_tokenizer(path, trust_remote_code=model_args.trust_remote_code)
    g_model = load_reward_model(path, g_tok.pad_token_id, model_args.dtype, trust_remote_code=model_args.trust_remote_code)
    cls = PairwiseModelScorer if pref.g_source == "pairwise_model" else RewardModelScorer
    return cls(g_model.to(train_args.device), g_tok)


def prepare_g_hat(
    rows: list[dict[str, Any]],
    schema: PreferenceSchema,
    model_args: ModelArguments,
    pref: PreferenceArguments,
    tokenizer: Any,
    train_args: Any,
    cache_dir: str,
    tag: str,
) -> tuple[list[dict[str, Any]], PreferenceSchema]:
    """Rows with ``g_hat`` columns from ``pref.g_source`` (unchanged for ``columns`` and ``frozen``)."""
    if pref.g_source in ("columns", "frozen"):
        if pref.g_cross_fit_folds:
            raise InputError("g_cross_fit_folds applies to a fitted g_hat (g_source=reward_model)")
        return rows, schema
    if schema.n_ref_pairs == 0:
        raise InputError("g_hat is only used by VRPO, which needs reference pairs (columns a_1, a_2, ...)")
    folds = pref.g_cross_fit_folds
    if pref.g_source == "callable":
        if folds:
            raise InputError("g_cross_fit_folds applies to a fitted g_hat (g_source=reward_model), not a callable")
        fn_scorer = build_scorer(pref, model_args, train_args)
        compute = lambda: annotate(rows, schema, fn_scorer)  # noqa: E731
        key = f"callable:{pref.g_callable}"
    else:
        path = _g_model_path(pref)
        if folds and pref.g_source == "pairwise_model":
            raise InputError("g_cross_fit_folds applies to g_source=reward_model")
        if folds:

            fit = _fold_fitter(model_args, pref, tokenizer, train_args, "g_hat_fold")
            compute = lambda: cross_fit(rows, schema, folds, fit, seed=train_args.seed)  # noqa: E731
        else:
            scorer = build_scorer(pref, model_args, train_args)
            compute = lambda: annotate(rows, schema, scorer)  # noqa: E731
        key = f"{pref.g_source}:{path}:folds={folds}{' by prompt' if folds else ''}:seed={train_args.seed}"
        if folds:  # the fitted reward models depend on how they are trained
            key += ":" + json.dumps(_fit_settings(model_args, pref, train_args), sort_keys=True, default=str)
    out = cached_annotate(rows, schema, compute, os.path.join(cache_dir, tag), key)
    return out, infer_schema(out[0].keys())


def _ref_cache_path(
    cache_dir: str, dataset: Any, responses: list[str], model_args: ModelArguments, pref: PreferenceArguments
) -> Path:
    """Cache file of the reference log-probs, keyed by the reference model and the token ids of the prompt
    and of the ``responses`` scored (the labelled pair, and for VRPO the reference responses)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                model_args.model_name_or_path,
                model_args.ref_model_name_or_path,
                model_args.revision,
                model_args.use_peft,
                model_args.dtype,
                pref.length_normalize,
            ]
        ).encode()
    )
    id_columns = [f"{c}_input_ids" for c in ("prompt", *responses)]
    h.update(json.dumps(id_columns).encode())
    for batch in dataset.select_columns(id_columns).iter(batch_size=1024):
        h.update(json.dumps([batch[c] for c in id_columns]).encode())
    return Path(cache_dir) / f"ref_logps-{h.hexdigest()[:16]}.json"


def run_finetune(
    model_args: ModelArguments,
    data_args: DataArguments,
    pref: PreferenceArguments,
    train_args: Any,
    precompute_only: bool = False,
) -> dict[str, Any]:
    """Run one configured fine-tune; returns ``{"output_dir", "train_loss", "global_step", "metrics"}``.

    ``precompute_only`` stops after ``g_hat`` and the reference log-probabilities are in the cache (run it
    on one GPU or with DDP before a DeepSpeed ZeRO-3 run, which cannot score the reference itself).
    """
    objective = build_objective(pref)
    drpo = objective is None
    if train_args.output_dir is None:
        raise InputError("output_dir is required")
    cache_dir = data_args.cache_dir or os.path.join(train_args.output_dir, "cache")
    needs_refs = not drpo and objective.uses_control_variate
    needs_cols = needs_refs and pref.g_source == "columns"
    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        model_args.revision,
        model_args.trust_remote_code,
    )
    options = TokenizeOptions(
        max_prompt_length=data_args.max_prompt_length,
        max_completion_length=data_args.max_completion_length,
        add_eos=pref.stage == "one",
    )

    def load(source: str, split: str, tag: str) -> tuple[Any, PreferenceSchema, list[dict[str, Any]]]:
        rows, schema = prepare_rows(
            source,
            split,
            data_args.fix_position_bias,
            data_args.preference_tol,
            require_references=needs_refs,
            require_preferences=needs_cols,
        )
        if needs_refs:
            rows, schema = prepare_g_hat(rows, schema, model_args, pref, tokenizer, train_args, cache_dir, tag)
        return tokenize_dataset(rows_to_dataset(rows), tokenizer, schema, options, keep_text=drpo), schema, rows

    train_ds, schema, train_rows = load(data_args.train_data, data_args.train_split, "train")
    eval_ds = None
    if data_args.eval_data:
        eval_ds, eval_schema, _ = load(data_args.eval_data, data_args.eval_split, "eval")
        if eval_schema.n_ref_pairs != schema.n_ref_pairs:
            raise InputError(
                f"eval data has {eval_schema.n_ref_pairs} reference pairs per row, train data {schema.n_ref_pairs}"
            )
    common: dict[str, Any] = dict(
        schema=schema,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        disable_model_dropout=pref.disable_dropout,
    )
    if not drpo:
        common.update(objective=objective, g_source="frozen" if pref.g_source == "frozen" else "columns",
                      frozen_refresh_steps=pref.frozen_refresh_steps, lambda_ema=pref.lambda_ema)
    task = "CAUSAL_LM" if pref.stage == "one" else "SEQ_CLS"
    if pref.stage == "one":
        model = load_causal_lm(
            model_args.model_name_or_path,
            model_args.dtype,
            model_args.revision,
            model_args.trust_remote_code,
            model_args.attn_implementation,
        )
        ref_model = None
        # the MLE baselines score the labelled pair only (PreferenceTrainer drops the reference responses)
        scored = schema.response_columns if needs_refs else schema.response_columns[:2]
        cached = False
        precompute = pref.precompute_ref_log_probs and not drpo  # DRPO scores pi_hat live on its draws
        # the cache key hashes every token id of the data set: only where the cache is read or written
        ref_path = _ref_cache_path(cache_dir, train_ds, scored, model_args, pref) if precompute else None
        if precompute and ref_path.exists():
            values = json.loads(ref_path.read_text())
            cached = len(values) == len(train_ds) and all(len(v) == len(scored) for v in values)
            if cached:
                common["train_dataset"] = train_ds.add_column(REF_LOGPS, values)
        if model_args.ref_model_name_or_path and (
            not precompute
            or REF_LOGPS not in common["train_dataset"].column_names
            or eval_ds is not None
        ):
            ref_model = load_causal_lm(
                model_args.ref_model_name_or_path,
                model_args.dtype,
                model_args.revision,
                model_args.trust_remote_code,
                model_args.attn_implementation,
            )
        if model_args.use_peft:
            model = apply_lora(
                model,
                model_args.lora_r,
                model_args.lora_alpha,
                model_args.lora_dropout,
                model_args.lora_target_modules,
                task,
            )
        if drpo:
            if pref.g_cross_fit_folds:
                fit = _fold_fitter(model_args, pref, tokenizer, train_args, "judge_fold", keep=True)
                scorer = cross_fit_scorer(train_rows, pref.g_cross_fit_folds, fit, seed=train_args.seed)
            else:
                scorer = build_scorer(pref, model_args, train_args)
            trainer: Any = DRPOTrainer(
                model,
                train_args,
                scorer=scorer,
                beta=pref.beta,
                samples=pref.drpo_samples,
                max_new_tokens=pref.drpo_max_new_tokens,
                ratio_clip=pref.drpo_ratio_clip,
                ref_model=ref_model,
                length_groups=pref.length_groups,
                **common,
            )
        else:
            trainer = PreferenceTrainer(
                model,
                train_args,
                beta=pref.beta,
                ref_model=ref_model,
                precompute_ref_log_probs=pref.precompute_ref_log_probs,
                length_normalize=pref.length_normalize,
                length_groups=pref.length_groups,
                **common,
            )
        if precompute and not cached and train_args.process_index == 0:
            ref_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(list(trainer.train_dataset[REF_LOGPS])))
            os.replace(tmp, ref_path)
    else:
        set_seed(train_args.seed)  # the reward model's new score head
        model = load_reward_model(
            model_args.model_name_or_path,
            tokenizer.pad_token_id,
            model_args.dtype,
            model_args.revision,
            model_args.trust_remote_code,
            model_args.attn_implementation,
        )
        if model_args.use_peft:
            model = apply_lora(
                model,
                model_args.lora_r,
                model_args.lora_alpha,
                model_args.lora_dropout,
                model_args.lora_target_modules,
                task,
            )
        trainer = RewardTrainer(model, train_args, center_rewards_coefficient=pref.center_rewards_coefficient, **common)
    if precompute_only:
        return {
            "output_dir": train_args.output_dir,
            "train_loss": None,
            "global_step": 0,
            "metrics": {"cache_dir": cache_dir, "rows": len(trainer.train_dataset)},
        }
    resume = train_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest checkpoint in output_dir
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(train_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(train_args.output_dir)
        # the logged metrics (loss, vrpo/* variances, lambda) of every step, for reports
        trainer.state.save_to_json(os.path.join(train_args.output_dir, "trainer_state.json"))
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    return {
        "output_dir": train_args.output_dir,
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "metrics": metrics,
    }
