r"""True rewards of the synthetic task: offline scorers of a response, returning reward components ``phi``.

A true reward maps ``(prompts, responses)`` to an ``(n, d)`` array of components ``phi(x, y)``; the
preference scenarios (``scenarios``) turn them into ``g*(x, a, b)`` with the links of
``robust_rlhf.simulate.preferences``, exactly as the linear simulator does with its features. The
component ``primary`` is *the* true reward ``r*(x, y)`` that evaluation reports as ``mean_reward``.

* ``VaderReward``: the VADER sentiment scores of the response (``vaderSentiment``; ``compound`` in
  ``[-1, 1]`` by default, or any of ``compound``, ``pos``, ``neg``, ``neu``);
* ``ClassifierReward``: a local or hub sequence classifier (a neural sentiment oracle such as a
  DistilBERT fine-tuned on IMDb): the logit (or probability) of one label;
* ``CallableReward``: any Python function ``f(prompts, responses) -> (n,) or (n, d)``.

``get_reward("vader")``, ``get_reward("vader:compound,pos")``, ``get_reward("classifier:PATH[@LABEL]")``,
``get_reward("module:function")`` build them from a string (the configs and the command line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from robust_rlhf.theory.errors import InputError

__all__ = ["TrueReward", "VaderReward", "ClassifierReward", "CallableReward", "get_reward", "VADER_FIELDS"]

VADER_FIELDS = ("compound", "pos", "neg", "neu")


class TrueReward(Protocol):
    """``reward.components(prompts, responses) -> (n, d)``; ``names`` label the ``d`` columns."""

    names: tuple[str, ...]
    primary: int

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):  # chat messages: score the assistant turns
        return " ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    raise InputError(f"true reward: expected text or chat messages, got {type(value).__name__}")


@dataclass
class VaderReward:
    """VADER scores of the response text (``fields`` picks the components; ``compound`` is primary)."""

    fields: tuple[str, ...] = ("compound",)
    include_prompt: bool = False
    primary: int = 0
    _analyzer: Any = field(default=None, init=False, repr=False)
    _memo: dict[str, tuple[float, ...]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        bad = [f for f in self.fields if f not in VADER_FIELDS]
        if not self.fields or bad:
            raise InputError(f"vader fields: unknown {bad or 'none'}; allowed: {', '.join(VADER_FIELDS)}")
        if not 0 <= self.primary < len(self.fields):
            raise InputError(f"primary component {self.primary} out of range for {len(self.fields)} fields")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise InputError(
                "the VADER true reward needs vaderSentiment (pip install vaderSentiment, in the llm extra)"
            ) from None
        self._analyzer = SentimentIntensityAnalyzer()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"vader_{f}" for f in self.fields)

    def _score(self, text: str) -> tuple[float, ...]:
        hit = self._memo.get(text)
        if hit is None:
            s = self._analyzer.polarity_scores(text)
            hit = tuple(float(s[f]) for f in self.fields)
            self._memo[text] = hit
        return hit

    def components(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
        """``(n, len(fields))`` VADER scores of each response (of prompt + response with ``include_prompt``)."""
        if len(prompts) != len(responses):
            raise InputError(f"true reward: {len(prompts)} prompts but {len(responses)} responses")
        texts = [
            (_text(p) + _text(y)) if self.include_prompt else _text(y) for p, y in zip(prompts, responses)
        ]
        return np.array([self._score(t) for t in texts], dtype=np.float64).reshape(len(texts), len(self.fields))


@dataclass
class ClassifierReward:
    """The logit (``kind="logit"``) or softmax probability (``"prob"``) of ``label`` from a sequence classifier.

    ``label`` is an index or a name of ``config.id2label`` (``POSITIVE`` by default when present, else
    the last label). Scores ``prompt + response`` by default (IMDb-style continuations).
    """

    model_name_or_path: str
    label: str | int | None = None
    kind: str = "logit"
    include_prompt: bool = True
    batch_size: int = 32
    device: str | None = None
    max_length: int = 512
    primary: int = 0
    _model: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _index: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self.kind not in ("logit", "prob"):
            raise InputError(f"classifier reward kind: unknown {self.kind!r}; allowed: logit, prob")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
            self._model = AutoModelForSequenceClassification.from_pretrained(self.model_name_or_path)
        except OSError as exc:
            raise InputError(f"cannot load the reward classifier {self.model_name_or_path!r}: {exc}".splitlines()[0]) from None
        self._model.eval()
        if self.device:
            self._model.to(self.device)
        id2label = {int(k): str(v) for k, v in self._model.config.id2label.items()}
        n = self._model.config.num_labels
        if self.label is None:
            names = {v.upper(): k for k, v in id2label.items()}
            self._index = names.get("POSITIVE", n - 1)
        elif isinstance(self.label, int) or str(self.label).isdigit():
            self._index = int(self.label)
        else:
            matches = [k for k, v in id2label.items() if v == self.label]
            if not matches:
                raise InputError(f"classifier reward: no label {self.label!r}; labels: {', '.join(id2label.values())}")
            self._index = matches[0]
        if not 0 <= self._index < n:
            raise InputError(f"classifier reward: label index {self._index} out of range for {n} labels")

    @property
    def names(self) -> tuple[str, ...]:
        return (f"classifier_{self.kind}",)

    def components(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
        import torch

        texts = [(_text(p) + _text(y)) if self.include_prompt else _text(y) for p, y in zip(prompts, responses)]
        out: list[float] = []
        device = next(self._model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self._tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                logits = self._model(**enc).logits.float()
                values = logits.softmax(-1)[:, self._index] if self.kind == "prob" else logits[:, self._index]
                out.extend(values.cpu().tolist())
        return np.asarray(out, dtype=np.float64).reshape(len(texts), 1)


@dataclass
class CallableReward:
    """``fn(prompts, responses) -> (n,) or (n, d)`` numbers; ``names`` default to ``r0, r1, ...``."""

    fn: Callable[[Sequence[Any], Sequence[Any]], Any]
    names: tuple[str, ...] = ()
    primary: int = 0

    def components(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
        values = np.asarray(self.fn(list(prompts), list(responses)), dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[0] != len(prompts):
            raise InputError(f"true reward callable returned shape {values.shape} for {len(prompts)} responses")
        if not np.isfinite(values).all():
            raise InputError("true reward callable returned a non-finite value")
        if not self.names:
            self.names = tuple(f"r{k}" for k in range(values.shape[1]))
        return values


def get_reward(spec: str) -> TrueReward:
    """A true reward from its name: ``vader[:fields]``, ``classifier:PATH[@LABEL]`` or ``module:function``."""
    if not isinstance(spec, str) or not spec:
        raise InputError(f"reward: expected a name such as 'vader', got {spec!r}")
    head, _, rest = spec.partition(":")
    if head == "vader":
        fields = tuple(f.strip() for f in rest.split(",") if f.strip()) or ("compound",)
        return VaderReward(fields=fields)
    if head == "classifier":
        if not rest:
            raise InputError("reward classifier:PATH needs the classifier's folder or hub name")
        path, _, label = rest.partition("@")
        return ClassifierReward(path, label=label or None)
    if ":" in spec:
        from robust_rlhf.theory.io import load_callable

        return CallableReward(load_callable(spec, name="reward"))
    raise InputError(f"reward: unknown {spec!r}; use vader, vader:FIELDS, classifier:PATH[@LABEL] or module:function")
