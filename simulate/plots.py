r"""Figures of a validation study (seaborn), each saved as PNG and PDF with the plotted table as CSV.

The numbers come from ``simulate.checks`` (measured values, their 95% intervals and the predictions);
nothing here computes a statistic of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .checks import _EXISTS, Report
from .study import Study

__all__ = ["FIGURES", "study_figures", "mse_vs_n", "variance_ratio", "regret_vs_n", "coverage_vs_n",
           "pessimism_bound", "second_order_bias", "double_robustness"]


def _setup():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt, sns


def _save(fig, table: pd.DataFrame, out: Path, name: str, study: Study) -> Path:
    """PNG, PDF, the plotted table as CSV, and ``NAME.meta.json`` with the spec and seed behind it."""
    import json

    from robust_rlhf.theory.io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    record = study.folder / "study.json"  # the package versions that computed the study
    versions = json.loads(record.read_text()).get("versions", {}) if record.exists() else {}
    with atomic_path(out / f"{name}.meta.json") as tmp:
        tmp.write_text(json.dumps({"figure": name, "study": study.spec.to_dict(), "seed": study.spec.seed,
                                   "fingerprint": study.spec.fingerprint(), "folder": str(study.folder),
                                   "versions": versions}, indent=1))
    # the tight bounding box (legends outside the axes included) once, for both formats: "tight" would lay
    # the figure out again in each savefig
    bbox = fig.get_tightbbox().padded(0.1)
    for ext in ("png", "pdf"):
        with atomic_path(out / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches=bbox)
    with atomic_path(out / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out / f"{name}.png"


def _palette(names: list[str]) -> dict[str, tuple]:
    import seaborn as sns

    return dict(zip(names, sns.color_palette("tab10", len(names))))


def _n_axis(ax, ns) -> None:
    """Log axis in n with plain tick labels at the sample sizes studied."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(ns)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labelled pairs n")


def _legend_right(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _conditioned(cells: pd.DataFrame) -> pd.Series:
    """Cells where more than ``1 - _EXISTS`` of the estimates do not exist: the rest are a conditioned
    sample (``checks`` leaves them out of its limit claims)."""
    return cells.failed / cells.reps > 1.0 - _EXISTS


def _off_scale(ax, sub: pd.DataFrame, value: str, top: float) -> None:
    """Name the points above the axis instead of letting them squash everything else."""
    off = sub[sub[value] > top]
    if len(off):
        parts = [f"{est} ({len(g)} point{'s' * (len(g) > 1)}, up to {g[value].max():.2g})"
                 for est, g in off.groupby("estimator", sort=False)]
        ax.text(0.02, 0.98, "off scale: " + "; ".join(parts), transform=ax.transAxes, fontsize=7, va="top",
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})


def mse_vs_n(study: Study, report: Report, out: Path) -> Path:
    """``E||theta_hat - theta_dagger||^2`` against n (log-log) with 95% bootstrap bands, the predicted MSE
    (dashed: ``(tr(cov) + (tr C + ||b||^2) / n) / n`` to second order where ``C`` is predicted, else
    ``tr(cov)/n``) and a slope -1 guide, one panel per scenario; a bad ``g_hat`` on the interquartile scale
    (``checks``), marked in the legend."""
    plt, _ = _setup()
    cells = report.cells.copy()
    second = (cells.pred_order == 2) & np.isfinite(cells.pred_bias.astype(float))
    cells["pred_mse"] = cells.pred_var + np.where(second, cells.pred_bias.astype(float) ** 2 / cells.n, 0.0)
    for col in ("mse", "mse_low", "mse_high", "pred_mse"):
        cells[f"{col}_per_n"] = cells[col] / cells.n
    scenarios = list(dict.fromkeys(cells.scenario))
    ests = list(dict.fromkeys(cells.estimator))
    colors = _palette(ests)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        sub = cells[cells.scenario == scenario]
        for est in ests:
            e = sub[sub.estimator == est].sort_values("n")
            label = est + (" (IQR scale)" if (e.scale == "interquartile").any() else "")
            ax.plot(e.n, e.mse_per_n, "o-", color=colors[est], label=label, lw=1.4, ms=4)
            ax.fill_between(e.n, e.mse_low_per_n, e.mse_high_per_n, color=colors[est], alpha=0.15, lw=0)
            gone = _conditioned(e)  # hollow
            ax.plot(e.n[gone], e.mse_per_n[gone], "o", mfc="white", mec=colors[est], ms=4, lw=0)
            if np.isfinite(e.pred_mse_per_n).all():
                ax.plot(e.n, e.pred_mse_per_n, "--", color=colors[est], lw=0.9, alpha=0.8)
        ns = np.sort(sub.n.unique())
        anchor = float(sub[sub.n == ns[0]].pred_mse_per_n.median())
        ax.plot(ns, anchor * ns[0] / ns, ":", color="black", lw=1.4, label="slope -1")
        _n_axis(ax, ns)
        ax.set_yscale("log")
        finite = sub.pred_mse_per_n[np.isfinite(sub.pred_mse_per_n)]
        top = 4.0 * float(finite.max()) if len(finite) else float(sub.mse_high_per_n.max())
        bottom = 0.4 * float(min(finite.min() if len(finite) else np.inf, sub.mse_low_per_n.min()))
        ax.set_ylim(bottom, top)
        _off_scale(ax, sub.rename(columns={"mse_per_n": "MSE"}), "MSE", top)
        ax.set_title(scenario)
        if ax is axes[0][0]:  # one label for the row: beside the other panels it runs into their neighbours
            ax.set_ylabel(r"MSE  $E\|\hat\theta - \theta^\dagger\|^2$")
    if _conditioned(cells).any():
        axes[0][0].plot([], [], "o", mfc="white", mec="gray", ms=4, lw=0, label="hollow: > 1% of the\nestimates "
                        "do not exist")
    _legend_right(fig, axes[0][0])
    fig.suptitle("MSE against n: measured (solid, 95% band) and predicted (dashed; second order where "
                 "predicted)", y=1.02)
    table = cells[["scenario", "estimator", "n", "scale", "mse_per_n", "mse_low_per_n", "mse_high_per_n",
                   "pred_mse_per_n", "reps", "failed"]]
    return _save(fig, table.rename(columns=lambda c: c.replace("_per_n", "")),
                 out, "mse_vs_n", study)


def variance_ratio(study: Study, report: Report, out: Path) -> Path:
    """Predicted against measured variance ratio over the MLE, one point per cell with its 95% CI, on
    the diagonal when the theory holds: the prediction at the cell's n (``pred_ratio_n``: second order
    where predicted, else the limit; what ``ratio_check`` judges). Left, the cells whose predicted ratio is
    at most 1 (linear axes); right, every cell (log axes, points far above their prediction named off
    scale). Hollow markers: a bad ``g_hat``'s cells, on the interquartile scale; faded: cells where more
    than 1% of the estimates do not exist (the rest are conditioned on existing)."""
    plt, _ = _setup()
    cells = report.cells[(report.cells.estimator != "mle") & np.isfinite(report.cells.pred_ratio_n)].copy()
    cells["conditioned"] = _conditioned(cells)
    scenarios = list(dict.fromkeys(cells.scenario))
    colors = _palette(scenarios)
    markers = dict(zip(sorted(cells.n.unique()), "ovs^DP*X"))
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.8))
    panels = ((axes[0], cells[cells.pred_ratio_n <= 1.0 + 1e-9], False, "cells with predicted ratio <= 1"),
              (axes[1], cells, True, "every cell"))
    for ax, sub, log, title in panels:
        if sub.empty:
            ax.set_visible(False)
            continue
        if log:
            lo = 0.7 * float(sub.pred_ratio_n.min())
            hi = 20.0 * float(sub.pred_ratio_n.max())
        else:
            lo = min(float(sub.pred_ratio_n.min()), float(sub.ratio_low.min())) - 0.03
            hi = max(float(sub.pred_ratio_n.max()), float(sub.ratio_high.max())) + 0.03
            hi = min(hi, 1.0 + 3.0 * (1.0 - lo)) if hi > 2 else hi
        for (scenario, n, scale, faded), g in sub.groupby(["scenario", "n", "scale", "conditioned"]):
            ax.errorbar(g.pred_ratio_n, g.ratio.clip(upper=hi), yerr=[(g.ratio - g.ratio_low).clip(lower=0),
                        (g.ratio_high - g.ratio).clip(lower=0)], fmt=markers[n], color=colors[scenario], ms=5,
                        lw=0.8, capsize=2, alpha=0.3 if faded else 0.85,
                        mfc="none" if scale == "interquartile" else None)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        _off_scale(ax, sub.rename(columns={"ratio": "ratio_measured"}), "ratio_measured", hi)
        ax.set_xlabel("predicted variance ratio at n (estimator / MLE)")
        ax.set_ylabel("measured variance ratio (95% CI)")
        ax.set_title(title)
    axes[1].plot([], [], "k--", lw=1, label="measured = predicted")
    for scenario in scenarios:
        axes[1].plot([], [], "o", color=colors[scenario], label=scenario)
    for n, m in markers.items():
        axes[1].plot([], [], m, color="gray", label=f"n = {n}")
    if (cells.scale == "interquartile").any():
        axes[1].plot([], [], "o", color="gray", mfc="none", label="bad g_hat:\ninterquartile scale")
    if cells.conditioned.any():
        axes[1].plot([], [], "o", color="gray", alpha=0.3, label="faded: > 1% of the\nestimates do not exist")
    axes[1].legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("variance ratio over the MLE: theory against simulation (paired, 95% bootstrap CI)", y=1.01)
    fig.tight_layout()
    table = cells[["scenario", "estimator", "n", "scale", "pred_ratio", "pred_ratio_n", "ratio", "ratio_low",
                   "ratio_high", "ratio_check", "reps", "failed"]]
    return _save(fig, table, out, "variance_ratio", study)


def regret_vs_n(study: Study, report: Report, out: Path) -> Path:
    """Mean regret of the greedy and KL policies against n, with 95% bands and the Gaussian plug-in
    prediction (dashed), one row per policy class and one column per scenario."""
    plt, _ = _setup()
    cells = report.cells
    scenarios = list(dict.fromkeys(cells.scenario))
    ests = list(dict.fromkeys(cells.estimator))
    colors = _palette(ests)
    fig, axes = plt.subplots(2, len(scenarios), figsize=(4.2 * len(scenarios), 6.6), squeeze=False)
    for row, kind in enumerate(("greedy", "kl")):
        for ax, scenario in zip(axes[row], scenarios):
            sub = cells[cells.scenario == scenario]
            for est in ests:
                e = sub[sub.estimator == est].sort_values("n")
                ax.plot(e.n, e[f"regret_{kind}"], "o-", color=colors[est], label=est, lw=1.4, ms=4)
                ax.fill_between(e.n, e[f"regret_{kind}_low"], e[f"regret_{kind}_high"], color=colors[est],
                                alpha=0.15, lw=0)
                if np.isfinite(e[f"pred_regret_{kind}"]).all():
                    ax.plot(e.n, e[f"pred_regret_{kind}"], "--", color=colors[est], lw=0.9)
            limit = sub[f"limit_regret_{kind}"].dropna()
            smallest = float(sub[f"regret_{kind}_low"].min())
            if len(limit) and limit.iloc[0] > 0.01 * smallest:  # a limit far below the data is zero in effect
                ax.axhline(limit.iloc[0], color="gray", lw=1.2, ls="-.", label=r"limit regret($\theta^\dagger$)")
            _n_axis(ax, sub.n.unique())
            ax.set_yscale("log")
            ax.set_title(f"{scenario}: {kind} policy")
            ax.set_ylabel("regret" if study.spec.scenario(scenario).has_utility else "regret (preference gap)")
    fig.tight_layout()
    _legend_right(fig, axes[0][-1])
    fig.suptitle(r"regret against n: measured (solid, 95% band) and Gaussian plug-in prediction at "
                 r"$\theta^\dagger + b/n$ (dashed)", y=1.02)
    cols = ["scenario", "estimator", "n"] + [f"{p}regret_{k}{s}" for k in ("greedy", "kl")
                                               for p, s in (("", ""), ("", "_low"), ("", "_high"), ("pred_", ""))]
    return _save(fig, cells[cols], out, "regret_vs_n", study)


def coverage_vs_n(study: Study, report: Report, out: Path) -> Path:
    """Coverage of the nominal 95% sandwich intervals against n, with 95% bootstrap intervals."""
    plt, _ = _setup()
    cells = report.cells
    scenarios = list(dict.fromkeys(cells.scenario))
    ests = list(dict.fromkeys(cells.estimator))
    colors = _palette(ests)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.6), squeeze=False, sharey=True)
    width = 0.035
    for ax, scenario in zip(axes[0], scenarios):
        sub = cells[cells.scenario == scenario]
        for k, est in enumerate(ests):
            e = sub[sub.estimator == est].sort_values("n")
            shift = np.exp((k - (len(ests) - 1) / 2) * width)  # dodge on the log axis
            ax.errorbar(e.n * shift, e.coverage, yerr=[e.coverage - e.coverage_low, e.coverage_high - e.coverage],
                        fmt="o-", color=colors[est], label=est, ms=3.5, lw=1, capsize=2)
        ax.axhline(0.95, color="black", ls="--", lw=1)
        _n_axis(ax, sub.n.unique())
        ax.set_title(scenario)
        ax.set_ylabel("coverage of nominal 95% CI")
    _legend_right(fig, axes[0][0])
    fig.suptitle("sandwich confidence intervals: coverage against n (nominal 0.95 dashed)", y=1.02)
    table = cells[["scenario", "estimator", "n", "coverage", "coverage_low", "coverage_high", "coverage_check"]]
    return _save(fig, table, out, "coverage_vs_n", study)


def pessimism_bound(study: Study, report: Report, out: Path) -> Path | None:
    """The explicit regret bounds of the pessimistic policy against n (global and self-concordant radius),
    beside the largest possible regret, the regrets of the policies they certify, of ``pi_ref`` (what a
    vacuous radius certifies) and of the asymptotic-ellipsoid pessimistic policy, all under the utility
    ``theta_dagger . phi``."""
    if report.pessimism is None:
        return None
    plt, _ = _setup()
    table = report.pessimism
    ests = list(dict.fromkeys(table.estimator))
    colors = _palette(ests)
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for est in ests:
        e = table[table.estimator == est].sort_values("n")
        ax.plot(e.n, e.bound, "s--", color=colors[est], label=f"{est}: explicit bound", lw=1.2, ms=4)
        ax.plot(e.n, e.regret_certified, "^:", color=colors[est], label=f"{est}: certified policy", lw=1.0, ms=4)
        if "bound_local" in e:
            ax.plot(e.n, e.bound_local, "D-.", color=colors[est], label=f"{est}: self-concordant bound", lw=1.2,
                    ms=4)
            ax.plot(e.n, e.regret_certified_local, "v:", color=colors[est], label=f"{est}: its certified policy",
                    lw=1.0, ms=4)
        ax.plot(e.n, e.regret_pessimistic_dagger, "o-", color=colors[est], label=f"{est}: asymptotic pessimism",
                lw=1.4, ms=4)
        ax.fill_between(e.n, e.regret_pessimistic_dagger_low, e.regret_pessimistic_dagger_high, color=colors[est],
                        alpha=0.15, lw=0)
    ax.axhline(float(table.max_regret.mean()), color="black", lw=1.2, ls="-.", label="largest possible regret")
    ax.axhline(float(table.regret_reference.mean()), color="gray", lw=1.0, ls=":", label=r"$\pi_{ref}$ itself")
    _n_axis(ax, table.n.unique())
    ax.set_yscale("log")
    ax.set_ylabel(r"regret under $\theta^\dagger \cdot \phi$")
    ax.set_title(f"pessimistic policy on {table.scenario.iloc[0]}: bound against regret")
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, table, out, "pessimism_bound", study)


def second_order_bias(study: Study, report: Report, out: Path) -> Path | None:
    r"""The mean error ``n E[theta_hat_k - theta_dagger_k]`` against the predicted second-order bias ``b_k``,
    one point per cell and coordinate with its simultaneous 95% interval (``Report.bias``), one panel
    per scenario: on the diagonal when the theory holds (points dodged sideways by up to 4% of the axis
    so that equal predictions stay apart)."""
    if report.bias is None:
        return None
    plt, _ = _setup()
    table = report.bias
    scenarios = list(dict.fromkeys(table.scenario))
    ests = list(dict.fromkeys(report.cells.estimator))
    colors = _palette(ests)
    markers = dict(zip(sorted(table.n.unique()), "ovs^DP*X"))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4.2), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        sub = table[table.scenario == scenario]
        groups = list(sub.groupby(["estimator", "n"], sort=False))
        width = 0.08 * (max(float(sub.predicted.max()), 0.0) - min(float(sub.predicted.min()), 0.0))
        for j, ((est, n), g) in enumerate(groups):  # dodged sideways, so that equal predictions stay apart
            dodge = width * (j / max(len(groups) - 1, 1) - 0.5)
            ax.errorbar(g.predicted + dodge, g.measured, yerr=[(g.measured - g.low).clip(lower=0),
                        (g.high - g.measured).clip(lower=0)], fmt=markers[n], color=colors[est], ms=4, lw=0.7,
                        capsize=1.5, alpha=0.8)
        lo = min(float(sub.predicted.min()), float(sub.low.min()))
        hi = max(float(sub.predicted.max()), float(sub.high.max()))
        pad = 0.05 * (hi - lo)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
        ax.axhline(0.0, color="gray", lw=0.6)
        ax.set_xlim(1.1 * min(float(sub.predicted.min()), 0.0) - width,
                    1.1 * max(float(sub.predicted.max()), 0.0) + width)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(scenario)
        ax.set_xlabel(r"predicted second-order bias $b_k$")
        ax.set_ylabel(r"measured $n\,E[\hat{\theta}_k - \theta^\dagger_k]$ (95% CI)")
    legend = axes[0][-1]
    legend.plot([], [], "k--", lw=1, label="measured = predicted")
    for est in dict.fromkeys(table.estimator):
        legend.plot([], [], "o", color=colors[est], label=est)
    for n, m in markers.items():
        legend.plot([], [], m, color="gray", label=f"n = {n}")
    legend.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(r"second-order bias $E\hat{\theta} = \theta^\dagger + b/n + o(1/n)$: theory against simulation "
                 "(a point per coordinate, sideways apart; intervals simultaneous over coordinates)", y=1.02)
    fig.tight_layout()
    return _save(fig, table, out, "second_order_bias", study)


def double_robustness(study: Study, report: Report, out: Path) -> Path | None:
    r"""DRPO's double robustness, one line per case against n with 95% intervals (``Report.drpo``): the relative
    distance of the median estimate from the oracle (dashed: where the limit is, 0 when either model is right), the
    regret of the fitted policies in the true objective (win rate less ``beta KL``) against the oracle's, and the
    mean doubly robust estimate of the fixed limit policy's win rate less its true win rate (dashed: predicted)."""
    if report.drpo is None:
        return None
    plt, _ = _setup()
    table = report.drpo.copy()
    table["win_bias"] = table.win_fixed - table.win_limit
    table["win_bias_low"] = table.win_fixed_low - table.win_limit
    table["win_bias_high"] = table.win_fixed_high - table.win_limit
    table["pred_win_bias"] = table.win_fixed_expected - table.win_limit
    cases = list(dict.fromkeys(table.case))
    colors = _palette(cases)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9))
    panels = (("oracle_error", "limit_to_oracle", r"$\|$med $\hat\theta - \theta_{orc}\| / \|\theta_{orc}\|$", "log"),
              ("regret", None, "true objective: oracle less fitted policy", "log"),
              ("win_bias", "pred_win_bias", r"DR win rate of $\pi_{lim}$ less its true one", "symlog"))
    for ax, (value, pred, label, scale) in zip(axes, panels):
        for case in cases:
            e = table[table.case == case].sort_values("n")
            ax.plot(e.n, e[value], "o-", color=colors[case], label=case, lw=1.4, ms=4)
            ax.fill_between(e.n, e[f"{value}_low"], e[f"{value}_high"], color=colors[case], alpha=0.2, lw=0)
            if pred is not None and (scale != "log" or (e[pred] > 0).all()):
                ax.plot(e.n, e[pred], "--", color=colors[case], lw=0.9)
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.axhline(0.0, color="gray", lw=0.6)
        else:
            ax.set_yscale(scale)
        _n_axis(ax, table.n.unique())
        ax.set_ylabel(label)
    axes[-1].plot([], [], "k--", lw=0.9, label="predicted (distance and bias:\n0 when a model is right)")
    axes[-1].legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    first = table.iloc[0]
    fig.suptitle(f"DRPO's double robustness under {first.scenario}: g_hat or pi_hat right gives the oracle policy",
                 y=1.02)
    fig.tight_layout()
    return _save(fig, table, out, "double_robustness", study)


FIGURES: dict[str, Callable[[Study, Report, Path], Path | None]] = {
    "mse_vs_n": mse_vs_n, "variance_ratio": variance_ratio, "regret_vs_n": regret_vs_n,
    "coverage_vs_n": coverage_vs_n, "pessimism_bound": pessimism_bound, "second_order_bias": second_order_bias,
    "double_robustness": double_robustness,
}


def study_figures(study: Study, report: Report, out: Path) -> list[Path]:
    """Every figure of ``FIGURES`` that the study has data for, into folder ``out``."""
    return [p for p in (draw(study, report, Path(out)) for draw in FIGURES.values()) if p is not None]
