r"""Tokenised batches: every response of a row after its prompt, in one padded tensor.

A row with ``K = 2 + 2M`` responses (chosen, rejected, ``a_1 .. a_{2M}``) becomes ``K`` sequences
``prompt_ids + response_ids``. A batch of ``B`` rows is stacked response-major: sequence ``k * B + i``
is response ``k`` of row ``i``, so one forward pass scores every response, and ``reshape(K, B)`` of the
per-sequence scores gives chosen ``[0]``, rejected ``[1]`` and reference response ``2 + t`` at ``[2 + t]``.

Chat rows (lists of messages) are rendered with the tokenizer's chat template: the prompt with the
generation prompt appended, the response as the rest of ``template(prompt + response)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from robust_rlhf.theory.errors import InputError

from .data import CHOSEN, CHOSEN_PREF, PROMPT, REF_LOGPS, REJECTED, PreferenceSchema, preference_column

__all__ = [
    "TokenizeOptions",
    "render_prompt",
    "render_example",
    "prompt_token_ids",
    "tokenize_example",
    "tokenize_dataset",
    "PreferenceCollator",
    "pad_completions",
    "REF_LOGPS",
]

@dataclass(frozen=True)
class TokenizeOptions:
    """``max_prompt_length`` keeps the prompt's last tokens, ``max_completion_length`` a response's first.

    ``add_bos``: put the tokenizer's BOS token before the prompt when it is not already there;
    ``add_eos``: end every response with EOS (the policy learns to stop; off for reward models, whose
    score is read at the last non-padding token); ``allow_empty``: a response may tokenise to no tokens (a
    generated one that ended at once, which a reward model scores as the prompt alone); otherwise an error.
    """

    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    allow_empty: bool = False

    def __post_init__(self) -> None:
        for name in ("max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"{name} must be >= 1 or None, got {v}")


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences as ``(input_ids, attention_mask)`` ``(N, L)``, padded on the right with ``pad_id`` to
    ``length`` (default: the longest)."""
    L = max(len(s) for s in seqs) if length is None else length
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_completions(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                    length: int | None = None) -> dict[str, torch.Tensor]:
    """The sequences ``prompt + response`` right-padded (``right_pad``) as ``input_ids``, ``attention_mask`` and
    ``completion_mask`` (1 on the response tokens), ``(N, L)``."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    input_ids, attention = right_pad(seqs, pad_id, length)
    completion = torch.zeros_like(attention)
    for k, (p, s) in enumerate(zip(prompts, seqs)):
        completion[k, len(p) : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def render_prompt(prompt: str | Sequence[Mapping[str, str]], tokenizer: Any) -> str:
    """The prompt as text: itself, or the chat template with the generation prompt appended."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("chat-format data needs a tokenizer with a chat template (tokenizer.chat_template is unset)")
    return _chat_template(tokenizer, list(prompt), add_generation_prompt=True)


def _chat_template(tokenizer: Any, messages: list[Any], add_generation_prompt: bool = False) -> str:
    """``apply_chat_template`` as text; a template that refuses the messages (a role it does not know, an
    order it forbids) is an ``InputError`` with its own message."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's TemplateError, and whatever a template raises through raise_exception
        roles = [m.get("role") if isinstance(m, Mapping) else type(m).__name__ for m in messages]
        raise InputError(f"the tokenizer's chat template refused messages with roles {roles}: "
                         f"{type(exc).__name__}: {exc}") from None


def render_example(example: Mapping[str, Any], tokenizer: Any, columns: Sequence[str]) -> tuple[str, list[str]]:
    """``(prompt_text, [response_text for each column])``; a chat response is what its turn adds to the template."""
    prompt = example[PROMPT]
    prompt_text = render_prompt(prompt, tokenizer)
    responses: list[str] = []
    for col in columns:
        value = example[col]
        if isinstance(value, str):
            responses.append(value)
            continue
        full = _chat_template(tokenizer, list(prompt) + list(value))
        if not full.startswith(prompt_text):
            raise InputError(
                f"column {col}: the chat template of prompt + response does not start with the template of the "
                "prompt alone, so the response cannot be separated from the prompt"
            )
        responses.append(full[len(prompt_text) :])
    return prompt_text, responses


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_token_ids(prompt_text: str, tokenizer: Any, options: TokenizeOptions) -> list[int]:
    """Token ids of a rendered prompt: BOS first (once) if asked, then the last ids, ``max_prompt_length`` in
    all; a leading BOS is kept through the truncation (the model was trained with it)."""
    prompt_ids = _ids(tokenizer, prompt_text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if options.add_bos and bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos] + prompt_ids
    limit = options.max_prompt_length
    if limit is not None and len(prompt_ids) > limit:
        keep = 1 if bos is not None and prompt_ids[0] == bos else 0
        prompt_ids = prompt_ids[:keep] + (prompt_ids[len(prompt_ids) - (limit - keep) :] if limit > keep else [])
    return prompt_ids


def tokenize_example(
    example: Mapping[str, Any], tokenizer: Any, columns: Sequence[str], options: TokenizeOptions
) -> dict[str, list[int]]:
    """``prompt_input_ids`` and ``{column}_input_ids`` for every response column."""
    prompt_text, responses = render_example(example, tokenizer, columns)
    out = {"prompt_input_ids": prompt_token_ids(prompt_text, tokenizer, options)}
    eos = getattr(tokenizer, "eos_token_id", None)
    for col, text in zip(columns, responses):
        ids = _ids(tokenizer, text)
        if options.add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        if options.max_completion_length is not None:
            ids = ids[: options.max_completion_length]
        if not ids and not options.allow_empty:
            raise InputError(f"column {col}: a response tokenises to no tokens")
        out[f"{col}_input_ids"] = ids
    return out


def tokenize_dataset(dataset: Any, tokenizer: Any, schema: PreferenceSchema, options: TokenizeOptions,
                     keep_text: bool = False):
    """Tokenise a validated ``datasets.Dataset``; keeps the probability columns and ``ref_logps`` if present, and
    with ``keep_text`` the ``prompt``, ``chosen`` and ``rejected`` texts (which DRPO's judge reads)."""
    columns = schema.response_columns
    keep = set(schema.preference_columns) | {REF_LOGPS} | ({PROMPT, CHOSEN, REJECTED} if keep_text else set())
    remove = [c for c in dataset.column_names if c not in keep]

    def fn(example: Mapping[str, Any]) -> dict[str, list[int]]:
        return tokenize_example(example, tokenizer, columns, options)

    return dataset.map(fn, remove_columns=remove, desc="tokenising")


@dataclass
class PreferenceCollator:
    """Pads a list of tokenised rows into the response-major batch described in the module docstring.

    Returns ``input_ids`` and ``attention_mask`` ``(K B, L)``, ``completion_mask`` (1 on response tokens),
    ``orientation`` ``(B,)`` (``+1`` when the chosen response's token ids sort before the rejected one's,
    else ``-1``: an order of the labelled pair that does not depend on the label), and when present ``g`` ``(B,)``, ``ref_g`` ``(B, M)`` (from the probability columns) and
    ``ref_logps`` ``(B, K)``. ``pad_to_multiple_of`` rounds ``L`` up (tensor cores).
    """

    pad_token_id: int
    schema: PreferenceSchema
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise InputError("empty batch")
        columns = self.schema.response_columns
        prompts: list[list[int]] = []
        responses: list[list[int]] = []
        for col in columns:
            key = f"{col}_input_ids"
            for ex in examples:
                if key not in ex:
                    raise InputError(f"batch: a row has no {key}; was the data set tokenised with this schema?")
                prompts.append(list(ex["prompt_input_ids"]))
                responses.append(list(ex[key]))
        L = max(len(p) + len(r) for p, r in zip(prompts, responses))
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = pad_completions(prompts, responses, self.pad_token_id, L)
        if self.schema.labelled_preferences and CHOSEN_PREF in examples[0]:
            batch["g"] = torch.tensor([float(ex[CHOSEN_PREF]) for ex in examples], dtype=torch.float32)
        if self.schema.reference_preferences and preference_column("a_1") in examples[0]:
            firsts = [first for first, _ in self.schema.reference_pairs]
            batch["ref_g"] = torch.tensor(
                [[float(ex[preference_column(c)]) for c in firsts] for ex in examples], dtype=torch.float32
            )
        # a label-independent order of the labelled pair: +1 when the chosen ids sort first (lambda_target
        # oriented_shift); a function of the unordered pair, so it carries no information about the label
        batch["orientation"] = torch.tensor(
            [1.0 if list(ex["chosen_input_ids"]) <= list(ex["rejected_input_ids"]) else -1.0 for ex in examples],
            dtype=torch.float32,
        )
        if REF_LOGPS in examples[0] and examples[0][REF_LOGPS] is not None:
            batch[REF_LOGPS] = torch.tensor([list(ex[REF_LOGPS]) for ex in examples], dtype=torch.float32)
        return batch
