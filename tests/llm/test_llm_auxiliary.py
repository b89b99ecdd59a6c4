"""g_hat sources (llm.auxiliary), reference generation (llm.references) and the policy step (llm.policy)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from typing import Any

import pytest
import torch
from llm_helpers import make_causal_lm, make_reward_model, make_rows, oracle_g

from robust_rlhf.llm.auxiliary import (
    CallableScorer,
    FoldScorer,
    PairwiseModelScorer,
    RewardModelScorer,
    annotate,
    cached_annotate,
    cross_fit,
    cross_fit_scorer,
    load_callable,
    prompt_folds,
)
from robust_rlhf.llm.data import infer_schema, read_rows, row_problems
from robust_rlhf.llm.references import GenerationOptions, generate_references, vllm_available
from robust_rlhf.theory.errors import InputError


_oracle = oracle_g


def test_callable_scorer_annotates_every_pair() -> None:
    rows = make_rows(5, n_pairs=2, seed=40, preferences=False)
    schema = infer_schema(rows[0].keys())
    out = annotate(rows, schema, CallableScorer(_oracle))
    new_schema = infer_schema(out[0].keys())
    assert new_schema.has_preferences and new_schema.n_ref_pairs == 2
    for r in out:
        assert r["chosen_preference"] == _oracle(r["prompt"], r["chosen"], r["rejected"])
        assert r["rejected_preference"] == pytest.approx(1 - r["chosen_preference"])
        assert r["a_3_preference"] == _oracle(r["prompt"], r["a_3"], r["a_4"])
        assert row_problems(r, 0, new_schema) == []
    with pytest.raises(InputError, match=r"g_hat callable: entry \(0,\) is 1.5, but probabilities must lie in"):
        annotate(rows, schema, CallableScorer(lambda p, a, b: 1.5))
    # a callable returning something other than a number (it was a raw ValueError or TypeError)
    for value, needle in (("high", "cannot be read as numbers"), (None, "is nan"),
                          ([0.2, 0.8], "expected 1 axes"), (float("nan"), "is nan")):
        with pytest.raises(InputError, match=rf"g_hat callable: .*{needle}"):
            annotate(rows, schema, CallableScorer(lambda p, a, b, v=value: v))
    with pytest.raises(InputError, match=r"g_hat scorer: expected shape \(\d+,\) to match its pairs, got \(1,\)"):
        annotate(rows, schema, lambda p, a, b: [0.5])


def test_reward_model_scorer_is_sigmoid_of_reward_difference(tokenizer: Any) -> None:
    model = make_reward_model(tokenizer, seed=2)
    scorer = RewardModelScorer(model, tokenizer, batch_size=3)
    rows = make_rows(4, n_pairs=1, seed=41, preferences=False)
    prompts = [r["prompt"] for r in rows]
    g = scorer(prompts, [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    model.eval()
    with torch.no_grad():

        def r_of(p: str, y: str) -> float:
            ids = [tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]
            ids += tokenizer(y, add_special_tokens=False)["input_ids"]
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

        want = [
            torch.sigmoid(torch.tensor(r_of(r["prompt"], r["chosen"]) - r_of(r["prompt"], r["rejected"]))).item()
            for r in rows
        ]
        empty = r_of(prompts[0], "")  # a draw that ended at once: the prompt alone
    assert g == pytest.approx(want, abs=1e-5)
    assert scorer.rewards(prompts[:1], [""]).tolist() == pytest.approx([empty], abs=1e-5)
    # chat rows go through the chat template
    chat = make_rows(2, n_pairs=1, seed=42, chat=True, preferences=False)
    messages = scorer.rewards([c["prompt"] for c in chat], [c["chosen"] for c in chat])
    assert len(messages) == 2
    # a generated text (best of n, the reward-model judge) answering a chat prompt is the assistant turn the
    # reward model was trained on (it was appended raw after the generation prompt: another input)
    texts = [c["chosen"][0]["content"] for c in chat]
    assert all(c["chosen"] == [{"role": "assistant", "content": t}] for c, t in zip(chat, texts))
    torch.testing.assert_close(scorer.rewards([c["prompt"] for c in chat], texts), messages, rtol=0, atol=0)
    with pytest.raises(InputError, match=r"sequences to score reach \d+ tokens, beyond the model's 128 positions"):
        scorer.rewards(prompts[:1], [" ".join([rows[0]["chosen"]] * 40)])  # was an IndexError inside the model


def test_pairwise_scorer_symmetrised_sums_to_one(tokenizer: Any) -> None:
    model = make_reward_model(tokenizer, seed=6)
    rows = make_rows(3, n_pairs=1, seed=43, preferences=False)
    p, a, b = [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    sym = PairwiseModelScorer(model, tokenizer, template="{prompt} A : {first} B : {second}")
    g_ab, g_ba = sym(p, a, b), sym(p, b, a)
    assert [x + y for x, y in zip(g_ab, g_ba)] == pytest.approx([1.0] * 3, abs=1e-6)
    raw = PairwiseModelScorer(model, tokenizer, template="{prompt} A : {first} B : {second}", symmetrize=False)
    assert abs(raw(p, a, b)[0] + raw(p, b, a)[0] - 1.0) > 1e-6  # an untrained model is position-biased


def test_cross_fit_never_scores_a_row_with_a_model_fitted_on_it() -> None:
    rows = make_rows(10, n_pairs=1, seed=44, preferences=False)
    schema = infer_schema(rows[0].keys())
    seen: list[set[str]] = []

    def fit(train_rows: list[dict]) -> Any:
        keys = {r["prompt"] + "|" + r["chosen"] for r in train_rows}
        seen.append(keys)
        fold = len(seen) - 1

        def g(prompt: str, a: str, b: str) -> float:
            return fold / 10  # which fitted model scored the row

        return CallableScorer(g)

    out = cross_fit(rows, schema, 3, fit, seed=1)
    assert len(seen) == 3 and sorted(len(s) for s in seen) == [6, 7, 7]
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]
    for r in out:
        fold = round(r["chosen_preference"] * 10)
        assert r["prompt"] + "|" + r["chosen"] not in seen[fold]
        assert r["a_1_preference"] == r["chosen_preference"]
    with pytest.raises(InputError, match="folds"):
        cross_fit(rows, schema, 1, fit)


def test_cross_fit_scorer_routes_each_prompt_to_the_model_without_it() -> None:
    """Folds of the prompts (rows sharing a prompt share a fold), one model per fold fitted on the other folds'
    rows, each pair scored by its prompt's model, in the caller's order; a prompt of no fold by their mean."""
    rows = make_rows(6, n_pairs=0, seed=46, preferences=False)
    rows += [dict(rows[0], chosen=rows[1]["chosen"]), dict(rows[2], rejected=rows[3]["rejected"])]
    fold_of = prompt_folds(rows, 3, seed=2)
    assert sorted(fold_of.values()) == [0, 0, 1, 1, 2, 2] and len(fold_of) == 6
    seen: list[set[str]] = []

    def fit(train_rows: list[dict]) -> Any:
        seen.append({r["prompt"] for r in train_rows})
        return CallableScorer(lambda prompt, a, b, fold=len(seen) - 1: fold / 10)

    scorer = cross_fit_scorer(rows, 3, fit, seed=2)
    assert isinstance(scorer, FoldScorer) and scorer.fold_of == fold_of
    assert all(p not in seen[k] for p, k in fold_of.items()) and all(len(s) == 4 for s in seen)
    prompts = [r["prompt"] for r in rows][::-1]
    got = scorer(prompts, ["x"] * len(prompts), ["y"] * len(prompts))
    assert got == [fold_of[p] / 10 for p in prompts]
    assert scorer(["an unseen prompt", prompts[0]], ["x"] * 2, ["y"] * 2) == pytest.approx([0.1, fold_of[prompts[0]] / 10])
    with pytest.raises(InputError, match="distinct prompts"):
        prompt_folds(rows[:1] * 3, 2)


def test_cached_annotate_computes_once(tmp_path: Any) -> None:
    rows = make_rows(4, n_pairs=1, seed=45, preferences=False)
    schema = infer_schema(rows[0].keys())
    calls = []

    def compute() -> list[dict]:
        calls.append(1)
        return annotate(rows, schema, CallableScorer(_oracle))

    a = cached_annotate(rows, schema, compute, tmp_path, key="oracle")
    b = cached_annotate(rows, schema, compute, tmp_path, key="oracle")
    assert len(calls) == 1 and a == b
    cached_annotate(rows, schema, compute, tmp_path, key="another source")
    assert len(calls) == 2


def test_load_callable(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_callable("math:sqrt")(4.0) == 2.0
    with pytest.raises(InputError, match="g_callable: 'math.sqrt': expected MODULE:FUNCTION"):
        load_callable("math.sqrt")
    with pytest.raises(InputError, match="g_callable: cannot import 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:f")
    with pytest.raises(InputError, match="has no attribute 'no_such_fn'"):
        load_callable("math:no_such_fn")
    # a module in the current directory, by name or by file, as `robust-rlhf check` finds it
    (tmp_path / "my_judge_mod.py").write_text("def judge(p, a, b):\n    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    try:
        assert load_callable("my_judge_mod:judge")("p", "a", "b") == 0.25
        assert load_callable("my_judge_mod.py:judge")("p", "a", "b") == 0.25
    finally:
        sys.modules.pop("my_judge_mod", None)


def test_generate_references_resumes_to_the_same_file(tokenizer: Any, tmp_path: Any) -> None:
    model = make_causal_lm(tokenizer, seed=0)
    rows = make_rows(5, n_pairs=1, seed=46)  # old a_1/a_2 and probabilities are replaced
    opts = GenerationOptions(n_pairs=2, max_new_tokens=4, batch_size=2, seed=3)
    full = tmp_path / "full.jsonl"
    assert generate_references(rows, full, opts, model=model, tokenizer=tokenizer) == 5
    # past the model's 128 learned positions: one clear line (it was an IndexError inside the model)
    with pytest.raises(InputError, match=r"plus max_new_tokens = 500 exceed the model's 128 positions"):
        generate_references(rows, tmp_path / "long.jsonl", GenerationOptions(n_pairs=1, max_new_tokens=500),
                            model=model, tokenizer=tokenizer)
    part = tmp_path / "part.jsonl"
    assert generate_references(rows, part, opts, model=model, tokenizer=tokenizer, max_batches=1) == 2
    # resuming with other settings would mix two samplers in one file
    for other, change in ((dict(n_pairs=3), "n_pairs: 2 -> 3"), (dict(seed=7), "seed: 3 -> 7")):
        with pytest.raises(InputError, match=rf"was started with other settings \({change}\)"):
            generate_references(rows, part, GenerationOptions(**{**dataclasses.asdict(opts), **other}), model=model,
                                tokenizer=tokenizer)
    assert generate_references(rows, part, opts, model=model, tokenizer=tokenizer) == 5
    assert part.read_text() == full.read_text()
    # an interruption inside a batch's write (a line cut short, a batch cut short): the batch is drawn again
    lines = full.read_text().splitlines(keepends=True)
    for kept in ("".join(lines[:3]) + lines[3][:9], "".join(lines[:3]), lines[0][:-1]):
        part.write_text(kept)
        assert generate_references(rows, part, opts, model=model, tokenizer=tokenizer) == 5
        assert part.read_text() == full.read_text()
    # a file not written by generate_references (the input itself, another tool's output) is not taken as done
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(full.read_text())
    with pytest.raises(InputError, match=r"exists but was not written by generate_references.*--no-resume"):
        generate_references(rows, foreign, opts, model=model, tokenizer=tokenizer)
    assert foreign.read_text() == full.read_text()
    assert generate_references(rows, foreign, opts, model=model, tokenizer=tokenizer, resume=False) == 5
    out = read_rows(full)
    assert all(f"a_{k}" in r for r in out for k in range(1, 5))
    assert all("a_1_preference" not in r and "chosen_preference" in r for r in out)
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]
    assert any(out[0]["a_1"] != out[0][f"a_{k}"] for k in (2, 3, 4))  # sampled, not greedy copies
    # a finished file is left alone; another input is refused
    assert generate_references(rows, full, opts, model=model, tokenizer=tokenizer) == 5
    other = make_rows(5, n_pairs=0, seed=47)
    with pytest.raises(InputError, match="another prompt"):
        generate_references(other, part, opts, model=model, tokenizer=tokenizer)
    # chat prompts get assistant messages
    chat = make_rows(2, n_pairs=0, seed=48, chat=True)
    generate_references(
        chat, tmp_path / "chat.jsonl", GenerationOptions(n_pairs=1, max_new_tokens=3), model=model, tokenizer=tokenizer
    )
    first = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
    assert first["a_1"][0]["role"] == "assistant"
    if not vllm_available():
        with pytest.raises(InputError, match="vLLM is not installed"):
            generate_references(
                rows, tmp_path / "v.jsonl", GenerationOptions(backend="vllm"), tokenizer=tokenizer, model_path="x"
            )


def test_best_of_n_picks_the_highest_reward(tokenizer: Any) -> None:
    from robust_rlhf.llm.policy import best_of_n

    policy = make_causal_lm(tokenizer, seed=0)
    scorer = RewardModelScorer(make_reward_model(tokenizer, seed=2), tokenizer)
    prompts = [r["prompt"] for r in make_rows(3, n_pairs=0, seed=49)]
    out = best_of_n(prompts, policy, tokenizer, scorer, n=4, options=GenerationOptions(max_new_tokens=4, batch_size=2))
    assert len(out) == 3
    for o in out:
        r = scorer.rewards([o["prompt"]] * 4, o["candidates"])
        assert r.tolist() == pytest.approx(o["rewards"], abs=1e-5)
        assert o["reward"] == pytest.approx(max(o["rewards"])) and o["response"] == o["candidates"][int(r.argmax())]

    class NaNScorer:  # torch.argmax takes a NaN for the largest reward: it was picked
        def rewards(self, prompts: Any, responses: Any) -> Any:
            r = scorer.rewards(prompts, responses)
            r[5] = float("nan")
            return r

    with pytest.raises(InputError, match="NaN for a response to prompt 2"):
        best_of_n(prompts, policy, tokenizer, NaNScorer(), n=4, options=GenerationOptions(max_new_tokens=4, batch_size=2))


def test_rl_step_needs_trl_and_uses_its_public_api(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from robust_rlhf.llm.policy import train_rl_policy

    scorer = RewardModelScorer(make_reward_model(tokenizer, seed=2), tokenizer)
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    with pytest.raises(InputError, match="pip install trl"):
        train_rl_policy("grpo", "some-model", scorer, [], "out")
    with pytest.raises(InputError, match="algorithm"):
        train_rl_policy("ppo", "some-model", scorer, [], "out")

    calls: dict[str, Any] = {}

    class FakeConfig:
        def __init__(self, **kw: Any) -> None:
            calls["config"] = kw

    class FakeTrainer:
        def __init__(self, model: Any, reward_funcs: Any, args: Any, train_dataset: Any, processing_class: Any) -> None:
            calls["init"] = dict(model=model, args=args, train_dataset=train_dataset)
            calls["reward"] = reward_funcs

        def train(self) -> None:
            calls["trained"] = True

    fake = types.ModuleType("trl")
    fake.RLOOTrainer, fake.RLOOConfig = FakeTrainer, FakeConfig
    monkeypatch.setitem(sys.modules, "trl", fake)
    train_rl_policy("rloo", "policy-path", scorer, ["ds"], "out", learning_rate=1e-6)
    assert calls["trained"] and calls["config"] == {"output_dir": "out", "learning_rate": 1e-6}
    prompts, completions = ["the cat", "a dog"], ["is blue", "runs"]
    assert calls["reward"](prompts=prompts, completions=completions, completion_ids=None) == pytest.approx(
        scorer.rewards(prompts, completions).tolist()
    )
    with pytest.raises(InputError, match="no GRPOTrainer"):
        train_rl_policy("grpo", "policy-path", scorer, ["ds"], "out")


def test_sampling_ignores_the_checkpoints_generation_defaults(tokenizer: Any, tmp_path: Any) -> None:
    """Draws from pi_ref and the KL need the model's own distribution: a checkpoint's repetition penalty,
    n-gram ban or min_p must not reshape it (``generate`` fills unset settings from the checkpoint)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from robust_rlhf.llm.evaluate import sample_policy
    from robust_rlhf.llm.references import sample_tokens

    plain = make_causal_lm(tokenizer, seed=0)
    plain.save_pretrained(tmp_path / "m")
    GenerationConfig(do_sample=True, repetition_penalty=3.0, no_repeat_ngram_size=1, min_p=0.3, top_k=5).save_pretrained(tmp_path / "m")
    shaped = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert shaped.generation_config.repetition_penalty == 3.0
    opts = GenerationOptions(max_new_tokens=12, min_new_tokens=12)
    prompts = [[tokenizer.bos_token_id, 5, 6], [tokenizer.bos_token_id, 7]]
    draws = []
    for model in (plain, shaped):
        torch.manual_seed(0)
        draws.append(sample_tokens(model, prompts, 3, opts, tokenizer.pad_token_id, None))
    assert torch.equal(draws[0], draws[1])
    assert shaped.generation_config.repetition_penalty == 3.0  # the checkpoint's settings are restored
    # the checkpoint's settings would have changed the draws (the n-gram ban: no token twice)
    torch.manual_seed(0)
    banned = shaped.generate(input_ids=torch.tensor([prompts[0]]), do_sample=True, max_new_tokens=12, min_new_tokens=12,
                             pad_token_id=tokenizer.pad_token_id)[0, 3:]
    assert len(set(banned.tolist())) == 12 and not torch.equal(banned, draws[0][0])
    rows = make_rows(3, n_pairs=0, seed=50)
    texts = [sample_policy(m, tokenizer, [r["prompt"] for r in rows], opts, seed=1).texts for m in (plain, shaped)]
    assert texts[0] == texts[1]


def test_blank_reference_responses_are_drawn_again(tokenizer: Any, tmp_path: Any, monkeypatch: Any) -> None:
    """A response that decodes to blank text is drawn again (the data format needs one); one that stays
    blank fails with its row and column named, before the batch is written."""
    import robust_rlhf.llm.references as refs

    calls: list[int] = []

    def blank_at_first(model: Any, tok: Any, prompts: Any, n: int, options: Any, seed: int) -> list[list[str]]:
        calls.append(seed)
        return [["" if len(calls) == 1 and k == 1 else f"r{seed}-{k}" for k in range(n)] for _ in prompts]

    monkeypatch.setattr(refs, "sample_responses", blank_at_first)
    rows = make_rows(3, n_pairs=0, seed=51)
    opts = GenerationOptions(n_pairs=1, batch_size=2, seed=0)
    assert generate_references(rows, tmp_path / "a.jsonl", opts, model=object(), tokenizer=tokenizer) == 3
    out = read_rows(tmp_path / "a.jsonl")
    assert calls == [0, 3, 2]  # batch 0, its redraw (seed beyond every batch's), batch 1
    assert [r["a_2"] for r in out] == ["r3-0", "r3-0", "r2-1"] and out[0]["a_1"] == "r0-0"
    monkeypatch.setattr(refs, "sample_responses", lambda *a: [["", " \n"] for _ in a[2]])
    with pytest.raises(InputError, match="row 1, column a_1: the reference policy gave a blank response 6 times"):
        generate_references(rows, tmp_path / "b.jsonl", opts, model=object(), tokenizer=tokenizer)
    assert not (tmp_path / "b.jsonl").exists() or read_rows(tmp_path / "b.jsonl") == []


def test_model_paths_that_hold_no_model_are_named(tokenizer: Any, tmp_path: Any) -> None:
    from robust_rlhf.llm.models import load_causal_lm, load_tokenizer

    with pytest.raises(InputError, match=f"cannot load the tokenizer '{tmp_path / 'nope'}': no such folder"):
        load_tokenizer(str(tmp_path / "nope"))
    tokenizer.save_pretrained(tmp_path / "tok_only")
    with pytest.raises(InputError, match=f"cannot load the causal LM '{tmp_path / 'tok_only'}'"):
        load_causal_lm(str(tmp_path / "tok_only"))
