"""Statistics of the LLM evaluation (``robust_rlhf.llm.evaluate``): intervals, win rates, judges, KL."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from robust_rlhf.llm.evaluate import (
    ProbabilityJudge,
    best_of_n_kl,
    bootstrap_interval,
    compare,
    kl_estimate,
    mean_interval,
    seed_interval,
    wilson_interval,
    win_rate,
)
from robust_rlhf.theory.errors import InputError

Z95 = stats.norm.ppf(0.975)


def _wilson_roots(wins: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Independent form: the roots in p of (W - p)^2 = z^2 p (1 - p) / n, a quadratic a p^2 + b p + c."""
    w = wins / n
    a = 1 + z * z / n
    b = -(2 * w + z * z / n)
    c = w * w
    r = np.sort(np.roots([a, b, c]).real)
    return float(r[0]), float(r[1])


def test_wilson_golden_values() -> None:
    # the textbook example 7 of 10 and the all-or-nothing edge cases (upper end 1 - (1 + z^2/n)^-1 at 0 wins)
    assert wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, (Z95**2 / 10) / (1 + Z95**2 / 10)), abs=1e-12)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 / (1 + Z95**2 / 10), abs=1e-12)


@given(n=st.integers(1, 400), frac=st.floats(0, 1), level=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_is_the_root_pair_and_contains_the_estimate(n: int, frac: float, level: float) -> None:
    wins = round(frac * n * 2) / 2  # ties make half wins
    z = stats.norm.ppf(0.5 + level / 2)
    lo, hi = wilson_interval(wins, n, level)
    r_lo, r_hi = _wilson_roots(wins, n, z)
    assert lo == pytest.approx(max(0.0, r_lo), abs=1e-7) and hi == pytest.approx(min(1.0, r_hi), abs=1e-7)
    assert 0.0 <= lo <= wins / n <= hi <= 1.0


def test_wilson_rejects_bad_counts() -> None:
    for wins, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(InputError):
            wilson_interval(wins, n)
    with pytest.raises(InputError, match="level"):
        wilson_interval(3, 10, level=1.5)


def test_mean_and_seed_intervals_closed_form() -> None:
    v = np.array([0.2, 0.5, 0.9, 0.4])
    m, lo, hi = mean_interval(v)
    half = Z95 * v.std(ddof=1) / 2
    assert (m, lo, hi) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    m, lo, hi = seed_interval([0.5, 0.6, 0.55])
    half = stats.t.ppf(0.975, 2) * 0.05 / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((0.55, 0.55 - half, 0.55 + half))
    assert all(math.isnan(x) for x in seed_interval([0.4])[1:])
    assert seed_interval([0.4, float("nan"), 0.6])[0] == pytest.approx(0.5)
    # a KL across three seeds: the t interval would reach -0.86; the KL's range cuts it at 0
    m, lo, hi = seed_interval([1.68, 0.37, 0.58], bounds=(0.0, math.inf))
    assert lo == 0.0 and hi == pytest.approx(seed_interval([1.68, 0.37, 0.58])[2])


def test_summary_names_metrics_missing_in_some_seeds(tmp_path) -> None:
    import json

    import pandas as pd

    from robust_rlhf.llm.synthetic.report import summarise, write_report

    rows = [{"scenario": "bt", "method": m, "kind": k, "seed": s, "kl": kl, "kl_method": how,
             "mean_reward": r, "lambda_mean": lam}
            for m, k, how in (("dpo", "policy", "samples"), ("rm_best_of_4", "best_of_n", "best_of_n_formula"))
            for s, kl, r, lam in ((0, 0.3, 1.0, 0.9), (1, float("nan"), 2.0, 0.8), (2, 0.5, 3.0, float("nan")))]
    summary = summarise(pd.DataFrame(rows)).set_index("method")
    assert summary.loc["dpo", "kl"] == pytest.approx(0.4)  # over the two seeds where it is finite
    assert summary.loc["dpo", "partial_seeds"] == "kl: 2 of 3; lambda_mean: 2 of 3"
    assert summary.loc["dpo", "seeds"] == 3 and summary.loc["dpo", "mean_reward"] == pytest.approx(2.0)
    assert summary.loc["rm_best_of_4", "kl_method"] == "best_of_n_formula"
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    cfg = {"name": "t", "baseline": "dpo", "n_train": 1, "n_eval": 1, "seeds": [0, 1, 2], "beta": 0.1,
           "learning_rate": 0.1, "epochs": 1, "batch_size": 1, "judge": "true_reward", "ci": "wilson"}
    (tmp_path / "experiment.json").write_text(json.dumps({"config": cfg}))
    text = write_report(tmp_path).read_text()
    assert "- `dpo`: means over fewer seeds where a value was not finite (kl: 2 of 3; lambda_mean: 2 of 3)" in text
    assert "- `rm_best_of_4`: KL is the formula log n - (n - 1)/n" in text
    assert "- `dpo`: KL is the formula" not in text


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    rng = np.random.default_rng(3)
    v = rng.normal(size=200)
    a = bootstrap_interval(v, seed=1)
    assert a == bootstrap_interval(v, seed=1)
    assert a[0] < v.mean() < a[1]
    # the percentile bootstrap of a mean is close to the normal interval for n = 200 (half-width 1.96 sd/sqrt n,
    # about 0.139 here; the bootstrap's own Monte Carlo error with 2000 resamples is about 1% of it)
    _, lo, hi = mean_interval(v)
    assert a == pytest.approx((lo, hi), abs=0.02)
    assert bootstrap_interval(np.full(7, 0.5)) == (0.5, 0.5)


def test_win_rate_counts_ties_as_half() -> None:
    s = np.array([1, 1, 0.5, 0, 1, 0.5, 0, 1.0])
    wr = win_rate(s)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (4, 2, 2, 8)
    assert wr.win_rate == pytest.approx(5 / 8)
    assert (wr.ci_low, wr.ci_high) == pytest.approx(wilson_interval(5, 8))
    assert wr.soft == pytest.approx(5 / 8)  # without soft probabilities, the outcomes themselves
    boot = win_rate(s, np.full(8, 0.6), ci="bootstrap", seed=2)
    assert boot.ci_method == "bootstrap" and boot.soft == pytest.approx(0.6)
    assert (boot.soft_ci_low, boot.soft_ci_high) == pytest.approx((0.6, 0.6))
    hard = win_rate([1, 1, 0.5, 0])  # q = s: Wilson's interval, not the normal one (which reached 1.09 here)
    assert (hard.soft_ci_low, hard.soft_ci_high) == wilson_interval(2.5, 4)
    near_one = win_rate([1, 1, 1, 0], [1, 1, 0.9, 0.2])  # the normal interval of the soft mean 0.775 reaches 1.15
    assert 0.0 <= near_one.soft_ci_low < near_one.soft < near_one.soft_ci_high == 1.0
    with pytest.raises(InputError, match="outcomes"):
        win_rate([1, 0.3])
    with pytest.raises(InputError, match="ci"):
        win_rate([1, 0], ci="exact")


def _position_biased(prompts, firsts, seconds):
    """The first response always wins: a pure position bias."""
    return np.ones(len(firsts))


def test_compare_shuffles_the_order_and_maps_outcomes_back() -> None:
    n = 4000
    prompts = [f"p{i}" for i in range(n)]
    a = [f"a{i}" for i in range(n)]
    b = [f"b{i}" for i in range(n)]
    judge = ProbabilityJudge(_position_biased, decision="argmax")
    s, q, a_first = compare(prompts, a, b, judge, seed=5)
    # A wins exactly when it was shown first, so the win rate is the share of coin flips that showed A first
    np.testing.assert_array_equal(s, a_first.astype(float))
    np.testing.assert_array_equal(q, a_first.astype(float))
    # fair coin: mean 1/2 with standard error sqrt(1/4 / 4000) = 0.0079; 4 standard errors
    assert abs(a_first.mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    s2, _, a_first2 = compare(prompts, a, b, judge, seed=5)
    np.testing.assert_array_equal(a_first, a_first2)


def test_compare_sampled_outcomes_follow_the_judge_and_identical_texts_tie() -> None:
    n = 6000
    p_a = 0.7
    judge = ProbabilityJudge(lambda pr, f, s: np.array([p_a if x.startswith("a") else 1 - p_a for x in f]))
    a = [f"a{i}" for i in range(n)]
    b = [f"b{i}" for i in range(n)]
    s, q, _ = compare(["x"] * n, a, b, judge, seed=1)
    np.testing.assert_allclose(q, p_a)  # the soft win probability of A does not depend on the order
    # Bernoulli(0.7) draws: standard error sqrt(0.21 / 6000) = 0.0059; 4 standard errors
    assert abs(s.mean() - p_a) < 4 * math.sqrt(p_a * (1 - p_a) / n)
    s, q, _ = compare(["x", "y"], ["same", "a1"], ["same", "b1"], judge, seed=0, decision="argmax")
    assert s[0] == 0.5 and s[1] == 1.0


def test_probability_judge_validates_its_output() -> None:
    bad = ProbabilityJudge(lambda p, f, s: [1.2] * len(f), name="bad")
    with pytest.raises(InputError, match="bad"):
        compare(["x"], ["a"], ["b"], bad)
    for value, needle in (("yes", "cannot be read as numbers"), ([[0.5], [0.1, 0.2]], "cannot be read as numbers"),
                          ([0.5, 0.5], "returned 2 probabilities for 1 pairs"), ([None], "entry (0,) is nan")):
        with pytest.raises(InputError, match=rf"judge bad: .*{re.escape(needle)}"):
            compare(["x"], ["a"], ["b"], ProbabilityJudge(lambda p, f, s, v=value: v, name="bad"))
    with pytest.raises(InputError, match="decision"):
        ProbabilityJudge(lambda p, f, s: [0.5], decision="vote")
    with pytest.raises(InputError, match="one response"):
        compare(["x", "y"], ["a"], ["b", "c"], ProbabilityJudge(_position_biased))


def test_kl_estimate_and_best_of_n_formula() -> None:
    lp = np.array([-3.0, -2.0, -4.0])
    lr = np.array([-3.5, -2.5, -4.2])
    kl, lo, hi = kl_estimate(lp, lr)
    assert kl == pytest.approx(0.4) and lo < 0.4 < hi
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(InputError):
        best_of_n_kl(0)


def test_best_of_n_formula_matches_a_continuous_simulation() -> None:
    """For a continuous reward, best-of-n has density n F^(n-1) relative to the base: KL = E[log(n F^(n-1))]
    under the best-of-n law, where F ~ Beta(n, 1). Monte Carlo over 200000 draws of F."""
    rng = np.random.default_rng(0)
    n = 4
    f = rng.beta(n, 1, size=200_000)
    log_ratio = np.log(n) + (n - 1) * np.log(f)
    # standard error: sd(log ratio)/sqrt(R) = (n - 1) sd(log F)/sqrt(R), sd(log F) = 1/n for Beta(n, 1); 4 SEs
    se = (n - 1) * (1 / n) / math.sqrt(f.size)
    assert abs(log_ratio.mean() - best_of_n_kl(n)) < 4 * se


def _eos_model(seed: int, eos_bias: float):
    """A one-layer GPT-2 on 4 tokens (0 = EOS, 3 = pad) whose EOS logit is shifted by ``eos_bias``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=16, n_embd=8, n_layer=1, n_head=1, bos_token_id=1,
                                       eos_token_id=0))
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    model.lm_head.register_forward_hook(lambda mod, i, o: o + torch.tensor([eos_bias, 0.0, 0.0, -1e9]))
    return model.eval()


@pytest.mark.parametrize("k", [1, 2])
def test_logprobs_under_min_new_tokens_are_the_sampled_law(k: int) -> None:
    """``generate`` with ``min_new_tokens = k`` bars EOS at the first k steps, so its samples follow
    ``q(y) = pi(y) / prod_{t<k} (1 - pi(EOS | y_<t))``, not ``pi``: scored under ``pi`` the KL estimate of a
    policy that ends at once with probability 0.68 was 0.20 against 1.29. Enumerating every response of up
    to 3 tokens: exp(log q) sums to 1 over what can be sampled, and for k = 1 equals pi given a first
    token other than EOS."""
    import itertools

    from robust_rlhf.llm.evaluate import sequence_logprobs

    T, pad = 3, 3
    ys = [list(t) for L in range(1, T + 1) for t in itertools.product(range(3), repeat=L)
          if 0 not in t[:-1] and (L == T or t[-1] == 0) and 0 not in t[:k]]
    prompts = [[1, 2]] * len(ys)
    for model in (_eos_model(0, 1.5), _eos_model(1, -1.0)):
        # the model's logits are float32: each of a response's <= 3 + k log-probs carries ~1e-7 (eps 1.2e-7)
        q = np.exp(sequence_logprobs(model, prompts, ys, pad, eos_id=0, min_new_tokens=k))
        assert q.sum() == pytest.approx(1.0, abs=6 * 1.2e-7)
        if k == 1:
            p = np.exp(sequence_logprobs(model, prompts, ys, pad))
            np.testing.assert_allclose(q, p / p.sum(), rtol=6 * 1.2e-7)
    with pytest.raises(InputError, match="needs the eos_id"):
        sequence_logprobs(_eos_model(0, 0.0), prompts, ys, pad, min_new_tokens=1)


def test_soft_intervals_of_a_hard_judge_and_their_resamples() -> None:
    """A hard judge's q is the outcome itself: its soft interval is Wilson's (the normal one was [1, 1] for 10
    wins of 10, and covered 64% at n = 20, p = 0.95). The bootstrap's ``n_boot`` reaches the soft interval."""
    s = np.ones(10)
    wr = win_rate(s, s)
    assert (wr.soft_ci_low, wr.soft_ci_high) == wilson_interval(10.0, 10) == (wr.ci_low, wr.ci_high)
    q = np.random.default_rng(0).random(40)
    s = (q > 0.5).astype(float)
    for n_boot in (50, 5000):
        wr = win_rate(s, q, ci="bootstrap", n_boot=n_boot, seed=3)
        assert (wr.soft_ci_low, wr.soft_ci_high) == bootstrap_interval(q, 0.95, n_boot, 3)
