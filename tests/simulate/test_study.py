"""Validation studies: specs, resumable and worker-independent sweeps, checks that can fail."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from robust_rlhf.simulate import SpecError
from robust_rlhf.simulate.checks import analyse
from robust_rlhf.simulate.study import (CELL_VERSION, DEFAULT_STUDY, ESTIMATORS, EstimatorSetting, StudySpec, load_study,
                                        run_study)
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.policies import preference_utility

TINY = dict(name="tiny", scenarios=["intransitive"], n=[100, 200], estimators=["mle", "vrpo_M4", "vrpo_tuned_M4"],
            reps=24, seed=3, population=2000, eval_prompts=200, chunk=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = StudySpec.from_dict(TINY)
    return run_study(spec, tmp_path_factory.mktemp("study") / "out")


def test_tables(tiny) -> None:
    res, pred = tiny.results, tiny.predictions
    assert len(res) == 2 * 3 * 24 and len(pred) == 6
    assert set(res.columns) >= {"scenario", "n", "estimator", "rep", "theta_0", "se_0", "covered_0", "sq_error",
                                "regret_greedy", "regret_kl", "lam", "converged", "separable"}
    assert res.converged.all() and not res.separable.any()
    mle = pred[pred.estimator == "mle"].iloc[0]
    assert mle.pred_ratio == 1.0 and mle.pred_trace > 0 and mle.pred_regret_greedy > 0
    # the labelled data are common to all estimators: the MLE warm start means equal n-rows share z draws
    for name in ("results.parquet", "results.csv", "predictions.csv", "study.json"):
        assert (tiny.folder / name).exists()
    meta = json.loads((tiny.folder / "study.json").read_text())
    assert meta["seed"] == 3 and "numpy" in meta["versions"] and meta["fingerprint"] == tiny.spec.fingerprint()


def test_interrupted_sweep_resumes_to_the_identical_table(tiny, tmp_path) -> None:
    spec = tiny.spec
    out = tmp_path / "out"
    calls = []

    def stop_after_two(done: int, total: int) -> None:
        calls.append(done)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(spec, out, progress=stop_after_two)
    assert len(list((out / "cells").glob("*.json"))) == 2
    assert not (out / "results.parquet").exists()
    seen = []
    resumed = run_study(spec, out, progress=lambda done, total: seen.append(done))
    assert seen[0] == 2  # the two finished cells were skipped
    pd.testing.assert_frame_equal(resumed.results, tiny.results)
    # a stray temporary file from a killed write is ignored
    (out / "cells" / ".x.parquet.tmp").write_bytes(b"garbage")
    pd.testing.assert_frame_equal(load_study(out).results, tiny.results)
    # a cell finished by another version of the package is read, but recomputed by a rerun, not mixed in
    record = next((out / "cells").glob("*.json"))
    content = json.loads(record.read_text())
    assert content["version"] == CELL_VERSION
    record.write_text(json.dumps({**content, "version": CELL_VERSION - 1, "pred_regret_kl": -1.0}))
    assert (load_study(out).predictions.pred_regret_kl == -1.0).sum() == 1
    seen.clear()
    with pytest.warns(UserWarning, match="1 finished cell.*another version.*recomputed"):
        rerun = run_study(spec, out, progress=lambda done, total: seen.append(done))
    assert seen[0] == len(spec.cells()) - 1
    assert json.loads(record.read_text())["version"] == CELL_VERSION
    pd.testing.assert_frame_equal(rerun.results, tiny.results)
    pd.testing.assert_frame_equal(rerun.predictions.drop(columns="seconds"), tiny.predictions.drop(columns="seconds"))


@pytest.mark.parametrize("backend", ["loky", "multiprocessing", "threading"])
def test_results_do_not_depend_on_workers_chunks_or_backend(tiny, tmp_path, backend) -> None:
    spec = StudySpec.from_dict({**TINY, "chunk": 7})
    seen = []
    parallel = run_study(spec, tmp_path / "par", jobs=2, backend=backend,
                         progress=lambda done, total: seen.append(done))
    pd.testing.assert_frame_equal(parallel.results, tiny.results)
    assert seen[-1] == len(spec.cells())


def test_dask_backend_on_a_local_cluster(tiny, tmp_path) -> None:
    distributed = pytest.importorskip("dask.distributed")
    with distributed.Client(distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False)):
        res = run_study(tiny.spec, tmp_path / "dask", jobs=2, backend="dask")
    pd.testing.assert_frame_equal(res.results, tiny.results)


def test_folder_of_another_spec_is_refused(tiny, tmp_path) -> None:
    other = StudySpec.from_dict({**TINY, "reps": 25})
    with pytest.raises(InputError, match="holds results of a different study spec"):
        run_study(other, tiny.folder)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="is not empty and holds no study"):
        run_study(tiny.spec, tmp_path / "junk")


@pytest.mark.parametrize("change,match", [
    ({"colour": 1}, "unknown study field 'colour'; allowed: name, scenarios"),
    ({"scenarios": ["nope"]}, "unknown scenario 'nope'"),
    ({"estimators": ["mle", "magic"]}, "unknown estimator 'magic'; allowed: mle, vrpo_M1"),
    ({"estimators": [{"name": "x", "method": "vrpo", "M": 0}]}, "'estimators.x.M' = 0 must be an integer >= 1"),
    ({"estimators": [{"name": "x", "method": "mle", "lam": 0.5}]}, "'estimators.x.lam' applies to methods"),
    ({"estimators": [{"name": "x", "method": "vrpo", "aux": "psychic"}]}, "auxiliary model 'psychic' is unknown"),
    ({"estimators": [{"name": "x", "methd": "vrpo"}]}, "unknown study field 'estimators.x.methd'"),
    ({"estimators": ["mle", "mle"]}, "names must be unique"),
    ({"n": [0, 100]}, "'n' = 0 must be an integer >= 1"),
    ({"n": [-5]}, "'n' = -5"),
    ({"reps": 0}, "'reps' = 0 must be an integer >= 2"),
    ({"scenarios": []}, "at least one scenario"),
    ({"kl_beta": 0}, "'kl_beta' = 0 must be a number > 0"),
    ({"estimators": [{"name": "x", "method": "vrpo", "unlabelled": True}]}, "'estimators.x.unlabelled' = True"),
    ({"estimators": [{"name": "x", "method": "vrpo", "lam": True}]}, "'estimators.x.lam' = True"),
    ({"estimators": [{"name": "x", "method": "vrpo", "lam": "tuned"}]},
     "'estimators.x.lam' = 'tuned' must be a finite number or 'auto'"),
    ({"estimators": [{"name": "x", "method": "mle", "lam": "auto"}]}, "'estimators.x.lam' applies to methods"),
    ({"scenarios": [{"name": "mine", "preference": {"model": "label_flip", "eps": 0.9}}]},
     r"'preference.eps' = 0.9 is outside the allowed range"),
])
def test_bad_specs_fail_before_any_work(change: dict, match: str, tmp_path) -> None:
    with pytest.raises(SpecError, match=match):
        StudySpec.from_dict({**TINY, **change})


def test_spec_files_and_fingerprints(tmp_path) -> None:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(TINY))
    spec = StudySpec.from_file(path)
    assert spec.fingerprint() == StudySpec.from_dict(TINY).fingerprint()
    assert StudySpec.from_dict({**TINY, "seed": 4}).fingerprint() != spec.fingerprint()
    assert StudySpec.from_dict(spec.to_dict()) == spec
    assert DEFAULT_STUDY.estimators[0] is ESTIMATORS["mle"]


def test_checks_report_claims_and_can_fail(tiny) -> None:
    report = analyse(tiny.results, tiny.predictions)
    assert {"var_check", "ratio_check", "coverage_check", "var_ratio_low", "ratio_low"} <= set(report.cells.columns)
    assert set(report.slopes.columns) >= {"slope", "slope_low", "slope_high", "slope_check"}
    for claim in report.claims:
        assert set(claim) >= {"name", "scenario", "predicted", "measured", "ci_low", "ci_high", "verdict"}
        assert claim["verdict"] in ("confirmed", "refuted")
    names = {c["name"] for c in report.claims}
    assert {"2_gain_grows_with_M", "3_tuned_never_worse", "5_coverage"} <= names
    # a wrong prediction is caught: with 24 replications the MLE's variance is known to about +-30%
    # (relative sd sqrt(2/24)), so a predicted variance four times too large fails its checks (VRPO
    # at n = 100 is heavy-tailed, its interval honestly wide)
    wrong = tiny.predictions.copy()
    wrong["pred_trace"] *= 4.0
    wrong["pred_ratio"] = np.where(wrong.estimator == "mle", 1.0, 20.0)  # far outside any plausible interval
    bad = analyse(tiny.results, wrong)
    assert (bad.cells[bad.cells.estimator == "mle"].var_check == "fail").all()
    claim = next(c for c in bad.claims if c["name"] == "2_gain_grows_with_M")
    assert claim["verdict"] == "refuted"
    # and the same tables give the same report
    again = analyse(tiny.results, tiny.predictions)
    pd.testing.assert_frame_equal(again.cells, report.cells)
    # an estimator with no estimate in any replication: nothing to measure, so no verdict
    none = tiny.results.copy()
    gone = none.estimator == "vrpo_M4"
    none.loc[gone, [c for c in none.columns if c.startswith(("theta_", "se_", "covered_", "regret_"))] + ["sq_error"]] = np.nan
    none.loc[gone, "separable"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's means of empty slices
        empty = analyse(none, tiny.predictions)
    claims = [c for c in empty.claims if c["estimator"] == "vrpo_M4"]
    assert claims and all(c["verdict"] == "inconclusive" for c in claims)
    cells = empty.cells[empty.cells.estimator == "vrpo_M4"]
    assert (cells.failed == 24).all() and (cells[["var_check", "bias_check", "coverage_check"]] == "n/a").all().all()


def test_pessimism_on_a_scenario_without_utility() -> None:
    """The bound under theta_dagger's reward needs no utility: a scenario without one (intransitive) runs
    (it crashed asking for a utility) and gives no regret under the (absent) true utility."""
    from robust_rlhf.simulate.pessimism import PessimismSpec, run_pessimism

    spec = {"name": "intransitive_tanh", "features": {"map": "tanh", "prompt_dim": 3},
            "preference": {"model": "intransitive", "strength": 1.0}}
    ps = PessimismSpec(scenario=spec, estimators=("mle", "vrpo_M4"), n=(200,), reps=2, prompts=10)
    assert not ps.build_scenario().has_utility
    for est in ps.estimators:
        table = run_pessimism(ps, 200, est, seed=1)
        assert len(table) == 2 and (table.bound_dagger > 0).all() and table.held.all()
        assert table.regret_pessimistic.isna().all() and table.regret_pessimistic_dagger.notna().all()


def test_pessimism_bound_is_checked(tmp_path) -> None:
    """The explicit bound holds (it must, with probability >= 1 - delta) and the report says whether
    it is vacuous; the certified policy never does better than the bound allows. The claim is tested
    where the radius event can fail (the radius below the certain 2 B sqrt(lambda_max(M))): at n = 25600
    here, not at n = 200, where alone it is inconclusive."""
    spec = StudySpec.from_dict({**TINY, "estimators": ["mle"], "n": [150],
                                "pessimism": {"n": [200, 25600], "reps": 4, "prompts": 12, "delta": 0.2}})
    study = run_study(spec, tmp_path / "p")
    pess = study.pessimism
    assert len(pess) == 2 * 2 * 4 and set(pess.estimator) == {"mle", "vrpo_M4"}
    assert (pess.regret_dagger <= pess.bound_dagger + 1e-9).all() and pess.held.all()
    assert (pess.radius[pess.n == 25600].mean() < pess.radius[pess.n == 200].mean())  # shrinks with n
    assert (pess.radius <= pess.certain).all() and (pess.informative == (pess.n == 25600)).all()
    assert pess.in_radius.all()
    # the self-concordant radius: its own policy and bound, the same guarantees, a tighter bound at 25600
    assert (pess.regret_dagger_local <= pess.bound_dagger_local + 1e-9).all() and pess.held_local.all()
    assert (pess.radius_local <= pess.certain_local).all() and pess.in_radius_local.all()
    assert (pess.informative_local == (pess.n == 25600)).all()
    big = pess[pess.n == 25600]
    assert (big.bound_dagger_local < big.bound_dagger).all()
    report = analyse(study.results, study.predictions, pessimism=pess, delta=0.2)
    for name in ("6_bound_holds", "6b_local_bound_holds"):
        claims = [c for c in report.claims if c["name"] == name]
        assert len(claims) == 2 and all(c["verdict"] == "confirmed" for c in claims)
        assert all("4 of 8 replications, at n = 25600" in c["text"] and "largest possible regret" in c["text"]
                   for c in claims)
    assert set(report.pessimism.columns) >= {"held", "held_low", "bound", "max_regret", "regret_pessimistic",
                                             "regret_pessimistic_dagger", "regret_pessimistic_dagger_low",
                                             "informative", "in_radius", "bound_local", "held_local",
                                             "in_radius_local", "informative_local"}
    # where it cannot fail there is no verdict; where it fails too often it is refuted
    small = analyse(study.results, study.predictions, pessimism=pess[pess.n == 200], delta=0.2)
    assert {c["verdict"] for c in small.claims if c["name"] == "6_bound_holds"} == {"inconclusive"}
    bad = analyse(study.results, study.predictions, pessimism=pess.assign(in_radius=~pess.informative), delta=0.2)
    assert {c["verdict"] for c in bad.claims if c["name"] == "6_bound_holds"} == {"refuted"}
    bad = analyse(study.results, study.predictions, pessimism=pess.assign(in_radius_local=~pess.informative_local),
                  delta=0.2)
    assert {c["verdict"] for c in bad.claims if c["name"] == "6b_local_bound_holds"} == {"refuted"}
    # a cell an older version wrote: reading the folder accepts it, a study run recomputes it
    import pyarrow.parquet as pq

    from robust_rlhf.simulate.study import _part_path

    cell = _part_path(tmp_path / "p", "pessimism", spec.pessimism.key(200, spec.pessimism.estimators[0]))
    pq.write_table(pq.read_table(cell).drop_columns(["in_radius", "informative"]), cell)
    assert len(load_study(tmp_path / "p").pessimism) == len(pess)
    assert run_study(spec, tmp_path / "p").pessimism.in_radius.notna().all()
    # a cell with every column but another version (CELL_VERSION 7 recorded none) is recomputed, a current
    # one is left alone
    from robust_rlhf.simulate.study import CELL_VERSION

    stale = _part_path(tmp_path / "p", "pessimism", spec.pessimism.key(25600, spec.pessimism.estimators[0]))
    kept = _part_path(tmp_path / "p", "pessimism", spec.pessimism.key(25600, spec.pessimism.estimators[1]))
    pq.write_table(pq.read_table(stale).replace_schema_metadata({}), stale)
    before = kept.stat().st_mtime_ns
    run_study(spec, tmp_path / "p")
    assert pq.read_schema(stale).metadata[b"robust_rlhf.cell_version"] == str(CELL_VERSION).encode()
    assert kept.stat().st_mtime_ns == before
    # a table an older version wrote: left out of the checks with a warning, not a KeyError
    with pytest.warns(UserWarning, match="the pessimism table lacks in_radius, informative"):
        old = analyse(study.results, study.predictions, pessimism=pess.drop(columns=["in_radius", "informative"]))
    assert old.pessimism is None and not any(c["name"] == "6_bound_holds" for c in old.claims)
    assert (tmp_path / "p" / "pessimism.csv").exists()


@pytest.mark.parametrize("change,match", [
    ({"pessimism": {"reps": 1}}, r"'pessimism.reps' = 1 must be an integer >= 2"),
    ({"pessimism": {"estimators": ["vrpo_exact"]}}, "the bound covers the MLE and VRPO with M pairs"),
    ({"pessimism": {"estimators": ["vrpo_tuned_M4"]}}, "the bound covers the MLE and VRPO with M pairs"),
    ({"pessimism": {"estimators": ["vrpo_unlabelled_M1"]}}, "no unlabelled prompts"),
    ({"pessimism": {"scenario": "nope"}}, "unknown scenario 'nope'"),
    ({"pessimism": {"delta": 1.5}}, r"'pessimism.delta' = 1.5 must be in \(0, 1\)"),
    ({"pessimism": {"colour": 1}}, "unknown study field 'pessimism.colour'"),
    ({"pessimism": {"n": [0]}}, "'pessimism.n'"),
    # its name becomes file names: no way out of the study's folder
    ({"pessimism": {"scenario": {"name": "../../escaped", "d": 2, "K": 3}}}, "'pessimism.scenario.name'"),
    ({"pessimism": {"scenario": {"name": "a/b", "d": 2, "K": 3}}}, "'pessimism.scenario.name'"),
])
def test_bad_pessimism_specs(change: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        StudySpec.from_dict({**TINY, **change})


DRPO_TINY = {"cases": ["both_right", "g_wrong", "pi_wrong", "both_wrong"], "n": [300, 600], "reps": 24,
             "prompts": 40}


def test_drpo_sub_study(tmp_path) -> None:
    """DRPO's double robustness cells: the limits are the oracle's when a model is right and far from it when both
    are wrong; the claims are made per case, and they fail when the theory they check is replaced by a wrong one."""
    spec = StudySpec.from_dict({**TINY, "estimators": ["mle"], "n": [150], "drpo": DRPO_TINY})
    study = run_study(spec, tmp_path / "d")
    table = study.drpo
    assert len(table) == 4 * 2 * 24 and table.converged.all()
    assert (tmp_path / "d" / "drpo.csv").exists() and len(load_study(tmp_path / "d").drpo) == len(table)
    first = table.groupby("case").first()
    d = sum(c.startswith("theta_") for c in table.columns)
    limit = first[[f"limit_{k}" for k in range(d)]].to_numpy()
    oracle = first[[f"oracle_{k}" for k in range(d)]].to_numpy()
    gap = np.linalg.norm(limit - oracle, axis=1) / np.linalg.norm(oracle, axis=1)
    assert (gap[first.index != "both_wrong"] < 1e-6).all() and gap[first.index == "both_wrong"][0] > 0.5
    right = first.index != "both_wrong"
    np.testing.assert_allclose(first.win_fixed_expected[right], first.win_limit[right], rtol=1e-10)
    assert (first.objective_oracle >= first.objective_limit - 1e-12).all()  # the oracle is the best of its class
    report = analyse(study.results, study.predictions, drpo=table)
    claims = [c for c in report.claims if c["name"].startswith("7_")]
    names = ("7_drpo_consistent", "7_drpo_variance", "7_drpo_coverage", "7_drpo_win_rate")
    assert sorted((c["name"], c["estimator"]) for c in claims) == sorted(
        (name, f"drpo_{case}") for name in names for case in DRPO_TINY["cases"])
    assert set(report.drpo.columns) >= {"case", "n", "median_error", "oracle_error", "regret", "var_ratio",
                                        "coverage", "win_fixed", "win_fixed_low", "win_fixed_high"}
    # the checks can fail: the oracle as the target of DRPO with both models wrong, or the true win rate as the
    # mean of its estimate, is refuted
    both = table.case == "both_wrong"
    swapped = table.copy()
    for k in range(d):
        swapped.loc[both, f"limit_{k}"] = swapped.loc[both, f"oracle_{k}"]
    swapped.loc[both, "win_fixed_expected"] = swapped.loc[both, "win_limit"]
    verdicts = {c["name"]: c["verdict"] for c in analyse(study.results, study.predictions, drpo=swapped).claims
                if c["estimator"] == "drpo_both_wrong"}
    assert verdicts["7_drpo_consistent"] == "refuted" and verdicts["7_drpo_win_rate"] == "refuted"
    # so can the variance check, against a sandwich four times too large (with both models wrong, the interquartile
    # scale of 24 replications extrapolated from two n is too uncertain to tell)
    wide = table.assign(pred_var=4 * table.pred_var)
    verdicts = {(c["name"], c["estimator"]): c["verdict"]
                for c in analyse(study.results, study.predictions, drpo=wide).claims}
    assert all(verdicts[("7_drpo_variance", f"drpo_{case}")] == "refuted" for case in DRPO_TINY["cases"][:3])
    # a finished cell is not recomputed; a study without the sub-study keeps the fingerprint it always had
    cell = tmp_path / "d" / "drpo" / "annotator_mixture__n300__g_wrong.parquet"
    before = cell.stat().st_mtime_ns
    run_study(spec, tmp_path / "d")
    assert cell.stat().st_mtime_ns == before
    assert "drpo" not in StudySpec.from_dict(TINY).to_dict()
    assert StudySpec.from_dict({**TINY, "drpo": None}).fingerprint() == StudySpec.from_dict(TINY).fingerprint()
    assert DEFAULT_STUDY.drpo is not None
    pop, g_hat, pi_hat = spec.drpo.models("both_wrong")  # the wrong models belong to the population's prompts
    np.testing.assert_array_equal(g_hat, 1.0 - pop.g_star)
    assert np.allclose(np.log(pi_hat / pop.pi) + 4.0 * preference_utility(pop),
                       (np.log(pi_hat / pop.pi) + 4.0 * preference_utility(pop))[:, :1])


@pytest.mark.parametrize("change,match", [
    ({"cases": ["g_wrong", "nope"]}, "'drpo.cases'"),
    ({"cases": []}, "'drpo.cases'"),
    ({"cases": ["g_wrong", "g_wrong"]}, "'drpo.cases'"),
    ({"g_hat": {"kind": "oracle"}}, "other than the oracle"),
    ({"g_hat": {"kind": "learned"}}, "other than the oracle"),
    ({"g_hat": {"kind": "magic"}}, "'drpo.g_hat'"),
    ({"pi_tilt": 0}, r"'drpo.pi_tilt' = 0 must be a number > 0"),
    ({"beta": float("nan")}, "'drpo.beta'"),
    ({"reps": 1}, "'drpo.reps' = 1 must be an integer >= 2"),
    ({"n": [1]}, "'drpo.n'"),
    ({"scenario": "nope"}, "unknown scenario 'nope'"),
    ({"colour": 1}, "unknown study field 'drpo.colour'"),
    ({"scenario": {"name": "../out", "d": 2, "K": 3}}, "'drpo.scenario.name'"),
])
def test_bad_drpo_specs(change: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        StudySpec.from_dict({**TINY, "drpo": change})


def test_crossfit_cells_use_the_settings_folds_and_seed(tmp_path) -> None:
    """A ``vrpo_crossfit`` cell fits VRPO on the g_hat that ``sample`` cross-fitted with the setting's
    ``folds`` and ``seed``: the same estimates as doing so by hand, and other estimates for other folds."""
    from robust_rlhf.simulate import get_scenario, sample
    from robust_rlhf.theory import fit

    def cell(aux: dict) -> np.ndarray:
        est = {"name": "cf", "method": "vrpo_crossfit", "M": 2, "aux": aux}
        spec = StudySpec.from_dict({**TINY, "scenarios": ["near_deterministic"], "n": [120], "reps": 3,
                                    "estimators": [est], "chunk": 3})
        res = run_study(spec, tmp_path / "-".join(map(str, aux.values()))).results
        return res.sort_values("rep")[["theta_0", "theta_1", "theta_2"]].to_numpy()

    aux = {"kind": "learned", "folds": 3, "seed": 2}
    data = sample(get_scenario("near_deterministic"), 120, seed=TINY["seed"], reps=3, M=2, aux=aux)
    by_hand = fit(data.to_pair_data(), "vrpo", on_separable="warn").theta
    np.testing.assert_allclose(cell(aux), by_hand, rtol=1e-12, atol=1e-12)
    assert not np.allclose(cell({**aux, "folds": 6}), by_hand)
    assert not np.allclose(cell({**aux, "seed": 3}), by_hand)


def test_power_tuned_settings(tmp_path) -> None:
    """``lam: auto`` power-tunes: ``vrpo`` becomes ``vrpo_tuned`` (as in ``fit``), and a ``vrpo_crossfit`` cell
    tunes ``lam`` on the cross-fitted ``g_hat`` (the catalogued ``vrpo_crossfit_tuned_M8``)."""
    from robust_rlhf.simulate import get_scenario, sample
    from robust_rlhf.theory import fit

    assert EstimatorSetting.parse({"name": "t", "method": "vrpo", "M": 4, "lam": "auto"}) == \
        EstimatorSetting("t", "vrpo_tuned", M=4)
    cat = ESTIMATORS["vrpo_crossfit_tuned_M8"]
    assert (cat.method, cat.lam, cat.aux["kind"]) == ("vrpo_crossfit", "auto", "learned")
    est = {"name": "cft", "method": "vrpo_crossfit", "M": 2, "lam": "auto", "aux": {"kind": "learned", "folds": 3}}
    spec = StudySpec.from_dict({**TINY, "scenarios": ["near_deterministic"], "n": [120], "reps": 3,
                                "estimators": [est], "chunk": 3})
    res = run_study(spec, tmp_path / "out").results.sort_values("rep")
    data = sample(get_scenario("near_deterministic"), 120, seed=TINY["seed"], reps=3, M=2, aux=est["aux"])
    by_hand = fit(data.to_pair_data(), "vrpo_tuned", on_separable="warn")
    np.testing.assert_allclose(res[["theta_0", "theta_1", "theta_2"]].to_numpy(), by_hand.theta, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(res["lam"].to_numpy(), by_hand.lam)
    with pytest.raises(SpecError, match="the bound covers the MLE and VRPO"):
        StudySpec.from_dict({**TINY, "pessimism": {"estimators": [{"name": "p", "method": "vrpo", "lam": "auto"}]}})


def test_bootstrap_statistics_match_their_loops() -> None:
    """The verdicts' vectorised bootstrap equals the per-resample loop it replaced: ``tr Cov`` of the
    rows without NaN (NaN below 2 rows) and the mean of the non-NaN entries (NaN when there is none)."""
    from robust_rlhf.simulate.checks import _boot_mean, _trace_vars

    rng = np.random.default_rng(0)
    theta = rng.normal(size=(30, 3))
    theta[[2, 7], 1] = np.nan
    idx = rng.integers(0, 30, size=(50, 30))
    idx[0] = 2  # a resample of one NaN row only
    idx[1, :29] = 7  # ... and of a single valid row among NaN ones
    def loop_var(t: np.ndarray) -> float:
        ok = np.isfinite(t).all(axis=1)
        return float(np.var(t[ok], axis=0, ddof=1).sum()) if ok.sum() >= 2 else np.nan

    np.testing.assert_allclose(_trace_vars(theta[idx]), [loop_var(theta[i]) for i in idx], rtol=1e-13)
    assert float(_trace_vars(theta)) == pytest.approx(loop_var(theta), rel=1e-13)
    values = rng.normal(size=(30, 2))
    values[values > 1.2] = np.nan
    with np.errstate(invalid="ignore"):
        want = [np.nanmean(values[i]) if (~np.isnan(values[i])).any() else np.nan for i in idx]
    np.testing.assert_allclose(_boot_mean(values, idx), want, rtol=1e-13)
    assert np.isnan(_boot_mean(np.full(30, np.nan), idx)).all()


def test_a_study_may_mix_feature_dimensions(tmp_path) -> None:
    """Each cell is analysed in its own scenario's dimension (the table holds theta_0 .. theta_4 for both);
    20 replications, the fewest a cell is checked with (MIN_ESTIMATES)."""
    spec = StudySpec.from_dict({**TINY, "scenarios": ["intransitive", {"name": "wide", "d": 5,
                                                                      "preference": {"model": "probit"}}],
                                "n": [150], "estimators": ["mle", "vrpo_M4"], "reps": 20})
    study = run_study(spec, tmp_path / "mixed")
    report = analyse(study.results, study.predictions)
    bias = report.bias.groupby("scenario").coordinate.max()
    assert bias.to_dict() == {"intransitive": 2, "wide": 4}
    assert set(report.cells.var_check) <= {"pass", "fail"} and np.isfinite(report.cells["var"]).all()
