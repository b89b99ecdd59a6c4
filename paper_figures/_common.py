"""Shared by the figure scripts: load (or run) a validation study and draw one figure of it.

Every number in a figure comes from the toolkit (``robust_rlhf.simulate.study`` and ``.checks``);
these scripts only choose the study and where the files go.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_STUDY_DIR = Path("results/validate/default")


def figure_main(name: str, doc: str) -> Path:
    """Command line of one figure script: ``--study DIR`` (the default study is run there if it is missing,
    finished if it was interrupted) and ``--out DIR`` (default ``paper_figures/output``)."""
    from robust_rlhf.simulate import plots
    from robust_rlhf.simulate.checks import analyse
    from robust_rlhf.simulate.study import DEFAULT_STUDY, load_study, run_study

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY_DIR,
                        help=f"a validation study folder (default: {DEFAULT_STUDY_DIR}; run if missing or unfinished)")
    parser.add_argument("--out", type=Path, default=HERE / "output", help="output folder")
    parser.add_argument("--jobs", type=int, default=2, help="workers if the study must be run")
    args = parser.parse_args()
    if _holds_another_study(args.study, DEFAULT_STUDY.fingerprint()):
        study = load_study(args.study)
    else:  # run, resume (an interrupted run) or bring to this version's cells the default study
        study = run_study(DEFAULT_STUDY, args.study, jobs=args.jobs)
    pess = study.spec.pessimism
    report = analyse(study.results, study.predictions, seed=study.spec.seed, pessimism=study.pessimism,
                     delta=pess.delta if pess else 0.1, drpo=study.drpo)
    path = plots.FIGURES[name](study, report, args.out)
    print(path if path is not None else f"{name}: the study has no data for this figure")
    return path


def _holds_another_study(folder: Path, fingerprint: str) -> bool:
    """Whether ``folder`` holds a study whose spec is not the one of ``fingerprint`` (an unreadable record
    counts as another study: ``load_study`` names the problem)."""
    import json

    try:
        return json.loads((folder / "study.json").read_text())["fingerprint"] != fingerprint
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return True
