"""Hostile input at every entry point outside ``llm/``.

Each row is one hostile input and the clear, one-line error it must get (or, in the tests below the
tables, the documented and warned fallback). None may end in a traceback from deep inside numpy or
torch, a hang or a silently wrong number. Entry points: the ``simulate``, ``fit``, ``validate``,
``figures`` and ``check`` subcommands, ``theory.io`` (``load_pair_data``, ``atomic_path``),
``theory.data.PairData``, ``simulate.scenario.load_spec``, the study specs, ``simulate.sample`` and
``simulate.save``, and ``theory.fitting.fit`` on data that pass the loaders but not the estimators.
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from robust_rlhf.cli.main import main
from robust_rlhf.simulate import Scenario, get_scenario, load_spec, sample, save
from robust_rlhf.simulate.auxiliary import AuxSpec
from robust_rlhf.simulate.study import ESTIMATORS, StudySpec, load_study, run_study
from robust_rlhf.theory.data import PairData, PairPopulation
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.fitting import fit
from robust_rlhf.theory.io import atomic_path, load_callable, load_pair_data


def _text(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _pairs(n: int = 30, d: int = 2, N: int = 10, seed: int = 0, **changes) -> dict:
    rng = np.random.default_rng(seed)
    arrays = dict(dphi=rng.normal(size=(n, d)), z=(rng.random(n) < 0.5).astype(float), g=rng.random(n),
                  dphi_ref=rng.normal(size=(N, d)), g_ref=rng.random(N))
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


def _npz(path: Path, **changes) -> str:
    np.savez(path, **_pairs(**changes))
    return str(path)


def _truncated_npz(path: Path) -> str:
    _npz(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _a_file_as_parent(tmp: Path, name: str) -> str:
    (tmp / "plain.txt").write_text("not a folder")
    return str(tmp / "plain.txt" / name)


@dataclass(frozen=True)
class Row:
    """One hostile command line: ``argv(tmp_path)`` and a fragment of its one-line error."""

    id: str
    argv: Callable[[Path], list[str]]
    message: str


SIMULATE = [
    Row("empty spec", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "")], "the spec file is empty"),
    Row("truncated spec", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "preference: {model: probit, scale:")],
        "cannot parse the spec"),
    Row("binary spec", lambda t: ["simulate", "--spec", _text(t / "s.yaml", b"\xff\xfe\x00\x81garbage")],
        "not a UTF-8 text file"),
    Row("duplicated field", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "d: 3\nK: 4\nd: 5\n")],
        "duplicate field 'd'"),
    Row("duplicated JSON field", lambda t: ["simulate", "--spec", _text(t / "s.json", '{"d": 3, "d": 5}')],
        "duplicate field 'd'"),
    Row("spec is a list", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "- 1\n- 2\n")],
        "the spec must be a mapping of fields, got list"),
    Row("spec is a folder", lambda t: ["simulate", "--spec", str(t)], "is a folder, not a spec file"),
    Row("a field's error names the file", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "features: {map: tanhh}")],
        "s.yaml: field 'features.map' = 'tanhh' is unknown"),
    Row("a study field's error names the file", lambda t: ["validate", "--config", _text(t / "c.yaml", "reps: 1\n"),
                                                           "--out", str(t / "o")], "c.yaml: study field 'reps' = 1"),
    Row("features of the wrong type", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "features: 5\n")],
        "field 'features' = 5 must be a map name or a mapping"),
    Row("reference of the wrong type", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "reference: [1]\n")],
        "field 'reference' = [1] must be a policy name"),
    Row("recursive YAML alias", lambda t: ["simulate", "--spec", _text(
        t / "s.yaml", "preference: &p {model: label_flip, base: *p}\n")], "nested more than 4 deep"),
    Row("NaN parameter", lambda t: ["simulate", "--spec", _text(t / "s.json", '{"reward_scale": NaN}')],
        "field 'reward_scale' = nan must be finite"),
    Row("string dimension", lambda t: ["simulate", "--spec", _text(t / "s.yaml", "d: three\n")],
        "field 'd' = 'three' must be an integer >= 1"),
    Row("probability out of range", lambda t: ["simulate", "--spec", _text(
        t / "s.yaml", "preference: {model: label_flip, eps: 1.5}\n")], "outside the allowed range [0, 1/2)"),
    Row("zero pairs", lambda t: ["simulate", "--n", "0"], "'n' = 0 must be an integer >= 1"),
    Row("enormous feature map", lambda t: ["simulate", "--spec", _text(
        t / "s.yaml", "d: 100000\nK: 1000\nfeatures: {map: linear}\n")], "GiB of memory"),
    Row("enormous request", lambda t: ["simulate", "--n", "1000000000000", "--out", str(t / "x.npz")],
        "GiB of memory"),
    Row("negative M", lambda t: ["simulate", "--M", "-1"], "'M' = -1 must be an integer >= 0"),
    Row("fractional M", lambda t: ["simulate", "--M", "1.5"], "--M: expected an integer or 'exact'"),
    Row("g_hat constant outside [0, 1]", lambda t: ["simulate", "--aux", "constant:value=2"],
        "field 'value' = 2 must be in [0, 1]"),
    Row("NaN noise", lambda t: ["simulate", "--aux", "noisy_oracle:noise=nan"], "'noise' = nan must be >= 0"),
    Row("fractional folds", lambda t: ["simulate", "--aux", "learned:folds=2.5"],
        "field 'folds' = 2.5 must be an integer"),
    Row("bad output suffix", lambda t: ["simulate", "--out", str(t / "x.txt")], "must end in .npz or .parquet"),
    Row("output is a folder", lambda t: ["simulate", "--n", "20", "--out", str((t / "x.npz").mkdir() or t / "x.npz")],
        "it is a folder"),
    Row("output under a file", lambda t: ["simulate", "--n", "20", "--out", _a_file_as_parent(t, "x.npz")],
        "cannot create the output folder"),
    Row("unknown scenario", lambda t: ["simulate", "--describe", "nope"], "unknown scenario 'nope'"),
]

FIT = [
    Row("empty file", lambda t: ["fit", "--data", _text(t / "d.npz", b"")], "not a readable .npz file"),
    Row("truncated file", lambda t: ["fit", "--data", _truncated_npz(t / "d.npz")], "not a readable .npz file"),
    Row("a .npy array", lambda t: ["fit", "--data", (np.save(t / "d.npy", np.zeros((3, 2))), str(t / "d.npy"))[1]],
        "holds a single array, not an .npz archive"),
    Row("a folder", lambda t: ["fit", "--data", str(t)], "is a folder, not an .npz file"),
    Row("string features", lambda t: ["fit", "--data", _npz(t / "d.npz", dphi=np.array([["a", "b"]] * 30))],
        "dphi: cannot be read as numbers"),
    Row("complex features", lambda t: ["fit", "--data", _npz(t / "d.npz", dphi=np.ones((30, 2)) * (1 + 1j))],
        "dphi: complex values"),
    Row("labels not 0/1", lambda t: ["fit", "--data", _npz(t / "d.npz", z=np.full(30, 0.5))], "labels must be 0 or 1"),
    Row("probability below 0", lambda t: ["fit", "--data", _npz(t / "d.npz", g_ref=np.full(10, -0.1))],
        "g_ref: entry (0, 0) is -0.1, but probabilities must lie in [0, 1]"),
    Row("NaN reference feature", lambda t: ["fit", "--data", _npz(t / "d.npz", dphi_ref=np.full((10, 2), np.nan))],
        "dphi_ref: entry (0, 0, 0) is nan"),
    Row("infinite g", lambda t: ["fit", "--data", _npz(t / "d.npz", g=np.full(30, np.inf))], "g: entry (0, 0) is inf"),
    Row("duplicated column", lambda t: ["fit", "--data", _npz(
        t / "d.npz", dphi=np.repeat(np.random.default_rng(1).normal(size=(30, 1)), 2, axis=1))],
        "dphi has rank 1 < d = 2"),
    Row("all-zero column", lambda t: ["fit", "--data", _npz(
        t / "d.npz", dphi=np.c_[np.random.default_rng(1).normal(size=30), np.zeros(30)])], "dphi has rank 1 < d = 2"),
    Row("missing column (d = 0)", lambda t: ["fit", "--data", _npz(t / "d.npz", dphi=np.zeros((30, 0)))],
        "need at least one replication, one pair and one feature"),
    Row("missing array", lambda t: ["fit", "--data", _npz(t / "d.npz", z=None)], "missing array 'z'"),
    Row("half the VRPO arrays", lambda t: ["fit", "--data", _npz(t / "d.npz", g_ref=None)],
        "'g' is given but 'g_ref' missing"),
    Row("no reference pairs", lambda t: ["fit", "--data", _npz(t / "d.npz", dphi_ref=np.zeros((0, 2)),
                                                                g_ref=np.zeros(0))], "no reference pairs (N = 0)"),
    Row("string weights", lambda t: ["fit", "--data", _npz(t / "d.npz", ref_weight=np.array(["x"] * 10))],
        "ref_weight: cannot be read as numbers"),
    Row("enormous features", lambda t: ["fit", "--data", _npz(t / "d.npz", dphi=np.full((30, 2), 1e200))],
        "too large for the fits' float64 arithmetic"),
    Row("no replications", lambda t: ["fit", "--data", _npz(t / "d.npz", dphi=np.zeros((0, 30, 2)),
                                                            z=np.zeros((0, 30)), g=None, dphi_ref=None, g_ref=None)],
        "need at least one replication"),
    Row("separable labels", lambda t: ["fit", "--data", _npz(t / "d.npz", n=20, z=(np.random.default_rng(0).normal(
        size=(20, 2)) @ [1.0, -2.0] > 0).astype(float))], "separable"),
    Row("negative bound", lambda t: ["fit", "--data", _npz(t / "d.npz"), "--bound", "-1"],
        "bound must be a positive number"),
    Row("NaN bound", lambda t: ["fit", "--data", _npz(t / "d.npz"), "--bound", "nan"], "bound must be a positive number"),
    Row("a parquet table", lambda t: ["fit", "--data", _text(t / "d.parquet", b"PAR1")],
        "pairwise data are read from an .npz archive of arrays, not a .parquet file"),
]

VALIDATE = [
    Row("empty config", lambda t: ["validate", "--config", _text(t / "c.yaml", "\n"), "--out", str(t / "o")],
        "the spec file is empty"),
    Row("scenario of the wrong type", lambda t: ["validate", "--config", _text(t / "c.yaml", "scenarios: [5]\n"),
                                                 "--out", str(t / "o")], "each entry must be a registered name"),
    Row("aux of the wrong type", lambda t: ["validate", "--config", _text(
        t / "c.yaml", "estimators: [{name: x, method: vrpo, aux: 5}]\n"), "--out", str(t / "o")],
        "auxiliary model 5 must be a name"),
    Row("aux parameter of the wrong type", lambda t: ["validate", "--config", _text(
        t / "c.yaml", "estimators: [{name: x, method: vrpo, aux: {kind: noisy_oracle, noise: loud}}]\n"),
        "--out", str(t / "o")], "field 'noise' = 'loud' must be a number"),
    Row("estimator name with a path", lambda t: ["validate", "--config", _text(
        t / "c.yaml", "estimators: [{name: ../../evil, method: mle}]\n"), "--out", str(t / "o")],
        "must be a name of letters, digits"),
    Row("infinite temperature", lambda t: ["validate", "--config", _text(t / "c.yaml", "kl_beta: .inf\n"),
                                           "--out", str(t / "o")], "'kl_beta' = inf must be a number > 0 and finite"),
    Row("pessimism reps of the wrong type", lambda t: ["validate", "--config", _text(
        t / "c.yaml", "pessimism: {reps: many}\n"), "--out", str(t / "o")], "'pessimism.reps' = 'many'"),
    Row("output is a file", lambda t: ["validate", "--reps", "2", "--out", _text(t / "o", "x")], "is a file"),
    Row("output under a file", lambda t: ["validate", "--reps", "2", "--out", _a_file_as_parent(t, "o")],
        "cannot create the output folder"),
    Row("results of another spec", lambda t: ["validate", "--reps", "2", "--no-figures", "--out", str(
        (t / "o").mkdir() or _text(t / "o" / "study.json", json.dumps({"fingerprint": "0", "spec": {"name": "x"}}))
        and t / "o")], "holds results of a different study spec"),
    Row("unreadable study record", lambda t: ["validate", "--reps", "2", "--out", str(
        (t / "o").mkdir() or _text(t / "o" / "study.json", "{trunc") and t / "o")], "unreadable study record"),
]

OTHERS = [
    Row("figures: not a study folder", lambda t: ["figures", "--study", str(t / "typo")], "not a study folder"),
    Row("figures: unknown script", lambda t: ["figures", "--only", "nope"], "no figure script 'nope'"),
    Row("figures: not an LLM experiment", lambda t: ["figures", "--llm-results", str(t / "typo")],
        "not an experiment folder (no results.csv)"),
    Row("check: not MODULE:FUNCTION", lambda t: ["check", "estimator"], "expected MODULE:FUNCTION"),
    Row("check: missing file", lambda t: ["check", str(t / "nope.py") + ":f"], "file not found"),
    Row("data-check: NaN tolerance", lambda t: ["data-check", _text(t / "d.jsonl", '{"prompt": "p", "chosen": "a", '
                                                '"rejected": "b"}\n'), "--tol", "nan"], "tol must be a finite number"),
    Row("experiment: seeds not a list", lambda t: ["experiment", "--preset", "test", "--set", "seeds=abc",
                                                   "--dry-run"], "seeds: need a list of integers >= 0, got 'abc'"),
]

ROWS = [*(("simulate", r) for r in SIMULATE), *(("fit", r) for r in FIT), *(("validate", r) for r in VALIDATE),
        *(("other", r) for r in OTHERS)]


@pytest.mark.parametrize("row", [r for _, r in ROWS], ids=[f"{g}: {r.id}" for g, r in ROWS])
def test_hostile_command_lines(row: Row, tmp_path: Path, capsys) -> None:
    argv = row.argv(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback is silent here: these must be errors
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert row.message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


# --- the Python entry points ------------------------------------------------------------------------

API = [
    ("PairData: features of another length",
     lambda t: PairData(dphi=np.ones((1, 5, 2)), z=np.zeros((1, 5)), features=np.ones((1, 4, 3))),
     "features: expected shape (R=1, 5, q)"),
    ("PairData: reference features without reference pairs",
     lambda t: PairData(dphi=np.ones((1, 5, 2)), z=np.zeros((1, 5)), features_ref=np.ones((1, 4, 3))),
     "features_ref is given without dphi_ref"),
    ("PairData: reference weights without reference pairs",
     lambda t: PairData(dphi=np.ones((1, 5, 2)), z=np.zeros((1, 5)), ref_weight=[2.0, -1.0]),
     "ref_weight is given without dphi_ref"),
    ("PairData: learner features on the labelled pairs only",
     lambda t: PairData(dphi=np.ones((1, 5, 2)), z=np.zeros((1, 5)), g=np.full((1, 5), 0.5),
                        dphi_ref=np.ones((1, 4, 2)), g_ref=np.full((1, 4), 0.5), features=np.ones((1, 5, 2))),
     "features is given without features_ref: the learner of g_hat needs the same features"),
    ("PairData: learner features of two widths",
     lambda t: PairData(dphi=np.ones((1, 5, 2)), z=np.zeros((1, 5)), g=np.full((1, 5), 0.5),
                        dphi_ref=np.ones((1, 4, 2)), g_ref=np.full((1, 4), 0.5), features=np.ones((1, 5, 2)),
                        features_ref=np.ones((1, 4, 3))),
     "features_ref: 3 features per pair, features has 2"),
    ("PairPopulation: NaN features",
     lambda t: PairPopulation(phi=np.where(np.eye(2)[None] > 0, np.nan, 0.0), pi=np.full((1, 2), 0.5),
                              g_star=np.full((1, 2, 2), 0.5)),
     "phi: entry (0, 0, 0) is nan"),
    ("PairPopulation: no prompts",
     lambda t: PairPopulation(phi=np.ones((0, 2, 2)), pi=np.ones((0, 2)), g_star=np.ones((0, 2, 2))),
     "need at least one prompt, one response and one feature"),
    ("PairPopulation: infinite utility",
     lambda t: PairPopulation(phi=np.ones((1, 2, 2)), pi=np.full((1, 2), 0.5), g_star=np.full((1, 2, 2), 0.5),
                              utility=[[0.0, np.inf]]),
     "utility: entry (0, 1) is inf"),
    ("load_spec: unreadable", lambda t: load_spec(_text(t / "s.yaml", "a: [1, 2")), "cannot parse the spec"),
    ("Scenario: not a mapping", lambda t: Scenario.from_spec(42), "must be a mapping of fields"),
    ("AuxSpec: a number", lambda t: AuxSpec.parse(3.5), "auxiliary model 3.5 must be a name"),
    ("AuxSpec: boolean seed", lambda t: AuxSpec("noisy_oracle", seed=True), "field 'seed' = True must be an integer"),
    ("sample: enormous reference design", lambda t: sample(get_scenario("bt"), 1000, M=10**9), "GiB of memory"),
    ("population: enormous", lambda t: get_scenario("bt").population(size=10**12), "GiB of memory"),
    ("StudySpec: scenario name with a path",
     lambda t: StudySpec.from_dict({"scenarios": [{"name": "a/b", "preference": "bt"}]}), "must be a name of letters"),
    ("load_study: record without a spec",
     lambda t: load_study((t / "s").mkdir() or _text(t / "s" / "study.json", "[]") and t / "s"),
     "unreadable study record"),
    ("save: a folder", lambda t: save(sample(get_scenario("bt"), 10), (t / "x.npz").mkdir() or t / "x.npz"),
     "it is a folder"),
    ("atomic_path: a full disk", lambda t: _write_failing(t / "out.txt", OSError(28, "No space left on device")),
     "No space left on device"),
    ("PairData: ragged reference weights",
     lambda t: PairData(dphi=np.ones((1, 2, 2)), z=np.zeros((1, 2)), dphi_ref=np.ones((1, 2, 2)),
                        ref_weight=[[0.5, 0.5], [1.0]]), "ref_weight: cannot be read as numbers"),
    ("PairData: ragged reference rows",
     lambda t: PairData(dphi=np.ones((1, 2, 2)), z=np.zeros((1, 2)), dphi_ref=np.ones((1, 2, 2)),
                        ref_row=[[0], [0, 1]]), "ref_row: need 2 integers"),
    ("PairData: swap_features not a function",
     lambda t: PairData(dphi=np.ones((1, 2, 2)), z=np.zeros((1, 2)), swap_features=3),
     "swap_features: expected a function of the pair features, got int"),
    ("fit: bound as text", lambda t: fit(_separable_data(), bound="1"), "bound must be a positive number, got '1'"),
    ("fit: bound True", lambda t: fit(_separable_data(), bound=True), "bound must be a positive number, got True"),
]


def _separable_data() -> PairData:
    """Two replications of separated labels in d = 3 (the second with 20 labels redrawn: not separated)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 80, 3))
    z = (x @ np.array([1.0, -1.0, 0.5]) > 0).astype(float)
    z[1, :20] = rng.integers(0, 2, 20)
    return PairData(dphi=x, z=z)


def _write_failing(path: Path, error: OSError) -> None:
    with atomic_path(path):
        raise error


@pytest.mark.parametrize("call,message", [a[1:] for a in API], ids=[a[0] for a in API])
def test_hostile_python_calls(call, message: str, tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        call(tmp_path)
    assert message in str(info.value)


# --- fallbacks: documented, warned, exact ----------------------------------------------------------

def test_interrupted_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    target.write_text("complete\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half a tab")
            raise KeyboardInterrupt
    assert target.read_text() == "complete\n" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


@pytest.mark.parametrize("scale", [2.0**-40, 2.0**40])
def test_fit_cli_is_exact_in_any_feature_units(scale: float, tmp_path: Path, capsys) -> None:
    """Features in tiny or huge units are rescaled by a power of two: the estimate is the unit-scale
    one mapped back exactly (theta / s, cov / s^2), not theta = 0 from a gradient norm already below
    the tolerance (tiny units) or a fit that never converges (huge ones)."""
    unit = _npz(tmp_path / "unit.npz")
    arrays = dict(np.load(unit))
    arrays["dphi"] = arrays["dphi"] * scale
    arrays["dphi_ref"] = arrays["dphi_ref"] * scale
    np.savez(tmp_path / "scaled.npz", **arrays)
    outs = []
    for path in (unit, str(tmp_path / "scaled.npz")):
        assert main(["fit", "--data", path, "--method", "vrpo", "--json"]) == 0
        captured = capsys.readouterr()
        assert "warning" not in captured.err
        outs.append(json.loads(captured.out))
    np.testing.assert_allclose(np.array(outs[1]["theta"]) * scale, outs[0]["theta"], rtol=1e-12)
    np.testing.assert_allclose(np.array(outs[1]["se"]) * scale, outs[0]["se"], rtol=1e-12)
    assert outs[1]["converged"] is True


def test_unknown_arrays_are_ignored_with_a_warning(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", ref_rows=np.zeros(10, dtype=int))
    with pytest.warns(UserWarning, match="ignoring array\\(s\\) 'ref_rows'"):
        data = load_pair_data(path)
    assert data.n_ref == 10 and (data.ref_row == -1).all()


def test_one_class_labels_are_a_valid_data_set(tmp_path: Path, capsys) -> None:
    """All Z = 1 is what a chosen-first (TRL) file gives: without an intercept the MLE exists as long
    as the pairs are not separable, so this is a fit, not an error."""
    path = _npz(tmp_path / "d.npz", n=60, z=np.ones(60))
    assert main(["fit", "--data", path, "--json"]) == 0
    assert all(np.isfinite(json.loads(capsys.readouterr().out)["theta"]))


def test_damaged_study_cells_are_recomputed_not_trusted(tmp_path: Path) -> None:
    spec = StudySpec(name="tiny", scenarios=("bt",), n=(60,), estimators=(ESTIMATORS["mle"], ESTIMATORS["vrpo_M1"]),
                     reps=3, population=200, eval_prompts=20)
    first = run_study(spec, tmp_path / "s")
    cell = tmp_path / "s" / "cells" / "bt__n60__mle.parquet"
    cell.write_bytes(cell.read_bytes()[:100])  # truncated, as by a disk error after the fact
    (tmp_path / "s" / "cells" / "bt__n60__vrpo_M1.json").write_text("{")
    with pytest.warns(UserWarning, match="is unreadable") as record:
        again = run_study(spec, tmp_path / "s")
    assert len(record) == 2
    assert again.results.drop(columns=[c for c in again.results if "second" in c]).equals(
        first.results.drop(columns=[c for c in first.results if "second" in c]))
    # damaged inside, footer intact: the metadata reads, the pages do not (it crashed the assembly)
    raw = bytearray(cell.read_bytes())
    raw[200:1200] = b"A" * 1000
    cell.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"(?s)is unreadable .*it is not used \(running the study recomputes it\)"):
        with pytest.raises(InputError, match=r"1 cell\(s\) unfinished or unreadable \(e.g. bt__n60__mle\)"):
            load_study(tmp_path / "s")  # what it said: "is recomputed", then "unfinished"
    with pytest.warns(UserWarning, match="is unreadable"):
        third = run_study(spec, tmp_path / "s")
    assert third.results.drop(columns=[c for c in third.results if "second" in c]).equals(
        first.results.drop(columns=[c for c in first.results if "second" in c]))


# --- theory.fitting: designs that pass the loaders but not the estimators ---------------------------

def test_fit_refuses_an_unidentifiable_design() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 50, 1))
    with pytest.raises(InputError, match="rank"):
        fit(PairData(dphi=np.concatenate([x, x], axis=-1), z=(rng.random((1, 50)) < 0.5).astype(float)))


def test_fit_is_exact_in_tiny_feature_units() -> None:
    data = sample(get_scenario("bt"), 200, seed=0, M=0, aux=None).to_pair_data()
    tiny = PairData(dphi=data.dphi * 1e-9, z=data.z)
    np.testing.assert_allclose(fit(tiny).theta * 1e-9, fit(data).theta, rtol=1e-6)


def test_fit_detects_separation_despite_uninformative_pairs() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 30, 2))
    z = (x @ np.array([1.0, -1.0]) > 0).astype(float)
    x[0, :3] = 0.0  # three pairs of a response with itself
    from robust_rlhf.theory.errors import SeparableDataError

    with pytest.raises(SeparableDataError):
        fit(PairData(dphi=x, z=z))


def test_json_output_is_strict_and_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`--json` prints null for a missing number (bare NaN is not JSON), and output piped into a reader that
    stops early (`| head`) ends quietly with status 141, as shell tools do, not with a traceback."""
    import subprocess
    import sys

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    cmd = [sys.executable, "-m", "robust_rlhf.cli.main"]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd + ["predict", "--scenario", "bt", "--estimators", "vrpo_tuned_M8", "--json"],
                         capture_output=True, text=True, env=env, check=True).stdout
    row = strict(out.splitlines()[0])
    assert row["estimator"] == "vrpo_tuned_M8" and row["second"] is None  # not predicted for tuned VRPO
    script = ("import sys; from robust_rlhf.cli import main as m; import robust_rlhf.cli.simulate as s\n"
              "def run(args):\n    [print('x' * 1000) for _ in range(1000)]\n    return 0\n"
              "s.run = run\nsys.exit(m.main(['simulate', '--list']))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""


def test_a_damaged_archive_is_a_named_error(tmp_path: Path) -> None:
    """A damaged compressed stream (zlib's error) or .npy header (numpy's tokenizer) was a raw traceback."""
    rng = np.random.default_rng(0)
    arrays = dict(dphi=rng.normal(size=(50, 3)), z=rng.integers(0, 2, 50).astype(float))
    stream = tmp_path / "stream.npz"
    np.savez_compressed(stream, **arrays)
    raw = bytearray(stream.read_bytes())
    info = zipfile.ZipFile(stream).getinfo("dphi.npy")
    h = info.header_offset
    start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
    raw[start] = 0xFF  # a reserved deflate block type
    stream.write_bytes(bytes(raw))
    header = tmp_path / "header.npz"
    buffer = io.BytesIO()
    np.save(buffer, arrays["dphi"])
    with zipfile.ZipFile(header, "w") as archive:  # a valid archive (CRCs right) holding a damaged .npy header
        archive.writestr("dphi.npy", buffer.getvalue().replace(b"(50, 3)", b"(50, 3 ", 1))
    for path, cause in ((stream, "error"), (header, "TokenError")):
        with pytest.raises(InputError, match=rf"{path.name}: not a readable .npz file \(\w*{cause}"):
            load_pair_data(path)


def test_a_python_file_loads_like_a_module(tmp_path: Path) -> None:
    """A file-defined dataclass under postponed annotations failed to import (its module was not registered);
    the file is registered under a name of its own, never one that shadows an installed module."""
    source = ("from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass Judge:\n"
              "    scale: float = 3.0\n\n    def __call__(self, p: str, a: str, b: str) -> float:\n"
              "        return self.scale\n")
    for stem in ("my_dataclass_judge", "json"):  # a new name, and the stem of a standard module
        (tmp_path / f"{stem}.py").write_text(source)
        judge = load_callable(f"{tmp_path / stem}.py:Judge", factory=True)
        assert judge("p", "a", "b") == 3.0
    assert sys.modules["json"].__name__ == "json" and hasattr(sys.modules["json"], "dumps")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InputError, match="RuntimeError while importing it: boom"):
        load_callable(f"{tmp_path / 'broken.py'}:f")
    assert not any(name.startswith("robust_rlhf_user_broken") for name in sys.modules)


def test_atomic_writes_leave_the_process_umask_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the umask sets it: done per write, another thread could create a file with mode 0o666."""
    def forbidden(mask: int) -> int:
        raise AssertionError("atomic_path changed the process umask")

    monkeypatch.setattr(os, "umask", forbidden)
    with atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    monkeypatch.undo()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_bounded_non_convex_fit_exists_on_separated_labels() -> None:
    """With ``bound`` the constrained fit is returned, also for the truncated hinge (it raised SeparableDataError
    telling the user to pass the bound they had passed)."""
    for loss in ("logistic", "hinge", "truncated_hinge"):
        res = fit(_separable_data(), "mle", loss, bound=2.0)
        assert not res.separable.any() and np.isfinite(res.theta).all(), loss
        assert np.linalg.norm(res.theta[0]) == pytest.approx(2.0, rel=1e-6) and res.at_bound[0]
