r"""DRPO for language models (arXiv 2506.01183): an online trainer on ``transformers.Trainer``.

DRPO fits the policy to a doubly robust estimate of its win rate over the policy that wrote the data, whose
log-probabilities are known only through a *model* ``pi_hat`` (``theory.drpo``: the linear version, its limit
and covariance). Per row ``(x, y = chosen, y' = rejected)`` and training step:

1. draw ``S`` responses ``a_s ~ pi_theta(.|x)`` from the current policy (temperature 1, no truncation of the
   distribution, the checkpoint's generation settings blanked; at most ``max_new_tokens`` tokens, a draw ends
   at its first EOS);
2. score ``log pi_theta`` (with gradient) and ``log pi_hat`` (no gradient: the reference model, a frozen copy
   of the initial policy, or a LoRA model's disabled adapter) of the draws and of the pair, in one pass each;
3. ask the judge ``g_hat`` (any ``auxiliary.PreferenceScorer``) for ``g_hat(a_s, y')`` and ``g_hat(y, a_s)``;
   ``g_hat(y, y')`` is the row's ``chosen_preference`` column when the data set has it, else the judge's;
4. minimise ``theory.drpo.drpo_sampled_loss``, whose gradient is unbiased for that of
   ``E_x[P_DR(pi_theta > pi_ref) - beta KL(pi_theta || pi_hat)]`` with each importance ratio of the pair capped
   at ``ratio_clip`` (default 2; None: the uncapped objective).

A draw cut at ``max_new_tokens`` is scored as it is (the usual approximation of online trainers: its
log-probability is that of the prefix). The judge reads text, so the tokenised data set keeps the rows' texts
(``tokenization.tokenize_dataset(..., keep_text=True)``).

Metrics, per row and gathered over processes: ``drpo/objective``, ``drpo/win_rate`` (the DR estimate),
``drpo/direct`` and ``drpo/correction`` (its two terms), ``drpo/kl``, ``drpo/ratio_chosen``,
``drpo/ratio_rejected`` (``pi_theta / pi_hat``), ``drpo/clipped`` (rows with a clipped ratio),
``drpo/g_labelled``; TRL's ``rewards/*`` (``beta`` times the pair's log-ratios) and ``logps/chosen``,
``logps/rejected``, ``logps/samples``; ``generated/length`` and ``generated/truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robust_rlhf.theory.drpo import check_ratio_clip, drpo_sampled_loss
from robust_rlhf.theory.errors import InputError

from .auxiliary import PreferenceScorer
from .data import CHOSEN, PROMPT, REJECTED, PreferenceSchema, as_response
from .logprobs import model_sequence_logps
from .objectives import PreferenceObjective
from .references import GenerationOptions, sample_tokens
from .tokenization import PreferenceCollator, pad_completions
from .trainers import _ROWS, PreferenceTrainer, _datasets

__all__ = ["DRPOTrainer", "DRPOCollator", "Draws"]

_TEXTS = (PROMPT, CHOSEN, REJECTED)


@dataclass
class DRPOCollator:
    """``PreferenceCollator``'s batch of the labelled pairs plus the rows' texts, ``{column}_text`` lists."""

    pairs: PreferenceCollator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [c for c in _TEXTS if c not in examples[0]] if examples else []
        if missing:
            raise InputError(f"batch: the rows have no {', '.join(missing)} text; DRPO's judge reads it: tokenise "
                             "with tokenize_dataset(..., keep_text=True)")
        batch: dict[str, Any] = self.pairs(examples)
        for col in _TEXTS:
            batch[f"{col}_text"] = [ex[col] for ex in examples]
        return batch


@dataclass
class Draws:
    """One batch's draws: ``prompt_ids`` and the pair's ``chosen_ids``/``rejected_ids`` per row (B lists),
    ``ids`` (B S lists, row-major: draw ``s`` of row ``i`` at ``i S + s``) ending at the first EOS, ``texts``
    their decoded text, ``truncated`` whether each stopped at ``max_new_tokens`` without EOS."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]

    @property
    def samples(self) -> int:
        return len(self.ids) // len(self.prompt_ids)


class DRPOTrainer(PreferenceTrainer):
    """DRPO on a causal LM: ``samples`` draws per row from the current policy, judged by ``scorer``.

    ``ref_model`` is ``pi_hat``; by default the initial policy (a frozen copy, or the disabled adapter of a peft
    model). ``ratio_clip`` caps the importance ratios ``pi_theta / pi_hat`` of the observed pair in the objective
    (``drpo_sampled_loss``; None: the unbiased gradient). Uncapped, the correction term rewards raising a row's
    ``pi_theta(chosen)`` without bound: on the tiny model of the tests (``beta`` 0.05 and 0.2, 40 steps) the ratio
    of the chosen responses reached 10^4 and the policy collapsed, where caps of 2 and 5 both learned what the
    judge rewards. FSDP and DeepSpeed are refused: generation needs the whole model.
    """

    def __init__(
        self,
        model: nn.Module,
        args: Any,
        *,
        schema: PreferenceSchema,
        scorer: PreferenceScorer,
        beta: float = 0.1,
        samples: int = 2,
        max_new_tokens: int = 64,
        ratio_clip: float | None = 2.0,
        ref_model: nn.Module | None = None,
        length_groups: int = 4,
        **kwargs: Any,
    ) -> None:
        if not callable(scorer):
            raise InputError(f"scorer: expected a preference scorer f(prompts, firsts, seconds), got {scorer!r}")
        if not isinstance(samples, int) or samples < 1:
            raise InputError(f"samples: the draws per row must be an integer >= 1, got {samples!r}")
        check_ratio_clip(ratio_clip)
        for key in ("objective", "precompute_ref_log_probs", "length_normalize", "g_source"):
            if key in kwargs:
                raise InputError(f"{key}: fixed by DRPO (its own loss, a live pi_hat for the draws, sequence "
                                 "log-probabilities, g_hat from the judge or the chosen_preference column)")
        self.scorer = scorer
        self.samples = samples
        self.ratio_clip = ratio_clip
        # draws from pi_theta itself: temperature 1, nothing cut from the distribution, EOS allowed at once
        self.generation = GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=0)
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None or getattr(tokenizer, "pad_token_id", None) is None:
            raise InputError("a tokenizer with a pad token (processing_class) is needed to draw and decode responses")
        pairs = PreferenceSchema(0, schema.labelled_preferences, False)
        kwargs.setdefault("data_collator", DRPOCollator(PreferenceCollator(tokenizer.pad_token_id, pairs)))
        super().__init__(model, args, objective=PreferenceObjective(), schema=pairs, beta=beta, ref_model=ref_model,
                         precompute_ref_log_probs=False, length_normalize=False, length_groups=length_groups,
                         **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise InputError("DRPO draws responses with generate(), which needs the whole model: FSDP/DeepSpeed "
                             "sharding is not supported")
        for name, dataset in _datasets(self.train_dataset, "train_dataset") + _datasets(self.eval_dataset,
                                                                                         "eval_dataset"):
            cols = set(getattr(dataset, "column_names", None) or ())
            if cols and not set(_TEXTS) <= cols:
                raise InputError(f"{name}: no {', '.join(sorted(set(_TEXTS) - cols))} column; DRPO's judge reads "
                                 "the rows' texts: tokenise with tokenize_dataset(..., keep_text=True)")

    # -- draws --------------------------------------------------------------------------------------------
    def draw(self, model: nn.Module, batch: dict[str, Any]) -> Draws:
        """``samples`` responses per row from ``model`` (the policy) after each row's prompt, from the global
        torch generator (Trainer seeds it and restores it on resume)."""
        B = self._rows(batch)
        ids, mask = batch["input_ids"].cpu(), batch["completion_mask"].cpu()
        lengths = batch["attention_mask"].sum(1).cpu()
        starts = mask.int().argmax(1)
        prompt_ids = [ids[i, : int(starts[i])].tolist() for i in range(B)]
        chosen = [ids[i, int(starts[i]) : int(lengths[i])].tolist() for i in range(B)]
        rejected = [ids[B + i, int(starts[B + i]) : int(lengths[B + i])].tolist() for i in range(B)]
        tok = self.processing_class
        policy = self.accelerator.unwrap_model(model)
        new = sample_tokens(policy, prompt_ids, self.samples, self.generation, tok.pad_token_id, tok.eos_token_id)
        draws, truncated = [], []
        for row in new.cpu().tolist():
            end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            draws.append(row[:end])
            truncated.append(end == self.generation.max_new_tokens and row[end - 1] != tok.eos_token_id)
        texts = tok.batch_decode(draws, skip_special_tokens=True)
        return Draws(prompt_ids, chosen, rejected, draws, texts, truncated)

    def _sequences(self, draws: Draws, device: torch.device) -> dict[str, Tensor]:
        """The ``(2 + S) B`` sequences response-major (chosen, rejected, then draw ``s`` of every row), padded."""
        B, S = len(draws.prompt_ids), draws.samples
        responses = draws.chosen_ids + draws.rejected_ids + [draws.ids[i * S + s] for s in range(S) for i in range(B)]
        prompts = [draws.prompt_ids[k % B] for k in range(len(responses))]
        padded = pad_completions(prompts, responses, self.processing_class.pad_token_id)
        return {k: v.to(device) for k, v in padded.items()}

    def judge(self, batch: dict[str, Any], draws: Draws) -> tuple[Tensor, Tensor, Tensor]:
        """``g_hat(a_s, y')``, ``g_hat(y, a_s)`` (B, S) and ``g_hat(y, y')`` (B,), float64, in one scorer call."""
        B, S = len(draws.prompt_ids), draws.samples
        prompts = [p for p in batch[f"{PROMPT}_text"] for _ in range(S)]
        chosen = [c for c in batch[f"{CHOSEN}_text"] for _ in range(S)]
        rejected = [r for r in batch[f"{REJECTED}_text"] for _ in range(S)]
        answers = [as_response(p, t) for p, t in zip(prompts, draws.texts)]
        firsts, seconds, who = answers + chosen, rejected + answers, prompts + prompts
        labelled = "g" not in batch
        if labelled:
            who, firsts, seconds = (who + list(batch[f"{PROMPT}_text"]), firsts + list(batch[f"{CHOSEN}_text"]),
                                    seconds + list(batch[f"{REJECTED}_text"]))
        values = list(self.scorer(who, firsts, seconds))
        if len(values) != len(who):
            raise InputError(f"scorer: returned {len(values)} probabilities for {len(who)} pairs")
        try:
            g = torch.tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"scorer: returned a value that is not a number ({exc})") from None
        vs_second, first_vs = g[: B * S].view(B, S), g[B * S : 2 * B * S].view(B, S)
        g_pair = g[2 * B * S :] if labelled else batch["g"].detach().cpu().double()
        return vs_second, first_vs, g_pair

    # -- the loss -------------------------------------------------------------------------------------------
    def _batch_loss(self, model: nn.Module, batch: dict[str, Any], training: bool) -> tuple[Tensor, dict[str, float]]:
        draws = self.draw(model, batch)
        return self.loss_of_draws(model, batch, draws, training)

    def loss_of_draws(self, model: nn.Module, batch: dict[str, Any], draws: Draws, training: bool = True
                      ) -> tuple[Tensor, dict[str, float]]:
        """The batch's DRPO loss and metrics given its draws."""
        B, S = len(draws.prompt_ids), draws.samples
        seqs = self._sequences(draws, batch["input_ids"].device)
        logps = model_sequence_logps(model, seqs, False, self.length_groups).float()
        ref = self.reference_logps(seqs).to(logps.device, torch.float32)
        lp, rf = logps.view(2 + S, B), ref.view(2 + S, B)
        vs_second, first_vs, g_pair = (v.to(logps.device) for v in self.judge(batch, draws))
        out = drpo_sampled_loss(lp[2:].T, rf[2:].T, vs_second, first_vs, lp[:2].T, rf[:2].T, g_pair,
                                torch.ones(B, dtype=torch.float64, device=logps.device), self.beta, self.ratio_clip)
        reward = self.beta * (lp[:2] - rf[:2]).detach().double()
        dev = logps.device
        length = torch.tensor([len(d) for d in draws.ids], dtype=torch.float64, device=dev).view(B, S).mean(1)
        cut = torch.tensor(draws.truncated, dtype=torch.float64, device=dev).view(B, S).mean(1)
        cols = {
            "drpo/objective": out.objective, "drpo/win_rate": out.win_rate, "drpo/direct": out.direct,
            "drpo/correction": out.correction, "drpo/kl": out.kl, "drpo/ratio_chosen": out.ratio[:, 0],
            "drpo/ratio_rejected": out.ratio[:, 1], "drpo/clipped": out.clipped.any(1).double(),
            "drpo/g_labelled": g_pair, "rewards/chosen": reward[0], "rewards/rejected": reward[1],
            "rewards/margins": reward[0] - reward[1], "rewards/accuracies": (reward[0] > reward[1]).double(),
            "logps/chosen": lp[0].detach().double(), "logps/rejected": lp[1].detach().double(),
            "logps/samples": lp[2:].detach().double().mean(0), "generated/length": length, "generated/truncated": cut,
        }
        rows = self._gather(torch.stack([c.to(dev) for c in cols.values()], dim=-1), training)
        metrics = {_ROWS: float(rows.shape[0])}
        metrics.update({key: rows[:, k].mean().item() for k, key in enumerate(cols)})
        return out.loss, metrics
