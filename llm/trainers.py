r"""Preference trainers on ``transformers.Trainer``: one-stage (policy) and two-stage (reward model).

Both turn a batch into margins with ONE forward pass of the trained model over every response
(chosen, rejected, reference ``a_1 .. a_{2M}``; see ``tokenization``), then call
``PreferenceObjective.evaluate``, i.e. the loss functions of ``theory.losses``. Accelerate, DDP, FSDP,
DeepSpeed, gradient accumulation, mixed precision, checkpoints and resume come from ``Trainer``.

* ``PreferenceTrainer`` (one-stage): margin ``beta * [(log pi(a) - log pi_ref(a)) - (log pi(b) - log pi_ref(b))]``.
  The reference log-probabilities are computed in one pass before training and stored in the data set
  (column ``ref_logps``), so no reference model is held during training; or, with
  ``precompute_ref_log_probs=False``, computed live each step by a reference model or, for a LoRA model,
  by the same model with its adapter disabled.
* ``RewardTrainer`` (two-stage): an ``AutoModelForSequenceClassification`` with one output scores
  ``prompt + response``; margin ``r(x, a) - r(x, b)``; optional reward centring
  ``+ c * mean((r(x, chosen) + r(x, rejected))^2)`` (TRL's ``center_rewards_coefficient``).

``g_hat`` comes from the batch (probability columns) or, with ``g_source="frozen"``, from a frozen copy
of the trained model refreshed at every ``k``-th optimiser step (steps 0, k, 2k, ...):
``g = sigmoid(frozen margin)`` on the labelled and reference pairs, the model's own Bradley-Terry
probability (the authors' option; their one-stage code tests ``not "chosen_preference" in batch and
"rejected_preference" in batch``, which skips the frozen forward when neither column is present and
then fails on an undefined name). Its weights and the ``vrpo_tuned`` state are saved in every
checkpoint, so a resumed run continues exactly.

Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``logps/references``; with the control
variate, ``vrpo/labelled``, ``vrpo/control``, ``vrpo/reference`` (the three loss terms),
``vrpo/g_labelled``, ``vrpo/g_reference`` (mean ``g_hat``), ``vrpo/lambda``, and the empirical
variances over the gathered rows ``vrpo/var_loss_mle``, ``vrpo/var_loss_vr`` (per-row objective without
and with the control variate), ``vrpo/var_grad_mle``, ``vrpo/var_grad_vr`` (per-row gradient
projected on a common margin shift, see ``objectives``) and ``vrpo/var_ograd_mle``, ``vrpo/var_ograd_vr``
(the same with the labelled pair in its label-independent ``orientation``, so the label noise is in it). Every per-row value is gathered across
processes before a mean or variance is taken; a logged value is the mean over the micro-batches since
the previous log.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer

from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.io import atomic_path

from .data import PreferenceSchema
from .logprobs import model_sequence_logps
from .models import check_length, disable_dropout, disabled_adapter, is_peft_model
from .objectives import LambdaEstimator, PreferenceObjective, margin_shift_scores, variance_summary
from .tokenization import REF_LOGPS, PreferenceCollator

__all__ = ["PreferenceTrainer", "RewardTrainer", "TRAINER_STATE_FILE", "FROZEN_WEIGHTS_FILE"]

TRAINER_STATE_FILE = "vrpo_state.json"
FROZEN_WEIGHTS_FILE = "frozen_g_model.safetensors"


_ROWS = "_rows"  # the rows behind a batch's metrics, their weight when logged


def _datasets(value: Any, name: str) -> list[tuple[str, Any]]:
    """``(name, data set)`` of a trainer argument: none, one, or a dict of named evaluation sets."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [(f"{name}[{key!r}]", v) for key, v in value.items()]
    return [(name, value)]


def _check_tokenised(dataset: Any, name: str, schema: PreferenceSchema, needs_g: bool, model: nn.Module) -> None:
    """A tokenised data set carries the columns of ``schema`` (reference pairs, no more and no fewer, when
    they are scored; ``g_hat`` where it is read) and its sequences fit ``model``'s positions."""
    cols = set(getattr(dataset, "column_names", None) or ())
    if not cols:
        return  # not a datasets.Dataset (an iterable set): checked batch by batch
    need = [f"{c}_input_ids" for c in ("prompt", *schema.response_columns)]
    if needs_g:
        need += schema.preference_columns
    missing = [c for c in need if c not in cols]
    if missing:
        raise InputError(f"{name}: missing column(s) {', '.join(missing)} that the training set has")
    if schema.n_ref_pairs:
        more = sorted(c for c in cols if (m := re.fullmatch(r"a_([0-9]+)_input_ids", c))
                      and int(m.group(1)) > 2 * schema.n_ref_pairs)
        if more:
            raise InputError(f"{name}: reference responses beyond the training set's M = {schema.n_ref_pairs} pairs "
                             f"({', '.join(more)}); give it the training set's reference pairs")
    if not len(dataset):
        return
    import pyarrow.compute as pc

    arrow = dataset.with_format("arrow")

    def lengths(column: str) -> np.ndarray:
        return pc.list_value_length(arrow[f"{column}_input_ids"]).to_numpy(zero_copy_only=False)

    longest = lengths("prompt") + np.maximum.reduce([lengths(c) for c in schema.response_columns])
    check_length(model, int(longest.max()), f"{name}: prompt + response sequences")


class _PairwiseTrainer(Trainer, ABC):
    """Shared machinery: batch -> margins -> theory loss, g_hat, lambda tuning, gathered metrics."""

    # in training compute_loss returns the micro-batch's share of its accumulation window's mean over rows
    # (``_get_num_items_in_batch``), so that unequal micro-batches weigh their rows equally
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module,
        args: Any,
        *,
        objective: PreferenceObjective,
        schema: PreferenceSchema,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        g_source: str = "columns",
        frozen_refresh_steps: int = 1,
        lambda_ema: float = 0.0,
        disable_model_dropout: bool = True,
        callbacks: list[Any] | None = None,
    ) -> None:
        if g_source not in ("columns", "frozen"):
            raise InputError(
                f"g_source: the trainer reads g_hat from 'columns' or a 'frozen' copy, got {g_source!r} "
                "(annotate the data first for other sources, see robust_rlhf.llm.auxiliary)"
            )
        if frozen_refresh_steps < 1:
            raise InputError(f"frozen_refresh_steps must be >= 1, got {frozen_refresh_steps}")
        if objective.uses_control_variate:
            if schema.n_ref_pairs < 1:
                raise InputError(f"method {objective.method!r} needs reference pairs: columns a_1, a_2 (a_3, a_4, ...)")
            if g_source == "columns" and not schema.has_preferences:
                raise InputError(
                    f"method {objective.method!r} with g_source='columns' needs chosen_preference, "
                    "rejected_preference and a_k_preference for every reference response"
                )
        if not objective.uses_control_variate and schema.n_ref_pairs:
            # the MLE baselines never look at reference responses: do not pay for their forward pass
            schema = PreferenceSchema(0, schema.labelled_preferences, False)
        for name, dataset in _datasets(train_dataset, "train_dataset") + _datasets(eval_dataset, "eval_dataset"):
            _check_tokenised(dataset, name, schema, objective.uses_control_variate and g_source == "columns", model)
        if disable_model_dropout:
            disable_dropout(model)
        if data_collator is None:
            if processing_class is None or getattr(processing_class, "pad_token_id", None) is None:
                raise InputError("a tokenizer with a pad token (processing_class) is needed to build batches")
            data_collator = PreferenceCollator(processing_class.pad_token_id, schema)
        if getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False
        self.objective = objective
        self.schema = schema
        self.g_source = g_source
        self.frozen_refresh_steps = frozen_refresh_steps
        self.lambda_estimator = LambdaEstimator(objective.lam, lambda_ema) if objective.method == "vrpo_tuned" else None
        # vrpo_tuned: the (a, c) rows of the accumulation window so far, and the window's micro-batch count
        self._window_rows: list[Tensor] = []
        self._window_size: int | None = None
        self._stored: dict[str, dict[str, list[tuple[float, float]]]] = {"train": defaultdict(list),
                                                                         "eval": defaultdict(list)}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        # the batch has no "labels": never pass num_items_in_batch to the model
        self.model_accepts_loss_kwargs = False
        self.frozen_model: nn.Module | None = None
        self._frozen_step = -1
        if g_source == "frozen":
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise InputError(
                    "g_source='frozen' keeps a full copy of the model; it is not supported with FSDP/DeepSpeed sharding"
                )
            self.frozen_model = self._frozen_copy(self.model)

    # -- hooks for the two stages ------------------------------------------------------------
    @abstractmethod
    def _scores(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"margin": (B,), "ref_margin": (B, M) or None, ...}`` from one forward pass."""

    @abstractmethod
    def _frozen_margins(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Margins of the labelled and reference pairs under the frozen copy (no gradient)."""

    # -- data plumbing -------------------------------------------------------------------------
    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        return dataset

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        return data_collator

    @property
    def n_responses(self) -> int:
        """Responses per row, ``K = 2 + 2M``."""
        return 2 + 2 * self.schema.n_ref_pairs

    def _split(self, values: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-sequence values ``(K B,)`` -> chosen ``(B,)``, rejected ``(B,)``, references ``(B, 2M)``."""
        per = values.view(self.n_responses, -1)
        refs = per[2:].transpose(0, 1) if self.schema.n_ref_pairs else None
        return per[0], per[1], refs

    @staticmethod
    def _pair_margins(first: Tensor, second: Tensor, refs: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Labelled margin ``first - second`` and reference margins ``a_{2j-1} - a_{2j}``."""
        ref_margin = None if refs is None else refs[:, 0::2] - refs[:, 1::2]
        return first - second, ref_margin

    # -- g_hat -----------------------------------------------------------------------------------
    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        frozen = copy.deepcopy(model)
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen

    def _maybe_refresh_frozen(self) -> None:
        step = self.state.global_step
        if step % self.frozen_refresh_steps == 0 and step != self._frozen_step:
            source = self.accelerator.unwrap_model(self.model)
            self.frozen_model.load_state_dict(source.state_dict())
            self._frozen_step = step

    def _g_hat(self, batch: dict[str, Tensor], training: bool) -> tuple[Tensor | None, Tensor | None]:
        if not self.objective.uses_control_variate:
            return None, None
        if self.g_source == "columns":
            return batch["g"], batch["ref_g"]
        if training:
            self._maybe_refresh_frozen()
        with torch.no_grad():
            m, mref = self._frozen_margins(batch)
        return torch.sigmoid(m.float()), torch.sigmoid(mref.float())

    # -- the loss --------------------------------------------------------------------------------
    def _gather(self, values: Tensor, training: bool) -> Tensor:
        """``values`` of every process's rows. In evaluation the duplicates that pad the last batch are
        dropped (``gather_for_metrics``); in training they are kept, as in the loss: ``gather_for_metrics``
        would also cut every micro-batch of an epoch's last accumulation window (fetched before the first
        is scored) to that window's remainder."""
        values = values.detach().float().contiguous()
        return self.accelerator.gather(values) if training else self.accelerator.gather_for_metrics(values)

    def _rows(self, batch: dict[str, Tensor]) -> int:
        """Preference rows of a batch: its sequences over the ``K`` scored per row."""
        return batch["input_ids"].shape[0] // self.n_responses

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Trainer's fetch of one accumulation window's micro-batches; records their number (``_fold_lambda``)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_rows, self._window_size = [], len(batch_samples)
        return batch_samples, num_items

    def _fold_lambda(self, rows: Tensor) -> None:
        """Pool the ``(a, c)`` rows of an accumulation window; after its last micro-batch fold them into the
        estimate, which the next optimizer step uses. So a step's ``lam`` does not depend on its own rows, and
        the update does not depend on how its window is split into micro-batches (batches of one row
        included). Outside Trainer's loop (no window) each batch is folded in on its own."""
        self._window_rows.append(rows)
        if self._window_size is None or len(self._window_rows) >= self._window_size:
            pooled = torch.cat(self._window_rows)
            self._window_rows = []
            self.lambda_estimator.update(pooled[:, 0], pooled[:, 1])

    def _get_num_items_in_batch(self, batch_samples: list[dict[str, Tensor]], device: torch.device) -> Tensor:
        """The preference rows of an accumulation window, summed over the processes: the divisor that makes
        the window's gradient the mean over its rows (``compute_loss``)."""
        rows = torch.tensor([float(sum(self._rows(b) for b in batch_samples))], device=device)
        return self.accelerator.gather(rows).sum() if self.accelerator.num_processes > 1 else rows[0]

    def _batch_loss(
        self, model: nn.Module, batch: dict[str, Tensor], training: bool
    ) -> tuple[Tensor, dict[str, float]]:
        scores = self._scores(model, batch)
        margin, ref_margin = scores["margin"].float(), scores["ref_margin"]
        ref_margin = None if ref_margin is None else ref_margin.float()
        g, ref_g = self._g_hat(batch, training)
        obj = self.objective
        lam = None
        cv_rows = None
        if obj.uses_control_variate:
            with torch.no_grad():
                base = obj.evaluate(margin.detach(), ref_margin.detach(), g, ref_g, lam=0.0)
                a_loss, c_loss = base.labelled, base.control - base.reference
                a_grad, c_grad = margin_shift_scores(obj.loss, margin, g, ref_margin, ref_g)
                orientation = batch.get("orientation")
                if orientation is None:
                    orientation = torch.ones_like(margin)
                a_og, c_og = margin_shift_scores(obj.loss, margin, g, ref_margin, ref_g, orientation.to(margin.device))
            cv_rows = self._gather(torch.stack([a_loss, c_loss, a_grad, c_grad, a_og, c_og], dim=-1), training)
            if self.lambda_estimator is not None:
                lam = self.lambda_estimator.value
                if training:
                    col = {"loss": 0, "margin_shift": 2, "oriented_shift": 4}[obj.lambda_target]
                    self._fold_lambda(cv_rows[:, col : col + 2])
        out = obj.evaluate(margin, ref_margin, g, ref_g, lam=lam)
        loss = out.loss
        extra = scores.get("penalty")
        if extra is not None:
            loss = loss + extra
        metrics = self._metrics(scores, out, g, ref_g, cv_rows, training)
        return loss, metrics

    def _metrics(
        self, scores: dict[str, Tensor], out: Any, g: Tensor | None, ref_g: Tensor | None, cv_rows: Tensor | None,
        training: bool,
    ) -> dict[str, float]:
        cols = [scores["reward_chosen"], scores["reward_rejected"], out.labelled]
        has_logps = "logp_chosen" in scores
        if has_logps:
            cols += [scores["logp_chosen"], scores["logp_rejected"]]
            if scores.get("logp_refs") is not None:
                cols.append(scores["logp_refs"].mean(-1))
        if out.control is not None:
            cols += [out.control, out.reference, g, ref_g.mean(-1)]
        rows = self._gather(torch.stack([c.detach().float() for c in cols], dim=-1), training)
        rc, rr = rows[:, 0], rows[:, 1]
        m = {
            _ROWS: float(rows.shape[0]),
            "rewards/chosen": rc.mean().item(),
            "rewards/rejected": rr.mean().item(),
            "rewards/margins": (rc - rr).mean().item(),
            "rewards/accuracies": (rc > rr).float().mean().item(),
        }
        k = 3
        if has_logps:
            m["logps/chosen"] = rows[:, k].mean().item()
            m["logps/rejected"] = rows[:, k + 1].mean().item()
            k += 2
            if scores.get("logp_refs") is not None:
                m["logps/references"] = rows[:, k].mean().item()
                k += 1
        if out.control is not None:
            m["vrpo/labelled"] = rows[:, 2].mean().item()
            m["vrpo/control"] = rows[:, k].mean().item()
            m["vrpo/reference"] = rows[:, k + 1].mean().item()
            m["vrpo/g_labelled"] = rows[:, k + 2].mean().item()
            m["vrpo/g_reference"] = rows[:, k + 3].mean().item()
            m["vrpo/lambda"] = out.lam
            v_loss = variance_summary(cv_rows[:, 0], cv_rows[:, 1], out.lam)
            v_grad = variance_summary(cv_rows[:, 2], cv_rows[:, 3], out.lam)
            v_ograd = variance_summary(cv_rows[:, 4], cv_rows[:, 5], out.lam)
            if v_loss:
                m["vrpo/var_loss_mle"], m["vrpo/var_loss_vr"] = v_loss["without_cv"], v_loss["with_cv"]
                m["vrpo/var_grad_mle"], m["vrpo/var_grad_vr"] = v_grad["without_cv"], v_grad["with_cv"]
                m["vrpo/var_ograd_mle"], m["vrpo/var_ograd_vr"] = v_ograd["without_cv"], v_ograd["with_cv"]
        return m

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, dict[str, float]]:
        training = model.training
        loss, metrics = self._batch_loss(model, inputs, training)
        self._store(metrics, "train" if training else "eval")
        if training and num_items_in_batch is not None:
            # the row mean times this micro-batch's share of the window's rows; the processes' gradients
            # are averaged (DDP), hence the factor num_processes
            loss = loss * (self._rows(inputs) * self.accelerator.num_processes / num_items_in_batch)
        elif training:  # called without the window's count (not by Trainer's loop): the per-step mean
            loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self._batch_loss(model, inputs, training=False)
        self._store(metrics, "eval")
        return loss.detach(), None, None

    def _store(self, metrics: dict[str, float], mode: str) -> None:
        """Each batch's values with their weight: its rows for a mean, its rows - 1 for a within-batch
        variance (pooled; a one-row batch has none)."""
        rows = metrics.pop(_ROWS, 1.0)
        for key, value in metrics.items():
            self._stored[mode][key].append((float(value), rows - 1.0 if "/var_" in key else rows))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._stored[mode].items():
            weight = sum(w for _, w in values)
            if weight > 0:  # the metric over every row since the last log, not a mean of batch means
                logs[f"{prefix}{key}"] = sum(v * w for v, w in values) / weight
        self._stored[mode].clear()
        super().log(logs, start_time)

    # -- checkpoints -------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "lambda": None if self.lambda_estimator is None else self.lambda_estimator.state_dict(),
            "frozen_step": self._frozen_step,
        }

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        if self.frozen_model is not None:
            from safetensors.torch import save_model

            save_model(self.frozen_model, os.path.join(folder, FROZEN_WEIGHTS_FILE))
        # written last and atomically: its presence marks the checkpoint complete (see _last_complete_checkpoint)
        with atomic_path(os.path.join(folder, TRAINER_STATE_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self._extra_state(), fh)

    def _load_extra_state(self, folder: str) -> None:
        path = os.path.join(folder, TRAINER_STATE_FILE)
        if not os.path.exists(path):
            raise InputError(f"resume_from_checkpoint: {folder} is incomplete (no {TRAINER_STATE_FILE}, written when "
                             "a checkpoint is finished: its save was interrupted); resume from an earlier checkpoint, "
                             "or pass 'last' for the newest complete one")
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        if self.lambda_estimator is not None and state.get("lambda") is not None:
            self.lambda_estimator.load_state_dict(state["lambda"])
        self._frozen_step = int(state.get("frozen_step", -1))
        weights = os.path.join(folder, FROZEN_WEIGHTS_FILE)
        if self.frozen_model is not None and os.path.exists(weights):
            from safetensors.torch import load_model

            load_model(self.frozen_model, weights, device=str(next(self.frozen_model.parameters()).device))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``, restoring the lambda estimate and the frozen ``g_hat`` copy on resume; a resumed
        run's ``training_loss`` is the whole run's mean (``_whole_run_loss``)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = _last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise InputError(f"no complete checkpoint found in {self.args.output_dir} to resume from")
        if isinstance(resume_from_checkpoint, str):
            if not os.path.isdir(resume_from_checkpoint):
                raise InputError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a folder")
            self._load_extra_state(resume_from_checkpoint)
            from transformers import TrainerState

            # read now: with save_total_limit the run's own saves delete this checkpoint before it ends
            start = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json")).global_step
        out = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        return self._whole_run_loss(out, start) if isinstance(resume_from_checkpoint, str) else out

    def _whole_run_loss(self, out: Any, start: int) -> Any:
        """``out`` with ``training_loss`` over every step, not only those after ``checkpoint`` (Trainer's):
        ``(sum_k len_k loss_k + (T - t0) loss_resumed) / T`` over the losses logged up to the checkpoint's
        step ``t0 = start``, each the mean of the ``len_k`` steps since the previous log. Where those logs stop
        short of ``t0`` (the losses in between were never logged), Trainer's value stays and a warning says so."""
        total = self.state.global_step
        logged = [(e["step"], e["loss"]) for e in self.state.log_history if "loss" in e and e["step"] <= start]
        last = logged[-1][0] if logged else 0
        if start == 0 or total <= start:
            return out
        if last != start:
            warnings.warn(f"training_loss averages steps {start + 1}..{total} only: the losses of steps {last + 1}.."
                          f"{start} before the checkpoint were not logged (logging_steps does not "
                          "divide save_steps)", RuntimeWarning, stacklevel=3)
            return out
        steps = np.diff([0] + [s for s, _ in logged])
        loss = (float(steps @ np.array([v for _, v in logged])) + (total - start) * out.training_loss) / total
        out.metrics["train_loss"] = loss
        return type(out)(out.global_step, loss, out.metrics)


def _last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished (it holds ``TRAINER_STATE_FILE``,
    written last); newer unfinished ones are named in a warning and left alone."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted((int(m.group(1)), name) for name in names
                   if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name)))
    skipped, found = [], None
    for _, name in reversed(steps):
        if os.path.exists(os.path.join(output_dir, name, TRAINER_STATE_FILE)):
            found = os.path.join(output_dir, name)
            break
        skipped.append(name)
    if skipped:
        warnings.warn(f"{output_dir}: {', '.join(skipped)} unfinished (its save was interrupted); resuming from "
                      f"{found or 'nothing'}", RuntimeWarning, stacklevel=3)
    return found


def _to_device(batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


class PreferenceTrainer(_PairwiseTrainer):
    """One-stage (DPO-style) training of a causal LM with any method and loss of ``PreferenceObjective``.

    ``ref_model``: a separate reference policy; by default the reference is the initial policy (its
    log-probabilities are computed before training) or, for a peft model, the disabled adapter.
    ``length_groups``: each batch's ``K B`` sequences are scored in up to that many forward passes over
    sequences of similar length, so that fewer padding positions are computed (``logprobs.length_groups``;
    VRPO's ``K = 2 + 2M`` responses per row vary more in length than a pair); 1 is one padded pass.
    """

    def __init__(
        self,
        model: nn.Module,
        args: Any,
        *,
        objective: PreferenceObjective,
        schema: PreferenceSchema,
        beta: float = 0.1,
        ref_model: nn.Module | None = None,
        precompute_ref_log_probs: bool = True,
        length_normalize: bool = False,
        length_groups: int = 4,
        **kwargs: Any,
    ) -> None:
        if not beta > 0:
            raise InputError(f"beta must be > 0, got {beta}")
        if length_groups < 1:
            raise InputError(f"length_groups must be >= 1, got {length_groups}")
        self.beta = float(beta)
        self.length_normalize = length_normalize
        self.length_groups = int(length_groups)
        self.precompute_ref_log_probs = precompute_ref_log_probs
        self._peft = is_peft_model(model)
        # without a reference model or adapter the initial policy is the reference: scored in place
        # before training when precomputing, else kept as a frozen copy for the live reference
        self._policy_is_reference = ref_model is None and not self._peft and precompute_ref_log_probs
        if ref_model is None and not self._peft and not precompute_ref_log_probs:
            ref_model = _PairwiseTrainer._frozen_copy(model)
        elif ref_model is not None:
            ref_model = _PairwiseTrainer._frozen_copy(ref_model)
        self.ref_model = ref_model
        super().__init__(model, args, objective=objective, schema=schema, **kwargs)
        if self.ref_model is not None:
            if kwargs.get("disable_model_dropout", True):
                disable_dropout(self.ref_model)
            self.ref_model.to(self.args.device)
        prepare = self.with_reference_logps if precompute_ref_log_probs else self._without_reference_logps
        if self.train_dataset is not None:
            self.train_dataset = prepare(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: prepare(v) for k, v in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = prepare(self.eval_dataset)
        if precompute_ref_log_probs:
            self.ref_model = None  # not held during training
            self._policy_is_reference = False

    # -- reference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Tensor]) -> Tensor:
        """Reference log-probabilities ``(K B,)`` of the batch's sequences (ref model or disabled adapter).

        Computed on the scoring model's own device (before FSDP/DeepSpeed wrapping the policy may still
        be on the CPU).
        """
        if self.ref_model is not None:
            return model_sequence_logps(self.ref_model, _to_device(batch, self.ref_model), self.length_normalize,
                                        self.length_groups)
        if not (self._peft or self._policy_is_reference):
            raise InputError("no reference: the reference log-probs were precomputed and the reference model dropped")
        unwrapped = self.accelerator.unwrap_model(self.model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with disabled_adapter(unwrapped), self.compute_loss_context_manager():
                return model_sequence_logps(unwrapped, _to_device(batch, unwrapped), self.length_normalize,
                                            self.length_groups)
        finally:
            unwrapped.train(was_training)

    @staticmethod
    def _without_reference_logps(dataset: Any) -> Any:
        """The data set without a ``ref_logps`` column (with a warning): scoring the reference live, a column
        in the batches would be used in its place."""
        if REF_LOGPS not in getattr(dataset, "column_names", ()):
            return dataset
        warnings.warn(f"the data set's {REF_LOGPS} column is dropped: with precompute_ref_log_probs=False the "
                      "reference model is scored live", stacklevel=4)
        return dataset.remove_columns(REF_LOGPS)

    def with_reference_logps(self, dataset: Any) -> Any:
        """The data set plus a ``ref_logps`` column ``[log pi_ref(y_k|x) for the K responses]``, in one pass.

        Rows are split across processes and gathered back in order; a data set that already has the
        column (for example from a cache) is returned as is, once every row is checked to hold ``K`` finite
        numbers (a column made for another method or schema has another width).
        """
        if REF_LOGPS in dataset.column_names:
            K = self.n_responses
            for i, row in enumerate(dataset[REF_LOGPS]):
                if row is None or len(row) != K or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row):
                    raise InputError(
                        f"column {REF_LOGPS}, row {i + 1}: expected log pi_ref of the {K} scored responses, "
                        f"got {row!r}; a column made for another method or schema (drop it to recompute)"
                    )
            return dataset
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise InputError(
                "reference log-probs cannot be computed under DeepSpeed ZeRO-3 before training (the weights are "
                "partitioned): fill the cache first with `robust-rlhf finetune --precompute-only` without ZeRO-3"
            )
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            shuffle=False,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare(loader)
        chunks = []
        for batch in loader:
            lp = self.reference_logps(batch).view(self.n_responses, -1).transpose(0, 1)
            lp = lp.float().contiguous().to(self.accelerator.device)
            chunks.append(self.accelerator.gather_for_metrics(lp).cpu())
        values = torch.cat(chunks).tolist()
        if len(values) != len(dataset):
            raise RuntimeError(f"reference log-probs: got {len(values)} rows for {len(dataset)}")
        return dataset.add_column(REF_LOGPS, values)

    # -- scores ---------------------------------------------------------------------------------------
    def _batch_ref_logps(self, batch: dict[str, Tensor]) -> Tensor:
        if REF_LOGPS in batch:
            return batch[REF_LOGPS].transpose(0, 1).reshape(-1)
        return self.reference_logps(batch)

    def _scores(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logps = model_sequence_logps(model, batch, self.length_normalize, self.length_groups)
        ref = self._batch_ref_logps(batch).to(logps.device, torch.float32)
        rewards = self.beta * (logps - ref)
        rc, rr, rrefs = self._split(rewards)
        margin, ref_margin = self._pair_margins(rc, rr, rrefs)
        lc, lr, lrefs = self._split(logps)
        return {
            "margin": margin,
            "ref_margin": ref_margin,
            "reward_chosen": rc,
            "reward_rejected": rr,
            "logp_chosen": lc,
            "logp_rejected": lr,
            "logp_refs": lrefs,
        }

    def _frozen_margins(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logps = model_sequence_logps(self.frozen_model, batch, self.length_normalize, self.length_groups)
        ref = self._batch_ref_logps(batch).to(logps.device, torch.float32)
        rc, rr, rrefs = self._split(self.beta * (logps - ref))
        return self._pair_margins(rc, rr, rrefs)


class RewardTrainer(_PairwiseTrainer):
    """Two-stage: a one-output sequence classifier trained on ``prompt + response`` with any objective."""

    def __init__(
        self,
        model: nn.Module,
        args: Any,
        *,
        objective: PreferenceObjective,
        schema: PreferenceSchema,
        center_rewards_coefficient: float | None = None,
        **kwargs: Any,
    ) -> None:
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise InputError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        self.center_rewards_coefficient = center_rewards_coefficient
        super().__init__(model, args, objective=objective, schema=schema, **kwargs)

    @staticmethod
    def _rewards(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.shape[-1] != 1:
            raise InputError(f"the reward model must have one output, got {logits.shape[-1]}")
        return logits[:, 0].float()

    def _scores(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        r = self._rewards(model, batch)
        rc, rr, rrefs = self._split(r)
        margin, ref_margin = self._pair_margins(rc, rr, rrefs)
        scores = {"margin": margin, "ref_margin": ref_margin, "reward_chosen": rc, "reward_rejected": rr}
        if self.center_rewards_coefficient:
            scores["penalty"] = self.center_rewards_coefficient * ((rc + rr) ** 2).mean()
        return scores

    def _frozen_margins(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        rc, rr, rrefs = self._split(self._rewards(self.frozen_model, batch))
        return self._pair_margins(rc, rr, rrefs)
