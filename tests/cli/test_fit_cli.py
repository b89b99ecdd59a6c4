"""``robust-rlhf fit`` on user arrays, including hostile files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robust_rlhf.cli.main import main
from robust_rlhf.simulate import get_scenario, sample, save
from robust_rlhf.theory.fitting import fit
from robust_rlhf.theory.io import load_pair_data


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "pairs.npz"
    save(sample(get_scenario("intransitive"), 500, seed=0, M=4, aux="noisy_oracle"), path)
    return path


def _json(capsys, argv) -> dict:
    assert main(["fit", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_matches_the_python_api(npz, capsys) -> None:
    out = _json(capsys, ["--data", str(npz), "--method", "vrpo"])
    res = fit(load_pair_data(npz), "vrpo")
    assert set(out) >= {"theta", "se", "cov", "lambda", "converged", "variance_ratio"}
    np.testing.assert_allclose(out["theta"], res.theta[0])
    np.testing.assert_allclose(out["se"], res.se[0])
    np.testing.assert_allclose(out["cov"], res.cov[0])
    assert out["lambda"] == 1.0 and out["converged"] is True and out["n_ref"] == 2000


def test_lam_variants(npz, capsys) -> None:
    auto = _json(capsys, ["--data", str(npz), "--lam", "auto"])
    assert auto["method"] == "vrpo_tuned" and 0 <= auto["lambda"] <= 1
    half = _json(capsys, ["--data", str(npz), "--lam", "0.5"])
    assert half["method"] == "vrpo" and half["lambda"] == 0.5
    mle = _json(capsys, ["--data", str(npz)])
    assert mle["method"] == "mle" and mle["variance_ratio"] == 1.0
    coord = _json(capsys, ["--data", str(npz), "--lam", "auto", "--weight", "2"])
    assert coord["method"] == "vrpo_tuned"
    hinge = _json(capsys, ["--data", str(npz), "--loss", "hinge"])
    assert hinge["loss"] == "hinge" and all(s > 0 for s in hinge["se"])


def test_human_output(npz, capsys) -> None:
    assert main(["fit", "--data", str(npz), "--lam", "auto"]) == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "variance ratio against the MLE" in out and "lambda =" in out


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _good(n=30, d=2, N=10, seed=0):
    rng = np.random.default_rng(seed)
    dphi = rng.normal(size=(n, d))
    return dict(dphi=dphi, z=(rng.random(n) < 0.5).astype(float), g=rng.random(n),
                dphi_ref=rng.normal(size=(N, d)), g_ref=rng.random(N))


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.pop("z"), "missing array 'z'"),
    (lambda a: a.pop("g_ref"), "'g' is given but 'g_ref' missing"),
    (lambda a: a.update(z=np.full(30, 0.5)), "labels must be 0 or 1"),
    (lambda a: a.update(g=np.full(30, 1.2)), "g: entry (0, 0) is 1.2, but probabilities must lie in [0, 1]"),
    (lambda a: a.update(g_ref=np.full(10, np.nan)), "g_ref: entry (0, 0) is nan"),
    (lambda a: a.update(dphi=np.zeros((30, 2, 2, 2))), "'dphi' must be n x d"),
    (lambda a: a.update(z=np.zeros(29)), "z: expected shape (1, 30)"),
    (lambda a: a.update(dphi_ref=np.zeros((10, 3))), "dphi_ref: expected shape (R=1, N, d=2)"),
    (lambda a: a.update(ref_row=np.arange(5)), "ref_row: need 10 integers"),
    (lambda a: a.update(ref_row=np.full(10, 0.5)), "ref_row: need 10 integers"),
    (lambda a: a.update(dphi=np.full((30, 2), np.inf)), "dphi: entry (0, 0, 0) is inf"),
])
def test_hostile_files(tmp_path, capsys, mutate, message) -> None:
    arrays = _good()
    mutate(arrays)
    path = _write(tmp_path / "bad.npz", **arrays)
    assert main(["fit", "--data", path, "--method", "vrpo"]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.npz" in err and err.count("\n") == 1


def test_other_user_errors(tmp_path, capsys) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    assert main(["fit", "--data", str(tmp_path / "junk.npz")]) == 2
    assert "not a readable .npz file" in capsys.readouterr().err
    assert main(["fit", "--data", str(tmp_path / "missing.npz")]) == 2
    assert "file not found" in capsys.readouterr().err
    good = _write(tmp_path / "g.npz", **_good())
    for argv, message in ((["--lam", "many"], "--lam: expected a number or 'auto'"),
                          (["--lam", "auto", "--method", "mle"], "--lam auto power-tunes vrpo or vrpo_crossfit"),
                          (["--lam", "0.5", "--method", "mle"], "applies to --method vrpo"),
                          (["--weight", "7", "--lam", "auto"], "--weight 7: must be a coordinate in [0, 2)"),
                          (["--weight", "1"], "--weight J picks the target of power tuning: it needs --lam auto"),
                          (["--loss", "truncated_hinge"], "give a norm bound"),
                          (["--method", "vrpo", "--bound", "-1"], "bound must be a positive number")):
        assert main(["fit", "--data", good, *argv]) == 2, argv
        assert message in capsys.readouterr().err
    only_mle = _good()
    for key in ("g", "dphi_ref", "g_ref"):
        only_mle.pop(key)
    path = _write(tmp_path / "mle.npz", **only_mle)
    assert main(["fit", "--data", path, "--method", "vrpo"]) == 2
    assert "needs reference pairs" in capsys.readouterr().err


def test_cross_fitted_vrpo_needs_reference_pairs_only(tmp_path, capsys) -> None:
    """``--method vrpo_crossfit`` learns ``g_hat`` itself: a file with ``dphi_ref`` but no ``g``/``g_ref`` is
    enough, ``--lam auto`` power-tunes it, and the result is the library's."""
    from robust_rlhf.theory import PairData, fit

    arrays = _good(n=120, N=240)
    arrays["ref_row"] = np.repeat(np.arange(120), 2)
    arrays["z"] = (np.random.default_rng(2).random(120) < 1 / (1 + np.exp(-arrays["dphi"] @ [1.0, -0.5]))) * 1.0
    for key in ("g", "g_ref"):
        arrays.pop(key)
    path = _write(tmp_path / "cf.npz", **arrays)
    out = _json(capsys, ["--data", path, "--method", "vrpo_crossfit", "--lam", "auto", "--folds", "3", "--seed", "4"])
    data = PairData(dphi=arrays["dphi"][None], z=arrays["z"][None], dphi_ref=arrays["dphi_ref"][None],
                    ref_row=arrays["ref_row"])
    res = fit(data, "vrpo_crossfit", lam="auto", folds=3, seed=4)
    assert out["method"] == "vrpo_crossfit" and out["theta"] == res.theta[0].tolist()
    assert out["lambda"] == float(res.lam[0]) and 0 <= out["lambda"] <= 1
    assert _json(capsys, ["--data", path, "--method", "vrpo_crossfit", "--lam", "0.5"])["lambda"] == 0.5
    assert main(["fit", "--data", path, "--method", "vrpo"]) == 2
    assert "needs the auxiliary probabilities g and g_ref" in capsys.readouterr().err
    assert main(["fit", "--data", path, "--method", "vrpo_crossfit", "--folds", "1"]) == 2
    assert "folds must be an integer in [2, " in capsys.readouterr().err
    for flag in ("--folds", "--seed"):  # silently ignored before
        assert main(["fit", "--data", path, "--method", "mle", flag, "3"]) == 2
        assert f"{flag} sets the cross-fitting of g_hat: it needs --method vrpo_crossfit" in capsys.readouterr().err
    assert main(["simulate", "--n", "50", "--aux", "None", "--out", str(tmp_path / "b.npz")]) == 2
    assert "auxiliary model 'None' is unknown; allowed: oracle, noisy_oracle" in (err := capsys.readouterr().err)
    assert err.rstrip().endswith("learned, none"), err


def test_simulate_without_an_auxiliary_model_feeds_cross_fitting(tmp_path, capsys) -> None:
    path = tmp_path / "p.npz"
    assert main(["simulate", "--scenario", "probit", "--n", "150", "--M", "2", "--aux", "none", "--out", str(path),
                 "--json"]) == 0
    capsys.readouterr()
    assert {"dphi_ref", "ref_row"} <= set(np.load(path)) and not {"g", "g_ref"} & set(np.load(path))
    out = _json(capsys, ["--data", str(path), "--method", "vrpo_crossfit", "--lam", "auto"])
    assert out["n_ref"] == 300 and out["converged"] and 0 <= out["lambda"] <= 1


def test_separable_data_suggests_a_bound(tmp_path, capsys) -> None:
    arrays = _good(n=20)
    arrays["z"] = (arrays["dphi"] @ np.array([1.0, -2.0]) > 0).astype(float)
    path = _write(tmp_path / "sep.npz", **arrays)
    assert main(["fit", "--data", path]) == 2
    assert "separable" in capsys.readouterr().err
    out = _json(capsys, ["--data", path, "--bound", "3"])
    assert out["at_bound"] is True and abs(np.linalg.norm(out["theta"]) - 3) < 1e-6


def test_batches_are_refused(tmp_path, capsys) -> None:
    path = tmp_path / "many.npz"
    save(sample(get_scenario("bt"), 20, seed=0, reps=3, M=1), path)
    assert main(["fit", "--data", str(path)]) == 2
    assert "holds 3 replications" in capsys.readouterr().err
