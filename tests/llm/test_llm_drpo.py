"""The online DRPO trainer (``robust_rlhf.llm.drpo``): draws, judge, loss against theory, training, resume."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from llm_helpers import make_causal_lm, make_rows, seq_logp

from robust_rlhf.llm.auxiliary import CallableScorer
from robust_rlhf.llm.config import training_arguments
from robust_rlhf.llm.data import load_preference_data
from robust_rlhf.llm.drpo import DRPOTrainer
from robust_rlhf.llm.tokenization import TokenizeOptions, tokenize_dataset
from robust_rlhf.theory.drpo import drpo_sampled_loss
from robust_rlhf.theory.errors import InputError

BETA = 0.3
GOOD = "good"


def good_judge(prompt: Any, a: Any, b: Any) -> float:
    """A judge that prefers more occurrences of the word 'good': ``sigmoid(2 (count(a) - count(b)))``."""
    count = lambda r: (r if isinstance(r, str) else r[0]["content"]).split().count(GOOD)  # noqa: E731
    return 1.0 / (1.0 + math.exp(-2.0 * (count(a) - count(b))))


def _args(tmp_path: Any, **kw: Any) -> Any:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
                learning_rate=1e-2, use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                report_to="none", lr_scheduler_type="constant", dataloader_num_workers=0)
    base.update(kw)
    return training_arguments(**base)


def _data(tokenizer: Any, n: int = 8, seed: int = 0, preferences: bool = False, chat: bool = False,
          keep_text: bool = True):
    ds, schema = load_preference_data(make_rows(n, n_pairs=0, seed=seed, preferences=preferences, chat=chat))
    return tokenize_dataset(ds, tokenizer, schema, TokenizeOptions(), keep_text=keep_text), schema


def _trainer(tokenizer: Any, tmp_path: Any, tds: Any, schema: Any, **kw: Any) -> DRPOTrainer:
    options = dict(scorer=CallableScorer(good_judge), beta=BETA, samples=3, max_new_tokens=6)
    options.update(kw)
    model = options.pop("model", None) or make_causal_lm(tokenizer, seed=0)
    return DRPOTrainer(model, options.pop("args", None) or _args(tmp_path), schema=schema, train_dataset=tds,
                       processing_class=tokenizer, **options)


@pytest.mark.parametrize("preferences,chat", [(False, False), (True, False), (False, True)])
def test_loss_of_the_draws_equals_theory(tokenizer: Any, tmp_path: Any, preferences: bool, chat: bool) -> None:
    # the trainer's loss on its draws equals drpo_sampled_loss on log-probs scored one sequence at a time, with
    # the judge called on the decoded texts (and g_hat(y, y') from the column when the data have it)
    tds, schema = _data(tokenizer, n=4, seed=3, preferences=preferences, chat=chat)
    ref = make_causal_lm(tokenizer, seed=7)
    tr = _trainer(tokenizer, tmp_path, tds, schema, ref_model=ref)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    torch.manual_seed(0)
    draws = tr.draw(tr.model, batch)
    B, S = 4, 3
    assert len(draws.ids) == B * S and draws.samples == S
    eos = tokenizer.eos_token_id
    for i in range(B):
        row = tds[i]
        assert draws.prompt_ids[i] == row["prompt_input_ids"]
        assert draws.chosen_ids[i] == row["chosen_input_ids"] and draws.rejected_ids[i] == row["rejected_input_ids"]
    for ids, cut in zip(draws.ids, draws.truncated):
        assert 1 <= len(ids) <= 6 and eos not in ids[:-1]
        assert cut == (ids[-1] != eos and len(ids) == 6)
    tr.model.train()
    loss, metrics = tr.loss_of_draws(tr.model, batch, draws)
    lp = torch.tensor([[seq_logp(tr.model, draws.prompt_ids[i], r) for r in
                        [draws.chosen_ids[i], draws.rejected_ids[i], *draws.ids[i * S:(i + 1) * S]]] for i in range(B)])
    rf = torch.tensor([[seq_logp(ref, draws.prompt_ids[i], r) for r in
                        [draws.chosen_ids[i], draws.rejected_ids[i], *draws.ids[i * S:(i + 1) * S]]] for i in range(B)])
    rows = make_rows(4, n_pairs=0, seed=3, preferences=preferences, chat=chat)
    text = lambda r, t: t if not chat else [{"role": "assistant", "content": t}]  # noqa: E731
    g2 = torch.tensor([[good_judge(r["prompt"], text(r, draws.texts[i * S + s]), r["rejected"]) for s in range(S)]
                       for i, r in enumerate(rows)], dtype=torch.float64)
    g1 = torch.tensor([[good_judge(r["prompt"], r["chosen"], text(r, draws.texts[i * S + s])) for s in range(S)]
                       for i, r in enumerate(rows)], dtype=torch.float64)
    gp = torch.tensor([r["chosen_preference"] if preferences else good_judge(r["prompt"], r["chosen"], r["rejected"])
                       for r in rows], dtype=torch.float64)
    want = drpo_sampled_loss(lp[:, 2:], rf[:, 2:], g2, g1, lp[:, :2], rf[:, :2], gp, torch.ones(B, dtype=torch.float64),
                             BETA, tr.ratio_clip)
    assert tr.ratio_clip == 2.0
    assert float(loss.detach()) == pytest.approx(float(want.loss), abs=1e-5)
    assert metrics["drpo/win_rate"] == pytest.approx(float(want.win_rate.mean()), abs=1e-5)
    assert metrics["drpo/kl"] == pytest.approx(float(want.kl.mean()), abs=1e-5)
    assert metrics["drpo/g_labelled"] == pytest.approx(float(gp.mean()), abs=1e-6)
    assert metrics["generated/length"] == pytest.approx(np.mean([len(d) for d in draws.ids]))
    assert abs(float(want.kl.mean())) > 1e-3  # a distinct pi_hat: the log-ratios are not all zero


def test_draws_come_from_the_policy(tokenizer: Any, tmp_path: Any) -> None:
    # one-token draws: their frequencies match the policy's next-token distribution after the prompt (temperature
    # 1, no top-k/top-p, the checkpoint's generation settings blanked), within 4.5 binomial errors per token
    tds, schema = _data(tokenizer, n=4, seed=5)
    model = make_causal_lm(tokenizer, seed=2)
    model.generation_config.top_k = 3  # a checkpoint's setting that would reshape the draws
    tr = _trainer(tokenizer, tmp_path, tds, schema, model=model, samples=4000, max_new_tokens=1)
    batch = tr.data_collator([tr.train_dataset[0]])
    torch.manual_seed(1)
    draws = tr.draw(tr.model, batch)
    counts = np.bincount([d[0] for d in draws.ids], minlength=len(tokenizer))
    with torch.no_grad():
        p = torch.softmax(tr.model(input_ids=torch.tensor([draws.prompt_ids[0]])).logits[0, -1].double(), -1).numpy()
    se = np.sqrt(p * (1 - p) / 4000)
    assert np.all(np.abs(counts / 4000 - p) <= 4.5 * se + 1e-12)
    assert (counts > 0).sum() > 10  # not cut to the top 3


def _good_rate(trainer: DRPOTrainer, n: int = 16) -> float:
    """The share of 'good' among the policy's drawn tokens on the first training prompts."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    torch.manual_seed(123)
    draws = trainer.draw(trainer.model, batch)
    words = " ".join(draws.texts).split()
    return words.count(GOOD) / max(len(words), 1)


def test_training_raises_the_judged_win_rate(tokenizer: Any, tmp_path: Any) -> None:
    # the judge rewards 'good'; 40 steps of DRPO (ratio cap 2) raise its share of the drawn words four-fold and the
    # direct term of the win-rate estimate (the judge's verdict on the draws) by more than 0.15
    tds, schema = _data(tokenizer, n=16, seed=1)
    tr = _trainer(tokenizer, tmp_path, tds, schema, args=_args(tmp_path, max_steps=40, learning_rate=2e-2,
                                                               logging_steps=10), beta=0.05, samples=4)
    before = _good_rate(tr)
    tr.train()
    after = _good_rate(tr)
    logs = [e for e in tr.state.log_history if "drpo/win_rate" in e]
    assert after > 4 * before, (before, after)
    assert logs[-1]["drpo/direct"] > logs[0]["drpo/direct"] + 0.15
    assert logs[-1]["drpo/win_rate"] > 0.6 > logs[0]["drpo/win_rate"]
    assert all(math.isfinite(e["loss"]) for e in tr.state.log_history if "loss" in e)


def test_resume_continues_exactly(tokenizer: Any, tmp_path: Any) -> None:
    # 4 steps in one run, and 2 + 2 resumed from the checkpoint: the same draws (the generator state is saved)
    # and the same final weights
    tds, schema = _data(tokenizer, n=16, seed=2)
    full = _trainer(tokenizer, tmp_path / "a", tds, schema, args=_args(tmp_path / "a", max_steps=4))
    full.train()
    first = _trainer(tokenizer, tmp_path / "b", tds, schema,
                     args=_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2))
    first.train()
    resumed = _trainer(tokenizer, tmp_path / "b", tds, schema,
                       args=_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(full.model.parameters(),
                                                           make_causal_lm(tokenizer, seed=0).parameters()))
    assert moved > 1e-3


def test_evaluation_logs_the_estimates(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=8, seed=4)
    tr = _trainer(tokenizer, tmp_path, tds, schema)
    tr.eval_dataset = tds
    out = tr.evaluate()
    assert 0.0 <= out["eval_drpo/direct"] <= 1.0 and math.isfinite(out["eval_drpo/win_rate"])
    assert out["eval_drpo/kl"] == pytest.approx(0.0, abs=1e-5)  # pi_hat is the initial policy
    assert out["eval_drpo/ratio_chosen"] == pytest.approx(1.0, abs=1e-5)


def test_bad_settings_are_named(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=4)
    bare, _ = _data(tokenizer, n=4, keep_text=False)
    cases = [
        (dict(tds=bare), "train_dataset: no chosen, prompt, rejected column; DRPO's judge reads"),
        (dict(samples=0), "samples: the draws per row must be an integer >= 1"),
        (dict(ratio_clip=0.9), "ratio_clip: None or a number >= 1"),
        (dict(scorer="judge"), "scorer: expected a preference scorer"),
        (dict(precompute_ref_log_probs=True), "precompute_ref_log_probs: fixed by DRPO"),
        (dict(max_new_tokens=0), "max_new_tokens >= 1"),
    ]
    for change, message in cases:
        data = change.pop("tds", tds)
        with pytest.raises(InputError, match=message):
            _trainer(tokenizer, tmp_path, data, schema, **change)
    with pytest.raises(InputError, match=r"eval_dataset\['held'\]: no chosen, prompt, rejected column"):
        _trainer(tokenizer, tmp_path, tds, schema, eval_dataset={"held": bare})
    tr = _trainer(tokenizer, tmp_path, tds, schema, scorer=CallableScorer(lambda p, a, b: 1.5))
    with pytest.raises(InputError, match=r"g_hat callable: entry \(0,\) is 1.5"):
        tr.train()
