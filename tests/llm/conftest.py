"""Shared fixtures of the llm tests (helpers live in ``llm_helpers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from llm_helpers import make_causal_lm, make_reward_model, make_tokenizer  # noqa: E402

# tiny models: one thread is many times faster than a contended pool on a shared 2-core machine
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A saved tiny causal LM + tokenizer folder (the local-path stand-in for a hub checkpoint)."""
    path = tmp_path_factory.mktemp("tiny-lm")
    model = make_causal_lm(tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A saved tiny one-output sequence classifier + tokenizer folder."""
    path = tmp_path_factory.mktemp("tiny-rm")
    model = make_reward_model(tokenizer, seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
