r"""How the batched engine's cost grows: ``fit`` time against n, d and R, with fitted exponents.

    python benchmarks/scaling.py                 # the default grid (a few minutes on 2 cores)
    python benchmarks/scaling.py --quick --json  # a small grid

Three sweeps around the base point (R, n, d) = (10, 2000, 10), scenario ``annotator_mixture`` with the
oracle ``g_hat`` and M = 4 reference pairs per prompt (VRPO reads n + 4n pairs per replication):

* n = 1e3, 1e4, 1e5, 1e6 at R = 1 for every n (so the input stays below a few hundred MB; the R of a
  sweep is fixed, since the cost per replication depends on R);
* d = 2, 5, 10, 20, 50, 100, 200 at R = 10;
* R = 1, 10, 100, 1000.

Each point is the median of ``--runs`` fits (R = 1000: one fit; data drawn once, not timed). The
exponent ``b`` of each sweep is the least-squares slope of ``log(time per replication)`` on
``log(size)`` (for R: of the total time) over the points at or above the base size; ``exponents_last``
is the slope between the two largest sizes, the closest to the asymptotic rate (at R = 1 a fit's fixed
cost still weighs at n = 1e4).
Expected from the work: ``b ~ 1`` in n (every evaluation reads every pair once) and in R; in d the
flops grow like ``d^2`` (the Hessian), but the small-matrix products of ``d = 10`` run far below the
machine's matmul rate and those of ``d = 200`` near it, so the measured exponent in d is lower (the
``GFLOP/s`` column shows the efficiency rising with d).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from _util import first_reps, load_average, load_before_timing


def _time_fit(data: Any, method: str, runs: int) -> tuple[float, int, float]:
    """Median time, Newton iterations and flops (``fit_engine.engine_flops``) of ``fit``."""
    from fit_engine import engine_flops

    from robust_rlhf.theory import fitting

    fitting.fit(first_reps(data, 1), method)  # untimed: the kernel's build or load and first calls at this shape
    times = []
    res = None
    for _ in range(runs):
        fitting._WORK.reset()
        t = time.perf_counter()
        res = fitting.fit(data, method)
        times.append(time.perf_counter() - t)
    return statistics.median(times), int(res.n_iter.max()), engine_flops(fitting._WORK)


def _point(R: int, n: int, d: int, M: int, methods: tuple[str, ...], runs: int, seed: int) -> dict[str, Any]:
    from robust_rlhf.simulate import get_scenario, sample

    data = sample(get_scenario("annotator_mixture", d=d), n, seed=seed, reps=R, M=M, aux="oracle").to_pair_data()
    row: dict[str, Any] = {"R": R, "n": n, "d": d, "M": M}
    for m in methods:
        t, it, flops = _time_fit(data, m, runs)
        row[f"{m}_s"] = t
        row[f"{m}_gflops"] = flops / t / 1e9
        row[f"{m}_s_per_rep"] = t / R
        row[f"{m}_iter"] = it
    return row


def _exponent(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) >= 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small grid (n <= 1e5, d <= 50, R <= 100)")
    p.add_argument("--runs", type=int, default=3, help="fits per point, median taken (default 3)")
    p.add_argument("--methods", default="mle,vrpo", help="comma-separated methods (default mle,vrpo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    base = {"R": 10, "n": 2000, "d": 10}
    ns = [1_000, 10_000, 100_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
    ds = [2, 5, 10, 20, 50] if args.quick else [2, 5, 10, 20, 50, 100, 200]
    Rs = [1, 10, 100] if args.quick else [1, 10, 100, 1000]
    from fit_engine import matmul_gflops

    load = load_before_timing()
    rate = matmul_gflops(2000)
    sweeps: dict[str, list[dict[str, Any]]] = {"n": [], "d": [], "R": []}
    for n in ns:
        sweeps["n"].append(_point(1, n, base["d"], 4, methods, args.runs, args.seed))
    for d in ds:
        sweeps["d"].append(_point(base["R"], base["n"], d, 4, methods, args.runs, args.seed))
    for R in Rs:
        sweeps["R"].append(_point(R, base["n"], base["d"], 4, methods, 1 if R >= 1000 else args.runs, args.seed))
    exponents: dict[str, dict[str, float]] = {}
    last: dict[str, dict[str, float]] = {}
    for axis, rows in sweeps.items():
        kept = [r for r in rows if r[axis] >= base[axis]]
        key = "_s" if axis == "R" else "_s_per_rep"
        exponents[axis] = {m: _exponent([r[axis] for r in kept], [r[m + key] for r in kept]) for m in methods}
        last[axis] = {m: _exponent([r[axis] for r in rows[-2:]], [r[m + key] for r in rows[-2:]]) for m in methods}
    out = {"sweeps": sweeps, "exponents": exponents, "exponents_last": last, "base": base,
           "torch_threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "matmul_gflops": rate,
           "load_before": load, "load_after": load_average()}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"torch threads {out['torch_threads']}; load {load} -> {out['load_after']}; "
          f"float64 matmul {rate:.1f} GFLOP/s")
    for axis, rows in sweeps.items():
        print(f"\n| {axis} | R | " + " | ".join(f"{m} s | {m} s/rep | {m} GFLOP/s" for m in methods) + " |")
        print("|---|---|" + "---|---|---|" * len(methods))
        for r in rows:
            print(f"| {r[axis]} | {r['R']} | " + " | ".join(
                f"{r[m + '_s']:.3f} | {r[m + '_s_per_rep']:.2e} | {r[m + '_gflops']:.1f}" for m in methods) + " |")
        print("fitted exponent: " + ", ".join(f"{m} {exponents[axis][m]:.2f}" for m in methods)
              + "; between the two largest: " + ", ".join(f"{m} {last[axis][m]:.2f}" for m in methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
