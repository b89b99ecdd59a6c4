"""The end-to-end LLM experiment at toy size (preset ``test``): every stage runs, files are right, runs resume,
the report and figures come from the results, and the ``evaluate``/``experiment`` commands work and fail
cleanly. Checks the pipeline, not the statistics (those are the ``tiny-cpu`` preset's job)."""

from __future__ import annotations

import json
import math
import re
import runpy
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
import pytest
import yaml
from llm_helpers import make_rows

from robust_rlhf.cli import main as cli_main
from robust_rlhf.llm.data import read_rows
from robust_rlhf.llm.evaluate import best_of_n_kl
from robust_rlhf.llm.synthetic.experiment import run_experiment
from robust_rlhf.llm.synthetic.plots import FIGURES, experiment_figure
from robust_rlhf.llm.synthetic.presets import get_preset, override
from robust_rlhf.llm.synthetic.report import summarise, write_report
from robust_rlhf.theory.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exp(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The ``test`` preset run once: 2 seeds x 2 scenarios x 8 methods."""
    base = tmp_path_factory.mktemp("e2e")
    cfg = get_preset("test")
    lines: list[str] = []
    start = time.perf_counter()
    table = run_experiment(cfg, base / "out", base / "cache", log=lines.append)
    return SimpleNamespace(out=base / "out", cache=base / "cache", cfg=cfg, table=table, lines=lines,
                           seconds=time.perf_counter() - start)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", ("evaluate", "experiment"))

    def run(*argv: str) -> tuple[int, str, str]:
        status = cli_main.main(list(argv))
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def test_every_run_is_in_the_results_table(exp: SimpleNamespace) -> None:
    t, cfg = exp.table, exp.cfg
    assert len(t) == len(cfg.seeds) * len(cfg.scenarios) * len(cfg.methods)
    assert set(t["method"]) == {m.name for m in cfg.methods}
    assert (t["n_eval"] == cfg.n_eval).all()
    for prefix in ("vs_reference", "vs_baseline", "true_reward_vs_reference", "true_reward_vs_baseline"):
        rows = t[t[f"{prefix}_win_rate"].notna()]
        assert len(rows) and (rows[f"{prefix}_n"] == cfg.n_eval).all()
        assert ((rows[f"{prefix}_ci_low"] <= rows[f"{prefix}_win_rate"] + 1e-12)
                & (rows[f"{prefix}_win_rate"] <= rows[f"{prefix}_ci_high"] + 1e-12)).all()
        assert ((rows[f"{prefix}_soft"] >= 0) & (rows[f"{prefix}_soft"] <= 1)).all()
    # nothing is compared with itself
    assert t.loc[t["method"] == "reference", "vs_reference_win_rate"].isna().all()
    assert t.loc[t["method"] == "dpo", "vs_baseline_win_rate"].isna().all()
    ref = t[t["kind"] == "reference"]
    assert (ref["kl"] == 0).all() and (ref["kl_method"] == "zero").all()
    bon = t[t["kind"] == "best_of_n"]
    assert bon["kl"].tolist() == pytest.approx([best_of_n_kl(2)] * len(bon))
    pol = t[t["kind"] == "policy"]
    assert (pol["steps"] > 0).all() and pol["kl"].map(math.isfinite).all()
    vr = t[t["method"].str.startswith("vrpo")]
    assert vr["lambda_mean"].between(0, 1).all() and vr["var_grad_ratio"].map(math.isfinite).all()
    assert (vr.loc[vr["g_hat"] == "oracle", "g_hat_rmse"] == 0).all()
    rm = vr.loc[vr["g_hat"] == "reward_model", "g_hat_rmse"]
    assert rm.map(math.isfinite).all() and (rm > 0).all()
    # DRPO: trained online, its doubly robust win-rate estimate logged; the other methods have none
    dr = t[t["method"] == "drpo_rm"]
    assert len(dr) == len(cfg.seeds) * len(cfg.scenarios) and (dr["g_hat"] == "reward_model").all()
    assert dr["drpo_win_rate"].map(math.isfinite).all() and dr["drpo_clipped"].between(0, 1).all()
    assert t.loc[t["method"] != "drpo_rm", "drpo_win_rate"].isna().all()
    # the reference is the same policy in every scenario of a seed
    for _, grp in ref.groupby("seed"):
        assert grp["mean_reward"].nunique() == 1


def test_files_on_disk(exp: SimpleNamespace) -> None:
    out, cfg = exp.out, exp.cfg
    info = json.loads((out / "experiment.json").read_text())
    assert info["corpus"]["source"] == "generated" and info["config"]["name"] == "test"
    assert info["corpus"]["reference_pretrain"]["parameters"] > 0
    responses = read_rows(out / "data" / "seed0" / "responses.jsonl")
    M = cfg.max_pairs
    assert len(responses) == cfg.n_train and f"a_{2 * M + 2}" in responses[0]
    dpo = read_rows(out / "data" / "seed0" / "bt" / "dpo.jsonl")
    assert set(dpo[0]) == {"prompt", "chosen", "rejected"}
    # the labelled pair is the last sampled pair, whichever way the label fell
    for row, src in zip(dpo, responses):
        assert row["prompt"] == src["prompt"]
        assert {row["chosen"], row["rejected"]} == {src[f"a_{2 * M + 1}"], src[f"a_{2 * M + 2}"]}
    vr = read_rows(out / "data" / "seed0" / "annotator_mixture" / "vrpo_m2.jsonl")
    assert {"a_1", "a_4", "chosen_preference", "a_3_preference"} <= set(vr[0]) and "a_5" not in vr[0]
    for r in vr:
        assert r["chosen_preference"] + r["rejected_preference"] == pytest.approx(1.0)
        assert r["a_1"] == responses[vr.index(r)]["a_1"]
    rm_data = read_rows(out / "data" / "seed0" / "bt" / "vrpo_m2_rm.jsonl")
    assert "chosen_preference" not in rm_data[0]  # the pipeline cross-fits g_hat itself
    run = out / "runs" / "bt" / "seed0" / "vrpo_tuned_m2"
    values = yaml.safe_load((run / "model" / "finetune.yaml").read_text())
    assert values["method"] == "vrpo_tuned" and values["lambda_target"] == "oriented_shift"
    from robust_rlhf.llm.config import parse_config

    parse_config(values)  # the saved config is a valid `robust-rlhf finetune` config
    drpo_dir = out / "runs" / "bt" / "seed0" / "drpo_rm" / "model"
    drpo = yaml.safe_load((drpo_dir / "finetune.yaml").read_text())
    assert drpo["method"] == "drpo" and drpo["g_source"] == "reward_model" and drpo["drpo_samples"] == 2
    # the judge is cross-fitted in the run: two reward models from the reference, each on one fold's complement
    assert drpo["g_cross_fit_folds"] == 2 and drpo["g_model_name_or_path"] == values["model_name_or_path"]
    assert (drpo_dir / "judge_fold1").is_dir() and (drpo_dir / "judge_fold2").is_dir()
    parse_config(drpo)
    samples = read_rows(out / "eval" / "bt" / "seed0" / "dpo.jsonl")
    assert len(samples) == cfg.n_eval and all(len(s["token_ids"]) >= 1 for s in samples)
    assert all(s["logp"] <= 0 and s["logp_ref"] <= 0 for s in samples)


def test_a_second_run_resumes_without_retraining(exp: SimpleNamespace) -> None:
    marker = exp.out / "runs" / "bt" / "seed1" / "dpo" / "result.json"
    before = marker.stat().st_mtime_ns
    table = run_experiment(exp.cfg, exp.out, exp.cache, log=lambda s: None)
    assert marker.stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(table.reset_index(drop=True), exp.table.reset_index(drop=True))


def test_an_interrupt_after_the_reference_samples_resumes(exp: SimpleNamespace) -> None:
    # the reference's samples were written, its stats and its run's record not: the resumed run redraws
    # the same samples (seeded) and gives the same table
    samples = exp.out / "eval" / "seed1-reference.jsonl"
    before = samples.read_text()
    samples.with_suffix(".json").unlink()
    for scenario in exp.cfg.scenarios:
        (exp.out / "runs" / scenario / "seed1" / "reference" / "result.json").unlink()
    table = run_experiment(exp.cfg, exp.out, exp.cache, log=lambda s: None)
    assert samples.read_text() == before and samples.with_suffix(".json").exists()
    cols = [c for c in table.columns if not c.endswith("seconds")]
    pd.testing.assert_frame_equal(table[cols].reset_index(drop=True), exp.table[cols].reset_index(drop=True))


def test_damaged_records_are_recomputed(exp: SimpleNamespace) -> None:
    # a record cut short after its atomic write (a disk fault, a hand edit): named, its stage redone (the reward
    # model behind best of n retrained and best of n redone, a reference record re-read from its samples): the same
    # table
    bon = next(m.name for m in exp.cfg.methods if m.kind == "best_of_n")
    records = [exp.out / "runs" / "bt" / "seed1" / name / "result.json" for name in ("_reward_model", bon, "reference")]
    for path in records:
        path.write_text(path.read_text()[:10])
    with pytest.warns(RuntimeWarning, match=r"_reward_model/result.json is unreadable"):
        table = run_experiment(exp.cfg, exp.out, exp.cache, log=lambda s: None)
    assert all(json.loads(p.read_text()) for p in records)
    cols = [c for c in table.columns if not c.endswith("seconds")]
    pd.testing.assert_frame_equal(table[cols].reset_index(drop=True), exp.table[cols].reset_index(drop=True))

def test_a_folder_holds_one_configuration(exp: SimpleNamespace, tmp_path: Path) -> None:
    # a rerun with another beta reused every run and relabelled the report with the new beta
    with pytest.raises(InputError, match=r"holds an experiment with other settings \(beta, learning_rate\)"):
        run_experiment(override(exp.cfg, ["beta=0.5", "learning_rate=0.01"]), exp.out, exp.cache, log=lambda s: None)
    # a preset's runtime estimate or description is not a setting of the runs (a new estimate refused the folder)
    from dataclasses import replace

    again = run_experiment(replace(exp.cfg, estimated_minutes=99.0, runtime_measured=False, description="x"),
                           exp.out, exp.cache, log=lambda s: None)
    cols = [c for c in again.columns if not c.endswith("seconds")]
    pd.testing.assert_frame_equal(again[cols].reset_index(drop=True), exp.table[cols].reset_index(drop=True))
    # a method field added since a folder was written (DRPO's samples) reads as its default: the folder resumes;
    # a method whose value differs is refused
    from robust_rlhf.llm.synthetic.experiment import _check_same_config

    info = json.loads((exp.out / "experiment.json").read_text())
    for m in info["config"]["methods"]:
        del m["samples"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "experiment.json").write_text(json.dumps(info))
    _check_same_config(tmp_path / "old", exp.cfg)
    next(m for m in info["config"]["methods"] if m["name"] == "drpo_rm")["samples"] = 3
    (tmp_path / "old" / "experiment.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"other settings \(method drpo_rm\)"):
        _check_same_config(tmp_path / "old", exp.cfg)
    # a truncated results.csv is refused, not summarised over the rows left
    (tmp_path / "experiment.json").write_text((exp.out / "experiment.json").read_text())
    lines = (exp.out / "results.csv").read_text().splitlines(keepends=True)
    (tmp_path / "results.csv").write_text("".join(lines[: len(lines) * 6 // 10]))
    with pytest.raises(InputError, match=r"results.csv: no row for \d+ \(seed, method\) run"):
        write_report(tmp_path)


def test_methods_with_a_larger_m_are_added_to_a_folder(exp: SimpleNamespace, tmp_path: Path) -> None:
    # the labelled pair was the last of the M_max + 1 drawn pairs, so a rerun with a larger M was refused;
    # now the pairs drawn are kept and only the missing reference pairs are drawn
    from dataclasses import replace

    from robust_rlhf.llm.synthetic.presets import MethodSpec

    out = tmp_path / "out"
    data = out / "data" / "seed0"
    base = override(exp.cfg, ["seeds=[0]", "scenarios=[bt]", "methods=dpo"])
    run_experiment(base, out, exp.cache, log=lambda s: None)
    labelled = (data / "bt" / "dpo.jsonl").read_text()
    dpo_run = out / "runs" / "bt" / "seed0" / "dpo" / "result.json"
    stamp = dpo_run.stat().st_mtime_ns
    vr = [MethodSpec(f"vrpo_m{m}", method="vrpo", loss="logistic", M=m) for m in (2, 3)]
    run_experiment(replace(base, methods=base.methods + (vr[0],)), out, exp.cache, log=lambda s: None)
    table = run_experiment(replace(base, methods=base.methods + tuple(vr)), out, exp.cache, log=lambda s: None)
    assert set(table["method"]) == {"reference", "dpo", "vrpo_m2", "vrpo_m3"}
    assert (data / "bt" / "dpo.jsonl").read_text() == labelled and dpo_run.stat().st_mtime_ns == stamp
    first, more, most = (read_rows(data / f) for f in ("responses.jsonl", "responses_from1.jsonl",
                                                       "responses_from3.jsonl"))
    assert "a_3" not in first[0] and "a_5" not in more[0] and "a_3" not in most[0]
    m2, m3 = (read_rows(data / "bt" / f"vrpo_m{m}.jsonl") for m in (2, 3))
    for row, a, b, c, r2, r3 in zip(read_rows(data / "bt" / "dpo.jsonl"), first, more, most, m2, m3):
        assert {row["chosen"], row["rejected"]} == {a["a_1"], a["a_2"]} == {r3["chosen"], r3["rejected"]}
        assert [r3[f"a_{k}"] for k in range(1, 7)] == [b[f"a_{k}"] for k in range(1, 5)] + [c["a_1"], c["a_2"]]
        assert all(r2[f"a_{k}"] == r3[f"a_{k}"] for k in range(1, 5)) and "a_5" not in r2
    # a smaller M reuses the pairs too
    again = run_experiment(replace(base, methods=base.methods + (vr[0],)), out, exp.cache, log=lambda s: None)
    assert set(again["method"]) == {"reference", "dpo", "vrpo_m2"}


def test_report_numbers_come_from_the_results(exp: SimpleNamespace) -> None:
    path = write_report(exp.out)
    text = path.read_text()
    assert "no number below is typed by hand" in text and "text: generated" in text
    for scenario in exp.cfg.scenarios:
        assert f"## Scenario `{scenario}`" in text
    summary = pd.read_csv(exp.out / "summary.csv")
    assert (summary["seeds"] == 2).all()
    # the mean over seeds of DPO's reward, recomputed from results.csv, is the number printed in the report
    res = pd.read_csv(exp.out / "results.csv")
    dpo_bt = res[(res["method"] == "dpo") & (res["scenario"] == "bt")]["mean_reward"].mean()
    section = text.split("## Scenario `bt`")[1].split("## Scenario")[0]
    dpo_line = next(line for line in section.splitlines() if line.startswith("| dpo |"))
    assert f"{dpo_bt:.3f} [" in dpo_line
    assert re.search(r"`vrpo_m2`: win rate [0-9.]+ \[[-0-9.]+, [0-9.]+\]: (above|below|not)", section)
    for m in exp.cfg.methods:  # best-of-n's KL is the formula, and the report says so
        said = f"- `{m.name}`: KL is the formula log n - (n - 1)/n" in section
        assert said == (m.kind == "best_of_n"), m.name
    assert "means over fewer seeds" not in text  # every metric is finite in every seed here


def test_figures_from_the_results(exp: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name in FIGURES:
        png = experiment_figure(name, exp.out, tmp_path)
        for ext in ("png", "pdf", "csv"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 0
        assert png.name == f"{name}.png"
        meta = json.loads((tmp_path / f"{name}.meta.json").read_text())
        assert meta["figure"] == name and meta["seeds"] == list(exp.cfg.seeds)
        assert meta["versions"]["torch"] == torch.__version__ and "transformers" in meta["versions"]
    kl = pd.read_csv(tmp_path / "llm_reward_kl.csv")
    bon = kl[kl["method"].isin([m.name for m in exp.cfg.methods if m.kind == "best_of_n"])]
    assert len(bon) and (bon["kl_method"] == "best_of_n_formula").all()
    assert set(kl.loc[~kl.index.isin(bon.index), "kl_method"]) <= {"samples", "zero"}
    table = pd.read_csv(tmp_path / "llm_win_rates.csv")
    summary = summarise(pd.read_csv(exp.out / "results.csv"))
    assert table["vs_baseline_win_rate"].dropna().tolist() == pytest.approx(
        summary["vs_baseline_win_rate"].dropna().tolist()
    )
    script = ROOT / "paper_figures" / "llm_reward_kl.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--results", str(exp.out), "--out", str(tmp_path / "fig"),
                                      "--study", "ignored"])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "fig" / "llm_reward_kl.pdf").exists()
    # and through `robust-rlhf figures`, pointed at this experiment
    from robust_rlhf.cli.main import main

    assert main(["figures", "--dir", str(ROOT / "paper_figures"), "--only", "llm_win_rates",
                 "--llm-results", str(exp.out), "--out", str(tmp_path / "cli")]) == 0
    assert pd.read_csv(tmp_path / "cli" / "llm_win_rates.csv").equals(table)


def _eval_prompts(exp: SimpleNamespace, path: Path) -> Path:
    rows = read_rows(exp.out / "eval" / "bt" / "seed0" / "reference.jsonl")
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:6]))
    return path


def test_evaluate_command_json(exp: SimpleNamespace, cli: Any, tmp_path: Path) -> None:
    info = json.loads((exp.out / "experiment.json").read_text())
    ref = info["reference"]
    policy = str(exp.out / "runs" / "bt" / "seed0" / "vrpo_m2" / "model")
    prompts = _eval_prompts(exp, tmp_path / "p.jsonl")
    status, out, err = cli("evaluate", "--policy", policy, "--baseline", ref, "--prompts", str(prompts),
                           "--judge", "oracle", "--scenario", "bt", "--max-new-tokens", "6", "--json",
                           "--samples", str(tmp_path / "s.jsonl"))
    assert status == 0, err
    res = json.loads(out)
    for key in ("win_rate", "ci_low", "ci_high", "n", "ties", "mean_reward", "kl", "soft", "baseline_kl"):
        assert key in res
    assert res["n"] == 6 and res["ci_low"] <= res["win_rate"] <= res["ci_high"]
    assert res["wins"] + res["ties"] + res["losses"] == 6 and res["baseline_kl"] == 0.0
    assert len(read_rows(tmp_path / "s.jsonl")) == 6
    rm = str(exp.out / "runs" / "bt" / "seed0" / "_reward_model" / "model")
    for extra in (["--judge", "true-reward"], ["--judge", "reward-model", "--judge-model", rm, "--ci", "bootstrap"],
                  ["--judge", "callable", "--judge-callable", "llm_helpers:oracle_g", "--decision", "argmax"]):
        status, out, err = cli("evaluate", "--policy", policy, "--baseline", ref, "--prompts", str(prompts),
                               "--max-new-tokens", "4", "--json", *extra)
        assert status == 0, err
        res = json.loads(out)
        assert res["n"] == 6 and 0 <= res["win_rate"] <= 1
    assert res["mean_reward"] is None and res["decision"] == "argmax"  # the callable judge has no true reward
    status, out, _ = cli("evaluate", "--policy", policy, "--baseline", ref, "--prompts", str(prompts),
                         "--judge", "true-reward", "--max-new-tokens", "4")
    assert status == 0 and "win rate of" in out and "KL to the reference" in out


def test_evaluate_command_hostile_input(exp: SimpleNamespace, cli: Any, tmp_path: Path) -> None:
    ref = json.loads((exp.out / "experiment.json").read_text())["reference"]
    prompts = _eval_prompts(exp, tmp_path / "p.jsonl")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["--policy", str(tmp_path / "no_model"), "--baseline", ref, "--prompts", str(prompts), "--judge",
          "true-reward"], "no_model"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(empty), "--judge", "true-reward"], "no prompts"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(tmp_path / "none.jsonl"), "--judge", "true-reward"],
         "no file"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(prompts), "--judge", "gpt4"], "--judge: unknown"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(prompts), "--judge", "oracle"], "scenario"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(prompts), "--judge", "reward-model"], "--judge-model"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(prompts), "--ci", "exact"], "--ci"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(prompts), "--judge", "true-reward", "--samples",
          str(tmp_path)], "is a folder"),
        (["--policy", ref, "--baseline", ref, "--prompts", str(prompts), "--judge", "true-reward", "--samples",
          str(tmp_path / "nodir" / "s.jsonl")], "does not exist"),
    ]
    for argv, needle in cases:
        status, _, err = cli("evaluate", *argv)
        assert status == 2 and needle in err and err.count("\n") == 1, (argv, err)


def test_experiment_command(exp: SimpleNamespace, cli: Any) -> None:
    status, out, _ = cli("experiment", "--list")
    assert status == 0 and "tiny-cpu" in out and "gpu-hh" in out and "estimate, not run here" in out
    status, out, _ = cli("experiment", "--preset", "gpu-small", "--dry-run", "--set", "seeds=[0]")
    assert status == 0 and json.loads(out)["reference_model"] == "lvwerra/gpt2-imdb"
    status, out, _ = cli("experiment", "--preset", "test", "--out", str(exp.out), "--report-only", "--no-figures",
                         "--json")
    assert status == 0 and {r["method"] for r in json.loads(out)} == {m.name for m in exp.cfg.methods}
    for argv, needle in (
        (["--preset", "test", "--set", "bogus=1"], "unknown key"),
        (["--preset", "huge"], "preset"),
        ([], "exactly one of"),
        (["--preset", "test", "--out", str(exp.out / "missing"), "--report-only"], "no experiment results"),
        (["--preset", "test", "--out", str(exp.out / "results.csv")], "is a file"),
        (["--preset", "test", "--out", str(exp.out / "data")], "is not empty and holds no experiment"),
        (["--preset", "test", "--out", str(exp.out / "results.csv" / "sub")], "cannot create the output folder"),
    ):
        status, _, err = cli("experiment", *argv)
        assert status == 2 and needle in err and err.count("\n") == 1, (argv, err)


def test_dataset_mode_of_the_hh_preset_on_local_files(tmp_path: Path, tiny_model_dir: Path, tiny_reward_dir: Path) -> None:
    """gpu-hh's path (human labels from a preference file, a checkpoint as reference, a reward-model judge)
    with the test suite's tiny local models in place of the hub ones."""
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for r in make_rows(14, seed=3)))
    cfg = override(get_preset("gpu-hh"), [
        f"preference_data={data}", f"reference_model={tiny_model_dir}", f"judge=reward_model:{tiny_reward_dir}",
        "n_train=8", "n_eval=4", "seeds=[0]", "max_new_tokens=4", "batch_size=4", "training_overrides={}",
        "methods=dpo,vrpo_m1_rm,rm_best_of_16", "threads=1", "learning_rate=1e-3", "rm_learning_rate=1e-3",
    ])
    table = run_experiment(cfg, tmp_path / "out", tmp_path / "cache", log=lambda s: None)
    assert set(table["method"]) == {"reference", "dpo", "vrpo_m1_rm", "rm_best_of_16"}
    assert set(table["scenario"]) == {"data"}
    assert table.loc[table["method"] == "vrpo_m1_rm", "vs_baseline_win_rate"].between(0, 1).all()
    rows = read_rows(tmp_path / "out" / "data" / "seed0" / "data" / "dpo.jsonl")
    src = {json.dumps(r["prompt"]): r for r in read_rows(data)}
    assert all(src[json.dumps(r["prompt"])]["chosen"] == r["chosen"] for r in rows)  # the data set's own labels


def test_classifier_reward_and_checkpoint_reference(tmp_path: Path, tiny_model_dir: Path, tiny_reward_dir: Path) -> None:
    """gpu-small's path (a checkpoint as reference, a sequence classifier as true reward, a text-file corpus)."""
    from robust_rlhf.llm.synthetic.reward import get_reward

    rew = get_reward(f"classifier:{tiny_reward_dir}")
    phi = rew.components(["the cat", "the dog"], [" is good", " is bad"])
    assert phi.shape == (2, 1) and rew.names == ("classifier_logit",)
    corpus = tmp_path / "texts.txt"
    nouns, adjectives = ("cat", "dog", "sky", "sun", "moon", "sea", "tree", "bird"), ("blue", "red", "hot", "cold", "good", "bad")
    corpus.write_text("".join(f"the {n} is very {a} today\n" for n in nouns for a in adjectives))
    cfg = override(get_preset("gpu-small"), [
        f"corpus.source=file:{corpus}", "corpus.min_words=3", f"reference_model={tiny_model_dir}",
        f"reward=classifier:{tiny_reward_dir}", "scenarios=[bt]", "seeds=[0]", "n_train=6", "n_eval=3",
        "heldout_texts=10", "prompt_words=2", "max_new_tokens=4", "batch_size=3", "training_overrides={}",
        "methods=vrpo_m1", "threads=1",
    ])
    table = run_experiment(cfg, tmp_path / "out", tmp_path / "cache", log=lambda s: None)
    assert set(table["method"]) == {"reference", "dpo", "vrpo_m1"}
    assert table["mean_reward"].map(math.isfinite).all()
    info = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert info["corpus"]["source"] == "file" and info["reference"] == str(tiny_model_dir)


def test_help_texts_format(cli: Any) -> None:
    """argparse %-formats help strings: a stray % in HELP breaks `robust-rlhf --help`."""
    assert "evaluate" in cli_main.build_parser().format_help()
    for name in ("evaluate", "experiment"):
        with pytest.raises(SystemExit) as exc:
            cli(name, "--help")
        assert exc.value.code == 0
