"""Trainer golden tests: the loss of a hand-made batch equals theory's closed form, for every method and loss.

The expected values never go through the trainer's batching: each sequence is scored on its own
(no padding), then theory.losses is applied to the resulting margins.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llm_helpers import make_causal_lm, make_reward_model, make_rows, seq_logp

from robust_rlhf.llm.config import training_arguments
from robust_rlhf.llm.data import load_preference_data
from robust_rlhf.llm.objectives import LambdaEstimator, PreferenceObjective
from robust_rlhf.llm.tokenization import REF_LOGPS, PreferenceCollator, TokenizeOptions, tokenize_dataset
from robust_rlhf.llm.trainers import PreferenceTrainer, RewardTrainer
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.losses import pair_loss, robust_pair_loss, vr_objective

BETA = 0.7
METHODS = ["mle", "cdpo", "rdpo", "vrpo", "vrpo_tuned"]
LOSSES = ["logistic", "truncated_hinge", "hinge", "ipo"]


def _args(tmp_path: Any, **kw: Any) -> Any:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        report_to="none",
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
    )
    base.update(kw)
    return training_arguments(**base)


def _data(tokenizer: Any, n: int = 4, n_pairs: int = 2, seed: int = 0, eos: bool = True, **kw: Any):
    ds, schema = load_preference_data(make_rows(n, n_pairs=n_pairs, seed=seed, **kw))
    return tokenize_dataset(ds, tokenizer, schema, TokenizeOptions(add_eos=eos)), schema


def _expected_margins(policy: Any, ref: Any, tds: Any, schema: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled margins (B,) and reference margins (B, M) from sequence-by-sequence scoring."""
    B = len(tds)
    cols = schema.response_columns
    h = torch.zeros(len(cols), B, dtype=torch.float64)
    for i in range(B):
        p = tds[i]["prompt_input_ids"]
        for k, c in enumerate(cols):
            r = tds[i][f"{c}_input_ids"]
            h[k, i] = seq_logp(policy, p, r) - seq_logp(ref, p, r)
    h = BETA * h
    return h[0] - h[1], (h[2::2] - h[3::2]).T


def _expected_loss(
    obj: PreferenceObjective, margin: torch.Tensor, ref_margin: torch.Tensor, g: torch.Tensor, ref_g: torch.Tensor
) -> float:
    ones = torch.ones_like(margin)
    if obj.method == "mle":
        return float(pair_loss(obj.loss, margin, ones).mean())
    if obj.method == "cdpo":
        return float(pair_loss(obj.loss, margin, 1 - obj.eps).mean())
    if obj.method == "rdpo":
        return float(robust_pair_loss(obj.loss, margin, obj.eps).mean())
    lam = obj.lam  # vrpo_tuned: a step uses the estimate of the steps before it, at the first step the start
    return float(
        vr_objective(
            obj.loss, margin[None], ones[None], g[None], ref_margin.reshape(1, -1), ref_g.reshape(1, -1), lam=lam
        )[0]
    )


def test_one_stage_loss_equals_theory_for_every_method_and_loss(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=4, n_pairs=2, seed=11)
    policy, ref = make_causal_lm(tokenizer, seed=0), make_causal_lm(tokenizer, seed=5)
    trainer = PreferenceTrainer(
        policy,
        _args(tmp_path),
        objective=PreferenceObjective.from_names("vrpo"),
        schema=schema,
        beta=BETA,
        ref_model=ref,
        train_dataset=tds,
        processing_class=tokenizer,
    )
    assert REF_LOGPS in trainer.train_dataset.column_names  # precomputed in one pass, reference dropped
    assert trainer.ref_model is None
    margin, ref_margin = _expected_margins(policy, ref, tds, schema)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    g, ref_g = batch["g"].double(), batch["ref_g"].double()
    assert margin.abs().min() > 1e-3  # a distinct reference: the margins are not all zero
    for method in METHODS:
        for loss in LOSSES:
            obj = PreferenceObjective.from_names(method, loss, lam=0.6, eps=0.15)
            trainer.objective = obj
            trainer.lambda_estimator = LambdaEstimator(obj.lam) if method == "vrpo_tuned" else None
            trainer.model.train()
            got = trainer.compute_loss(trainer.model, batch).item()
            want = _expected_loss(obj, margin, ref_margin, g, ref_g)
            assert got == pytest.approx(want, abs=2e-5), (method, loss)
            if method == "vrpo_tuned":  # the batch's rows are folded in after it: lam_hat = Cov(A, C) / Var(C)
                A = pair_loss(obj.loss, margin, torch.ones_like(margin))
                C = pair_loss(obj.loss, margin, g) - pair_loss(obj.loss, ref_margin, ref_g).mean(-1)
                lam = float(torch.cov(torch.stack([A, C]))[0, 1] / C.var())
                assert trainer.lambda_estimator.value == pytest.approx(min(1.0, max(0.0, lam)), abs=1e-5), loss


def test_reward_model_loss_equals_theory_for_every_method_with_prompt_and_centering(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=4, n_pairs=1, seed=12, eos=False)
    model = make_reward_model(tokenizer, seed=3)
    trainer = RewardTrainer(
        model,
        _args(tmp_path),
        objective=PreferenceObjective.from_names("vrpo", "truncated_hinge"),
        schema=schema,
        train_dataset=tds,
        processing_class=tokenizer,
        center_rewards_coefficient=0.3,
    )
    batch = trainer.data_collator([tds[i] for i in range(4)])
    with torch.no_grad():
        r = torch.zeros(4, 4, dtype=torch.float64)  # (response, row)
        for i in range(4):
            for k, c in enumerate(schema.response_columns):
                ids = torch.tensor([tds[i]["prompt_input_ids"] + tds[i][f"{c}_input_ids"]])
                r[k, i] = model(input_ids=ids).logits[0, 0].double()
        # the prompt is part of the input: dropping it changes the score
        ids = torch.tensor([tds[0]["chosen_input_ids"]])
        assert abs(model(input_ids=ids).logits[0, 0].item() - r[0, 0].item()) > 1e-4
    margin, ref_margin = r[0] - r[1], (r[2] - r[3])[:, None]
    ones = torch.ones_like(margin)
    want = vr_objective(
        trainer.objective.loss,
        margin[None],
        ones[None],
        batch["g"].double()[None],
        ref_margin.reshape(1, -1),
        batch["ref_g"].double().reshape(1, -1),
        lam=1.0,
    )[0]
    centring = 0.3 * float(((r[0] + r[1]) ** 2).mean())
    model.train()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(float(want) + centring, abs=2e-5)
    for method in METHODS:  # every other method and loss on the same reward margins
        for loss in LOSSES:
            obj = PreferenceObjective.from_names(method, loss, lam=0.6, eps=0.15)
            trainer.objective = obj
            trainer.lambda_estimator = LambdaEstimator(obj.lam) if method == "vrpo_tuned" else None
            want = _expected_loss(obj, margin, ref_margin, batch["g"].double(), batch["ref_g"].double())
            assert trainer.compute_loss(model, batch).item() == pytest.approx(want + centring, abs=2e-5), (method, loss)


def _train(trainer: Any) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_lambda_zero_trains_exactly_like_dpo(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=8, n_pairs=1, seed=13)
    runs = []
    for obj in (PreferenceObjective.from_names("vrpo", lam=0.0), PreferenceObjective.from_names("dpo")):
        model = make_causal_lm(tokenizer, seed=0)
        tr = PreferenceTrainer(
            model,
            _args(tmp_path / obj.method, max_steps=3),
            objective=obj,
            schema=schema,
            beta=BETA,
            train_dataset=tds,
            processing_class=tokenizer,
            # one padded pass each: grouping 4 vs 2 sequences by length would change float32 rounding,
            # which Adam's first steps amplify; grouping itself is tested below
            length_groups=1,
        )
        runs.append((_train(tr), [p.detach().clone() for p in model.parameters()]))
    (l1, p1), (l2, p2) = runs
    assert l1 == pytest.approx(l2, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p1, p2))


@pytest.mark.parametrize("peft", [False, True])
def test_a_few_steps_change_every_trainable_parameter(tokenizer: Any, tmp_path: Any, peft: bool) -> None:
    tds, schema = _data(tokenizer, n=8, n_pairs=1, seed=14)
    model = make_causal_lm(tokenizer, seed=0)
    if peft:
        from robust_rlhf.llm.models import apply_lora

        model = apply_lora(model, r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr = PreferenceTrainer(
        model,
        _args(tmp_path, max_steps=3),
        objective=PreferenceObjective.from_names("vrpo"),
        schema=schema,
        beta=BETA,
        train_dataset=tds,
        processing_class=tokenizer,
    )
    _train(tr)
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert before and unchanged == []
    if peft:
        assert all("lora" in n for n in before)


def test_precomputed_reference_equals_live_reference(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=8, n_pairs=1, seed=15)
    ref = make_causal_lm(tokenizer, seed=9)
    losses = []
    for precompute in (True, False):
        model = make_causal_lm(tokenizer, seed=0)
        tr = PreferenceTrainer(
            model,
            _args(tmp_path / str(precompute), max_steps=3),
            objective=PreferenceObjective.from_names("vrpo_tuned"),
            schema=schema,
            beta=BETA,
            ref_model=copy.deepcopy(ref),
            precompute_ref_log_probs=precompute,
            train_dataset=tds,
            processing_class=tokenizer,
        )
        assert (REF_LOGPS in tr.train_dataset.column_names) == precompute
        assert (tr.ref_model is None) == precompute
        losses.append(_train(tr))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_lora_reference_is_the_disabled_adapter(tokenizer: Any, tmp_path: Any) -> None:
    from robust_rlhf.llm.models import apply_lora

    tds, schema = _data(tokenizer, n=4, n_pairs=1, seed=16)
    base = make_causal_lm(tokenizer, seed=0)
    base_copy = copy.deepcopy(base)
    model = apply_lora(base, r=4, alpha=8)
    with torch.no_grad():  # make the adapter non-trivial so policy != reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    tr_live = PreferenceTrainer(
        model,
        _args(tmp_path / "a"),
        objective=PreferenceObjective.from_names("mle"),
        schema=schema,
        beta=BETA,
        precompute_ref_log_probs=False,
        train_dataset=tds,
        processing_class=tokenizer,
    )
    tr_pre = PreferenceTrainer(
        model,
        _args(tmp_path / "b"),
        objective=PreferenceObjective.from_names("mle"),
        schema=schema,
        beta=BETA,
        precompute_ref_log_probs=True,
        train_dataset=tds,
        processing_class=tokenizer,
    )
    # the MLE never scores reference responses: only chosen and rejected are in the batch
    assert tr_pre.schema.response_columns == ["chosen", "rejected"]
    # the precomputed reference log-probs are those of the base model (adapter disabled)
    for i in range(4):
        p = tds[i]["prompt_input_ids"]
        want = [seq_logp(base_copy, p, tds[i][f"{c}_input_ids"]) for c in ("chosen", "rejected")]
        assert tr_pre.train_dataset[i][REF_LOGPS] == pytest.approx(want, abs=1e-4)
    batch = tr_live.data_collator([tr_pre.train_dataset[i] for i in range(4)])
    live_batch = {k: v for k, v in batch.items() if k != REF_LOGPS}
    model.train()
    a = tr_live.compute_loss(model, live_batch).item()
    b = tr_pre.compute_loss(model, batch).item()
    assert a == pytest.approx(b, abs=1e-5) and abs(a - math.log(2)) > 1e-4


def test_frozen_g_without_preference_columns(tokenizer: Any, tmp_path: Any) -> None:
    """The authors' frozen-copy option, on data with no *_preference columns at all."""
    tds, schema = _data(tokenizer, n=8, n_pairs=1, seed=17, preferences=False)
    assert not schema.has_preferences
    with pytest.raises(InputError, match="g_source='columns' needs"):
        PreferenceTrainer(
            make_causal_lm(tokenizer),
            _args(tmp_path),
            objective=PreferenceObjective.from_names("vrpo"),
            schema=schema,
            train_dataset=tds,
            processing_class=tokenizer,
        )
    model = make_causal_lm(tokenizer, seed=0)
    tr = PreferenceTrainer(
        model,
        _args(tmp_path, max_steps=3),
        objective=PreferenceObjective.from_names("vrpo"),
        schema=schema,
        beta=BETA,
        train_dataset=tds,
        processing_class=tokenizer,
        g_source="frozen",
        frozen_refresh_steps=2,
    )
    batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(4)]))
    g, ref_g = tr._g_hat(batch, training=True)  # step 0: frozen copy == reference, so g = sigmoid(0)
    torch.testing.assert_close(g, torch.full_like(g, 0.5))
    logs = _train(tr)
    assert len(logs) == 3 and tr._frozen_step == 2  # refreshed at steps 0 and 2
    # after training the frozen copy holds the step-2 weights: g = sigmoid(beta * frozen log-ratio margin)
    g, ref_g = tr._g_hat(batch, training=False)
    with torch.no_grad():
        lp_f = torch.stack(
            [
                torch.tensor(seq_logp(tr.frozen_model, tds[i]["prompt_input_ids"], tds[i][f"{c}_input_ids"]))
                for c in schema.response_columns
                for i in range(4)
            ]
        ).view(4, 4)
    ref = batch[REF_LOGPS].T.double()
    h = BETA * (lp_f - ref)
    torch.testing.assert_close(g.double(), torch.sigmoid(h[0] - h[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_g[:, 0].double(), torch.sigmoid(h[2] - h[3]), atol=1e-5, rtol=0)
    assert not torch.allclose(g, torch.full_like(g, 0.5))


def test_metrics_are_trl_names_and_gathered_variances(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=4, n_pairs=2, seed=18)
    model = make_causal_lm(tokenizer, seed=0)
    tr = PreferenceTrainer(
        model,
        _args(tmp_path, max_steps=1, learning_rate=0.0),
        objective=PreferenceObjective.from_names("vrpo_tuned", lambda_target="margin_shift"),
        schema=schema,
        beta=BETA,
        ref_model=make_causal_lm(tokenizer, seed=4),
        train_dataset=tds,
        processing_class=tokenizer,
    )
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    tr.train()
    log = tr.state.log_history[0]
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "vrpo/labelled",
        "vrpo/control",
        "vrpo/reference",
        "vrpo/g_labelled",
        "vrpo/g_reference",
        "vrpo/lambda",
        "vrpo/var_loss_mle",
        "vrpo/var_loss_vr",
        "vrpo/var_grad_mle",
        "vrpo/var_grad_vr",
    ]:
        assert key in log, key
    # one batch of all rows (shuffled order does not matter for means and variances)
    assert log["vrpo/g_labelled"] == pytest.approx(batch["g"].mean().item(), abs=1e-6)
    assert log["vrpo/g_reference"] == pytest.approx(batch["ref_g"].mean().item(), abs=1e-6)
    obj = tr.objective
    margin = torch.tensor(0.0)
    with torch.no_grad():
        s = tr._scores(model, batch)
        margin, ref_margin = s["margin"].double(), s["ref_margin"].double()
    g, ref_g = batch["g"].double(), batch["ref_g"].double()
    A = pair_loss(obj.loss, margin, 1.0)
    C = pair_loss(obj.loss, margin, g) - pair_loss(obj.loss, ref_margin, ref_g).mean(-1)
    # margin-shift projections for the logistic loss: a = -(1 - s), c = -(g - s) + mean_j (g_j - s_j)
    sg, sr = torch.sigmoid(margin), torch.sigmoid(ref_margin)
    a, c = -(1 - sg), -(g - sg) + (ref_g - sr).mean(-1)
    lam_hat = float(min(1.0, max(0.0, torch.cov(torch.stack([a, c]))[0, 1] / c.var())))
    # the step used the starting lam; its rows give the next step's
    lam = obj.lam
    assert log["vrpo/lambda"] == lam and tr.lambda_estimator.value == pytest.approx(lam_hat, abs=1e-5)
    assert log["vrpo/var_loss_mle"] == pytest.approx(A.var().item(), rel=1e-4, abs=1e-9)
    assert log["vrpo/var_loss_vr"] == pytest.approx((A - lam * C).var().item(), rel=1e-4, abs=1e-9)
    assert log["vrpo/var_grad_mle"] == pytest.approx(a.var().item(), rel=1e-4, abs=1e-9)
    assert log["vrpo/var_grad_vr"] == pytest.approx((a - lam * c).var().item(), rel=1e-4, abs=1e-9)
    assert (a - lam_hat * c).var() <= (a - lam * c).var() + 1e-12  # lam_hat minimises this variance
    assert log["rewards/margins"] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert log["loss"] == pytest.approx((A - lam * C).mean().item(), abs=1e-5)


def test_evaluation_metrics_are_over_rows_not_batch_means(tokenizer: Any, tmp_path: Any) -> None:
    """5 evaluation rows in batches of 4 and 1: every logged mean is over the 5 rows (a mean of the two
    batch means would weigh the lone row 4 times), as Trainer's own eval_loss is."""
    tds, schema = _data(tokenizer, n=4, n_pairs=1, seed=25)
    eds, _ = _data(tokenizer, n=5, n_pairs=1, seed=26)
    model = make_causal_lm(tokenizer, seed=0)
    tr = PreferenceTrainer(model, _args(tmp_path), objective=PreferenceObjective.from_names("vrpo", "logistic"),
                           schema=schema, beta=BETA, ref_model=make_causal_lm(tokenizer, seed=4), train_dataset=tds,
                           eval_dataset=eds, processing_class=tokenizer)
    metrics = tr.evaluate()
    batch = tr.data_collator([tr.eval_dataset[i] for i in range(5)])
    with torch.no_grad():
        s = tr._scores(model, batch)
    margin = s["margin"].double()
    assert metrics["eval_rewards/margins"] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert metrics["eval_rewards/accuracies"] == pytest.approx((margin > 0).double().mean().item(), abs=1e-9)
    assert metrics["eval_vrpo/g_labelled"] == pytest.approx(batch["g"].mean().item(), abs=1e-6)


def test_reward_model_head_does_not_depend_on_earlier_draws(tokenizer: Any, tmp_path: Any) -> None:
    """The score head a reward model gets is drawn with the run's seed: the fit is the same whatever the
    process drew before (an interrupted experiment resumes to the same numbers)."""
    from robust_rlhf.llm.config import ModelArguments, PreferenceArguments
    from robust_rlhf.llm.pipeline import fit_reward_scorer

    init = tmp_path / "init"
    make_reward_model(tokenizer, seed=0).base_model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    rows = make_rows(6, n_pairs=0, seed=27)
    scores = []
    for draw in (1, 2):
        torch.manual_seed(draw)
        scorer = fit_reward_scorer(rows, ModelArguments(model_name_or_path=str(init)), PreferenceArguments(),
                                   tokenizer, _args(tmp_path / str(draw), max_steps=1), str(tmp_path / str(draw)),
                                   str(init), seed=5)
        scores.append([p.detach() for p in scorer.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*scores))


def test_resume_after_interruption_gives_the_same_final_loss(tokenizer: Any, tmp_path: Any) -> None:
    """6 steps straight vs 4 steps, stop, resume from checkpoint-4: same losses, same weights.

    vrpo_tuned with an EMA and a frozen g_hat refreshed every 3 steps: the resumed run needs the
    saved lambda state and the step-3 frozen weights.
    """
    from transformers import TrainerCallback

    tds, schema = _data(tokenizer, n=12, n_pairs=1, seed=19, preferences=False)

    def build(out: Any, callbacks: list[Any] | None = None, **extra: Any) -> Any:
        return PreferenceTrainer(
            make_causal_lm(tokenizer, seed=0),
            _args(
                out,
                max_steps=6,
                per_device_train_batch_size=2,
                save_strategy="steps",
                save_steps=2,
                lr_scheduler_type="linear",
                **extra,
            ),
            objective=PreferenceObjective.from_names("vrpo_tuned", lam=0.5),
            schema=schema,
            beta=BETA,
            train_dataset=tds,
            processing_class=tokenizer,
            g_source="frozen",
            frozen_refresh_steps=3,
            lambda_ema=0.5,
            callbacks=callbacks,
        )

    straight = build(tmp_path / "straight")
    full_loss = straight.train().training_loss
    full = [h["loss"] for h in straight.state.log_history if "loss" in h]

    class StopAt4(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step == 4:
                control.should_training_stop = True
            return control

    interrupted = build(tmp_path / "resumed", callbacks=[StopAt4()])
    first = _train(interrupted)
    assert len(first) == 4
    # a save killed half-way through its weights: 'last' passes over it, naming it; asked for, it is refused
    partial = tmp_path / "resumed" / "checkpoint-5"
    partial.mkdir()
    weights = (tmp_path / "resumed" / "checkpoint-4" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(InputError, match=r"checkpoint-5 is incomplete \(no vrpo_state.json"):
        build(tmp_path / "resumed").train(resume_from_checkpoint=str(partial))
    # with save_total_limit the resumed run's own saves delete checkpoint-4 before it ends (its step was read
    # from there after training: the finished run exited with "file not found" and no final model)
    resumed = build(tmp_path / "resumed", save_total_limit=1)
    with pytest.warns(RuntimeWarning, match=r"checkpoint-5 unfinished .* resuming from .*checkpoint-4"):
        resumed_loss = resumed.train(resume_from_checkpoint=True).training_loss
    assert resumed_loss == pytest.approx(full_loss, abs=1e-6)  # the whole run's mean, not steps 5-6's
    second = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert first + second[-2:] == pytest.approx(full, abs=1e-6)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    import os

    assert not os.path.exists(tmp_path / "resumed" / "checkpoint-4")
    assert os.path.exists(tmp_path / "resumed" / "checkpoint-6" / "model.safetensors")
    assert os.path.exists(tmp_path / "resumed" / "checkpoint-6" / "frozen_g_model.safetensors")


def test_gradient_accumulation_and_checkpointing_match(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=8, n_pairs=1, seed=20)
    runs = []
    for kw in (
        {"per_device_train_batch_size": 4},
        {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
        {"per_device_train_batch_size": 4, "activation_checkpointing": True},
    ):
        tr = PreferenceTrainer(
            make_causal_lm(tokenizer, seed=0),
            _args(tmp_path / str(len(runs)), max_steps=2, **kw),
            objective=PreferenceObjective.from_names("vrpo", "truncated_hinge"),
            schema=schema,
            beta=BETA,
            train_dataset=tds,
            processing_class=tokenizer,
        )
        runs.append(_train(tr))
        assert tr.model.is_activation_checkpointing == ("activation_checkpointing" in kw)
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)
    assert runs[2] == pytest.approx(runs[0], abs=1e-5)


@pytest.mark.parametrize("method", ["dpo", "vrpo", "vrpo_tuned"])
def test_unequal_micro_batches_give_the_big_batch_update(tokenizer: Any, tmp_path: Any, method: str) -> None:
    """Two SGD steps (lr 1, no clipping) over 6 rows each: accumulating micro-batches of 4 and 2, 3 and 3 or
    1 row gives the updates of batches of 6 (each row weighs 1/6; a mean of the two micro-batch means gave
    1/8 and 1/4, a relative difference of 0.34 measured). For vrpo_tuned the second step's lam is estimated
    on the first window's 6 rows however they were split (it was estimated per micro-batch: batches of one
    row never left the starting lam, and the update moved by 0.54 relative)."""
    tds, schema = _data(tokenizer, n=12, n_pairs=1, seed=23)

    def update(batch: int, accumulate: int) -> tuple[torch.Tensor, float | None]:
        model = make_causal_lm(tokenizer, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        tr = PreferenceTrainer(
            model,
            _args(tmp_path / f"{batch}x{accumulate}", per_device_train_batch_size=batch,
                  gradient_accumulation_steps=accumulate, max_steps=2, learning_rate=1.0, optim="sgd",
                  max_grad_norm=0.0),
            objective=PreferenceObjective.from_names(method, **({"lambda_target": "oriented_shift"}
                                                                 if method == "vrpo_tuned" else {})),
            schema=schema,
            beta=BETA,
            train_dataset=tds,
            processing_class=tokenizer,
        )
        tr.train()
        lams = [h["vrpo/lambda"] for h in tr.state.log_history if "vrpo/lambda" in h]
        delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(tr.model.parameters(), before)])
        return delta, lams

    whole, lams = update(6, 1)
    if method == "vrpo_tuned":
        assert len(lams) == 2 and lams[0] == 1.0 and 0.0 <= lams[1] < 0.99  # the second step's lam was tuned
    for batch, accumulate in ((3, 2), (1, 6)):
        got, got_lams = update(batch, accumulate)
        assert float((got - whole).norm() / whole.norm()) < 1e-5, batch
        assert got_lams == pytest.approx(lams, abs=1e-6)


def test_tuned_lambda_sees_every_row_of_the_last_window(tokenizer: Any, tmp_path: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With accumulation, the micro-batches of an epoch's last window are fetched before the first is
    scored; the lambda estimator must still get each micro-batch's own rows (gather_for_metrics had cut
    both to the window's remainder: 2 and 2 rows instead of 4 and 2), pooled over the window."""
    from robust_rlhf.llm.objectives import LambdaEstimator

    seen: list[int] = []
    update = LambdaEstimator.update

    def counting(self: Any, a: torch.Tensor, c: torch.Tensor) -> None:
        seen.append(a.numel())
        update(self, a, c)

    monkeypatch.setattr(LambdaEstimator, "update", counting)
    tds, schema = _data(tokenizer, n=6, n_pairs=2, seed=24)
    tr = PreferenceTrainer(
        make_causal_lm(tokenizer, seed=0),
        _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=-1,
              num_train_epochs=1),
        objective=PreferenceObjective.from_names("vrpo_tuned", "logistic"),
        schema=schema,
        beta=BETA,
        train_dataset=tds,
        processing_class=tokenizer,
    )
    tr.train()
    assert seen == [6]


def test_a_ref_logps_column_of_another_width_is_refused(tokenizer: Any, tmp_path: Any) -> None:
    """A data set carrying the VRPO trainer's ref_logps (K = 6 per row) given to a DPO trainer (K = 2): a
    named error before training (it crashed in training on a shape mismatch, and a column of the right
    width from elsewhere was taken as pi_ref's log-probs)."""
    tds, schema = _data(tokenizer, n=4, n_pairs=2, seed=25)
    vrpo = PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path / "v"),
                             objective=PreferenceObjective.from_names("vrpo"), schema=schema, beta=BETA,
                             train_dataset=tds, processing_class=tokenizer)
    assert len(vrpo.train_dataset[0][REF_LOGPS]) == 6
    with pytest.raises(InputError, match=r"column ref_logps, row 1: expected log pi_ref of the 2 scored responses"):
        PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path / "d"),
                          objective=PreferenceObjective.from_names("dpo"), schema=schema, beta=BETA,
                          train_dataset=vrpo.train_dataset, processing_class=tokenizer)
    bad = vrpo.train_dataset.remove_columns(REF_LOGPS).add_column(REF_LOGPS, [[0.0] * 5 + [math.nan]] * 4)
    with pytest.raises(InputError, match="row 1: expected log pi_ref of the 6 scored responses"):
        PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path / "n"),
                          objective=PreferenceObjective.from_names("vrpo"), schema=schema, beta=BETA,
                          train_dataset=bad, processing_class=tokenizer)


def test_a_live_reference_drops_a_ref_logps_column(tokenizer: Any, tmp_path: Any) -> None:
    """Scoring the reference live, a ref_logps column in the data would be used in its place (a 1e3 column
    trained silently, a 6-wide one crashed DPO): it is dropped, with a warning, from the train and eval sets."""
    tds, schema = _data(tokenizer, n=4, n_pairs=2, seed=26)
    vrpo = PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path / "v"),
                             objective=PreferenceObjective.from_names("vrpo"), schema=schema, beta=BETA,
                             train_dataset=tds, processing_class=tokenizer)
    wide = vrpo.train_dataset
    for method in ("dpo", "vrpo"):
        with pytest.warns(UserWarning, match="ref_logps column is dropped"):
            tr = PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path / method),
                                   objective=PreferenceObjective.from_names(method), schema=schema, beta=BETA,
                                   train_dataset=wide, eval_dataset={"a": wide}, processing_class=tokenizer,
                                   ref_model=make_causal_lm(tokenizer, seed=3), precompute_ref_log_probs=False)
        assert REF_LOGPS not in tr.train_dataset.column_names
        assert REF_LOGPS not in tr.eval_dataset["a"].column_names
        assert all(math.isfinite(x) for x in _train(tr))


def test_rows_counted_without_the_orientation_key(tokenizer: Any, tmp_path: Any) -> None:
    """A custom collator without ``orientation`` trains (the row count is the sequences over K), and a
    training step called without the window's count is the per-step mean over the accumulation steps."""
    tds, schema = _data(tokenizer, n=6, n_pairs=0, seed=27)
    base = PreferenceCollator(tokenizer.pad_token_id, schema)

    def collate(rows: Any) -> dict:
        batch = base(rows)
        batch.pop("orientation")
        return batch

    tr = PreferenceTrainer(make_causal_lm(tokenizer, seed=0),
                           _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2),
                           objective=PreferenceObjective.from_names("dpo"), schema=schema, beta=BETA,
                           train_dataset=tds, processing_class=tokenizer, data_collator=collate)
    assert all(math.isfinite(x) for x in _train(tr))
    batch = tr._prepare_inputs(collate([tr.train_dataset[i] for i in range(4)]))  # with the precomputed ref_logps
    with torch.no_grad():
        mean = tr._batch_loss(tr.model.eval(), batch, training=False)[0].item()
    tr.create_optimizer()
    step = tr.training_step(tr.model.eval(), batch)  # eval mode: no dropout, the same numbers
    assert step.item() == pytest.approx(mean / 2, rel=1e-6)


def test_bf16_run_on_cpu(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=4, n_pairs=1, seed=21)
    tr = PreferenceTrainer(
        make_causal_lm(tokenizer, seed=0),
        _args(tmp_path, bf16=True),
        objective=PreferenceObjective.from_names("vrpo"),
        schema=schema,
        beta=BETA,
        train_dataset=tds,
        processing_class=tokenizer,
    )
    losses = _train(tr)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_trainer_input_errors(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=4, n_pairs=0, seed=22)
    with pytest.raises(InputError, match="needs reference pairs"):
        PreferenceTrainer(
            make_causal_lm(tokenizer),
            _args(tmp_path),
            objective=PreferenceObjective.from_names("vrpo"),
            schema=schema,
            train_dataset=tds,
            processing_class=tokenizer,
        )
    with pytest.raises(InputError, match="g_source"):
        PreferenceTrainer(
            make_causal_lm(tokenizer),
            _args(tmp_path),
            objective=PreferenceObjective.from_names("mle"),
            schema=schema,
            train_dataset=tds,
            processing_class=tokenizer,
            g_source="reward_model",
        )
    with pytest.raises(InputError, match="beta"):
        PreferenceTrainer(
            make_causal_lm(tokenizer),
            _args(tmp_path),
            objective=PreferenceObjective.from_names("mle"),
            schema=schema,
            train_dataset=tds,
            processing_class=tokenizer,
            beta=0.0,
        )
    collate = PreferenceCollator(tokenizer.pad_token_id, schema)
    assert collate([tds[0]])["input_ids"].shape[0] == 2


def test_chat_rows_train_and_evaluate(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=6, n_pairs=1, seed=23, chat=True)
    eds, _ = _data(tokenizer, n=4, n_pairs=1, seed=24, chat=True)
    tr = PreferenceTrainer(
        make_causal_lm(tokenizer, seed=0),
        _args(tmp_path, eval_strategy="steps", eval_steps=2),
        objective=PreferenceObjective.from_names("vrpo_tuned", "logistic"),
        schema=schema,
        beta=BETA,
        train_dataset=tds,
        eval_dataset=eds,
        processing_class=tokenizer,
    )
    assert REF_LOGPS in tr.eval_dataset.column_names
    _train(tr)
    evals = [h for h in tr.state.log_history if "eval_loss" in h]
    assert evals and "eval_rewards/margins" in evals[-1] and "eval_vrpo/var_loss_vr" in evals[-1]
    metrics = tr.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_sequence_logps_sum_and_length_normalised() -> None:
    from robust_rlhf.llm.logprobs import sequence_logps

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    ids = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # responses at positions 2-4 and 1-2
    lp = torch.log_softmax(logits, -1)
    want0 = sum(lp[0, t - 1, ids[0, t]] for t in (2, 3, 4))
    want1 = sum(lp[1, t - 1, ids[1, t]] for t in (1, 2))
    got = sequence_logps(logits, ids, mask)
    torch.testing.assert_close(got, torch.stack([want0, want1]))
    torch.testing.assert_close(sequence_logps(logits, ids, mask, length_normalize=True), torch.stack([want0 / 3, want1 / 2]))
    assert sequence_logps(logits.bfloat16(), ids, mask).dtype == torch.float32


def _padded_positions(lengths: list[int], parts: list[Any]) -> int:
    return sum(len(p) * max(lengths[i] for i in p) for p in parts)


@settings(deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=8), st.integers(1, 4))
def test_length_groups_minimise_padded_positions(lengths: list[int], groups: int) -> None:
    """The split is a partition into at most ``groups`` passes whose padded positions equal the minimum
    over every split of the sorted lengths into contiguous runs (brute force)."""
    import itertools

    from robust_rlhf.llm.logprobs import length_groups

    parts = length_groups(torch.tensor(lengths), groups, tolerance=0.0)
    assert sorted(int(i) for p in parts for i in p) == list(range(len(lengths)))
    assert 1 <= len(parts) <= groups
    ls = sorted(lengths, reverse=True)
    best = min(
        sum((b - a) * ls[a] for a, b in zip((0, *cuts), (*cuts, len(ls))))
        for k in range(groups)
        for cuts in itertools.combinations(range(1, len(ls)), k)
    )
    assert _padded_positions(lengths, parts) == best
    # the default tolerance: the fewest passes within 5 % of the minimum
    few = length_groups(torch.tensor(lengths), groups)
    assert _padded_positions(lengths, few) <= 1.05 * best and len(few) <= len(parts)


def test_length_grouped_forward_passes_match_one_padded_pass(tokenizer: Any) -> None:
    """Scoring a batch in passes of similar length gives the one-pass log-probabilities and gradients
    (float32 rounding), with fewer padded positions."""
    from robust_rlhf.llm.logprobs import length_groups, model_sequence_logps

    tds, schema = _data(tokenizer, n=8, n_pairs=2, seed=21)
    batch = PreferenceCollator(tokenizer.pad_token_id, schema)([tds[i] for i in range(8)])
    lengths = batch["attention_mask"].sum(1)
    parts = length_groups(lengths, 4)
    assert len(parts) > 1 and _padded_positions(lengths.tolist(), parts) < lengths.numel() * int(lengths.max())
    model = make_causal_lm(tokenizer, seed=0)
    model.eval()
    values, grads = [], []
    for groups in (1, 4):
        model.zero_grad()
        lp = model_sequence_logps(model, batch, groups=groups)
        (lp * torch.linspace(-1.0, 1.0, lp.numel())).sum().backward()
        values.append(lp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_length_groups_must_be_positive(tokenizer: Any, tmp_path: Any) -> None:
    tds, schema = _data(tokenizer, n=4, n_pairs=1)
    with pytest.raises(InputError, match="length_groups"):
        PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path), objective=PreferenceObjective.from_names("dpo"),
                          schema=schema, train_dataset=tds, processing_class=tokenizer, length_groups=0)


def test_data_the_trainer_cannot_use_is_named_before_training(tokenizer: Any, tmp_path: Any) -> None:
    """An evaluation set without g_hat or with more reference pairs than the training set (a KeyError in
    evaluation; the extra pairs silently dropped), and responses past the model's positions (an IndexError
    inside the model): each a named InputError when the trainer is built."""
    tds, schema = _data(tokenizer, n=4, n_pairs=1, seed=30)
    no_g, _ = _data(tokenizer, n=4, n_pairs=1, seed=31, preferences=False)
    two, _ = _data(tokenizer, n=4, n_pairs=2, seed=32)
    rows = make_rows(4, n_pairs=1, seed=33)
    rows[2]["a_1"] = " ".join([rows[2]["a_1"]] * 40)
    ds, _ = load_preference_data(rows)
    long = tokenize_dataset(ds, tokenizer, schema, TokenizeOptions())

    def build(**kw: Any) -> Any:
        return PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path),
                                 objective=PreferenceObjective.from_names("vrpo"), schema=schema, beta=BETA,
                                 processing_class=tokenizer, **{"train_dataset": tds, **kw})

    for kw, needle in (
        ({"eval_dataset": no_g}, r"eval_dataset: missing column\(s\) chosen_preference"),
        ({"eval_dataset": {"held": two}}, r"eval_dataset\['held'\]: reference responses beyond the training set's "
                                          r"M = 1 pairs \(a_3_input_ids, a_4_input_ids\)"),
        ({"train_dataset": long}, r"train_dataset: prompt \+ response sequences reach \d+ tokens, beyond the "
                                  r"model's 128 positions"),
    ):
        with pytest.raises(InputError, match=needle):
            build(**kw)
    # the MLE baselines do not read g_hat or the reference pairs
    PreferenceTrainer(make_causal_lm(tokenizer, seed=0), _args(tmp_path), objective=PreferenceObjective.from_names("dpo"),
                      schema=schema, beta=BETA, train_dataset=tds, eval_dataset=no_g, processing_class=tokenizer)


def test_disable_dropout_zeroes_the_attention_rates_sdpa_reads() -> None:
    """Llama-family attention passes a float ``attention_dropout`` to SDPA, not an nn.Dropout: train-mode
    logits stayed random (0.11 apart between two calls) after disable_dropout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from robust_rlhf.llm.models import disable_dropout

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.5)
    model = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 64, (2, 12))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    disable_dropout(model)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.5  # a saved model keeps its rate
