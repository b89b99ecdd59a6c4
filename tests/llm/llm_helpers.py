"""Helpers of the llm tests: a word-level tokenizer, tiny GPT-2 models and generated preference rows.

Nothing is downloaded: the tokenizer is built from a fixed word list, models from a config.
"""

from __future__ import annotations

import random
from typing import Any

import torch

WORDS = (
    "the a cat dog sky sun moon is was blue green red hot cold big small very not and or it this that "
    "what color where why how good bad yes no maybe today night day sea tree bird fish runs sleeps eats "
    "user assistant : ? . ,"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
CONTENT_WORDS = [w for w in WORDS if w not in ("user", "assistant", ":")]


def make_tokenizer(chat: bool = True) -> Any:
    """A word-level fast tokenizer over ``WORDS`` with pad/unk/bos/eos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_causal_lm(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer GPT-2 with hidden size 32 (about 40k parameters)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


def make_reward_model(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer GPT-2 sequence classifier with one output."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2ForSequenceClassification(cfg)


def _sentence(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
    return " ".join(rng.choice(CONTENT_WORDS) for _ in range(rng.randint(lo, hi)))


def make_rows(n: int, n_pairs: int = 1, seed: int = 0, chat: bool = False, preferences: bool = True) -> list[dict]:
    """``n`` preference rows with ``n_pairs`` reference pairs and (optionally) g_hat columns."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _sentence(rng)
        row: dict[str, Any] = {"prompt": prompt, "chosen": _sentence(rng), "rejected": _sentence(rng)}
        for k in range(1, 2 * n_pairs + 1):
            row[f"a_{k}"] = _sentence(rng)
        if preferences:
            p = round(rng.uniform(0.05, 0.95), 3)
            row["chosen_preference"], row["rejected_preference"] = p, round(1 - p, 3)
            for j in range(n_pairs):
                q = round(rng.uniform(0.05, 0.95), 3)
                row[f"a_{2 * j + 1}_preference"], row[f"a_{2 * j + 2}_preference"] = q, round(1 - q, 3)
        if chat:
            row["prompt"] = [{"role": "user", "content": prompt}]
            for key in ["chosen", "rejected"] + [f"a_{k}" for k in range(1, 2 * n_pairs + 1)]:
                row[key] = [{"role": "assistant", "content": row[key]}]
        rows.append(row)
    return rows


def oracle_g(prompt: Any, a: Any, b: Any) -> float:
    """A synthetic g*: the longer response wins with probability 0.8 (0.5 on ties)."""
    la, lb = len(str(a).split()), len(str(b).split())
    return 0.5 if la == lb else (0.8 if la > lb else 0.2)


@torch.no_grad()
def seq_logp(model: Any, prompt: list[int], resp: list[int]) -> float:
    """log pi(resp | prompt) of one unpadded sequence, in float64 (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt + resp])
    logits = model(input_ids=ids).logits[0].double()
    model.train(was_training)
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[len(prompt) - 1 :].sum())
