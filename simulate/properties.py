r"""Property checks for pairwise-preference estimators and objectives: the property-testing kit.

The fit signature
-----------------
An **estimator** is any callable ``fit_fn(data: PairData) -> result`` (``theory.data.PairData``: the
labelled pairs ``dphi``, ``z``, the auxiliary probabilities ``g`` and the reference pairs
``dphi_ref``, ``g_ref``, all with a leading replication axis ``R``). The result is either

- an array ``theta`` of shape ``(R, d)``, one estimate per replication (``(d,)`` when ``R = 1``), or
- an object with an attribute ``theta`` of those shapes and, optionally, ``cov`` of shape
  ``(R, d, d)`` (``(d, d)`` when ``R = 1``): the estimated covariance of ``theta_hat`` itself, of
  order ``1/n`` (``theory.fitting.FitResult`` is one).

The kit calls ``fit_fn`` once with all ``R`` replications; an estimator that returns a single ``(d,)``
vector for ``R > 1``, or that raises on the batch, is called once per replication instead. A row
of NaN means "no estimate" (say, separable data); an exception on one replication is recorded as
such. An **objective** is a callable ``objective_fn(data: PairData, theta: torch.Tensor) ->
torch.Tensor`` giving, for ``theta`` of shape ``(R, d)``, the training objective of each replication
``(R,)`` at the margins ``theta . dphi`` (``theory.losses.vr_objective`` is the model);
``estimator_from_objective`` turns a smooth one into an estimator.

The checks
----------
Every check returns a ``PropertyResult``: a verdict (``pass``, ``fail`` or ``skip``), the null
hypothesis, the probability of ``fail`` when the null holds (``error_rate``), the decisive statistic
and threshold, the evidence and, on failure, a counterexample with the code that rebuilds it. Every
check is deterministic under its ``seed``.

Exact properties, searched with hypothesis (the search follows the active hypothesis profile, with
the example database off; a failure is a shrunk counterexample, the error rate is 0 up to the
numerical tolerance ``rtol``):

- ``check_swap_invariance``: presenting any pair as ``(b, a)`` with the label ``1 - Z`` (and
  ``g -> 1 - g``; reference pairs with ``g_ref -> 1 - g_ref``) leaves ``theta_hat`` unchanged;
- ``check_reorder_invariance``: permuting labelled rows (with their reference pairs' prompt ids),
  permuting reference pairs and renaming unlabelled prompts leaves ``theta_hat`` unchanged;
- ``check_equivariance``: under ``phi -> A phi`` (``dphi -> A dphi``) the estimate maps to
  ``A^-T theta_hat`` and the covariance to ``A^-T cov A^-1``, for ``A`` in a family of maps
  (``strategies.feature_maps``);
- ``check_objective_invariance``: the same three, for an objective's value at a fixed ``theta``.

Monte Carlo properties, on a ``Design`` (scenario, sample sizes, replications, reference design,
``g_hat``); the population target ``theta_dagger`` is exact over response pairs and averaged over
``design.population`` prompts, whose Monte Carlo error enters every test:

- ``check_consistency``: ``theta_hat -> theta_dagger`` at rate ``n^-1/2``. Null: at the largest
  ``n`` every coordinate's bias is at most ``bias_margin`` (0.25) standard deviations, and
  ``n E||theta_hat - theta_dagger||^2`` grows by at most ``growth_margin`` (25%) from the smallest
  to the largest ``n``. Two one-sided normal tests (Bonferroni over coordinates), ``alpha/2`` each;
- ``check_variance``: ``tr Cov(theta_hat) <= (1 + tolerance) tr Cov(theta_MLE)`` on the same data
  (paired). One-sided normal test of the log ratio (delta method), level ``alpha``;
- ``check_coverage``: the nominal ``level`` intervals ``theta_hat_j +- z sqrt(cov_jj)`` cover
  ``theta_dagger_j`` with probability at least ``level - tolerance``. Exact binomial test per
  coordinate, Bonferroni, level ``alpha``;
- ``check_control_variate`` (objective level): for any fixed ``g`` the objective's expectation does
  not depend on ``g``, ``E L(theta; g) = E L(theta; g_0)``: the control variate has mean zero.
  Paired two-sided normal tests over ``reps`` data sets, Bonferroni over ``g`` and ``theta``.

``check_estimator`` and ``check_objective`` run the whole battery; ``BatteryResult`` prints a
report. The ``check_estimator`` pytest fixture (``simulate.pytest_plugin``) and ``robust-rlhf check
module:function`` wrap them. Needs ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from random import Random
from typing import Any

import numpy as np
import torch
from scipy import stats

from robust_rlhf.theory.data import PairData
from robust_rlhf.theory.errors import InputError

from .scenario import Scenario, SpecError

__all__ = [
    "PROPERTIES",
    "OBJECTIVE_PROPERTIES",
    "BatteryResult",
    "Design",
    "Estimate",
    "EstimatorError",
    "MonteCarloRun",
    "ObjectiveFit",
    "PropertyResult",
    "check_consistency",
    "check_control_variate",
    "check_coverage",
    "check_equivariance",
    "check_estimator",
    "check_objective",
    "check_objective_invariance",
    "check_reorder_invariance",
    "check_swap_invariance",
    "check_variance",
    "estimate",
    "estimator_from_objective",
    "fitting_estimator",
    "fitting_objective",
    "map_features",
    "reorder_rows",
    "simulate_estimates",
    "swap_pairs",
]

FitFn = Callable[[PairData], Any]
ObjectiveFn = Callable[[PairData, torch.Tensor], torch.Tensor]

PROPERTIES = ("swap_invariance", "reorder_invariance", "equivariance", "consistency", "variance", "coverage")
OBJECTIVE_PROPERTIES = ("control_variate", "swap_invariance", "reorder_invariance", "equivariance")
TRANSFORMS = ("swap", "reorder", "equivariance")

_POPULATION_SEED = 20_250_707
_DT = torch.float64


class EstimatorError(InputError):
    """The callable under test broke the fit signature (wrong output type or shape)."""


# --- results -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PropertyResult:
    """The outcome of one property check (see the module docstring).

    ``verdict``: ``pass``, ``fail`` or ``skip``; ``error_rate``: the probability of ``fail`` when the
    null hypothesis holds (0 for exact properties, up to their tolerance); ``statistic`` and
    ``threshold``: the decisive test (``fail`` when ``statistic > threshold``); ``summary``: one line;
    ``counterexample``: what broke the property, with code to rebuild it (None unless ``fail``).
    """

    name: str
    verdict: str
    null_hypothesis: str
    error_rate: float
    statistic: float
    threshold: float
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    counterexample: str | None = None
    seed: int = 0

    @property
    def passed(self) -> bool:
        """Not failed (a skipped check passes)."""
        return self.verdict != "fail"

    def report(self) -> str:
        """A readable multi-line report."""
        lines = [f"{self.verdict.upper():<4} {self.name}: {self.summary}",
                 f"     null hypothesis: {self.null_hypothesis}",
                 f"     error rate (false alarm under the null): {self.error_rate:g}; seed {self.seed}"]
        if self.verdict != "skip":
            lines.append(f"     statistic {self.statistic:.4g} vs threshold {self.threshold:.4g}")
        if self.counterexample:
            lines.append("     counterexample:")
            lines += [f"       {line}" for line in self.counterexample.splitlines()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


@dataclass(frozen=True)
class BatteryResult:
    """The results of a battery of checks on one estimator or objective."""

    subject: str
    results: tuple[PropertyResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> tuple[PropertyResult, ...]:
        return tuple(r for r in self.results if r.verdict == "fail")

    @property
    def error_rate(self) -> float:
        """Bound on the probability that some check fails when every null holds (Bonferroni)."""
        return min(1.0, sum(r.error_rate for r in self.results if r.verdict != "skip"))

    def __getitem__(self, name: str) -> PropertyResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def report(self) -> str:
        counts = {v: sum(r.verdict == v for r in self.results) for v in ("pass", "fail", "skip")}
        head = (f"property battery for {self.subject}: {counts['pass']} passed, {counts['fail']} failed, "
                f"{counts['skip']} skipped (false-alarm bound {self.error_rate:.1%})")
        return "\n".join([head, *(r.report() for r in self.results)])

    def __str__(self) -> str:
        return self.report()


# --- calling an estimator ----------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """What an estimator returned, normalised: ``theta`` (R, d) and ``cov`` (R, d, d) or None."""

    theta: np.ndarray
    cov: np.ndarray | None = None


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


_RETURN_HINT = ("return theta as an array ((R, d), or (d,) for one replication), or an object with attributes "
                ".theta and .cov (cov optional)")


def _as_array(value: Any, what: str, fn: Any) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EstimatorError(f"{_name(fn)} returned a {what} that is not an array of numbers ({exc}); "
                             f"{_RETURN_HINT}") from None


def _normalise(out: Any, reps: int, d: int, fn: Any) -> Estimate | None:
    """``Estimate`` from an estimator's output; None when it returned one (d,) vector for R > 1."""
    if out is None or isinstance(out, Mapping):
        raise EstimatorError(f"{_name(fn)} returned {'None' if out is None else 'a ' + type(out).__name__}; "
                             f"{_RETURN_HINT}")
    has_theta = hasattr(out, "theta")
    theta = _as_array(out.theta if has_theta else out, "theta", fn)
    cov = getattr(out, "cov", None) if has_theta else None
    if theta.shape == (d,):
        if reps > 1:
            return None
        theta = theta[None]
    elif theta.shape != (reps, d):
        raise EstimatorError(f"{_name(fn)} returned theta of shape {theta.shape}; the fit signature needs "
                             f"({reps}, {d}) (replications x features) or ({d},) for one replication")
    if cov is not None:
        cov = _as_array(cov, "cov", fn)
        if cov.shape == (d, d) and reps == 1:
            cov = cov[None]
        elif cov.shape != (reps, d, d):
            raise EstimatorError(f"{_name(fn)} returned cov of shape {cov.shape}; expected ({reps}, {d}, {d})")
    return Estimate(theta=theta, cov=cov)


@dataclass(frozen=True)
class _Outcome:
    """An estimate, or the exception the estimator raised; with the warnings it emitted."""

    estimate: Estimate | None
    error: str | None
    warnings: tuple[str, ...] = ()


def _call(fn: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None, tuple[str, ...]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, err = fn(*args), None
        except EstimatorError:
            raise
        except Exception as exc:  # the estimator under test may fail in any way: that is evidence
            out, err = None, exc
    return out, err, tuple(str(w.message) for w in caught)


def _attempt(fit_fn: FitFn, data: PairData) -> _Outcome:
    """Call ``fit_fn`` on a one-replication data set, recording an exception instead of raising."""
    out, err, warned = _call(fit_fn, data)
    if err is not None:
        return _Outcome(None, f"{type(err).__name__}: {err}", warned)
    est = _normalise(out, data.reps, data.d, fit_fn)
    if est is None:
        raise EstimatorError(f"{_name(fit_fn)} returned a ({data.d},) vector for a data set of {data.reps} "
                             "replications")
    return _Outcome(est, None, warned)


def estimate(fit_fn: FitFn, data: PairData) -> Estimate:
    """``fit_fn(data)`` normalised to ``Estimate`` (theta (R, d), cov (R, d, d) or None).

    Batched first; replication by replication when the estimator returns one vector for ``R > 1``
    or raises on the batch. A replication that raises gets a NaN row (and NaN covariance).
    """
    est, _, _ = _estimate_all(fit_fn, data)
    return est


def _estimate_all(fit_fn: FitFn, data: PairData) -> tuple[Estimate, list[str], list[str]]:
    R, d = data.reps, data.d
    out, err, warned = _call(fit_fn, data)
    if err is None:
        est = _normalise(out, R, d, fit_fn)
        if est is not None:
            return est, [], list(warned)
    if R == 1:
        return Estimate(np.full((1, d), np.nan)), [f"{type(err).__name__}: {err}"], list(warned)
    theta = np.full((R, d), np.nan)
    covs: list[np.ndarray | None] = []
    errors: list[str] = []
    warned_all: list[str] = []
    for r in range(R):
        one = _attempt(fit_fn, data.replication(r))
        warned_all += one.warnings
        if one.error is not None:
            errors.append(f"replication {r}: {one.error}")
            covs.append(None)
            continue
        theta[r] = one.estimate.theta[0]
        covs.append(None if one.estimate.cov is None else one.estimate.cov[0])
    cov = None
    if any(c is not None for c in covs):
        cov = np.stack([np.full((d, d), np.nan) if c is None else c for c in covs])
    return Estimate(theta, cov), errors, warned_all


# --- transformations of a data set --------------------------------------------------------------

def swap_pairs(data: PairData, labelled: Sequence[int] | str = "all", reference: Sequence[int] | str = "all") -> PairData:
    """Present the chosen pairs the other way round: ``dphi -> -dphi``, ``z -> 1 - z``, ``g -> 1 - g``
    (labelled rows ``labelled``), ``dphi_ref -> -dphi_ref``, ``g_ref -> 1 - g_ref`` (reference pairs
    ``reference``); ``"all"`` swaps every one."""
    if data.features is not None or data.features_ref is not None:
        raise InputError("swap_pairs: the data carry pair features for a learner, whose layout under a swap is "
                         "unknown; drop them (features=None)")
    lab = np.zeros(data.n, dtype=bool)
    lab[slice(None) if labelled == "all" else list(labelled)] = True
    sign = np.where(lab, -1.0, 1.0)
    out = replace(data, dphi=data.dphi * sign[None, :, None], z=np.where(lab, 1.0 - data.z, data.z),
                  g=None if data.g is None else np.where(lab, 1.0 - data.g, data.g))
    if data.dphi_ref is None:
        return out
    ref = np.zeros(data.n_ref, dtype=bool)
    ref[slice(None) if reference == "all" else list(reference)] = True
    rsign = np.where(ref, -1.0, 1.0)
    return replace(out, dphi_ref=data.dphi_ref * rsign[None, :, None],
                   g_ref=None if data.g_ref is None else np.where(ref, 1.0 - data.g_ref, data.g_ref))


def reorder_rows(data: PairData, rows: Sequence[int], reference: Sequence[int] | None = None,
                 prompts: Sequence[int] | None = None) -> PairData:
    """Labelled row ``i`` of the result is row ``rows[i]`` of ``data``; reference pair ``k`` is pair
    ``reference[k]``; the ``k``-th distinct unlabelled prompt id (ids ``>= n``, in increasing order)
    becomes ``n + prompts[k]``. Prompt ids of reference pairs follow their labelled rows."""
    n = data.n
    rows = np.asarray(rows, dtype=np.int64)
    if sorted(rows.tolist()) != list(range(n)):
        raise InputError(f"reorder_rows: rows must be a permutation of range({n})")
    out = replace(data, dphi=data.dphi[:, rows], z=data.z[:, rows], g=None if data.g is None else data.g[:, rows],
                  features=None if data.features is None else data.features[:, rows])
    if data.dphi_ref is None:
        return out
    N = data.n_ref
    q = np.arange(N) if reference is None else np.asarray(reference, dtype=np.int64)
    if sorted(q.tolist()) != list(range(N)):
        raise InputError(f"reorder_rows: reference must be a permutation of range({N})")
    old = data.ref_row[q]
    new = old.copy()
    on_row = (old >= 0) & (old < n)
    new[on_row] = np.argsort(rows)[old[on_row]]
    ids = np.unique(old[old >= n])
    u = np.arange(ids.size) if prompts is None else np.asarray(prompts, dtype=np.int64)
    if sorted(u.tolist()) != list(range(ids.size)):
        raise InputError(f"reorder_rows: prompts must be a permutation of range({ids.size})")
    if ids.size:
        new[old >= n] = n + u[np.searchsorted(ids, old[old >= n])]
    return replace(out, dphi_ref=data.dphi_ref[:, q], g_ref=None if data.g_ref is None else data.g_ref[:, q],
                   ref_weight=data.ref_weight[:, q],
                   ref_row=new, features_ref=None if data.features_ref is None else data.features_ref[:, q])


def map_features(data: PairData, A: np.ndarray) -> PairData:
    """The features mapped by ``phi -> A phi``: ``dphi -> A dphi`` for labelled and reference pairs
    (pair features for a learner, if any, are left as they are)."""
    A = np.asarray(A, dtype=np.float64)
    if A.shape != (data.d, data.d):
        raise InputError(f"map_features: A must be ({data.d}, {data.d}), got {A.shape}")
    return replace(data, dphi=data.dphi @ A.T, dphi_ref=None if data.dphi_ref is None else data.dphi_ref @ A.T)


# --- cases searched by hypothesis ----------------------------------------------------------------

def _order(size: int, spec: Any) -> np.ndarray:
    """A permutation of ``range(size)`` from a readable spec: identity, reversed or ('shuffle', seed)."""
    if spec == "identity":
        return np.arange(size)
    if spec == "reversed":
        return np.arange(size)[::-1].copy()
    return np.random.default_rng(spec[1]).permutation(size)


@dataclass(frozen=True)
class _Case:
    """A data case and a transformation of it (and, for objectives, the point ``theta``)."""

    data: Any  # strategies.DataCase
    transform: str
    detail: Any
    theta: tuple[float, ...] | None = None

    def apply(self, pairs: PairData) -> PairData:
        if self.transform == "swap":
            lab, ref = self.detail
            return swap_pairs(pairs, lab, ref)
        if self.transform == "reorder":
            rows, ref, prompts = self.detail
            n_prompts = np.unique(pairs.ref_row[pairs.ref_row >= pairs.n]).size if pairs.dphi_ref is not None else 0
            return reorder_rows(pairs, _order(pairs.n, rows), _order(pairs.n_ref, ref) if pairs.dphi_ref is not None
                                else None, _order(n_prompts, prompts))
        return map_features(pairs, np.asarray(self.detail))

    def describe(self) -> str:
        if self.transform == "swap":
            lab, ref = self.detail
            what = f"swap labelled pairs {lab if lab == 'all' else list(lab)} and reference pairs " \
                   f"{ref if ref == 'all' else list(ref)}"
        elif self.transform == "reorder":
            what = "reorder labelled rows ({}), reference pairs ({}), unlabelled prompt ids ({})".format(*self.detail)
        else:
            what = f"map phi -> A phi with A = {np.array2string(np.asarray(self.detail), precision=4, separator=', ')}"
        lines = [f"data: {self.data!r}", f"transformation: {what}"]
        if self.theta is not None:
            lines.append(f"theta: {list(self.theta)}")
        lines.append(f"rebuild: data = {self.data.code()}")
        return "\n".join(lines)


class _StopSearch(BaseException):
    """Raised inside a hypothesis search to end it once its shrinking budget is spent (hypothesis lets a
    ``BaseException`` that is not an ``Exception`` through; the best counterexample so far is kept)."""


def _case_strategy(transform: str, cases: Any, maps: str, with_theta: bool, budget: dict | None = None) -> Any:
    from hypothesis import strategies as st

    from .strategies import feature_maps

    order = st.one_of(st.just("reversed"), st.integers(0, 2**16).map(lambda s: ("shuffle", s)))
    subset = lambda size: st.one_of(  # noqa: E731
        st.just("all"), st.sets(st.integers(0, size - 1), min_size=1, max_size=min(size, 12)).map(sorted).map(tuple))
    nice = st.sampled_from([1.0, -1.0, 0.5, 2.0, -2.0, 0.0, 5.0])

    @st.composite
    def build(draw: Any) -> _Case:
        if budget is not None:
            budget["draws"] += 1
            if budget["first"] is not None and budget["draws"] - budget["first_draw"] > 20 * budget["limit"] + 20:
                raise _StopSearch  # shrinking keeps drawing cases that its filter rejects: stop
        case = draw(cases)
        pairs = case.pair_data()
        if transform == "swap":
            lab = draw(subset(pairs.n))
            ref = draw(subset(pairs.n_ref)) if pairs.n_ref else "all"
            detail: Any = (lab, ref)
        elif transform == "reorder":
            detail = (draw(order), draw(order), draw(order))
        else:
            detail = draw(feature_maps(pairs.d, maps)).tolist()
        theta = tuple(draw(st.lists(nice, min_size=pairs.d, max_size=pairs.d))) if with_theta else None
        return _Case(case, transform, detail, theta)

    return build()


def _settings(max_examples: int | None, shrink: bool = True) -> Any:
    """The active hypothesis profile's settings, without the example database (so a seed fixes the
    search), with no deadline, if given ``max_examples`` examples, and without shrinking if not ``shrink``."""
    from hypothesis import Phase, settings

    base = settings.default
    phases = base.phases if shrink else tuple(p for p in base.phases if p not in (Phase.shrink, Phase.explain))
    return settings(base, database=None, deadline=None, phases=phases,
                    max_examples=base.max_examples if max_examples is None else int(max_examples))


def _budget(shrink_budget: int) -> dict:
    """Shared state of a search: evaluations and draws, and where the first counterexample was found."""
    return {"calls": 0, "draws": 0, "first": None, "first_draw": 0, "limit": shrink_budget, "best": None}


def _search(strategy: Any, violation: Callable[[_Case], str | None], seed: int, max_examples: int | None,
            shrink_budget: int, budget: dict | None = None) -> tuple[_Case | None, str | None, int]:
    """The minimal case for which ``violation`` returns a message (hypothesis ``find``, seeded).

    Cases are evaluated once (memoised by their readable description); once a violation is found,
    at most ``shrink_budget`` new cases are evaluated while shrinking it, after which unevaluated
    cases count as passing, so an expensive estimator cannot make the search run for long
    (``shrink_budget=0``: no shrinking at all, the first counterexample found is reported)."""
    from hypothesis import find
    from hypothesis.errors import NoSuchExample

    seen: dict[str, str | None] = {}
    state = _budget(shrink_budget) if budget is None else budget

    def condition(case: _Case) -> bool:
        key = case.describe()
        if key not in seen:
            if state["first"] is not None and state["calls"] - state["first"] >= shrink_budget:
                raise _StopSearch
            state["calls"] += 1
            seen[key] = violation(case)
            if seen[key] is not None:
                if state["first"] is None:
                    state["first"], state["first_draw"] = state["calls"], state["draws"]
                state["best"] = case  # the shrinker only tries cases simpler than its current best
        return seen[key] is not None

    try:
        found = find(strategy, condition, settings=_settings(max_examples, shrink_budget > 0), random=Random(seed))
    except NoSuchExample:
        return None, None, state["calls"]
    except _StopSearch:
        found = state["best"]
    return found, seen[found.describe()], state["calls"]


def _default_cases() -> Any:
    from .strategies import data_cases

    return data_cases()


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b| / max(|a|, |b|)`` over finite entries (0 when both are zero)."""
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    diff = float(np.max(np.abs(a - b), initial=0.0))
    return 0.0 if diff == 0.0 else diff / max(scale, 1e-300)


def _no_estimate(outcome: _Outcome) -> bool:
    """The estimator raised, or returned no finite estimate."""
    return outcome.error is not None or not np.isfinite(outcome.estimate.theta).any()


def _compare(a: _Outcome, b: _Outcome, A_inv: np.ndarray | None, rtol: float, rtol_cov: float) -> str | None:
    """Why outcome ``b`` (transformed data) is not outcome ``a`` mapped by ``theta -> theta A^-1``."""
    if a.error or b.error:
        if a.error and b.error and a.error.split(":")[0] == b.error.split(":")[0]:
            return None
        return f"original: {a.error or 'an estimate'}; transformed: {b.error or 'an estimate'}"
    ta, tb = a.estimate.theta, b.estimate.theta
    expect = ta if A_inv is None else ta @ A_inv
    fa, fb = np.isfinite(expect).all(axis=1), np.isfinite(tb).all(axis=1)
    if not np.array_equal(fa, fb):
        return f"an estimate exists on one data set only: original {ta.tolist()}, transformed {tb.tolist()}"
    rel = _relative(expect[fa], tb[fb])
    if rel > rtol:
        return (f"theta_hat changed (relative difference {rel:.3g} > rtol {rtol:g}): expected "
                f"{np.round(expect, 6).tolist()}, got {np.round(tb, 6).tolist()}")
    ca, cb = a.estimate.cov, b.estimate.cov
    if (ca is None) != (cb is None):
        return "a covariance is returned on one data set only"
    if ca is not None:
        ce = ca if A_inv is None else A_inv.T @ ca @ A_inv
        fe, fc = np.isfinite(ce).all(axis=(1, 2)), np.isfinite(cb).all(axis=(1, 2))
        if not np.array_equal(fe, fc):
            return "a finite covariance is returned on one data set only"
        ok = fe & fc
        rel = _relative(ce[ok], cb[ok])
        if rel > rtol_cov:
            return (f"cov changed (relative difference {rel:.3g} > {rtol_cov:g}): expected diagonal "
                    f"{np.round(np.diagonal(ce, axis1=1, axis2=2), 8).tolist()}, got "
                    f"{np.round(np.diagonal(cb, axis1=1, axis2=2), 8).tolist()}")
    return None


_INVARIANCE_NULLS = {
    "swap": "theta_hat (and cov) do not change when any labelled or reference pair is presented the other way "
            "round with its label and g_hat flipped",
    "reorder": "theta_hat (and cov) do not change when labelled rows, reference pairs and unlabelled prompt ids "
               "are permuted",
    "equivariance": "under phi -> A phi (A in the family '{maps}') theta_hat maps to A^-T theta_hat and cov to "
                    "A^-T cov A^-1",
}
_PROPERTY_OF = {"swap": "swap_invariance", "reorder": "reorder_invariance", "equivariance": "equivariance"}


def _invariance(fit_fn: FitFn, transform: str, *, cases: Any, maps: str, seed: int, max_examples: int | None,
                rtol: float, rtol_cov: float, shrink_budget: int) -> PropertyResult:
    from hypothesis.errors import Unsatisfiable

    cases = _default_cases() if cases is None else cases
    budget = _budget(shrink_budget)
    strategy = _case_strategy(transform, cases, maps, with_theta=False, budget=budget)

    seen = {"calls": 0, "vacuous": 0, "error": None}

    def violation(case: _Case) -> str | None:
        pairs = case.data.pair_data()
        A_inv = None if transform != "equivariance" else np.linalg.inv(np.asarray(case.detail))
        first = _attempt(fit_fn, pairs)
        why = _compare(first, _attempt(fit_fn, case.apply(pairs)), A_inv, rtol, rtol_cov)
        seen["calls"] += 1
        if why is None and _no_estimate(first):  # nothing was compared: both raised or neither estimated
            seen["vacuous"] += 1
            seen["error"] = seen["error"] or first.error or "non-finite estimates"
        if why is not None:  # before blaming the transform: is the estimator a function of its data?
            drift = _compare(first, _attempt(fit_fn, pairs), None, rtol, rtol_cov)
            if drift is not None:
                return f"the estimator is not deterministic: two calls on the same data differ ({drift})"
        return why

    null = _INVARIANCE_NULLS[transform].format(maps=maps)
    name = _PROPERTY_OF[transform]
    try:
        found, message, calls = _search(strategy, violation, seed, max_examples, shrink_budget, budget)
    except Unsatisfiable as exc:
        return PropertyResult(name, "skip", null, 0.0, math.nan, rtol, f"no valid example could be drawn ({exc})",
                              seed=seed)
    evidence = {"examples": calls, "rtol": rtol, "rtol_cov": rtol_cov, "without_estimate": seen["vacuous"],
                "evaluated": seen["calls"]}
    if found is None and seen["calls"] and seen["vacuous"] == seen["calls"]:
        return PropertyResult(name, "skip", null, 0.0, math.nan, rtol, f"nothing compared: the estimator gave no "
                              f"estimate on any of {calls} examples ({seen['error']})", evidence, seed=seed)
    if found is None:
        unused = (f"; no estimate on {seen['vacuous']} of {seen['calls']} data sets, e.g. {seen['error']}"
                  if seen["vacuous"] else "")
        return PropertyResult(name, "pass", null, 0.0, 0.0, rtol, f"no counterexample in {calls} examples{unused}",
                              evidence, seed=seed)
    return PropertyResult(name, "fail", null, 0.0, math.inf, rtol, message, evidence,
                          counterexample=f"{found.describe()}\nviolation: {message}", seed=seed)


def check_swap_invariance(fit_fn: FitFn, *, cases: Any = None, seed: int = 0, max_examples: int | None = None,
                          rtol: float = 1e-5, rtol_cov: float = 1e-4,
                          shrink_budget: int = 200) -> PropertyResult:
    """Invariance of ``theta_hat`` and ``cov`` under presenting pairs the other way round (see module doc).

    ``cases``: a strategy of ``strategies.DataCase`` (default ``data_cases()``); ``max_examples``:
    default the active hypothesis profile's; ``shrink_budget``: estimator calls allowed (per data
    set pair) while shrinking a counterexample."""
    return _invariance(fit_fn, "swap", cases=cases, maps="", seed=seed, max_examples=max_examples, rtol=rtol,
                       rtol_cov=rtol_cov, shrink_budget=shrink_budget)


def check_reorder_invariance(fit_fn: FitFn, *, cases: Any = None, seed: int = 0, max_examples: int | None = None,
                             rtol: float = 1e-5, rtol_cov: float = 1e-4,
                             shrink_budget: int = 200) -> PropertyResult:
    """Invariance under permuting labelled rows, reference pairs and unlabelled prompt ids."""
    return _invariance(fit_fn, "reorder", cases=cases, maps="", seed=seed, max_examples=max_examples, rtol=rtol,
                       rtol_cov=rtol_cov, shrink_budget=shrink_budget)


def check_equivariance(fit_fn: FitFn, *, maps: str = "invertible", cases: Any = None, seed: int = 0,
                       max_examples: int | None = None, rtol: float = 1e-5, rtol_cov: float = 1e-4,
                       shrink_budget: int = 200) -> PropertyResult:
    """``theta_hat -> A^-T theta_hat`` and ``cov -> A^-T cov A^-1`` under ``phi -> A phi``, for ``A`` in
    the family ``maps`` of ``strategies.feature_maps`` (``invertible``, ``similarity``, ``orthogonal``,
    ``diagonal``)."""
    from .strategies import MAP_FAMILIES

    if maps not in MAP_FAMILIES:
        raise InputError(f"maps: unknown family {maps!r}; allowed: {', '.join(MAP_FAMILIES)}")
    return _invariance(fit_fn, "equivariance", cases=cases, maps=maps, seed=seed, max_examples=max_examples,
                       rtol=rtol, rtol_cov=rtol_cov, shrink_budget=shrink_budget)


# --- Monte Carlo design ------------------------------------------------------------------------

@dataclass(frozen=True)
class Design:
    """Where the Monte Carlo checks simulate (``simulate.sample`` arguments).

    ``scenario``: a registered name or a spec; ``n``: sample sizes (consistency compares the
    smallest and largest; variance and coverage use the largest); ``reps``: replications per size;
    ``M``: reference pairs per prompt or ``"exact"``; ``unlabelled``: extra prompts as a multiple of
    ``n``; ``aux``: the fixed auxiliary model; ``seed``: the data seed (data sets are nested across
    ``n``); ``population``: prompts behind the target ``theta_dagger``.
    """

    scenario: str | Mapping[str, Any] = "near_deterministic"
    n: tuple[int, ...] = (500, 2000)
    reps: int = 100
    M: int | str = 8
    unlabelled: float = 0.0
    aux: str | Mapping[str, Any] = "oracle"
    seed: int = 0
    population: int = 20_000

    def __post_init__(self) -> None:
        ns = (self.n,) if isinstance(self.n, (int, np.integer)) else tuple(self.n)
        if not ns or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2 for v in ns):
            raise SpecError(f"design field 'n' = {self.n!r} must list integers >= 2")
        object.__setattr__(self, "n", tuple(sorted({int(v) for v in ns})))
        if isinstance(self.reps, bool) or not isinstance(self.reps, (int, np.integer)) or self.reps < 10:
            raise SpecError(f"design field 'reps' = {self.reps!r} must be an integer >= 10")
        if not (isinstance(self.unlabelled, (int, float)) and math.isfinite(self.unlabelled) and self.unlabelled >= 0):
            raise SpecError(f"design field 'unlabelled' = {self.unlabelled!r} must be a number >= 0 (a multiple of n)")
        if isinstance(self.population, bool) or not isinstance(self.population, (int, np.integer)) \
                or self.population < 100:
            raise SpecError(f"design field 'population' = {self.population!r} must be an integer >= 100")
        self.build_scenario()  # validates the scenario

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> str:
        """Canonical JSON of the design (cache key)."""
        scen = self.scenario if isinstance(self.scenario, str) else dict(self.scenario)
        aux = self.aux if isinstance(self.aux, str) else dict(self.aux)
        return json.dumps([scen, self.n, self.reps, self.M, self.unlabelled, aux, self.seed, self.population],
                          sort_keys=True, default=str)

    def build_scenario(self) -> Scenario:
        from .registry import get_scenario

        return get_scenario(self.scenario) if isinstance(self.scenario, str) else Scenario.from_spec(dict(self.scenario))

    def _unlabelled(self, n: int) -> int:
        return int(round(self.unlabelled * n))

    def data(self, n: int) -> PairData:
        """The ``reps`` replications at sample size ``n`` (cached)."""
        key = (self.key(), n)
        if key not in _DATA:
            from .dataset import sample

            _remember(_DATA, key, sample(self.build_scenario(), n, self.seed, self.reps, M=self.M,
                                         unlabelled=self._unlabelled(n), aux=self._aux()).to_pair_data(), 4)
        return _DATA[key]

    def _aux(self) -> Any:
        return self.aux if isinstance(self.aux, str) else dict(self.aux)

    def code(self, n: int) -> str:
        """Python that rebuilds ``data(n)``."""
        scen = (f"get_scenario({self.scenario!r})" if isinstance(self.scenario, str)
                else f"Scenario.from_spec({json.dumps(dict(self.scenario))})")
        extra = f", unlabelled={self._unlabelled(n)}" if self.unlabelled else ""
        return (f"sample({scen}, n={n}, seed={self.seed}, reps={self.reps}, M={self.M!r}{extra}, "
                f"aux={self._aux()!r}).to_pair_data()  # from robust_rlhf.simulate import *")

    @classmethod
    def full(cls, **overrides: Any) -> "Design":
        """The long version (nightly, ``-m slow``): three sample sizes up to 8000, 400 replications."""
        return cls(**{"n": (500, 2000, 8000), "reps": 400, "population": 100_000, **overrides})


_DATA: OrderedDict = OrderedDict()
_TARGETS: OrderedDict = OrderedDict()
_BASELINES: OrderedDict = OrderedDict()


def _remember(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def _target(design: Design, target: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """``(theta_dagger, its Monte Carlo standard error, description)`` for the design's scenario."""
    from robust_rlhf.theory.asymptotics import Target, population_target
    from robust_rlhf.theory.losses import MarginLoss

    scenario = design.build_scenario()
    if target is None or isinstance(target, (str, MarginLoss)):
        if isinstance(target, str) and target == "theta_star":
            return scenario.theta_star.copy(), np.zeros(scenario.d), "theta* (the true reward vector)"
        loss = "logistic" if target is None else target
        key = (json.dumps(scenario.spec, sort_keys=True), design.population, repr(loss))
        if key not in _TARGETS:
            pop = scenario.population(size=design.population, seed=_POPULATION_SEED)
            _remember(_TARGETS, key, population_target(pop, loss), 8)
        t = _TARGETS[key]
        return t.theta, t.se, f"population target of the {t.loss} loss over {design.population} prompts"
    value = target(scenario) if callable(target) else target
    if isinstance(value, Target):
        return value.theta, value.se, "given target"
    theta = np.asarray(value, dtype=np.float64)
    if theta.shape != (scenario.d,) or not np.isfinite(theta).all():
        raise InputError(f"target: expected a finite vector of {scenario.d} numbers, got shape {theta.shape}")
    return theta, np.zeros(scenario.d), "given target"


@dataclass(frozen=True)
class MonteCarloRun:
    """An estimator's estimates on every sample size of a design (``simulate_estimates``)."""

    design: Design
    subject: str
    estimates: tuple[Estimate, ...]
    errors: tuple[tuple[str, ...], ...]
    warnings: tuple[int, ...]

    def at(self, n: int) -> Estimate:
        return self.estimates[self.design.n.index(n)]


def simulate_estimates(fit_fn: FitFn, design: Design | None = None) -> MonteCarloRun:
    """Fit ``fit_fn`` on ``design.data(n)`` for every sample size (the shared input of the Monte Carlo checks)."""
    design = Design() if design is None else design
    ests, errs, warned = [], [], []
    for n in design.n:
        est, e, w = _estimate_all(fit_fn, design.data(n))
        ests.append(est)
        errs.append(tuple(e))
        warned.append(len(w))
    return MonteCarloRun(design, _name(fit_fn), tuple(ests), tuple(errs), tuple(warned))


def _run(fit_fn: FitFn | None, design: Design | None, run: MonteCarloRun | None) -> MonteCarloRun:
    if run is not None:
        return run
    if fit_fn is None:
        raise InputError("give an estimator fit_fn or a MonteCarloRun")
    return simulate_estimates(fit_fn, design)


def _missing(run: MonteCarloRun, n: int, max_failed: float) -> str | None:
    theta = run.at(n).theta
    bad = int((~np.isfinite(theta).all(axis=1)).sum())
    if bad > max_failed * theta.shape[0]:
        errs = run.errors[run.design.n.index(n)]
        why = f"; first error: {errs[0]}" if errs else " (non-finite estimates)"
        return f"no estimate in {bad} of {theta.shape[0]} replications at n = {n}{why}"
    return None


def _log_ratio(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``log(mean a / mean b)`` and its delta-method standard error from paired draws ``(a_r, b_r)``:
    ``var = [var(a)/abar^2 + var(b)/bbar^2 - 2 cov(a, b)/(abar bbar)] / R``."""
    R = a.size
    ma, mb = a.mean(), b.mean()
    cov = np.cov(np.stack([a, b]), ddof=1)
    var = (cov[0, 0] / ma**2 + cov[1, 1] / mb**2 - 2.0 * cov[0, 1] / (ma * mb)) / R
    return float(np.log(ma / mb)), float(math.sqrt(max(var, 0.0)))


def check_consistency(fit_fn: FitFn | None = None, design: Design | None = None, *, run: MonteCarloRun | None = None,
                      target: Any = None, alpha: float = 0.01, bias_margin: float = 0.25,
                      growth_margin: float = 0.25, max_failed: float = 0.02) -> PropertyResult:
    r"""``theta_hat -> theta_dagger`` at rate ``n^-1/2`` (module docstring).

    Bias part, at the largest ``n`` with ``R`` replications, coordinate ``j``: mean error ``m_j``,
    standard deviation ``s_j``, target error ``se_j``;
    ``t_j = (|m_j| - kappa s_j) / sqrt(s_j^2/R + kappa^2 s_j^2/(2(R-1)) + se_j^2)`` against
    ``z_{1 - alpha/(2d)}`` (``kappa = bias_margin``; ``s_j`` has variance ``s_j^2/(2(R-1))``).
    Rate part: ``rho = n_K MSE(n_K) / (n_1 MSE(n_1))`` on paired replications, rejected when
    ``(log rho - log(1 + growth_margin)) / se > z_{1 - alpha/2}``. ``target``: None (the logistic
    population target), a loss, ``"theta_star"``, an array or a callable of the scenario. The
    result's ``statistic`` is the larger of the two tests' statistic minus its critical value
    (``threshold`` 0); both tests are in ``evidence``.
    """
    run = _run(fit_fn, design, run)
    design = run.design
    null = (f"sqrt(n)-consistent for theta_dagger: at n = {design.n[-1]} every bias is at most {bias_margin} standard "
            f"deviations, and n * MSE grows by at most {growth_margin:.0%} from n = {design.n[0]} to {design.n[-1]}")
    if len(design.n) < 2:
        return PropertyResult("consistency", "skip", null, 0.0, math.nan, math.nan,
                              "needs at least two sample sizes in the design", seed=design.seed)
    for n in design.n:
        why = _missing(run, n, max_failed)
        if why:
            return PropertyResult("consistency", "fail", null, alpha, math.inf, 0.0, why,
                                  counterexample=f"data: {design.code(n)}", seed=design.seed)
    theta_t, se_t, how = _target(design, target)
    d = theta_t.size
    nK, n1 = design.n[-1], design.n[0]
    eK = run.at(nK).theta - theta_t
    e1 = run.at(n1).theta - theta_t
    okK = np.isfinite(eK).all(axis=1)
    R = int(okK.sum())
    m, s = eK[okK].mean(axis=0), eK[okK].std(axis=0, ddof=1)
    sd = np.sqrt(s**2 / R + bias_margin**2 * s**2 / (2 * (R - 1)) + se_t**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_bias = np.where(sd > 0, (np.abs(m) - bias_margin * s) / sd, np.where(np.abs(m) > 0, np.inf, 0.0))
    z_bias = float(stats.norm.ppf(1 - alpha / (2 * d)))
    ok = okK & np.isfinite(e1).all(axis=1)
    a, b = nK * (eK[ok] ** 2).sum(axis=1), n1 * (e1[ok] ** 2).sum(axis=1)
    log_rho, se_rho = _log_ratio(a, b)
    allowed = math.log1p(growth_margin)
    t_rate = (log_rho - allowed) / se_rho if se_rho > 0 else (0.0 if log_rho <= allowed else math.inf)
    z_rate = float(stats.norm.ppf(1 - alpha / 2))
    j = int(np.argmax(t_bias))
    evidence = {
        "target": theta_t.tolist(), "target_se": se_t.tolist(), "target_source": how, "n": list(design.n),
        "replications": R, "bias": m.tolist(), "sd": s.tolist(), "bias_in_sd": (m / np.where(s > 0, s, 1.0)).tolist(),
        "bias_statistic": t_bias.tolist(), "bias_threshold": z_bias,
        "n_mse": {int(n1): float(b.mean()), int(nK): float(a.mean())}, "growth": math.exp(log_rho),
        "growth_se_log": se_rho, "rate_statistic": t_rate, "rate_threshold": z_rate,
        # the target's own Monte Carlo error inflates n MSE by about n * sum(se^2)
        "target_error_share": float(nK * (se_t**2).sum() / max(a.mean(), 1e-300)),
    }
    bias_fail, rate_fail = bool(t_bias[j] > z_bias), bool(t_rate > z_rate)
    summary = (f"bias at n = {nK}: max {abs(m[j]) / max(s[j], 1e-300):.3f} sd (coordinate {j}); n * MSE "
               f"{b.mean():.4g} at n = {n1} -> {a.mean():.4g} at n = {nK} (x{math.exp(log_rho):.3f})")
    if not (bias_fail or rate_fail):
        return PropertyResult("consistency", "pass", null, alpha, max(t_bias[j] - z_bias, t_rate - z_rate), 0.0,
                              summary, evidence, seed=design.seed)
    lines = []
    if bias_fail:
        lines.append(f"coordinate {j}: mean error {m[j]:+.4g} (sd {s[j]:.4g}, {R} replications) against theta_dagger "
                     f"{theta_t[j]:.4g} +- {se_t[j]:.2g}: {abs(m[j]) / s[j]:.3f} sd, statistic {t_bias[j]:.3f} > "
                     f"{z_bias:.3f}")
    if rate_fail:
        lines.append(f"n * MSE grows x{math.exp(log_rho):.3f} from n = {n1} to {nK} (allowed x{1 + growth_margin}), "
                     f"statistic {t_rate:.3f} > {z_rate:.3f}")
    lines.append(f"data: {design.code(nK)}")
    return PropertyResult("consistency", "fail", null, alpha, max(t_bias[j] - z_bias, t_rate - z_rate), 0.0,
                          summary, evidence, counterexample="\n".join(lines), seed=design.seed)


def _baseline(design: Design, n: int, baseline: FitFn | None) -> Estimate:
    if baseline is not None:
        return _estimate_all(baseline, design.data(n))[0]
    key = (design.key(), n)
    if key not in _BASELINES:
        _remember(_BASELINES, key, _estimate_all(fitting_estimator("mle"), design.data(n))[0], 8)
    return _BASELINES[key]


def check_variance(fit_fn: FitFn | None = None, design: Design | None = None, *, run: MonteCarloRun | None = None,
                   baseline: FitFn | None = None, alpha: float = 0.01, tolerance: float = 1e-3,
                   max_failed: float = 0.02) -> PropertyResult:
    r"""``tr Cov(theta_hat) <= (1 + tolerance) tr Cov(theta_baseline)`` at the largest ``n`` (one-sided).

    The default ``tolerance`` of 0.1% treats the baseline's own estimate, reached by another optimiser, as
    equal: paired over the same data sets, an optimiser's precision (1e-7 here) is otherwise a significant
    excess.

    Paired over replications: ``a_r = ||theta_hat_r - mean||^2``, ``b_r`` likewise for the baseline
    (default: the logistic MLE of ``theory.fitting``), ``log V = log(abar / bbar)`` with the
    delta-method standard error of ``_log_ratio``; fail when
    ``(log V - log(1 + tolerance)) / se > z_{1 - alpha}``.
    """
    run = _run(fit_fn, design, run)
    design = run.design
    n = design.n[-1]
    base_name = "the logistic MLE" if baseline is None else _name(baseline)
    null = f"tr Cov(theta_hat) <= {1 + tolerance:g} x tr Cov of {base_name} at n = {n} (same data sets)"
    why = _missing(run, n, max_failed)
    if why:
        return PropertyResult("variance", "fail", null, alpha, math.inf, 0.0, why,
                              counterexample=f"data: {design.code(n)}", seed=design.seed)
    est, base = run.at(n).theta, _baseline(design, n, baseline).theta
    ok = np.isfinite(est).all(axis=1) & np.isfinite(base).all(axis=1)
    a = ((est[ok] - est[ok].mean(axis=0)) ** 2).sum(axis=1)
    b = ((base[ok] - base[ok].mean(axis=0)) ** 2).sum(axis=1)
    if b.mean() <= 0:
        return PropertyResult("variance", "skip", null, 0.0, math.nan, math.nan, "the baseline does not vary",
                              seed=design.seed)
    if a.mean() <= 0:
        log_v, se = -math.inf, 0.0
    else:
        log_v, se = _log_ratio(a, b)
    allowed = math.log1p(tolerance)
    t = (log_v - allowed) / se if se > 0 else (0.0 if log_v <= allowed else math.inf)
    z = float(stats.norm.ppf(1 - alpha))
    ratio = math.exp(log_v)
    lo, hi = math.exp(log_v - z * se), math.exp(log_v + z * se)
    evidence = {"n": n, "replications": int(ok.sum()), "ratio": ratio, "ratio_se_log": se,
                "ratio_interval": [lo, hi], "trace": float(a.mean() * ok.sum() / (ok.sum() - 1)),
                "baseline_trace": float(b.mean() * ok.sum() / (ok.sum() - 1))}
    digits = 4 if hi - lo > 1e-3 else 7  # enough to tell the ratio from 1
    summary = (f"variance ratio to {base_name} at n = {n}: {ratio:.{digits}f} ({1 - 2 * alpha:.0%} interval "
               f"{lo:.{digits}f}-{hi:.{digits}f}; allowed up to {1 + tolerance:g})")
    if t <= z:
        return PropertyResult("variance", "pass", null, alpha, t, z, summary, evidence, seed=design.seed)
    ce = (f"tr Cov(theta_hat) = {evidence['trace']:.5g} against {evidence['baseline_trace']:.5g} for {base_name} over "
          f"{int(ok.sum())} paired replications: ratio {ratio:.4f}, statistic {t:.3f} > {z:.3f}\ndata: {design.code(n)}")
    return PropertyResult("variance", "fail", null, alpha, t, z, summary, evidence, counterexample=ce, seed=design.seed)


def check_coverage(fit_fn: FitFn | None = None, design: Design | None = None, *, run: MonteCarloRun | None = None,
                   target: Any = None, level: float = 0.95, tolerance: float = 0.05, alpha: float = 0.01,
                   max_failed: float = 0.02) -> PropertyResult:
    r"""Coverage of ``theta_hat_j +- z_{(1+level)/2} sqrt(cov_jj)`` for ``theta_dagger_j`` at the largest ``n``.

    Per coordinate, ``c_j`` of ``R_j`` intervals cover; fail when
    ``P(Binomial(R_j, level - tolerance) <= c_j) < alpha / d`` for some ``j`` (exact, one-sided).
    The result's ``statistic`` is ``-log10`` of the smallest p-value, its ``threshold``
    ``-log10(alpha / d)``. Skipped when the estimator returns no covariance.
    """
    run = _run(fit_fn, design, run)
    design = run.design
    n = design.n[-1]
    null = f"each nominal {level:.0%} interval covers theta_dagger with probability >= {level - tolerance:.2f} at n = {n}"
    est = run.at(n)
    if est.cov is None:
        return PropertyResult("coverage", "skip", null, 0.0, math.nan, math.nan, "the estimator returns no covariance",
                              seed=design.seed)
    why = _missing(run, n, max_failed)
    if why:
        return PropertyResult("coverage", "fail", null, alpha, math.inf, 0.0, why,
                              counterexample=f"data: {design.code(n)}", seed=design.seed)
    theta_t, se_t, how = _target(design, target)
    d = theta_t.size
    var = np.diagonal(est.cov, axis1=1, axis2=2)
    invalid = np.isfinite(est.theta).all(axis=1) & ~(np.isfinite(var) & (var >= 0)).all(axis=1)
    if invalid.sum() > max_failed * invalid.size:
        r = int(np.argmax(invalid))
        msg = (f"cov has NaN, infinite or negative variances in {int(invalid.sum())} of {invalid.size} replications "
               f"whose theta_hat exists (replication {r}: diagonal {var[r].tolist()})")
        return PropertyResult("coverage", "fail", null, alpha, math.inf, 0.0, msg,
                              counterexample=f"{msg}\ndata: {design.code(n)}", seed=design.seed)
    ok = np.isfinite(est.theta) & np.isfinite(var) & (var >= 0)
    half = float(stats.norm.ppf((1 + level) / 2)) * np.sqrt(np.where(ok, var, 0.0))
    covered = (np.abs(est.theta - theta_t) <= half) & ok
    counts, totals = covered.sum(axis=0), ok.sum(axis=0)
    pvals = np.array([stats.binom.cdf(c, t, level - tolerance) if t else 1.0 for c, t in zip(counts, totals)])
    j = int(np.argmin(pvals))
    rates = counts / np.maximum(totals, 1)
    evidence = {"n": n, "coverage": rates.tolist(), "covered": counts.tolist(), "intervals": totals.tolist(),
                "p_values": pvals.tolist(), "target": theta_t.tolist(), "target_se": se_t.tolist(),
                "target_source": how}
    summary = f"coverage at n = {n}: " + ", ".join(f"{r:.3f}" for r in rates) + f" (nominal {level})"
    # statistic and threshold on the -log10 p scale: fail when p < alpha/d
    stat, thr = -math.log10(max(pvals[j], 1e-300)), -math.log10(alpha / d)
    if pvals[j] >= alpha / d:
        return PropertyResult("coverage", "pass", null, alpha, stat, thr, summary, evidence, seed=design.seed)
    ce = (f"coordinate {j}: {counts[j]} of {totals[j]} intervals cover theta_dagger = {theta_t[j]:.4g} "
          f"(p = {pvals[j]:.2g} < {alpha / d:.2g}); mean half-width {half[:, j][ok[:, j]].mean():.4g}, sd of the "
          f"estimate {est.theta[ok[:, j], j].std(ddof=1):.4g}\ndata: {design.code(n)}")
    return PropertyResult("coverage", "fail", null, alpha, stat, thr, summary, evidence, counterexample=ce,
                          seed=design.seed)


# --- objectives --------------------------------------------------------------------------------

def _objective(objective_fn: ObjectiveFn, data: PairData, theta: np.ndarray) -> np.ndarray:
    th = torch.as_tensor(np.broadcast_to(theta, (data.reps, data.d)).copy(), dtype=_DT)
    with torch.no_grad():
        value = objective_fn(data, th)
    value = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if value.shape != (data.reps,):
        raise EstimatorError(f"{_name(objective_fn)} returned shape {value.shape}; an objective returns one value per "
                             f"replication, ({data.reps},)")
    return value


def check_control_variate(objective_fn: ObjectiveFn, *, scenario: str | Mapping[str, Any] = "near_deterministic",
                          n: int = 20, reps: int = 2000, M: int | str = 2,
                          aux: Sequence[str | Mapping[str, Any]] = ("oracle", "constant", "reversed", "random",
                                                                    {"kind": "noisy_oracle", "noise": 1.0},
                                                                    {"kind": "constant", "value": 0.9}),
                          thetas: np.ndarray | None = None, alpha: float = 0.01, seed: int = 0) -> PropertyResult:
    r"""For fixed ``g_a`` and ``theta``, ``E[L(theta; g_a) - L(theta; g_0)] = 0`` (``g_0 = aux[0]``).

    The same ``reps`` data sets (labelled and reference pairs) carry each fixed auxiliary model, so
    ``D_r = L(theta; g_a)_r - L(theta; g_0)_r`` is paired; ``t = mean D / (sd D / sqrt(reps))``
    against ``z_{1 - alpha/(2m)}`` over the ``m`` pairs ``(g_a, theta)``. Default ``thetas``:
    ``theta*``, ``theta*`` rotated, ``3 theta*`` and ``-theta*``. Skipped when ``L`` does not depend on ``g``.
    """
    from .dataset import sample
    from .registry import get_scenario

    from .auxiliary import AuxSpec

    if len(aux) < 2 or any(AuxSpec.parse(a).kind == "learned" for a in aux):
        raise InputError("aux: give at least two fixed auxiliary models (a learned g_hat depends on the labels, so "
                         "the control variate's zero mean does not apply to it)")
    scen = get_scenario(scenario) if isinstance(scenario, str) else Scenario.from_spec(dict(scenario))
    null = "for every fixed g_hat and theta, E L(theta; g_hat) is the same: the control variate has mean zero"
    base = sample(scen, n, seed, reps, M=M, aux=None)
    if thetas is None:
        t = scen.theta_star
        rot = np.roll(t, 1) * np.where(np.arange(t.size) % 2, -1.0, 1.0) if t.size > 1 else -0.5 * t
        thetas = np.stack([t, rot, 3.0 * t, -t])
    thetas = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
    values = []
    for a in aux:
        data = base.with_aux(a).to_pair_data()
        values.append([_objective(objective_fn, data, th) for th in thetas])
    m = (len(aux) - 1) * len(thetas)
    z = float(stats.norm.ppf(1 - alpha / (2 * m)))
    rows, worst = [], (0.0, None)
    depends = False
    for i, a in enumerate(aux[1:], start=1):
        for k, th in enumerate(thetas):
            D = values[i][k] - values[0][k]
            sd = float(D.std(ddof=1))
            depends |= bool(np.abs(D).max() > 1e-12 * max(1.0, float(np.abs(values[0][k]).max())))
            tstat = abs(float(D.mean())) / (sd / math.sqrt(reps)) if sd > 0 else (math.inf if D.mean() else 0.0)
            rows.append({"aux": a, "theta": th.tolist(), "mean": float(D.mean()), "se": sd / math.sqrt(reps),
                         "t": tstat})
            if tstat > worst[0] or worst[1] is None:
                worst = (tstat, rows[-1])
    evidence = {"comparisons": rows, "baseline_aux": aux[0], "reps": reps, "n": n, "M": M}
    if not depends:
        return PropertyResult("control_variate", "skip", null, 0.0, math.nan, z,
                              "the objective does not depend on g_hat (no control variate)", evidence, seed=seed)
    tmax, row = worst
    summary = (f"largest |mean difference| / se = {tmax:.3f} over {m} (g_hat, theta) pairs "
               f"(aux {row['aux']!r} against {aux[0]!r})")
    if tmax <= z:
        return PropertyResult("control_variate", "pass", null, alpha, tmax, z, summary, evidence, seed=seed)
    scen_code = (f"get_scenario({scenario!r})" if isinstance(scenario, str)
                 else f"Scenario.from_spec({json.dumps(dict(scenario))})")
    code = "\n".join(f"data: sample({scen_code}, n={n}, seed={seed}, reps={reps}, M={M!r}, aux={a!r}).to_pair_data()"
                     for a in (row["aux"], aux[0]))
    ce = (f"g_hat = {row['aux']!r} against g_hat = {aux[0]!r} at theta = {np.round(row['theta'], 4).tolist()}: "
          f"E[L(theta; g_hat) - L(theta; g_0)] estimated {row['mean']:+.5g} +- {row['se']:.2g} "
          f"(t = {tmax:.2f} > {z:.2f}) over {reps} data sets\n{code}")
    return PropertyResult("control_variate", "fail", null, alpha, tmax, z, summary, evidence, counterexample=ce,
                          seed=seed)


def check_objective_invariance(objective_fn: ObjectiveFn, transform: str = "swap", *, maps: str = "invertible",
                               cases: Any = None, seed: int = 0, max_examples: int | None = None,
                               rtol: float = 1e-9, shrink_budget: int = 200) -> PropertyResult:
    """The objective's value at ``theta`` is unchanged by a swap or a reordering of the data, and equal
    at ``A^-T theta`` on data mapped by ``phi -> A phi`` (``transform``: swap, reorder, equivariance)."""
    if transform not in TRANSFORMS:
        raise InputError(f"transform: unknown {transform!r}; allowed: {', '.join(TRANSFORMS)}")
    cases = _default_cases() if cases is None else cases
    budget = _budget(shrink_budget)
    strategy = _case_strategy(transform, cases, maps, with_theta=True, budget=budget)

    def violation(case: _Case) -> str | None:
        pairs = case.data.pair_data()
        theta = np.asarray(case.theta)
        moved = theta if transform != "equivariance" else theta @ np.linalg.inv(np.asarray(case.detail))
        a, b = _objective(objective_fn, pairs, theta), _objective(objective_fn, case.apply(pairs), moved)
        rel = _relative(a, b)
        if rel > rtol or np.isfinite(a).all() != np.isfinite(b).all():
            return f"objective {a.tolist()} on the original, {b.tolist()} on the transformed data (relative {rel:.3g})"
        return None

    null = {"swap": "the objective does not change when pairs are presented the other way round (labels and g flipped)",
            "reorder": "the objective does not change when rows, reference pairs and prompt ids are permuted",
            "equivariance": f"L(A^-T theta; data mapped by phi -> A phi) = L(theta; data) for A in '{maps}'"}[transform]
    name = _PROPERTY_OF[transform]
    found, message, calls = _search(strategy, violation, seed, max_examples, shrink_budget, budget)
    if found is None:
        return PropertyResult(name, "pass", null, 0.0, 0.0, rtol, f"no counterexample in {calls} examples",
                              {"examples": calls, "rtol": rtol}, seed=seed)
    return PropertyResult(name, "fail", null, 0.0, math.inf, rtol, message, {"examples": calls, "rtol": rtol},
                          counterexample=f"{found.describe()}\nviolation: {message}", seed=seed)


# --- estimators from objectives, and from theory.fitting ----------------------------------------

@dataclass(frozen=True)
class ObjectiveFit:
    """``estimator_from_objective``'s result: ``theta`` (R, d) (NaN where not converged)."""

    theta: np.ndarray
    converged: np.ndarray
    grad_norm: np.ndarray
    n_iter: int


def estimator_from_objective(objective_fn: ObjectiveFn, *, tol: float = 1e-9, max_iter: int = 100,
                             name: str | None = None) -> FitFn:
    r"""An estimator ``argmin_theta L(theta)`` for a smooth objective (batched damped Newton, float64).

    Gradient and Hessian by automatic differentiation of ``objective_fn`` (replications are
    independent, so the Hessian of ``sum_r L_r`` is block diagonal); a step ``-(H + mu I)^-1 g``
    with the smallest ``mu`` from ``0, 1e-8 s, 1e-7 s, ...`` (``s`` the mean ``|H_jj|``) that makes it
    positive definite, then Armijo backtracking. Stops when ``||g|| < tol``; replications that do
    not converge in ``max_iter`` steps, or whose objective is unbounded, get NaN.
    """
    def fit_fn(data: PairData) -> ObjectiveFit:
        R, d = data.reps, data.d
        theta = torch.zeros(R, d, dtype=_DT)

        def derivatives(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                th = th.detach().requires_grad_(True)
                value = objective_fn(data, th)
                (grad,) = torch.autograd.grad(value.sum(), th, create_graph=True)
                if not grad.requires_grad:
                    raise InputError(f"{_name(objective_fn)}: the objective is not twice differentiable in theta")
                rows = [torch.autograd.grad(grad[:, k].sum(), th, retain_graph=True)[0] for k in range(d)]
            return value.detach(), grad.detach(), torch.stack(rows, dim=1).detach()

        converged = torch.zeros(R, dtype=torch.bool)
        value, grad, hess = derivatives(theta)
        it = 0
        for it in range(1, max_iter + 1):
            converged = grad.norm(dim=1) < tol
            if converged.all() or not torch.isfinite(value).all():
                break
            eye = torch.eye(d, dtype=_DT)
            scale = hess.diagonal(0, -2, -1).abs().mean(-1).clamp_min(1e-12)
            step = -grad.clone()
            pending = ~converged
            for k in range(12):
                mu = torch.zeros_like(scale) if k == 0 else scale * 10.0 ** (k - 9)
                chol, info = torch.linalg.cholesky_ex(hess + mu[:, None, None] * eye)
                solved = pending & (info == 0)
                if solved.any():
                    step[solved] = -torch.cholesky_solve(grad[solved, :, None], chol[solved]).squeeze(-1)
                pending &= ~solved
                if not pending.any():
                    break
            step[converged] = 0.0
            slope = (grad * step).sum(1)
            t = torch.ones(R, dtype=_DT)
            accept = converged.clone()
            new = theta.clone()
            for _ in range(60):
                trial = theta + t[:, None] * step
                with torch.no_grad():
                    tv = objective_fn(data, trial)
                good = ~accept & (tv <= value + 1e-4 * t * slope + 1e-13 * value.abs().clamp_min(1.0))
                new[good] = trial[good]
                accept |= good
                if accept.all():
                    break
                t = torch.where(accept, t, 0.5 * t)
            stalled = ~accept
            theta = new
            value, grad, hess = derivatives(theta)
            if stalled.all():
                break
        gnorm = grad.norm(dim=1)
        converged = gnorm < tol
        out = theta.numpy().copy()
        out[~converged.numpy()] = np.nan
        return ObjectiveFit(theta=out, converged=converged.numpy(), grad_norm=gnorm.numpy(), n_iter=it)

    fit_fn.__qualname__ = fit_fn.__name__ = name or f"argmin[{_name(objective_fn)}]"
    return fit_fn


def fitting_objective(loss: Any = "logistic", lam: float = 1.0) -> ObjectiveFn:
    r"""``theory.losses.vr_objective`` as a kit objective: with margins ``u = theta . dphi``,
    ``(1/n) sum_i [m_Z(u_i) - lam m_g(u_i)] + lam sum_j v_j m_g(u_j)`` (the MLE's without ``g``)."""
    from robust_rlhf.theory.losses import get_loss, vr_objective

    lossf = get_loss(loss)

    def objective(data: PairData, theta: torch.Tensor) -> torch.Tensor:
        t = lambda a: None if a is None else torch.as_tensor(a, dtype=theta.dtype)  # noqa: E731
        u = torch.einsum("rnd,rd->rn", t(data.dphi), theta)
        if data.g is None or data.dphi_ref is None:
            return vr_objective(lossf, u, t(data.z))
        u_ref = torch.einsum("rnd,rd->rn", t(data.dphi_ref), theta)
        return vr_objective(lossf, u, t(data.z), t(data.g), u_ref, t(data.g_ref), lam, ref_weight=t(data.ref_weight))

    objective.__qualname__ = objective.__name__ = f"vr_objective[{lossf.name}, lam={lam:g}]"
    return objective


def fitting_estimator(method: str = "mle", loss: str = "logistic", **kwargs: Any) -> FitFn:
    """``theory.fitting.fit(data, method, loss, on_separable="warn", **kwargs)`` as a kit estimator
    (separable replications give NaN rows with a warning instead of an exception)."""
    from robust_rlhf.theory.fitting import fit

    def fit_fn(data: PairData) -> Any:
        return fit(data, method, loss, on_separable="warn", **kwargs)

    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    fit_fn.__qualname__ = fit_fn.__name__ = f"fit[{method}, {loss}{extra}]"
    return fit_fn


# --- batteries ---------------------------------------------------------------------------------

def _tolerances(**values: float) -> None:
    """Tolerances are finite numbers >= 0 (a NaN would pass every comparison); the coverage one is below 1."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"{name}: expected a finite number >= 0, got {v!r}")
    if values.get("coverage_tolerance", 0.0) >= 1:
        raise InputError(f"coverage_tolerance: expected a number below 1, got {values['coverage_tolerance']!r}")


def _chosen(given: Sequence[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The properties to check: all for None; an empty or unknown choice is an error (an empty battery
    would pass without checking anything)."""
    if given is None:
        return allowed
    if isinstance(given, str):
        given = (given,)
    given = tuple(given)
    if not given:
        raise InputError(f"properties: none chosen; name at least one of {', '.join(allowed)} (or None for all)")
    bad = [p for p in given if p not in allowed]
    if bad:
        raise InputError(f"unknown propert{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; allowed: {', '.join(allowed)}")
    return given


def check_estimator(fit_fn: FitFn, *, properties: Sequence[str] | None = None, design: Design | None = None,
                    maps: str = "invertible", cases: Any = None, target: Any = None, baseline: FitFn | None = None,
                    alpha: float = 0.01, seed: int = 0, max_examples: int | None = None, rtol: float = 1e-5,
                    rtol_cov: float = 1e-4, shrink_budget: int = 200, variance_tolerance: float = 1e-3,
                    coverage_tolerance: float = 0.05) -> BatteryResult:
    """The estimator battery (``PROPERTIES``, or the chosen ``properties``) on ``fit_fn``.

    The exact properties search ``cases`` (default ``strategies.data_cases()``) with seed ``seed``;
    the Monte Carlo ones share one ``simulate_estimates`` run on ``design`` (default ``Design()``).
    """
    properties = _chosen(properties, PROPERTIES)
    _tolerances(rtol=rtol, rtol_cov=rtol_cov, variance_tolerance=variance_tolerance,
                coverage_tolerance=coverage_tolerance)
    results = []
    common = dict(cases=cases, seed=seed, max_examples=max_examples, rtol=rtol, rtol_cov=rtol_cov,
                  shrink_budget=shrink_budget)
    if "swap_invariance" in properties:
        results.append(check_swap_invariance(fit_fn, **common))
    if "reorder_invariance" in properties:
        results.append(check_reorder_invariance(fit_fn, **common))
    if "equivariance" in properties:
        results.append(check_equivariance(fit_fn, maps=maps, **common))
    if any(p in properties for p in ("consistency", "variance", "coverage")):
        design = Design(seed=seed) if design is None else design
        run = simulate_estimates(fit_fn, design)
        if "consistency" in properties:
            results.append(check_consistency(run=run, target=target, alpha=alpha))
        if "variance" in properties:
            results.append(check_variance(run=run, baseline=baseline, alpha=alpha, tolerance=variance_tolerance))
        if "coverage" in properties:
            results.append(check_coverage(run=run, target=target, alpha=alpha, tolerance=coverage_tolerance))
    return BatteryResult(_name(fit_fn), tuple(results))


def check_objective(objective_fn: ObjectiveFn, *, properties: Sequence[str] | None = None, maps: str = "invertible",
                    cases: Any = None, alpha: float = 0.01, seed: int = 0, max_examples: int | None = None,
                    rtol: float = 1e-9, shrink_budget: int = 200, **control_variate: Any) -> BatteryResult:
    """The objective battery (``OBJECTIVE_PROPERTIES``): the control variate's zero mean and the
    objective-level invariances; ``control_variate`` passes options to ``check_control_variate``."""
    properties = _chosen(properties, OBJECTIVE_PROPERTIES)
    _tolerances(rtol=rtol)
    results = []
    if "control_variate" in properties:
        results.append(check_control_variate(objective_fn, alpha=alpha, seed=seed, **control_variate))
    for transform in TRANSFORMS:
        if _PROPERTY_OF[transform] in properties:
            results.append(check_objective_invariance(objective_fn, transform, maps=maps, cases=cases, seed=seed,
                                                      max_examples=max_examples, rtol=rtol,
                                                      shrink_budget=shrink_budget))
    return BatteryResult(_name(objective_fn), tuple(results))
