r"""Evaluation of policies: samples on held-out prompts, pairwise judges, win rates with 95% intervals, KL.

**Comparisons.** Policy ``A``'s response ``a_i`` and policy ``B``'s response ``b_i`` to prompt ``x_i``
are shown to a judge in an order drawn by a fair coin (``shown_first``). A judge gives the probability
``p`` that the response shown first wins; the soft win probability of ``A`` is ``q_i = p`` when ``a_i``
was shown first and ``1 - p`` otherwise. The outcome ``s_i`` in ``{0, 1/2, 1}`` (loss, tie, win of ``A``) is

* ``decision="sample"``: ``s_i = 1[u_i < q_i]``, ``u_i ~ U(0, 1)`` (a labeller drawing from the preference);
* ``decision="argmax"``: ``s_i = 1`` if ``q_i > 1/2``, ``1/2`` if ``q_i = 1/2``, ``0`` otherwise;

and identical responses are always a tie. The win rate is ``W = mean(s_i)`` (ties count one half).

**Intervals (level 95% by default, ``z = Phi^{-1}(0.975)``).**

* Wilson: the roots in ``p`` of ``(W - p)^2 = z^2 p (1 - p) / n``, i.e.
  ``(W + z^2/(2n) +- z sqrt(W (1 - W)/n + z^2/(4 n^2))) / (1 + z^2/n)``. With ties the per-comparison
  variance ``Var(s)`` is at most ``W (1 - W)``, so the interval is conservative.
* bootstrap: percentile interval of the mean of ``s`` over ``n_boot`` resamples of the prompts.
* the soft win probability ``mean(q_i)``, the mean true reward and the KL use the normal interval
  ``mean +- z sd / sqrt(n)`` (``sd`` with ``n - 1``), or the bootstrap when asked; a hard judge's ``q_i``
  (only 0, 1/2, 1: the outcome itself) gets Wilson's.
* across seeds (``seed_interval``): Student's t, ``mean +- t_{k-1} sd / sqrt(k)``.

**KL to the reference.** ``KL(pi || pi_ref) = E_{x, y ~ pi}[log pi(y|x) - log pi_ref(y|x)]``, estimated
on the policy's own samples (token ids as generated, end-of-sequence included), valid when sampling at
temperature 1 without top-k/top-p truncation. ``generate``'s ``min_new_tokens = k`` (1 by default: a
non-empty response) bars EOS at the first ``k`` steps, so both log-probabilities are those of the laws it
samples (``sequence_logprobs``): the KL between the policy and the reference as generated, the law
best-of-``n`` draws its candidates from. For best-of-``n`` from the reference the exact value
for a continuous reward, ``log n - (n - 1)/n`` (an upper bound otherwise), is ``best_of_n_kl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from scipy import stats

from robust_rlhf.theory.data import as_probabilities
from robust_rlhf.theory.errors import InputError

from .logprobs import model_sequence_logps
from .references import GenerationOptions, sample_tokens
from .tokenization import TokenizeOptions, prompt_token_ids, pad_completions, render_prompt, right_pad

__all__ = [
    "CI_METHODS",
    "DECISIONS",
    "wilson_interval",
    "bootstrap_interval",
    "mean_interval",
    "seed_interval",
    "WinRate",
    "win_rate",
    "Judge",
    "ProbabilityJudge",
    "compare",
    "Samples",
    "sample_policy",
    "sequence_logprobs",
    "generated_logprobs",
    "kl_estimate",
    "best_of_n_kl",
    "JUDGES",
    "build_judge",
    "evaluate_policies",
]

CI_METHODS = ("wilson", "bootstrap")
DECISIONS = ("sample", "argmax")


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence level must lie in (0, 1), got {level}")
    return float(stats.norm.ppf(0.5 + level / 2.0))


def wilson_interval(wins: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``wins / n`` (``wins`` may be fractional: ties count 1/2)."""
    if n < 1:
        raise InputError(f"Wilson interval needs n >= 1, got {n}")
    if not 0.0 <= wins <= n:
        raise InputError(f"Wilson interval: wins must lie in [0, n={n}], got {wins}")
    z = _z(level)
    p = wins / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 (p = 1) the lower (upper) end is exactly 0 (1); clip the rounding error there
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the values with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 1:
        raise InputError("bootstrap interval needs a non-empty 1-d sample")
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    _z(level)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):
        stop = min(n_boot, start + 256)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_interval(
    values: Sequence[float] | np.ndarray, level: float = 0.95, method: str = "normal", seed: int = 0,
    bounds: tuple[float, float] = (-math.inf, math.inf), n_boot: int = 2000,
) -> tuple[float, float, float]:
    """``(mean, low, high)``: normal ``mean +- z sd/sqrt(n)`` or (``method="bootstrap"``) the percentile
    bootstrap over ``n_boot`` resamples; the normal interval is cut to the quantity's range ``bounds``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 1:
        raise InputError("a mean needs a non-empty 1-d sample")
    m = float(v.mean())
    if method == "bootstrap":
        lo, hi = bootstrap_interval(v, level, n_boot, seed)
        return m, lo, hi
    if method != "normal":
        raise InputError(f"interval method: unknown {method!r}; allowed: normal, bootstrap")
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = _z(level) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, max(m - half, bounds[0]), min(m + half, bounds[1])


def seed_interval(
    values: Sequence[float] | np.ndarray, level: float = 0.95, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> tuple[float, float, float]:
    """``(mean, low, high)`` across ``k`` seeds: Student's t, ``mean +- t_{k-1, (1+level)/2} sd / sqrt(k)``,
    cut to the quantity's range ``bounds`` (a KL is >= 0, a win rate in [0, 1])."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    _z(level)
    half = float(stats.t.ppf(0.5 + level / 2.0, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, max(m - half, bounds[0]), min(m + half, bounds[1])


@dataclass(frozen=True)
class WinRate:
    """Win rate of ``A`` over ``B`` with its interval, the counts, and the soft win probability with its interval."""

    win_rate: float
    ci_low: float
    ci_high: float
    n: int
    wins: int
    ties: int
    losses: int
    soft: float
    soft_ci_low: float
    soft_ci_high: float
    ci_method: str
    level: float

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def win_rate(
    outcomes: Sequence[float] | np.ndarray,
    soft: Sequence[float] | np.ndarray | None = None,
    ci: str = "wilson",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> WinRate:
    """Summarise outcomes ``s_i`` in ``{0, 1/2, 1}`` and soft probabilities ``q_i`` (see the module docstring)."""
    s = np.asarray(outcomes, dtype=np.float64)
    if s.ndim != 1 or s.size < 1:
        raise InputError("win rate needs at least one comparison")
    if not np.isin(s, (0.0, 0.5, 1.0)).all():
        raise InputError("outcomes must be 0 (loss), 0.5 (tie) or 1 (win)")
    if ci not in CI_METHODS:
        raise InputError(f"ci: unknown {ci!r}; allowed: {', '.join(CI_METHODS)}")
    n = int(s.size)
    w = float(s.mean())
    if ci == "wilson":
        lo, hi = wilson_interval(float(s.sum()), n, level)
    else:
        lo, hi = bootstrap_interval(s, level, n_boot, seed)
    q = s if soft is None else np.asarray(soft, dtype=np.float64)
    if q.shape != s.shape or not ((q >= 0) & (q <= 1)).all():
        raise InputError("soft win probabilities must be one value in [0, 1] per comparison")
    if ci == "wilson" and np.isin(q, (0.0, 0.5, 1.0)).all():  # a hard judge: q is an outcome, Wald undercovers
        qm, (qlo, qhi) = float(q.mean()), wilson_interval(float(q.sum()), n, level)
    else:
        qm, qlo, qhi = mean_interval(q, level, "bootstrap" if ci == "bootstrap" else "normal", seed, bounds=(0.0, 1.0),
                                     n_boot=n_boot)
    return WinRate(
        win_rate=w,
        ci_low=lo,
        ci_high=hi,
        n=n,
        wins=int((s == 1.0).sum()),
        ties=int((s == 0.5).sum()),
        losses=int((s == 0.0).sum()),
        soft=qm,
        soft_ci_low=qlo,
        soft_ci_high=qhi,
        ci_method=ci,
        level=level,
    )


class Judge(Protocol):
    """``judge(prompts, firsts, seconds) -> P(first wins)`` per triple; ``decision`` is its default rule."""

    name: str
    decision: str

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> np.ndarray: ...


@dataclass
class ProbabilityJudge:
    """A judge from any ``PreferenceScorer``-like callable ``f(prompts, firsts, seconds) -> probabilities``."""

    fn: Callable[[Sequence[Any], Sequence[Any], Sequence[Any]], Any]
    name: str = "judge"
    decision: str = "sample"

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise InputError(f"decision: unknown {self.decision!r}; allowed: {', '.join(DECISIONS)}")

    def __call__(self, prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any]) -> np.ndarray:
        p = as_probabilities(f"judge {self.name}", self.fn(list(prompts), list(firsts), list(seconds))).reshape(-1)
        if p.size != len(prompts):
            raise InputError(f"judge {self.name}: returned {p.size} probabilities for {len(prompts)} pairs")
        return p


def compare(
    prompts: Sequence[Any],
    responses_a: Sequence[Any],
    responses_b: Sequence[Any],
    judge: Judge,
    seed: int = 0,
    decision: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(outcomes s, soft q, shown_first)`` of ``A`` against ``B`` per prompt, order shuffled with ``seed``.

    ``shown_first[i]`` is True when ``A``'s response was shown first.
    """
    n = len(prompts)
    if not n or len(responses_a) != n or len(responses_b) != n:
        raise InputError(f"compare: need one response of each policy per prompt ({n}, {len(responses_a)}, {len(responses_b)})")
    decision = decision or judge.decision
    if decision not in DECISIONS:
        raise InputError(f"decision: unknown {decision!r}; allowed: {', '.join(DECISIONS)}")
    rng = np.random.default_rng(seed)
    a_first = rng.random(n) < 0.5
    u = rng.random(n)
    firsts = [a if f else b for a, b, f in zip(responses_a, responses_b, a_first)]
    seconds = [b if f else a for a, b, f in zip(responses_a, responses_b, a_first)]
    p = np.asarray(judge(list(prompts), firsts, seconds), dtype=np.float64)
    q = np.where(a_first, p, 1.0 - p)
    if decision == "sample":
        s = (u < q).astype(np.float64)
    else:
        s = np.where(q > 0.5, 1.0, np.where(q < 0.5, 0.0, 0.5))
    same = np.array([a == b for a, b in zip(responses_a, responses_b)])
    s[same] = 0.5
    return s, q, a_first


@dataclass
class Samples:
    """Responses of a policy: text, generated token ids (EOS included when produced) and the prompts' ids."""

    prompts: list[Any]
    texts: list[str]
    token_ids: list[list[int]]
    prompt_ids: list[list[int]]


@torch.no_grad()
def sample_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    options: GenerationOptions = GenerationOptions(),
    seed: int = 0,
) -> Samples:
    """One sampled response per prompt, ``options.batch_size`` prompts per ``generate`` call (seed ``seed + first row``).

    Prompts are tokenised as in training (``prompt_token_ids``: BOS first) and left-padded. The kept token
    ids stop at the first EOS (included), so ``sequence_logprobs`` scores exactly what was sampled.
    """
    if not prompts:
        raise InputError("no prompts to sample from")
    tok_opts = TokenizeOptions(max_prompt_length=options.max_prompt_length)
    eos = tokenizer.eos_token_id
    texts: list[str] = []
    ids_out: list[list[int]] = []
    pids_out: list[list[int]] = []
    for start in range(0, len(prompts), options.batch_size):
        chunk = list(prompts[start : start + options.batch_size])
        seqs = [prompt_token_ids(render_prompt(p, tokenizer), tokenizer, tok_opts) for p in chunk]
        torch.manual_seed(options.seed + seed + start)
        new = sample_tokens(model, seqs, 1, options, tokenizer.pad_token_id, eos)
        for s, row in zip(seqs, new.tolist()):
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            ids_out.append(row)
            pids_out.append(s)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return Samples(list(prompts), texts, ids_out, pids_out)


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]], pad_id: int,
    batch_size: int = 32, *, eos_id: int | None = None, min_new_tokens: int = 0,
) -> np.ndarray:
    """``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` for each (prompt ids, response ids), float64.

    With ``min_new_tokens = k`` (and ``eos_id``) the log-probability under the distribution ``generate``
    samples from with that setting, which bars EOS at the first ``k`` steps and renormalises:
    ``log q(y|x) = log pi(y|x) - sum_{t < min(k, |y|)} log(1 - pi(EOS | x, y_<t))``. A KL estimate from such
    samples needs it for both policies (scored under ``pi`` alone it is biased: the samples are not ``pi``'s)."""
    if len(prompt_ids) != len(token_ids):
        raise InputError("sequence_logprobs: one response per prompt")
    if min_new_tokens > 0 and eos_id is None:
        raise InputError("sequence_logprobs: min_new_tokens > 0 needs the eos_id it bars")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(token_ids), batch_size):
            ps = prompt_ids[start : start + batch_size]
            ys = token_ids[start : start + batch_size]
            batch = {k: v.to(device) for k, v in pad_completions(ps, ys, pad_id).items()}
            out.extend(model_sequence_logps(model, batch).double().cpu().tolist())
        logp = np.asarray(out, dtype=np.float64)
        if min_new_tokens > 0:
            logp -= _barred_eos_mass(model, prompt_ids, token_ids, pad_id, batch_size, eos_id, min_new_tokens)
    finally:
        model.train(was_training)
    return logp


def generated_logprobs(model: torch.nn.Module, ref_model: torch.nn.Module, samples: Samples, tokenizer: Any,
                       min_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(log q_pi(y|x), log q_ref(y|x))`` of each sample of ``model``: ``sequence_logprobs`` under the laws
    ``generate`` samples from with ``min_new_tokens`` (EOS barred at the first steps, where the tokenizer has
    an EOS), for the policy and for the reference (the policy's own when they are one model)."""
    eos = tokenizer.eos_token_id
    kw = {"eos_id": eos, "min_new_tokens": min_new_tokens if eos is not None else 0}
    lp = sequence_logprobs(model, samples.prompt_ids, samples.token_ids, tokenizer.pad_token_id, **kw)
    lr = lp if ref_model is model else sequence_logprobs(ref_model, samples.prompt_ids, samples.token_ids,
                                                          tokenizer.pad_token_id, **kw)
    return lp, lr


@torch.no_grad()
def _barred_eos_mass(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]],
                     pad_id: int, batch_size: int, eos_id: int, k: int) -> np.ndarray:
    """``sum_{t < min(k, |y|)} log(1 - pi(EOS | x, y_<t))`` per response: one forward pass over the prompt and
    the response's first ``k - 1`` tokens (right-padded), read at the ``k`` positions that predict ``y_0 ..``."""
    device = next(model.parameters()).device
    out = np.zeros(len(token_ids))
    for start in range(0, len(token_ids), batch_size):
        ps, ys = prompt_ids[start : start + batch_size], token_ids[start : start + batch_size]
        steps = [min(k, len(y)) for y in ys]
        seqs = [list(p) + list(y[: t - 1]) if t > 0 else list(p) for p, y, t in zip(ps, ys, steps)]
        ids, att = right_pad(seqs, pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.double()
        eos = torch.log_softmax(logits, dim=-1)[..., eos_id].cpu()
        for i, (p, t) in enumerate(zip(ps, steps)):
            at = eos[i, len(p) - 1 : len(p) - 1 + t]
            out[start + i] = float(torch.log(-torch.expm1(at)).sum())
    return out


def kl_estimate(
    logp_policy: Sequence[float] | np.ndarray, logp_reference: Sequence[float] | np.ndarray, level: float = 0.95
) -> tuple[float, float, float]:
    """``(KL, low, high)``: mean of ``log pi(y|x) - log pi_ref(y|x)`` over the policy's samples, normal interval."""
    a = np.asarray(logp_policy, dtype=np.float64)
    b = np.asarray(logp_reference, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError("kl_estimate: one reference log-probability per sample")
    return mean_interval(a - b, level)


def best_of_n_kl(n: int) -> float:
    """``log n - (n - 1)/n``: KL of best-of-``n`` from its base policy (exact without reward ties, else a bound)."""
    if n < 1:
        raise InputError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


JUDGES = ("oracle", "true-reward", "reward-model", "callable")


def build_judge(
    name: str,
    *,
    scenario: str | None = None,
    sharpness: float = 4.0,
    reward: Any = None,
    judge_model: Any = None,
    judge_tokenizer: Any = None,
    judge_callable: Callable[[Any, Any, Any], float] | None = None,
) -> ProbabilityJudge:
    """A judge by name (``JUDGES``).

    * ``oracle``: ``g*(x, first, second)`` of a text scenario (``synthetic.scenarios``) on the true reward
      components of ``reward`` (``synthetic.reward``); outcomes drawn from it;
    * ``true-reward``: the deterministic comparison of the primary true reward (ties when equal);
    * ``reward-model``: ``sigmoid(r(x, first) - r(x, second))`` of a one-output sequence classifier; argmax;
    * ``callable``: ``f(prompt, first, second) -> P(first wins)``; outcomes drawn from it.
    """
    key = name.replace("_", "-")
    if key not in JUDGES:
        raise InputError(f"judge: unknown {name!r}; allowed: {', '.join(JUDGES)}")
    if key in ("oracle", "true-reward"):
        if reward is None:
            raise InputError(f"judge {key} needs a true reward (e.g. --reward vader)")
        if key == "true-reward":
            primary = reward.primary

            def step(prompts, firsts, seconds):
                ra = reward.components(prompts, firsts)[:, primary]
                rb = reward.components(prompts, seconds)[:, primary]
                return np.where(ra > rb, 1.0, np.where(ra < rb, 0.0, 0.5))

            return ProbabilityJudge(step, name="true-reward", decision="argmax")
        from .synthetic.scenarios import make_scenario

        if not scenario:
            raise InputError("judge oracle needs a scenario (e.g. --scenario annotator_mixture)")
        d = reward.components(["x"], ["good"]).shape[1]
        sc = make_scenario(scenario, sharpness, d=d, primary=reward.primary)

        def oracle(prompts, firsts, seconds):
            return sc.prob(reward.components(prompts, firsts), reward.components(prompts, seconds))

        return ProbabilityJudge(oracle, name=f"oracle:{scenario}", decision="sample")
    if key == "reward-model":
        if judge_model is None or judge_tokenizer is None:
            raise InputError("judge reward-model needs a reward model (e.g. --judge-model PATH)")
        from .auxiliary import RewardModelScorer

        return ProbabilityJudge(RewardModelScorer(judge_model, judge_tokenizer), name="reward-model", decision="argmax")
    if judge_callable is None:
        raise InputError("judge callable needs a function (e.g. --judge-callable module:function)")
    from .auxiliary import CallableScorer

    return ProbabilityJudge(CallableScorer(judge_callable), name="callable", decision="sample")


def evaluate_policies(
    policy: tuple[torch.nn.Module, Any],
    baseline: tuple[torch.nn.Module, Any],
    prompts: Sequence[Any],
    judge: ProbabilityJudge,
    reference: tuple[torch.nn.Module, Any] | None = None,
    reward: Any = None,
    options: GenerationOptions = GenerationOptions(max_new_tokens=32),
    seed: int = 0,
    ci: str = "wilson",
    decision: str | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Sample both policies on ``prompts`` (independent seeds), judge them, and summarise.

    Returns ``win_rate``, ``ci_low``, ``ci_high``, ``n``, ``wins``, ``ties``, ``losses``, ``soft`` (+ interval),
    ``mean_reward`` (+ interval; with a true ``reward``) and the baseline's, ``kl`` (+ interval; the policy's
    KL to ``reference``, default the baseline) and the baseline's, plus the samples (``samples``).
    """
    if not prompts:
        raise InputError("no prompts to evaluate on")
    reference = reference or baseline
    out: dict[str, Any] = {}
    samples: dict[str, Samples] = {}
    for tag, (model, tok), s in (("policy", policy, seed), ("baseline", baseline, seed + 1_000_003)):
        samples[tag] = sample_policy(model, tok, prompts, options, seed=s)
    s, q, a_first = compare(prompts, samples["policy"].texts, samples["baseline"].texts, judge, seed=seed, decision=decision)
    wr = win_rate(s, q, ci=ci, level=level, seed=seed)
    out.update(wr.as_dict())
    out["judge"] = judge.name
    out["decision"] = decision or judge.decision
    out["policy_shown_first"] = int(a_first.sum())
    for tag, (model, tok) in (("policy", policy), ("baseline", baseline)):
        prefix = "" if tag == "policy" else "baseline_"
        smp = samples[tag]
        if reward is not None:
            r = reward.components(list(prompts), smp.texts)[:, reward.primary]
            m, lo, hi = mean_interval(r, level)
            out[f"{prefix}mean_reward"], out[f"{prefix}mean_reward_ci_low"], out[f"{prefix}mean_reward_ci_high"] = m, lo, hi
        else:
            out[f"{prefix}mean_reward"] = None
        ref_model, ref_tok = reference
        if ref_tok.get_vocab() != tok.get_vocab():
            raise InputError(f"KL to the reference needs the {tag}'s tokenizer to be the reference's")
        lp, lr = generated_logprobs(model, ref_model, smp, tok, options.min_new_tokens)
        k, lo, hi = kl_estimate(lp, lr, level)
        out[f"{prefix}kl"], out[f"{prefix}kl_ci_low"], out[f"{prefix}kl_ci_high"] = k, lo, hi
    out["samples"] = {
        "prompts": list(prompts),
        "policy": samples["policy"].texts,
        "baseline": samples["baseline"].texts,
        "outcome": s.tolist(),
        "soft": q.tolist(),
    }
    return out
