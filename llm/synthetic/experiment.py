r"""The end-to-end experiment: text -> reference policy -> preference data -> every method -> evaluation -> tables.

``run_experiment(config, out_dir)`` runs, for each seed and scenario, with every intermediate file on disk
(so an interrupted run continues where it stopped, and a finished step is never redone):

1. **Text and reference.** The corpus (``corpus``; which source was used is recorded), a BPE tokenizer and a
   tiny GPT-2 pre-trained on the training texts (``tokenizer``, ``reference_model``; cached by config hash),
   or a given checkpoint. Prompts are the first ``prompt_words`` words of texts; evaluation prompts come from
   texts held out of pre-training.
2. **Responses** (per seed): ``n_train`` training prompts drawn with the seed; for each, ``M_max + 1`` pairs
   sampled from ``pi_ref`` with ``llm.references.generate_references`` (resumable). The last pair is the
   labelled pair ``(y_1, y_2)``; pairs ``1..M`` are the reference pairs of a VRPO run with ``M`` pairs, so all
   responses are independent draws from ``pi_ref`` and every method sees the same labelled pairs. A rerun
   that adds a method with a larger ``M`` draws only the missing reference pairs (``responses_from{k}.jsonl``).
3. **Labels** (per seed and scenario): ``Z ~ Bernoulli(g*(x, y_1, y_2))`` with ``g*`` the scenario's preference
   model on the true reward components (``scenarios``), or a data set's own labels (``data: dataset``). The
   oracle ``g_hat`` columns hold the symmetrised ``g*``; ``g_hat: reward_model`` leaves them to the fine-tuning
   pipeline (a reward model cross-fitted on 2 folds of the labelled pairs); ``constant`` writes 1/2.
4. **Training**: every ``policy`` method through ``llm.pipeline.run_finetune`` (the code behind
   ``robust-rlhf finetune``; its YAML config is saved next to the model), with equal budgets; the two-stage
   pipeline trains a reward model (``stage: two``) and selects the best of ``n`` reference samples.
5. **Evaluation**: one sample per held-out prompt from every policy (temperature 1), its true reward, and
   ``log pi(y|x) - log pi_ref(y|x)`` for the KL; then (``analyse``) the win rate of every method over the
   reference and over the baseline under the judge, with intervals (``llm.evaluate``).

Outputs in ``out_dir``: ``experiment.json`` (config, corpus source, reference, versions), ``data/``, ``runs/``
(models, finetune configs, training logs, ``result.json``), ``eval/`` (samples), ``results.csv`` (one row per
scenario x seed x method) and, from ``report``, ``summary.csv`` and ``report.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.io import atomic_path

from .. import evaluate as ev
from ..auxiliary import RewardModelScorer
from ..data import CHOSEN, PROMPT, REJECTED, prepare_rows, read_rows, reference_column, write_jsonl
from ..references import GenerationOptions, generate_references
from .cache import default_cache_dir
from .corpus import load_corpus, prompt_prefix
from .presets import ExperimentConfig, MethodSpec
from .reward import TrueReward, get_reward
from .scenarios import TextScenario, make_scenario

__all__ = ["ExperimentContext", "prepare", "run_experiment", "analyse", "RESULT_COLUMNS"]

#: folds of the cross-fitted reward-model g_hat (VRPO's control variate, DRPO's judge)
CROSS_FIT_FOLDS = 2

#: judge-based comparison columns of ``results.csv`` (``{prefix}_vs_{opponent}_{field}``)
_WIN_FIELDS = ("win_rate", "ci_low", "ci_high", "ties", "soft", "soft_ci_low", "soft_ci_high", "n")
RESULT_COLUMNS = (
    "scenario", "seed", "method", "kind", "M", "g_hat", "n_eval", "mean_reward", "mean_reward_ci_low",
    "mean_reward_ci_high", "kl", "kl_ci_low", "kl_ci_high", "kl_method", "train_seconds", "eval_seconds",
    "train_loss", "steps", "lambda_mean", "var_grad_ratio", "var_grad_ratio_theory", "var_loss_ratio", "g_hat_rmse",
    "drpo_win_rate", "drpo_clipped",
)


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def _quiet(log_file: Path | None = None):
    """Silence transformers' info/warnings and send stdout (Trainer's printed logs) to ``log_file``."""
    import transformers

    level = transformers.logging.get_verbosity()
    import datasets

    bars = transformers.utils.logging.is_progress_bar_enabled()
    ds_bars = datasets.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    sink: Any = open(log_file, "a", encoding="utf-8") if log_file else io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        sink.close()
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        if ds_bars:
            datasets.utils.logging.enable_progress_bar()


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def _cached_json(path: Path) -> Any | None:
    """What ``_write_json`` left at ``path``, or None when there is nothing to reuse: no file, or one that
    does not parse (damaged after the atomic write; named in a warning, and its stage is redone)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        warnings.warn(f"{path} is unreadable ({exc}): its stage is computed again", RuntimeWarning, stacklevel=2)
        return None


@dataclass
class ExperimentContext:
    """What every stage shares: the config, folders, the reference policy, prompts, reward and scenarios."""

    config: ExperimentConfig
    out: Path
    cache_dir: Path
    log: Callable[[str], None]
    ref_dir: str = ""
    tokenizer: Any = None
    ref_model: Any = None
    reward: TrueReward | None = None
    corpus_info: dict[str, Any] = field(default_factory=dict)
    train_pool: list[Any] = field(default_factory=list)
    eval_prompts: list[Any] = field(default_factory=list)
    dataset_rows: list[dict[str, Any]] = field(default_factory=list)
    scenarios: dict[str, TextScenario] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def generation(self, seed: int, n_pairs: int = 1) -> GenerationOptions:
        c = self.config
        return GenerationOptions(
            n_pairs=n_pairs, max_new_tokens=c.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
            batch_size=c.generation_batch_size, seed=seed,
        )


# settings that only choose which (seed, scenario, method) runs exist, how fast they run, or describe them
_FREE = ("name", "description", "seeds", "scenarios", "methods", "threads", "estimated_minutes", "runtime_measured")


def _check_folder(out: Path) -> None:
    """Create the output folder; refuse a file, or a folder that other files fill and no experiment started in."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {str(out)!r} is a file; give a new or empty folder, or an experiment's")
    if out.is_dir() and not (out / "experiment.json").exists():
        stray = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if stray:
            raise InputError(f"output folder {str(out)!r} is not empty and holds no experiment (experiment.json; "
                             f"it holds {', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}); give a new or "
                             "empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {str(out)!r}: {exc.strerror or exc}") from None


def _check_same_config(out: Path, config: ExperimentConfig) -> None:
    """A folder holds the runs of one configuration: a rerun may add or drop seeds, scenarios and methods,
    but a changed setting (beta, learning rate, judge, ...) or a method of the same name with other settings
    would mix runs of two experiments in one table, so it is refused."""
    record = out / "experiment.json"
    if not record.exists():
        return
    try:
        old = json.loads(record.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{record}: unreadable ({exc}); remove it to start the experiment afresh") from None
    new = json.loads(json.dumps(config.as_dict(), default=str))
    changed = sorted(k for k in set(old) | set(new) if k not in _FREE and old.get(k) != new.get(k))
    # a method field added since the folder was written reads as its default (the setting the old runs had)
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(MethodSpec)}, default=str))
    old_methods = {m["name"]: {**defaults, **m} for m in old.get("methods", [])}
    changed += [f"method {m['name']}" for m in new.get("methods", [])
                if m["name"] in old_methods and old_methods[m["name"]] != {**defaults, **m}]
    if changed:
        raise InputError(f"{out}: holds an experiment with other settings ({', '.join(changed)}); use another "
                         "--out folder, or the same settings (seeds, scenarios and methods may be added)")


def prepare(
    config: ExperimentConfig,
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> ExperimentContext:
    """Stage 1: corpus, tokenizer and pre-trained reference (cached), prompts, true reward and scenarios."""
    from ..models import load_tokenizer
    from .reference_model import pretrained_reference
    from .tokenizer import build_tokenizer

    out = Path(out_dir)
    _check_folder(out)
    _check_same_config(out, config)
    ctx = ExperimentContext(config, out, Path(cache_dir) if cache_dir else default_cache_dir(), log)
    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    c = config
    if c.data == "synthetic":
        corpus = load_corpus(c.corpus)
        if c.heldout_texts >= len(corpus.texts):
            raise InputError(f"heldout_texts={c.heldout_texts} but the corpus has only {len(corpus.texts)} texts")
        train_texts, heldout = corpus.split(c.heldout_texts)
        # one prompt per text (a prefix may repeat: short grammar sentences share their first words)
        ctx.train_pool = [prompt_prefix(t, c.prompt_words) for t in train_texts]
        ctx.eval_prompts = [prompt_prefix(t, c.prompt_words) for t in heldout[: c.n_eval]]
        if len(ctx.eval_prompts) < c.n_eval:
            raise InputError(f"only {len(ctx.eval_prompts)} held-out texts for n_eval={c.n_eval}")
        if len(ctx.train_pool) < c.n_train:
            raise InputError(f"only {len(ctx.train_pool)} training texts for n_train={c.n_train}")
        ctx.corpus_info = {
            "source": corpus.source, "location": corpus.location, "texts": len(corpus.texts),
            "fingerprint": corpus.fingerprint, "heldout_texts": c.heldout_texts,
        }
        log(f"corpus: {corpus.source} ({corpus.location}), {len(corpus.texts)} texts")
    else:
        rows, _ = prepare_rows(c.preference_data)
        order = np.random.default_rng(0).permutation(len(rows))
        rows = [rows[i] for i in order]
        if len(rows) <= c.n_eval:
            raise InputError(f"preference_data has {len(rows)} rows; need more than n_eval={c.n_eval}")
        ctx.eval_prompts = [r[PROMPT] for r in rows[: c.n_eval]]
        train_rows = rows[c.n_eval :]
        ctx.train_pool = [r[PROMPT] for r in train_rows]
        ctx.dataset_rows = train_rows
        if len(ctx.train_pool) < c.n_train:
            raise InputError(f"preference_data has {len(ctx.train_pool)} training rows for n_train={c.n_train}")
        ctx.corpus_info = {"source": "dataset", "location": c.preference_data, "rows": len(rows)}
        corpus = None
    if c.reference_model is None:
        if corpus is None:
            raise InputError("data=dataset needs reference_model (a checkpoint)")
        tok, tok_folder = build_tokenizer(train_texts, c.vocab_size, ctx.cache_dir, corpus.fingerprint)
        ctx.ref_dir = str(
            pretrained_reference(
                train_texts, heldout, tok, tok_folder, c.model, c.pretrain, ctx.cache_dir, corpus.fingerprint, log
            )
        )
        info = json.loads((Path(ctx.ref_dir) / "pretrain.json").read_text())
        ctx.corpus_info["reference_pretrain"] = {
            "folder": ctx.ref_dir, "heldout_loss": info["heldout_loss"], "parameters": info["parameters"],
            "seconds": info["seconds"], "vocab_size": len(tok),
        }
        log(f"reference: {ctx.ref_dir} ({info['parameters']} parameters, held-out loss {info['heldout_loss']:.3f})")
    else:
        ctx.ref_dir = c.reference_model
    with _quiet():
        ctx.tokenizer = load_tokenizer(ctx.ref_dir)
        ctx.ref_model = _load_policy(ctx, ctx.ref_dir)
    if c.data == "synthetic":
        ctx.reward = get_reward(c.reward)
        d = len(ctx.reward.components(["x"], ["good"])[0])
        ctx.scenarios = {s: make_scenario(s, c.sharpness, d=d, primary=ctx.reward.primary) for s in c.scenarios}
    else:
        ctx.reward = _judge_reward(c.judge, ctx)
    ctx.timings["prepare"] = time.perf_counter() - start
    _write_json(
        out / "experiment.json",
        {
            "config": c.as_dict(),
            "corpus": ctx.corpus_info,
            "reference": ctx.ref_dir,
            "cache_dir": str(ctx.cache_dir),
            "device": str(_device()),
            "torch_threads": torch.get_num_threads(),
            "versions": _versions(),
        },
    )
    return ctx


def _load_policy(ctx: ExperimentContext, path: str) -> Any:
    """A causal LM on the device, never sampling padding or BOS (they are no text: a response of them alone
    would decode to an empty string). Their mass under a trained model is negligible, so the log-probabilities
    of the KL estimate are not renormalised for it."""
    from ..models import load_causal_lm

    model = load_causal_lm(path).to(_device())
    tok = ctx.tokenizer
    special = sorted({t for t in (tok.pad_token_id, tok.bos_token_id) if t is not None and t != tok.eos_token_id})
    if special:
        model.generation_config.suppress_tokens = special
    model.eval()
    return model


def _versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["vaderSentiment"] = version("vaderSentiment")
    except PackageNotFoundError:
        pass
    return out


@dataclass
class _RewardModelReward:
    """A reward model as the "true" reward of a data set without one (``judge: reward_model:PATH``)."""

    scorer: RewardModelScorer
    names: tuple[str, ...] = ("judge_reward",)
    primary: int = 0

    def components(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
        return self.scorer.rewards(list(prompts), list(responses)).double().numpy().reshape(-1, 1)


def _judge_reward(judge: str, ctx: ExperimentContext) -> _RewardModelReward:
    from ..models import load_reward_model, load_tokenizer

    path = judge.partition(":")[2]
    with _quiet():
        tok = load_tokenizer(path)
        model = load_reward_model(path, tok.pad_token_id).to(_device())
    return _RewardModelReward(RewardModelScorer(model, tok, batch_size=32))


# -- data -------------------------------------------------------------------------------------------------
# the labelled pair of a synthetic task, in the rows ``_responses`` returns
_LABELLED = ("_labelled_1", "_labelled_2")


def _recorded_pairs(path: Path) -> int | None:
    """The ``n_pairs`` a started response file was drawn with (its settings record), or None if not started."""
    record = path.with_name(path.name + ".settings.json")
    if not path.exists() or not record.exists():
        return None
    try:
        return int(json.loads(record.read_text())["n_pairs"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{record}: unreadable ({exc}); remove it and {path.name} to draw them afresh") from None


def _responses(ctx: ExperimentContext, seed: int) -> list[dict[str, Any]]:
    """Training prompts of ``seed`` with ``a_1 .. a_{2 M_max}`` (the reference pairs) and, for synthetic labels,
    the labelled pair ``(y_1, y_2)`` under ``_LABELLED``, all sampled from ``pi_ref``.

    Samples are drawn in blocks that are never redrawn, so a rerun that adds a method with a larger ``M`` keeps
    the labelled pairs and the reference pairs drawn before: ``responses.jsonl`` holds the first run's pairs
    (the labelled pair last), ``responses_from{k}.jsonl`` the reference pairs ``k, k+1, ...`` a later run added.
    """
    c = ctx.config
    folder = ctx.out / "data" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(_stable_seed("prompts", seed))
    picks = rng.choice(len(ctx.train_pool), size=c.n_train, replace=False)
    # rows may share a prompt; "source_row" indexes the training pool (and the data set's rows)
    rows = [{PROMPT: ctx.train_pool[i], "source_row": int(i)} for i in sorted(picks)]
    labelled = int(c.data == "synthetic")
    first = folder / "responses.jsonl"
    n_first = _recorded_pairs(first)
    if n_first is None:
        n_first = c.max_pairs + labelled
    if n_first == 0:
        return rows
    blocks = [(first, n_first, _stable_seed("responses", seed))]
    have = n_first - labelled
    while have < c.max_pairs:
        path = folder / f"responses_from{have + 1}.jsonl"
        n = _recorded_pairs(path) or c.max_pairs - have
        blocks.append((path, n, _stable_seed("responses", seed, have + 1)))
        have += n
    start = time.perf_counter()
    drawn = []
    for path, n, block_seed in blocks:
        with _quiet():
            generate_references(rows, path, ctx.generation(block_seed, n), model=ctx.ref_model, tokenizer=ctx.tokenizer)
        drawn.append(read_rows(path))
    ctx.timings[f"responses/seed{seed}"] = time.perf_counter() - start
    for i, row in enumerate(rows):
        texts = [drawn[b][i][reference_column(k)] for b, (_, n, _) in enumerate(blocks) for k in range(1, 2 * n + 1)]
        if labelled:
            row.update(zip(_LABELLED, texts[2 * n_first - 2 : 2 * n_first]))
            del texts[2 * n_first - 2 : 2 * n_first]
        row.update((reference_column(k), text) for k, text in enumerate(texts, start=1))
    return rows


def _labelled(ctx: ExperimentContext, scenario: str, seed: int, responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``chosen``/``rejected`` (labels drawn through the scenario, or the data set's) and the reference responses."""
    c = ctx.config
    M = c.max_pairs
    rows = []
    if c.data == "synthetic":
        sc = ctx.scenarios[scenario]
        y1 = [r[_LABELLED[0]] for r in responses]
        y2 = [r[_LABELLED[1]] for r in responses]
        prompts = [r[PROMPT] for r in responses]
        phi1 = ctx.reward.components(prompts, y1)
        phi2 = ctx.reward.components(prompts, y2)
        z = sc.draw(phi1, phi2, np.random.default_rng(_stable_seed("labels", scenario, seed)))
        for r, a, b, zi in zip(responses, y1, y2, z):
            row = {PROMPT: r[PROMPT], CHOSEN: a if zi else b, REJECTED: b if zi else a}
            row.update({reference_column(k): r[reference_column(k)] for k in range(1, 2 * M + 1)})
            rows.append(row)
    else:
        for r in responses:
            src = ctx.dataset_rows[int(r["source_row"])]
            row = {PROMPT: src[PROMPT], CHOSEN: src[CHOSEN], REJECTED: src[REJECTED]}
            row.update({reference_column(k): r[reference_column(k)] for k in range(1, 2 * M + 1)})
            rows.append(row)
    return rows


def _variant(ctx: ExperimentContext, rows: list[dict[str, Any]], scenario: str, spec: MethodSpec) -> list[dict[str, Any]]:
    """The training rows of one method: the labelled pair, ``M`` reference pairs, and oracle/constant ``g_hat``."""
    base = [{PROMPT: r[PROMPT], CHOSEN: r[CHOSEN], REJECTED: r[REJECTED]} for r in rows]
    if not spec.uses_control_variate:
        return base
    for b, r in zip(base, rows):
        b.update({reference_column(k): r[reference_column(k)] for k in range(1, 2 * spec.M + 1)})
    if spec.g_hat == "reward_model":
        return base
    pairs = [(CHOSEN, REJECTED)] + [(reference_column(2 * j + 1), reference_column(2 * j + 2)) for j in range(spec.M)]
    if spec.g_hat == "constant":
        g = np.full((len(base), len(pairs)), 0.5)
    else:
        if ctx.config.data != "synthetic":
            raise InputError(f"method {spec.name}: g_hat=oracle needs a synthetic task with a true reward")
        g = _oracle_g(ctx, scenario, base, pairs)
    for b, gi in zip(base, g):
        for (first, second), value in zip(pairs, gi):
            b[f"{first}_preference"] = float(value)
            b[f"{second}_preference"] = 1.0 - float(value)
    return base


def _oracle_g(ctx: ExperimentContext, scenario: str, rows: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> np.ndarray:
    """``(rows, pairs)`` symmetrised ``g*`` of every pair of every row."""
    sc = ctx.scenarios[scenario]
    prompts = [r[PROMPT] for r in rows]
    out = np.empty((len(rows), len(pairs)))
    for j, (first, second) in enumerate(pairs):
        pa = ctx.reward.components(prompts, [r[first] for r in rows])
        pb = ctx.reward.components(prompts, [r[second] for r in rows])
        out[:, j] = sc.symmetric_prob(pa, pb)
    return out


# -- training ----------------------------------------------------------------------------------------------
def _finetune_config(ctx: ExperimentContext, spec: MethodSpec | None, data: Path, out: Path, seed: int,
                     cache: Path) -> dict[str, Any]:
    """The ``robust-rlhf finetune`` config of one method (``spec``; None: the reward model of stage two). A
    reward-model ``g_hat`` is cross-fitted (``CROSS_FIT_FOLDS`` folds of the prompts, fitted from the reference
    checkpoint in the run): VRPO's annotates the rows, DRPO's judges the draws of each row by the model that did
    not see it."""
    c = ctx.config
    stage_two = spec is None
    values: dict[str, Any] = {
        "model_name_or_path": ctx.ref_dir,
        "train_data": str(data),
        "output_dir": str(out),
        "cache_dir": str(cache),
        "max_prompt_length": 256,
        "max_completion_length": c.max_new_tokens + 1,
        "learning_rate": c.rm_learning_rate if stage_two else c.learning_rate,
        "num_train_epochs": c.rm_epochs if stage_two else c.epochs,
        "per_device_train_batch_size": c.batch_size,
        "per_device_eval_batch_size": max(c.batch_size, 32),
        "seed": seed,
        "data_seed": seed,
        "save_strategy": "no",
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "lr_scheduler_type": "linear",
        "weight_decay": 0.0,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
        "beta": c.beta,
    }
    if stage_two:
        values.update({"stage": "two", "method": "mle", "loss": "logistic"})
    else:
        values.update(
            {"stage": "one", "method": spec.method, "lam": spec.lam, "eps": spec.eps, "lambda_target": spec.lambda_target}
        )
        if spec.loss is not None:
            values["loss"] = spec.loss
        if (spec.uses_control_variate or spec.online) and spec.g_hat == "reward_model":
            values.update({"g_source": "reward_model", "g_model_name_or_path": ctx.ref_dir,
                           "g_cross_fit_folds": CROSS_FIT_FOLDS})
        if spec.online:
            values.update({"drpo_samples": spec.samples, "drpo_max_new_tokens": c.max_new_tokens})
    values.update(dict(c.training_overrides))
    return values


def _finetune(values: dict[str, Any], log_file: Path) -> dict[str, Any]:
    import yaml

    from ..config import parse_config
    from ..pipeline import run_finetune

    out = Path(values["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    with _quiet(log_file):
        args = parse_config(values)
        return run_finetune(*args)


def _training_summary(run_dir: Path) -> dict[str, Any]:
    """Means over the logged steps: ``lambda``, and ``var_vr / var_mle`` of the loss and of the oriented
    margin-shift gradient (``vrpo/var_ograd_*``), each the ratio of the step means; for DRPO its doubly robust
    estimate of the policy's win rate over the reference (``drpo/win_rate``) and the share of rows whose
    importance ratio was clipped (``drpo/clipped``)."""
    path = run_dir / "trainer_state.json"
    if not path.exists():
        return {}
    logs = json.loads(path.read_text()).get("log_history", [])
    steps = [e for e in logs if "loss" in e]

    def mean(key: str) -> float:
        v = [e[key] for e in steps if key in e and e[key] is not None]
        return float(np.mean(v)) if v else float("nan")

    out = {"lambda_mean": mean("vrpo/lambda")}
    # the gradient ratio uses the label-independent orientation of the labelled pair (label noise included)
    for name, key in (("grad", "ograd"), ("loss", "loss")):
        mle, vr = mean(f"vrpo/var_{key}_mle"), mean(f"vrpo/var_{key}_vr")
        out[f"var_{name}_ratio"] = vr / mle if mle and np.isfinite(mle) and mle > 0 else float("nan")
    out["drpo_win_rate"], out["drpo_clipped"] = mean("drpo/win_rate"), mean("drpo/clipped")
    return out


def _g_hat_rmse(ctx: ExperimentContext, scenario: str, rows: list[dict[str, Any]], spec: MethodSpec, cache: Path) -> float:
    """``sqrt(mean (g_hat - g*)^2)`` over the labelled and reference pairs a VRPO run trained with."""
    if ctx.config.data != "synthetic" or not spec.uses_control_variate:
        return float("nan")
    pairs = [(CHOSEN, REJECTED)] + [(reference_column(2 * j + 1), reference_column(2 * j + 2)) for j in range(spec.M)]
    if spec.g_hat == "oracle":
        return 0.0
    star = _oracle_g(ctx, scenario, rows, pairs)
    if spec.g_hat == "constant":
        return float(np.sqrt(np.mean((star - 0.5) ** 2)))
    files = sorted((cache / "train").glob("g_hat-*.jsonl"))
    if not files:
        return float("nan")
    annotated = read_rows(files[-1])
    g = np.array([[float(r[f"{first}_preference"]) for first, _ in pairs] for r in annotated])
    star = _oracle_g(ctx, scenario, annotated, pairs)
    return float(np.sqrt(np.mean((g - star) ** 2)))


def _predicted_ratio(
    ctx: ExperimentContext, scenario: str, rows: list[dict[str, Any]], spec: MethodSpec, lam: float | None
) -> float:
    r"""DESIGN.md 3.5's variance ratio at the reference policy, for the oracle ``g_hat``.

    At ``s = 1/2`` (margins 0) in the label-independent order, ``a = -(Z - 1/2)`` and
    ``c = -(g - 1/2) + mean_j (g_j - 1/2)``. With ``E[Z | pair] = g``, ``E[g | x] = 1/2`` (the two responses
    of a pair are exchangeable) and reference pairs independent of the labelled one given ``x``:
    ``Var(a) = 1/4`` and ``Var(a - lam c) = 1/4 - Var(g) + (1 - lam)^2 Var(g) + lam^2 Var(g)/M``, so

        Var(a - lam c) / Var(a) = 1 - 4 Var(g) [1 - (1 - lam)^2 - lam^2 / M]

    (``lam = 1``: ``1 - 4 Var(g) (1 - 1/M)``; ``lam = M/(M+1)``: ``1 - 4 Var(g) M/(M+1)``). ``Var(g)`` is the
    variance of ``g*`` over the run's reference pairs; ``lam`` the run's mean lambda. NaN unless the run
    used the oracle ``g_hat``.
    """
    if ctx.config.data != "synthetic" or not spec.uses_control_variate or spec.g_hat != "oracle":
        return float("nan")
    lam = spec.lam if lam is None or not np.isfinite(lam) else float(lam)
    pairs = [(reference_column(2 * j + 1), reference_column(2 * j + 2)) for j in range(spec.M)]
    var_g = float(np.var(_oracle_g(ctx, scenario, rows, pairs)))
    return 1.0 - 4.0 * var_g * (1.0 - (1.0 - lam) ** 2 - lam**2 / spec.M)


# -- evaluation samples ------------------------------------------------------------------------------------
def _save_samples(path: Path, prompts: list[Any], texts: list[str], phi: np.ndarray, extra: dict[str, Sequence[Any]]) -> None:
    rows = []
    for i, (p, t) in enumerate(zip(prompts, texts)):
        row = {"prompt": p, "response": t, "phi": [float(v) for v in phi[i]]}
        for k, v in extra.items():
            row[k] = v[i] if v is not None else None
        rows.append(row)
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, tmp)
    os.replace(tmp, path)


def _sample_and_score(ctx: ExperimentContext, model: Any, sample_seed: int, path: Path) -> dict[str, Any]:
    """Sample the policy on the evaluation prompts, score the true reward and both log-probabilities.

    Every policy is sampled with its own seed: the win rate is defined on independent draws of the two
    policies (a common seed would couple the samples of similar policies and change the estimand).
    """
    opts = ctx.generation(sample_seed)
    with _quiet():
        s = ev.sample_policy(model, ctx.tokenizer, ctx.eval_prompts, opts, seed=0)
        lp, lr = ev.generated_logprobs(model, ctx.ref_model, s, ctx.tokenizer, opts.min_new_tokens)
    phi = ctx.reward.components(ctx.eval_prompts, s.texts)
    _save_samples(path, ctx.eval_prompts, s.texts, phi, {"logp": lp.tolist(), "logp_ref": lr.tolist(), "token_ids": s.token_ids})
    kl, lo, hi = ev.kl_estimate(lp, lr)
    return {"kl": kl, "kl_ci_low": lo, "kl_ci_high": hi, "kl_method": "samples" if model is not ctx.ref_model else "zero"}


def _reward_model(
    ctx: ExperimentContext, scenario: str, seed: int, rows: list[dict[str, Any]]
) -> tuple[Path, dict[str, Any]]:
    """The reward model fitted on the labelled pairs of (scenario, seed) (best-of-``n``'s scorer), trained on first
    use: its folder and ``{"train_seconds", "train_loss", "steps"}``."""
    rm_dir = ctx.out / "runs" / scenario / f"seed{seed}" / "_reward_model"
    rm_info = _cached_json(rm_dir / "result.json")  # written after the model: without it, the model is retrained
    if rm_info is None:
        data = ctx.out / "data" / f"seed{seed}" / scenario / "labelled.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl([{PROMPT: r[PROMPT], CHOSEN: r[CHOSEN], REJECTED: r[REJECTED]} for r in rows], data)
        shared_cache = ctx.out / "cache" / scenario / f"seed{seed}"
        t0 = time.perf_counter()
        result = _finetune(_finetune_config(ctx, None, data, rm_dir / "model", seed, shared_cache), rm_dir / "train.log")
        rm_info = {"train_seconds": time.perf_counter() - t0, "train_loss": result["train_loss"],
                   "steps": result["global_step"]}
        _write_json(rm_dir / "result.json", rm_info)
    return rm_dir, rm_info


def _run_method(
    ctx: ExperimentContext, scenario: str, seed: int, spec: MethodSpec, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Train (if needed) and sample one method; returns its ``result.json`` record (cached on disk)."""
    from ..models import load_reward_model

    run_dir = ctx.out / "runs" / scenario / f"seed{seed}" / spec.name
    done = run_dir / "result.json"
    cached = _cached_json(done)
    if cached is not None:
        return cached
    samples = ctx.out / "eval" / scenario / f"seed{seed}" / f"{spec.name}.jsonl"
    record: dict[str, Any] = {
        "scenario": scenario, "seed": seed, "method": spec.name, "kind": spec.kind, "M": spec.M,
        "g_hat": spec.g_hat if spec.uses_control_variate or spec.online else "", "n_eval": len(ctx.eval_prompts),
        "train_seconds": 0.0, "train_loss": float("nan"), "steps": 0,
    }
    shared_cache = ctx.out / "cache" / scenario / f"seed{seed}"
    start = time.perf_counter()
    if spec.kind == "reference":
        ref_samples = ctx.out / "eval" / f"seed{seed}-reference.jsonl"
        stats_path = ref_samples.with_suffix(".json")
        stats = _cached_json(stats_path)
        if stats is None:  # written after the samples: an interrupt between them redraws both
            stats = _sample_and_score(ctx, ctx.ref_model, _stable_seed("eval", seed, spec.name), ref_samples)
            _write_json(stats_path, stats)
        samples.parent.mkdir(parents=True, exist_ok=True)
        samples.write_text(ref_samples.read_text())
        record.update(stats)
    elif spec.kind == "policy":
        data = ctx.out / "data" / f"seed{seed}" / scenario / f"{spec.name}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(_variant(ctx, rows, scenario, spec), data)
        cache = run_dir / "cache" if spec.g_hat == "reward_model" and spec.uses_control_variate else shared_cache
        values = _finetune_config(ctx, spec, data, run_dir / "model", seed, cache)
        t0 = time.perf_counter()
        result = _finetune(values, run_dir / "train.log")
        record.update(
            {"train_seconds": time.perf_counter() - t0, "train_loss": result["train_loss"], "steps": result["global_step"]}
        )
        record.update(_training_summary(run_dir / "model"))
        record["g_hat_rmse"] = _g_hat_rmse(ctx, scenario, rows, spec, cache)
        record["var_grad_ratio_theory"] = _predicted_ratio(ctx, scenario, rows, spec, record.get("lambda_mean"))
        with _quiet():
            policy = _load_policy(ctx, str(run_dir / "model"))
        t1 = time.perf_counter()
        record.update(_sample_and_score(ctx, policy, _stable_seed("eval", scenario, seed, spec.name), samples))
        record["eval_seconds"] = time.perf_counter() - t1
        del policy
    else:  # best of n from the reference, scored by a reward model fitted on the labelled pairs
        rm_dir, rm_info = _reward_model(ctx, scenario, seed, rows)
        record.update(rm_info)
        from ..policy import best_of_n

        with _quiet():
            rm = load_reward_model(str(rm_dir / "model"), ctx.tokenizer.pad_token_id).to(_device())
            t1 = time.perf_counter()
            picked = best_of_n(
                ctx.eval_prompts, ctx.ref_model, ctx.tokenizer, RewardModelScorer(rm, ctx.tokenizer), spec.n,
                ctx.generation(_stable_seed("best_of_n", scenario, seed, spec.name)),
            )
        texts = [p["response"] for p in picked]
        phi = ctx.reward.components(ctx.eval_prompts, texts)
        _save_samples(samples, ctx.eval_prompts, texts, phi, {"logp": None, "logp_ref": None, "token_ids": None})
        kl = ev.best_of_n_kl(spec.n)
        record.update({"kl": kl, "kl_ci_low": kl, "kl_ci_high": kl, "kl_method": "best_of_n_formula",
                       "eval_seconds": time.perf_counter() - t1})
    phi = np.array([r["phi"] for r in read_rows(samples)])
    m, lo, hi = ev.mean_interval(phi[:, ctx.reward.primary])
    record.update({"mean_reward": m, "mean_reward_ci_low": lo, "mean_reward_ci_high": hi})
    record["seconds"] = time.perf_counter() - start
    _write_json(done, record)
    return record


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run every (seed, scenario, method) not yet on disk, then ``analyse``; returns the results table."""
    wall = time.perf_counter()
    ctx = prepare(config, out_dir, cache_dir, log)
    for seed in config.seeds:
        responses = _responses(ctx, seed)
        for scenario in config.scenario_names:
            rows = _labelled(ctx, scenario, seed, responses)
            for spec in config.methods:
                t0 = time.perf_counter()
                rec = _run_method(ctx, scenario, seed, spec, rows)
                log(
                    f"[{time.perf_counter() - wall:7.1f}s] seed {seed} {scenario:>18} {spec.name:>16}: "
                    f"reward {rec['mean_reward']:+.3f}, KL {rec['kl']:.3f} ({time.perf_counter() - t0:.1f}s)"
                )
    ctx.timings["total"] = time.perf_counter() - wall
    timings_path = ctx.out / "timings.json"
    previous = _cached_json(timings_path) or []
    _write_json(timings_path, previous + [ctx.timings | {"finished": time.strftime("%Y-%m-%d %H:%M:%S")}])
    return analyse(ctx)


# -- comparisons -------------------------------------------------------------------------------------------
def _key(prompt: Any, text: str) -> tuple[str, str]:
    return json.dumps(prompt, sort_keys=True), text


def _phis(phi_of: dict[tuple[str, str], np.ndarray], prompts: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
    """The stored reward components of each (prompt, response): a reward may read the prompt too."""
    return np.array([phi_of[_key(p, t)] for p, t in zip(prompts, texts)])


def _oracle_judge(sc: TextScenario, phi_of: dict[tuple[str, str], np.ndarray]) -> ev.ProbabilityJudge:
    def fn(prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> np.ndarray:
        return sc.prob(_phis(phi_of, prompts, firsts), _phis(phi_of, prompts, seconds))

    return ev.ProbabilityJudge(fn, name=f"oracle:{sc.name}", decision="sample")


def _reward_judge(primary: int, phi_of: dict[tuple[str, str], np.ndarray], soft: bool) -> ev.ProbabilityJudge:
    """Deterministic comparison of the primary reward (``soft``: ``sigmoid`` of the reward difference instead)."""

    def fn(prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> np.ndarray:
        ra = _phis(phi_of, prompts, firsts)[:, primary]
        rb = _phis(phi_of, prompts, seconds)[:, primary]
        if soft:
            return 1.0 / (1.0 + np.exp(-(ra - rb)))
        return np.where(ra > rb, 1.0, np.where(ra < rb, 0.0, 0.5))

    return ev.ProbabilityJudge(fn, name="reward", decision="argmax")


def _load_samples(path: Path) -> tuple[list[Any], list[str], np.ndarray]:
    rows = read_rows(path)
    return [r["prompt"] for r in rows], [r["response"] for r in rows], np.array([r["phi"] for r in rows])


def analyse(ctx: ExperimentContext) -> pd.DataFrame:
    """Win rates of every method over the reference and the baseline, per (scenario, seed); writes ``results.csv``."""
    c = ctx.config
    records = []
    for seed in c.seeds:
        for scenario in c.scenario_names:
            base = ctx.out / "eval" / scenario / f"seed{seed}"
            loaded = {}
            for spec in c.methods:
                rec = _cached_json(ctx.out / "runs" / scenario / f"seed{seed}" / spec.name / "result.json")
                if rec is not None and (base / f"{spec.name}.jsonl").exists():
                    loaded[spec.name] = (rec, *_load_samples(base / f"{spec.name}.jsonl"))
            if not loaded:
                continue
            phi_of: dict[tuple[str, str], np.ndarray] = {}
            for _, prompts, texts, phi in loaded.values():
                phi_of.update((_key(p, t), v) for p, t, v in zip(prompts, texts, phi))
            judges: dict[str, ev.ProbabilityJudge] = {}
            if c.data == "synthetic":
                judges["oracle"] = _oracle_judge(ctx.scenarios[scenario], phi_of)
                judges["true_reward"] = _reward_judge(ctx.reward.primary, phi_of, soft=False)
            else:
                judges["reward_model"] = _reward_judge(0, phi_of, soft=True)
            primary = c.judge.partition(":")[0]
            for name, (rec, prompts, texts, _) in loaded.items():
                row = {k: rec.get(k, float("nan")) for k in RESULT_COLUMNS}
                for opponent_kind, opponent in (("reference", _reference_name(c)), ("baseline", c.baseline)):
                    if opponent not in loaded:
                        continue
                    _, _, opp_texts, _ = loaded[opponent]
                    for judge_name, judge in judges.items():
                        prefix = "" if judge_name == primary else f"{judge_name}_"
                        key = f"{prefix}vs_{opponent_kind}"
                        if name == opponent:
                            continue
                        s, q, _ = ev.compare(
                            prompts, texts, opp_texts, judge, seed=_stable_seed("compare", scenario, seed, name, opponent)
                        )
                        wr = ev.win_rate(s, q, ci=c.ci, seed=_stable_seed("boot", scenario, seed, name, opponent))
                        for f in _WIN_FIELDS:
                            row[f"{key}_{f}"] = getattr(wr, f)
                records.append(row)
    table = pd.DataFrame.from_records(records)
    if len(table):
        with atomic_path(ctx.out / "results.csv") as tmp:
            table.to_csv(tmp, index=False)
    return table


def _reference_name(config: ExperimentConfig) -> str:
    return next(m.name for m in config.methods if m.kind == "reference")
