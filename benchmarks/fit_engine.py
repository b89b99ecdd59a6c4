r"""Benchmark of the batched estimation engine (``robust_rlhf.theory.fitting.fit``) against a
per-replication ``scipy.optimize`` baseline timed in the same run.

    python benchmarks/fit_engine.py --json          # R = 1000, n = 2000, d = 10, M = 4 (a few minutes)
    python benchmarks/fit_engine.py --reps 50 --runs 1 --no-extras   # a quick look

What is timed, per method (``mle`` and ``vrpo`` with ``lam = 1``, logistic loss, gradient norm below
``tol = 1e-8``), ``--runs`` times with the order of batched and baseline alternating from run to run:

* batched: one call ``fit(data, method)`` on all R replications; it also computes the sandwich
  covariances and, for ``vrpo``, first the MLE (the warm start and ``cov_mle``): more work than the
  baseline does;
* baseline: for every replication, ``scipy.optimize.minimize`` on the same objective written
  independently in numpy (``m_g(u) = -g log s(u) - (1-g) log s(-u)``, ``s`` the logistic function,
  with its exact gradient and Hessian), by default ``method="trust-exact"`` and ``"trust-ncg"`` with
  ``gtol = tol``, the two fastest scipy methods that reach the gradient tolerance here (which is faster
  depends on the method and the machine: trust-ncg for the MLE, about even for VRPO, in one 2-core
  measurement; ``--baselines`` chooses others, e.g. ``BFGS``); ``speedup`` is against the fastest of them.

``speedup`` = median baseline time / median batched time (the smallest over the methods);
``max_abs_diff`` = the largest ``|theta_batched - theta_baseline|`` over replications, coordinates and
methods. ``flops_ratio`` = median batched time / flop floor, with the floor = the flops of the work
the engine actually did (its own counters: every derivative evaluation, line-search evaluation,
Cholesky factorisation and sandwich Gram) divided by the machine's float64 matmul rate, measured in
the same run (a square ``GEMM`` of size ``--gemm-size``, median of its repetitions). Per pair and
evaluation, with ``d`` features: margins ``X theta`` ``2d``, gradient ``X^T c`` ``2d``, weighting
``h X`` ``d``, Hessian ``X^T (h X)`` ``2 d^2`` (the ``2mnk`` count of the product the torch path forms;
``d (d + 1)`` for evaluations by the compiled kernel, whose tiles form the distinct entries only);
``flops_ratio_symmetric`` counts every Hessian as ``d (d + 1)`` (the strict floor). Elementwise
transcendental functions (sigmoid, softplus) count zero flops. ``kernel`` says whether the compiled
kernels (``theory.kernels``) were used; ``ROBUST_RLHF_KERNELS=0`` times the torch path.

Memory: ``fit`` takes the replication axis in chunks within ``fitting.MEMORY_BUDGET`` bytes of working
memory, and Newton solves blocks of ``fitting.CACHE_BLOCK`` bytes of features to convergence; the
peak allocated memory above the input arrays during the batched fit (glibc ``mallinfo2``, sampled
every 5 ms in one extra, untimed fit; ``_util.PeakMemory``) is printed as ``peak_working_memory_mb``, beside the budget.

Targets (issue 8): ``speedup >= 50`` and ``flops_ratio <= 3``; the object's ``targets`` says which are met.
Before timing, both sides fit two replications once (imports, thread pools and first-call costs).

Extras (skipped with ``--no-extras``): the exact asymptotics of a K = 50, d = 20 scenario
(``mle_covariance``, ``vr_covariance`` with M = 4 and with the exact expectation, ``optimal_lambda``,
each fitting the population targets afresh, then ``vr_covariance`` with the targets of the earlier calls)
and, with ``--validate``, one full default ``robust-rlhf validate`` run in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from _util import PeakMemory, first_reps, load_average as _load, load_before_timing


def matmul_gflops(size: int, repeats: int = 5) -> float:
    """float64 GEMM rate ``2 size^3 / time`` (GFLOP/s), median of ``repeats`` (torch, current threads)."""
    import torch

    a = torch.randn(size, size, dtype=torch.float64)
    b = torch.randn(size, size, dtype=torch.float64)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * size**3 / statistics.median(times) / 1e9


# --- the baseline: an independent numpy objective, one scipy fit per replication -------------------

def _baseline_problem(data: Any, r: int, lam: float):
    """Objective with gradient, and Hessian, of replication ``r`` (numpy; independent of theory.losses)."""
    from scipy.special import expit, log_expit

    X, z = data.dphi[r], data.z[r]
    n = len(z)
    if lam:
        Xr, w, gr, g = data.dphi_ref[r], data.ref_weight[r], data.g_ref[r], data.g[r]

    def m(u: np.ndarray, y: np.ndarray) -> np.ndarray:
        return -(y * log_expit(u) + (1.0 - y) * log_expit(-u))

    def fun(th: np.ndarray) -> tuple[float, np.ndarray]:
        u = X @ th
        s = expit(u)
        val = np.mean(m(u, z))
        grad = X.T @ (s - z) / n
        if lam:
            ur = Xr @ th
            val += lam * (w @ m(ur, gr) - np.mean(m(u, g)))
            grad += lam * (Xr.T @ (w * (expit(ur) - gr)) - X.T @ (s - g) / n)
        return val, grad

    def hess(th: np.ndarray) -> np.ndarray:
        H = np.zeros((X.shape[1], X.shape[1]))
        if lam != 1.0:  # at lam = 1 the labelled pairs' curvature cancels: no product of zeros
            s = expit(X @ th)
            H += (X * ((1.0 - lam) * s * (1.0 - s) / n)[:, None]).T @ X
        if lam:
            sr = expit(Xr @ th)
            H += (Xr * (lam * w * sr * (1.0 - sr))[:, None]).T @ Xr
        return H

    return fun, hess


def baseline_fit(data: Any, lam: float, method: str, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.optimize.minimize`` replication by replication; returns theta (R, d) and |grad| (R,)."""
    from scipy.optimize import minimize

    theta = np.empty((data.reps, data.d))
    gnorm = np.empty(data.reps)
    for r in range(data.reps):
        fun, hess = _baseline_problem(data, r, lam)
        if method == "BFGS":  # its gtol is on the max-norm: the 2-norm is at most sqrt(d) times it
            res = minimize(fun, np.zeros(data.d), jac=True, method="BFGS",
                           options={"gtol": tol / math.sqrt(data.d), "maxiter": 10_000})
        else:
            res = minimize(fun, np.zeros(data.d), jac=True, hess=hess, method=method, options={"gtol": tol})
        theta[r] = res.x
        gnorm[r] = np.linalg.norm(res.jac)  # scipy's own gradient at res.x: no extra (timed) evaluation
    return theta, gnorm


def kernel_state() -> str:
    """``"compiled"`` or why the engine runs its torch path."""
    from robust_rlhf.theory import kernels

    return "compiled" if kernels.available() else f"torch path ({kernels.unavailable_reason()})"


# --- flop counts ------------------------------------------------------------------------------------

def engine_flops(work: Any, symmetric: bool = False) -> float:
    """Flops of the work counted by ``fitting._WORK`` (per-pair counts in the module docstring)."""
    d = work.d
    hess = d * (d + 1) if symmetric else 2 * d * d
    return (work.gram_pairs * (2 * d + 2 * d + d + hess) + work.kernel_pairs * (2 * d + 2 * d + d + d * (d + 1))
            + work.grad_pairs * 4 * d + work.value_pairs * 2 * d
            + work.factorizations * (d**3 / 3 + 2 * d * d) + work.cluster_rows * (2 * d * d if not symmetric
                                                                                  else d * (d + 1)))


# --- the benchmark -----------------------------------------------------------------------------------

def run_fit_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from robust_rlhf.simulate import get_scenario, sample
    from robust_rlhf.theory import fitting

    t0 = time.perf_counter()
    data = sample(get_scenario(args.scenario, d=args.d), args.n, seed=args.seed, reps=args.reps, M=args.M,
                  aux="oracle").to_pair_data()
    sample_s = time.perf_counter() - t0
    input_bytes = sum(a.nbytes for a in (data.dphi, data.z, data.g, data.dphi_ref, data.g_ref, data.ref_weight))
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    # fit's rule is ||grad|| < tol * rms(dphi) (scale-free); tol / rms makes it ||grad|| < tol, the baseline's
    engine_tol = args.tol / fitting._rms(data.dphi)
    warm = first_reps(data, 2)
    for method, lam in (("mle", 0.0), ("vrpo", 1.0)):  # warm-up, not timed
        fitting.fit(warm, method, tol=engine_tol)
        baseline_fit(warm, lam, baselines[0], args.tol)
    out: dict[str, Any] = {"methods": {}}
    rates: list[float] = []
    for method, lam in (("mle", 0.0), ("vrpo", 1.0)):
        batched_t: list[float] = []
        base_t: dict[str, list[float]] = {b: [] for b in baselines}
        res = None
        base_theta: dict[str, np.ndarray] = {}
        base_gnorm: dict[str, np.ndarray] = {}
        for run in range(args.runs):
            rates.append(matmul_gflops(args.gemm_size))

            def batched() -> None:
                nonlocal res
                fitting._WORK.reset()
                t = time.perf_counter()
                res = fitting.fit(data, method, lam=None if method == "mle" else lam, tol=engine_tol)
                batched_t.append(time.perf_counter() - t)

            def baseline() -> None:
                for b in baselines:
                    t = time.perf_counter()
                    base_theta[b], base_gnorm[b] = baseline_fit(data, lam, b, args.tol)
                    base_t[b].append(time.perf_counter() - t)

            for step in ((batched, baseline) if run % 2 == 0 else (baseline, batched)):
                step()
        work = fitting._WORK
        work_done = {k: getattr(work, k) for k in ("kernel_pairs", "gram_pairs", "grad_pairs", "value_pairs",
                                                    "factorizations", "cluster_rows")}
        flops = engine_flops(work)
        flops_sym = engine_flops(work, symmetric=True)
        # memory in a separate, untimed fit: the sampling thread would slow the timed ones
        with PeakMemory() as pm:
            fitting.fit(data, method, lam=None if method == "mle" else lam, tol=engine_tol)
        mem, rss = pm.above_base, pm.rss_above_base
        med = statistics.median(batched_t)
        base_med = {b: statistics.median(v) for b, v in base_t.items()}
        best = min(base_med, key=base_med.get)
        diff = max(float(np.abs(res.theta - th).max()) for th in base_theta.values())
        out["methods"][method] = {
            "batched_s": med, "batched_runs_s": batched_t,
            "baseline_s": base_med, "baseline_runs_s": base_t, "fastest_baseline": best,
            "speedup": base_med[best] / med,
            "speedup_vs": {b: v / med for b, v in base_med.items()},
            "max_abs_diff": diff,
            "batched_max_grad_norm": float(res.grad_norm.max()), "batched_converged": bool(res.converged.all()),
            "baseline_max_grad_norm": {b: float(v.max()) for b, v in base_gnorm.items()},
            "newton_iterations_max": int(res.n_iter.max()), "newton_iterations_mean": float(res.n_iter.mean()),
            "work": work_done,
            "flops": flops, "flops_symmetric": flops_sym,
            "peak_working_memory_mb": mem / 2**20, "peak_rss_growth_mb": rss / 2**20,
        }
    rate = statistics.median(rates)
    for m in out["methods"].values():
        m["flop_floor_s"] = m["flops"] / (rate * 1e9)
        m["flops_ratio"] = m["batched_s"] / m["flop_floor_s"]
        m["flops_ratio_symmetric"] = m["batched_s"] / (m["flops_symmetric"] / (rate * 1e9))
        m["achieved_gflops"] = m["flops"] / m["batched_s"] / 1e9
        # the speedup an engine running at the flop floor would reach: the ceiling of ``speedup``
        m["speedup_at_floor"] = m["baseline_s"][m["fastest_baseline"]] / m["flop_floor_s"]
    ms = out["methods"].values()
    out.update(
        speedup=min(m["speedup"] for m in ms),
        max_abs_diff=max(m["max_abs_diff"] for m in ms),
        flops_ratio=max(m["flops_ratio"] for m in ms),
        flops_ratio_symmetric=max(m["flops_ratio_symmetric"] for m in ms),
        matmul_gflops=rate, matmul_gflops_runs=rates, gemm_size=args.gemm_size,
        sizes={"R": args.reps, "n": args.n, "d": args.d, "M": args.M, "N_ref": data.n_ref, "scenario": args.scenario,
               "loss": "logistic", "tol": args.tol, "input_mb": input_bytes / 2**20},
        memory_budget_mb=fitting.MEMORY_BUDGET / 2**20, cache_block_mb=fitting.CACHE_BLOCK / 2**20,
        sample_s=sample_s, baselines=baselines, runs=args.runs,
    )
    out["targets"] = {"speedup_at_least_50": out["speedup"] >= 50, "flops_ratio_at_most_3": out["flops_ratio"] <= 3,
                      "memory_within_budget": all(m["peak_working_memory_mb"] <= out["memory_budget_mb"] for m in ms)}
    return out


def run_exact_asymptotics(K: int, d: int, size: int) -> dict[str, Any]:
    """Timings of the exact asymptotics on a K-response, d-feature annotator-mixture population, each with
    the population targets fitted afresh (``asymptotics._FITS`` emptied first), and ``vr_covariance`` once
    more with them reused (``*_warm_s``: what a second estimator's covariance on the population costs)."""
    from robust_rlhf.simulate import get_scenario
    from robust_rlhf.theory import asymptotics
    from robust_rlhf.theory.asymptotics import mle_covariance, optimal_lambda, vr_covariance

    t = time.perf_counter()
    pop = get_scenario("annotator_mixture", K=K, d=d).population(size=size)
    build = time.perf_counter() - t
    out: dict[str, Any] = {"K": K, "d": d, "population": size, "build_population_s": build}
    for name, fn in (("mle_covariance_s", lambda: mle_covariance(pop)),
                     ("vr_covariance_M4_s", lambda: vr_covariance(pop, pop.g_star, lam=1.0, M=4)),
                     ("vr_covariance_exact_s", lambda: vr_covariance(pop, pop.g_star, lam=1.0, M=None)),
                     ("optimal_lambda_M4_s", lambda: optimal_lambda(pop, pop.g_star, M=4)),
                     ("vr_covariance_M4_warm_s", lambda: vr_covariance(pop, pop.g_star, lam=1.0, M=4))):
        if not name.endswith("_warm_s"):
            asymptotics._FITS.clear()
        t = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t
    return out


def run_validate() -> dict[str, Any]:
    """Wall time of one full default ``robust-rlhf validate`` (fresh temporary output folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        load = _load()
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "robust_rlhf.cli", "validate", "--out", tmp, "--json"],
                              capture_output=True, text=True)
        return {"validate_s": time.perf_counter() - t, "returncode": proc.returncode, "load_before": load,
                "load_after": _load()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="benchmarks/README.md holds the measured figures.")
    p.add_argument("--reps", type=int, default=1000, help="replications R (default 1000)")
    p.add_argument("--n", type=int, default=2000, help="labelled pairs per replication (default 2000)")
    p.add_argument("--d", type=int, default=10, help="features (default 10)")
    p.add_argument("--M", type=int, default=4, help="reference pairs per prompt for VRPO (default 4)")
    p.add_argument("--scenario", default="annotator_mixture", help="registered scenario (default annotator_mixture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-8, help="gradient-norm tolerance (default 1e-8)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each side, alternating (default 3)")
    p.add_argument("--baselines", default="trust-exact,trust-ncg",
                   help="comma-separated scipy methods (trust-exact, trust-ncg, BFGS; default trust-exact,trust-ncg)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch and BLAS threads for both sides (default 0: leave the libraries' defaults)")
    p.add_argument("--gemm-size", type=int, default=2000, help="size of the square GEMM that measures the matmul rate")
    p.add_argument("--no-extras", action="store_true", help="skip the exact-asymptotics timing")
    p.add_argument("--validate", action="store_true", help="also time one full default `robust-rlhf validate`")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import torch

    limiter = None
    if args.threads > 0:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limiter = threadpool_limits(args.threads)
    env = {"load_before": load_before_timing(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "kernel": kernel_state(),
           "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "machine": platform.processor() or platform.machine()}
    result = run_fit_benchmark(args)
    if not args.no_extras:
        result["exact_asymptotics"] = run_exact_asymptotics(50, 20, 20_000)
    if args.validate:
        result["validate"] = run_validate()
    env["load_after"] = _load()
    result["environment"] = env
    if limiter is not None:
        limiter.unregister()
    if args.json:
        print(json.dumps(result, indent=None, default=float))
        return 0
    print(f"R = {args.reps}, n = {args.n}, d = {args.d}, M = {args.M}; torch threads {env['torch_threads']}; "
          f"kernel: {env['kernel']}; load {env['load_before']} -> {env['load_after']}; float64 matmul {result['matmul_gflops']:.1f} GFLOP/s")
    for name, m in result["methods"].items():
        base = ", ".join(f"{b} {t:.2f} s" for b, t in m["baseline_s"].items())
        print(f"{name:5s} batched {m['batched_s']:.3f} s | baseline {base} | speedup {m['speedup']:.1f}x | "
              f"max|diff| {m['max_abs_diff']:.1e} | flops {m['flops']:.3g} ({m['achieved_gflops']:.1f} GFLOP/s) | "
              f"flops_ratio {m['flops_ratio']:.1f} (symmetric {m['flops_ratio_symmetric']:.1f}) | "
              f"working memory {m['peak_working_memory_mb']:.0f} MB (budget {result['memory_budget_mb']:.0f} MB)")
    print("targets:", result["targets"])
    if "exact_asymptotics" in result:
        print("exact asymptotics:", {k: round(v, 2) if isinstance(v, float) else v
                                     for k, v in result["exact_asymptotics"].items()})
    if "validate" in result:
        print("validate:", result["validate"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
