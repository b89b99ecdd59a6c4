r"""Auxiliary preference models ``g_hat(x, a, b) = P(a beats b | x)`` computed offline and stored as columns.

Sources (the frozen copy of the model being trained lives in ``trainers``, since it changes while
training):

* the data's own columns (``chosen_preference``, ..., see ``data``);
* a reward model: ``g = sigmoid(r(x, a) - r(x, b))`` (``RewardModelScorer``);
* a pairwise preference model: a one-output sequence classifier on ``prompt, a, b`` rendered by a
  template, ``g = sigmoid(logit)``, optionally symmetrised ``(g(a, b) + 1 - g(b, a)) / 2``
  (``PairwiseModelScorer``);
* a Python callable ``f(prompt, a, b) -> probability`` (oracles of synthetic tasks; ``CallableScorer``).

``annotate`` writes ``g`` on every pair of every row (``chosen_preference = g(x, chosen, rejected)``,
``rejected_preference = 1 - chosen_preference``, likewise ``a_{2j-1}_preference`` and
``a_{2j}_preference``); ``cross_fit`` does it with ``K`` folds of the prompts (``prompt_folds``), the rows of
fold ``k`` scored by a model fitted on the other folds, so ``g_hat`` never saw the labels of the rows it scores
(DESIGN.md 3.4); ``cross_fit_scorer`` keeps the ``K`` models as one scorer that routes each pair to the model of
its prompt's fold (``FoldScorer``: DRPO's judge, which scores new responses to the rows' prompts while training);
``cached_annotate`` stores the result next to the data (JSONL keyed by a hash of the rows and the
source) and reads it back on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from robust_rlhf.theory.data import as_probabilities
from robust_rlhf.theory.errors import InputError

from .data import (
    CHOSEN,
    PROMPT,
    REJECTED,
    PreferenceSchema,
    as_response,
    check_rows,
    preference_column,
    read_rows,
    write_jsonl,
)
from .models import check_length
from .tokenization import TokenizeOptions, right_pad, tokenize_example

__all__ = [
    "PreferenceScorer",
    "CallableScorer",
    "RewardModelScorer",
    "PairwiseModelScorer",
    "load_callable",
    "FoldScorer",
    "annotate",
    "prompt_folds",
    "cross_fit",
    "cross_fit_scorer",
    "cached_annotate",
    "rows_hash",
]


class PreferenceScorer(Protocol):
    """``scorer(prompts, firsts, seconds) -> [P(first beats second | prompt)]``, one value per triple."""

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> list[float]: ...


@dataclass
class CallableScorer:
    """Wraps ``fn(prompt, a, b) -> P(a beats b)`` (for example a synthetic task's oracle ``g*``)."""

    fn: Callable[[Any, Any, Any], float]

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> list[float]:
        values = [self.fn(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
        return as_probabilities("g_hat callable", values, (len(values),), "one value per pair").tolist()


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` or ``file.py:function`` from the current directory (the config's
    ``g_callable``; ``theory.io.load_callable``)."""
    from robust_rlhf.theory.io import load_callable as load

    return load(spec, name="g_callable")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _first_logit(model: torch.nn.Module, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """The one-output classifier's logit of each token sequence (right-padded into one batch), float32 on the
    CPU; sequences past the model's positions are an ``InputError``."""
    check_length(model, max(map(len, seqs)), "prompt + response sequences to score")
    ids, mask = right_pad(seqs, pad_id)
    device = _device_of(model)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()


@dataclass
class RewardModelScorer:
    """``g = sigmoid(r(x, a) - r(x, b))`` from a one-output sequence classifier on ``prompt + response``.

    Tokenised exactly as ``RewardTrainer`` sees its inputs (``tokenize_example``, no EOS by default); a
    generated text answering a chat prompt is scored as the assistant message it is (``data.as_response``),
    as the reward model was trained, and an empty one (a draw that ended at once, e.g. DRPO's) as the prompt
    alone.
    """

    model: torch.nn.Module
    tokenizer: Any
    batch_size: int = 16
    options: TokenizeOptions = TokenizeOptions(add_eos=False, allow_empty=True)

    @torch.no_grad()
    def rewards(self, prompts: Sequence[Any], responses: Sequence[Any]) -> torch.Tensor:
        """``r(x, y)`` for each (prompt, response), float32 on the CPU."""
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                seqs = []
                for p, y in zip(prompts[start : start + self.batch_size], responses[start : start + self.batch_size]):
                    y = as_response(p, y) if isinstance(y, str) else y
                    t = tokenize_example({PROMPT: p, "y": y}, self.tokenizer, ["y"], self.options)
                    seqs.append(t["prompt_input_ids"] + t["y_input_ids"])
                out.append(_first_logit(self.model, seqs, self.tokenizer.pad_token_id))
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> list[float]:
        r = self.rewards(list(prompts) + list(prompts), list(firsts) + list(seconds))
        n = len(prompts)
        return torch.sigmoid(r[:n] - r[n:]).tolist()


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


@dataclass
class PairwiseModelScorer:
    """``g = sigmoid(f(template(prompt, a, b)))`` from a one-output sequence classifier.

    ``template`` is formatted with ``prompt``, ``first`` and ``second`` (chat turns are flattened to
    ``role: content`` lines). With ``symmetrize`` the model is run on both orders and
    ``g = (g(a, b) + 1 - g(b, a)) / 2``, which removes an additive position bias.
    """

    model: torch.nn.Module
    tokenizer: Any
    template: str = "{prompt}\nResponse A: {first}\nResponse B: {second}\nWhich is better?"
    symmetrize: bool = True
    batch_size: int = 16
    max_length: int | None = None

    @torch.no_grad()
    def _raw(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                seqs = []
                for p, a, b in zip(*(x[start : start + self.batch_size] for x in (prompts, firsts, seconds))):
                    text = self.template.format(prompt=_plain(p), first=_plain(a), second=_plain(b))
                    ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
                    seqs.append(ids[-self.max_length :] if self.max_length else ids)
                out.append(torch.sigmoid(_first_logit(self.model, seqs, self.tokenizer.pad_token_id)))
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> list[float]:
        prompts, firsts, seconds = list(prompts), list(firsts), list(seconds)
        g = self._raw(prompts, firsts, seconds)
        if self.symmetrize:
            g = 0.5 * (g + 1.0 - self._raw(prompts, seconds, firsts))
        return g.tolist()


def _pairs(schema: PreferenceSchema) -> list[tuple[str, str]]:
    return [(CHOSEN, REJECTED), *schema.reference_pairs]


def annotate(
    rows: Sequence[Mapping[str, Any]], schema: PreferenceSchema, scorer: PreferenceScorer
) -> list[dict[str, Any]]:
    """Rows with ``g_hat`` written on every pair (existing probability columns are replaced)."""
    rows = [dict(r) for r in rows]
    if not rows:
        return rows
    prompts, firsts, seconds, where = [], [], [], []
    for i, r in enumerate(rows):
        for first, second in _pairs(schema):
            prompts.append(r[PROMPT])
            firsts.append(r[first])
            seconds.append(r[second])
            where.append((i, first, second))
    g = as_probabilities("g_hat scorer", scorer(prompts, firsts, seconds), (len(where),), "its pairs").tolist()
    for (i, first, second), value in zip(where, g):
        rows[i][preference_column(first)] = value
        rows[i][preference_column(second)] = 1.0 - value
    return rows


def _prompt_key(prompt: Any) -> str:
    """A prompt as a string key: its text, or a chat prompt's messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


def prompt_folds(rows: Sequence[Mapping[str, Any]], folds: int, seed: int = 0) -> dict[str, int]:
    """A seeded partition of the rows' distinct prompts into ``folds`` near-equal parts, ``{prompt key: fold}``:
    the rows of one prompt share a fold, so a model fitted outside fold ``k`` saw none of fold ``k``'s prompts
    (with distinct prompts, the partition of the rows by a seeded shuffle)."""
    keys = list(dict.fromkeys(_prompt_key(r[PROMPT]) for r in rows))
    if folds < 2 or folds > len(keys):
        raise InputError(f"cross-fitting needs 2 <= folds <= distinct prompts ({len(keys)}), got {folds}")
    random.Random(seed).shuffle(keys)
    return {key: pos % folds for pos, key in enumerate(keys)}


def _outside(rows: Sequence[Mapping[str, Any]], fold_of: Mapping[str, int], k: int) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if fold_of[_prompt_key(r[PROMPT])] != k]


def cross_fit(
    rows: Sequence[Mapping[str, Any]],
    schema: PreferenceSchema,
    folds: int,
    fit: Callable[[list[dict[str, Any]]], PreferenceScorer],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``K``-fold cross-fitted ``g_hat`` columns: rows of fold ``k`` (``prompt_folds``) are scored by ``fit(rows
    outside fold k)``, one fitted model at a time."""
    fold_of = prompt_folds(rows, folds, seed)
    out: list[dict[str, Any] | None] = [None] * len(rows)
    for k in range(folds):
        held = [i for i, r in enumerate(rows) if fold_of[_prompt_key(r[PROMPT])] == k]
        scored = annotate([rows[i] for i in held], schema, fit(_outside(rows, fold_of, k)))
        for i, r in zip(held, scored):
            out[i] = r
    return [r for r in out if r is not None]


@dataclass
class FoldScorer:
    """A cross-fitted ``g_hat`` as one scorer: a pair whose prompt is in fold ``k`` (``fold_of``) is scored by
    ``scorers[k]``, the model fitted without that fold's rows (``cross_fit_scorer``); a prompt of no fold (new
    data, e.g. an evaluation set) was seen by none of them and gets the mean of their probabilities."""

    scorers: Sequence[PreferenceScorer]
    fold_of: Mapping[str, int]

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> list[float]:
        K = len(self.scorers)
        by_fold: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_fold.setdefault(self.fold_of.get(_prompt_key(prompt), K), []).append(i)
        out = [0.0] * len(prompts)
        for k, idx in sorted(by_fold.items()):
            args = ([prompts[i] for i in idx], [firsts[i] for i in idx], [seconds[i] for i in idx])
            models = [k] if k < K else range(K)
            for m in models:
                values = as_probabilities(f"g_hat of fold {m}", list(self.scorers[m](*args)), (len(idx),), "its pairs")
                for i, v in zip(idx, values):
                    out[i] += float(v) / len(models)
        return out


def cross_fit_scorer(
    rows: Sequence[Mapping[str, Any]],
    folds: int,
    fit: Callable[[list[dict[str, Any]]], PreferenceScorer],
    seed: int = 0,
) -> FoldScorer:
    """The ``K`` models of ``cross_fit`` (``fit(rows outside fold k)``, the folds of ``prompt_folds``) kept as one
    ``FoldScorer``: a response to a row's prompt is judged by a model that never saw that row's label."""
    fold_of = prompt_folds(rows, folds, seed)
    return FoldScorer([fit(_outside(rows, fold_of, k)) for k in range(folds)], fold_of)


def rows_hash(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    """A 16-hex-digit hash of ``rows`` (as JSON) and ``key``: the name of a computation on those rows."""
    h = hashlib.sha256(key.encode())
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:16]


def cached_annotate(
    rows: Sequence[Mapping[str, Any]],
    schema: PreferenceSchema,
    compute: Callable[[], list[dict[str, Any]]],
    cache_dir: str | os.PathLike[str],
    key: str,
) -> list[dict[str, Any]]:
    """``compute()`` once, stored as ``cache_dir/g_hat-<hash>.jsonl``; later calls with the same rows and
    ``key`` (a description of the source) read the file instead."""
    path = Path(cache_dir) / f"g_hat-{rows_hash(rows, key)}.jsonl"
    if path.exists():
        cached = read_rows(path)
        if len(cached) == len(rows):
            return cached
    out = compute()
    check_rows(out, PreferenceSchema(schema.n_ref_pairs, True, schema.n_ref_pairs > 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_jsonl(out, tmp)
    os.replace(tmp, path)
    return out
