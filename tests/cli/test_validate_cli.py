"""``robust-rlhf validate`` and ``robust-rlhf figures`` end to end on a tiny study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robust_rlhf.cli.main import main
from robust_rlhf.theory.errors import InputError

SMALL = ["--scenario", "intransitive", "--estimators", "mle,vrpo_M4,vrpo_tuned_M4", "--n", "100,200",
         "--reps", "20", "--jobs", "1"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "study"
    spec = tmp_path_factory.mktemp("spec") / "study.yaml"
    spec.write_text("name: small\npopulation: 2000\neval_prompts: 200\n")
    assert main(["validate", "--config", str(spec), *SMALL, "--out", str(out), "--no-figures", "--json"]) == 0
    return out


def test_json_output(study_dir, capsys, tmp_path) -> None:
    # rerun: every cell is finished, so this only re-reads and reports
    spec = tmp_path / "study.yaml"
    spec.write_text("name: small\npopulation: 2000\neval_prompts: 200\n")
    assert main(["validate", "--config", str(spec), *SMALL, "--out", str(study_dir), "--no-figures", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"] == str(study_dir / "results.parquet")
    assert out["claims"], "no claims"
    for claim in out["claims"]:
        assert set(claim) >= {"name", "scenario", "predicted", "measured", "ci_low", "ci_high", "verdict"}
        assert claim["verdict"] in ("confirmed", "refuted")
    for name in ("cell_checks.csv", "slopes.csv", "claims.csv", "claims.json", "predictions.csv", "bias_checks.csv"):
        assert (study_dir / name).exists()


def test_human_report_and_figures(study_dir, capsys, tmp_path) -> None:
    spec = tmp_path / "study.yaml"
    spec.write_text("name: small\npopulation: 2000\neval_prompts: 200\n")
    assert main(["validate", "--config", str(spec), *SMALL, "--out", str(study_dir)]) == 0
    out = capsys.readouterr().out
    assert "claims confirmed" in out and "variance against theory" in out
    # the cells' verdicts in one line, counted from cell_checks.csv
    import pandas as pd

    checks = pd.read_csv(study_dir / "cell_checks.csv", keep_default_na=False)
    summary = " ".join(out.split())
    assert f"variance {(checks.var_check == 'pass').sum()}/{len(checks)}" in summary
    judged = checks[checks.bias_check != "n/a"]
    assert f"bias b/n {(judged.bias_check == 'pass').sum()}/{len(judged)}" in summary
    for name in ("mse_vs_n", "variance_ratio", "regret_vs_n", "coverage_vs_n", "second_order_bias"):
        for ext in ("png", "pdf", "csv"):
            assert (study_dir / "figures" / f"{name}.{ext}").stat().st_size > 0
    figs = tmp_path / "figs"
    assert main(["figures", "--only", "variance_ratio,coverage_vs_n", "--study", str(study_dir),
                 "--out", str(figs)]) == 0
    assert (figs / "variance_ratio.png").exists() and (figs / "coverage_vs_n.csv").exists()


@pytest.mark.parametrize("argv,message", [
    (["--scenario", "nope"], "unknown scenario 'nope'"),
    (["--estimators", "mle,magic"], "unknown estimator 'magic'"),
    (["--n", "100,abc"], "--n: expected comma-separated integers"),
    (["--n", "0"], "'n' = 0 must be an integer >= 1"),
    (["--reps", "1"], "'reps' = 1 must be an integer >= 2"),
    (["--backend", "carrier-pigeon"], "unknown joblib backend 'carrier-pigeon'"),
    (["--jobs", "0"], "jobs = 0"),
    (["--config", "/nonexistent.yaml"], "file not found"),
])
def test_bad_input_fails_before_any_work(argv, message, capsys, tmp_path) -> None:
    assert main(["validate", *argv, "--out", str(tmp_path / "o"), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "cells").exists() or not any((tmp_path / "o" / "cells").iterdir())


def test_other_spec_in_folder_is_refused(study_dir, capsys) -> None:
    assert main(["validate", *SMALL[:-2], "--reps", "21", "--out", str(study_dir), "--no-figures"]) == 2
    assert "holds results of a different study spec" in capsys.readouterr().err


def test_list_estimators(capsys) -> None:
    assert main(["validate", "--list-estimators"]) == 0
    out = capsys.readouterr().out
    assert "vrpo_tuned_M4" in out and "vrpo_crossfit_M8" in out and "drpo " in out


def test_figures_finish_an_interrupted_default_study(monkeypatch, tmp_path) -> None:
    # the scripts run the default study if it is missing; one interrupted was refused as unfinished
    from robust_rlhf.simulate import study as study_module

    tiny = study_module.StudySpec.from_dict(dict(name="tiny", scenarios=["intransitive"], n=[100, 200], reps=20,
                                                 estimators=["mle", "vrpo_M4"], population=2000, eval_prompts=200))
    monkeypatch.setattr(study_module, "DEFAULT_STUDY", tiny)
    out = tmp_path / "study"

    def interrupt(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study_module.run_study(tiny, out, progress=interrupt)
    with pytest.raises(InputError, match="unfinished"):
        study_module.load_study(out)
    assert main(["figures", "--only", "variance_ratio", "--study", str(out), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "variance_ratio.png").exists()
    assert len(study_module.load_study(out).results) == 2 * 2 * 20


def test_figures_needs_a_known_script(capsys) -> None:
    assert main(["figures", "--only", "nope"]) == 2
    assert "no figure script 'nope'" in capsys.readouterr().err


def test_estimators_asked_for_also_restrict_the_pessimism_sub_study() -> None:
    import argparse

    from robust_rlhf.cli.validate import build_spec

    args = argparse.Namespace(config=None, scenario="bt", estimators="mle", n=None, reps=None, seed=None)
    assert [e.name for e in build_spec(args).pessimism.estimators] == ["mle"]
    args.estimators = "vrpo_exact"  # the bound does not cover it: no sub-study
    assert build_spec(args).pessimism is None


def test_estimators_asked_for_keep_the_drpo_sub_study_only_when_named() -> None:
    import argparse

    from robust_rlhf.cli.validate import build_spec
    from robust_rlhf.simulate.study import DEFAULT_STUDY

    args = argparse.Namespace(config=None, scenario=None, estimators=None, n=None, reps=None, seed=None)
    assert build_spec(args).drpo == DEFAULT_STUDY.drpo
    args.estimators = "mle,vrpo_M4"
    assert build_spec(args).drpo is None
    args.estimators = "mle,drpo"
    spec = build_spec(args)
    assert spec.drpo == DEFAULT_STUDY.drpo and [e.name for e in spec.estimators] == ["mle"]


def test_drpo_sub_study_report_files_and_figure(tmp_path, capsys) -> None:
    spec = tmp_path / "study.yaml"
    spec.write_text("name: dr\nscenarios: [bt]\nn: [100]\nestimators: [mle]\nreps: 20\npopulation: 2000\n"
                    "eval_prompts: 200\ndrpo: {cases: [g_wrong, both_wrong], n: [200, 400], reps: 20, prompts: 30}\n")
    out = tmp_path / "o"
    assert main(["validate", "--config", str(spec), "--out", str(out), "--jobs", "1"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "DRPO double robustness on annotator_mixture at the largest n" in text
    import pandas as pd

    checks = pd.read_csv(out / "drpo_checks.csv")
    assert set(checks.case) == {"g_wrong", "both_wrong"} and set(checks.n) == {200, 400}
    claims = json.loads((out / "claims.json").read_text())
    assert {c["name"] for c in claims if c["estimator"].startswith("drpo_")} == {
        "7_drpo_consistent", "7_drpo_variance", "7_drpo_coverage", "7_drpo_win_rate"}
    for ext in ("png", "pdf", "csv"):
        assert (out / "figures" / f"double_robustness.{ext}").stat().st_size > 0
