"""``robust-rlhf predict``: a study's exact predictions without simulating."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robust_rlhf.cli.main import main

SMALL = ["--scenario", "intransitive", "--estimators", "mle,vrpo_M4,vrpo_tuned_M4"]


@pytest.fixture()
def spec_file(tmp_path):
    spec = tmp_path / "study.yaml"
    spec.write_text("name: small\npopulation: 2000\neval_prompts: 200\n")
    return spec


def test_json_rows_are_the_theory(spec_file, capsys) -> None:
    from robust_rlhf.simulate import get_scenario
    from robust_rlhf.simulate.auxiliary import aux_population
    from robust_rlhf.simulate.study import _POP_SEED
    from robust_rlhf.theory.asymptotics import mle_covariance, optimal_lambda, tuned_bias, vr_bias
    from robust_rlhf.theory.second_order import vr_second_order

    assert main(["predict", "--config", str(spec_file), *SMALL, "--n", "100,400", "--json"]) == 0
    rows = {r["estimator"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"mle", "vrpo_M4", "vrpo_tuned_M4"}
    # the same numbers from the theory's public functions on the study's population
    scenario = get_scenario("intransitive")
    pop = scenario.population(size=2000, seed=_POP_SEED)
    g_hat = aux_population(scenario, "oracle", 2000, _POP_SEED)
    mle = mle_covariance(pop)
    vr = vr_bias(pop, g_hat, lam=1.0, M=4)
    tuned = tuned_bias(pop, g_hat, M=4)
    assert rows["mle"]["trace"] == pytest.approx(mle.trace, rel=1e-9) and rows["mle"]["lam"] == 0.0
    assert rows["vrpo_M4"]["ratio"] == pytest.approx(vr.trace / mle.trace, rel=1e-9)
    np.testing.assert_allclose(rows["vrpo_M4"]["bias"], vr.bias, rtol=1e-9)
    assert rows["vrpo_tuned_M4"]["lam"] == pytest.approx(optimal_lambda(pop, g_hat, M=4).lam, rel=1e-12)
    np.testing.assert_allclose(rows["vrpo_tuned_M4"]["bias"], tuned.bias, rtol=1e-9)
    np.testing.assert_allclose(rows["vrpo_tuned_M4"]["bias_se"], tuned.bias_se, rtol=1e-9)
    np.testing.assert_allclose(rows["mle"]["theta_dagger"], mle.theta_dagger, rtol=1e-12)
    second = vr_second_order(pop, g_hat, lam=1.0, M=4)
    assert rows["vrpo_M4"]["second"] == pytest.approx(np.trace(second.second), rel=1e-9)
    assert rows["vrpo_M4"]["second_se"] == pytest.approx(second.weighted_second_se(), rel=1e-9)
    assert rows["vrpo_tuned_M4"]["second"] is None  # power tuning: not predicted (null, not NaN, in JSON)
    # regret predictions fall with n towards the limit
    for row in rows.values():
        assert row["regret_at_400"]["greedy"] < row["regret_at_100"]["greedy"]


def test_table_and_bad_sizes(spec_file, capsys) -> None:
    assert main(["predict", "--config", str(spec_file), *SMALL]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exact asymptotic predictions" in out and "theta_dagger =" in out
    assert main(["predict", "--config", str(spec_file), *SMALL, "--n", "10,x"]) == 2
    assert "--n: expected comma-separated integers" in capsys.readouterr().err
    assert main(["predict", "--config", str(spec_file), "--scenario", "nope"]) == 2
    assert "unknown scenario 'nope'" in capsys.readouterr().err
