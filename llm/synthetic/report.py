r"""Across-seed summaries of an experiment and its Markdown report; every number comes from ``results.csv``.

``summarise(results)``: for each (scenario, method) and each metric, the mean over the seeds and the 95%
Student-t interval across seeds (``llm.evaluate.seed_interval``: ``mean +- t_{k-1} sd / sqrt(k)``, ``k``
seeds, cut to the metric's range: a KL is >= 0, a win rate in [0, 1]; NaN with one seed; over the seeds
where the metric is finite, and ``partial_seeds`` names each metric finite in some seeds only, as
``metric: k of K``). ``kl_method`` says how the KL was obtained (``samples``; ``zero`` for the reference;
``best_of_n_formula``: ``log n - (n - 1)/n``, not measured). Metrics: the win rate and soft win probability over the baseline and over the
reference (primary judge; with a true reward also the deterministic true-reward comparison), the mean
true reward, the KL to the reference, VRPO's training diagnostics (mean ``lambda``, the ratio of the
per-row variances with and without the control variate, its prediction from DESIGN.md 3.5 at the
reference policy, the RMSE of ``g_hat`` against ``g*``) and DRPO's (its doubly robust estimate of its win
rate over the reference during training, the share of clipped importance ratios).

``write_report(out_dir)`` writes ``summary.csv`` and ``report.md``: the setting (corpus source, reference,
device, runtime), one table per scenario, and for every method a computed verdict on whether its win
rate over the baseline is above, below or indistinguishable from 1/2 at the 95% level.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.io import atomic_path

from ..evaluate import seed_interval

__all__ = ["SUMMARY_METRICS", "summarise", "load_results", "write_report", "verdict"]

#: metric column of results.csv -> label in the report
SUMMARY_METRICS: dict[str, str] = {
    "vs_baseline_win_rate": "win rate over the baseline",
    "vs_baseline_soft": "soft win probability over the baseline",
    "vs_reference_win_rate": "win rate over the reference",
    "vs_reference_soft": "soft win probability over the reference",
    "true_reward_vs_baseline_win_rate": "true-reward win rate over the baseline (deterministic)",
    "true_reward_vs_reference_win_rate": "true-reward win rate over the reference (deterministic)",
    "mean_reward": "mean true reward",
    "kl": "KL to the reference",
    "lambda_mean": "mean lambda",
    "var_grad_ratio": "Var(grad, VR) / Var(grad, MLE)",
    "var_grad_ratio_theory": "the same predicted at the reference policy (DESIGN.md 3.5)",
    "var_loss_ratio": "Var(loss, VR) / Var(loss, MLE)",
    "g_hat_rmse": "RMSE(g_hat - g*)",
    "drpo_win_rate": "DRPO's doubly robust estimate of its win rate over the reference (mean over its steps)",
    "drpo_clipped": "DRPO: share of rows whose importance ratio was clipped",
    "train_seconds": "training seconds",
}


def load_results(out_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(results.csv, experiment.json)`` of an experiment folder."""
    out = Path(out_dir)
    if not (out / "results.csv").exists() or not (out / "experiment.json").exists():
        raise InputError(f"{out}: no experiment results (results.csv, experiment.json); run robust-rlhf experiment")
    try:
        info = json.loads((out / "experiment.json").read_text())
        cfg = info["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{out / 'experiment.json'}: unreadable ({exc}); rerun robust-rlhf experiment") from None
    try:
        results = pd.read_csv(out / "results.csv")
        have = set(zip(results["seed"].astype(int), results["method"].astype(str)))
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise InputError(f"{out / 'results.csv'}: unreadable ({exc}); rerun robust-rlhf experiment") from None
    missing = [(s, m["name"]) for s in cfg.get("seeds", []) for m in cfg.get("methods", []) if (s, m["name"]) not in have]
    if missing:
        raise InputError(f"{out / 'results.csv'}: no row for {len(missing)} (seed, method) run(s) of the experiment, "
                         f"e.g. seed {missing[0][0]} of {missing[0][1]} (truncated or unfinished): rerun robust-rlhf "
                         "experiment")
    return results, info


_ANY = (-math.inf, math.inf)
#: the range of a metric, which its interval across seeds does not leave
_RANGES: dict[str, tuple[float, float]] = {
    **{m: (0.0, 1.0) for m in SUMMARY_METRICS if m.endswith(("_win_rate", "_soft"))},
    "kl": (0.0, math.inf), "var_grad_ratio": (0.0, math.inf),
    "var_grad_ratio_theory": (0.0, math.inf), "var_loss_ratio": (0.0, math.inf), "drpo_clipped": (0.0, 1.0),
}


def summarise(results: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per (scenario, method): ``{metric}``, ``{metric}_ci_low``, ``{metric}_ci_high`` across seeds, ``seeds``."""
    rows = []
    order = list(dict.fromkeys(results["method"]))
    scenarios = list(dict.fromkeys(results["scenario"]))
    for (scenario, method), grp in results.groupby(["scenario", "method"], sort=False):
        row: dict[str, Any] = {"scenario": scenario, "method": method, "kind": grp["kind"].iloc[0],
                               "seeds": int(grp["seed"].nunique())}
        if "kl_method" in grp:
            row["kl_method"] = "+".join(sorted(set(grp["kl_method"].dropna().astype(str))))
        partial = []
        for metric in SUMMARY_METRICS:
            if metric not in grp:
                continue
            values = grp[metric].to_numpy(dtype=float)
            finite = int(np.isfinite(values).sum())
            if 0 < finite < len(values):
                partial.append(f"{metric}: {finite} of {len(values)}")
            m, lo, hi = seed_interval(values, level, _RANGES.get(metric, _ANY))
            row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = m, lo, hi
        row["partial_seeds"] = "; ".join(partial)
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["_s"] = table["scenario"].map(scenarios.index)
        table["_m"] = table["method"].map(order.index)
        table = table.sort_values(["_s", "_m"], kind="stable").drop(columns=["_s", "_m"]).reset_index(drop=True)
    return table


def verdict(mean: float, low: float, high: float) -> str:
    """``above 1/2``, ``below 1/2`` or ``not distinguishable from 1/2`` for a win rate and its interval."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval (one seed)"
    if low > 0.5:
        return "above 1/2"
    if high < 0.5:
        return "below 1/2"
    return "not distinguishable from 1/2"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _cell(row: pd.Series, metric: str, digits: int = 3) -> str:
    if metric not in row or not math.isfinite(float(row[metric])):
        return "-"
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if lo is None or not math.isfinite(float(lo)):
        return _fmt(float(row[metric]), digits)
    return f"{_fmt(float(row[metric]), digits)} [{_fmt(float(lo), digits)}, {_fmt(float(hi), digits)}]"


_TABLE = (
    ("vs_baseline_win_rate", "win vs {baseline}"),
    ("vs_baseline_soft", "soft win vs {baseline}"),
    ("vs_reference_win_rate", "win vs reference"),
    ("mean_reward", "mean true reward"),
    ("kl", "KL(pi, pi_ref)"),
)
_DIAGNOSTICS = (
    ("var_grad_ratio", "Var ratio (grad)"),
    ("var_grad_ratio_theory", "predicted at pi_ref"),
    ("var_loss_ratio", "Var ratio (loss)"),
    ("lambda_mean", "mean lambda"),
    ("g_hat_rmse", "RMSE g_hat"),
    ("drpo_win_rate", "DRPO's DR win rate"),
    ("train_seconds", "train s"),
)


def write_report(out_dir: str | Path, level: float = 0.95) -> Path:
    """``summary.csv`` and ``report.md`` of an experiment folder; returns the report's path."""
    out = Path(out_dir)
    results, info = load_results(out)
    summary = summarise(results, level)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    cfg = info["config"]
    baseline = cfg["baseline"]
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else []
    corpus = info.get("corpus", {})
    lines = [
        f"# Experiment `{cfg['name']}`",
        "",
        cfg.get("description", ""),
        "",
        "Generated by `robust_rlhf.llm.synthetic.report.write_report` from `results.csv`; no number below is "
        "typed by hand.",
        "",
        "## Setting",
        "",
        f"- text: {corpus.get('source', '?')} ({corpus.get('location', '?')}), "
        f"{corpus.get('texts', corpus.get('rows', '?'))} texts",
        f"- reference policy: `{info.get('reference')}`",
    ]
    pre = corpus.get("reference_pretrain")
    if pre:
        lines.append(
            f"- reference pre-training: {pre['parameters']} parameters, vocabulary {pre['vocab_size']}, "
            f"held-out loss {_fmt(pre['heldout_loss'])} nats/token, {_fmt(pre['seconds'], 0)} s (cached)"
        )
    lines += [
        f"- true reward: {cfg.get('reward')}; scenarios: {', '.join(cfg.get('scenarios') or ['data'])}; "
        f"sharpness {cfg.get('sharpness')}",
        f"- {cfg['n_train']} labelled pairs per seed, {cfg['n_eval']} held-out prompts, seeds {cfg['seeds']}, "
        f"beta {cfg['beta']}, learning rate {cfg['learning_rate']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}",
        f"- judge: {cfg['judge']} (pair order shuffled; ties count 1/2); per-seed intervals: {cfg['ci']}; "
        f"across seeds: Student t, {int(level * 100)}%",
        f"- device: {info.get('device')}, torch threads {info.get('torch_threads')}; versions: "
        + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()),
    ]
    if timings:
        total = sum(t.get("total", 0.0) for t in timings)
        lines.append(
            f"- wall-clock time: {_fmt(total / 60, 1)} min over {len(timings)} invocation(s) "
            f"(last: {_fmt(timings[-1].get('total', float('nan')) / 60, 1)} min)"
        )
    for scenario, grp in summary.groupby("scenario", sort=False):
        lines += ["", f"## Scenario `{scenario}`", ""]
        head = [h.format(baseline=baseline) for _, h in _TABLE]
        lines.append("| method | " + " | ".join(head) + " |")
        lines.append("|---" * (len(head) + 1) + "|")
        for _, row in grp.iterrows():
            lines.append(f"| {row['method']} | " + " | ".join(_cell(row, m) for m, _ in _TABLE) + " |")
        diag = grp[grp["kind"] == "policy"]
        if len(diag):
            lines += ["", "| method | " + " | ".join(h for _, h in _DIAGNOSTICS) + " |", "|---" * (len(_DIAGNOSTICS) + 1) + "|"]
            for _, row in diag.iterrows():
                lines.append(f"| {row['method']} | " + " | ".join(_cell(row, m) for m, _ in _DIAGNOSTICS) + " |")
        notes = [f"- `{row['method']}`: KL is the formula log n - (n - 1)/n (exact for a reward without ties, "
                 "an upper bound otherwise), not measured" for _, row in grp.iterrows()
                 if row.get("kl_method") == "best_of_n_formula"]
        notes += [f"- `{row['method']}`: means over fewer seeds where a value was not finite ({row['partial_seeds']})"
                  for _, row in grp.iterrows() if row.get("partial_seeds")]
        if notes:
            lines += ["", *notes]
        lines += ["", f"Over `{baseline}` ({int(level * 100)}% intervals across seeds; the soft win probability is "
                  "the judge's mean probability, without the noise of drawn outcomes):", ""]
        for _, row in grp.iterrows():
            if row["method"] == baseline or "vs_baseline_win_rate" not in row or not math.isfinite(
                float(row["vs_baseline_win_rate"])
            ):
                continue
            parts = []
            for metric, label in (("vs_baseline_win_rate", "win rate"), ("vs_baseline_soft", "soft win probability")):
                v = verdict(float(row[metric]), float(row[f"{metric}_ci_low"]), float(row[f"{metric}_ci_high"]))
                parts.append(f"{label} {_cell(row, metric)}: {v}")
            lines.append(f"- `{row['method']}`: " + "; ".join(parts))
    lines += ["", "Per-seed values with their per-comparison intervals: `results.csv`; this table: `summary.csv`.", ""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
