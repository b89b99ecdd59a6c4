r"""The reference policy of the synthetic task: a tiny GPT-2 pre-trained on the corpus, cached by config hash.

The model is built from ``ModelConfig`` (``transformers.GPT2Config``) and trained by next-token
maximum likelihood on ``<s> text </s>`` for every training text (truncated to ``max_length`` tokens),
with AdamW, linear warm-up and cosine decay, in mini-batches drawn with a seeded generator:

    minimise  - (1/T) sum_t log p_theta(w_t | w_{<t})   over the non-padding tokens of the batch.

The result (``save_pretrained``: safetensors weights, config, tokenizer, ``pretrain.json`` with the
loss curve and the held-out loss) lives in ``<cache>/reference-<hash>``, where the hash covers the
corpus fingerprint, the tokenizer, the model and the training configs and the seed: a later run or a
test with the same configs loads it instead of training again.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robust_rlhf.theory.errors import InputError

from ..tokenization import right_pad
from .cache import cached_folder

__all__ = ["ModelConfig", "PretrainConfig", "build_model", "pretrain", "pretrained_reference", "heldout_loss"]


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-2-style causal LM (``n_positions`` tokens of context)."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_embd, self.n_head, self.n_positions) < 1:
            raise InputError("model: n_layer, n_embd, n_head and n_positions must be >= 1")
        if self.n_embd % self.n_head:
            raise InputError(f"model: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


@dataclass(frozen=True)
class PretrainConfig:
    """Next-token pre-training: ``steps`` AdamW steps of ``batch_size`` texts, each cut to ``max_length`` tokens."""

    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise InputError("pretrain: need steps >= 1, batch_size >= 1, max_length >= 2")
        if not self.learning_rate > 0 or self.warmup_steps < 0:
            raise InputError("pretrain: need learning_rate > 0 and warmup_steps >= 0")


def build_model(config: ModelConfig, tokenizer: Any, seed: int = 0) -> Any:
    """A freshly initialised ``GPT2LMHeadModel`` over the tokenizer's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


def _encode(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [([tokenizer.bos_token_id] + x + [tokenizer.eos_token_id])[:max_length] for x in ids]


def _batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = right_pad(seqs, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def heldout_loss(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 64) -> float:
    """Mean next-token negative log-likelihood (nats per token) of ``texts`` under ``model``."""
    model.eval()
    seqs = _encode(texts, tokenizer, max_length)
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        b = _batch(seqs[start : start + batch_size], tokenizer.pad_token_id)
        n = int((b["labels"][:, 1:] != -100).sum())
        total += float(model(**b).loss) * n
        count += n
    return total / max(count, 1)


def pretrain(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    config: PretrainConfig,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train ``model`` in place (see the module docstring); returns the training loss every 50 steps."""
    if len(texts) < 2:
        raise InputError("pre-training needs at least 2 texts")
    seqs = _encode(texts, tokenizer, config.max_length)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    curve: list[float] = []
    running = 0.0
    for step in range(config.steps):
        idx = torch.randint(len(seqs), (config.batch_size,), generator=gen).tolist()
        loss = model(**_batch([seqs[i] for i in idx], tokenizer.pad_token_id)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            k = (step % 50) + 1
            curve.append(running / k)
            running = 0.0
            if log is not None:
                log(f"pre-training step {step + 1}/{config.steps}: loss {curve[-1]:.3f}")
    model.eval()
    return curve


def pretrained_reference(
    texts: Sequence[str],
    heldout: Sequence[str],
    tokenizer: Any,
    tokenizer_folder: str | os.PathLike[str],
    model_config: ModelConfig,
    pretrain_config: PretrainConfig,
    cache_dir: str | os.PathLike[str],
    corpus_fingerprint: str,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Folder of the pre-trained reference (model + tokenizer + ``pretrain.json``), built once per config."""
    key = {
        "corpus": corpus_fingerprint,
        "n_texts": len(texts),
        "tokenizer": Path(tokenizer_folder).name,
        "model": asdict(model_config),
        "pretrain": asdict(pretrain_config),
    }

    def build(folder: Path) -> None:
        start = time.perf_counter()
        model = build_model(model_config, tokenizer, seed=pretrain_config.seed)
        curve = pretrain(model, tokenizer, texts, pretrain_config, log)
        info = {
            "train_loss_every_50_steps": curve,
            "heldout_loss": heldout_loss(model, tokenizer, list(heldout)[:512], pretrain_config.max_length),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - start,
            "torch_threads": torch.get_num_threads(),
        }
        import transformers

        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        (folder / "pretrain.json").write_text(json.dumps(info, indent=1))

    return cached_folder(cache_dir, "reference", key, build)
