"""The synthetic task's parts: corpus, tokenizer, reference pre-training and cache, true rewards, scenarios,
presets, and the oriented margin-shift projection behind ``vrpo_tuned``'s lambda."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import expit, ndtr

from robust_rlhf.llm.objectives import PreferenceObjective, margin_shift_scores
from robust_rlhf.llm.synthetic import cache as cache_mod
from robust_rlhf.llm.synthetic.corpus import (
    CorpusConfig,
    fortune_texts,
    generated_texts,
    load_corpus,
    prompt_prefix,
    read_fortune_file,
)
from robust_rlhf.llm.synthetic.presets import PRESETS, MethodSpec, get_preset, override
from robust_rlhf.llm.synthetic.reward import CallableReward, VaderReward, get_reward
from robust_rlhf.llm.synthetic.scenarios import OracleScorer, make_scenario, text_scenario_names
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.losses import Logistic

FORTUNE = """A bore is a man who talks so much about himself that you can't talk about
yourself.
%
A city is a large community where people are lonesome together
		-- Herbert Prochnow
%
   ___
  (o o)
   ) (
%
Short one.
%
Never trust a child farther than you can throw it. -- Anonymous Coward
%
"""


def test_fortune_parsing_drops_attributions_art_and_short_entries(tmp_path: Path) -> None:
    f = tmp_path / "people"
    f.write_text(FORTUNE)
    assert read_fortune_file(f, min_words=3, max_words=40) == [
        "A bore is a man who talks so much about himself that you can't talk about yourself.",
        "A city is a large community where people are lonesome together",
        "Never trust a child farther than you can throw it.",
    ]
    (tmp_path / "people.dat").write_bytes(b"\x00\x01")  # index files are not read
    assert len(fortune_texts(tmp_path, 3, 40)) == 3


def test_corpus_sources_and_fallback(tmp_path: Path) -> None:
    gen = load_corpus(CorpusConfig(source="generated", n_generated=50))
    assert gen.source == "generated" and len(gen.texts) == 50
    assert gen.texts == load_corpus(CorpusConfig(source="generated", n_generated=50)).texts
    assert gen.fingerprint != load_corpus(CorpusConfig(source="generated", n_generated=50, seed=1)).fingerprint
    # auto falls back to the generated sentences when the fortunes folder is missing or too small, and says so
    auto = load_corpus(CorpusConfig(source="auto", fortune_dir=str(tmp_path / "none"), n_generated=40))
    assert auto.source == "generated" and auto.location.startswith("grammar")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "wisdom").write_text("%\n".join(f"Entry number {i} says something kind.\n" for i in range(30)))
    fort = load_corpus(CorpusConfig(source="auto", fortune_dir=str(tmp_path / "f"), min_texts=20))
    assert fort.source == "fortunes" and len(fort.texts) == 30
    with pytest.raises(InputError, match="apt-get install fortunes"):
        load_corpus(CorpusConfig(source="fortunes", fortune_dir=str(tmp_path / "f"), min_texts=100))
    txt = tmp_path / "texts.txt"
    txt.write_text("one two three four five\n\nsix seven eight nine ten\n")
    assert load_corpus(CorpusConfig(source=f"file:{txt}")).source == "file"
    with pytest.raises(InputError, match="corpus.source"):
        CorpusConfig(source="web")
    train, held = gen.split(10)
    assert len(held) == 10 and not set(train) & set(held)


def test_generated_texts_are_distinct_and_prompts_are_prefixes() -> None:
    texts = generated_texts(200, seed=3)
    assert len(set(texts)) == 200 and all(t.endswith(".") for t in texts)
    assert prompt_prefix("The movie was very good.", 2) == "The movie"
    assert prompt_prefix("Short", 3) == "Short"
    with pytest.raises(InputError):
        prompt_prefix("x", 0)


def test_cached_folder_builds_once(tmp_path: Path) -> None:
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "x.txt").write_text("built")

    a = cache_mod.cached_folder(tmp_path, "thing", {"k": 1}, build)
    b = cache_mod.cached_folder(tmp_path, "thing", {"k": 1}, build)
    c = cache_mod.cached_folder(tmp_path, "thing", {"k": 2}, build)
    assert a == b != c and len(calls) == 2 and (a / "x.txt").read_text() == "built"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_bpe_tokenizer_round_trips_and_is_cached(tmp_path: Path) -> None:
    from robust_rlhf.llm.synthetic.tokenizer import build_tokenizer, train_bpe_tokenizer

    texts = generated_texts(300)
    tok = train_bpe_tokenizer(texts, 320)
    assert len(tok) <= 320 and tok.pad_token and tok.bos_token and tok.eos_token
    for t in ("The movie was great, but the ending was awful.", "naïve café ☃ 42"):
        assert tok.decode(tok(t)["input_ids"]) == t  # byte level: nothing is unknown
    tok1, folder1 = build_tokenizer(texts, 320, tmp_path, "fp")
    tok2, folder2 = build_tokenizer(texts, 320, tmp_path, "fp")
    assert folder1 == folder2 and tok1.get_vocab() == tok2.get_vocab()
    with pytest.raises(InputError, match="vocab_size"):
        train_bpe_tokenizer(texts, 5000)


def test_reference_pretraining_learns_and_is_cached(tmp_path: Path) -> None:
    from robust_rlhf.llm.synthetic.reference_model import ModelConfig, PretrainConfig, pretrained_reference
    from robust_rlhf.llm.synthetic.tokenizer import build_tokenizer

    texts = generated_texts(200)
    tok, folder = build_tokenizer(texts[:150], 300, tmp_path, "fp")
    cfg_m = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=48)
    cfg_p = PretrainConfig(steps=60, batch_size=8, learning_rate=1e-2, warmup_steps=5, max_length=32)
    logs: list[str] = []
    ref = pretrained_reference(texts[:150], texts[150:], tok, folder, cfg_m, cfg_p, tmp_path, "fp", logs.append)
    import json

    info = json.loads((ref / "pretrain.json").read_text())
    curve = info["train_loss_every_50_steps"]
    # uniform over the vocabulary is log(300) = 5.7 nats per token; training must get well below it
    assert curve[-1] < curve[0] and info["heldout_loss"] < math.log(300) - 1.0
    assert (ref / "model.safetensors").exists() and logs
    again = pretrained_reference(texts[:150], texts[150:], tok, folder, cfg_m, cfg_p, tmp_path, "fp", logs.append)
    assert again == ref and len(logs) == 2  # loaded from the cache: no new training log line


def test_vader_reward_and_specs() -> None:
    r = VaderReward()
    phi = r.components(["p", "p", "p"], ["I love this wonderful day", "the table", "this is awful and sad"])
    assert phi.shape == (3, 1) and phi[0, 0] > 0.5 and phi[1, 0] == 0.0 and phi[2, 0] < -0.5
    two = get_reward("vader:compound,pos")
    assert two.names == ("vader_compound", "vader_pos") and two.components(["p"], ["great"]).shape == (1, 2)
    assert VaderReward(include_prompt=True).components(["I hate"], [" it"])[0, 0] < 0
    with pytest.raises(InputError, match="vader fields"):
        get_reward("vader:joy")
    with pytest.raises(InputError, match="unknown"):
        get_reward("sentiment")
    with pytest.raises(InputError, match="cannot import"):
        get_reward("no_such_module_xyz:f")
    c = CallableReward(lambda p, y: [len(t) for t in y])
    assert c.components(["a", "b"], ["xx", "yyy"]).tolist() == [[2.0], [3.0]] and c.names == ("r0",)
    with pytest.raises(InputError, match="shape"):
        CallableReward(lambda p, y: [1.0]).components(["a", "b"], ["x", "y"])


def test_scenarios_are_the_simulator_models_on_reward_components() -> None:
    s = 4.0
    pa, pb = np.array([[0.6], [-0.2], [0.0]]), np.array([[-0.1], [0.3], [0.0]])
    d = (pa - pb)[:, 0]
    np.testing.assert_allclose(make_scenario("bt", s).prob(pa, pb), expit(s * d))
    np.testing.assert_allclose(make_scenario("probit", s).prob(pa, pb), ndtr(s * d))
    np.testing.assert_allclose(make_scenario("cauchy", s).prob(pa, pb), 0.5 + np.arctan(s * d) / np.pi)
    np.testing.assert_allclose(make_scenario("label_flip", s).prob(pa, pb), 0.2 + 0.6 * expit(s * d))
    np.testing.assert_allclose(
        make_scenario("annotator_mixture", s).prob(pa, pb), 0.7 * expit(2 * s * d) + 0.3 * expit(-s * d)
    )
    pos = make_scenario("position_bias", s)
    np.testing.assert_allclose(pos.prob(pa, pb), expit(s * d + 1.0))
    np.testing.assert_allclose(pos.symmetric_prob(pa, pb), 0.5 * (expit(s * d + 1) + 1 - expit(-s * d + 1)))
    phi = np.linspace(-1, 1, 5)[:, None]
    for name in text_scenario_names():
        sc = make_scenario(name, s)
        if sc.model.antisymmetric:
            np.testing.assert_allclose(sc.prob(pa, pb) + sc.prob(pb, pa), 1.0)
        # every built-in utility ranks by the true reward (a positive multiple of phi)
        u = sc.utility(phi)
        k = u[-1] / phi[-1, 0]
        assert k > 0 and np.allclose(u, k * phi[:, 0])
    with pytest.raises(InputError, match="unknown"):
        make_scenario("nope")
    with pytest.raises(InputError):
        make_scenario("bt", sharpness=0.0)


def test_labels_are_drawn_from_g_star() -> None:
    sc = make_scenario("annotator_mixture", 4.0)
    n = 20000
    pa, pb = np.full((n, 1), 0.5), np.full((n, 1), 0.0)
    g = float(sc.prob(pa[:1], pb[:1])[0])
    z = sc.draw(pa, pb, np.random.default_rng(0))
    # Bernoulli(g) mean: standard error sqrt(g (1 - g) / n) (about 0.0032 here); 4 standard errors
    assert abs(z.mean() - g) < 4 * math.sqrt(g * (1 - g) / n)


def test_oracle_scorer_is_the_symmetrised_preference_on_the_reward() -> None:
    rew = CallableReward(lambda p, y: [0.5 if "good" in t else -0.5 for t in y])
    sc = make_scenario("position_bias", 2.0)
    g = OracleScorer(sc, rew)(["x", "x"], ["good", "bad"], ["bad", "good"])
    want = 0.5 * (expit(2.0 + 1.0) + 1 - expit(-2.0 + 1.0))
    assert g == pytest.approx([want, 1 - want])


def test_presets_validate_and_override() -> None:
    assert set(PRESETS) == {"test", "tiny-cpu", "tiny-cpu-diagnostic", "tiny-cpu-drpo", "tiny-cpu-fortunes", "gpu-small",
                            "gpu-hh"}
    drpo = next(m for m in get_preset("tiny-cpu-drpo").methods if m.online)
    assert drpo.g_hat == "reward_model" and drpo.samples == 2 and get_preset("tiny-cpu-drpo").max_pairs == 4
    tiny = get_preset("tiny-cpu")
    assert tiny.max_pairs == 4 and tiny.baseline == "dpo" and tiny.runtime_measured
    assert not get_preset("gpu-small").runtime_measured and not get_preset("gpu-hh").runtime_measured
    small = override(tiny, ["seeds=[0]", "scenarios=[bt]", "pretrain.steps=7", "methods=vrpo_m1"])
    assert small.seeds == (0,) and small.scenarios == ("bt",) and small.pretrain.steps == 7
    assert [m.name for m in small.methods] == ["reference", "dpo", "vrpo_m1"] and small.max_pairs == 1
    for bad, match in (
        (["nope=1"], "unknown key"),
        (["pretrain.nope=1"], "unknown key"),
        (["methods=zzz"], "unknown"),
        (["judge=human"], "judge"),
        (["seeds=[1, 1]"], "distinct"),
        (["scenarios=[probt]"], "scenarios: unknown 'probt'; allowed: bt, probit"),  # before any work
        (["baseline=ghost"], "baseline"),
        (["data=dataset"], "preference_data"),
        (["x"], "KEY=VALUE"),
    ):
        with pytest.raises(InputError, match=match):
            override(tiny, bad)
    with pytest.raises(InputError, match="M >= 1"):
        MethodSpec("v", method="vrpo")
    with pytest.raises(InputError, match="g_hat"):
        MethodSpec("v", method="vrpo", M=1, g_hat="magic")
    with pytest.raises(InputError, match="drpo's judge is a reward model cross-fitted .* set g_hat: reward_model"):
        MethodSpec("d", method="drpo")
    with pytest.raises(InputError, match="own loss"):
        MethodSpec("d", method="drpo", g_hat="reward_model", loss="logistic")
    with pytest.raises(InputError, match="samples >= 1"):
        MethodSpec("d", method="drpo", g_hat="reward_model", samples=0)
    with pytest.raises(InputError, match="M applies"):
        MethodSpec("d", method="drpo", g_hat="reward_model", M=2)
    with pytest.raises(InputError, match="preset"):
        get_preset("huge")


def _shift_batch(b: int, m: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    margin = torch.randn(b, generator=gen, dtype=torch.float64)
    ref_margin = torch.randn(b, m, generator=gen, dtype=torch.float64)
    g = torch.rand(b, generator=gen, dtype=torch.float64)
    ref_g = torch.rand(b, m, generator=gen, dtype=torch.float64)
    return margin, ref_margin, g, ref_g


def test_error_bars_of_a_mean_outside_its_cut_interval() -> None:
    """A KL whose seed mean is below 0 (sample estimates of a policy near the reference) has its interval cut at
    0: the bar below the point is empty, not negative (matplotlib refuses negative lengths)."""
    import pandas as pd

    from robust_rlhf.llm.evaluate import seed_interval
    from robust_rlhf.llm.synthetic.plots import _errors

    m, lo, hi = seed_interval([-0.107, 0.071], bounds=(0.0, math.inf))
    assert m < 0 == lo < hi
    table = pd.DataFrame({"kl": [m, 0.5], "kl_ci_low": [lo, 0.25], "kl_ci_high": [hi, float("nan")]})
    np.testing.assert_allclose(_errors(table, "kl"), [[0.0, 0.25], [hi - m, 0.0]])


def test_oriented_margin_shift_logistic_closed_form() -> None:
    """In the label-independent order (Z = 1 when the chosen response is first, o = 2 Z - 1), the logistic
    projections are a = -(Z - s~), c = -(g~ - s~) + mean_j (g_j - s_j), with s~, g~ of that order."""
    margin, ref_margin, g, ref_g = _shift_batch(6, 3, 0)
    o = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    a, c = margin_shift_scores(Logistic(), margin, g, ref_margin, ref_g, orientation=o)
    z_fixed = (o > 0).double()
    s_fixed = torch.sigmoid(o * margin)
    g_fixed = torch.where(o > 0, g, 1 - g)
    torch.testing.assert_close(a, -(z_fixed - s_fixed))
    torch.testing.assert_close(c, -(g_fixed - s_fixed) + (ref_g - torch.sigmoid(ref_margin)).mean(-1))
    # all rows oriented chosen-first: the labelled pair is shifted like the reference pairs, as margin_shift does
    a1, c1 = margin_shift_scores(Logistic(), margin, g, ref_margin, ref_g, orientation=torch.ones(6, dtype=torch.float64))
    a0, c0 = margin_shift_scores(Logistic(), margin, g, ref_margin, ref_g)
    torch.testing.assert_close((a1, c1), (a0, c0))


def test_oriented_lambda_at_initialisation_is_m_over_m_plus_one() -> None:
    """At z = 0 with the oracle g and labels Z ~ Bernoulli(g), Cov(a, c) = Var(g) and
    Var(c) = Var(g) (1 + 1/M), so the variance-minimising lambda is M/(M + 1) (DESIGN.md 3.5)."""
    rng = np.random.default_rng(1)
    n, m = 40000, 4
    g12 = rng.uniform(0.05, 0.95, n)
    z = rng.random(n) < g12
    ref_g = torch.tensor(rng.uniform(0.05, 0.95, (n, m)))
    # data order: chosen first, so g_chosen = g12 if Z else 1 - g12; the fixed order is (y1, y2): o = 2 Z - 1
    g_chosen = torch.tensor(np.where(z, g12, 1 - g12))
    o = torch.tensor(np.where(z, 1.0, -1.0))
    zeros = torch.zeros(n, dtype=torch.float64)
    a, c = margin_shift_scores(Logistic(), zeros, g_chosen, torch.zeros(n, m, dtype=torch.float64), ref_g, o)
    lam = float(np.cov(a.numpy(), c.numpy())[0, 1] / c.numpy().var(ddof=1))
    # sampling error of a ratio of moments at n = 40000 is about 0.01 here; 0.04 is 4 of them
    assert lam == pytest.approx(m / (m + 1), abs=0.04)
    a_old, c_old = margin_shift_scores(Logistic(), zeros, g_chosen, torch.zeros(n, m, dtype=torch.float64), ref_g)
    assert float(a_old.std()) == 0.0  # the chosen-first projection has no label noise at z = 0


def test_oriented_shift_is_a_lambda_target() -> None:
    obj = PreferenceObjective.from_names("vrpo_tuned", lambda_target="oriented_shift")
    assert obj.lambda_target == "oriented_shift"


def test_collator_orientation_is_label_independent(tokenizer: Any) -> None:
    from robust_rlhf.llm.data import infer_schema
    from robust_rlhf.llm.tokenization import PreferenceCollator

    schema = infer_schema(["prompt", "chosen", "rejected"])
    ex = {"prompt_input_ids": [2, 5], "chosen_input_ids": [7, 8], "rejected_input_ids": [7, 9]}
    swapped = {"prompt_input_ids": [2, 5], "chosen_input_ids": [7, 9], "rejected_input_ids": [7, 8]}
    batch = PreferenceCollator(tokenizer.pad_token_id, schema)([ex, swapped])
    assert batch["orientation"].tolist() == [1.0, -1.0]  # the same pair, the two labels: opposite orientations
