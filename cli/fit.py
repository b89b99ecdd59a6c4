"""``robust-rlhf fit``: fit the MLE or VRPO to a user's pairwise data (.npz of arrays)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import _json

NAME = "fit"
HELP = "fit MLE / VRPO / power-tuned or cross-fitted VRPO to your own pairwise data"
DESCRIPTION = """\
Fit a linear reward theta to pairwise preference data given as arrays in an .npz file:

  dphi      n x d  feature difference phi(x, y1) - phi(x, y2) of each labelled pair
  z         n      1 if the first response won, else 0
  g         n      auxiliary model's probability that the first response wins (VRPO)
  dphi_ref  N x d  feature differences of the reference pairs (VRPO, cross-fitted VRPO)
  g_ref     N      auxiliary probabilities on the reference pairs (VRPO)
  ref_row   N      optional: labelled row whose prompt a reference pair shares (i in [0, n)), an
                   unlabelled prompt id shared by equal values (>= n), or -1 (independent prompt);
                   absent means every reference pair has its own independent prompt
  ref_weight N     optional: weights of the reference pairs (sum to 1; default uniform)

Methods: mle (lambda = 0), vrpo (lambda = 1 or --lam VALUE), vrpo_tuned (lambda chosen to
minimise the estimated trace, or one coordinate with --weight J, of the covariance; also
selected by --lam auto), vrpo_crossfit (g_hat learned from the labelled pairs by gradient
boosting with --folds K cross-fitting, then vrpo; needs dphi_ref only; --lam auto power-tunes
its lambda, which keeps it no worse than the MLE when the learned g_hat is poor). Standard errors
come from the cluster sandwich covariance, which counts the reference pairs' own sampling and,
with ref_row, their sharing prompts with labelled rows.
`robust-rlhf simulate --out FILE.npz` writes files in this format.

examples:
  robust-rlhf fit --data pairs.npz
  robust-rlhf fit --data pairs.npz --method vrpo --lam 0.5 --json
  robust-rlhf fit --data pairs.npz --lam auto --loss hinge
  robust-rlhf fit --data pairs.npz --method vrpo_crossfit --lam auto --folds 5"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, metavar="FILE", help=".npz file with the arrays above")
    p.add_argument("--method", choices=("mle", "vrpo", "vrpo_tuned", "vrpo_crossfit"), default=None,
                   help="estimator (default: mle, or vrpo when --lam is a number, vrpo_tuned with --lam auto)")
    p.add_argument("--lam", default=None, metavar="VALUE|auto",
                   help="control-variate weight of vrpo / vrpo_crossfit (default 1), or 'auto' for power tuning")
    p.add_argument("--weight", type=int, default=None, metavar="J",
                   help="power tuning: minimise the variance of coordinate J instead of the trace")
    p.add_argument("--folds", type=int, default=None, metavar="K", help="vrpo_crossfit: cross-fitting folds (default 5)")
    p.add_argument("--seed", type=int, default=None, help="vrpo_crossfit: seed of the folds and the learner (default 0)")
    p.add_argument("--loss", choices=("logistic", "hinge", "truncated_hinge"), default="logistic",
                   help="margin loss (default: logistic; truncated_hinge needs --bound)")
    p.add_argument("--bound", type=float, default=None, metavar="B", help="constrain ||theta|| <= B")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _method_and_lam(args: argparse.Namespace) -> tuple[str, float | str | None]:
    from robust_rlhf.theory.errors import InputError

    if args.lam is None:
        return args.method or "mle", None
    if args.lam == "auto":
        if args.method == "vrpo_crossfit":
            return "vrpo_crossfit", "auto"
        if args.method not in (None, "vrpo", "vrpo_tuned"):
            raise InputError(f"--lam auto power-tunes vrpo or vrpo_crossfit; it cannot be combined with --method "
                             f"{args.method}")
        return "vrpo_tuned", None
    try:
        lam = float(args.lam)
    except ValueError:
        raise InputError(f"--lam: expected a number or 'auto', got {args.lam!r}") from None
    if args.method in ("mle", "vrpo_tuned"):
        raise InputError(f"--lam {args.lam} applies to --method vrpo or vrpo_crossfit, not {args.method}")
    return args.method or "vrpo", lam


def run(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console
    from rich.table import Table

    from robust_rlhf.theory.errors import InputError
    from robust_rlhf.theory.fitting import fit
    from robust_rlhf.theory.io import load_pair_data

    method, lam = _method_and_lam(args)
    data = load_pair_data(args.data)
    if data.reps != 1:
        raise InputError(f"{args.data}: holds {data.reps} replications; `fit` takes one data set "
                         "(use robust_rlhf.theory.fit for batches)")
    if args.weight is not None and method != "vrpo_tuned" and lam != "auto":
        raise InputError("--weight J picks the target of power tuning: it needs --lam auto")
    for flag, value in (("--folds", args.folds), ("--seed", args.seed)):
        if value is not None and method != "vrpo_crossfit":
            raise InputError(f"{flag} sets the cross-fitting of g_hat: it needs --method vrpo_crossfit")
    if args.weight is not None and not 0 <= args.weight < data.d:
        raise InputError(f"--weight {args.weight}: must be a coordinate in [0, {data.d})")
    res = fit(data, method, args.loss, lam=lam, bound=args.bound, weight=args.weight,
              folds=5 if args.folds is None else args.folds, seed=0 if args.seed is None else args.seed)
    if not res.converged[0]:
        print(f"robust-rlhf fit: warning: the fit stopped without converging (gradient norm "
              f"{float(res.grad_norm[0]):.2g} after {int(res.n_iter[0])} iterations); the estimate and its standard "
              "errors may be inaccurate", file=sys.stderr)
    ratio = float(res.variance_ratio(args.weight)[0])
    out = {
        "method": method, "loss": args.loss, "n": data.n, "n_ref": data.n_ref, "d": data.d,
        "theta": res.theta[0].tolist(), "se": res.se[0].tolist(), "cov": res.cov[0].tolist(),
        "lambda": float(res.lam[0]), "variance_ratio": ratio, "converged": bool(res.converged[0]),
        "iterations": int(res.n_iter[0]), "grad_norm": float(res.grad_norm[0]), "bound": args.bound,
        "at_bound": None if res.at_bound is None else bool(res.at_bound[0]),
    }
    if args.json:
        print(_json.dumps(out))
        return 0
    console = Console()
    table = Table(title=f"{method} ({args.loss} loss) on {data.n} labelled and {data.n_ref} reference pairs")
    for col in ("coordinate", "theta", "std. error", "95% CI"):
        table.add_column(col, justify="right")
    for j, (t, s) in enumerate(zip(res.theta[0], res.se[0])):
        ci = f"[{t - 1.959964 * s:.4f}, {t + 1.959964 * s:.4f}]" if math.isfinite(s) else "n/a (at the bound)"
        table.add_row(str(j), f"{t:.4f}", f"{s:.4f}", ci)
    console.print(table)
    console.print(f"lambda = {out['lambda']:.4f}; estimated variance ratio against the MLE "
                  f"(trace{'' if args.weight is None else f', coordinate {args.weight}'}) = {ratio:.4f}")
    console.print(f"converged: {out['converged']} after {out['iterations']} iterations "
                  f"(gradient norm {out['grad_norm']:.1e})")
    return 0
