"""``robust-rlhf figures``: regenerate every figure and table of ``paper_figures/``."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

NAME = "figures"
HELP = "regenerate every figure of paper_figures/ (running the studies they need)"
DESCRIPTION = """\
Run every script of the paper_figures/ folder (one per figure or table). Each reads the study it
draws, running it first if it is missing (paths relative to the current folder), and writes PNG, PDF
and the plotted CSV to paper_figures/output/: the validation study results/validate/default (about
a minute), and for the llm_* figures the LLM experiment results/llm/tiny-cpu (about 9 minutes
on two cores when it has to be run).

examples:
  robust-rlhf figures
  robust-rlhf figures --only mse_vs_n,variance_ratio --study results/validate/default
  robust-rlhf figures --only llm_win_rates --llm-results results/llm/tiny-cpu"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None, help="the paper_figures folder (default: the source checkout's)")
    p.add_argument("--only", default=None, metavar="NAMES", help="comma-separated script names (without .py)")
    p.add_argument("--study", type=Path, default=None, metavar="DIR", help="validation study folder")
    p.add_argument("--llm-results", type=Path, default=None, metavar="DIR",
                   help="LLM experiment folder of the llm_* figures (robust-rlhf experiment --out)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder passed to every script")


def _folder(given: Path | None) -> Path:
    from robust_rlhf.theory.errors import InputError

    import robust_rlhf.simulate as simulate

    candidates = [given] if given else [Path.cwd() / "paper_figures", Path(simulate.__file__).resolve().parents[1] / "paper_figures"]
    for c in candidates:
        if c is not None and (c / "_common.py").exists():
            return c
    raise InputError(f"no paper_figures folder found (looked in {', '.join(map(str, candidates))}); pass --dir")


def run(args: argparse.Namespace) -> int:
    from robust_rlhf.theory.errors import InputError

    folder = _folder(args.dir)
    if args.study is not None and not (args.study / "study.json").is_file():
        # the scripts run the default study into a missing folder (hours): only on purpose, not on a typo
        raise InputError(f"--study {str(args.study)!r}: not a study folder (no study.json); run `robust-rlhf validate "
                         f"--out {args.study}` first, or leave --study out to use (and if needed run) the default study")
    if args.llm_results is not None and not (args.llm_results / "results.csv").is_file():
        raise InputError(f"--llm-results {str(args.llm_results)!r}: not an experiment folder (no results.csv); run "
                         f"`robust-rlhf experiment --out {args.llm_results}` first, or leave --llm-results out to "
                         "use (and if needed run) the tiny-cpu experiment")
    scripts = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        missing = sorted(set(wanted) - {p.stem for p in scripts})
        if missing:
            raise InputError(f"--only: no figure script {missing[0]!r}; allowed: {', '.join(p.stem for p in scripts)}")
        scripts = [p for p in scripts if p.stem in wanted]
    extra = [*(["--study", str(args.study)] if args.study else []), *(["--out", str(args.out)] if args.out else [])]
    saved = sys.argv, list(sys.path)
    try:
        sys.path.insert(0, str(folder))
        for script in scripts:
            llm = ["--results", str(args.llm_results)] if args.llm_results and script.stem.startswith("llm_") else []
            sys.argv = [str(script), *extra, *llm]
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved
    return 0
