r"""Experiment configurations and the named presets (``robust-rlhf experiment --preset NAME``).

An ``ExperimentConfig`` fixes everything a run does: the text (``corpus``), the reference policy (a
tiny GPT-2 pre-trained here, or a checkpoint), the true reward, the preference scenarios, the methods
(``MethodSpec``), the seeds, the budgets and the evaluation. Every method of a (scenario, seed) trains
on the same labelled pairs with the same optimiser budget (epochs, batch size, learning rate); VRPO
additionally sees ``M`` reference pairs per labelled prompt, DRPO draws responses from the policy while it
trains and has them judged by reward models cross-fitted on the labelled pairs (each row's by the model that
did not see it), and the two-stage pipeline spends its budget on a reward model.

Presets:

* ``test``: the pipeline end to end in well under two minutes on two cores (the test suite's run); checks
  the plumbing, not the statistics.
* ``tiny-cpu``: the statistical run on two CPU cores (9 minutes measured, the reference pre-training
  included; see the README), on generated review-like sentences, where the reference's samples carry
  sentiment words often enough for a few hundred labelled pairs to teach DPO something.
* ``tiny-cpu-diagnostic``: ``M`` up to 16 and 5 seeds: which condition limits VRPO's gain.
* ``tiny-cpu-drpo``: online DRPO (its draws judged by cross-fitted reward models) against DPO and VRPO
  on tiny-cpu's task (3.5 minutes measured with the reference cached; its pre-training takes 26 s more).
* ``tiny-cpu-fortunes``: the same on Debian's fortunes (real short English). Their continuations are
  neutral for VADER two times in three, so it needs more pairs (1024) and sharper labels to learn at all.
* ``gpu-small``: IMDb-style sentiment continuation from a real checkpoint (``lvwerra/gpt2-imdb``)
  with a neural sentiment oracle (``lvwerra/distilbert-imdb``). Not run here: the runtime is an estimate.
* ``gpu-hh``: Anthropic HH (``trl-lib/hh-rlhf-helpful-base``), human labels, reference pairs from an
  instruction-tuned 0.5B model, evaluation by a reward-model judge. Not run here: the runtime is an estimate.

``override(config, ["key=value", "pretrain.steps=100", ...])`` changes fields (values read as YAML).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from robust_rlhf.theory.errors import InputError

from .corpus import CorpusConfig
from .reference_model import ModelConfig, PretrainConfig

__all__ = [
    "METHOD_KINDS",
    "G_HATS",
    "DATA_MODES",
    "MethodSpec",
    "ExperimentConfig",
    "PRESETS",
    "get_preset",
    "override",
    "config_from_dict",
]

METHOD_KINDS = ("reference", "policy", "best_of_n")
#: where VRPO's g_hat comes from: the scenario's g* (oracle), a cross-fitted reward model fitted on the
#: labelled pairs (BT-shaped, learned), or the uninformative constant 1/2
G_HATS = ("oracle", "reward_model", "constant")
#: ``synthetic``: labels drawn from the true reward through a scenario; ``dataset``: a preference data
#: set's own (human) labels
DATA_MODES = ("synthetic", "dataset")


@dataclass(frozen=True)
class MethodSpec:
    """One compared method. ``kind``: the reference itself, a one-stage policy, or best-of-``n`` from a reward model.

    For ``policy``: ``method`` is a ``PreferenceObjective`` method or alias (``dpo``, ``vrpo``,
    ``vrpo_tuned``, ``cdpo``, ``rdpo``, ``ipo``, ``hinge``) or ``drpo`` (online DRPO, ``DRPOTrainer``: ``samples``
    draws per row and step, judged by reward models cross-fitted on the labelled pairs, so ``g_hat`` must be
    ``reward_model``; ``pi_hat`` is the reference policy, which wrote the data), ``loss`` its margin loss, ``M`` the
    reference pairs per prompt (VRPO only), ``g_hat`` in ``G_HATS``, ``lam``/``eps``/``lambda_target`` as in the
    trainer.
    """

    name: str
    kind: str = "policy"
    method: str = "dpo"
    loss: str | None = None
    M: int = 0
    g_hat: str = "oracle"
    lam: float = 1.0
    eps: float = 0.0
    lambda_target: str = "loss"
    n: int = 4
    samples: int = 2

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise InputError(f"method name must be non-empty without '/', got {self.name!r}")
        if self.kind not in METHOD_KINDS:
            raise InputError(f"method {self.name}: kind {self.kind!r} unknown; allowed: {', '.join(METHOD_KINDS)}")
        if self.g_hat not in G_HATS:
            raise InputError(f"method {self.name}: g_hat {self.g_hat!r} unknown; allowed: {', '.join(G_HATS)}")
        uses_cv = self.method in ("vrpo", "vrpo_tuned")
        if self.kind == "policy" and uses_cv and self.M < 1:
            raise InputError(f"method {self.name}: {self.method} needs M >= 1 reference pairs")
        if self.kind == "policy" and not uses_cv and self.M:
            raise InputError(f"method {self.name}: M applies to vrpo/vrpo_tuned only")
        if self.kind == "best_of_n" and self.n < 1:
            raise InputError(f"method {self.name}: best-of-n needs n >= 1")
        if self.online:
            if self.g_hat != "reward_model":
                raise InputError(f"method {self.name}: drpo's judge is a reward model cross-fitted on the labelled "
                                 f"pairs: set g_hat: reward_model (got {self.g_hat!r})")
            if self.loss is not None:
                raise InputError(f"method {self.name}: drpo has its own loss; leave loss unset")
            if self.samples < 1:
                raise InputError(f"method {self.name}: drpo needs samples >= 1 draws per row and step")

    @property
    def uses_control_variate(self) -> bool:
        return self.kind == "policy" and self.method in ("vrpo", "vrpo_tuned")

    @property
    def online(self) -> bool:
        """Online DRPO: draws from the policy while training, judged by reward models cross-fitted on the labelled
        pairs."""
        return self.kind == "policy" and self.method == "drpo"


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment (see the module docstring); ``baseline`` names the method every other is compared with."""

    name: str
    description: str = ""
    data: str = "synthetic"
    corpus: CorpusConfig = CorpusConfig()
    preference_data: str | None = None
    vocab_size: int = 1024
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    reference_model: str | None = None
    reward: str | None = "vader"
    scenarios: tuple[str, ...] = ("bt", "annotator_mixture", "label_flip")
    sharpness: float = 4.0
    methods: tuple[MethodSpec, ...] = ()
    baseline: str = "dpo"
    seeds: tuple[int, ...] = (0, 1, 2)
    prompt_words: int = 3
    n_train: int = 256
    n_eval: int = 200
    heldout_texts: int = 1000
    max_new_tokens: int = 24
    generation_batch_size: int = 64
    beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: float = 2.0
    batch_size: int = 16
    rm_learning_rate: float = 1e-3
    rm_epochs: float = 2.0
    training_overrides: Mapping[str, Any] = field(default_factory=dict)
    judge: str = "oracle"
    ci: str = "wilson"
    threads: int | None = 1
    estimated_minutes: float | None = None
    runtime_measured: bool = False

    def __post_init__(self) -> None:
        if self.data not in DATA_MODES:
            raise InputError(f"data: unknown {self.data!r}; allowed: {', '.join(DATA_MODES)}")
        if self.data == "dataset" and not self.preference_data:
            raise InputError("data=dataset needs preference_data (a TRL preference file, folder or hub name)")
        if self.data == "synthetic" and not self.reward:
            raise InputError("data=synthetic needs a true reward (reward: vader, classifier:PATH, ...)")
        if self.data == "synthetic" and not self.scenarios:
            raise InputError("scenarios: need at least one")
        if self.data == "synthetic":
            from .scenarios import TEXT_SCENARIOS

            unknown = [s for s in self.scenarios if s not in TEXT_SCENARIOS]
            if unknown:
                raise InputError(f"scenarios: unknown {', '.join(map(repr, unknown))}; allowed: "
                                 f"{', '.join(TEXT_SCENARIOS)}")
        if not self.methods:
            raise InputError("methods: need at least one")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise InputError(f"methods: duplicate names in {names}")
        if self.baseline not in names:
            raise InputError(f"baseline {self.baseline!r} is not one of the methods ({', '.join(names)})")
        if "reference" not in [m.kind for m in self.methods]:
            raise InputError("methods: need the reference (kind: reference) to compare with")
        if isinstance(self.seeds, (str, bytes)) or not isinstance(self.seeds, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds
        ):
            raise InputError(f"seeds: need a list of integers >= 0, got {self.seeds!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"seeds: need distinct seeds, got {self.seeds}")
        for name in ("n_train", "n_eval", "max_new_tokens", "generation_batch_size", "batch_size", "prompt_words"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.judge not in ("oracle", "true_reward") and not self.judge.startswith("reward_model:"):
            raise InputError(f"judge: unknown {self.judge!r}; allowed: oracle, true_reward, reward_model:PATH")
        if self.data == "dataset" and self.judge in ("oracle", "true_reward"):
            raise InputError("data=dataset has no true reward: use judge reward_model:PATH")
        if self.ci not in ("wilson", "bootstrap"):
            raise InputError(f"ci: unknown {self.ci!r}; allowed: wilson, bootstrap")
        if not self.beta > 0 or not self.learning_rate > 0 or not self.epochs > 0:
            raise InputError("beta, learning_rate and epochs must be > 0")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1 or null, got {self.threads}")

    @property
    def max_pairs(self) -> int:
        """The largest ``M`` of any method (reference pairs sampled per labelled prompt)."""
        return max([m.M for m in self.methods if m.uses_control_variate] or [0])

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return self.scenarios if self.data == "synthetic" else ("data",)

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-ready)."""
        d = asdict(self)
        d["training_overrides"] = dict(self.training_overrides)
        return d


def _methods(*specs: MethodSpec) -> tuple[MethodSpec, ...]:
    return tuple(specs)


_CORE_METHODS = _methods(
    MethodSpec("reference", kind="reference"),
    MethodSpec("dpo", method="dpo"),
    MethodSpec("vrpo_m1", method="vrpo", loss="logistic", M=1),
    MethodSpec("vrpo_m4", method="vrpo", loss="logistic", M=4),
    MethodSpec("vrpo_tuned_m4", method="vrpo_tuned", loss="logistic", M=4, lambda_target="oriented_shift"),
    MethodSpec("vrpo_m4_rm", method="vrpo", loss="logistic", M=4, g_hat="reward_model"),
    MethodSpec("cdpo", method="cdpo", loss="logistic", eps=0.1),
    MethodSpec("rdpo", method="rdpo", loss="logistic", eps=0.1),
    MethodSpec("rm_best_of_4", kind="best_of_n", n=4),
)

PRESETS: dict[str, ExperimentConfig] = {
    "test": ExperimentConfig(
        name="test",
        description="the whole pipeline at toy size, for the test suite (checks plumbing, not statistics)",
        corpus=CorpusConfig(source="generated", n_generated=600),
        vocab_size=300,
        model=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64),
        pretrain=PretrainConfig(steps=40, batch_size=16, learning_rate=5e-3, warmup_steps=5, max_length=32),
        scenarios=("bt", "annotator_mixture"),
        methods=_methods(
            MethodSpec("reference", kind="reference"),
            MethodSpec("dpo", method="dpo"),
            MethodSpec("vrpo_m2", method="vrpo", loss="logistic", M=2),
            MethodSpec("vrpo_tuned_m2", method="vrpo_tuned", loss="logistic", M=2, lambda_target="oriented_shift"),
            MethodSpec("vrpo_m2_rm", method="vrpo", loss="logistic", M=2, g_hat="reward_model"),
            MethodSpec("rdpo", method="rdpo", loss="logistic", eps=0.1),
            MethodSpec("drpo_rm", method="drpo", g_hat="reward_model"),
            MethodSpec("rm_best_of_2", kind="best_of_n", n=2),
        ),
        seeds=(0, 1),
        prompt_words=2,
        n_train=16,
        n_eval=12,
        heldout_texts=100,
        max_new_tokens=8,
        generation_batch_size=16,
        learning_rate=1e-3,
        epochs=1.0,
        batch_size=8,
        rm_epochs=1.0,
        estimated_minutes=0.5,
        runtime_measured=True,
    ),
    "tiny-cpu": ExperimentConfig(
        name="tiny-cpu",
        description=(
            "synthetic sentiment task on 2 CPU cores: generated review-like sentences, a tiny GPT-2 pre-trained on "
            "them, VADER as the true reward, labels through three preference scenarios, every method on equal "
            "budgets, 3 seeds"
        ),
        corpus=CorpusConfig(source="generated", n_generated=6000),
        vocab_size=1024,
        model=ModelConfig(n_layer=2, n_embd=128, n_head=4, n_positions=128),
        pretrain=PretrainConfig(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=50, max_length=64),
        scenarios=("bt", "annotator_mixture", "label_flip"),
        methods=_CORE_METHODS,
        seeds=(0, 1, 2),
        n_train=512,
        n_eval=400,
        max_new_tokens=20,
        epochs=1.0,
        estimated_minutes=9.0,
        runtime_measured=True,
    ),
    "tiny-cpu-diagnostic": ExperimentConfig(
        name="tiny-cpu-diagnostic",
        description=(
            "which condition limits VRPO at tiny-cpu's size: the same task and budget with M = 4 and 16 oracle "
            "reference pairs per labelled pair and 5 seeds, on the BT control and label flips"
        ),
        corpus=CorpusConfig(source="generated", n_generated=6000),
        vocab_size=1024,
        model=ModelConfig(n_layer=2, n_embd=128, n_head=4, n_positions=128),
        pretrain=PretrainConfig(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=50, max_length=64),
        scenarios=("bt", "label_flip"),
        methods=_methods(
            MethodSpec("reference", kind="reference"),
            MethodSpec("dpo", method="dpo"),
            MethodSpec("vrpo_m4", method="vrpo", loss="logistic", M=4),
            MethodSpec("vrpo_m16", method="vrpo", loss="logistic", M=16),
        ),
        seeds=(0, 1, 2, 3, 4),
        n_train=512,
        n_eval=400,
        max_new_tokens=20,
        epochs=1.0,
        estimated_minutes=23.0,
        runtime_measured=True,
    ),
    "tiny-cpu-fortunes": ExperimentConfig(
        name="tiny-cpu-fortunes",
        description=(
            "tiny-cpu on real short English texts: Debian's fortunes (apt-get install fortunes; generated sentences "
            "if missing), prompts of 3 words, 1024 labelled pairs"
        ),
        corpus=CorpusConfig(source="auto"),
        vocab_size=1024,
        model=ModelConfig(n_layer=2, n_embd=128, n_head=4, n_positions=128),
        pretrain=PretrainConfig(steps=1200, batch_size=32, learning_rate=3e-3, warmup_steps=50, max_length=64),
        scenarios=("bt", "annotator_mixture", "label_flip"),
        sharpness=8.0,
        methods=_CORE_METHODS,
        seeds=(0, 1, 2),
        n_train=1024,
        n_eval=400,
        max_new_tokens=24,
        epochs=1.0,
        estimated_minutes=40.0,
        runtime_measured=False,
    ),
    "gpu-small": ExperimentConfig(
        name="gpu-small",
        description=(
            "IMDb-style sentiment continuation on one GPU: reference lvwerra/gpt2-imdb (124M), prompts = the first "
            "words of IMDb reviews, neural sentiment oracle lvwerra/distilbert-imdb (POSITIVE logit)"
        ),
        corpus=CorpusConfig(source="hub:stanfordnlp/imdb:train:text", min_words=20, max_words=400, max_texts=30000),
        reference_model="lvwerra/gpt2-imdb",
        reward="classifier:lvwerra/distilbert-imdb",
        sharpness=1.0,
        scenarios=("bt", "annotator_mixture", "label_flip"),
        methods=_methods(*_CORE_METHODS[:-1], MethodSpec("rm_best_of_16", kind="best_of_n", n=16)),
        seeds=(0, 1, 2),
        prompt_words=8,
        n_train=10000,
        n_eval=1000,
        heldout_texts=2000,
        max_new_tokens=48,
        generation_batch_size=256,
        beta=0.1,
        learning_rate=1e-6,
        epochs=1.0,
        batch_size=32,
        rm_learning_rate=1e-5,
        rm_epochs=1.0,
        training_overrides={"bf16": True, "gradient_accumulation_steps": 2},
        threads=None,
        estimated_minutes=240.0,
        runtime_measured=False,
    ),
    "gpu-hh": ExperimentConfig(
        name="gpu-hh",
        description=(
            "Anthropic HH helpful-base with its human labels; reference pairs from Qwen2.5-0.5B-Instruct; g_hat a "
            "cross-fitted reward model; win rates judged by OpenAssistant/reward-model-deberta-v3-large-v2"
        ),
        data="dataset",
        preference_data="trl-lib/hh-rlhf-helpful-base",
        reference_model="Qwen/Qwen2.5-0.5B-Instruct",
        reward=None,
        scenarios=(),
        methods=_methods(
            MethodSpec("reference", kind="reference"),
            MethodSpec("dpo", method="dpo"),
            MethodSpec("vrpo_m1_rm", method="vrpo", loss="logistic", M=1, g_hat="reward_model"),
            MethodSpec("vrpo_m4_rm", method="vrpo", loss="logistic", M=4, g_hat="reward_model"),
            MethodSpec("vrpo_tuned_m4_rm", method="vrpo_tuned", loss="logistic", M=4, g_hat="reward_model",
                       lambda_target="oriented_shift"),
            MethodSpec("cdpo", method="cdpo", loss="logistic", eps=0.1),
            MethodSpec("rdpo", method="rdpo", loss="logistic", eps=0.1),
            MethodSpec("rm_best_of_16", kind="best_of_n", n=16),
        ),
        seeds=(0, 1),
        n_train=20000,
        n_eval=500,
        max_new_tokens=256,
        generation_batch_size=64,
        beta=0.1,
        learning_rate=5e-7,
        epochs=1.0,
        batch_size=8,
        rm_learning_rate=5e-6,
        rm_epochs=1.0,
        training_overrides={"bf16": True, "gradient_accumulation_steps": 8, "activation_checkpointing": True},
        judge="reward_model:OpenAssistant/reward-model-deberta-v3-large-v2",
        threads=None,
        estimated_minutes=900.0,
        runtime_measured=False,
    ),
}

#: tiny-cpu's task and budget, DRPO against DPO and VRPO
PRESETS["tiny-cpu-drpo"] = replace(
    PRESETS["tiny-cpu"],
    name="tiny-cpu-drpo",
    description=(
        "online DRPO against DPO and VRPO on tiny-cpu's task and budget: DRPO draws 2 responses per row and step "
        "from the policy, judged by reward models cross-fitted on the labelled pairs (g_hat learned, pi_hat the "
        "reference that wrote the data: the pi_hat-right case of its double robustness)"
    ),
    methods=_methods(
        MethodSpec("reference", kind="reference"),
        MethodSpec("dpo", method="dpo"),
        MethodSpec("vrpo_m4", method="vrpo", loss="logistic", M=4),
        MethodSpec("drpo_rm", method="drpo", g_hat="reward_model", samples=2),
    ),
    estimated_minutes=4.0,
)


def get_preset(name: str) -> ExperimentConfig:
    """A named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise InputError(f"preset: unknown {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NESTED = {"corpus": CorpusConfig, "model": ModelConfig, "pretrain": PretrainConfig}


def _method_from(value: Any) -> MethodSpec:
    if isinstance(value, MethodSpec):
        return value
    if not isinstance(value, Mapping):
        raise InputError(f"methods: each entry must be a mapping of MethodSpec fields, got {value!r}")
    allowed = {f.name for f in fields(MethodSpec)}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InputError(f"methods: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return MethodSpec(**value)


def config_from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """An ``ExperimentConfig`` from a nested dict (as ``as_dict`` writes it); unknown keys are errors."""
    allowed = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise InputError(f"experiment config: unknown key(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in _NESTED and isinstance(value, Mapping):
            sub = _NESTED[key]
            sub_allowed = {f.name for f in fields(sub)}
            bad = sorted(set(value) - sub_allowed)
            if bad:
                raise InputError(f"{key}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(sub_allowed))}")
            kwargs[key] = sub(**value)
        elif key == "methods":
            kwargs[key] = tuple(_method_from(v) for v in value)
        elif key in ("scenarios", "seeds") and isinstance(value, Sequence) and not isinstance(value, str):
            kwargs[key] = tuple(value)
        elif key in ("scenarios",) and isinstance(value, str):
            kwargs[key] = tuple(v.strip() for v in value.split(",") if v.strip())
        else:
            kwargs[key] = value
    try:
        return ExperimentConfig(**kwargs)
    except TypeError as exc:
        raise InputError(f"experiment config: {exc}") from None


def override(config: ExperimentConfig, items: Sequence[str]) -> ExperimentConfig:
    """Apply ``key=value`` overrides (``value`` read as YAML; ``section.key`` for corpus/model/pretrain).

    ``methods=a,b`` keeps only the named methods (the reference and the baseline are always kept).
    """
    import yaml

    values = config.as_dict()
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise InputError(f"--set {key}: value is not valid YAML ({exc})") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string
        if key == "methods" and isinstance(value, (str, list)):
            wanted = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
            known = {m["name"] for m in values["methods"]}
            missing = [w for w in wanted if w not in known]
            if missing:
                raise InputError(f"--set methods: unknown {', '.join(missing)}; allowed: {', '.join(sorted(known))}")
            values["methods"] = [
                m for m in values["methods"]
                if m["name"] in wanted or m["kind"] == "reference" or m["name"] == values["baseline"]
            ]
            continue
        section, dot, sub = key.partition(".")
        if dot:
            if section not in _NESTED or not isinstance(values.get(section), dict):
                raise InputError(f"--set {key}: {section!r} is not a section (allowed: {', '.join(_NESTED)})")
            if sub not in values[section]:
                raise InputError(f"--set {key}: unknown key {sub!r} of {section}")
            values[section][sub] = value
        else:
            if key not in values:
                raise InputError(f"--set {key}: unknown key")
            values[key] = value
    return config_from_dict(values)

