"""The command line: data-check, finetune (YAML config + overrides) and generate-references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from llm_helpers import make_rows

from robust_rlhf.cli import main as cli_main
from robust_rlhf.theory.errors import InputError

OURS = ("finetune", "data-check", "generate-references")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``cli(*argv) -> (status, stdout, stderr)`` through ``robust_rlhf.cli.main.main`` with our subcommands."""
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", OURS)

    def run(*argv: str) -> tuple[int, str, str]:
        status = cli_main.main(list(argv))
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_subcommands_are_registered() -> None:
    for name in OURS:
        assert name in cli_main.SUBCOMMANDS


def test_data_check_good_file(cli: Any, tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "good.jsonl", make_rows(7, n_pairs=2, seed=60))
    status, out, _ = cli("data-check", str(f))
    assert status == 0
    assert "rows: 7" in out and "reference pairs per row: 2" in out and "labelled preferences: True" in out
    status, out, _ = cli("data-check", str(f), "--json")
    assert json.loads(out)["rows"] == 7


def test_data_check_lists_every_bad_row(cli: Any, tmp_path: Path) -> None:
    rows = make_rows(6, n_pairs=1, seed=61)
    rows[1]["rejected"] = ""
    rows[3]["a_1_preference"] = -0.1
    rows[5]["chosen_preference"], rows[5]["rejected_preference"] = 0.7, 0.7
    status, out, _ = cli("data-check", str(_jsonl(tmp_path / "bad.jsonl", rows)))
    assert status == 1
    assert "row 2, field 'rejected': empty" in out
    assert "row 4, field 'a_1_preference'" in out
    assert "row 6, field 'chosen_preference+rejected_preference'" in out
    assert "3 bad field(s) in 3 of 6 rows" in out


def test_data_check_names_the_row_that_brings_a_stray_column(cli: Any, tmp_path: Path) -> None:
    rows = make_rows(6, n_pairs=1, seed=63)
    rows[4]["a_3"] = "a stray response"
    status, _, err = cli("data-check", str(_jsonl(tmp_path / "stray.jsonl", rows)))
    assert status == 2 and "stray.jsonl: " in err and "row 5 is the first with column 'a_3'" in err, err


def test_data_check_fix_symmetrises(cli: Any, tmp_path: Path) -> None:
    rows = make_rows(3, n_pairs=1, seed=62)
    rows[0]["chosen_preference"], rows[0]["rejected_preference"] = 0.9, 0.3
    f = _jsonl(tmp_path / "biased.jsonl", rows)
    assert cli("data-check", str(f))[0] == 1
    fixed = tmp_path / "fixed.jsonl"
    status, _, _ = cli("data-check", str(f), "--fix", "--output", str(fixed))
    assert status == 0
    first = json.loads(fixed.read_text().splitlines()[0])
    assert first["chosen_preference"] == pytest.approx(0.8) and first["rejected_preference"] == pytest.approx(0.2)


def test_data_check_user_errors_are_one_line(cli: Any, tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "nocol.jsonl", [{"prompt": "a", "chosen": "b"}])
    status, out, err = cli("data-check", str(f))
    assert status == 2 and "missing column(s) rejected" in err and err.count("\n") == 1
    status, _, err = cli("data-check", str(tmp_path / "absent.jsonl"))
    assert status == 2 and "file not found" in err


def _config(tmp_path: Path, model_dir: Path, data: Path, **extra: Any) -> Path:
    cfg = {
        "model_name_or_path": str(model_dir),
        "train_data": str(data),
        "output_dir": str(tmp_path / "run"),
        "stage": "one",
        "method": "vrpo",
        "loss": "truncated_hinge",
        "beta": 0.5,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "disable_tqdm": True,
        "report_to": "none",
        "max_prompt_length": 16,
        "max_completion_length": 16,
    }
    cfg.update(extra)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_finetune_one_stage_from_yaml_with_overrides_and_resume(cli: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    data = _jsonl(tmp_path / "train.jsonl", make_rows(6, n_pairs=1, seed=63))
    cfg = _config(tmp_path, tiny_model_dir, data)
    status, out, err = cli("finetune", "--config", str(cfg), "--dry-run")
    assert status == 0, err
    assert json.loads(out)["reference_pairs_per_row"] == 1
    status, out, err = cli("finetune", "--config", str(cfg), "--set", "lam=0.5", "--", "--learning_rate", "2e-3")
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["global_step"] == 2
    run = tmp_path / "run"
    assert (run / "model.safetensors").exists() and (run / "checkpoint-2" / "model.safetensors").exists()
    args = __import__("torch").load(run / "training_args.bin", weights_only=False)
    assert args.learning_rate == 2e-3  # the `--` override won over the YAML
    caches = list((run / "cache").glob("ref_logps-*.json"))
    assert len(caches) == 1 and len(json.loads(caches[0].read_text())) == 6
    # resume from the last checkpoint to a longer run; the cached reference log-probs are reused
    status, out, err = cli(
        "finetune", "--config", str(cfg), "--set", "max_steps=3", "--set", "resume_from_checkpoint=last"
    )
    assert status == 0, err
    assert json.loads(out.strip().splitlines()[-1])["global_step"] == 3
    assert list((run / "cache").glob("ref_logps-*.json")) == caches  # the cache was hit, not rewritten
    # DPO on the same file scores the labelled pair only: its cache entry is its own, not VRPO's 4 columns
    status, out, err = cli("finetune", "--config", str(cfg), "--set", "method=mle", "--set", "max_steps=1",
                           "--set", f"output_dir={tmp_path / 'dpo'}", "--set", f"cache_dir={run / 'cache'}")
    assert status == 0, err
    widths = sorted(len(json.loads(f.read_text())[0]) for f in (run / "cache").glob("ref_logps-*.json"))
    assert widths == [2, 4]


def test_finetune_config_errors(cli: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    data = _jsonl(tmp_path / "train.jsonl", make_rows(4, n_pairs=0, seed=64))
    cfg = _config(tmp_path, tiny_model_dir, data, no_such_option=1)
    status, _, err = cli("finetune", "--config", str(cfg))
    assert status == 2 and "unknown config key(s): no_such_option" in err
    cfg = _config(tmp_path, tiny_model_dir, data)
    status, _, err = cli("finetune", "--config", str(cfg), "--dry-run")
    assert status == 2 and "needs reference pairs" in err
    status, _, err = cli("finetune", "--config", str(cfg), "--set", "method=ppo", "--dry-run")
    assert status == 2 and "unknown 'ppo'" in err
    status, _, err = cli("finetune", "--config", str(cfg), "--set", "g_source=magic")
    assert status == 2 and "g_source" in err
    rows = make_rows(4, n_pairs=1, seed=64)
    rows[2]["chosen"] = None
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    status, _, err = cli("finetune", "--config", str(cfg), "--set", f"train_data={bad}")
    assert status == 2 and f"{bad}: 1 bad field(s) in the preference data: row 3, field 'chosen'" in err
    # a value of the wrong type: one line naming where it came from, not argparse's usage dump
    typed = _config(tmp_path, tiny_model_dir, data, lam="abc")
    status, _, err = cli("finetune", "--config", str(typed), "--dry-run")
    assert status == 2 and err == f"robust-rlhf finetune: error: {typed}: option lam: invalid float value: 'abc'\n"
    status, _, err = cli("finetune", "--config", str(cfg), "--set", "lam=xyz", "--dry-run")
    assert status == 2 and err.endswith("error: --set: option lam: invalid float value: 'xyz'\n")
    status, _, err = cli("finetune", "--config", str(cfg), "--dry-run", "--", "--learning_rate", "fast")
    assert status == 2 and "command-line override: option learning_rate: invalid float value: 'fast'" in err
    assert err.count("\n") == 1


def test_finetune_reward_model_with_cross_fitted_g_hat(cli: Any, tmp_path: Path, tiny_reward_dir: Path) -> None:
    rows = make_rows(8, n_pairs=1, seed=65, preferences=False)
    data = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = _config(
        tmp_path,
        tiny_reward_dir,
        data,
        stage="two",
        method="vrpo_tuned",
        loss="logistic",
        g_source="reward_model",
        g_model_name_or_path=str(tiny_reward_dir),
        g_cross_fit_folds=2,
        center_rewards_coefficient=0.01,
        save_strategy="no",
        use_peft=True,
        lora_r=2,
        lora_alpha=4,
    )
    status, out, err = cli("finetune", "--config", str(cfg))
    assert status == 0, err
    run = tmp_path / "run"
    cached = list((run / "cache" / "train").glob("g_hat-*.jsonl"))
    assert len(cached) == 1
    annotated = [json.loads(line) for line in cached[0].read_text().splitlines()]
    assert all(0 < r["chosen_preference"] < 1 and 0 < r["a_1_preference"] < 1 for r in annotated)
    assert (run / "g_hat_fold1").exists() and (run / "g_hat_fold2").exists()
    assert (run / "adapter_model.safetensors").exists()  # LoRA: the adapter and the score head


def test_finetune_drpo_with_a_cross_fitted_judge(cli: Any, tmp_path: Path, tiny_model_dir: Path,
                                                 tiny_reward_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``g_cross_fit_folds: 2`` fits two judges from ``g_model_name_or_path``, each on the rows of the other fold's
    prompts, and every pair the trainer asks about is scored by the judge that did not see its row."""
    from robust_rlhf.llm import auxiliary, pipeline

    rows = make_rows(6, n_pairs=0, seed=69, preferences=False)
    data = _jsonl(tmp_path / "train.jsonl", rows)
    fitted: list[set[str]] = []
    routed: list[tuple[int, str]] = []
    fit_reward_scorer = pipeline.fit_reward_scorer

    def spy_fit(train_rows: list[dict], *args: Any) -> Any:
        fitted.append({r["prompt"] for r in train_rows})
        return fit_reward_scorer(train_rows, *args)

    class SpyFolds(auxiliary.FoldScorer):
        def __call__(self, prompts: Any, firsts: Any, seconds: Any) -> list[float]:
            routed.extend((self.fold_of.get(p), p) for p in prompts)
            return super().__call__(prompts, firsts, seconds)

    monkeypatch.setattr(pipeline, "fit_reward_scorer", spy_fit)
    monkeypatch.setattr(auxiliary, "FoldScorer", SpyFolds)
    held_out = _jsonl(tmp_path / "eval.jsonl", make_rows(3, n_pairs=0, seed=70, preferences=False))
    cfg = _config(tmp_path, tiny_model_dir, data, method="drpo", g_source="reward_model",
                  g_model_name_or_path=str(tiny_reward_dir), g_cross_fit_folds=2, drpo_samples=2,
                  drpo_max_new_tokens=4, loss=None, eval_data=str(held_out))
    status, out, err = cli("finetune", "--config", str(cfg))
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["global_step"] == 2 and 0.0 <= result["metrics"]["eval_drpo/direct"] <= 1.0
    run = tmp_path / "run"
    assert (run / "judge_fold1").is_dir() and (run / "judge_fold2").is_dir()
    prompts = {r["prompt"] for r in rows}
    assert len(fitted) == 2 and fitted[0] | fitted[1] == prompts and not fitted[0] & fitted[1]
    trained = [(k, p) for k, p in routed if p in prompts]
    assert trained and all(p not in fitted[k] for k, p in trained)  # each row judged by the model fitted without it
    held = {json.loads(line)["prompt"] for line in held_out.read_text().splitlines()}
    assert {p for _, p in routed} - prompts == held  # the evaluation rows: no fold, the judges' mean
    # a resumed run loads the saved judges (no new fit) and continues
    status, out, err = cli("finetune", "--config", str(cfg), "--set", "max_steps=3", "--set", "resume_from_checkpoint=last")
    assert status == 0, err
    assert json.loads(out.strip().splitlines()[-1])["global_step"] == 3 and len(fitted) == 2
    assert all((run / f"judge_fold{k}" / "fit.json").exists() for k in (1, 2))


def test_generate_references_cli_resumes(cli: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in make_rows(5, n_pairs=0, seed=66)])
    out = tmp_path / "new" / "refs.jsonl"  # a folder that does not exist yet is made (the batch was lost)
    common = [
        "generate-references",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(prompts),
        "--output",
        str(out),
        "--pairs",
        "1",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--seed",
        "5",
    ]
    status, text, err = cli(*common, "--max-batches", "1")
    assert status == 0, err
    assert json.loads(text)["rows_written"] == 2 and not json.loads(text)["complete"]
    status, text, err = cli(*common)
    assert status == 0 and json.loads(text)["complete"], err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 5 and all("a_1" in r and "a_2" in r for r in lines)
    gen_cfg = tmp_path / "gen.yaml"
    gen_cfg.write_text("temperature: 0.7\nbogus: 1\n")
    status, _, err = cli(*common, "--config", str(gen_cfg))
    assert status == 2 and "unknown generation setting(s) bogus" in err
    # the input as the output: it was taken as a finished output (and --no-resume deleted it)
    before = prompts.read_text()
    for extra in ([], ["--no-resume"]):
        status, _, err = cli(*common, "--output", str(tmp_path / "." / "prompts.jsonl"), *extra)  # the last --output
        assert status == 2 and "is the --data file" in err and prompts.read_text() == before


def test_parse_config_types(tmp_path: Path) -> None:
    from robust_rlhf.llm.config import parse_config

    m, d, p, t = parse_config(
        {
            "model_name_or_path": "x",
            "train_data": "y.jsonl",
            "output_dir": str(tmp_path),
            "lam": 0.25,
            "lora_target_modules": ["c_attn"],
            "use_cpu": True,
        },
        ["--beta", "0.2", "--use_peft", "true"],
    )
    assert (p.lam, p.beta, m.use_peft, m.lora_target_modules) == (0.25, 0.2, True, ["c_attn"])
    assert t.remove_unused_columns is False
    with pytest.raises(InputError, match="model_name_or_path is required"):
        parse_config({"train_data": "y.jsonl", "output_dir": str(tmp_path), "use_cpu": True})
    with pytest.raises(InputError, match="stage"):
        parse_config({"model_name_or_path": "x", "train_data": "y", "stage": "three", "use_cpu": True})


CONFIGS = Path(__file__).resolve().parents[2] / "llm" / "configs"


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "fsdp", "deepspeed_zero3"])
def test_shipped_accelerate_configs_load(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
    assert cfg.mixed_precision == "bf16"
    assert (
        str(cfg.distributed_type).split(".")[-1]
        == {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    )


@pytest.mark.parametrize("name", ["vrpo_one_stage", "reward_two_stage", "drpo_one_stage"])
def test_shipped_run_configs_parse(name: str, tmp_path: Path) -> None:
    from robust_rlhf.llm.config import parse_config
    from robust_rlhf.llm.pipeline import build_objective

    values = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    values.update(output_dir=str(tmp_path), use_cpu=True, bf16=False)  # parse here without a GPU
    m, d, p, t = parse_config(values)
    if p.method == "drpo":
        assert build_objective(p) is None and p.drpo_samples == 2 and p.drpo_ratio_clip == 2.0
    else:
        assert build_objective(p).uses_control_variate
    assert t.output_dir == str(tmp_path)


def test_shipped_generation_config() -> None:
    from robust_rlhf.llm.references import GenerationOptions

    opts = GenerationOptions(**yaml.safe_load((CONFIGS / "generation.yaml").read_text()))
    assert opts.n_pairs == 4 and opts.temperature == 1.0


def test_finetune_precompute_only_with_callable_g_hat(cli: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from llm_helpers import oracle_g

    rows = make_rows(5, n_pairs=2, seed=67, preferences=False)
    data = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = _config(tmp_path, tiny_model_dir, data, g_source="callable", g_callable="llm_helpers:oracle_g")
    status, out, err = cli("finetune", "--config", str(cfg), "--precompute-only")
    assert status == 0, err
    run = tmp_path / "run"
    assert json.loads(out.strip().splitlines()[-1])["global_step"] == 0
    assert not (run / "model.safetensors").exists()  # nothing trained
    (g_file,) = (run / "cache" / "train").glob("g_hat-*.jsonl")
    annotated = [json.loads(line) for line in g_file.read_text().splitlines()]
    for r in annotated:
        assert r["chosen_preference"] == oracle_g(r["prompt"], r["chosen"], r["rejected"])
        assert r["a_4_preference"] == pytest.approx(1 - oracle_g(r["prompt"], r["a_3"], r["a_4"]))
    (ref_file,) = (run / "cache").glob("ref_logps-*.json")
    assert len(json.loads(ref_file.read_text())[0]) == 6  # chosen, rejected, a_1 .. a_4


def test_finetune_drpo_with_a_callable_judge_and_resume(cli: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = make_rows(6, n_pairs=0, seed=68, preferences=False)
    data = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = _config(tmp_path, tiny_model_dir, data, method="drpo", g_source="callable", g_callable="llm_helpers:oracle_g",
                  drpo_samples=2, drpo_max_new_tokens=4, eval_data=str(data), loss=None)
    status, out, err = cli("finetune", "--config", str(cfg), "--dry-run")
    assert status == 0, err
    assert json.loads(out)["objective"] == "drpo"
    status, out, err = cli("finetune", "--config", str(cfg))
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["global_step"] == 2 and 0.0 <= result["metrics"]["eval_drpo/direct"] <= 1.0
    run = tmp_path / "run"
    state = json.loads((run / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "drpo/win_rate" in e]
    assert len(logged) == 2 and all(e["generated/length"] <= 4 for e in logged)
    assert not list((run / "cache").glob("ref_logps-*.json"))  # pi_hat is scored live on the draws
    status, out, err = cli("finetune", "--config", str(cfg), "--set", "max_steps=3",
                           "--set", "resume_from_checkpoint=last")
    assert status == 0, err
    assert json.loads(out.strip().splitlines()[-1])["global_step"] == 3
    for change, message in ((["stage=two"], "method drpo trains a policy: stage must be one"),
                            (["g_source=columns"], "method drpo judges its draws while training: g_source"),
                            (["length_normalize=true"], "method drpo: length_normalize does not apply"),
                            (["g_cross_fit_folds=2"], "g_cross_fit_folds fits the judge, from g_model_name_or_path: "
                                                      "it needs g_source=reward_model")):
        status, _, err = cli("finetune", "--config", str(cfg), *[a for c in change for a in ("--set", c)])
        assert status == 2 and message in err, err
