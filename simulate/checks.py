r"""What a validation study concludes: measured quantities with 95% confidence intervals against the
predictions of ``theory``, cell by cell and as named claims.

Uncertainty comes from a bootstrap over replications. The replication index ``r`` carries the same
labelled pairs in every cell of a scenario (common random numbers, nested across ``n``), so one
resample of indices is applied to every cell at once: ratios between estimators and slopes across
``n`` are paired, as the design is. Intervals are bootstrap percentiles (``B`` resamples, fixed
seed; the bias check's are Student-t intervals of a mean), widened in quadrature on the log scale by
the Monte Carlo error of the prediction itself (the prompt average behind it). A check passes when the
prediction lies inside the interval.

Cell checks (``cell_checks``):

- ``var``: ``n tr Cov(theta_hat)`` over replications against ``pred_var``, as a ratio: for the MLE and
  VRPO at a fixed ``lam`` the second-order ``tr(cov) + tr(C) / n`` (``second_order.vr_second_order``,
  ``pred_order`` 2), else the limit ``tr(cov)`` (``pred_var_limit``, ``pred_order`` 1); for a bad ``g_hat``
  (see below) the interquartile scale ``n sum_k (IQR_k / 1.349)^2`` against the limit (column ``scale``:
  ``sample`` or ``interquartile``);
- ``ratio``: ``tr Cov(theta_hat)`` of the estimator over that of the MLE (paired, both on the cell's
  scale), against the predicted variance ratio at ``n`` (``pred_ratio_n``: of the second-order variances
  where both are predicted; ``pred_ratio`` is the limit); ``n/a`` for the MLE itself (1 by construction);
- ``coverage``: share of coordinates whose nominal 95% sandwich interval covers ``theta_dagger``;
- ``mse``: ``n E||theta_hat - theta_dagger||^2`` with its interval (for a bad ``g_hat`` its
  normal-consistent counterpart ``n (||median error||^2 + sum_k (IQR_k / 1.349)^2)``), and per (scenario,
  estimator) the slope of ``log MSE`` against ``log n`` (``slopes``), expected -1;
- ``bias``: ``n ||mean error||`` beside ``||b||``, the second-order bias (``asymptotics.vr_bias``, for
  power-tuned VRPO ``asymptotics.tuned_bias``; not for a learned ``g_hat``, nor where the tuned ``lam``
  has no limit, as with an oracle ``g_hat`` under BT, nor for a bad ``g_hat``, whose estimate has no
  finite-sample mean); the check covers every coordinate's ``b_k / n`` by its mean error's Student-t
  interval (Bonferroni over coordinates), widened by ``theta_dagger``'s Monte Carlo error. The intervals,
  one row per cell and coordinate on the scale ``n (theta_hat - theta_dagger)``, are ``Report.bias``;
- ``regret_greedy``, ``regret_kl``: mean regret against the Gaussian plug-in prediction, its draws
  centred at ``theta_dagger + b/n`` (the second-order bias, where predicted); the interval is widened
  in quadrature by the prediction's own error (``pred_regret_*_se``: its draws, and what the prompt
  average behind ``theta_dagger`` passes on).

Named claims about *asymptotic* variances (claims 1-3) extrapolate the paired variance ratio across
the studied ``n`` by least squares in ``r(n) = r_inf + c/n``, removing the O(1/n) finite-sample
excess that the paired design is precise enough to detect at any single ``n``; the report gives the
ratio at the largest ``n`` beside it. Each verdict is a 95% test: about one true claim in twenty is
refuted by chance (the one-sided claims, "never worse" and "at least ``1 - delta``", are refuted only when
the whole 95% interval lies on the wrong side: 97.5% tests). A claim with nothing to measure (no estimate
exists, e.g. every replication is separable) is ``inconclusive``, as a cell check is ``n/a``.

The claims about a bad ``g_hat`` (claim 3: consistent for ``theta_dagger``, at the predicted variance)
are about the limit distribution, measured by its median and its normal-consistent interquartile scale
``sum_k (IQR_k / 1.349)^2``, not by the sample mean and variance. With ``lam = 1`` the curvature of
the VR objective comes from reference pairs whose ``g_hat`` pulls against the labels, and its
recession slope along some direction is negative (no estimate) with positive probability at any
finite ``n``, so it has a density at zero: the estimate lands arbitrarily far out with probability
decaying like ``1 / ||theta||`` and has no finite-sample mean or variance, although
``sqrt(n) (theta_hat - theta_dagger)`` converges to the predicted normal limit. The median's O(1/n)
bias and the scale's O(1/n) excess are extrapolated like the variance ratios, over the studied ``n``
at which the estimate exists in at least 99% of replications (below that, conditioning on existence
distorts the distribution); the report gives the sample-variance ratio at the largest ``n`` beside.

Replications whose estimate does not exist (separable data, unbounded objective) are left out of
every statistic and counted in ``failed``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from .double_robustness import CASES
from .pessimism import NEWEST_COLUMNS

__all__ = ["Report", "analyse", "BOOTSTRAP", "MIN_ESTIMATES"]

BOOTSTRAP = 400
_Z = 1.959963984540054
_IQR_NORMAL = 1.3489795003921634  # the interquartile range of N(0, 1)
_EXISTS = 0.99  # the share of replications whose estimate must exist for a cell to enter a limit claim
#: the fewest estimates a cell's bootstrap intervals are read from: a percentile interval over fewer falls short
#: of its level (over 2 it is a point), so such cells' checks are n/a and their scenario's claims inconclusive
MIN_ESTIMATES = 20


@dataclass(frozen=True)
class Report:
    """Cell checks, log-MSE slopes, the pessimism bound's checks and named claims of a study; ``bias``:
    per cell and coordinate, ``n`` times the mean error with its interval against the second-order bias;
    ``drpo``: per DRPO case and ``n``, the double robustness checks."""

    cells: pd.DataFrame
    slopes: pd.DataFrame
    claims: list[dict[str, Any]]
    pessimism: pd.DataFrame | None = None
    bias: pd.DataFrame | None = None
    drpo: pd.DataFrame | None = None

    def claims_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.claims)


def _cell_columns(preds: pd.DataFrame, key: tuple) -> list[str]:
    """``theta_0 .. theta_{d-1}`` of a cell: its scenario's dimension (a study may mix dimensions)."""
    return [f"theta_{j}" for j in range(len(preds.loc[key, "theta_dagger"]))]


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean``, NaN without a warning where nothing exists (a cell whose every estimate failed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _boot_mean(values: np.ndarray, idx: np.ndarray, per_column: bool = False) -> np.ndarray:
    """Mean of the non-NaN entries of ``values[idx[b]]`` for every resample ``b`` (values: (R, ...)), or
    with ``per_column`` of each column of ``values`` (R, d) -> (B, d); NaN where a resample has none.
    All resamples at once (one array op, not a Python loop)."""
    x = values[idx]
    axes = (1,) if per_column else tuple(range(1, x.ndim))
    ok = ~np.isnan(x)
    count = ok.sum(axis=axes)
    total = np.where(ok, x, 0.0).sum(axis=axes)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def _trace_vars(theta: np.ndarray) -> np.ndarray:
    """``tr Cov`` of the rows of ``theta`` (..., R, d) that exist (rows with a NaN dropped), for every
    leading index; NaN where fewer than 2 rows exist."""
    ok = np.isfinite(theta).all(axis=-1, keepdims=True)
    count = ok.sum(axis=-2)
    mean = np.where(ok, theta, 0.0).sum(axis=-2) / np.maximum(count, 1)
    dev = np.where(ok, theta - mean[..., None, :], 0.0)
    var = (dev * dev).sum(axis=-2).sum(axis=-1) / np.maximum(count[..., 0] - 1, 1)
    return np.where(count[..., 0] >= 2, var, np.nan)


def _row_quantiles(theta: np.ndarray, q: float) -> np.ndarray:
    """``np.nanquantile(theta, q, axis=-2)`` (linear interpolation) for ``theta`` (..., R, d), by one
    sort of all the columns at once (numpy loops over the columns in Python when NaNs are present)."""
    x = np.sort(theta, axis=-2)  # NaNs last
    count = (~np.isnan(x)).sum(axis=-2, keepdims=True)
    pos = q * np.maximum(count - 1, 0)
    below = np.floor(pos).astype(np.intp)
    above = np.minimum(below + 1, np.maximum(count - 1, 0))
    lo, hi = np.take_along_axis(x, below, axis=-2), np.take_along_axis(x, above, axis=-2)
    out = (lo + (pos - below) * (hi - lo))[..., 0, :]
    return np.where(count[..., 0, :] > 0, out, np.nan)


def _robust_trace_vars(theta: np.ndarray) -> np.ndarray:
    """``sum_k (IQR_k / 1.349)^2`` over the rows of ``theta`` (..., R, d) that exist (NaN rows dropped),
    for every leading index: ``tr Cov`` of a normal limit, unmoved by a few far-out estimates."""
    iqr = _row_quantiles(theta, 0.75) - _row_quantiles(theta, 0.25)
    return ((iqr / _IQR_NORMAL) ** 2).sum(axis=-1)


def _bad_ghat(info: dict[str, str]) -> bool:
    """Whether an estimator is VRPO with a bad ``g_hat`` (not the oracle or a noisy oracle): judged on its
    limit distribution's median and interquartile scale (module docstring)."""
    return info["method"] == "vrpo" and info["aux"] not in ("oracle", "noisy_oracle")


class _Spreads:
    """Per cell, with its bootstrap resamples (B,), computed once per cell and scale: the spread
    ``n tr Cov(theta_hat)`` (``robust``: the interquartile ``n sum_k (IQR_k / 1.349)^2``) and, by ``mse``,
    ``n E||theta_hat - theta_dagger||^2`` (``robust``: ``n (||median error||^2 + sum_k (IQR_k / 1.349)^2)``,
    the normal-consistent counterpart)."""

    def __init__(self, by_cell: dict, idx: np.ndarray, preds: pd.DataFrame) -> None:
        self._by_cell, self._idx, self._preds = by_cell, idx, preds
        self._cache: dict[tuple, tuple[float, np.ndarray]] = {}

    def __call__(self, key: tuple, robust: bool = False) -> tuple[float, np.ndarray]:
        if ("var", key, robust) not in self._cache:
            theta = self._by_cell[key][_cell_columns(self._preds, key)].to_numpy()
            of = _robust_trace_vars if robust else _trace_vars
            self._cache[("var", key, robust)] = (key[1] * float(of(theta)), key[1] * of(theta[self._idx]))
        return self._cache[("var", key, robust)]

    def mse(self, key: tuple, robust: bool) -> tuple[float, np.ndarray]:
        if ("mse", key, robust) not in self._cache:
            g = self._by_cell[key]
            if robust:
                err = g[_cell_columns(self._preds, key)].to_numpy() - np.asarray(self._preds.loc[key, "theta_dagger"],
                                                                                 dtype=float)
                of = lambda e: (_row_quantiles(e, 0.5) ** 2).sum(-1) + _robust_trace_vars(e)  # noqa: E731
                point, boot = float(of(err)), of(err[self._idx])
            else:
                sq = g["sq_error"].where(~g["separable"]).to_numpy()
                point, boot = float(_nanmean(sq)), _boot_mean(sq, self._idx)
            self._cache[("mse", key, robust)] = (key[1] * point, key[1] * boot)
        return self._cache[("mse", key, robust)]


def _interval(samples: np.ndarray, rel_extra: float = 0.0, point: float | None = None) -> tuple[float, float]:
    """Percentile interval of positive bootstrap ``samples``, widened by a relative error in quadrature
    on the log scale."""
    s = samples[np.isfinite(samples)]
    if s.size < 10:
        return math.nan, math.nan
    lo, hi = np.percentile(s, [2.5, 97.5])
    if rel_extra <= 0 or lo <= 0 or point is None or point <= 0:
        return float(lo), float(hi)
    centre = math.log(point)
    dl, dh = centre - math.log(lo), math.log(hi) - centre
    widen = _Z * rel_extra
    return math.exp(centre - math.hypot(dl, widen)), math.exp(centre + math.hypot(dh, widen))


def _bias_table(theta: np.ndarray, pred: pd.Series, n: int) -> pd.DataFrame | None:
    """Per coordinate, on the scale ``n (theta_hat - theta_dagger)``: the mean error with its Student-t
    interval (Bonferroni over coordinates, widened in quadrature by ``theta_dagger``'s Monte Carlo error)
    against the second-order bias ``b_k``; None where no bias is predicted. (Percentiles of 400 bootstrap
    means put the Bonferroni tails on about 3 resamples each: 6.4 % of true claims failed, not 5 %.)"""
    b = pred.get("pred_bias")
    if not isinstance(b, (list, tuple, np.ndarray)):
        return None
    b = np.asarray(b, dtype=float)
    err = n * (theta - np.asarray(pred["theta_dagger"], dtype=float))
    mean = _nanmean(err, axis=0)
    alpha = 0.05 / err.shape[1]
    count = np.isfinite(err).sum(axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a coordinate with fewer than 2 estimates: NaN
        half = student_t.ppf(1 - alpha / 2, count - 1) * np.nanstd(err, axis=0, ddof=1) / np.sqrt(count)
    half = np.where(count >= 2, half, np.nan)
    lo, hi = mean - half, mean + half
    se = pred.get("theta_se")
    se = np.nan_to_num(np.asarray(se, dtype=float)) if isinstance(se, (list, tuple, np.ndarray)) else 0.0
    lo, hi = _widened(lo, hi, mean, NormalDist().inv_cdf(1 - alpha / 2) * n * se)
    return pd.DataFrame({"coordinate": np.arange(b.size), "measured": mean, "low": lo, "high": hi,
                         "predicted": b, "covered": (lo <= b) & (b <= hi)})


def _finite_or_zero(x: float) -> float:
    return float(x) if x is not None and math.isfinite(x) else 0.0


def _widened(low: Any, high: Any, point: Any, extra: Any) -> tuple[Any, Any]:
    """The interval ``[low, high]`` around ``point``, each side widened in quadrature by ``extra`` (numbers
    or arrays, elementwise); unchanged where ``extra <= 0`` or an input is not finite."""
    low, high, point, extra = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (low, high, point, extra)))
    keep = (extra <= 0) | ~(np.isfinite(low) & np.isfinite(high) & np.isfinite(point))
    with np.errstate(invalid="ignore"):
        lo = np.where(keep, low, point - np.hypot(point - low, extra))
        hi = np.where(keep, high, point + np.hypot(high - point, extra))
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def analyse(results: pd.DataFrame, predictions: pd.DataFrame, *, bootstrap: int = BOOTSTRAP,
            seed: int = 0, pessimism: pd.DataFrame | None = None, delta: float = 0.1,
            drpo: pd.DataFrame | None = None) -> Report:
    """Cell checks, slopes and claims of a study's tables (see the module docstring); with a
    ``pessimism`` table, the bound's coverage at level ``1 - delta`` too; with a ``drpo`` table, DRPO's double
    robustness (claims 7)."""
    reps = int(results["rep"].max()) + 1
    idx = np.random.default_rng(seed).integers(0, reps, size=(bootstrap, reps))
    preds = predictions.set_index(["scenario", "n", "estimator"])
    by_cell = {key: g.sort_values("rep") for key, g in results.groupby(["scenario", "n", "estimator"], sort=False)}
    meta = results_meta(by_cell)
    spread = _Spreads(by_cell, idx, preds)
    rows, bias_rows = [], []
    for key, g in by_cell.items():
        scenario, n, est = key
        pred = preds.loc[key]
        cols = _cell_columns(preds, key)
        d = len(cols)
        theta = g[cols].to_numpy()
        if len(theta) != reps:
            raise ValueError(f"cell {key} has {len(theta)} replications, expected {reps}")
        robust = _bad_ghat(meta[(scenario, est)])
        var, bv = spread(key, robust)
        failed = int(g["separable"].sum())
        covered = g[[f"covered_{j}" for j in range(d)]].to_numpy(dtype=float)
        cov_rate = float(_nanmean(covered))
        cov_boot = _boot_mean(covered, idx)
        mse, mse_boot = spread.mse(key, robust)
        mse_lo, mse_hi = _interval(mse_boot)
        row = {
            "scenario": scenario, "n": n, "estimator": est, "reps": reps, "failed": failed,
            "var": var, **_predicted_var(pred, n, robust),
            "mse": mse, "mse_low": mse_lo, "mse_high": mse_hi,
            "coverage": cov_rate, **dict(zip(("coverage_low", "coverage_high"), _interval(cov_boot))),
            "lam": float(g["lam"].mean()), "scale": "interquartile" if robust else "sample",
        }
        rel = row["pred_var_se"] / row["pred_var"] if row["pred_var"] > 0 else 0.0
        vr = bv / row["pred_var"]
        row["var_ratio_to_pred"] = var / row["pred_var"]
        row["var_ratio_low"], row["var_ratio_high"] = _interval(vr, rel if np.isfinite(rel) else 0.0,
                                                                row["var_ratio_to_pred"])
        row["var_check"] = _verdict(1.0, row["var_ratio_low"], row["var_ratio_high"])
        row["coverage_check"] = _verdict(0.95, row["coverage_low"], row["coverage_high"])
        coords = None if robust else _bias_table(theta, pred, n)
        row["bias"], row["pred_bias"], row["bias_check"] = math.nan, math.nan, "n/a"
        if coords is not None:
            row["bias"], row["pred_bias"] = np.linalg.norm(coords.measured), np.linalg.norm(coords.predicted)
            measured = np.isfinite(coords[["measured", "low", "high"]].to_numpy()).all()
            row["bias_check"] = ("pass" if coords.covered.all() else "fail") if measured else "n/a"
            bias_rows.append(coords.assign(scenario=scenario, n=n, estimator=est))
        for kind in ("greedy", "kl"):
            values = g[f"regret_{kind}"].to_numpy()
            row[f"regret_{kind}"] = float(_nanmean(values))
            lo, hi = _interval(_boot_mean(values, idx))
            row[f"regret_{kind}_low"], row[f"regret_{kind}_high"] = lo, hi
            row[f"pred_regret_{kind}"] = pred.get(f"pred_regret_{kind}", math.nan)
            row[f"limit_regret_{kind}"] = pred.get(f"limit_regret_{kind}", math.nan)
            # the prediction's own error: its draws and the prompt average behind theta_dagger
            pred_se = math.hypot(*(_finite_or_zero(pred.get(f"pred_regret_{kind}_{e}", math.nan))
                                   for e in ("se", "target_se")))
            row[f"pred_regret_{kind}_se"] = pred_se
            row[f"regret_{kind}_check"] = _verdict(row[f"pred_regret_{kind}"],
                                                   *_widened(lo, hi, row[f"regret_{kind}"], _Z * pred_se))
        rows.append(row)
    cells = pd.DataFrame(rows)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample without spread: NaN, left out of intervals
        _add_ratios(cells, spread, preds)
        slopes = _slopes(cells, spread)
        claims = _claims(cells, by_cell, spread, idx, preds)
    few = cells.reps - cells.failed < MIN_ESTIMATES
    if few.any():
        cells.loc[few, [c for c in cells.columns if c.endswith("_check")]] = "n/a"
        thin = set(cells.scenario[few])
        slopes.loc[slopes.scenario.isin(thin), "slope_check"] = "n/a"
        for c in claims:
            if c["scenario"] in thin:
                _make_inconclusive(c, f"fewer than {MIN_ESTIMATES} estimates in a cell")
    pess = None
    stale = sorted(set(NEWEST_COLUMNS) - set(pessimism.columns)) if pessimism is not None else []
    if stale:  # a folder written before these were recorded: rerunning `validate` on it recomputes them
        warnings.warn(f"the pessimism table lacks {', '.join(stale)} (written by an older version): its checks are "
                      "left out; rerun `robust-rlhf validate` on the folder to recompute it", UserWarning, stacklevel=2)
    elif pessimism is not None and len(pessimism):
        pess, pess_claims = _pessimism(pessimism, delta, bootstrap, seed)
        claims = sorted(claims + pess_claims, key=lambda c: (c["name"], c["scenario"], c["estimator"]))
    drpo_summary = None
    if drpo is not None and len(drpo):
        drpo_summary, drpo_claims = _drpo(drpo, bootstrap, seed)
        claims = sorted(claims + drpo_claims, key=lambda c: (c["name"], c["scenario"], c["estimator"]))
    bias = None
    if bias_rows:
        bias = pd.concat(bias_rows, ignore_index=True)
        bias = bias[["scenario", "n", "estimator", "coordinate", "measured", "low", "high", "predicted", "covered"]]
    return Report(cells=cells, slopes=slopes, claims=claims, pessimism=pess, bias=bias, drpo=drpo_summary)


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a binomial proportion ``k / n``."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + _Z ** 2 / (2 * n)) / (1 + _Z ** 2 / n)
    half = _Z * math.sqrt(p * (1 - p) / n + _Z ** 2 / (4 * n * n)) / (1 + _Z ** 2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _pessimism(table: pd.DataFrame, delta: float, bootstrap: int, seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """Per (n, estimator): share of replications where the bound held (Wilson CI), where the radius event
    held and could fail (``informative``), mean bound, largest possible regret, regret of the certified
    policy, of ``pi_ref`` and of the asymptotic pessimistic policy under ``theta_dagger . phi`` (the last with
    a bootstrap interval, and under the true utility as ``regret_pessimistic``), and the same for the local
    (self-concordant) radius (``*_local``); claims 6 (global radius) and 6b (local) per estimator, pooled over
    the replications where the radius event can fail: it holds with probability >= 1 - delta (inconclusive
    where it cannot fail)."""
    rng = np.random.default_rng(seed)
    rows, claims = [], []
    for (scenario, n, est), g in table.groupby(["scenario", "n", "estimator"], sort=False):
        held = int(g.held.sum())
        lo, hi = _wilson(held, len(g))
        asym = g.regret_pessimistic_dagger.to_numpy()
        boot = [_nanmean(asym[rng.integers(0, len(asym), len(asym))]) for _ in range(bootstrap)]
        rows.append({"scenario": scenario, "n": n, "estimator": est, "reps": len(g), "held": held / len(g),
                     "held_low": lo, "held_high": hi, "informative": float(g.informative.mean()),
                     "in_radius": float(g.in_radius.mean()), "bound": float(g.bound_dagger.mean()),
                     "max_regret": float(g.max_regret.mean()), "radius": float(g.radius.mean()),
                     "regret_certified": float(g.regret_dagger.mean()),
                     "regret_reference": float(g.regret_reference.mean()),
                     "regret_pessimistic_dagger": float(_nanmean(asym)),
                     "regret_pessimistic_dagger_low": float(np.nanpercentile(boot, 2.5)),
                     "regret_pessimistic_dagger_high": float(np.nanpercentile(boot, 97.5)),
                     "regret_pessimistic": float(_nanmean(g.regret_pessimistic))})
        local = {"held": g.held_local.astype(bool), "informative": g.informative_local, "in_radius": g.in_radius_local,
                 "bound": g.bound_dagger_local, "radius": g.radius_local, "regret_certified": g.regret_dagger_local}
        rows[-1].update({f"{k}_local": float(v.mean()) for k, v in local.items()})
    summary = pd.DataFrame(rows)
    for (scenario, est), g in table.groupby(["scenario", "estimator"], sort=False):
        last = summary[(summary.scenario == scenario) & (summary.estimator == est)].sort_values("n").iloc[-1]
        for name, suffix, what in (("6_bound_holds", "", "explicit radius ||theta_hat - theta_dagger||_M <= Gamma"),
                                   ("6b_local_bound_holds", "_local", "self-concordant radius ||theta_hat - "
                                    "theta_dagger||_{H_hat} <= Gamma")):
            can_fail = g[g[f"informative{suffix}"].astype(bool)]
            held, total = int(can_fail[f"in_radius{suffix}"].sum()), len(can_fail)
            lo, hi = _wilson(held, total) if total else (math.nan, math.nan)
            ns = sorted(int(v) for v in can_fail.n.unique())
            where = (f"{total} of {len(g)} replications, at n = {', '.join(map(str, ns))}, where the radius is "
                     "below the one that holds with certainty" if total else
                     f"none of {len(g)} replications: the radius is the certain one at every n, the check cannot fail")
            bound = last[f"bound{suffix}"]
            note = (f"the regret bound it implies: {bound:.3g} against a largest possible regret of "
                    f"{last.max_regret:.3g} at n = {int(last.n)}" + (", vacuous" if bound >= last.max_regret else ""))
            claims.append(_claim(name, scenario, est, int(last.n), 1 - delta, held / total if total else math.nan,
                                 lo, hi, f"the {what} of {est} (the pessimism bound's event) holds with probability "
                                 f">= {1 - delta:g} ({where}; {note})", confirmed=hi >= 1 - delta))
    return summary, claims


_CASE_TEXT = {"both_right": "g_hat and pi_hat right", "g_wrong": "g_hat wrong, pi_hat right",
              "pi_wrong": "g_hat right, pi_hat wrong", "both_wrong": "g_hat and pi_hat wrong"}


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """The mean of the finite ``values`` and its 95% Student-t interval."""
    x = values[np.isfinite(values)]
    if x.size < 2:
        return math.nan, math.nan, math.nan
    mean, half = float(x.mean()), float(student_t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _drpo(table: pd.DataFrame, bootstrap: int, seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """DRPO's double robustness (``simulate.double_robustness``). Per (case, n): the relative median error against
    the limit ``theta_lim`` and against the oracle (``oracle_error``, with a bootstrap interval), the interquartile-
    scale ``n`` variance over ``tr`` of the exact sandwich (``var_ratio``, with a bootstrap interval), the sandwich
    intervals' coverage of ``theta_lim``, the DR estimate of the fixed policy ``pi_lim``'s win rate (Student-t
    interval) against its expectation and ``pi_lim``'s true win rate, and the regret of the fits in the true objective
    against the oracle (``regret``). Claims 7 per case: the median error extrapolated to ``n -> inf`` is 0 (the limit
    is the oracle's when either model is right), the variance ratio extrapolated so is 1, the coverage at the largest
    ``n`` is 0.95 and the fixed policy's estimate has the predicted mean."""
    rows, claims = [], []
    for (scenario, case), g in table.groupby(["scenario", "case"], sort=False):
        d = sum(c.startswith("theta_") for c in g.columns)
        cols = [f"theta_{k}" for k in range(d)]
        first = g.iloc[0]
        limit = first[[f"limit_{k}" for k in range(d)]].to_numpy(dtype=float)
        oracle = first[[f"oracle_{k}" for k in range(d)]].to_numpy(dtype=float)
        by_n = {int(n): c.sort_values("rep") for n, c in g.groupby("n")}
        reps = len(next(iter(by_n.values())))
        idx = np.random.default_rng(seed).integers(0, reps, size=(bootstrap, reps))
        theta = {n: c[cols].to_numpy(dtype=float) for n, c in by_n.items()}
        ratio_boot, mine = {}, []
        for n, c in sorted(by_n.items()):
            pred_var = float(c.pred_var.iloc[0])
            var = n * float(_robust_trace_vars(theta[n])) / pred_var
            ratio_boot[n] = n * _robust_trace_vars(theta[n][idx]) / pred_var
            covered = c[[f"covered_{k}" for k in range(d)]].to_numpy(dtype=float)
            win, win_lo, win_hi = _t_interval(c.win_fixed.to_numpy(dtype=float))
            to_oracle = np.linalg.norm(_row_quantiles(theta[n][idx] - oracle, 0.5), axis=-1) / np.linalg.norm(oracle)
            regret = c.objective_oracle.to_numpy(dtype=float) - c.objective_true.to_numpy(dtype=float)
            mine.append({
                "scenario": scenario, "case": case, "n": n, "reps": len(c), "failed": int((~c.converged).sum()),
                "median_error": float(np.linalg.norm(_row_quantiles(theta[n] - limit, 0.5)) / np.linalg.norm(limit)),
                "limit_to_oracle": float(np.linalg.norm(limit - oracle) / np.linalg.norm(oracle)),
                "oracle_error": float(np.linalg.norm(_row_quantiles(theta[n] - oracle, 0.5)) / np.linalg.norm(oracle)),
                **dict(zip(("oracle_error_low", "oracle_error_high"), _interval(to_oracle))),
                "var": n * float(_robust_trace_vars(theta[n])), "pred_var": pred_var, "var_ratio": var,
                **dict(zip(("var_ratio_low", "var_ratio_high"), _interval(ratio_boot[n]))),
                "coverage": float(_nanmean(covered)),
                **dict(zip(("coverage_low", "coverage_high"), _interval(_boot_mean(covered, idx)))),
                "win_fixed": win, "win_fixed_low": win_lo, "win_fixed_high": win_hi,
                "win_fixed_expected": float(c.win_fixed_expected.iloc[0]), "win_limit": float(c.win_limit.iloc[0]),
                "win_estimate": float(_nanmean(c.win_estimate.to_numpy(dtype=float))),
                "win_true": float(_nanmean(c.win_true.to_numpy(dtype=float))),
                "objective_true": float(_nanmean(c.objective_true.to_numpy(dtype=float))),
                "objective_limit": float(c.objective_limit.iloc[0]),
                "objective_oracle": float(c.objective_oracle.iloc[0]),
                "regret": float(_nanmean(regret)),
                **dict(zip(("regret_low", "regret_high"), _interval(_boot_mean(regret, idx)))),
            })
        rows += mine
        summary = pd.DataFrame(mine).set_index("n")
        last = summary.iloc[-1]
        n_max = int(summary.index[-1])
        ns_all = np.array(sorted(by_n))
        ns = np.array([n for n in ns_all if by_n[n].converged.mean() >= _EXISTS] or [n_max])
        where = _span(ns) + (f", where >= {_EXISTS:.0%} of the fits converge" if ns.size < ns_all.size else "")
        tag, est = _CASE_TEXT[case], f"drpo_{case}"
        wrong = all(CASES[case])
        point, lo, hi = _median_error_limit(theta, {n: limit for n in ns}, ns, idx)
        nlo, nhi = _norm_range(lo, hi, float(np.linalg.norm(limit)))
        scale = float(np.linalg.norm(oracle))
        olo, ohi = _norm_range(lo + limit - oracle, hi + limit - oracle, scale)
        far = float(np.linalg.norm(point + limit - oracle) / scale)
        if wrong:
            about = (f"theta_lim is {last.limit_to_oracle:.3g} (relative) from the oracle; measured {far:.3g} "
                     f"({olo:.3g}-{ohi:.3g}), true objective {last.objective_limit:.4g} against the oracle's "
                     f"{last.objective_oracle:.4g}")
        else:
            about = (f"theta_lim is the oracle's (relative distance {last.limit_to_oracle:.1g}): double robustness; "
                     f"true objective of the fits {last.objective_true:.4g} against the oracle's "
                     f"{last.objective_oracle:.4g}")
        claims.append(_claim("7_drpo_consistent", scenario, est, n_max, 0.0, float(np.linalg.norm(point)
                                                                                    / np.linalg.norm(limit)), nlo, nhi,
                             f"relative median error ||med theta_hat - theta_lim|| / ||theta_lim|| of DRPO with {tag} "
                             f"under {scenario} ({where}; {about})"))
        boot = np.stack([ratio_boot[n] for n in ns], axis=1)
        boot = boot[np.isfinite(boot).all(axis=1)]
        vlo, vhi = _interval(_extrapolate(ns, boot[..., None])[:, 0])
        measured = float(_extrapolate(ns, summary.var_ratio.loc[ns].to_numpy()[:, None])[0])
        claims.append(_claim("7_drpo_variance", scenario, est, n_max, 1.0, measured, vlo, vhi,
                             f"n Var of DRPO with {tag} over tr(A^-1 B A^-1) under {scenario}, interquartile scale "
                             f"({where}; ratio at n = {n_max}: {last.var_ratio:.3g})"))
        claims.append(_claim("7_drpo_coverage", scenario, est, n_max, 0.95, last.coverage, last.coverage_low,
                             last.coverage_high, f"95% sandwich CI coverage of theta_lim by DRPO with {tag} under "
                             f"{scenario}, n = {n_max}"))
        truth = (f"pi_lim's true win rate {last.win_limit:.4g}: " + ("biased" if wrong else "unbiased")
                 + f"; at the fits: estimate {last.win_estimate:.4g}, truth {last.win_true:.4g}")
        claims.append(_claim("7_drpo_win_rate", scenario, est, n_max, last.win_fixed_expected, last.win_fixed,
                             last.win_fixed_low, last.win_fixed_high,
                             f"mean DR estimate of the win rate of the fixed policy pi_lim over pi_ref, DRPO with {tag} "
                             f"under {scenario}, n = {n_max} ({truth})"))
    return pd.DataFrame(rows), claims


def _verdict(predicted: float, low: float, high: float) -> str:
    if not all(map(math.isfinite, (predicted, low, high))):
        return "n/a"
    return "pass" if low <= predicted <= high else "fail"


def _second(pred: pd.Series | dict, key: str) -> float:
    """A second-order term of the predictions (NaN where not predicted, or in a folder written before)."""
    value = pred.get(key, math.nan)
    return float(value) if value is not None else math.nan


def _predicted_var(pred: pd.Series, n: int, robust: bool) -> dict[str, Any]:
    """``pred_var`` at ``n``: ``tr cov + tr C / n`` (second order, ``pred_order`` 2) where ``C`` is predicted
    and the cell is on the sample scale, else the limit ``tr cov`` (``pred_var_limit``); ``pred_var_se`` its
    Monte Carlo error (the two terms' errors added: they share the prompt batches)."""
    limit, second = float(pred["pred_trace"]), _second(pred, "pred_second")
    if robust or not math.isfinite(second):
        return {"pred_var": limit, "pred_var_limit": limit, "pred_var_se": float(pred["pred_trace_se"]),
                "pred_order": 1}
    se = _finite_or_zero(pred["pred_trace_se"]) + _finite_or_zero(_second(pred, "pred_second_se")) / n
    return {"pred_var": limit + second / n, "pred_var_limit": limit, "pred_var_se": se, "pred_order": 2}


def _add_ratios(cells: pd.DataFrame, spread: _Spreads, preds: pd.DataFrame) -> None:
    """Paired variance ratio of every estimator against the MLE of its (scenario, n), both on the cell's
    scale, against ``pred_ratio_n``: the ratio of the second-order variances at ``n`` where both are
    predicted (``pred_order`` 2), else the limit ``pred_ratio``."""
    mle_name = _mle_name(preds)
    out = {k: [] for k in ("ratio", "ratio_low", "ratio_high", "pred_ratio", "pred_ratio_n", "ratio_check")}
    keys = set(zip(cells.scenario, cells.n, cells.estimator))
    for row in cells.itertuples():
        base = (row.scenario, row.n, mle_name)
        p = preds.loc[(row.scenario, row.n, row.estimator)]
        pred = p["pred_ratio"]
        mle_second = _second(p, "mle_second")
        pred_n = pred
        if row.pred_order == 2 and math.isfinite(mle_second):
            pred_n = row.pred_var / (p["mle_trace"] + mle_second / row.n)
        if mle_name is None or base not in keys:
            for k, v in zip(out, (math.nan, math.nan, math.nan, pred, pred_n, "n/a")):
                out[k].append(v)
            continue
        robust = row.scale == "interquartile"
        own, own_boot = spread((row.scenario, row.n, row.estimator), robust)
        ref, ref_boot = spread(base, robust)
        lo, hi = _interval(own_boot / ref_boot)
        out["ratio"].append(own / ref)
        out["ratio_low"].append(lo)
        out["ratio_high"].append(hi)
        out["pred_ratio"].append(pred)
        out["pred_ratio_n"].append(pred_n)
        # the MLE against itself is 1 by construction: nothing to check
        out["ratio_check"].append("n/a" if row.estimator == mle_name else _verdict(pred_n, lo, hi))
    for k, v in out.items():
        cells[k] = v


def _mle_name(preds: pd.DataFrame) -> str | None:
    names = {e for _, _, e in preds.index}
    return "mle" if "mle" in names else None


def _slopes(cells: pd.DataFrame, spread: _Spreads) -> pd.DataFrame:
    """Least-squares slope of ``log MSE`` on ``log n`` (on each cell's scale) with a bootstrap CI over the
    paired resamples, over the ``n`` at which at least 99% of the estimates exist (below that the
    surviving estimates are a conditioned sample; n/a when fewer than two such ``n`` remain)."""
    rows = []
    for (scenario, est), g in cells.groupby(["scenario", "estimator"], sort=False):
        if g.n.nunique() < 2:
            continue
        ns = np.sort(g[1.0 - g.failed / g.reps >= _EXISTS].n.unique())
        if ns.size < 2:
            rows.append({"scenario": scenario, "estimator": est, "n_min": math.nan, "n_max": math.nan,
                         "scale": g.scale.iloc[0], "slope": math.nan, "slope_low": math.nan,
                         "slope_high": math.nan, "slope_check": "n/a"})
            continue
        robust = g.scale.iloc[0] == "interquartile"
        stats = [spread.mse((scenario, n, est), robust) for n in ns]
        x = np.log(ns) - np.log(ns).mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.log(np.array([p for p, _ in stats]) / ns)
            boot = np.log(np.stack([b for _, b in stats], axis=1) / ns)  # (B, n values)
        slope = lambda v: (v - v.mean(-1, keepdims=True)) @ x / (x @ x)  # noqa: E731
        point = float(slope(y))
        boot = slope(boot)
        lo, hi = np.percentile(boot[np.isfinite(boot)], [2.5, 97.5])
        rows.append({"scenario": scenario, "estimator": est, "n_min": int(ns[0]), "n_max": int(ns[-1]),
                     "scale": g.scale.iloc[0], "slope": point, "slope_low": float(lo), "slope_high": float(hi),
                     "slope_check": "pass" if lo <= -1 <= hi else "fail"})
    columns = ["scenario", "estimator", "n_min", "n_max", "scale", "slope", "slope_low", "slope_high", "slope_check"]
    return pd.DataFrame(rows, columns=columns).astype({"n_min": "Int64", "n_max": "Int64"})


# --- named claims -------------------------------------------------------------------------------

def _claim(name: str, scenario: str, estimator: str, n: int, predicted: float, measured: float, low: float,
           high: float, text: str, confirmed: bool | None = None) -> dict[str, Any]:
    if confirmed is None:
        confirmed = low <= predicted <= high
    verdict = "confirmed" if confirmed else "refuted"
    if not all(map(math.isfinite, (measured, low, high))):  # no estimate to measure (e.g. every replication separable)
        verdict = "inconclusive"
    return {"name": name, "scenario": scenario, "estimator": estimator, "n": int(n), "predicted": float(predicted),
            "measured": float(measured), "ci_low": float(low), "ci_high": float(high), "verdict": verdict,
            "text": f"{text}: predicted {predicted:.3g}, measured {measured:.3g} (95% CI {low:.3g}-{high:.3g}): {verdict}"}


def _make_inconclusive(claim: dict[str, Any], why: str) -> None:
    """Turn a ``_claim`` record's verdict into ``inconclusive``, saying ``why`` before it in the text."""
    claim["verdict"] = "inconclusive"
    claim["text"] = f"{claim['text'].rsplit(': ', 1)[0]}, {why}: inconclusive"


def _claims(cells: pd.DataFrame, by_cell: dict, spread: _Spreads, idx: np.ndarray,
            preds: pd.DataFrame) -> list[dict[str, Any]]:
    claims: list[dict[str, Any]] = []
    mle = _mle_name(preds)
    if mle is None:
        return claims
    n_max = int(cells.n.max())
    meta = results_meta(by_cell)
    last = cells[cells.n == n_max].set_index(["scenario", "estimator"])
    for (scenario, est), row in last.iterrows():
        info = meta[(scenario, est)]
        if est == mle or not math.isfinite(row.pred_ratio):
            continue
        tag = f"{est} ({info['method']}, M = {info['M']}, g_hat {info['aux']})"
        if info["method"] in ("vrpo", "vrpo_tuned") and info["aux"] in ("oracle", "noisy_oracle"):
            point, lo, hi, span = _extrapolated_ratio(cells, spread, scenario, est, mle)
            where = f"{span}; at n = {n_max}: {row.ratio:.3g}"
            if info["method"] == "vrpo_tuned":
                claims.append(_claim("3_tuned_never_worse", scenario, est, n_max, 1.0, point, lo, hi,
                                     f"variance of {tag} over the MLE under {scenario} is at most 1 ({where})",
                                     confirmed=lo <= 1.0))
            elif scenario == "bt" or row.pred_ratio > 0.995:
                claims.append(_claim("1_bt_no_gain" if scenario == "bt" else "2_gain_grows_with_M", scenario, est,
                                     n_max, row.pred_ratio, point, lo, hi,
                                     f"variance of {tag} over the MLE under {scenario} ({where})"))
            else:
                claims.append(_claim("2_gain_grows_with_M", scenario, est, n_max, row.pred_ratio, point, lo, hi,
                                     f"variance reduction of {tag} over the MLE under {scenario} ({where})"))
        elif _bad_ghat(info):
            claims += _bad_ghat_claims(cells, by_cell, spread, idx, preds, scenario, est, mle, tag)
        elif info["method"] == "vrpo_tuned":
            point, lo, hi, span = _extrapolated_ratio(cells, spread, scenario, est, mle)
            claims.append(_claim("3_tuned_never_worse", scenario, est, n_max, 1.0, point, lo, hi,
                                 f"variance of {tag} over the MLE under {scenario} is at most 1 "
                                 f"({span}; at n = {n_max}: {row.ratio:.3g})", confirmed=lo <= 1.0))
    claims += _regret_claims(cells, by_cell, idx, mle, n_max, meta)
    claims += _coverage_claims(cells)
    return sorted(claims, key=lambda c: (c["name"], c["scenario"], c["estimator"]))


def _extrapolate(ns: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The intercept ``y_inf`` of the least-squares fit ``y(n) = y_inf + c / n`` over ``ns`` (k,), for
    ``values`` (..., k, m) (the value at ``ns[0]`` when k = 1)."""
    if ns.size == 1:
        return values[..., 0, :]
    weights = np.linalg.pinv(np.stack([np.ones(ns.size), 1.0 / ns], axis=1))[0]
    return np.einsum("k,...km->...m", weights, values)


def _span(ns: np.ndarray) -> str:
    return f"n = {ns[0]}" if ns.size == 1 else f"extrapolated to n -> inf from n = {ns[0]}..{ns[-1]}"


def _extrapolated_ratio(cells: pd.DataFrame, spread: _Spreads, scenario: str, est: str,
                        mle: str) -> tuple[float, float, float, str]:
    """The variance ratio as ``n -> infinity``: least squares of ``r(n) = r_inf + c / n`` over the
    studied ``n`` (the O(1/n) finite-sample excess removed), with a bootstrap interval; with one ``n``,
    that ``n``'s ratio."""
    ns = np.sort(cells[cells.scenario == scenario].n.unique())
    point = np.array([cells[(cells.scenario == scenario) & (cells.n == n) & (cells.estimator == est)].ratio.iloc[0]
                      for n in ns])
    boot = np.stack([spread((scenario, n, est))[1] / spread((scenario, n, mle))[1] for n in ns], axis=1)
    ok = np.isfinite(boot).all(axis=1)
    limit = _extrapolate(ns, boot[ok][..., None])[:, 0]
    lo, hi = _interval(limit)
    return float(_extrapolate(ns, point[:, None])[0]), float(lo), float(hi), _span(ns)


def results_meta(by_cell: dict) -> dict[tuple[str, str], dict[str, str]]:
    out = {}
    for (scenario, _, est), g in by_cell.items():
        first = g.iloc[0]
        out[(scenario, est)] = {"method": first["method"], "M": first["M"], "aux": first["aux"]}
    return out


def _bad_ghat_claims(cells: pd.DataFrame, by_cell: dict, spread: _Spreads, idx: np.ndarray, preds: pd.DataFrame,
                     scenario: str, est: str, mle: str, tag: str) -> list[dict[str, Any]]:
    """Claim 3 for a bad ``g_hat``, on the limit distribution (module docstring): the median error is
    zero (every coordinate's bootstrap interval, Bonferroni over coordinates, contains zero; reported as
    ``||median error|| / ||theta_dagger||`` with the range of norms over the box of those intervals),
    and the interquartile-scale variance ratio to the MLE is the predicted one; both extrapolated to
    ``n -> infinity`` over the ``n`` at which at least 99% of the estimates exist (the largest ``n``
    when none does)."""
    ns_all = np.sort(cells[cells.scenario == scenario].n.unique())
    exists = {n: 1.0 - by_cell[(scenario, n, est)]["separable"].mean() for n in ns_all}
    ns = np.array([n for n in ns_all if exists[n] >= _EXISTS] or [ns_all[-1]])
    n_max = int(ns_all[-1])
    cols = _cell_columns(preds, (scenario, n_max, est))
    theta = {n: by_cell[(scenario, n, est)][cols].to_numpy() for n in ns}
    target = {n: np.asarray(preds.loc[(scenario, n, est), "theta_dagger"], dtype=float) for n in ns}
    scale = float(np.linalg.norm(target[ns[-1]]))
    where = _span(ns) + (f", where >= {_EXISTS:.0%} of the estimates exist" if ns.size < ns_all.size else "")
    if exists[ns[-1]] < _EXISTS:
        where += f"; they exist in only {exists[ns[-1]]:.0%} of replications"
    last = cells[(cells.scenario == scenario) & (cells.n == n_max) & (cells.estimator == est)].iloc[0]
    point, lo, hi = _median_error_limit(theta, target, ns, idx)
    nlo, nhi = _norm_range(lo, hi, scale)
    bias = _claim("3_bad_ghat_consistent", scenario, est, n_max, 0.0, float(np.linalg.norm(point) / scale), nlo, nhi,
                  f"relative median error ||med theta_hat - theta_dagger|| / ||theta_dagger|| of {tag} under "
                  f"{scenario} ({where}; interval from {100 - 5 / len(cols):.4g}% intervals per coordinate)")
    # the interquartile-scale variance ratio to the MLE (paired resamples)
    own = [spread((scenario, n, est), robust=True) for n in ns]
    ref = [spread((scenario, n, mle), robust=True) for n in ns]
    ratio = np.array([[a[0] / b[0]] for a, b in zip(own, ref)])
    boot = np.stack([a[1] / b[1] for a, b in zip(own, ref)], axis=1)
    boot = boot[np.isfinite(boot).all(axis=1)]
    lo, hi = _interval(_extrapolate(ns, boot[..., None])[:, 0])
    sample = spread((scenario, n_max, est))[0] / spread((scenario, n_max, mle))[0]
    variance = _claim("3_bad_ghat_variance", scenario, est, n_max, float(last.pred_ratio),
                      float(_extrapolate(ns, ratio)[0]), float(lo), float(hi),
                      f"variance of {tag} over the MLE under {scenario}, interquartile scale ({where}; "
                      f"sample-variance ratio at n = {n_max}: {sample:.3g})")
    return [bias, variance]


def _median_error_limit(theta: dict, target: dict, ns: np.ndarray, idx: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per coordinate, the median of ``theta[n] - target[n]`` (rows: replications) extrapolated to ``n -> inf``
    over ``ns`` (``y(n) = y_inf + c / n``), with its simultaneous 95% bootstrap interval (resamples ``idx``,
    Bonferroni over coordinates): ``(point, low, high)``."""
    err = np.stack([_row_quantiles(theta[n] - target[n], 0.5) for n in ns])[None]
    boot = np.stack([_row_quantiles(theta[n][idx] - target[n], 0.5) for n in ns], axis=1)
    point, limit = _extrapolate(ns, err)[0], _extrapolate(ns, boot)
    alpha = 0.05 / point.size
    lo, hi = np.nanpercentile(limit, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return point, lo, hi


def _norm_range(low: np.ndarray, high: np.ndarray, scale: float) -> tuple[float, float]:
    """The norms over the box ``[low, high]`` of simultaneous intervals, over ``scale``: from its point nearest to
    zero (zero when the box holds zero) to its farthest corner."""
    nearest = np.linalg.norm(np.clip(0.0, low, high)) / scale
    farthest = np.linalg.norm(np.maximum(np.abs(low), np.abs(high))) / scale
    return float(nearest), float(farthest)


def _regret_claims(cells: pd.DataFrame, by_cell: dict, idx: np.ndarray, mle: str, n: int,
                   meta: dict) -> list[dict[str, Any]]:
    """Excess regret over the limit regret(theta_dagger), estimator over MLE, measured against the
    plug-in prediction (greedy and KL policies), for oracle VRPO with the most reference pairs. Left
    out where the MLE's excess regret is not measurably positive (its ratio is then undefined)."""
    out = []
    last = cells[cells.n == n]
    for scenario, group in last.groupby("scenario", sort=False):
        cands = [e for e in group.estimator if meta[(scenario, e)]["method"] == "vrpo"
                 and meta[(scenario, e)]["aux"] == "oracle"]
        if not cands or scenario == "bt":
            continue
        best = min(cands, key=lambda e: group.set_index("estimator").loc[e, "pred_ratio"])
        row = group.set_index("estimator").loc[best]
        base = group.set_index("estimator").loc[mle]
        for kind in ("greedy", "kl"):
            limit = row[f"limit_regret_{kind}"]
            pred = (row[f"pred_regret_{kind}"] - limit) / (base[f"pred_regret_{kind}"] - limit)
            a = by_cell[(scenario, n, best)][f"regret_{kind}"].to_numpy() - limit
            b = by_cell[(scenario, n, mle)][f"regret_{kind}"].to_numpy() - limit
            base_boot = np.array([_nanmean(b[i]) for i in idx])
            if not np.percentile(base_boot, 2.5) > 0:  # the MLE's excess is not measurably positive
                continue
            boot = np.array([_nanmean(a[i]) / _nanmean(b[i]) for i in idx])
            boot = boot[np.isfinite(boot)]
            lo, hi = np.percentile(boot, [2.5, 97.5]) if boot.size else (math.nan, math.nan)
            measured = float(_nanmean(a) / _nanmean(b))
            # the predicted ratio's own Monte Carlo error (delta method, the two predictions' errors taken as
            # independent, which overstates it: they share their draws)
            pred_se = math.hypot(row[f"pred_regret_{kind}_se"], pred * base[f"pred_regret_{kind}_se"]) / abs(
                base[f"pred_regret_{kind}"] - limit)
            lo, hi = _widened(lo, hi, measured, _Z * pred_se)
            out.append(_claim("4_regret_follows_variance", scenario, best, n, pred, measured, lo, hi,
                              f"excess {kind} regret of {best} over the MLE under {scenario}, n = {n} (interval "
                              "widened by the prediction's error)"))
    return out


def _coverage_claims(cells: pd.DataFrame) -> list[dict[str, Any]]:
    """Coverage at the largest n, and the smallest n from which every larger n covers."""
    out = []
    for (scenario, est), g in cells.groupby(["scenario", "estimator"], sort=False):
        g = g.sort_values("n")
        ok = (g.coverage_low <= 0.95) & (0.95 <= g.coverage_high)
        tail = ok.to_numpy()[::-1].cumprod()[::-1].astype(bool)
        since = int(g.n.to_numpy()[tail.argmax()]) if tail.any() else None
        last = g.iloc[-1]
        when = f"from n = {since}" if since is not None else "at no n studied"
        out.append(_claim("5_coverage", scenario, est, int(last.n), 0.95, last.coverage, last.coverage_low,
                          last.coverage_high, f"95% sandwich CI coverage of {est} under {scenario} ({when})"))
    return out
