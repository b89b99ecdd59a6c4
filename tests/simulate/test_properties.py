"""The property-testing kit on known-good and deliberately broken estimators, and on theory's estimators.

Monte Carlo checks run on ``Design()`` (near-deterministic scenario, n = 500 and 2000, 100
replications, M = 8, oracle g_hat) with fixed seeds, so every verdict here is reproducible; each
check's own test is at level 0.01 (its error rate under the null), so on a random seed a true
property fails with probability at most 0.01 per check. Long versions (``Design.full()``) are
marked slow.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robust_rlhf.cli.main import main
from robust_rlhf.simulate import get_scenario, sample
from robust_rlhf.simulate import properties as P
from robust_rlhf.simulate.strategies import data_cases, feature_maps, scenario_specs
from robust_rlhf.theory.data import PairData
from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.fitting import fit

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small batched fits: one thread is faster than a contended pool on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small() -> PairData:
    return sample(get_scenario("annotator_mixture"), 40, seed=3, reps=2, M=2, unlabelled=5, aux="noisy_oracle").to_pair_data()


# --- transformations ---------------------------------------------------------------------------

@settings(max_examples=15)
@given(case=data_cases(), data=st.data())
def test_reorder_keeps_reference_pairs_on_their_prompts(case, data) -> None:
    """After ``reorder_rows`` every reference pair still sits on the prompt of the same labelled row
    (checked through the prompt vectors of the simulated data), and reordering back restores the data."""
    pairs = case.pair_data()
    rng = np.random.default_rng(data.draw(st.integers(0, 100)))
    rows, ref = rng.permutation(pairs.n), rng.permutation(pairs.n_ref)
    ids = np.unique(pairs.ref_row[pairs.ref_row >= pairs.n])
    prompts = rng.permutation(ids.size)
    out = P.reorder_rows(pairs, rows, ref, prompts)
    np.testing.assert_array_equal(out.dphi[:, np.argsort(rows)], pairs.dphi)
    on_row = out.ref_row < out.n
    np.testing.assert_array_equal(rows[out.ref_row[on_row]], pairs.ref_row[ref][on_row])
    # unlabelled prompts: equal old ids <-> equal new ids
    old, new = pairs.ref_row[ref][~on_row], out.ref_row[~on_row]
    assert np.array_equal(old[:, None] == old[None], new[:, None] == new[None]) and (new >= out.n).all()
    back = P.reorder_rows(out, np.argsort(rows), np.argsort(ref), np.argsort(prompts))
    for name in ("dphi", "z", "g", "dphi_ref", "g_ref", "ref_weight", "ref_row"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pairs, name))


def test_swap_and_map_are_involutions(small: PairData) -> None:
    twice = P.swap_pairs(P.swap_pairs(small, [0, 3], [1]), [0, 3], [1])
    for name in ("dphi", "z", "g", "dphi_ref", "g_ref"):  # 1 - (1 - g) = g up to rounding
        np.testing.assert_allclose(getattr(twice, name), getattr(small, name), rtol=0, atol=1e-15)
    once = P.swap_pairs(small, [2], [])
    assert once.z[0, 2] == 1 - small.z[0, 2] and once.g[1, 2] == 1 - small.g[1, 2]
    np.testing.assert_array_equal(once.dphi[:, 2], -small.dphi[:, 2])
    A = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
    back = P.map_features(P.map_features(small, A), np.linalg.inv(A))
    np.testing.assert_allclose(back.dphi_ref, small.dphi_ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="permutation of range"):
        P.reorder_rows(small, [0, 0, *range(2, 40)])


# --- the fit signature -------------------------------------------------------------------------

def test_outputs_are_normalised(small: PairData) -> None:
    res = fit(small, "vrpo")
    est = P.estimate(lambda d: fit(d, "vrpo"), small)
    np.testing.assert_array_equal(est.theta, res.theta)
    np.testing.assert_array_equal(est.cov, res.cov)
    # a (d,) vector: called once per replication
    calls = []

    def one(d: PairData) -> np.ndarray:
        calls.append(d.reps)
        return fit(d, "mle").theta[0]

    np.testing.assert_allclose(P.estimate(one, small).theta, fit(small, "mle").theta, atol=1e-12)
    assert calls == [2, 1, 1]
    # an exception on one replication is a NaN row, not a crash
    def fragile(d: PairData) -> np.ndarray:
        if d.reps > 1 or d.z[0, 0] == small.z[1, 0] and np.array_equal(d.dphi, small.dphi[1:]):
            raise RuntimeError("boom")
        return fit(d, "mle").theta

    est, errors, _ = P._estimate_all(fragile, small)
    assert np.isfinite(est.theta[0]).all() and np.isnan(est.theta[1]).all()
    assert errors == ["replication 1: RuntimeError: boom"]
    with pytest.raises(P.EstimatorError, match=r"returned theta of shape \(3, 2\); the fit signature needs \(2, 3\)"):
        P.estimate(lambda d: np.zeros((3, 2)), small)
    with pytest.raises(P.EstimatorError, match="not an array of numbers"):
        P.estimate(lambda d: "theta", small)
    for out, what in ((None, "returned None"), ({"theta": 1}, "returned a dict"),
                      ((np.zeros((2, 3)), np.zeros((2, 3, 3))), "not an array of numbers")):
        with pytest.raises(P.EstimatorError, match=rf"{what}.*or an object with attributes .theta and .cov"):
            P.estimate(lambda d, out=out: out, small)


# --- the kit catches broken estimators ----------------------------------------------------------

def _with_intercept(data: PairData) -> np.ndarray:
    """Logistic MLE with an intercept (a position-bias term, fitted as a constant feature and dropped):
    not invariant under swapping pairs, whose intercept feature does not change sign."""
    ones = np.ones((*data.dphi.shape[:2], 1))
    aug = PairData(dphi=np.concatenate([data.dphi, ones], axis=-1), z=data.z)
    return fit(aug, "mle", on_separable="warn").theta[:, :-1]


def _first_rows(data: PairData) -> np.ndarray:
    """The MLE on the first 80% of rows only."""
    keep = int(0.8 * data.n)
    return fit(replace(data, dphi=data.dphi[:, :keep], z=data.z[:, :keep], g=None, dphi_ref=None, g_ref=None,
                       ref_weight=None, ref_row=None), "mle", on_separable="warn").theta


def test_swap_violation_is_found_and_shrunk() -> None:
    result = P.check_swap_invariance(_with_intercept, max_examples=10, shrink_budget=20)
    assert result.verdict == "fail" and result.error_rate == 0.0
    assert "swap labelled pairs" in result.counterexample and "rebuild: data = sample(" in result.counterexample
    # shrunk towards the simplest scenario family and sample size
    assert '"preference": {"model": "bt"}' in result.counterexample, result.counterexample


def test_reorder_violation_is_found() -> None:
    result = P.check_reorder_invariance(_first_rows, max_examples=10, shrink_budget=10)
    assert result.verdict == "fail" and "reorder labelled rows" in result.counterexample


def test_a_norm_bound_is_orthogonally_equivariant_only() -> None:
    """``||theta|| <= B`` is preserved by rotations, not by general maps: the family matters. (cvxpy
    solves the bounded problem to about 1e-6 relative accuracy, hence rtol 1e-4.)"""
    bounded = P.fitting_estimator("mle", bound=0.5)
    general = P.check_equivariance(bounded, maps="invertible", max_examples=8, shrink_budget=0, rtol=1e-4)
    assert general.verdict == "fail" and "map phi -> A phi" in general.counterexample
    assert P.check_equivariance(bounded, maps="orthogonal", max_examples=4, rtol=1e-4).verdict == "pass"


def test_monte_carlo_checks_catch_broken_estimators() -> None:
    def shrunk(data):  # inconsistent: converges to 0.85 theta_dagger
        return 0.85 * fit(data, "mle", on_separable="warn").theta

    def half(data):  # root-n consistent, twice the MLE's variance
        h = data.n // 2
        return fit(replace(data, dphi=data.dphi[:, :h], z=data.z[:, :h], g=None, dphi_ref=None, g_ref=None,
                           ref_weight=None, ref_row=None), "mle", on_separable="warn").theta

    def overconfident(data):  # standard errors half their size
        res = fit(data, "mle", on_separable="warn")
        return replace(res, cov=res.cov / 4)

    design = P.Design()
    assert P.check_consistency(shrunk, design).verdict == "fail"
    assert P.check_variance(half, design).verdict == "fail"
    bad = P.check_coverage(overconfident, design)
    assert bad.verdict == "fail" and "intervals cover theta_dagger" in bad.counterexample
    assert P.check_coverage(shrunk, design).verdict == "skip"  # no covariance to check


def test_dropping_the_reference_term_is_caught() -> None:
    """An objective that keeps the control term but drops the reference term is biased for g != g*."""
    from robust_rlhf.theory.losses import Logistic, pair_loss

    def dropped(data: PairData, theta: torch.Tensor) -> torch.Tensor:
        u = torch.einsum("rnd,rd->rn", torch.as_tensor(data.dphi), theta)
        labelled = pair_loss(Logistic(), u, torch.as_tensor(data.z))
        return (labelled - pair_loss(Logistic(), u, torch.as_tensor(data.g))).mean(-1)

    result = P.check_control_variate(dropped, reps=400)
    assert result.verdict == "fail" and "E[L(theta; g_hat) - L(theta; g_0)]" in result.counterexample
    assert P.check_control_variate(P.fitting_objective("logistic", 1.0), reps=400).verdict == "pass"
    assert P.check_control_variate(P.fitting_objective("logistic", 0.0), reps=400).verdict == "skip"


def test_the_kit_is_not_fooled_by_crashes_noise_or_broken_covariances() -> None:
    """An estimator that never estimates is not 'invariant' (nothing was compared: skip), one that raises on
    some data says so; a non-deterministic one is named as such, not as breaking the transform; NaN or
    negative covariances fail the coverage check; an MLE reached by another optimiser (relative 1e-7) is
    not worse than the MLE."""
    def never(data):
        raise ValueError("no")

    def small_only(data):
        if data.n >= 60:
            raise ValueError("too many pairs")
        return fit(data, "mle", on_separable="warn").theta

    skip = P.check_swap_invariance(never, max_examples=5, shrink_budget=0)
    assert skip.verdict == "skip" and "no estimate on any of" in skip.summary and "ValueError: no" in skip.summary
    some = P.check_swap_invariance(small_only, max_examples=8, shrink_budget=0)
    assert some.verdict == "pass" and "too many pairs" in some.summary and some.evidence["without_estimate"] > 0
    rng = np.random.default_rng(0)
    noisy = P.check_swap_invariance(lambda d: fit(d, "mle", on_separable="warn").theta + 1e-3 * rng.normal(
        size=(d.reps, d.d)), max_examples=5, shrink_budget=0)
    assert noisy.verdict == "fail" and "the estimator is not deterministic" in noisy.summary

    def negative(data):
        res = fit(data, "mle", on_separable="warn")
        return replace(res, cov=-res.cov)

    design = P.Design()
    bad = P.check_coverage(negative, design)
    assert bad.verdict == "fail" and "cov has NaN, infinite or negative variances in 100 of 100" in bad.summary
    again = P.simulate_estimates(lambda d: fit(d, "mle", on_separable="warn").theta * (1 + 1e-7), design)
    assert P.check_variance(run=again).verdict == "pass"
    assert P.check_variance(run=again, tolerance=0.0).verdict == "fail"  # an excess of 2e-7, known exactly


def test_checks_are_deterministic_under_a_seed() -> None:
    runs = [P.check_reorder_invariance(_first_rows, max_examples=5, shrink_budget=3, seed=5) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].verdict == "fail"


def test_log_ratio_standard_error_is_calibrated() -> None:
    """``_log_ratio``'s delta-method se: over 400 independent samples of R = 100 paired draws, the
    standardised errors have mean 0 and sd 1. The sample mean of 400 standard normals has se 0.05 and
    the sample sd has se 1/sqrt(800) = 0.035: 4 standard errors give 0.2 and 0.14."""
    rng = np.random.default_rng(0)
    z = []
    for _ in range(400):
        x = rng.standard_normal((100, 3))
        a = (x**2).sum(1)  # chi2_3
        b = ((0.6 * x + 0.8 * rng.standard_normal((100, 3))) ** 2).sum(1) * 2.0  # correlated, mean 6
        log_r, se = P._log_ratio(a, b)
        z.append((log_r - math.log(3.0 / 6.0)) / se)
    z = np.asarray(z)
    assert abs(z.mean()) < 0.2 and abs(z.std() - 1.0) < 0.14


# --- theory's estimators pass the battery --------------------------------------------------------

#: (name, fit_fn, options). The power-tuned lambda minimises the trace of the estimated covariance,
#: which only similarity maps c Q rescale uniformly; a norm bound is preserved by orthogonal maps
#: only, and cvxpy solves the bounded problems to about 1e-6 relative accuracy (rtol 1e-4).
EXACT = ["swap_invariance", "reorder_invariance", "equivariance"]
ESTIMATORS = [
    ("mle", P.fitting_estimator("mle"), {}),
    ("vrpo", P.fitting_estimator("vrpo"), {}),
    ("vrpo_lam_half", P.fitting_estimator("vrpo", lam=0.5), {"properties": EXACT}),
    ("vrpo_tuned", P.fitting_estimator("vrpo_tuned"), {"maps": "similarity"}),
    ("vrpo_tuned_coordinate", P.fitting_estimator("vrpo_tuned", weight=0),
     {"properties": ["swap_invariance", "reorder_invariance", "consistency", "variance", "coverage"]}),
    ("mle_bounded", P.fitting_estimator("mle", bound=10.0), {"maps": "orthogonal", "rtol": 1e-4, "rtol_cov": 1e-3}),
    ("vrpo_bounded_binding", P.fitting_estimator("vrpo", bound=0.5),
     {"maps": "orthogonal", "rtol": 1e-4, "rtol_cov": 1e-3, "properties": EXACT}),
]


@pytest.mark.parametrize("name,fit_fn,options", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_theory_estimators_pass_the_battery(name, fit_fn, options) -> None:
    result = P.check_estimator(fit_fn, max_examples=6, shrink_budget=10, **options)
    assert all(r.verdict == "pass" for r in result.results), result.report()


def test_separable_data_get_no_estimate() -> None:
    result = P.check_equivariance(P.fitting_estimator("mle"), cases=data_cases(separable=True), max_examples=10,
                                  shrink_budget=0)
    assert result.verdict == "pass", result.report()


def test_crossfit_is_equivariant_under_coordinate_scalings() -> None:
    """Gradient boosting is invariant to increasing maps of each feature, so cross-fitted VRPO is
    equivariant under positive diagonal maps and permutations (not under rotations)."""
    result = P.check_equivariance(P.fitting_estimator("vrpo_crossfit"), maps="diagonal", max_examples=3,
                                  cases=data_cases(n=st.integers(60, 100)))
    assert result.verdict == "pass", result.report()


@pytest.mark.parametrize("check", [P.check_swap_invariance, P.check_reorder_invariance], ids=["swap", "reorder"])
def test_crossfit_invariances(check) -> None:
    result = check(P.fitting_estimator("vrpo_crossfit"), max_examples=3, shrink_budget=0,
                   cases=data_cases(n=st.integers(60, 100)))
    assert result.verdict == "pass", result.report()


@pytest.mark.slow
@pytest.mark.parametrize("name,fit_fn,options", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_theory_estimators_pass_the_full_battery(name, fit_fn, options) -> None:
    result = P.check_estimator(fit_fn, design=P.Design.full(), **options)
    assert all(r.verdict == "pass" for r in result.results), result.report()


@pytest.mark.slow
def test_crossfit_monte_carlo_battery() -> None:
    result = P.check_estimator(P.fitting_estimator("vrpo_crossfit"), properties=["consistency", "variance", "coverage"])
    assert result.passed, result.report()


@pytest.mark.slow
@pytest.mark.parametrize("loss,bound", [("hinge", None), ("truncated_hinge", 3.0)])
def test_non_smooth_losses_pass_the_exact_properties(loss: str, bound) -> None:
    for method in ("mle", "vrpo"):
        fit_fn = P.fitting_estimator(method, loss, **({} if bound is None else {"bound": bound}))
        result = P.check_estimator(fit_fn, properties=["swap_invariance", "reorder_invariance", "equivariance"],
                                   maps="invertible" if bound is None else "orthogonal", max_examples=10,
                                   **({} if bound is None else {"rtol": 1e-4, "rtol_cov": 1e-3}))
        assert result.passed, result.report()


def test_theory_objectives_pass_the_objective_battery() -> None:
    for loss in ("logistic", "truncated_hinge", "hinge", "ipo"):
        result = P.check_objective(P.fitting_objective(loss, 1.0), reps=400, max_examples=5)
        assert result.passed, result.report()


def test_estimator_from_objective_matches_fit(small: PairData) -> None:
    est = P.estimator_from_objective(P.fitting_objective("logistic", 1.0))(small)
    assert est.converged.all()
    np.testing.assert_allclose(est.theta, fit(small, "vrpo").theta, atol=1e-7)


# --- the pytest plugin and the command line ------------------------------------------------------

MODULE = textwrap.dedent("""
    import numpy as np
    from robust_rlhf.theory import PairData, fit

    def fit_vrpo(data):
        return fit(data, "vrpo", on_separable="warn")

    def with_intercept(data):
        ones = np.ones((*data.dphi.shape[:2], 1))
        aug = PairData(dphi=np.concatenate([data.dphi, ones], axis=-1), z=data.z)
        return fit(aug, "mle", on_separable="warn").theta[:, :-1]

    def jittered(data):  # off by up to 1e-4 relative when the pairs are swapped; chatty
        print("fitting", data.reps, "replications")
        return fit(data, "mle", on_separable="warn").theta * (1 + 1e-4 * data.z.mean(axis=1, keepdims=True))
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_estimators.py").write_text(MODULE)
    (tmp_path / "broken_module.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.chdir(tmp_path)
    yield "my_estimators"
    sys.modules.pop("my_estimators", None)


def test_cli_check(user_module, capsys) -> None:
    argv = ["check", f"{user_module}:with_intercept", "--properties", "swap_invariance", "--examples", "10",
            "--shrink-budget", "0", "--json"]
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is False and out["results"][0]["verdict"] == "fail"
    assert "rebuild: data = sample(" in out["results"][0]["counterexample"]
    assert main(["check", f"{user_module}:fit_vrpo", "--properties", "swap_invariance,reorder_invariance",
                 "--examples", "3"]) == 0
    assert "PASS swap_invariance" in capsys.readouterr().out
    for argv, message in ((["nope"], "expected MODULE:FUNCTION"),
                          ([f"{user_module}:missing"], "has no attribute 'missing'"),
                          (["no_such_module:f"], "cannot import 'no_such_module'"),
                          ([f"{user_module}:fit_vrpo", "--properties", "speed"], "unknown property speed"),
                          ([f"{user_module}:fit_vrpo", "--maps", "affine"], "unknown family 'affine'"),
                          ([f"{user_module}:fit_vrpo", "--properties", " , "], "properties: none chosen"),
                          ([f"{user_module}:fit_vrpo", "--rtol", "nan"], "rtol: expected a finite number >= 0"),
                          ([f"{user_module}:fit_vrpo", "--coverage-tolerance", "1.5"], "coverage_tolerance: expected"),
                          ([f"{user_module}:fit_vrpo", "--objective", "--rtol-cov", "1e-3"],
                           "--rtol-cov: estimator options"),
                          ([f"{user_module}:fit_vrpo", "--n", "10,x"], "--n: expected comma-separated integers"),
                          ([f"{user_module}:np"], "is a module, not a callable"),
                          (["broken_module:f"], "cannot import 'broken_module': RuntimeError while importing it")):
        assert main(["check", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_cli_check_tolerances(user_module, capsys) -> None:
    argv = ["check", f"{user_module}:jittered", "--properties", "swap_invariance", "--examples", "20",
            "--shrink-budget", "0", "--json"]
    assert main(argv) == 1  # 1e-4 relative exceeds the default rtol 1e-5
    out = capsys.readouterr()  # what the estimator prints goes to stderr: stdout stays one JSON object
    assert "> rtol 1e-05" in json.loads(out.out)["results"][0]["summary"] and "fitting" in out.err
    assert main([*argv, "--rtol", "1e-3"]) == 0
    out = json.loads(capsys.readouterr().out)["results"][0]
    assert out["verdict"] == "pass" and out["evidence"]["rtol"] == 1e-3


def test_an_empty_battery_is_refused() -> None:
    for chooser in (P.check_estimator, P.check_objective):
        with pytest.raises(InputError, match="properties: none chosen"):
            chooser(lambda data: None, properties=[])
    with pytest.raises(InputError, match="variance_tolerance: expected a finite number >= 0"):
        P.check_estimator(lambda data: None, properties=["variance"], variance_tolerance=-0.1)


def test_pytest_plugin(pytester) -> None:
    pytester.makepyfile(my_estimators=MODULE, test_user=textwrap.dedent("""
        from my_estimators import fit_vrpo, with_intercept

        def test_good(check_estimator):
            result = check_estimator(fit_vrpo, properties=["swap_invariance"], max_examples=3)
            assert result.passed

        def test_bad(check_estimator):
            check_estimator(with_intercept, properties=["swap_invariance"], max_examples=10, shrink_budget=0)
    """))
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "robust_rlhf.simulate.pytest_plugin", "-p", "no:cacheprovider", "--kit-seed", "3")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAIL swap_invariance*", "*seed 3*"])
    sys.modules.pop("my_estimators", None)
