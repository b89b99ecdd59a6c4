r"""Before/after figures of the fitting engine: the working tree's ``fit`` against the one of a git revision.

    python benchmarks/engine_before_after.py --rev HEAD --reps 1000 --runs 3 --json

``theory/fitting.py`` and ``theory/losses.py`` of ``--rev`` are read with ``git show`` (nothing in the
work tree changes), loaded as a separate module beside the installed package, and both engines fit the
same data (R, n, d, M as in ``fit_engine.py``) in the same process, alternating, ``--runs`` times each;
the medians, their ratio and the largest difference of the estimates are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _util import load_average, load_before_timing

ROOT = Path(__file__).resolve().parent.parent


def load_old_engine(rev: str):
    """``fit`` of revision ``rev``: its fitting.py with its own losses.py, as a standalone module."""
    tmp = Path(tempfile.mkdtemp(prefix="engine_"))
    for name in ("fitting", "losses"):
        got = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:theory/{name}.py"], capture_output=True,
                             text=True)
        if got.returncode != 0:
            raise SystemExit(f"--rev {rev}: cannot read theory/{name}.py at that revision (a git checkout of the "
                             f"repository is needed): {got.stderr.strip()}")
        text = got.stdout
        (tmp / f"{name}.py").write_text(text)
    modules = {}
    for name in ("losses", "fitting"):
        full = f"robust_rlhf.theory._rev_{name}"
        src = (tmp / f"{name}.py").read_text().replace("from .losses import", "from ._rev_losses import")
        (tmp / f"{name}.py").write_text(src)
        spec = importlib.util.spec_from_file_location(full, tmp / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
        modules[name] = mod
    return modules["fitting"].fit


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
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
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
