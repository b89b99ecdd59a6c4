r"""Sampling reference responses ``a_1 .. a_{2M} ~ pi_ref(.|x)`` for every prompt, resumably.

Rows are processed in batches of ``batch_size`` prompts; each batch samples ``2M`` responses per
prompt with one batched ``generate`` call (or vLLM's offline ``LLM.generate`` when installed and
asked for), then is appended to the output JSONL and synced to disk. Batch ``b`` is sampled with the
seed ``seed + b * batch_size`` (its first row), so a run interrupted after any batch and started again
writes the same file as an uninterrupted run; the settings are recorded beside the output
(``OUTPUT.settings.json``) and a resumed run with other settings, or an output without that record, is
refused; a batch whose write was cut short is drawn again. Earlier ``a_k`` and
``a_k_preference`` columns are replaced (new responses invalidate old probabilities).

Draws come from the model's own distribution at the given temperature and truncation: the settings of a
checkpoint's ``generation_config.json`` (a repetition penalty, ...) are not applied. ``min_new_tokens``
(default 1) and the redraw of responses that decode to blank text condition ``pi_ref`` on a non-blank
response, which the data format requires.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.io import atomic_path

from .data import PROMPT, _REF_PREF_RE, _REF_RE, as_response, read_rows, reference_column, write_jsonl
from .models import position_limit
from .tokenization import TokenizeOptions, prompt_token_ids, render_prompt

__all__ = ["GenerationOptions", "sample_tokens", "sample_responses", "generate_references", "vllm_available"]


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings: ``n_pairs`` reference pairs per prompt (``2 n_pairs`` responses)."""

    n_pairs: int = 1
    max_new_tokens: int = 128
    min_new_tokens: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8
    seed: int = 0
    max_prompt_length: int | None = None
    backend: str = "transformers"

    def __post_init__(self) -> None:
        if self.n_pairs < 1:
            raise InputError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise InputError("need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0 (sampling from pi_ref), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("transformers", "vllm", "auto"):
            raise InputError(f"backend: unknown {self.backend!r}; allowed: transformers, vllm, auto")


def vllm_available() -> bool:
    """Whether vLLM can be imported."""
    return importlib.util.find_spec("vllm") is not None


@contextmanager
def _model_distribution(model: torch.nn.Module) -> Iterator[None]:
    """Sample from the model's own next-token distribution (at the options' temperature and truncation): a
    checkpoint's ``generation_config.json`` (a repetition penalty, ``min_p``, ...) would reshape it, and
    ``generate`` fills every setting left unset from it. Draws from ``pi_ref`` and the KL estimate need it
    unshaped, so the model's defaults are blank during the call."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], n: int, options: GenerationOptions, pad_id: int,
    eos_id: int | None,
) -> torch.Tensor:
    """New token ids ``(len(prompt_ids) n, T)`` (pad after the end): ``n`` samples per prompt, the prompts
    left-padded so that generation continues each at the same column, one ``generate`` call from the
    model's own distribution (``_model_distribution``); seed the torch generator before calling."""
    L = max(len(s) for s in prompt_ids)
    limit = position_limit(model)
    if limit is not None and L + options.max_new_tokens > limit:
        raise InputError(f"prompts of up to {L} tokens plus max_new_tokens = {options.max_new_tokens} exceed the "
                         f"model's {limit} positions: lower --max-new-tokens or shorten the prompts")
    ids = torch.full((len(prompt_ids), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), L), dtype=torch.long)
    for i, s in enumerate(prompt_ids):
        ids[i, L - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, L - len(s) :] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _model_distribution(model):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                num_return_sequences=n,
                max_new_tokens=options.max_new_tokens,
                min_new_tokens=options.min_new_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
    finally:
        model.train(was_training)
    return out[:, L:]


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], n: int, options: GenerationOptions, seed: int
) -> list[list[str]]:
    """``n`` sampled continuations (decoded text, special tokens dropped) of each prompt, one ``generate`` call.

    Prompts are tokenised as in training (``prompt_token_ids``) and left-padded; chat prompts go through
    the chat template with the generation prompt.
    """
    tok_opts = TokenizeOptions(max_prompt_length=options.max_prompt_length)
    seqs = [prompt_token_ids(render_prompt(p, tokenizer), tokenizer, tok_opts) for p in prompts]
    torch.manual_seed(seed)
    new = sample_tokens(model, seqs, n, options, tokenizer.pad_token_id, tokenizer.eos_token_id)
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [decoded[i * n : (i + 1) * n] for i in range(len(prompts))]


def _vllm_sampler(
    model_path: str, options: GenerationOptions, tokenizer: Any
) -> Callable[[Sequence[Any], int, int], list[list[str]]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=options.seed)

    def sample(prompts: Sequence[Any], n: int, seed: int) -> list[list[str]]:
        params = SamplingParams(
            n=n,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k or -1,
            max_tokens=options.max_new_tokens,
            min_tokens=options.min_new_tokens,
            seed=seed,
        )
        outs = llm.generate([render_prompt(p, tokenizer) for p in prompts], params)
        return [[c.text for c in o.outputs] for o in outs]

    return sample


_REDRAWS = 5


def _redraw_blank(
    sampler: Callable[[Sequence[Any], int, int], list[list[str]]], prompts: Sequence[Any], samples: list[list[str]],
    n: int, seed: int, first_row: int,
) -> list[list[str]]:
    """``samples`` with every response that decodes to blank text (special tokens only, whitespace) drawn
    again, up to ``_REDRAWS`` times: the data format needs a non-blank response, so the draws are from
    ``pi_ref`` given a non-blank response, as ``min_new_tokens`` already conditions on a non-empty one.
    Redraw ``t`` is seeded ``seed + t``: ``seed`` lies beyond every batch's seed, so resuming redraws alike."""
    samples = [list(texts) for texts in samples]
    for t in range(_REDRAWS):
        rows = [i for i, texts in enumerate(samples) if any(not x.strip() for x in texts)]
        if not rows:
            return samples
        fresh = sampler([prompts[i] for i in rows], n, seed + t)
        for i, new in zip(rows, fresh):
            usable = iter(x for x in new if x.strip())
            samples[i] = [x if x.strip() else next(usable, x) for x in samples[i]]
    i, k = next((i, k) for i, texts in enumerate(samples) for k, x in enumerate(texts) if not x.strip())
    raise InputError(
        f"row {first_row + i + 1}, column {reference_column(k + 1)}: the reference policy gave a blank response "
        f"{_REDRAWS + 1} times (special tokens or whitespace only); raise min_new_tokens or check the tokenizer"
    )


def _resume_point(out: Path, batch_size: int, rows: Sequence[Mapping[str, Any]]) -> int:
    """The rows of an interrupted ``out`` that are kept: its whole batches. A batch the interruption cut short (a
    last line without its newline, fewer rows than a batch) is removed from the file, to be drawn again:
    batches are seeded by their first row, so it comes out the same."""
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    complete = len(lines) - int(bool(lines) and not lines[-1].endswith("\n"))
    whole = complete if complete >= len(rows) else complete - complete % batch_size
    if whole < len(lines):
        with atomic_path(out) as tmp:
            tmp.write_text("".join(lines[:whole]), encoding="utf-8")
    existing = read_rows(out)
    if len(existing) > len(rows):
        raise InputError(f"{out} has {len(existing)} rows but the input has only {len(rows)}: not a partial run "
                         "of this input")
    for i, r in enumerate(existing):
        if r.get(PROMPT) != rows[i].get(PROMPT):
            raise InputError(f"{out}: row {i + 1} has another prompt than the input; not a partial run of this input")
    return len(existing)


def generate_references(
    rows: Sequence[Mapping[str, Any]],
    output: str | os.PathLike[str],
    options: GenerationOptions,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    model_path: str | None = None,
    resume: bool = True,
    max_batches: int | None = None,
) -> int:
    """Write ``rows`` plus ``a_1 .. a_{2M}`` to the JSONL ``output``; return the rows now in the file.

    With ``resume`` an existing ``output`` is continued after its last complete batch (its rows must be
    a prefix of ``rows``, prompt by prompt); without it the file is started afresh. ``max_batches``
    stops after that many new batches (a partial run). vLLM needs ``model_path``.
    """
    if not rows:
        raise InputError("no prompts to generate references for")
    if any(PROMPT not in r or r[PROMPT] in (None, "", []) for r in rows):
        bad = next(i for i, r in enumerate(rows) if PROMPT not in r or r[PROMPT] in (None, "", []))
        raise InputError(f"row {bad + 1}, field 'prompt': missing or empty")
    if tokenizer is None:
        raise InputError("generate_references needs the reference policy's tokenizer")
    out = Path(output)
    use_vllm = options.backend == "vllm" or (options.backend == "auto" and vllm_available() and model_path is not None)
    settings = json.loads(json.dumps({**asdict(options), "backend": "vllm" if use_vllm else "transformers",
                                      "model": model_path}))
    record = out.with_name(out.name + ".settings.json")
    done = 0
    if resume and out.exists():
        if not record.exists():
            raise InputError(f"{out} exists but was not written by generate_references (no {record.name} beside "
                             "it): give another output file, or start afresh (--no-resume) to overwrite it")
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{record}: unreadable ({exc}); start afresh (--no-resume)") from None
        changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                   if old.get(k) != settings.get(k)]
        if changed:
            raise InputError(f"{out} was started with other settings ({'; '.join(changed)}): resume with those, "
                             "or start afresh (--no-resume)")
        done = _resume_point(out, options.batch_size, rows)
    elif out.exists():
        out.unlink()
    with atomic_path(record) as tmp:  # what the rows were drawn with, checked when a run resumes
        tmp.write_text(json.dumps(settings, indent=1))
    if use_vllm:
        if model_path is None:
            raise InputError("backend vllm needs model_path (a hub name or folder)")
        if not vllm_available():
            raise InputError("backend vllm asked for but vLLM is not installed (pip install vllm)")
        sampler = _vllm_sampler(model_path, options, tokenizer)
    else:
        if model is None:
            raise InputError("generate_references needs the reference policy (model)")

        def sampler(prompts: Sequence[Any], n: int, seed: int) -> list[list[str]]:
            return sample_responses(model, tokenizer, prompts, n, options, seed)

    n_resp = 2 * options.n_pairs
    batches = 0
    for start in range(done, len(rows), options.batch_size):
        if max_batches is not None and batches >= max_batches:
            break
        chunk = rows[start : start + options.batch_size]
        prompts = [r[PROMPT] for r in chunk]
        samples = sampler(prompts, n_resp, options.seed + start)
        redraw_seed = options.seed + len(rows) + start * _REDRAWS
        samples = _redraw_blank(sampler, prompts, samples, n_resp, redraw_seed, start)
        new_rows = []
        for r, texts in zip(chunk, samples):
            row = {k: v for k, v in r.items() if not (_REF_RE.match(k) or _REF_PREF_RE.match(k))}
            for k, text in enumerate(texts, start=1):
                row[reference_column(k)] = as_response(r[PROMPT], text)
            new_rows.append(row)
        write_jsonl(new_rows, out, append=True)
        done += len(chunk)
        batches += 1
    return done
