"""Loading tokenizers, policies and reward models (hub name or local folder), and LoRA via peft.

Weights load from safetensors only (``use_safetensors=True``) and remote code runs only when asked
(``trust_remote_code``). A missing pad token is set to EOS for causal LMs; reward models get the pad
id in their config so the score is read at the last non-padding token.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from robust_rlhf.theory.errors import InputError

__all__ = [
    "resolve_dtype",
    "load_tokenizer",
    "load_causal_lm",
    "load_reward_model",
    "apply_lora",
    "is_peft_model",
    "disabled_adapter",
    "disable_dropout",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's dtype)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise InputError(f"dtype: unknown {name!r}; allowed: {', '.join(_DTYPES)}") from None


def _load(fn: Any, name: str, what: str, **kwargs: Any) -> Any:
    """``fn(name)``; a path that is no folder, or a folder without the files, is an ``InputError`` naming it."""
    folder = os.path.expanduser(name)
    if (os.path.isabs(folder) or name.startswith((".", "~"))) and not os.path.isdir(folder):
        raise InputError(f"cannot load the {what} {name!r}: no such folder")
    try:
        return fn(name, **kwargs)
    except (OSError, ValueError) as exc:  # a missing file; a folder of another kind, or a malformed hub name
        raise InputError(f"cannot load the {what} {name!r}: {exc}".splitlines()[0]) from None


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained``; sets ``pad_token = eos_token`` when the tokenizer has no pad token."""
    from transformers import AutoTokenizer

    tok = _load(
        AutoTokenizer.from_pretrained, name_or_path, "tokenizer", revision=revision, trust_remote_code=trust_remote_code
    )
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise InputError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with safetensors weights."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype),
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return _load(AutoModelForCausalLM.from_pretrained, name_or_path, "causal LM", **kwargs)


def load_reward_model(
    name_or_path: str,
    pad_token_id: int | None,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """``AutoModelForSequenceClassification`` with one output (a new score head on a causal LM checkpoint)."""
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype),
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
        "num_labels": 1,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _load(AutoModelForSequenceClassification.from_pretrained, name_or_path, "reward model", **kwargs)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.num_labels != 1:
        raise InputError(f"reward model {name_or_path!r} has {model.config.num_labels} outputs; need 1")
    return model


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    task_type: str = "CAUSAL_LM",
) -> nn.Module:
    """Wrap ``model`` in a peft LoRA adapter (``target_modules`` default ``all-linear``).

    For reward models (``task_type="SEQ_CLS"``) the score head is trained in full (``modules_to_save``).
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise InputError(f"lora_r must be >= 1, got {r}")
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or "all-linear",
        task_type=task_type,
        bias="none",
    )
    return get_peft_model(model, cfg)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (has ``disable_adapter``)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is in the llm extra
        return False
    return isinstance(model, PeftModel)


@contextmanager
def disabled_adapter(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model (the LoRA reference); a no-op for a model without adapters."""
    ctx = model.disable_adapter() if is_peft_model(model) else nullcontext()
    with ctx:
        yield


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (deterministic margins, as TRL's DPO does by default): the
    ``nn.Dropout`` modules and the float rates that attention modules pass to SDPA (``attention_dropout`` of
    Llama, Qwen, Mistral, ...). The config is left as it is, so a saved model keeps its rates."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def position_limit(model: nn.Module) -> int | None:
    """The number of positions a model with learned or bounded positions accepts (None: not stated)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def check_length(model: nn.Module, length: int, what: str) -> None:
    """Raise ``InputError`` when sequences of ``length`` tokens exceed ``model``'s positions (``what``: which)."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise InputError(f"{what} reach {length} tokens, beyond the model's {limit} positions: shorten them "
                         "(max_prompt_length, max_completion_length) or use a model with more positions")
