"""``robust-rlhf simulate`` end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from robust_rlhf.cli.main import build_parser, main
from robust_rlhf.theory.io import load_pair_data


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("simulate",):
        assert name in out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        text = sp.format_help()
        assert "usage:" in text and len(text) > 200, name


def test_help_starts_without_the_numerical_stack() -> None:
    """``--help`` of every command imports neither torch, cvxpy nor sympy (``theory`` exports lazily),
    while ``robust_rlhf.theory``'s public names and submodules still resolve."""
    probe = ("import sys\n"
             "from robust_rlhf.cli.main import build_parser, main\n"
             "for args in (['--help'], ['simulate', '--help'], ['fit', '--help'], ['validate', '--help']):\n"
             "    try:\n"
             "        main(args)\n"
             "    except SystemExit:\n"
             "        pass\n"
             "print(sorted(m for m in ('torch', 'cvxpy', 'sympy') if m in sys.modules))\n"
             "import robust_rlhf.theory as t\n"
             "print(t.fit is t.fitting.fit, t.InputError.__module__, 'vr_covariance' in dir(t))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-2:] == ["[]", "True robust_rlhf.theory.errors True"]


def test_list_and_describe(capsys) -> None:
    assert main(["simulate", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("bt", "probit", "cauchy", "student_t", "temperature", "label_flip", "position_bias",
                 "annotator_mixture", "intransitive", "near_deterministic"):
        assert name in out
    assert main(["simulate", "--describe", "label_flip"]) == 0
    assert "eps: 0.2" in capsys.readouterr().out


def test_simulate_writes_a_fit_ready_file(tmp_path, capsys) -> None:
    out = tmp_path / "d.npz"
    code = main(["simulate", "--scenario", "probit", "--n", "200", "--seed", "3", "--M", "2",
                 "--aux", "noisy_oracle:noise=0.5", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 200 and summary["reference_pairs"] == 400 and summary["path"] == str(out)
    assert summary["aux"] == {"kind": "noisy_oracle", "noise": 0.5, "seed": 0}
    assert 0 < summary["bt_misfit"] < 0.01 and 0.35 < summary["label_balance"] < 0.65
    assert 0 < summary["ghat_disagreement"] < 0.5
    data = load_pair_data(out)
    assert data.dphi.shape == (1, 200, 3) and data.n_ref == 400
    # same seed, same bytes of data
    again = tmp_path / "e.npz"
    main(["simulate", "--scenario", "probit", "--n", "200", "--seed", "3", "--M", "2",
          "--aux", "noisy_oracle:noise=0.5", "--out", str(again), "--json"])
    np.testing.assert_array_equal(np.load(out)["dphi"], np.load(again)["dphi"])


def test_spec_file_and_exact_reference(tmp_path, capsys) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: mine\nd: 2\nK: 3\npreference: {model: cauchy, scale: 2}\n")
    assert main(["simulate", "--spec", str(spec), "--n", "50", "--M", "exact", "--out",
                 str(tmp_path / "d.parquet")]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "450" in out  # 50 prompts x 9 pairs


@pytest.mark.parametrize("argv,message", [
    (["--scenario", "bogus"], "unknown scenario 'bogus'; allowed: bt, probit"),
    (["--n", "-5"], "'n' = -5 must be an integer >= 1"),
    (["--M", "few"], "--M: expected an integer or 'exact', got 'few'"),
    (["--aux", "psychic"], "auxiliary model 'psychic' is unknown; allowed: oracle"),
    (["--aux", "noisy_oracle:noise"], "expected key=value"),
    (["--aux", "noisy_oracle:noise=-1"], "field 'noise' = -1 must be >= 0"),
    (["--spec", "/nonexistent/s.yaml"], "file not found: /nonexistent/s.yaml"),
    (["--out", "data.csv"], "must end in .npz or .parquet"),
])
def test_user_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    small = [] if "--n" in argv else ["--n", "20"]
    assert main(["simulate", *small, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_spec_field_is_named(tmp_path, capsys) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("d: 3\npreference: {model: label_flip, eps: 0.7}\n")
    assert main(["simulate", "--spec", str(spec)]) == 2
    assert "'preference.eps' = 0.7 is outside the allowed range [0, 1/2)" in capsys.readouterr().err


def test_console_script_runs(tmp_path) -> None:
    exe = shutil.which("robust-rlhf") or str(__import__("pathlib").Path(sys.executable).with_name("robust-rlhf"))
    proc = subprocess.run([exe, "simulate", "--scenario", "bt", "--n", "30", "--out", str(tmp_path / "x.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    bad = subprocess.run([exe, "simulate", "--scenario", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "unknown scenario 'nope'" in bad.stderr


def test_a_missing_folder_is_named(tmp_path, capsys, monkeypatch) -> None:
    """A file the OS cannot find because its folder is missing: the folder is named (it said only "file not
    found" for an output path, whose file is not expected to exist)."""
    import robust_rlhf.cli.simulate as command

    target = tmp_path / "nope" / "out.json"

    def run(args):
        open(target, "w")

    monkeypatch.setattr(command, "run", run)
    assert main(["simulate"]) == 2
    assert capsys.readouterr().err.strip() == (f"robust-rlhf simulate: error: file not found: {target} "
                                               f"(its folder {target.parent} does not exist)")
