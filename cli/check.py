"""``robust-rlhf check``: run the property-testing battery on a user's estimator or objective."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from typing import Any

from . import _json

NAME = "check"
HELP = "property-test your estimator (MODULE:FUNCTION): invariances, consistency, variance, coverage"
DESCRIPTION = """\
Run the property-testing battery of robust_rlhf.simulate.properties on an estimator.

An estimator is a callable fit_fn(data) -> theta: data is a robust_rlhf.theory.PairData (labelled
pairs dphi, z, auxiliary probabilities g, reference pairs dphi_ref, g_ref, with a leading
replication axis R); theta is an (R, d) array, or an object with .theta and optionally .cov
(R, d, d), like robust_rlhf.theory.fit's result. With --objective the callable is an objective
objective_fn(data, theta) -> (R,) torch tensor instead.

Exact properties (searched with hypothesis; a failure prints the shrunk counterexample):
  swap_invariance     pairs presented the other way round, labels and g_hat flipped
  reorder_invariance  rows, reference pairs and prompt ids permuted
  equivariance        phi -> A phi maps theta to A^-T theta (family --maps)
Monte Carlo properties (on --scenario, --n, --reps, --M, --aux; each a test at level --alpha):
  consistency  theta_hat -> theta_dagger at rate n^-1/2
  variance     tr Cov no larger than the MLE's (one-sided)
  coverage     the sandwich intervals cover at their nominal level (needs .cov)
Objective properties (--objective): control_variate (zero mean for any fixed g_hat) and the three
invariances of the objective's value.

The module is imported from the current directory (or give a path: file.py:function). Exit status:
0 when every check passes, 1 when one fails, 2 for bad input.

examples:
  robust-rlhf check my_estimators:fit_vrpo
  robust-rlhf check my_estimators.py:fit_vrpo --properties swap_invariance,consistency --json
  robust-rlhf check my_losses:objective --objective
  robust-rlhf check robust_rlhf.simulate.properties:fitting_estimator --factory --maps similarity"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="MODULE:FUNCTION",
                   help="the estimator (or, with --objective, the objective): module:function or file.py:function")
    p.add_argument("--objective", action="store_true", help="the callable is an objective (data, theta) -> (R,) values")
    p.add_argument("--factory", action="store_true", help="call the target with no arguments to get the callable")
    p.add_argument("--properties", default=None, metavar="NAMES", help="comma-separated properties (default: all)")
    p.add_argument("--scenario", default=None, metavar="NAME",
                   help="scenario of the Monte Carlo checks (default: near_deterministic)")
    p.add_argument("--n", default=None, metavar="SIZES", help="comma-separated sample sizes (default: 500,2000)")
    p.add_argument("--reps", type=int, default=None, help="replications per sample size (default: 100)")
    p.add_argument("--M", default=None, metavar="M", help="reference pairs per prompt, or 'exact' (default: 8)")
    p.add_argument("--aux", default=None, metavar="KIND[:k=v,...]", help="fixed auxiliary model g_hat (default: oracle)")
    p.add_argument("--maps", default="invertible", help="family of feature maps: invertible, similarity, orthogonal, diagonal")
    p.add_argument("--full", action="store_true", help="the long Monte Carlo design (n up to 8000, 400 replications)")
    p.add_argument("--seed", type=int, default=0, help="seed of every check (default: 0)")
    p.add_argument("--alpha", type=float, default=0.01, help="level of each Monte Carlo test (default: 0.01)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance of the exact properties on theta_hat (default: 1e-5; objectives 1e-9)")
    p.add_argument("--rtol-cov", type=float, default=None,
                   help="relative tolerance of the exact properties on the covariance (default: 1e-4)")
    p.add_argument("--variance-tolerance", type=float, default=None,
                   help="variance: allowed excess over the MLE's tr Cov, as a fraction (default: 1e-3)")
    p.add_argument("--coverage-tolerance", type=float, default=None,
                   help="coverage: allowed shortfall below the nominal 95%% (default: 0.05)")
    p.add_argument("--examples", type=int, default=None,
                   help="hypothesis examples per exact property (default: the active hypothesis profile's)")
    p.add_argument("--shrink-budget", type=int, default=200, metavar="K",
                   help="calls of the estimator allowed while shrinking a counterexample (default: 200)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def _design(args: argparse.Namespace):
    from robust_rlhf.simulate.properties import Design
    from robust_rlhf.simulate.scenario import SpecError

    from .simulate import parse_aux

    fields: dict[str, Any] = {"seed": args.seed}
    if args.scenario:
        fields["scenario"] = args.scenario
    if args.n:
        try:
            fields["n"] = tuple(int(v) for v in args.n.split(",") if v.strip())
        except ValueError:
            raise SpecError(f"--n: expected comma-separated integers, got {args.n!r}") from None
    if args.reps is not None:
        fields["reps"] = args.reps
    if args.M is not None:
        if args.M == "exact":
            fields["M"] = "exact"
        else:
            try:
                fields["M"] = int(args.M)
            except ValueError:
                raise SpecError(f"--M: expected an integer or 'exact', got {args.M!r}") from None
    if args.aux:
        fields["aux"] = parse_aux(args.aux)
    return Design.full(**fields) if args.full else Design(**fields)


def run(args: argparse.Namespace) -> int:
    from robust_rlhf.theory.errors import InputError

    if importlib.util.find_spec("hypothesis") is None:
        raise InputError("the property-testing kit needs hypothesis: pip install 'robust-rlhf[test]'")
    from robust_rlhf.simulate import properties
    from robust_rlhf.simulate.strategies import MAP_FAMILIES
    from robust_rlhf.theory.io import load_callable

    if args.maps not in MAP_FAMILIES:
        raise InputError(f"--maps: unknown family {args.maps!r}; allowed: {', '.join(MAP_FAMILIES)}")
    if not 0.0 < args.alpha < 0.5:
        raise InputError(f"--alpha must lie in (0, 0.5), got {args.alpha}")
    if args.examples is not None and args.examples < 1:
        raise InputError(f"--examples must be a positive integer, got {args.examples}")
    if args.shrink_budget < 0:
        raise InputError(f"--shrink-budget must be >= 0, got {args.shrink_budget}")
    chosen = None if args.properties is None else [p.strip() for p in args.properties.split(",") if p.strip()]
    given = {"rtol": args.rtol, "rtol_cov": args.rtol_cov, "variance_tolerance": args.variance_tolerance,
             "coverage_tolerance": args.coverage_tolerance}
    tolerances = {k: v for k, v in given.items() if v is not None}
    if args.objective and set(tolerances) - {"rtol"}:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(set(tolerances) - {"rtol"}))
        raise InputError(f"{flags}: estimator options; an objective (--objective) takes only --rtol")
    subject = load_callable(args.target, factory=args.factory)
    design = None if args.objective else _design(args)
    # stdout is the report (or one JSON object): what hypothesis or the estimator prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        if args.objective:
            result = properties.check_objective(subject, properties=chosen, maps=args.maps, alpha=args.alpha,
                                                seed=args.seed, max_examples=args.examples,
                                                shrink_budget=args.shrink_budget, **tolerances)
        else:
            result = properties.check_estimator(subject, properties=chosen, design=design, maps=args.maps,
                                                alpha=args.alpha, seed=args.seed, max_examples=args.examples,
                                                shrink_budget=args.shrink_budget, **tolerances)
    if args.json:
        print(_json.dumps({
            "subject": result.subject, "passed": result.passed, "error_rate": result.error_rate,
            "results": [{"name": r.name, "verdict": r.verdict, "summary": r.summary, "null_hypothesis": r.null_hypothesis,
                         "error_rate": r.error_rate, "statistic": r.statistic, "threshold": r.threshold,
                         "counterexample": r.counterexample, "evidence": r.evidence, "seed": r.seed}
                        for r in result.results],
        }, default=str))
    else:
        print(result.report())
    return 0 if result.passed else 1
