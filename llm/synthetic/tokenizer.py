"""A byte-level BPE tokenizer trained on the corpus (``tokenizers``), cached on disk by config hash.

Byte-level: every string round-trips through ``encode``/``decode`` and nothing is ever unknown. The
vocabulary is the 256 byte symbols, the special tokens ``<pad>``, ``<s>``, ``</s>`` and merges up to
``vocab_size``. Returned as a ``transformers.PreTrainedTokenizerFast`` with ``pad``, ``bos`` and
``eos`` set, saved with ``save_pretrained`` (so ``AutoTokenizer.from_pretrained`` loads it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robust_rlhf.theory.errors import InputError

from .cache import cached_folder

__all__ = ["SPECIAL_TOKENS", "MAX_VOCAB", "train_bpe_tokenizer", "build_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
#: the task's vocabulary limit (a tiny model's embedding must stay small)
MAX_VOCAB = 2048


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE with ``vocab_size`` entries (specials and the 256 bytes included) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(SPECIAL_TOKENS)
    if not floor < vocab_size <= MAX_VOCAB:
        raise InputError(f"tokenizer.vocab_size must lie in ({floor}, {MAX_VOCAB}], got {vocab_size}")
    if not texts:
        raise InputError("cannot train a tokenizer on an empty corpus")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(texts), trainer=trainer)
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, bos_token=bos, eos_token=eos)


def build_tokenizer(
    texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike[str], corpus_fingerprint: str
) -> tuple[Any, Path]:
    """``(tokenizer, folder)``: trained once per (corpus, vocab size) and loaded from the cache afterwards."""
    from transformers import AutoTokenizer

    key = {"kind": "bpe-bytelevel", "corpus": corpus_fingerprint, "vocab_size": vocab_size, "n_texts": len(texts)}

    def build(folder: Path) -> None:
        train_bpe_tokenizer(texts, vocab_size).save_pretrained(folder)

    folder = cached_folder(cache_dir, "tokenizer", key, build)
    return AutoTokenizer.from_pretrained(folder), folder
