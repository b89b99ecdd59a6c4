r"""Figures and the table of an LLM experiment (seaborn), each saved as PNG and PDF with the plotted table as CSV.

The numbers come from ``report.summarise`` (means over seeds and their Student-t intervals); nothing here
computes a statistic of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .report import load_results, summarise

__all__ = ["FIGURES", "win_rates", "reward_vs_kl", "variance_reduction", "results_table", "experiment_figure"]


def _setup():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt, sns


def _save(fig, table: pd.DataFrame, out: Path, name: str, meta: dict | None = None) -> Path:
    """PNG, PDF, the plotted table as CSV and, given ``meta`` (the experiment's config, seeds, folder and the
    package versions that ran it), ``NAME.meta.json``."""
    import json

    import matplotlib.pyplot as plt

    from robust_rlhf.theory.io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        with atomic_path(out / f"{name}.meta.json") as tmp:
            tmp.write_text(json.dumps({"figure": name, **meta}, indent=1, default=str))
    for ext in ("png", "pdf"):
        with atomic_path(out / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
    with atomic_path(out / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    plt.close(fig)
    return out / f"{name}.png"


def _errors(table: pd.DataFrame, metric: str) -> np.ndarray:
    """``(2, n)`` distances from the mean to the interval ends (0 where there is no interval, or where the mean
    lies beyond that end: a sample KL averaging below 0 has its interval cut at 0, ``seed_interval``)."""
    m = table[metric].to_numpy(float)
    lo = np.nan_to_num(m - table[f"{metric}_ci_low"].to_numpy(float), nan=0.0)
    hi = np.nan_to_num(table[f"{metric}_ci_high"].to_numpy(float) - m, nan=0.0)
    return np.maximum(np.vstack([lo, hi]), 0.0)


def _points(ax, table: pd.DataFrame, metric: str, methods: list[str], scenarios: list[str], palette,
            hollow: str | None = None) -> None:
    """One point per (method, scenario) with its interval; ``hollow`` adds that metric as open markers."""
    width = 0.7
    for k, scenario in enumerate(scenarios):
        sub = table[table["scenario"] == scenario].set_index("method").reindex(methods).reset_index()
        ok = sub[metric].notna().to_numpy()
        x = np.arange(len(methods)) + (k - (len(scenarios) - 1) / 2) * width / max(len(scenarios), 1)
        ax.errorbar(x[ok], sub[metric][ok], yerr=_errors(sub[ok], metric), fmt="o", capsize=3,
                    color=palette[scenario], label=scenario)
        if hollow is not None and hollow in sub:
            ok2 = sub[hollow].notna().to_numpy()
            ax.scatter(x[ok2], sub[hollow][ok2], s=60, facecolors="none", edgecolors=palette[scenario],
                       label=f"{scenario}: predicted" if ok2.any() else None)
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels(methods, rotation=35, ha="right")


def win_rates(summary: pd.DataFrame, out: Path, baseline: str = "dpo", meta: dict | None = None) -> Path:
    """Win rate over the baseline and over the reference per method, one colour per scenario, with 95%
    intervals across seeds; the dashed line is 1/2."""
    plt, sns = _setup()
    scenarios = list(dict.fromkeys(summary["scenario"]))
    palette = dict(zip(scenarios, sns.color_palette("tab10", len(scenarios))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    panels = (("vs_baseline_win_rate", f"win rate over {baseline}"), ("vs_reference_win_rate", "win rate over the reference"))
    cols = ["scenario", "method", "seeds"]
    for ax, (metric, title) in zip(axes, panels):
        methods = [m for m in dict.fromkeys(summary["method"]) if summary.loc[summary["method"] == m, metric].notna().any()]
        _points(ax, summary, metric, methods, scenarios, palette)
        ax.axhline(0.5, ls="--", color="0.4", lw=1)
        ax.set_title(title)
        ax.set_ylabel("win rate (ties 1/2), 95% CI across seeds")
        cols += [metric, f"{metric}_ci_low", f"{metric}_ci_high"]
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="scenario")
    fig.tight_layout()
    return _save(fig, summary[[c for c in cols if c in summary]], out, "llm_win_rates", meta)


def reward_vs_kl(summary: pd.DataFrame, out: Path, meta: dict | None = None) -> Path:
    """Mean true reward against KL to the reference, one panel per scenario, 95% intervals across seeds;
    open markers where the KL is best-of-n's formula (``kl_method``), not a measurement."""
    plt, sns = _setup()
    scenarios = list(dict.fromkeys(summary["scenario"]))
    methods = list(dict.fromkeys(summary["method"]))
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        sub = summary[summary["scenario"] == scenario]
        for _, row in sub.iterrows():
            one = sub[sub["method"] == row["method"]]
            formula = row.get("kl_method") == "best_of_n_formula"
            colour = palette[row["method"]]
            ax.errorbar(row["kl"], row["mean_reward"], xerr=_errors(one, "kl"), yerr=_errors(one, "mean_reward"),
                        fmt="D" if formula else "o", capsize=3, color=colour, mfc="none" if formula else colour,
                        label=f"{row['method']} (KL: formula)" if formula else row["method"])
        ax.set_title(scenario)
        ax.set_xlabel("KL(pi || pi_ref) (nats)")
        ax.set_ylabel("mean true reward")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="method")
    fig.tight_layout()
    cols = ["scenario", "method", "seeds", "kl", "kl_ci_low", "kl_ci_high", "kl_method", "mean_reward",
            "mean_reward_ci_low", "mean_reward_ci_high"]
    return _save(fig, summary[[c for c in cols if c in summary]], out, "llm_reward_kl", meta)


def variance_reduction(summary: pd.DataFrame, out: Path, meta: dict | None = None) -> Path:
    """VRPO's training diagnostics per method and scenario: the ratio of per-row gradient variances with and
    without the control variate (oriented margin shift; below 1 = variance removed) with its prediction at
    the reference policy (open markers), and the mean lambda."""
    plt, sns = _setup()
    sub = summary[summary.get("var_grad_ratio", pd.Series(dtype=float)).notna()] if "var_grad_ratio" in summary else summary.iloc[:0]
    scenarios = list(dict.fromkeys(summary["scenario"]))
    palette = dict(zip(scenarios, sns.color_palette("tab10", len(scenarios))))
    methods = list(dict.fromkeys(sub["method"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, title, hollow) in zip(axes, (
        ("var_grad_ratio", "Var(grad, VRPO) / Var(grad, MLE)\n(open: DESIGN.md 3.5 at pi_ref)", "var_grad_ratio_theory"),
        ("lambda_mean", "mean lambda over training", None),
    )):
        if len(sub):
            _points(ax, sub, metric, methods, scenarios, palette, hollow=hollow)
        ax.axhline(1.0, ls="--", color="0.4", lw=1)
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="scenario")
    fig.tight_layout()
    cols = ["scenario", "method", "seeds", "var_grad_ratio", "var_grad_ratio_ci_low", "var_grad_ratio_ci_high",
            "var_grad_ratio_theory", "lambda_mean", "lambda_mean_ci_low", "lambda_mean_ci_high", "g_hat_rmse"]
    return _save(fig, sub[[c for c in cols if c in sub]], out, "llm_variance_reduction", meta)


def results_table(summary: pd.DataFrame, out: Path, baseline: str = "dpo", meta: dict | None = None) -> Path:
    """The report's main table (win rates, mean reward, KL with 95% intervals across seeds) as a figure and CSV."""
    plt, _ = _setup()
    metrics = (("vs_baseline_win_rate", f"win vs {baseline}"), ("vs_reference_win_rate", "win vs ref"),
               ("mean_reward", "reward"), ("kl", "KL"))

    def cell(row: pd.Series, m: str) -> str:
        v = row.get(m)
        if v is None or not np.isfinite(v):
            return "-"
        lo, hi = row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")
        return f"{v:.3f}" if lo is None or not np.isfinite(lo) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    text = [[row["scenario"], row["method"], *[cell(row, m) for m, _ in metrics]] for _, row in summary.iterrows()]
    fig, ax = plt.subplots(figsize=(13, 0.32 * len(text) + 0.8))
    ax.axis("off")
    tab = ax.table(cellText=text, colLabels=["scenario", "method", *[h for _, h in metrics]], loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.auto_set_column_width(list(range(len(metrics) + 2)))
    cols = ["scenario", "method", "seeds"] + [f"{m}{s}" for m, _ in metrics for s in ("", "_ci_low", "_ci_high")]
    return _save(fig, summary[[c for c in cols if c in summary]], out, "llm_results_table", meta)


FIGURES: dict[str, Callable[..., Path]] = {
    "llm_win_rates": win_rates,
    "llm_reward_kl": reward_vs_kl,
    "llm_variance_reduction": variance_reduction,
    "llm_results_table": results_table,
}


def experiment_figure(name: str, results_dir: str | Path, out: str | Path) -> Path:
    """Draw figure ``name`` of ``FIGURES`` from an experiment folder."""
    results, info = load_results(results_dir)
    summary = summarise(results)
    meta = {"experiment": info["config"], "seeds": info["config"]["seeds"], "corpus": info.get("corpus"),
            "folder": str(Path(results_dir).resolve()), "versions": info.get("versions", {})}
    fn = FIGURES[name]
    if name in ("llm_win_rates", "llm_results_table"):
        return fn(summary, Path(out), baseline=info["config"]["baseline"], meta=meta)
    return fn(summary, Path(out), meta=meta)


DEFAULT_RESULTS_DIR = Path("results/llm/tiny-cpu")


def figure_main(name: str, doc: str, here: str | Path) -> Path:
    """Command line of one ``paper_figures/llm_*.py`` script: ``--results DIR`` (an experiment folder; the
    ``tiny-cpu`` preset is run there first if it holds no results) and ``--out DIR`` (default
    ``paper_figures/output``). ``--study`` (passed by ``robust-rlhf figures`` to every script) is accepted
    and ignored: these figures draw an LLM experiment, not a validation study."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS_DIR,
                        help=f"experiment folder (default: {DEFAULT_RESULTS_DIR}; the tiny-cpu preset is run if empty)")
    parser.add_argument("--out", type=Path, default=Path(here).resolve().parent / "output", help="output folder")
    parser.add_argument("--cache", type=Path, default=None, help="cache of tokenizers and reference models")
    parser.add_argument("--study", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.results / "results.csv").exists():
        from .experiment import run_experiment
        from .presets import get_preset
        from .report import write_report

        run_experiment(get_preset("tiny-cpu"), args.results, args.cache)
        write_report(args.results)
    path = experiment_figure(name, args.results, args.out)
    print(path)
    return path
