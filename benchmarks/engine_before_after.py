r"""Before/after figures of the fitting engine: the working tree's ``fit`` against the one of a git revision.

    python benchmarks/engine_before_after.py --rev HEAD --reps 1000 --runs 3 --json

The whole ``theory/`` tree of ``--rev`` is read with ``git archive`` (nothing in the work tree changes) and
imported as a separate package beside the installed one, so the old engine runs with its own losses, data
and compiled kernels. Each engine first fits two replications untimed (kernel build or load, first calls);
then both fit the same data (R, n, d, M as in ``fit_engine.py``) in the same process, alternating, ``--runs``
times each; the medians, their ratio and the largest difference of the estimates are printed.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from _util import first_reps, load_average, load_before_timing

ROOT = Path(__file__).resolve().parent.parent


def load_old_engine(rev: str):
    """``fit`` of revision ``rev``: that revision's whole ``theory/`` tree (its losses, data, kernels and
    kernels.cpp, compiled into a cache entry of its own), extracted with ``git archive`` and imported as the
    package ``robust_rlhf_rev.theory`` beside the installed one."""
    got = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "theory"], capture_output=True)
    if got.returncode != 0:
        raise SystemExit(f"--rev {rev}: cannot read theory/ at that revision (a git checkout of the repository is "
                         f"needed): {got.stderr.decode().strip()}")
    tmp = Path(tempfile.mkdtemp(prefix="engine_"))
    package = tmp / "robust_rlhf_rev"
    package.mkdir()
    with tarfile.open(fileobj=io.BytesIO(got.stdout)) as tar:
        tar.extractall(package, filter="data")
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("robust_rlhf_rev.theory.fitting").fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="HEAD", help="git revision of the 'before' engine (default HEAD)")
    p.add_argument("--reps", type=int, default=1000)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--d", type=int, default=10)
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--methods", default="mle,vrpo")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    import torch

    from robust_rlhf.simulate import get_scenario, sample
    from robust_rlhf.theory.fitting import fit as new_fit

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    old_fit = load_old_engine(a.rev)
    scenario = get_scenario("annotator_mixture", d=a.d)
    data = sample(scenario, a.n, seed=0, reps=a.reps, M=a.M, aux="oracle").to_pair_data()
    load = load_before_timing()
    out = {"rev": a.rev, "sizes": {"R": a.reps, "n": a.n, "d": a.d, "M": a.M}, "threads": torch.get_num_threads(),
           "methods": {}}
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    warm = first_reps(data, 2)
    for method in methods:  # one-off costs (kernel build or load, first calls) charged to neither side
        old_fit(warm, method)
        new_fit(warm, method)
    for method in methods:
        times: dict[str, list[float]] = {"before": [], "after": []}
        res = {}
        for run in range(a.runs):
            order = (("before", old_fit), ("after", new_fit))
            for name, fn in (order if run % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                res[name] = fn(data, method)
                times[name].append(time.perf_counter() - t)
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        out["methods"][method] = {"before_s": before, "after_s": after, "speedup": before / after,
                                  "runs": times,
                                  "max_abs_diff_theta": float(np.abs(res["before"].theta - res["after"].theta).max()),
                                  "max_rel_diff_cov": float((np.abs(res["before"].cov - res["after"].cov)
                                                             / np.abs(res["before"].cov).max()).max())}
    out["load_before"], out["load_after"] = load, load_average()
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"R = {a.reps}, n = {a.n}, d = {a.d}, M = {a.M}; torch threads {out['threads']}; "
          f"load {load} -> {out['load_after']}")
    for m, r in out["methods"].items():
        print(f"{m:5s} before ({a.rev}) {r['before_s']:.2f} s | after {r['after_s']:.2f} s | {r['speedup']:.1f}x | "
              f"max|dtheta| {r['max_abs_diff_theta']:.1e} | max rel dcov {r['max_rel_diff_cov']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
