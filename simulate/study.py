r"""Validation studies: the theory of ``theory`` checked by simulation, cell by cell.

A study is a grid ``scenarios x sample sizes n x estimator settings`` with ``R`` replications per
cell, described by a ``StudySpec`` (Python, YAML or JSON). An estimator setting names the method
(``mle``, ``vrpo``, ``vrpo_tuned``, ``vrpo_crossfit``), the reference design (``M`` pairs per prompt
or ``"exact"``, ``unlabelled`` extra prompts as a multiple of ``n``), the auxiliary model and ``lam``.

Every cell draws its replications with the seeding of ``simulate.dataset`` (replication ``r`` of the
study seed), so the labelled pairs are common to all estimators of a ``(scenario, n)`` and nested
across ``n``: comparisons between estimators are paired, and a cell's table does not depend on how
the replications were chunked or on which worker ran it. Each finished cell is written atomically
to ``OUT/cells/``; running the same study again skips finished cells and yields the identical final
table. Cells run in parallel with joblib (``backend`` names any joblib backend: ``loky`` locally,
``ray`` or ``dask`` on a cluster when installed).

Per replication the table holds the estimate, its error against the population target
``theta_dagger``, the squared error, the sandwich standard errors and whether the nominal 95%
interval covered each coordinate, ``lam``, fit diagnostics and the regret of the greedy and
KL-regularised policies on a fixed evaluation population. Per cell, ``predictions`` holds the exact
asymptotic covariance (``theory.asymptotics``), the predicted variance ratio against the MLE and the
predicted regret (``theory.bounds``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robust_rlhf.theory.errors import InputError

from .auxiliary import AuxSpec, aux_population
from .double_robustness import DRPOStudySpec, run_drpo
from .pessimism import NEWEST_COLUMNS, PessimismSpec, run_pessimism
from .registry import SCENARIOS, get_scenario
from .scenario import Scenario, SpecError, check_seed

__all__ = ["EstimatorSetting", "StudySpec", "Cell", "run_study", "load_study", "predict", "predict_regret",
           "DEFAULT_STUDY", "Study", "ESTIMATORS"]

_TUNABLE = ("vrpo", "vrpo_crossfit")
# The version of what a finished cell holds; bumped when a change alters a cell's numbers (2: regret
# predictions centred at theta_dagger + b/n, with the error of theta_dagger; 3: power-tuned VRPO's b and
# its covariance's batch-means error with each batch's own lam*; 4: the second-order covariance; 5: cross-fitted
# VRPO fits the g_hat cross-fitted by `sample` with the setting's folds and seed; 6: the noisy_oracle and random
# g_hat draw their noise from a hash of the prompt, i.i.d. N(0, 1) for every K; 7: fit flags quasi-separated
# labels, which stopped at a vanishing gradient as converged, and its cov is NaN with d or fewer clusters; 8: the
# pessimism radius spends no delta on a design part that is 0 up to rounding, and pessimism cells record their
# version; 9: the pessimism radii's design part by the smaller of Pinelis's Hoeffding and Bernstein bounds, and
# pessimism cells record the local (self-concordant) radius too; 10: the data's generators no longer coincide with
# the structure's, which replication 3's prompts repeated). A rerun recomputes the cells of another version
# instead of mixing them into one table; reading a folder accepts them.
CELL_VERSION = 10
_METHODS = ("mle", "vrpo", "vrpo_tuned", "vrpo_crossfit")


def _int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise SpecError(f"study field '{where}' = {value!r} must be an integer >= {low}")
    return int(value)


#: names that become file names of cells (``SCENARIO__nN__ESTIMATOR``): no path separators
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _safe_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
        raise SpecError(f"study field '{where}' = {name!r} must be a name of letters, digits and _ . + - "
                        "(it names the result files; no '/' or '__')")
    return name


def _keys(where: str, given: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise SpecError(f"unknown study field '{where}{key}'; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class EstimatorSetting:
    """One estimator of a study: method, reference design, auxiliary model, weight."""

    name: str
    method: str = "mle"
    M: int | str = 1
    unlabelled: float = 0.0
    aux: dict = field(default_factory=lambda: {"kind": "oracle"})
    lam: float | str | None = None

    def __post_init__(self) -> None:
        _safe_name("estimators.name", self.name)
        where = f"estimators.{self.name}."
        if self.method not in _METHODS:
            raise SpecError(f"study field '{where}method' = {self.method!r} is unknown; allowed: {', '.join(_METHODS)}")
        if self.M != "exact":
            _int(where + "M", self.M, 1)
        if isinstance(self.unlabelled, bool) or not (isinstance(self.unlabelled, (int, float))
                                                     and math.isfinite(self.unlabelled) and self.unlabelled >= 0):
            raise SpecError(f"study field '{where}unlabelled' = {self.unlabelled!r} must be a number >= 0 (a multiple of n)")
        object.__setattr__(self, "aux", AuxSpec.parse(self.aux).to_dict())
        if self.lam is not None:
            if self.method not in _TUNABLE:
                raise SpecError(f"study field '{where}lam' applies to methods {', '.join(_TUNABLE)}, not {self.method}")
            if self.lam != "auto" and (isinstance(self.lam, bool) or not (isinstance(self.lam, (int, float))
                                                                          and math.isfinite(self.lam))):
                raise SpecError(f"study field '{where}lam' = {self.lam!r} must be a finite number or 'auto' "
                                "(power tuning)")
            if self.method == "vrpo" and self.lam == "auto":  # as `fit`: power-tuned VRPO
                object.__setattr__(self, "method", "vrpo_tuned")
                object.__setattr__(self, "lam", None)
        if self.method == "vrpo_crossfit" and self.aux["kind"] != "learned":
            object.__setattr__(self, "aux", AuxSpec("learned").to_dict())

    @classmethod
    def parse(cls, value: Mapping[str, Any] | str) -> "EstimatorSetting":
        """From a catalogued name (``ESTIMATORS``) or a mapping with a ``name``."""
        if isinstance(value, str):
            if value not in ESTIMATORS:
                raise SpecError(f"study field 'estimators': unknown estimator {value!r}; allowed: "
                                f"{', '.join(ESTIMATORS)} or a mapping (name, method, M, unlabelled, aux, lam)")
            return ESTIMATORS[value]
        if not isinstance(value, Mapping) or "name" not in value:
            raise SpecError(f"study field 'estimators': each entry needs a 'name', got {value!r}")
        _safe_name("estimators.name", value["name"])
        _keys(f"estimators.{value['name']}.", value, [f.name for f in cls.__dataclass_fields__.values()])
        return cls(**dict(value))

    @property
    def uses_reference(self) -> bool:
        return self.method != "mle"

    @property
    def g_hat_is_fixed(self) -> bool:
        return self.aux["kind"] != "learned"


@dataclass(frozen=True)
class StudySpec:
    """The grid of a validation study and its Monte Carlo settings (see the module docstring).

    ``population``: prompts of the population behind ``theta_dagger`` and every prediction;
    ``eval_prompts``: prompts on which policies are evaluated; ``kl_beta``: temperature of the
    KL-regularised policy; ``chunk``: replications fitted together (bounds memory); ``pessimism``:
    where the finite-sample bound of the pessimistic policy is checked (``simulate.pessimism``); ``drpo``: where
    DRPO's double robustness is checked (``simulate.double_robustness``).
    """

    name: str = "study"
    scenarios: tuple = ("bt",)
    n: tuple[int, ...] = (500,)
    estimators: tuple[EstimatorSetting, ...] = (EstimatorSetting("mle"),)
    reps: int = 200
    seed: int = 0
    population: int = 20_000
    eval_prompts: int = 1_000
    kl_beta: float = 1.0
    chunk: int = 250
    pessimism: PessimismSpec | dict | None = None
    drpo: DRPOStudySpec | dict | None = None

    def __post_init__(self) -> None:
        if not self.scenarios:
            raise SpecError("study field 'scenarios' must list at least one scenario")
        scen = []
        for s in self.scenarios:
            if isinstance(s, str):
                if s not in SCENARIOS:
                    raise SpecError(f"study field 'scenarios': unknown scenario {s!r}; allowed: {', '.join(SCENARIOS)} "
                                    "or an inline spec")
                scen.append(s)
            elif isinstance(s, Mapping):
                built = Scenario.from_spec(s).spec
                _safe_name("scenarios.name", built["name"])
                scen.append(built)
            else:
                raise SpecError(f"study field 'scenarios': each entry must be a registered name or a spec mapping, "
                                f"got {s!r}")
        names = [s if isinstance(s, str) else s["name"] for s in scen]
        if len(set(names)) != len(names):
            raise SpecError(f"study field 'scenarios': names must be unique, got {names}")
        object.__setattr__(self, "scenarios", tuple(scen))
        if isinstance(self.n, (int, np.integer)):
            object.__setattr__(self, "n", (self.n,))
        if not self.n:
            raise SpecError("study field 'n' must list at least one sample size")
        object.__setattr__(self, "n", tuple(sorted({_int("n", v, 1) for v in self.n})))
        ests = tuple(e if isinstance(e, EstimatorSetting) else EstimatorSetting.parse(e) for e in self.estimators)
        if not ests:
            raise SpecError("study field 'estimators' must list at least one estimator")
        if len({e.name for e in ests}) != len(ests):
            raise SpecError(f"study field 'estimators': names must be unique, got {[e.name for e in ests]}")
        object.__setattr__(self, "estimators", ests)
        for key, low in (("reps", 2), ("population", 100), ("eval_prompts", 10), ("chunk", 1)):
            _int(key, getattr(self, key), low)
        check_seed("study field 'seed'", self.seed)
        if isinstance(self.kl_beta, bool) or not (isinstance(self.kl_beta, (int, float)) and math.isfinite(self.kl_beta)
                                                  and self.kl_beta > 0):
            raise SpecError(f"study field 'kl_beta' = {self.kl_beta!r} must be a number > 0 and finite")
        object.__setattr__(self, "pessimism", PessimismSpec.parse(self.pessimism))
        object.__setattr__(self, "drpo", DRPOStudySpec.parse(self.drpo))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "StudySpec":
        """Validate a mapping (e.g. parsed YAML); unknown keys are errors."""
        if not isinstance(spec, Mapping):
            raise SpecError(f"a study spec must be a mapping of fields, got {type(spec).__name__}")
        _keys("", spec, cls.__dataclass_fields__)
        spec = dict(spec)
        for key in ("scenarios", "n", "estimators"):
            if key in spec and not isinstance(spec[key], (list, tuple, int)):
                raise SpecError(f"study field '{key}' must be a list, got {spec[key]!r}")
            if key in spec and isinstance(spec[key], list):
                spec[key] = tuple(spec[key])
        return cls(**spec)

    @classmethod
    def from_file(cls, path: str | Path) -> "StudySpec":
        """Read a study spec from YAML or JSON (errors name the file)."""
        from .scenario import load_spec

        spec = load_spec(path)
        try:
            return cls.from_dict(spec)
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-ready form (what the fingerprint hashes)."""
        out = asdict(self)
        out["scenarios"] = list(self.scenarios)
        out["n"] = list(self.n)
        out["estimators"] = [asdict(e) for e in self.estimators]
        out["pessimism"] = None if self.pessimism is None else self.pessimism.to_dict()
        if self.drpo is None:  # left out: the fingerprints of studies without it stay what they were
            del out["drpo"]
        else:
            out["drpo"] = self.drpo.to_dict()
        return out

    def fingerprint(self) -> str:
        """SHA-256 of the canonical spec: a results folder belongs to exactly one spec."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def scenario(self, key: str) -> Scenario:
        for s in self.scenarios:
            if s == key:
                return get_scenario(s)
            if isinstance(s, dict) and s["name"] == key:
                return Scenario.from_spec(s)
        raise KeyError(key)

    @property
    def scenario_names(self) -> list[str]:
        return [s if isinstance(s, str) else s["name"] for s in self.scenarios]

    def cells(self) -> list["Cell"]:
        """Every (scenario, n, estimator), in the order of the final table."""
        return [Cell(s, n, e) for s in self.scenario_names for n in self.n for e in self.estimators]



@dataclass(frozen=True)
class Cell:
    """One grid point of a study."""

    scenario: str
    n: int
    estimator: EstimatorSetting

    @property
    def key(self) -> str:
        return f"{self.scenario}__n{self.n}__{self.estimator.name}"


#: Estimator settings selectable by name (``robust-rlhf validate --estimators ...``).
ESTIMATORS: dict[str, EstimatorSetting] = {e.name: e for e in (
    EstimatorSetting("mle", "mle"),
    EstimatorSetting("vrpo_M1", "vrpo", M=1),
    EstimatorSetting("vrpo_M4", "vrpo", M=4),
    EstimatorSetting("vrpo_M8", "vrpo", M=8),
    EstimatorSetting("vrpo_exact", "vrpo", M="exact"),
    EstimatorSetting("vrpo_unlabelled_M1", "vrpo", M=1, unlabelled=4.0),
    EstimatorSetting("vrpo_tuned_M4", "vrpo_tuned", M=4),
    EstimatorSetting("vrpo_tuned_M8", "vrpo_tuned", M=8),
    EstimatorSetting("vrpo_noisy_M8", "vrpo", M=8, aux={"kind": "noisy_oracle", "noise": 1.0}),
    EstimatorSetting("vrpo_tuned_noisy_M8", "vrpo_tuned", M=8, aux={"kind": "noisy_oracle", "noise": 1.0}),
    EstimatorSetting("vrpo_plugin_M8", "vrpo", M=8, aux={"kind": "bt_plugin"}),
    EstimatorSetting("vrpo_reversed_M4", "vrpo", M=4, aux={"kind": "reversed"}),
    EstimatorSetting("vrpo_reversed_M8", "vrpo", M=8, aux={"kind": "reversed"}),
    EstimatorSetting("vrpo_tuned_reversed_M8", "vrpo_tuned", M=8, aux={"kind": "reversed"}),
    EstimatorSetting("vrpo_random_M8", "vrpo", M=8, aux={"kind": "random"}),
    EstimatorSetting("vrpo_crossfit_M8", "vrpo_crossfit", M=8),
    EstimatorSetting("vrpo_crossfit_tuned_M8", "vrpo_crossfit", M=8, lam="auto"),
)}

DEFAULT_STUDY = StudySpec(
    name="default",
    scenarios=("bt", "near_deterministic", "intransitive"),
    n=(200, 400, 800, 1600),
    estimators=tuple(ESTIMATORS[k] for k in ("mle", "vrpo_M1", "vrpo_M4", "vrpo_exact", "vrpo_tuned_M4",
                                             "vrpo_reversed_M4")),
    reps=200,
    seed=0,
    pessimism=PessimismSpec(n=(1600, 6400, 25600)),
    drpo=DRPOStudySpec(),
)


# --- predictions --------------------------------------------------------------------------------

_POP_SEED = 20_250_403
_EVAL_SEED = 20_250_404


@functools.lru_cache(maxsize=8)
def _populations(scenario_json: str, size: int, eval_size: int):
    """The prediction population, its MLE asymptotics (with the second-order bias and covariance) and the
    evaluation population of a scenario (cached per process: every estimator and n of a scenario share them)."""
    from robust_rlhf.theory.second_order import vr_second_order

    scenario = Scenario.from_spec(json.loads(scenario_json))
    pop = scenario.population(size=size, seed=_POP_SEED)
    return scenario, pop, vr_second_order(pop), scenario.population(size=eval_size, seed=_EVAL_SEED)


def predict(spec: StudySpec, scenario_name: str, est: EstimatorSetting) -> dict[str, Any]:
    """Exact asymptotic predictions of one estimator in one scenario (they do not depend on n): the
    covariance, the second-order bias ``b`` of ``E theta_hat = theta_dagger + b / n`` (``vrpo_tuned``:
    with the term of its estimated ``lam``; none where ``lam_hat`` has no limit) and, for the MLE and VRPO
    at a fixed ``lam``, the second-order covariance: ``pred_second = tr C`` of ``n tr Cov = pred_trace +
    pred_second / n`` (``mle_second`` the MLE's; NaN where not predicted)."""
    from robust_rlhf.theory.asymptotics import tuned_bias
    from robust_rlhf.theory.second_order import vr_second_order

    scenario, pop, mle, _ = _populations(json.dumps(spec.scenario(scenario_name).spec), spec.population,
                                         spec.eval_prompts)
    out: dict[str, Any] = {"theta_dagger": mle.theta_dagger.tolist(), "theta_se": mle.theta_se.tolist(),
                           "mle_trace": mle.trace, "mle_second": float(np.trace(mle.second))}
    cov, lam, bias, bias_se, res = None, 0.0, None, None, None
    if est.method == "mle":
        res = mle
    elif est.g_hat_is_fixed:
        g_hat = aux_population(scenario, est.aux, spec.population, _POP_SEED)
        M = None if est.M == "exact" else est.M
        if est.method == "vrpo_tuned":
            res = tuned_bias(pop, g_hat, M=M, rho=est.unlabelled)
        else:
            res = vr_second_order(pop, g_hat=g_hat, lam=1.0 if est.lam is None else float(est.lam), M=M,
                                  rho=est.unlabelled)
    if res is not None:
        cov, trace, trace_se, bias, bias_se, lam = res.cov, res.trace, res.trace_se, res.bias, res.bias_se, res.lam
    second = res is not None and res.second is not None
    out["pred_second"] = float(np.trace(res.second)) if second else math.nan
    out["pred_second_se"] = res.weighted_second_se() if second else math.nan
    finite = bias is not None and bool(np.isfinite(bias).all())
    out["pred_bias"] = np.asarray(bias).tolist() if finite else None
    out["pred_bias_se"] = np.asarray(bias_se).tolist() if finite else None
    if cov is None:  # a learned g_hat has no fixed population law: no exact prediction
        out.update(pred_trace=math.nan, pred_trace_se=math.nan, pred_ratio=math.nan, pred_lam=math.nan,
                   pred_cov=None)
    else:
        out.update(pred_trace=float(trace), pred_trace_se=float(trace_se), pred_ratio=float(trace / mle.trace),
                   pred_lam=float(lam), pred_cov=np.asarray(cov).tolist())
    return out


def predict_regret(spec: StudySpec, scenario_name: str, pred: dict[str, Any], n: int) -> dict[str, float]:
    """Gaussian plug-in regret of the greedy and KL policies at sample size ``n``, the draws centred at
    ``theta_dagger + b / n`` where the second-order bias ``b`` is predicted, with the error that
    ``theta_dagger``'s prompt average passes on (``target_se``)."""
    from robust_rlhf.theory.bounds import gaussian_plugin_regret

    _, _, mle, evaluation = _populations(json.dumps(spec.scenario(scenario_name).spec), spec.population,
                                         spec.eval_prompts)
    out = {}
    for kind, beta in (("greedy", None), ("kl", spec.kl_beta)):
        if pred["pred_cov"] is None:
            out[f"pred_regret_{kind}"] = out[f"limit_regret_{kind}"] = math.nan
            continue
        pr = gaussian_plugin_regret(np.asarray(pred["theta_dagger"]), np.asarray(pred["pred_cov"]), n, evaluation,
                                    kind=kind, beta=beta, draws=1000, seed=0, bias=pred["pred_bias"],
                                    theta_mc_cov=mle.theta_mc_cov)
        out[f"pred_regret_{kind}"] = float(pr.expected)
        out[f"pred_regret_{kind}_se"] = float(pr.se)
        out[f"pred_regret_{kind}_target_se"] = float(pr.target_se)
        out[f"limit_regret_{kind}"] = float(pr.limit)
    return out


# --- one cell -----------------------------------------------------------------------------------

def _run_cell(spec: StudySpec, cell: Cell, pred: dict[str, Any]) -> pd.DataFrame:
    """Fit every replication of ``cell``: the per-replication table."""
    from robust_rlhf.theory.fitting import fit
    from robust_rlhf.theory.policies import theta_regret

    from .dataset import sample

    scenario, _, _, evaluation = _populations(json.dumps(spec.scenario(cell.scenario).spec), spec.population,
                                              spec.eval_prompts)
    est = cell.estimator
    theta_dag = np.asarray(pred["theta_dagger"])
    frames = []
    for start in range(0, spec.reps, spec.chunk):
        reps = min(spec.chunk, spec.reps - start)
        data = sample(scenario, cell.n, seed=spec.seed, reps=reps, first_rep=start,
                      M=est.M if est.uses_reference else 0,
                      unlabelled=int(round(est.unlabelled * cell.n)) if est.uses_reference else 0,
                      aux=est.aux if est.uses_reference else None)
        # `sample` has cross-fitted a learned g_hat with the setting's folds and seed: `vrpo` on it is
        # `vrpo_crossfit`, without cross-fitting a second time
        method = "vrpo" if est.method == "vrpo_crossfit" else est.method
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # recorded per replication in `separable`
            res = fit(data.to_pair_data(), method, lam=est.lam, on_separable="warn")
        ok = ~res.separable
        err = res.theta - theta_dag
        se = res.se
        frame = {"scenario": cell.scenario, "n": cell.n, "estimator": est.name, "method": est.method,
                 "M": str(est.M) if est.uses_reference else "", "aux": est.aux["kind"] if est.uses_reference else "",
                 "rep": np.arange(start, start + reps), "lam": res.lam, "converged": res.converged,
                 "separable": res.separable, "iterations": res.n_iter, "sq_error": (err ** 2).sum(1)}
        for j in range(err.shape[1]):
            frame[f"theta_{j}"] = res.theta[:, j]
            frame[f"se_{j}"] = se[:, j]
            frame[f"covered_{j}"] = np.where(ok, np.abs(err[:, j]) <= 1.959963984540054 * se[:, j], np.nan)
        for kind, beta in (("greedy", None), ("kl", spec.kl_beta)):
            regret = np.full(reps, np.nan)
            if ok.any():
                regret[ok] = theta_regret(res.theta[ok], evaluation, kind=kind, beta=beta).mean
            frame[f"regret_{kind}"] = regret
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


@contextlib.contextmanager
def _one_thread():
    """Compute a cell on one thread (torch, BLAS and OpenMP), in a worker or not: a sum's order, and so its
    last bits, depends on the thread count, and a cell's table must not depend on who ran it."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


# --- storage ------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("robust-rlhf", "numpy", "scipy", "torch", "cvxpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _check_folder(spec: StudySpec, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {str(out)!r} is a file; choose another --out")
    meta = out / "study.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
            if not isinstance(old, dict):
                raise ValueError
        except (OSError, ValueError):
            raise InputError(f"{meta}: unreadable study record; remove the folder or choose another --out") from None
        if old.get("fingerprint") != spec.fingerprint():
            raise InputError(f"output folder {str(out)!r} holds results of a different study spec "
                             f"({old.get('spec', {}).get('name', '?')!r}, fingerprint {old.get('fingerprint')}); "
                             "choose another --out or remove it")
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {str(out)!r} is not empty and holds no study; choose another --out")


def _write_json(path: Path, obj: Any) -> None:
    from robust_rlhf.theory.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=float))


def _readable(table: Path, record: Path | None = None, key: str | None = None) -> dict | None:
    """Whether a finished cell's files exist and can be read. Writes are atomic, so an unreadable file
    was damaged after the fact: it is not trusted (a run recomputes it), with a warning. Returns the parsed
    ``record`` (``{}`` without one), or None when not finished or unreadable."""
    if not table.exists() or (record is not None and not record.exists()):
        return None
    import pyarrow
    import pyarrow.parquet as pq

    content: dict = {}
    try:
        pq.read_table(table)  # the whole table: a page damaged inside passes a footer check
        if record is not None:
            content = json.loads(record.read_text())
            if not isinstance(content, dict) or content.get("cell") != key:
                raise ValueError("not this cell's record")
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        warnings.warn(f"{table.parent}: the result of cell {key or table.stem} is unreadable ({exc}); it is not "
                      "used (running the study recomputes it)", UserWarning, stacklevel=3)
        return None
    return content


def _cell_record(out: Path, cell: Cell) -> dict | None:
    """A finished cell's record (its ``version``: the ``CELL_VERSION`` it was computed at, 1 before
    versions were recorded), or None."""
    return _readable(out / "cells" / f"{cell.key}.parquet", out / "cells" / f"{cell.key}.json", cell.key)


#: the sub-studies with cells of their own (``StudySpec`` fields): each cell is a table ``OUT/PART/KEY.parquet``
_PARTS = ("pessimism", "drpo")
#: per part, the columns its newest tables hold that older ones lack: a table without them is recomputed by a study
_NEWEST = {"pessimism": NEWEST_COLUMNS, "drpo": ()}


def _part_path(out: Path, part: str, key: str) -> Path:
    return out / part / f"{key}.parquet"


#: the parquet schema metadata key of a sub-study cell's ``CELL_VERSION`` (1 where absent)
_VERSION_KEY = b"robust_rlhf.cell_version"


def _part_done(out: Path, part: str, key: str, current: bool = True) -> bool:
    """Whether a sub-study cell is finished (readable) and, with ``current``, was computed at this
    ``CELL_VERSION`` and holds this version's columns (``_NEWEST``): a study run recomputes an older
    cell; reading a folder accepts it (``checks`` leaves out the checks whose columns it lacks), as it
    accepts cells of another ``CELL_VERSION``."""
    path = _part_path(out, part, key)
    if _readable(path) is None:
        return False
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    version = int((schema.metadata or {}).get(_VERSION_KEY, b"1"))
    return not current or (version == CELL_VERSION and set(_NEWEST[part]) <= set(schema.names))


def _compute_part(spec: StudySpec, part: str, n: int, unit: Any, out: Path) -> list[str]:
    """One sub-study cell (``simulate.pessimism``, ``simulate.double_robustness``), written atomically with
    its ``CELL_VERSION``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from robust_rlhf.theory.io import atomic_path

    sub = getattr(spec, part)
    run = {"pessimism": run_pessimism, "drpo": run_drpo}[part]
    with _one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # separable fits and solver accuracy notes are recorded per row
        table = run(sub, n, unit, spec.seed)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _VERSION_KEY: str(CELL_VERSION).encode()})
    with atomic_path(_part_path(out, part, sub.key(n, unit))) as tmp:
        pq.write_table(arrow, tmp)
    return [sub.key(n, unit)]


def _compute_and_store(spec: StudySpec, cells: list[Cell], out: Path) -> list[str]:
    """Run the unfinished ``cells`` of one (scenario, estimator), sharing its predictions."""
    from robust_rlhf.theory.io import atomic_path

    first = cells[0]
    with _one_thread():
        pred = predict(spec, first.scenario, first.estimator)
        for cell in cells:
            start = time.perf_counter()
            table = _run_cell(spec, cell, pred)
            seconds = time.perf_counter() - start
            with atomic_path(out / "cells" / f"{cell.key}.parquet") as tmp:
                table.to_parquet(tmp, index=False)
            record = {"cell": cell.key, "version": CELL_VERSION, "scenario": cell.scenario, "n": cell.n,
                      "estimator": cell.estimator.name, "seconds": seconds, **pred,
                      **predict_regret(spec, cell.scenario, pred, cell.n)}
            _write_json(out / "cells" / f"{cell.key}.json", record)  # written last: marks the cell finished
    return [c.key for c in cells]


@dataclass(frozen=True)
class Study:
    """A finished study: its spec, the per-replication table and the per-cell predictions."""

    spec: StudySpec
    results: pd.DataFrame
    predictions: pd.DataFrame
    folder: Path
    pessimism: pd.DataFrame | None = None
    drpo: pd.DataFrame | None = None


def run_study(spec: StudySpec, out: str | Path, *, jobs: int = 1, backend: str = "loky",
              progress: Callable[[int, int], None] | None = None) -> Study:
    """Run (or resume) ``spec`` into folder ``out``: finished cells are skipped.

    ``jobs`` workers (``-1``: all cores) with joblib's ``backend``. ``progress(done, total)`` is called
    as cells finish. Writes ``results.parquet`` and ``results.csv`` (one row per replication x cell),
    ``predictions.csv`` (one row per cell) and ``study.json`` (spec, fingerprint, seed, versions).
    """
    from joblib import delayed

    _check_backend(backend, jobs)
    out = Path(out)
    _check_folder(spec, out)
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
        for part in _PARTS:
            (out / part).mkdir(exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {str(out)!r}: {exc.strerror or exc}") from None
    _write_json(out / "study.json", {"fingerprint": spec.fingerprint(), "spec": spec.to_dict(),
                                     "seed": spec.seed, "versions": _versions()})
    cells = spec.cells()
    finished = {c.key: record for c in cells if (record := _cell_record(out, c)) is not None}
    stale = [c for c in cells if c.key in finished and finished[c.key].get("version", 1) != CELL_VERSION]
    current = set(finished) - {c.key for c in stale}
    todo = [c for c in cells if c.key not in current]
    if stale:
        warnings.warn(f"{out}: {len(stale)} finished cell(s) were computed by another version of robust-rlhf "
                      f"(cell version other than {CELL_VERSION}, e.g. {stale[0].key}); they are recomputed",
                      UserWarning, stacklevel=2)
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in todo:
        groups.setdefault((cell.scenario, cell.estimator.name), []).append(cell)
    parts = [(part, n, unit) for part in _PARTS if getattr(spec, part) is not None
             for n, unit in getattr(spec, part).cells()]
    parts_todo = [(part, n, unit) for part, n, unit in parts
                  if not _part_done(out, part, getattr(spec, part).key(n, unit))]
    total = len(cells) + len(parts)
    done = total - len(todo) - len(parts_todo)
    if progress:
        progress(done, total)
    tasks = [(_compute_part, (spec, part, n, unit, out)) for part, n, unit in parts_todo]  # slowest first
    tasks += [(_compute_and_store, (spec, g, out)) for g in groups.values()]
    if jobs == 1:
        results: Iterable[list[str]] = (fn(*a) for fn, a in tasks)
    else:
        results = _parallel(backend, jobs, (delayed(fn)(*a) for fn, a in tasks))
    for keys in results:
        done += len(keys)
        if progress:
            progress(done, total)
    return _assemble(spec, out)


_BACKENDS = {"loky": None, "threading": None, "multiprocessing": None, "sequential": None,
             "dask": "dask.distributed", "ray": "ray"}


def _check_backend(backend: str, jobs: int) -> None:
    if backend not in _BACKENDS:
        raise InputError(f"unknown joblib backend {backend!r}; allowed: {', '.join(_BACKENDS)}")
    module = _BACKENDS[backend]
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise InputError(f"backend {backend!r} needs {module.split('.')[0]}: pip install "
                             + ("'robust-rlhf[cluster]'" if backend == "dask" else "'ray[default]'"))
    if not isinstance(jobs, int) or jobs == 0 or jobs < -1:
        raise InputError(f"jobs = {jobs!r}: use a positive number of workers or -1 for all cores")
    if backend == "ray":
        from ray.util.joblib import register_ray

        register_ray()
    if backend == "dask":
        import os

        from distributed import Client, default_client

        try:
            default_client()
        except ValueError:
            if not os.environ.get("DASK_SCHEDULER_ADDRESS"):
                raise InputError("backend 'dask' runs on a dask cluster: start a scheduler and set "
                                 "DASK_SCHEDULER_ADDRESS=tcp://HOST:PORT (or create a distributed.Client first)") from None
            Client()  # connects to the scheduler at DASK_SCHEDULER_ADDRESS


def _parallel(backend: str, jobs: int, tasks):
    """Run ``tasks`` with joblib (external backends such as dask and ray register through
    ``parallel_config``), yielding results as they finish."""
    from joblib import Parallel, parallel_config

    with parallel_config(backend=backend, n_jobs=jobs), warnings.catch_warnings():
        # loky replaces a worker whose memory grew (large exact designs) and says so; the task is rerun
        warnings.filterwarnings("ignore", message="A worker stopped while some jobs were given")
        try:
            parallel = Parallel(return_as="generator_unordered")
        except ValueError:  # multiprocessing (and ray, built on it) return results only all together
            parallel = Parallel(return_as="list")
        yield from parallel(tasks)


def _assemble(spec: StudySpec, out: Path) -> Study:
    from robust_rlhf.theory.io import atomic_path

    cells = spec.cells()
    results = pd.concat([pd.read_parquet(out / "cells" / f"{c.key}.parquet") for c in cells], ignore_index=True)
    preds = pd.DataFrame([json.loads((out / "cells" / f"{c.key}.json").read_text()) for c in cells])
    with atomic_path(out / "results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    flat = preds.drop(columns=["pred_cov"])
    for col in ("theta_dagger", "pred_bias", "pred_bias_se", "theta_se"):  # vectors, as JSON (older cells lack some)
        if col in flat:
            flat[col] = flat[col].map(json.dumps)
    with atomic_path(out / "predictions.csv") as tmp:
        flat.to_csv(tmp, index=False)
    tables: dict[str, pd.DataFrame | None] = {}
    for part in _PARTS:
        sub = getattr(spec, part)
        tables[part] = None if sub is None else pd.concat(
            [pd.read_parquet(_part_path(out, part, sub.key(n, u))) for n, u in sub.cells()], ignore_index=True)
        if tables[part] is None:
            continue
        for ext, write in (("parquet", lambda f, t: f.to_parquet(t, index=False)),
                           ("csv", lambda f, t: f.to_csv(t, index=False))):
            with atomic_path(out / f"{part}.{ext}") as tmp:
                write(tables[part], tmp)
    return Study(spec=spec, results=results, predictions=preds, folder=out, **tables)


def load_study(out: str | Path) -> Study:
    """Read a finished study folder (raises if a cell is missing)."""
    out = Path(out)
    meta = out / "study.json"
    if not meta.exists():
        raise InputError(f"{out}: no study.json; not a study folder")
    try:
        record = json.loads(meta.read_text())
        spec_dict = record["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{meta}: unreadable study record (no spec); rerun the study into a new folder") from None
    spec = StudySpec.from_dict(spec_dict)
    missing = [c.key for c in spec.cells() if _cell_record(out, c) is None]
    for part in _PARTS:
        sub = getattr(spec, part)
        if sub is not None:
            missing += [k for k in (sub.key(n, u) for n, u in sub.cells()) if not _part_done(out, part, k, False)]
    if missing:
        raise InputError(f"{out}: {len(missing)} cell(s) unfinished or unreadable (e.g. {missing[0]}); rerun the study "
                         "to compute them")
    return _assemble(spec, out)
