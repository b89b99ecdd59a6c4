"""``robust-rlhf predict``: a study's exact asymptotic predictions, without simulating."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import _json

NAME = "predict"
HELP = "what the theory predicts for a study's estimators (no simulation): variance, ratio, lam, bias, regret"
DESCRIPTION = """\
Compute the exact asymptotic predictions that `robust-rlhf validate` tests, for every scenario and
estimator of a study (the default one, or --config / --scenario / --estimators), without simulating:

  theta_dagger    the population target (the KL projection of g* onto the linear BT model)
  n tr Cov        the asymptotic variance of sqrt(n) (theta_hat - theta_dagger), summed over coordinates
  tr C            its second-order term: at sample size n the variance is that trace + tr C / n + o(1/n)
                  (the MLE and VRPO at a fixed lam; not predicted for power-tuned or cross-fitted VRPO)
  ratio           that trace over the MLE's
  lam             the control-variate weight (power-tuned VRPO: lam*)
  b               the second-order bias: E theta_hat = theta_dagger + b / n + o(1/n)
  regret at n     the Gaussian plug-in prediction of the greedy and KL policies' regret (with --n)

Each comes with its Monte Carlo error over the study's prompt population (`population` prompts),
where one is computed. An estimator with a learned g_hat has no fixed population law and gets no
prediction.

examples:
  robust-rlhf predict
  robust-rlhf predict --scenario intransitive --estimators mle,vrpo_M8,vrpo_tuned_M8 --n 500,2000
  robust-rlhf predict --config study.yaml --json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="study spec (YAML/JSON, as for validate); other options override it")
    p.add_argument("--scenario", default=None, metavar="NAMES", help="comma-separated scenario names")
    p.add_argument("--estimators", default=None, metavar="NAMES",
                   help="comma-separated estimator names (see `robust-rlhf validate --list-estimators`)")
    p.add_argument("--n", default=None, metavar="SIZES",
                   help="comma-separated sample sizes at which to predict the regret (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of the table")


def run(args: argparse.Namespace) -> int:
    from robust_rlhf.simulate.study import predict, predict_regret

    from .validate import build_spec

    spec = build_spec(argparse.Namespace(config=args.config, scenario=args.scenario, estimators=args.estimators,
                                         n=None, reps=None, seed=None))
    ns = _sizes(args.n)
    rows = []
    for scenario in spec.scenario_names:
        for est in spec.estimators:
            pred = predict(spec, scenario, est)
            row = {"scenario": scenario, "estimator": est.name, "lam": pred["pred_lam"],
                   "trace": pred["pred_trace"], "trace_se": pred["pred_trace_se"], "ratio": pred["pred_ratio"],
                   "second": pred["pred_second"], "second_se": pred["pred_second_se"],
                   "bias": pred["pred_bias"], "bias_se": pred["pred_bias_se"], "theta_dagger": pred["theta_dagger"],
                   "theta_se": pred["theta_se"]}
            for n in ns:
                regret = predict_regret(spec, scenario, pred, n)
                row[f"regret_at_{n}"] = {k: regret.get(f"pred_regret_{k}", math.nan) for k in ("greedy", "kl")}
            rows.append(row)
            if args.json:
                print(_json.dumps(row, default=float), flush=True)
    if not args.json:
        _print(rows, ns, spec)
    return 0


def _sizes(text: str | None) -> list[int]:
    from robust_rlhf.simulate.scenario import SpecError

    from .validate import sizes

    ns = list(sizes(text)) if text else []
    if text and (not ns or min(ns) < 1):
        raise SpecError(f"--n: sample sizes must be integers >= 1, got {text!r}")
    return ns


def _vector(values) -> str:
    return "n/a" if values is None else "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _print(rows: list[dict], ns: list[int], spec) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"exact asymptotic predictions (study {spec.name}, {spec.population} prompts)")
    columns = ["scenario", "estimator", "lam", "n tr Cov (MC error)", "tr C, n tr Cov = trace + tr C / n",
               "ratio to MLE", "bias b (MC error)",
               *(f"regret at n = {n}: greedy / KL" for n in ns)]
    for col in columns:
        table.add_column(col, overflow="fold", justify="left" if col in ("scenario", "estimator") else "right")
    for r in rows:
        second = "n/a" if not math.isfinite(r["second"]) else f"{r['second']:.4g} ({r['second_se']:.2g})"
        cells = [r["scenario"], r["estimator"], f"{r['lam']:.3g}", f"{r['trace']:.4g} ({r['trace_se']:.2g})", second,
                 f"{r['ratio']:.3f}", _vector(r["bias"]) + ("" if r["bias"] is None else f" ({_vector(r['bias_se'])})")]
        cells += [f"{r[f'regret_at_{n}']['greedy']:.3g} / {r[f'regret_at_{n}']['kl']:.3g}" for n in ns]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        first = next(r for r in rows if r["scenario"] == scenario)
        console.print(f"{scenario}: theta_dagger = {_vector(first['theta_dagger'])} "
                      f"(MC error {_vector(first['theta_se'])})")
    console.print("n/a: no prediction (a learned g_hat; or power tuning with an oracle g_hat under BT, where "
                  "the estimated lam has no limit). NaN: no fixed population law.")
