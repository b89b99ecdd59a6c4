"""``robust-rlhf validate``: check the theory by simulation (the toolkit's main job)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from . import _json

NAME = "validate"
HELP = "check the estimators' theory against simulation, with confidence intervals"
DESCRIPTION = """\
Run a validation study and say, claim by claim, whether simulation agrees with the theory.

A study is a grid: scenarios x sample sizes n x estimators x replications. For every cell it fits
the estimators on simulated data, compares the measured variance, variance ratio against the MLE,
MSE, CI coverage and regret with the exact asymptotic predictions, and reports a verdict with a 95%
bootstrap confidence interval. With no arguments it runs the default study (BT control, a
context-dependent link and intransitive preferences; MLE, VRPO with M = 1, 4 and the exact
expectation, power-tuned VRPO, and VRPO with a reversed g_hat; n = 200..1600; 200 replications;
plus the pessimism bound on label flips with tanh features, n = 1600..25600, and DRPO's double
robustness on an annotator mixture with a reversed g_hat, a tilted pi_hat and both, n = 500..2000).

Finished cells are saved as they complete: rerunning the same command after an interruption
resumes where it stopped and produces the identical table.

named claims:
  1 under BT, VRPO and the MLE have the same asymptotic variance
  2 under misspecification, VRPO with M = 1 has the MLE's variance; the gain grows with M
  3 a bad g_hat keeps VRPO consistent but can cost variance; power tuning never does worse
  4 smaller variance gives smaller regret, in the predicted proportion
  5 the sandwich CIs cover at their nominal level from some n on
  6 the explicit regret bound of the pessimistic policy holds with probability >= 1 - delta
  7 DRPO is doubly robust: with g_hat or pi_hat right it converges to the oracle policy (the
    best of its class for the true win rate less KL) at the sandwich variance, and its win-rate
    estimate of a fixed policy is unbiased; with both wrong it converges to the predicted biased limit

examples:
  robust-rlhf validate
  robust-rlhf validate --scenario probit,label_flip --estimators mle,vrpo_M8,vrpo_tuned_M8 --reps 500
  robust-rlhf validate --estimators mle,vrpo_M4,drpo      # keep the DRPO sub-study
  robust-rlhf validate --config study.yaml --out results/my_study --jobs 2 --json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="study spec (YAML/JSON: name, scenarios, n, estimators, reps, seed, population, "
                        "eval_prompts, kl_beta, chunk, pessimism, drpo); other options override it")
    p.add_argument("--scenario", default=None, metavar="NAMES", help="comma-separated scenario names")
    p.add_argument("--estimators", default=None, metavar="NAMES",
                   help="comma-separated estimator names (see --list-estimators); 'drpo' keeps the DRPO "
                        "sub-study, which a list without it drops")
    p.add_argument("--n", default=None, metavar="SIZES", help="comma-separated sample sizes")
    p.add_argument("--reps", type=int, default=None, help="replications per cell")
    p.add_argument("--seed", type=int, default=None, help="study seed")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: results/validate/NAME, NAME-FINGERPRINT for non-default studies)")
    p.add_argument("--jobs", type=int, default=2, help="parallel workers (default: 2; -1 for all cores)")
    p.add_argument("--backend", default="loky", help="joblib backend: loky (default), threading, multiprocessing, sequential, ray, dask")
    p.add_argument("--no-figures", action="store_true", help="skip drawing the figures")
    p.add_argument("--list-estimators", action="store_true", help="list the estimator names and exit")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (claims, results path) instead of the tables")


def _lam_text(e) -> str:
    """The control-variate weight an estimator setting uses."""
    if e.method == "mle":
        return "0"
    if e.method == "vrpo_tuned" or e.lam == "auto":
        return "auto"
    return str(1.0 if e.lam is None else e.lam)


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def sizes(text: str) -> tuple[int, ...]:
    """The sample sizes of ``--n`` (comma-separated integers)."""
    from robust_rlhf.simulate.scenario import SpecError

    try:
        return tuple(int(v) for v in _split(text))
    except ValueError:
        raise SpecError(f"--n: expected comma-separated integers, got {text!r}") from None


def build_spec(args: argparse.Namespace):
    """The study spec from --config and the overriding options."""
    from robust_rlhf.simulate.study import DEFAULT_STUDY, StudySpec

    spec = StudySpec.from_file(args.config) if args.config else DEFAULT_STUDY
    changes: dict = {}
    if args.scenario:
        changes["scenarios"] = tuple(_split(args.scenario))
    if args.estimators:
        names = _split(args.estimators)
        if "drpo" not in names:
            changes["drpo"] = None
        changes["estimators"] = tuple(e for e in names if e != "drpo")
        if spec.pessimism is not None:  # the bound's sub-study keeps only the estimators asked for
            pess = spec.pessimism.to_dict()
            kept = [e for e in pess["estimators"] if e["name"] in changes["estimators"]]
            changes["pessimism"] = {**pess, "estimators": kept} if kept else None
    if args.n:
        changes["n"] = sizes(args.n)
    if args.reps is not None:
        changes["reps"] = args.reps
    if args.seed is not None:
        changes["seed"] = args.seed
    if changes:
        base = spec.to_dict()
        base.update(changes)
        if spec is DEFAULT_STUDY:
            base["name"] = "custom"
        spec = StudySpec.from_dict(base)
    return spec


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from robust_rlhf.simulate.checks import analyse
    from robust_rlhf.simulate.study import DEFAULT_STUDY, ESTIMATORS, run_study

    console = Console(stderr=args.json)
    if args.list_estimators:
        print(f"{'name':<24} {'method':<14} {'M':<6} {'unlabelled':<11} {'lambda':<7} g_hat")
        for e in ESTIMATORS.values():
            print(f"{e.name:<24} {e.method:<14} {str(e.M):<6} {str(e.unlabelled) + ' x n':<11} {_lam_text(e):<7} "
                  f"{json.dumps(e.aux)}")
        print(f"{'drpo':<24} the DRPO sub-study (double robustness; the spec's 'drpo' field)")
        return 0
    spec = build_spec(args)
    default_name = spec.name if spec == DEFAULT_STUDY else f"{spec.name}-{spec.fingerprint()}"
    out = args.out or Path("results/validate") / default_name
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=args.json) as bar:
        task = bar.add_task(f"study {spec.name}: cells", total=None)
        study = run_study(spec, out, jobs=args.jobs, backend=args.backend,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    report = analyse(study.results, study.predictions, seed=spec.seed, pessimism=study.pessimism,
                     delta=spec.pessimism.delta if spec.pessimism else 0.1, drpo=study.drpo)
    _save_report(report, out)
    figures = [] if args.no_figures else _figures(study, report, out)
    if args.json:
        print(_json.dumps({"study": spec.name, "fingerprint": spec.fingerprint(), "out": str(out),
                          "results": str(out / "results.parquet"), "figures": [str(f) for f in figures],
                          "claims": report.claims}, default=float))
        return 0
    _print(console, spec, report, out, figures)
    return 0


def _save_report(report, out: Path) -> None:
    from robust_rlhf.theory.io import atomic_path

    frames = [("cell_checks.csv", report.cells), ("slopes.csv", report.slopes), ("claims.csv", report.claims_frame())]
    if report.bias is not None:
        frames.append(("bias_checks.csv", report.bias))
    if report.pessimism is not None:
        frames.append(("pessimism_checks.csv", report.pessimism))
    if report.drpo is not None:
        frames.append(("drpo_checks.csv", report.drpo))
    for name, frame in frames:
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    with atomic_path(out / "claims.json") as tmp:
        tmp.write_text(_json.dumps(report.claims, indent=1, default=float))


def _figures(study, report, out: Path) -> list[Path]:
    from robust_rlhf.simulate import plots

    return plots.study_figures(study, report, out / "figures")


def _cell_summary(report) -> str:
    """One line: how many cells pass each check (of those where it applies)."""
    names = {"var": "variance", "ratio": "ratio to MLE", "coverage": "coverage", "bias": "bias b/n",
             "regret_greedy": "greedy regret", "regret_kl": "KL regret"}
    parts = []
    for key, name in names.items():
        verdicts = report.cells[f"{key}_check"]
        judged = verdicts[verdicts != "n/a"]
        if len(judged):
            parts.append(f"{name} {int((judged == 'pass').sum())}/{len(judged)}")
    if not parts:
        from ..simulate.checks import MIN_ESTIMATES

        return f"No cell checks: every cell is n/a (no estimates, or fewer than {MIN_ESTIMATES} in a cell)."
    return ("Cell checks passed (one 95% test per cell; cells of a scenario share data, and the variance "
            "checks compare each n with the second-order prediction at n, or with the n -> inf limit where that is not "
            "predicted: power-tuned and cross-fitted VRPO, a bad g_hat): " + ", ".join(parts) + ".")


def _print(console, spec, report, out: Path, figures: list[Path]) -> None:
    from rich.table import Table

    from ..simulate.checks import MIN_ESTIMATES

    cells = report.cells
    n_max = cells.n.max()
    table = Table(title=f"variance against theory at n = {n_max} ({spec.reps} replications per cell)")
    for col in ("scenario", "estimator", "n Var: measured", "predicted", "ratio to MLE (95% CI)", "predicted",
                "coverage", "failed"):
        table.add_column(col, overflow="fold", justify="left" if col in ("scenario", "estimator") else "right")
    for r in cells[cells.n == n_max].itertuples():
        table.add_row(r.scenario, r.estimator, f"{r.var:.3g}" + (" (IQR)" if r.scale == "interquartile" else ""),
                      f"{r.pred_var:.3g}",
                      f"{r.ratio:.3f} ({r.ratio_low:.3f}-{r.ratio_high:.3f})", f"{r.pred_ratio_n:.3f}",
                      f"{r.coverage:.3f}", str(r.failed))
    console.print(table)
    if report.drpo is not None:
        console.print(_drpo_table(report.drpo))
    claims = Table(title="claims")
    claims.add_column("claim", overflow="fold")
    claims.add_column("verdict")
    for c in report.claims:
        style = {"confirmed": "green", "refuted": "red"}.get(c["verdict"], "yellow")
        claims.add_row(c["text"].rsplit(":", 1)[0], f"[{style}]{c['verdict']}[/{style}]")
    console.print(claims)
    console.print(_cell_summary(report))
    n_ok = sum(c["verdict"] == "confirmed" for c in report.claims)
    n_none = sum(c["verdict"] == "inconclusive" for c in report.claims)
    console.print("Each verdict is a 95% test (about 1 in 20 true claims is refuted by chance; the one-sided "
                  "claims, never worse and at least 1 - delta, are 97.5% tests). Variance claims "
                  "are extrapolated to n -> inf from r(n) = r + c/n; the ratio at the largest n is shown beside it. "
                  "A bad g_hat's estimate has no finite-sample mean or variance (it lands far out now and then), "
                  "so its claims and cell checks use the median and the interquartile scale (IQR).")
    none = (f" ({n_none} inconclusive: no estimate to measure, e.g. every replication separable, or fewer than "
            f"{MIN_ESTIMATES} estimates in a cell)") if n_none else ""
    console.print(f"{n_ok} of {len(report.claims)} claims confirmed{none}. Tables: {out}/results.parquet, "
                  f"{out}/cell_checks.csv, {out}/claims.csv" + (f"; figures: {out}/figures" if figures else ""))


def _drpo_table(drpo):
    """DRPO's double robustness at the largest n of each case."""
    from rich.table import Table

    last = drpo.sort_values("n").groupby(["scenario", "case"], sort=False).tail(1)
    table = Table(title=f"DRPO double robustness on {', '.join(dict.fromkeys(last.scenario))} at the largest n "
                        "(oracle: the best policy of the class for the true win rate less beta KL)")
    for col in ("case", "n", "limit to oracle", "n Var / predicted", "coverage", "DR win rate of pi_lim",
                "expected (true)", "regret to oracle"):
        table.add_column(col, overflow="fold", justify="left" if col == "case" else "right")
    for r in last.itertuples():
        table.add_row(r.case, str(r.n), f"{r.limit_to_oracle:.3g}", f"{r.var_ratio:.2f} ({r.var_ratio_low:.2f}-"
                      f"{r.var_ratio_high:.2f})", f"{r.coverage:.3f}",
                      f"{r.win_fixed:.4f} ({r.win_fixed_low:.4f}-{r.win_fixed_high:.4f})",
                      f"{r.win_fixed_expected:.4f} ({r.win_limit:.4f})", f"{r.regret:.2g}")
    return table
