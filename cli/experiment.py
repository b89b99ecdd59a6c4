"""``robust-rlhf experiment --preset NAME``: the end-to-end LLM experiment, its report and figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "experiment"
HELP = "run an end-to-end LLM experiment (corpus, reference, preferences, every method, evaluation, report)"
DESCRIPTION = """\
Run a preset of robust_rlhf.llm.synthetic: build the text and the reference policy (cached), draw
preference labels through each misspecification, train every method with equal budgets for every
seed, evaluate them (win rates with 95% CIs, mean true reward, KL) and write OUT/report.md,
OUT/summary.csv, OUT/results.csv and the figures in OUT/figures/. Interrupted runs continue where
they stopped; finished steps are never redone.

presets: test (toy, about a minute), tiny-cpu (2 CPU cores, ~9 min), tiny-cpu-diagnostic (M up to 16,
5 seeds), tiny-cpu-drpo (online DRPO against DPO and VRPO, ~4 min), tiny-cpu-fortunes (real short
English), gpu-small and gpu-hh (one GPU; runtimes are estimates, not measured here); --list shows each
one's settings.

examples:
  robust-rlhf experiment --list
  robust-rlhf experiment --preset tiny-cpu --out results/llm/tiny-cpu
  robust-rlhf experiment --preset tiny-cpu --set seeds=[0] --set scenarios=[annotator_mixture] --set methods=vrpo_m4
  robust-rlhf experiment --preset gpu-small --set reference_model=/models/gpt2-imdb --dry-run"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help="a preset's name (the list above; --list shows their settings)")
    p.add_argument("--config", type=Path, default=None, help="a YAML experiment config (instead of a preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field (YAML value; section.key for corpus/model/pretrain; methods=a,b keeps those)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/llm/PRESET)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache of tokenizers and reference models (default $ROBUST_RLHF_CACHE or ~/.cache/robust_rlhf)")
    p.add_argument("--list", action="store_true", help="list the presets and stop")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--report-only", action="store_true", help="redo the report and figures from OUT's results")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--json", action="store_true", help="print the summary table as JSON records")


def run(args: argparse.Namespace) -> int:
    from robust_rlhf.llm.synthetic.presets import PRESETS, config_from_dict, get_preset, override
    from robust_rlhf.theory.errors import InputError

    if args.list:
        for name, cfg in PRESETS.items():
            runtime = "?" if cfg.estimated_minutes is None else f"~{cfg.estimated_minutes:g} min"
            how = "measured on 2 CPU cores" if cfg.runtime_measured else "estimate, not run here"
            print(f"{name:20s} {runtime:>9s} ({how}): {cfg.description}")
        return 0
    if (args.preset is None) == (args.config is None):
        raise InputError("give exactly one of --preset NAME or --config FILE")
    if args.config is not None:
        from robust_rlhf.llm.config import _load_yaml

        if not args.config.is_file():
            raise InputError(f"--config: no file {str(args.config)!r}")
        config = config_from_dict(_load_yaml(args.config))
    else:
        config = get_preset(args.preset)
    config = override(config, args.set)
    out = args.out or Path("results/llm") / config.name
    if args.dry_run:
        print(json.dumps(config.as_dict(), indent=1, default=str))
        return 0
    from robust_rlhf.llm.synthetic.plots import FIGURES, experiment_figure
    from robust_rlhf.llm.synthetic.report import summarise, write_report

    if not args.report_only:
        from robust_rlhf.llm.synthetic.experiment import run_experiment

        run_experiment(config, out, args.cache, log=lambda line: print(line, flush=True))
    report = write_report(out)
    if not args.no_figures:
        for name in FIGURES:
            experiment_figure(name, out, out / "figures")
    if args.json:
        from robust_rlhf.llm.synthetic.report import load_results

        results, _ = load_results(out)
        print(summarise(results).to_json(orient="records"))
    else:
        print(f"report: {report}")
    return 0
