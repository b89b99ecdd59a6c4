r"""Symbolic derivations (sympy) of the key formulas of DESIGN.md section 3.

Each function derives its results from the definitions (it does not type them in), records the
residuals ``derived - stated closed form`` reduced to a canonical form (``simplify``/``cancel``, or exact
polynomial arithmetic over the rationals) -- all zero when the derivation confirms the closed form --
and exposes every result as a :class:`Formula`: the sympy expression together with its
``sympy.lambdify`` numerical version, so that tests can compare it with the project's numerical code
(``losses.vr_objective`` with autograd, ``asymptotics.vr_covariance`` / ``optimal_lambda``).

1. :func:`logistic_identity`: for ``l(z) = log(1 + e^{-z})``, ``l(z) - l(-z) = -z``, hence
   ``m_g(z) = g l(z) + (1-g) l(-z) = l(-z) - g z``, ``m_g' = s - g``, ``m_g'' = s (1 - s)``, ``s = sigmoid(z)``.
2. :func:`vr_gradient_hessian`: gradient and Hessian in ``theta`` of the VR objective of a linear reward,
   ``(1/n) sum_i (s_i - Z_i - lam (s_i - g_i)) dphi_i + (lam/N) sum_j (s_j - g_j) dphi_j`` and
   ``((1 - lam)/n) sum_i s_i (1-s_i) dphi_i dphi_i^T + (lam/N) sum_j s_j (1-s_j) dphi_j dphi_j^T``.
3. :func:`two_type_scenario`: a one-dimensional misspecified scenario (two prompt types, two responses)
   with ``theta_dagger``, ``H``, ``Omega(lam)`` for any auxiliary model, ``M`` and ``rho``, and the
   MLE/VRPO variance difference and ratio in closed form.
4. :func:`optimal_lambda_closed_form`: ``lam* = tr(W' X) / tr(W' Y)`` from ``Omega(lam)`` being a convex
   quadratic, and ``lam*`` in the two-type scenario (general auxiliary model, ``M``, ``rho``).
5. :func:`second_order_bias`: ``E theta_hat - theta_dagger = H^-1 (C - T[Sigma] / 2) / n + o(1/n)`` from the
   stochastic expansion of an M-estimator's estimating equation (``asymptotics.vr_bias``).

Every derivation is cached (``functools.lru_cache``) and takes at most a few seconds. The numerical
functions are direct translations of the expressions, meant for checking, not for fitting: the
logistic terms are evaluated as ``log(1 + exp(-z))``, which loses relative accuracy for ``z`` beyond
about 20 and overflows beyond about 700, where ``losses.Logistic`` stays exact.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import sympy as sp
from sympy import QQ
from sympy.polys.rings import ring

from .data import PairPopulation
from .errors import InputError

__all__ = [
    "Formula",
    "LogisticIdentity",
    "VRGradientHessian",
    "TwoTypeScenario",
    "OptimalLambdaClosedForm",
    "logistic_identity",
    "vr_gradient_hessian",
    "two_type_scenario",
    "two_type_omega_enumerated",
    "EnumeratedOmega",
    "optimal_lambda_closed_form",
    "two_type_population",
    "two_type_auxiliary",
    "SecondOrderBias",
    "second_order_bias",
]


# --------------------------------------------------------------------------------------------
# formulas: a sympy expression with its numerical version

#: ``1/M`` and ``c = 1/(1 + rho)``: the two-type scenario's algebra is polynomial in them
_INV_M = sp.Symbol("inv_M", nonnegative=True)
_C_RHO = sp.Symbol("c_rho", positive=True)


def _to_inv_m(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        raise InputError(f"{name}: reference pairs per prompt must be a number, got {value!r}")
    arr = np.asarray(value, dtype=np.float64)
    if not ((arr >= 1.0) & ((arr == np.floor(arr)) | np.isposinf(arr))).all():
        raise InputError(
            f"{name}: reference pairs per prompt must be an integer >= 1 (math.inf for the exact expectation), "
            f"got {value!r}"
        )
    out = 1.0 / arr
    return float(out) if out.ndim == 0 else out


def _to_c_rho(name: str, value: Any) -> Any:
    arr = np.asarray(value, dtype=np.float64)
    if not (np.isfinite(arr) & (arr >= 0.0)).all():
        raise InputError(f"{name}: unlabelled prompts per labelled prompt must be finite and >= 0, got {value!r}")
    out = 1.0 / (1.0 + arr)
    return float(out) if out.ndim == 0 else out


_TRANSFORMS: dict[str, Callable[[str, Any], Any]] = {"M": _to_inv_m, "rho": _to_c_rho}
#: the scenario's arguments that are probabilities (a type's share, the reference policy, g* and g_hat)
_PROBABILITIES = frozenset({"q", "r", "p0", "p1", "h0", "k0", "h1", "k1"})


@dataclass(frozen=True)
class Formula:
    """A derived sympy expression and its numerical (numpy) version.

    ``args`` is the lambdify signature (symbols, or nested lists of symbols for vector and matrix
    arguments) and ``names`` names each argument; call positionally or by name, e.g.
    ``f(q=0.3, p0=0.8, p1=0.2, r=0.5)``. ``M`` (reference pairs per labelled prompt) accepts
    ``math.inf``, the exact expectation over reference pairs: the numerical function is built from
    the same expression written in ``1/M`` (and in ``1/(1 + rho)`` for ``rho``), so that limit is
    exact. A matrix expression returns an array (a column vector as a 1-D array); a scalar returns a
    float, or an array when the inputs are arrays.
    """

    expr: Any
    args: tuple[Any, ...]
    names: tuple[str, ...]
    fn: Callable[..., Any] = field(repr=False, compare=False)
    transformed: tuple[str, ...] = ()

    def __call__(self, *values: Any, **named: Any) -> Any:
        if named:
            if values:
                raise InputError("Formula: pass the arguments either all by position or all by name")
            unknown = sorted(set(named) - set(self.names))
            missing = [n for n in self.names if n not in named]
            if unknown or missing:
                raise InputError(
                    f"Formula: arguments are {', '.join(self.names)}; unknown {unknown}, missing {missing}"
                )
            values = tuple(named[n] for n in self.names)
        if len(values) != len(self.names):
            raise InputError(
                f"Formula: expected {len(self.names)} arguments ({', '.join(self.names)}), got {len(values)}"
            )
        for name, v in zip(self.names, values):
            if name in _PROBABILITIES and not isinstance(v, (sp.Basic,)):
                arr = np.asarray(v, dtype=np.float64)
                if not ((arr >= 0.0) & (arr <= 1.0)).all():
                    raise InputError(f"Formula: {name} is a probability and must lie in [0, 1], got {v!r}")
        values = tuple(
            _TRANSFORMS[name](name, v) if name in self.transformed else v for name, v in zip(self.names, values)
        )
        out = self.fn(*values)
        if isinstance(self.expr, sp.MatrixBase):
            rows, cols = self.expr.shape
            return np.asarray(out, dtype=np.float64).reshape((rows,) if cols == 1 else (rows, cols))
        arr = np.asarray(out, dtype=np.float64)
        return float(arr) if arr.ndim == 0 else arr


def _formula(expr: Any, args: Sequence[Any], names: Sequence[str] | None = None) -> Formula:
    """Lambdify ``expr`` over ``args`` (no transformed arguments)."""
    args = tuple(args)
    names = tuple(str(a) for a in args) if names is None else tuple(names)
    return Formula(expr=expr, args=args, names=names, fn=sp.lambdify(args, expr, modules="numpy"))


def _residual(derived: Any, closed: Any) -> Any:
    """``simplify(derived - closed)``, entrywise for matrices; zero when the two agree identically."""
    diff = derived - closed
    if isinstance(diff, sp.MatrixBase):
        return diff.applyfunc(lambda e: sp.simplify(sp.cancel(sp.together(e))))
    return sp.simplify(sp.cancel(sp.together(diff)))


def _is_zero(residual: Any) -> bool:
    if isinstance(residual, sp.MatrixBase):
        return all(e == 0 for e in residual)
    return residual == 0


# --------------------------------------------------------------------------------------------
# 1. the logistic identity


@dataclass(frozen=True)
class LogisticIdentity:
    r"""The logistic loss and the soft-labelled pair loss ``m_g(z) = g l(z) + (1-g) l(-z)``.

    Attributes
    ----------
    z, g : the margin and the probability that the first response wins.
    loss : ``l(z) = log(1 + e^{-z})``.
    sigmoid : ``s(z) = 1 / (1 + e^{-z})``.
    difference : ``simplify(l(z) - l(-z))`` as sympy returns it (``-z``).
    pair_loss : ``m_g(z)`` by its definition.
    pair_loss_reduced : ``l(-z) - g z``, obtained as ``l(-z) + g (l(z) - l(-z))`` with the derived difference.
    d1, d2 : ``m_g'(z) = s - g`` and ``m_g''(z) = s (1 - s)``, each confirmed against ``diff(m_g, z)``.
    residuals : name -> ``simplify(derived - closed)``; all zero.
        ``identity``: ``l(z) - l(-z) + z``; ``identity_derivative`` and ``identity_at_zero``: a second
        proof, ``D(z) = l(z) - l(-z) + z`` has ``D' = 0`` identically and ``D(0) = 0``;
        ``pair_loss``: ``m_g - (l(-z) - g z)``; ``d1``, ``d2``: the derivatives.
    """

    z: sp.Symbol
    g: sp.Symbol
    loss: Formula
    sigmoid: Formula
    difference: Formula
    pair_loss: Formula
    pair_loss_reduced: Formula
    d1: Formula
    d2: Formula
    residuals: dict[str, Any]

    @property
    def proven(self) -> bool:
        """Whether every residual is identically zero."""
        return all(_is_zero(r) for r in self.residuals.values())


def _logistic(u: Any) -> Any:
    return sp.log(1 + sp.exp(-u))


def _sigmoid(u: Any) -> Any:
    return 1 / (1 + sp.exp(-u))


@functools.lru_cache(maxsize=None)
def logistic_identity() -> LogisticIdentity:
    r"""Derive ``l(z) - l(-z) = -z`` for ``l(z) = log(1 + e^{-z})`` and its consequences for ``m_g``.

    ``l(z) - l(-z) = log((1 + e^{-z}) / (1 + e^{z})) = log(e^{-z}) = -z`` on the real line, so
    ``m_g(z) = l(-z) + g (l(z) - l(-z)) = l(-z) - g z``: a convex function of ``z`` plus a linear one,
    with ``m_g' = s - g`` and ``m_g'' = s (1 - s)`` for every ``g``.
    """
    z = sp.Symbol("z", real=True)
    g = sp.Symbol("g", real=True)
    loss = _logistic(z)
    s = _sigmoid(z)
    difference = sp.simplify(loss - _logistic(-z))
    D = loss - _logistic(-z) + z
    pair = g * loss + (1 - g) * _logistic(-z)
    reduced = _logistic(-z) + g * difference
    d1 = s - g
    d2 = s * (1 - s)
    residuals = {
        "identity": _residual(loss - _logistic(-z), -z),
        "identity_derivative": sp.simplify(sp.diff(D, z)),
        "identity_at_zero": sp.simplify(D.subs(z, 0)),
        "pair_loss": _residual(pair, reduced),
        "d1": _residual(sp.diff(pair, z), d1),
        "d2": _residual(sp.diff(pair, z, 2), d2),
    }
    return LogisticIdentity(
        z=z, g=g, loss=_formula(loss, (z,)), sigmoid=_formula(s, (z,)), difference=_formula(difference, (z,)),
        pair_loss=_formula(pair, (z, g)), pair_loss_reduced=_formula(reduced, (z, g)),
        d1=_formula(d1, (z, g)), d2=_formula(d2, (z,)), residuals=residuals,
    )


# --------------------------------------------------------------------------------------------
# 2. gradient and Hessian of the VR objective


@dataclass(frozen=True)
class VRGradientHessian:
    r"""The VR objective of a linear reward in a small symbolic setting, with its derivatives.

    ``L(theta) = (1/n) sum_i [m_{Z_i}(u_i) - lam m_{g_i}(u_i)] + (lam/N) sum_j m_{r_j}(v_j)``,
    ``u_i = theta . dphi_i`` (labelled pairs), ``v_j = theta . dphi_ref_j`` (reference pairs, ``g_ref = r``),
    with the logistic ``m_g`` of :func:`logistic_identity` -- the default weights of ``losses.vr_objective``.

    Attributes
    ----------
    d, n, n_ref : feature dimension, labelled and reference pairs.
    theta : (d,) symbols; dphi : (n, d) and dphi_ref : (n_ref, d) symbol matrices;
    z, g : (n,) labels and auxiliary probabilities; g_ref : (n_ref,); lam : the weight.
    objective, gradient, hessian : Formulas with arguments ``(theta, dphi, z, g, dphi_ref, g_ref, lam)``
        (arrays of those shapes and a float); ``gradient`` and ``hessian`` are the closed forms above.
    gradient_derived, hessian_derived : ``diff`` of ``objective`` (sympy matrices).
    residuals : ``gradient`` and ``hessian``: derived minus closed form, written as rational functions of
        ``E_k = exp(-margin_k)`` and cancelled (zero matrices).
    """

    d: int
    n: int
    n_ref: int
    theta: tuple[sp.Symbol, ...]
    dphi: sp.Matrix
    dphi_ref: sp.Matrix
    z: tuple[sp.Symbol, ...]
    g: tuple[sp.Symbol, ...]
    g_ref: tuple[sp.Symbol, ...]
    lam: sp.Symbol
    objective: Formula
    gradient: Formula
    hessian: Formula
    gradient_derived: sp.Matrix
    hessian_derived: sp.Matrix
    residuals: dict[str, Any]

    @property
    def proven(self) -> bool:
        """Whether the derived gradient and Hessian equal the closed forms identically."""
        return all(_is_zero(r) for r in self.residuals.values())


def _check_size(name: str, value: object, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= high:
        raise InputError(f"{name}: need an integer in [1, {high}] (a small symbolic setting), got {value!r}")
    return int(value)


def vr_gradient_hessian(d: int = 2, n: int = 1, n_ref: int = 1) -> VRGradientHessian:
    r"""Differentiate the VR objective of a linear reward (logistic loss) symbolically.

    With ``m_g' = s - g`` and ``m_g'' = s(1-s)`` (:func:`logistic_identity`) and the chain rule
    ``d u_i / d theta = dphi_i``:
    ``grad = (1/n) sum_i (s_i - Z_i - lam (s_i - g_i)) dphi_i + (lam/N) sum_j (s_j - g_ref_j) dphi_ref_j``,
    ``Hess = ((1 - lam)/n) sum_i s_i (1 - s_i) dphi_i dphi_i^T + (lam/N) sum_j s_j (1 - s_j) dphi_ref_j dphi_ref_j^T``
    (the labelled label ``Z`` drops out of the Hessian; the objective is convex for ``0 <= lam <= 1``).
    Sizes are capped (``d <= 3``, ``n, n_ref <= 2``) to keep the symbolic check within seconds.
    """
    return _vr_gradient_hessian(_check_size("d", d, 3), _check_size("n", n, 2), _check_size("n_ref", n_ref, 2))


@functools.lru_cache(maxsize=None)
def _vr_gradient_hessian(d: int, n: int, n_ref: int) -> VRGradientHessian:
    theta = sp.Matrix(sp.symbols(f"theta_0:{d}", real=True))
    dphi = sp.Matrix(n, d, lambda i, k: sp.Symbol(f"dphi_{i}_{k}", real=True))
    dref = sp.Matrix(n_ref, d, lambda j, k: sp.Symbol(f"dphiref_{j}_{k}", real=True))
    z = sp.symbols(f"Z_0:{n}", real=True)
    g = sp.symbols(f"g_0:{n}", real=True)
    gr = sp.symbols(f"gref_0:{n_ref}", real=True)
    lam = sp.Symbol("lam", real=True)

    li = logistic_identity()

    def m(prob: Any, u: Any) -> Any:  # the soft-labelled pair loss g l(z) + (1-g) l(-z) by its definition
        return li.pair_loss.expr.xreplace({li.z: u, li.g: prob})

    u = [(dphi[i, :] * theta)[0] for i in range(n)]
    v = [(dref[j, :] * theta)[0] for j in range(n_ref)]
    objective = (sum(m(z[i], u[i]) - lam * m(g[i], u[i]) for i in range(n)) / n
                 + lam * sum(m(gr[j], v[j]) for j in range(n_ref)) / n_ref)
    grad_derived = sp.Matrix([sp.diff(objective, t) for t in theta])
    hess_derived = sp.hessian(objective, list(theta))

    s = [_sigmoid(ui) for ui in u]
    sr = [_sigmoid(vj) for vj in v]
    grad = (sum(((s[i] - z[i] - lam * (s[i] - g[i])) * dphi[i, :].T for i in range(n)), sp.zeros(d, 1)) / n
            + lam * sum(((sr[j] - gr[j]) * dref[j, :].T for j in range(n_ref)), sp.zeros(d, 1)) / n_ref)
    hess = ((1 - lam) * sum((s[i] * (1 - s[i]) * dphi[i, :].T * dphi[i, :] for i in range(n)), sp.zeros(d, d)) / n
            + lam * sum((sr[j] * (1 - sr[j]) * dref[j, :].T * dref[j, :] for j in range(n_ref)),
                        sp.zeros(d, d)) / n_ref)
    # exp(-u) -> E: each residual becomes a rational function of independent symbols E, which is
    # identically zero iff cancel() says so; sound because substituting E = exp(-u) back keeps it zero
    E: dict[Any, Any] = {}
    for k, m_ in enumerate(u + v):
        e_k = sp.Symbol(f"E_{k}", positive=True)
        E.update({sp.exp(-m_): e_k, sp.exp(m_): 1 / e_k, sp.exp(-2 * m_): e_k**2, sp.exp(2 * m_): e_k**-2})

    def residual(derived: sp.Matrix, closed: sp.Matrix) -> sp.Matrix:
        return (derived - closed).applyfunc(lambda e: sp.cancel(sp.together(e.xreplace(E))))

    residuals = {"gradient": residual(grad_derived, grad), "hessian": residual(hess_derived, hess)}

    args = (list(theta), dphi.tolist(), list(z), list(g), dref.tolist(), list(gr), lam)
    names = ("theta", "dphi", "z", "g", "dphi_ref", "g_ref", "lam")
    return VRGradientHessian(
        d=d, n=n, n_ref=n_ref, theta=tuple(theta), dphi=dphi, dphi_ref=dref, z=tuple(z), g=tuple(g), g_ref=tuple(gr),
        lam=lam, objective=_formula(objective, args, names), gradient=_formula(grad, args, names),
        hessian=_formula(hess, args, names), gradient_derived=grad_derived, hessian_derived=hess_derived,
        residuals=residuals,
    )


# --------------------------------------------------------------------------------------------
# 3. the two-type scenario

#: the scenario's parameters that are generators of its polynomial ring (with ``1/M`` and ``1/(1+rho)``)
_RING_NAMES = ("q", "p0", "p1", "r", "h0", "k0", "h1", "k1", "lam")
_OMEGA_ARGS = ("q", "p0", "p1", "r", "h0", "k0", "h1", "k1", "lam", "M", "rho")


@dataclass(frozen=True)
class TwoTypeScenario:
    r"""Closed forms of the one-dimensional two-type scenario (see :func:`two_type_scenario`).

    Symbols (``symbols`` maps names to them): ``q`` (probability of prompt type 0), ``p0``, ``p1``
    (``g*(x, 0, 1) = p_x``), ``r`` (``pi_ref(0|x)``; uniform is ``1/2``), the auxiliary model ``h0, h1``
    (``g_hat(x, 0, 1)``) and ``k0, k1`` (``g_hat(x, 1, 0)``), ``lam``, ``M`` (reference pairs per labelled
    prompt; ``math.inf`` in the numerical functions is the exact expectation) and ``rho`` (unlabelled
    prompts per labelled prompt). ``w = 2 r (1 - r)`` is the probability that a pair is not a tie,
    ``pbar = q p0 + (1-q) p1`` and ``V = q (1-q) (p0 - p1)^2 = Var_x(p_x)``.

    Attributes
    ----------
    p_bar : ``pbar`` as solved from the score equation.
    score : the population score ``E[m'_{g*}(theta dphi) dphi]`` (expression in ``symbols["theta"]``).
    score_closed : ``w (sigmoid(theta) - pbar) = w sum_x q_x (sigmoid(theta) - p_x)``.
    theta_dagger : ``log(pbar / (1 - pbar))`` (args q, p0, p1).
    H : the bread ``w pbar (1 - pbar)`` (args q, p0, p1, r).
    omega : ``Omega(lam)`` for the general auxiliary model (args q, p0, p1, r, h0, k0, h1, k1, lam, M, rho).
    cov : ``Omega(lam) / H^2`` (same args), the asymptotic variance of ``sqrt(n)(theta_hat - theta_dagger)``.
    omega_mle : ``Omega(0) = w pbar (1 - pbar)``, equal to ``H`` (so ``cov_MLE = 1/H``).
    omega_vr : ``Omega(1)`` at ``g_hat = g*``, ``rho = 0`` (args q, p0, p1, r, M).
    within : ``E_x[Var_{pair|x}((g* - s) dphi)] = w (1 - w) V`` (ties included).
    difference : ``Omega_MLE - Omega_VR = (1 - 1/M) w (1 - w) V``.
    ratio : ``Omega_VR / Omega_MLE = cov_VR / cov_MLE = 1 - (1 - 1/M) (1 - w) V / (pbar (1 - pbar))``.
    ratio_bound : ``1 - (1 - 1/M)(1 - w)``, the smallest ratio (reached at ``p0, p1`` = 1, 0).
    cov_mle, cov_vr : ``1 / H`` and ``Omega_VR / H^2``.
    derived : name -> the expression the derivation produced (``H``, ``omega``, ``omega_mle``, ``omega_vr``,
        ``within``, ``difference``, ``ratio``), in expanded or factored form. The Formulas above are the
        stated closed forms (readable, and numerically stable where the expanded forms cancel);
        ``residuals`` proves each equal to its derived counterpart.
    difference_nonnegative, ratio_above_bound : sympy's ``is_nonnegative`` verdict on the derived
        ``difference`` and on ``ratio - ratio_bound`` after mapping the domain ``q, r, p0, p1`` in (0, 1),
        ``M >= 1`` onto positive symbols (``q = a / (1 + a)``, ``M = 1 + m``); True is a proof.
    residuals : name -> derived minus stated closed form (zero). Rational identities are checked
        exactly in polynomial arithmetic, cross-multiplied by their (non-zero) denominators.
    """

    symbols: dict[str, sp.Symbol]
    p_bar: sp.Expr
    score: sp.Expr
    score_closed: sp.Expr
    theta_dagger: Formula
    H: Formula
    omega: Formula
    cov: Formula
    omega_mle: Formula
    omega_vr: Formula
    within: Formula
    difference: Formula
    ratio: Formula
    ratio_bound: Formula
    cov_mle: Formula
    cov_vr: Formula
    derived: dict[str, Any]
    difference_nonnegative: bool | None
    ratio_above_bound: bool | None
    residuals: dict[str, Any]

    @property
    def proven(self) -> bool:
        """Whether every residual is zero and both sign statements were proven by sympy."""
        return (all(_is_zero(r) for r in self.residuals.values())
                and self.difference_nonnegative is True and self.ratio_above_bound is True)


@dataclass(frozen=True)
class _Pair:
    weight: Any  # pi_ref(a) pi_ref(b)
    dphi: int  # phi_a - phi_b with phi = (+1/2, -1/2)
    g_star: Any
    g_hat: Any


@dataclass(frozen=True)
class _PromptType:
    prob: Any
    pairs: tuple[_Pair, ...]


@functools.lru_cache(maxsize=None)
def _symbols() -> dict[str, sp.Symbol]:
    unit = dict(positive=True)
    return {
        "q": sp.Symbol("q", **unit), "p0": sp.Symbol("p0", **unit), "p1": sp.Symbol("p1", **unit),
        "r": sp.Symbol("r", **unit), "h0": sp.Symbol("h0", **unit), "k0": sp.Symbol("k0", **unit),
        "h1": sp.Symbol("h1", **unit), "k1": sp.Symbol("k1", **unit), "lam": sp.Symbol("lam", real=True),
        "M": sp.Symbol("M", positive=True), "rho": sp.Symbol("rho", nonnegative=True),
        "theta": sp.Symbol("theta", real=True),
    }


def _prompt_types(S: dict[str, sp.Symbol]) -> tuple[_PromptType, ...]:
    """Both prompt types with their four pairs ``(a, b)``, ``a, b`` in {0, 1}; ties get ``g = 1/2``."""
    phi = (sp.Rational(1, 2), -sp.Rational(1, 2))
    pi = (S["r"], 1 - S["r"])
    half = sp.Rational(1, 2)
    out = []
    for prob, p, h, k in ((S["q"], S["p0"], S["h0"], S["k0"]), (1 - S["q"], S["p1"], S["h1"], S["k1"])):
        pairs = []
        for a, b in itertools.product((0, 1), repeat=2):
            gs = half if a == b else (p if a == 0 else 1 - p)
            gh = half if a == b else (h if a == 0 else k)
            pairs.append(_Pair(pi[a] * pi[b], int(phi[a] - phi[b]), gs, gh))
        out.append(_PromptType(prob, tuple(pairs)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _target() -> tuple[Any, Any, Any, tuple[_PromptType, ...]]:
    """``(score(theta), theta_dagger, pbar, types)``: solve the population score equation for theta."""
    S = _symbols()
    ident = logistic_identity()
    theta = S["theta"]
    types = _prompt_types(S)
    score = sum(
        t.prob * sum(pr.weight * ident.d1.expr.subs({ident.z: theta * pr.dphi, ident.g: pr.g_star}) * pr.dphi
                     for pr in t.pairs)
        for t in types
    )
    # theta = logit(sig) maps (0, 1) onto the real line, so every root in theta is a root in sig
    sig = sp.Symbol("sig", positive=True)
    roots = sp.solve(sp.cancel(sp.together(score.subs(theta, sp.log(sig / (1 - sig))))), sig)
    if len(roots) != 1:
        raise RuntimeError(f"two-type scenario: expected one root of the score equation, got {roots}")
    pbar = sp.expand(roots[0])
    return score, sp.log(pbar / (1 - pbar)), pbar, types


@dataclass(frozen=True)
class _LabelledPair:
    """Ring elements of one pair: weight, ``P(Z = 1)``, ``A`` for ``Z = 1, 0``, and ``b``."""

    weight: Any
    g_star: Any
    A1: Any
    A0: Any
    b: Any


@dataclass(frozen=True)
class _Algebra:
    """The scenario at ``theta_dagger`` in the polynomial ring ``QQ[q, ..., lam, 1/M, 1/(1+rho)]``."""

    R: Any
    gens: dict[str, Any]
    pbar: Any
    H: Any
    omega: Any
    omega_design: Any
    within: Any
    pairs: tuple[tuple[Any, tuple[_LabelledPair, ...]], ...]  # per type: (probability, pairs)


def _variance(probs: Sequence[Any], values: Sequence[Any]) -> Any:
    """``Var_x`` of a quantity equal to ``values[x]`` with probability ``probs[x]``."""
    first = sum(p * v for p, v in zip(probs, values))
    return sum(p * v**2 for p, v in zip(probs, values)) - first**2


@functools.lru_cache(maxsize=None)
def _algebra() -> _Algebra:
    r"""Enumerate pairs and labels of each prompt type at ``theta_dagger`` and assemble ``Omega(lam)``.

    ``m'_g`` and ``m''_g`` are :func:`logistic_identity`'s derivatives evaluated at the margin
    ``theta_dagger dphi`` (with ``sigmoid(theta_dagger) = pbar`` each is a polynomial), so the algebra is
    exact polynomial arithmetic in the generators ``q, p0, p1, r, h0, k0, h1, k1, lam, 1/M, c = 1/(1+rho)``.
    Labelled prompt: ``C = A + kappa B``, ``kappa = c lam``, ``B`` the mean of ``M`` reference pairs,
    independent of ``A`` given ``x``; ``Omega = Var(C) + rho kappa^2 Var(B)`` with ``rho kappa^2 = (1-c) c lam^2``.
    """
    S = _symbols()
    ident = logistic_identity()
    _, theta_d, pbar_expr, types = _target()
    R, *gl = ring([S[n] for n in _RING_NAMES] + [_INV_M, _C_RHO], QQ)
    G = dict(zip(_RING_NAMES + ("inv_M", "c_rho"), gl))
    lam, mu, c = G["lam"], G["inv_M"], G["c_rho"]

    def at(expr: Any, dphi: int, gv: Any = 0) -> Any:  # a derivative of m_g at the margin theta_dagger dphi
        # exp(-log(P / (1 - P))) evaluates to (1 - P) / P, so cancel() leaves a polynomial
        return R(sp.expand(sp.cancel(expr.subs({ident.z: theta_d * dphi, ident.g: gv}))))

    H = omega_design = within = R.zero
    probs, EA, EA2, Eb, Eb2, stored = [], [], [], [], [], []
    for t in types:
        prob = R(t.prob)
        ea = ea2 = eb = eb2 = c1 = c2 = R.zero
        pairs = []
        for pr in t.pairs:
            d = pr.dphi
            w, gs = R(pr.weight), R(pr.g_star)
            mp_hat = at(ident.d1.expr, d, pr.g_hat)
            mp_star = at(ident.d1.expr, d, pr.g_star)  # s - g*
            A1 = (at(ident.d1.expr, d, 1) - lam * mp_hat) * d  # labelled part of the score, Z = 1
            A0 = (at(ident.d1.expr, d, 0) - lam * mp_hat) * d  # Z = 0
            b = mp_hat * d
            pairs.append(_LabelledPair(w, gs, A1, A0, b))
            ea += w * (gs * A1 + (1 - gs) * A0)
            ea2 += w * (gs * A1**2 + (1 - gs) * A0**2)
            eb += w * b
            eb2 += w * b**2
            H += prob * w * at(ident.d2.expr, d) * d**2
            omega_design += prob * w * (gs * (1 - gs) + mp_star**2) * d**2
            c1 += w * (-mp_star) * d  # E[(g* - s) dphi | x]
            c2 += w * (mp_star * d) ** 2
        within += prob * (c2 - c1**2)
        probs.append(prob)
        EA.append(ea)
        EA2.append(ea2)
        Eb.append(eb)
        Eb2.append(eb2)
        stored.append((prob, tuple(pairs)))
    kappa = c * lam
    var_b = [Eb2[x] - Eb[x] ** 2 for x in range(2)]
    var_C = (sum(p * (EA2[x] - EA[x] ** 2 + kappa**2 * mu * var_b[x]) for x, p in enumerate(probs))
             + _variance(probs, [EA[x] + kappa * Eb[x] for x in range(2)]))
    var_B = sum(p * mu * var_b[x] for x, p in enumerate(probs)) + _variance(probs, Eb)
    omega = var_C + (1 - c) * c * lam**2 * var_B
    return _Algebra(R=R, gens=G, pbar=R(pbar_expr), H=H, omega=omega, omega_design=omega_design,
                    within=within, pairs=tuple(stored))


def _scenario_formula(fn_expr: Any, names: Sequence[str], factor: bool = False) -> Formula:
    """A scenario Formula: ``fn_expr`` is in ``1/M`` and ``c = 1/(1+rho)``, the shown ``expr`` in ``M`` and ``rho``."""
    S = _symbols()
    names = tuple(names)
    fn_args = [_INV_M if n == "M" else _C_RHO if n == "rho" else S[n] for n in names]
    expr = fn_expr.xreplace({_INV_M: 1 / S["M"], _C_RHO: 1 / (1 + S["rho"])})
    if factor:
        expr = sp.factor(expr)
    return Formula(expr=expr, args=tuple(S[n] for n in names), names=names,
                   fn=sp.lambdify(fn_args, fn_expr, modules="numpy"),
                   transformed=tuple(n for n in names if n in _TRANSFORMS))


def _oracle(alg: _Algebra) -> list[tuple[Any, Any]]:
    """``g_hat = g*``: ``h_x = p_x``, ``k_x = 1 - p_x``."""
    G = alg.gens
    return [(G["h0"], G["p0"]), (G["k0"], 1 - G["p0"]), (G["h1"], G["p1"]), (G["k1"], 1 - G["p1"])]


def _nonnegative_on_domain(expr: Any) -> bool | None:
    """sympy's ``is_nonnegative`` after mapping ``q, r, p0, p1`` in (0, 1) and ``M >= 1`` onto positive symbols."""
    S = _symbols()
    a, b, c0, c1 = sp.symbols("a_q a_r a_p0 a_p1", positive=True)
    m = sp.Symbol("m_M", nonnegative=True)
    sub = {S["q"]: a / (1 + a), S["r"]: b / (1 + b), S["p0"]: c0 / (1 + c0), S["p1"]: c1 / (1 + c1), S["M"]: 1 + m}
    return sp.factor(sp.cancel(sp.together(expr.subs(sub)))).is_nonnegative


@functools.lru_cache(maxsize=None)
def _closed_forms() -> dict[str, Any]:
    r"""The stated closed forms of the scenario, written in ``1/M`` (``inv_M``) and ``c = 1/(1+rho)`` (``c_rho``).

    ``X`` and ``Y`` use ``beta_x0 = pbar - h_x``, ``beta_x1 = pbar + k_x - 1`` (values of ``b = (s - g_hat) dphi``
    on the pairs ``(0,1)``, ``(1,0)``), ``e_x = pbar - p_x`` (value of ``E[a|pair] = (s - g*) dphi`` on both) and
    ``bbar_x = (w/2)(beta_x0 + beta_x1)``; see :func:`optimal_lambda_closed_form`.
    """
    S = _symbols()
    q, p0, p1, r, lam = (S[n] for n in ("q", "p0", "p1", "r", "lam"))
    mu, c = _INV_M, _C_RHO
    w = 2 * r * (1 - r)
    V = q * (1 - q) * (p0 - p1) ** 2
    pbar = q * p0 + (1 - q) * p1
    pq = pbar * (1 - pbar)
    probs = (q, 1 - q)
    beta = ((pbar - S["h0"], pbar + S["k0"] - 1), (pbar - S["h1"], pbar + S["k1"] - 1))
    bbar = [w / 2 * (b0 + b1) for b0, b1 in beta]
    X = w / 2 * (1 - c * w) * q * (1 - q) * (p0 - p1) * ((S["h0"] - S["k0"]) - (S["h1"] - S["k1"]))
    Y = ((1 + c * mu) * sum(p * w / 2 * (b0**2 + b1**2) for p, (b0, b1) in zip(probs, beta))
         - c * (1 + mu) * sum(p * bb**2 for p, bb in zip(probs, bbar))
         - (1 - c) * sum(p * bb for p, bb in zip(probs, bbar)) ** 2)
    X_expect = w / 2 * (1 - c * w) * sum(p * (pbar - px) * (b0 + b1) for p, px, (b0, b1) in zip(probs, (p0, p1), beta))
    return {
        "w": w, "V": V, "pbar": pbar, "pq": pq,
        "H": w * pq, "omega_mle": w * pq, "within": w * (1 - w) * V,
        "difference": (1 - mu) * w * (1 - w) * V,
        "omega_vr": w * pq - (1 - mu) * w * (1 - w) * V,
        "ratio": 1 - (1 - mu) * (1 - w) * V / pq,
        "ratio_bound": 1 - (1 - mu) * (1 - w),
        "X": X, "X_expectation": X_expect, "Y": Y,
        "omega": w * pq - 2 * lam * X + lam**2 * Y,
        "lam_star_oracle": (1 - c * w) / ((1 - c * w) + c * (1 - w) * mu),
    }


@functools.lru_cache(maxsize=None)
def two_type_scenario() -> TwoTypeScenario:
    r"""Derive the MLE and VRPO asymptotics of a one-dimensional misspecified scenario.

    Scenario: prompt types ``x = 0, 1`` with probabilities ``q, 1 - q``; two responses with features
    ``phi = +1/2, -1/2`` (``d = 1``); reference policy ``pi_ref(0|x) = r`` (uniform: ``r = 1/2``); pairs
    ``(a, b) ~ pi_ref x pi_ref``, so ``dphi = +1`` for ``(0, 1)``, ``-1`` for ``(1, 0)`` and ``0`` for the two
    ties; ``g*(x, 0, 1) = p_x``, ``g*(x, 1, 0) = 1 - p_x``. One ``theta`` without prompt dependence cannot
    fit ``p0 != p1``: the BT model is misspecified. ``w = 2 r (1 - r)``, ``pbar = q p0 + (1 - q) p1``,
    ``V = q (1 - q)(p0 - p1)^2``.

    Derivation (logistic loss, ``m_g' = s - g``, ``m_g'' = s(1 - s)`` from :func:`logistic_identity`):

    * score ``E[(s - g*) dphi] = w sum_x q_x (sigmoid(theta) - p_x)``; solving (via ``theta = logit(sig)``)
      gives ``sigmoid(theta_dagger) = pbar``, ``theta_dagger = log(pbar / (1 - pbar))``;
    * ``H = E[s(1-s) dphi^2] = w pbar (1 - pbar)``;
    * with ``A = (m'_Z(u) - lam m'_ghat(u)) dphi`` on the labelled pair, ``b = m'_ghat(u) dphi`` on a
      reference pair, ``B`` the mean of ``M`` reference pairs (independent of ``A`` given ``x``) and
      ``kappa = lam / (1 + rho)``, the meat ``Omega(lam) = Var(A + kappa B) + rho kappa^2 Var(B)`` is
      expanded by the law of total variance over the exact pair-and-label enumeration of each type
      (:func:`two_type_omega_enumerated` checks this step by brute force); it equals
      ``w pbar (1 - pbar) - 2 lam X + lam^2 Y`` (``X``, ``Y`` in :func:`optimal_lambda_closed_form`);
    * ``Omega_MLE = Omega(0) = E[{g*(1-g*) + (g* - s)^2} dphi^2] = w pbar (1 - pbar) = H``: here the
      misspecification term ``(g* - s)^2`` is exactly offset by a smaller ``g*(1 - g*)``, so ``cov_MLE = 1/H``
      is what the model-based (BT) variance would say;
    * oracle ``g_hat = g*``, ``lam = 1``, ``rho = 0``:
      ``Omega_MLE - Omega_VR = (1 - 1/M) E_x[Var_{pair|x}((g* - s) dphi)]`` and
      ``E_x Var_{pair|x} = w (1 - w) V``: on a prompt of type ``x`` the value ``(g* - s) dphi`` is
      ``p_x - pbar`` on both non-tie pairs and 0 on the ties. A product of non-negative factors
      (``M >= 1``): zero for ``M = 1`` (the published one-pair configuration) and under BT (``p0 = p1``);
    * ``ratio = Omega_VR / Omega_MLE = 1 - (1 - 1/M)(1 - w) V / (pbar (1 - pbar))``; since
      ``pbar (1 - pbar) = V + E_x[p_x (1 - p_x)] >= V``, ``ratio >= 1 - (1 - 1/M)(1 - w)`` (1/2 for
      uniform ``pi_ref`` and ``M -> inf``), reached when the preferences are deterministic but
      prompt-dependent (``p0, p1 = 1, 0``).
    """
    S = _symbols()
    ident = logistic_identity()
    score, theta_d, pbar_expr, _ = _target()
    alg = _algebra()
    cf = _closed_forms()
    G, R = alg.gens, alg.R
    q, p0, p1, lam, mu, c = (G[n] for n in ("q", "p0", "p1", "lam", "inv_M", "c_rho"))
    ring_cf = {k: R(cf[k]) for k in ("w", "V", "pq", "H", "omega_mle", "within", "difference", "omega_vr",
                                    "ratio_bound", "omega")}
    w, V, pq, bound = ring_cf["w"], ring_cf["V"], ring_cf["pq"], ring_cf["ratio_bound"]

    omega_mle = alg.omega.subs(lam, 0)
    omega_vr = alg.omega.compose(_oracle(alg)).subs(lam, 1).subs(c, 1)
    difference = omega_mle - omega_vr
    deterministic = [(p0, R.one), (p1, R.zero)]
    theta = S["theta"]
    score_closed = cf["w"] * (ident.sigmoid.expr.subs(ident.z, theta) - pbar_expr)
    ring_residuals = {
        "pbar": alg.pbar - R(cf["pbar"]),
        "H": alg.H - ring_cf["H"],
        "omega": alg.omega - ring_cf["omega"],
        "omega_mle": omega_mle - ring_cf["omega_mle"],
        "omega_mle_design": omega_mle - alg.omega_design,
        "omega_mle_equals_H": omega_mle - alg.H,
        "omega_vr": omega_vr - ring_cf["omega_vr"],
        "within": alg.within - ring_cf["within"],
        "difference": difference - ring_cf["difference"],
        "difference_is_within": difference - (1 - mu) * alg.within,
        "ratio": omega_vr * pq - omega_mle * (pq - (1 - mu) * (1 - w) * V),
        "pbar_variance_split": pq - V - q * p0 * (1 - p0) - (1 - q) * p1 * (1 - p1),
        "ratio_at_deterministic_preferences":
            omega_vr.compose(deterministic) - bound * omega_mle.compose(deterministic),
    }
    residuals: dict[str, Any] = {
        "score": _residual(score, score_closed),
        "score_at_theta_dagger": _residual(score.subs(theta, theta_d), 0),
    }
    residuals.update({k: v.as_expr() for k, v in ring_residuals.items()})

    to_M = {_INV_M: 1 / S["M"], _C_RHO: 1 / (1 + S["rho"])}
    derived = {
        "H": sp.factor(alg.H.as_expr()),
        "omega": alg.omega.as_expr().xreplace(to_M),
        "omega_mle": sp.factor(omega_mle.as_expr()),
        "omega_vr": sp.factor(omega_vr.as_expr().xreplace(to_M)),
        "within": sp.factor(alg.within.as_expr()),
        "difference": sp.factor(difference.as_expr().xreplace(to_M)),
        "ratio": sp.factor((omega_vr.as_expr() / omega_mle.as_expr()).xreplace(to_M)),
    }
    base = ("q", "p0", "p1", "r")
    H = cf["H"]
    return TwoTypeScenario(
        symbols=dict(S), p_bar=pbar_expr, score=score, score_closed=score_closed,
        theta_dagger=_formula(theta_d, (S["q"], S["p0"], S["p1"])),
        H=_scenario_formula(H, base),
        omega=_scenario_formula(cf["omega"], _OMEGA_ARGS),
        cov=_scenario_formula(cf["omega"] / H**2, _OMEGA_ARGS),
        omega_mle=_scenario_formula(cf["omega_mle"], base),
        omega_vr=_scenario_formula(cf["omega_vr"], base + ("M",)),
        within=_scenario_formula(cf["within"], base),
        difference=_scenario_formula(cf["difference"], base + ("M",)),
        ratio=_scenario_formula(cf["ratio"], base + ("M",)),
        ratio_bound=_scenario_formula(cf["ratio_bound"], ("r", "M")),
        cov_mle=_scenario_formula(1 / H, base),
        cov_vr=_scenario_formula(cf["omega_vr"] / H**2, base + ("M",)),
        derived=derived,
        difference_nonnegative=_nonnegative_on_domain(derived["difference"]),
        ratio_above_bound=_nonnegative_on_domain(derived["ratio"] - cf["ratio_bound"].xreplace(to_M)),
        residuals=residuals,
    )


@dataclass(frozen=True)
class EnumeratedOmega:
    """``Omega(lam)`` of the two-type scenario (``rho = 0``) by brute force at a given ``M``.

    ``omega``: Formula of (q, p0, p1, r, h0, k0, h1, k1, lam); ``residual``: this minus
    ``two_type_scenario().omega`` at the same ``M`` and ``rho = 0`` (zero).
    """

    M: int
    omega: Formula
    residual: sp.Expr


def two_type_omega_enumerated(M: int) -> EnumeratedOmega:
    r"""``Omega(lam) = Var(A + lam B)`` of the two-type scenario (``rho = 0``) over the whole joint law.

    Sums over every outcome of (prompt type, labelled pair, label, ``M`` ordered reference pairs) with
    its probability, without the conditional-independence shortcut of :func:`two_type_scenario`, so it
    checks that step at a given integer ``M`` (``1 <= M <= 3``).
    """
    return _enumerated(_check_size("M", M, 3))


@functools.lru_cache(maxsize=None)
def _enumerated(M: int) -> EnumeratedOmega:
    alg = _algebra()
    R, lam = alg.R, alg.gens["lam"]
    first = second = R.zero
    for prob, pairs in alg.pairs:
        for draw in itertools.product(pairs, repeat=M):
            p_draw = prob * math.prod((pr.weight for pr in draw), start=R.one)
            B = sum((pr.b for pr in draw), R.zero) * QQ(1, M)
            for lab in pairs:
                for A, pz in ((lab.A1, lab.g_star), (lab.A0, 1 - lab.g_star)):
                    C = A + lam * B
                    weight = p_draw * lab.weight * pz
                    first += weight * C
                    second += weight * C**2
    omega = second - first**2
    general = alg.omega.subs(alg.gens["inv_M"], QQ(1, M)).subs(alg.gens["c_rho"], 1)
    return EnumeratedOmega(M=M, omega=_scenario_formula(omega.as_expr(), _RING_NAMES, factor=False),
                           residual=(omega - general).as_expr())


# --------------------------------------------------------------------------------------------
# 4. the optimal lambda


@dataclass(frozen=True)
class OptimalLambdaClosedForm:
    r"""The weight ``lam`` minimising ``f(lam) = tr(W H^-1 Omega(lam) H^-1)``.

    General form (``d x d`` symbol matrices ``W' = H^-1 W H^-1``, ``O_0``, ``X``, ``Y``): with
    ``Omega(lam) = O_0 - lam (X + X^T) + lam^2 Y``, ``f(lam) = tr(W' O_0) - lam tr(W'(X + X^T)) + lam^2 tr(W' Y)``
    and ``f'' = 2 tr(W' Y) >= 0`` (``W'`` and ``Y`` PSD), so the stationary point
    ``lam* = tr(W'(X + X^T)) / (2 tr(W' Y))`` (``= tr(W' X) / tr(W' Y)`` for symmetric ``W'``) is the
    minimiser and ``f(lam*) = tr(W' O_0) - tr(W' X)^2 / tr(W' Y)``.

    Attributes
    ----------
    d : size of the general derivation.
    f : ``f(lam)`` (sympy, general form).
    lam_star : Formula of ``(Wp, X, Y)`` (``d x d`` arrays), ``tr(W'(X + X^T)) / (2 tr(W' Y))``.
    value : Formula of ``(Wp, O0, X, Y)``, ``f(lam*)``.
    two_type_lam_star : ``lam* = X / Y`` in :func:`two_type_scenario` (args q, p0, p1, r, h0, k0, h1, k1, M, rho),
        the root of ``d Omega / d lam = 0`` there (weight-free: ``d = 1``).
    two_type_X, two_type_Y : ``X`` and ``Y`` of that scenario (``Omega = O_0 - 2 lam X + lam^2 Y``), same args:
        the closed forms of :func:`optimal_lambda_closed_form`, proven equal to the coefficients of the
        derived ``Omega`` (``residuals``).
    two_type_oracle : ``lam*`` at ``g_hat = g*`` (args r, M, rho):
        ``M (1 + rho - w) / (M (1 + rho - w) + 1 - w)``, ``w = 2 r (1 - r)``; ``M / (M + 1)`` at ``rho = 0``.
    residuals : name -> derived minus stated form (zero); the two-type ones are exact polynomial
        identities (cross-multiplied where rational).
    """

    d: int
    f: sp.Expr
    lam_star: Formula
    value: Formula
    two_type_lam_star: Formula
    two_type_X: Formula
    two_type_Y: Formula
    two_type_oracle: Formula
    residuals: dict[str, Any]

    @property
    def proven(self) -> bool:
        """Whether every residual is identically zero."""
        return all(_is_zero(r) for r in self.residuals.values())


def optimal_lambda_closed_form(d: int = 2) -> OptimalLambdaClosedForm:
    r"""Derive ``lam*`` from ``Omega(lam)`` being quadratic: general ``d x d`` form and the two-type scenario.

    Two-type scenario (notation of :func:`two_type_scenario`), with ``beta_x0 = pbar - h_x`` and
    ``beta_x1 = pbar + k_x - 1`` (the values of ``b = (s - g_hat) dphi`` on the pairs ``(0,1)`` and ``(1,0)``),
    ``e_x = pbar - p_x`` (the value of ``E[a | pair] = (s - g*) dphi`` on both), ``c = 1/(1+rho)`` and
    ``bbar_x = (w/2)(beta_x0 + beta_x1)``:
    ``X = (w/2)(1 - c w) E_x[e_x (beta_x0 + beta_x1)]``,
    ``Y = (1 + c/M) E_x[(w/2)(beta_x0^2 + beta_x1^2)] - c (1 + 1/M) E_x[bbar_x^2] - (1 - c)(E_x bbar_x)^2``,
    ``lam* = X / Y``. ``X`` factors as ``(w/2)(1 - c w) q (1 - q)(p0 - p1)(delta_0 - delta_1)`` with
    ``delta_x = h_x - k_x = g_hat(x,0,1) - g_hat(x,1,0)``: ``Y >= 0``, so ``lam* > 0`` iff the auxiliary model's
    prompt dependence points the way of the true one, and ``lam* = 0`` (no gain over the MLE) for any
    ``g_hat`` whose ``delta_x`` does not depend on the prompt type (a constant, or a prompt-blind BT fit).
    For ``g_hat = g*`` (``beta = e``): ``lam* = M (1 + rho - w) / (M (1 + rho - w) + 1 - w)``.
    """
    return _optimal_lambda(_check_size("d", d, 3))


@functools.lru_cache(maxsize=None)
def _optimal_lambda(d: int) -> OptimalLambdaClosedForm:
    lam = sp.Symbol("lam", real=True)
    mat = lambda name: sp.Matrix(d, d, lambda i, j: sp.Symbol(f"{name}_{i}_{j}", real=True))  # noqa: E731
    Wp, O0, X, Y = mat("Wp"), mat("O0"), mat("X"), mat("Y")
    sym = lambda A: sp.Matrix(d, d, lambda i, j: A[min(i, j), max(i, j)])  # noqa: E731
    f = (Wp * (O0 - lam * (X + X.T) + lam**2 * Y)).trace()
    roots = sp.solve(sp.diff(f, lam), lam)
    if len(roots) != 1:
        raise RuntimeError(f"optimal lambda: expected one stationary point, got {roots}")
    lam_star = roots[0]
    closed = (Wp * (X + X.T)).trace() / (2 * (Wp * Y).trace())
    Wps, Ys = sym(Wp), sym(Y)
    residuals: dict[str, Any] = {
        "lam_star": _residual(lam_star, closed),
        "lam_star_symmetric_weight": _residual(
            lam_star.xreplace(dict(zip(Wp, Wps))), (Wps * X).trace() / (Wps * Y).trace()),
        "curvature": _residual(sp.diff(f, lam, 2), 2 * (Wp * Y).trace()),
        "value": _residual(
            f.subs(lam, lam_star).xreplace(dict(zip(Wp, Wps))).xreplace(dict(zip(Y, Ys))),
            (Wps * O0).trace() - (Wps * X).trace() ** 2 / (Wps * Ys).trace()),
    }
    value = f.subs(lam, closed)

    # the two-type scenario: Omega(lam) = O_0 - 2 lam X + lam^2 Y exactly, so d Omega / d lam = 2 (lam Y - X)
    alg = _algebra()
    cf = _closed_forms()
    G, R = alg.gens, alg.R
    glam, mu, c = G["lam"], G["inv_M"], G["c_rho"]
    omega = alg.omega
    if omega.degree(glam) != 2:
        raise RuntimeError(f"two-type Omega is not quadratic in lam (degree {omega.degree(glam)})")
    slope = omega.diff(glam)
    X2 = slope.subs(glam, 0) * QQ(-1, 2)  # the root of slope = 0 is lam* = X2 / Y2
    Y2 = slope.diff(glam) * QQ(1, 2)
    oracle = _oracle(alg)
    X_or, Y_or = X2.compose(oracle), Y2.compose(oracle)
    num_or, den_or = sp.fraction(sp.together(cf["lam_star_oracle"]))
    residuals.update({
        "two_type_omega": (omega - (omega.subs(glam, 0) - 2 * glam * X2 + glam**2 * Y2)).as_expr(),
        "two_type_X": (X2 - R(cf["X"])).as_expr(),
        "two_type_X_expectation": (X2 - R(cf["X_expectation"])).as_expr(),
        "two_type_Y": (Y2 - R(cf["Y"])).as_expr(),
        "two_type_oracle": (X_or * R(den_or) - Y_or * R(num_or)).as_expr(),
    })
    S = _symbols()
    oracle_f = _scenario_formula(cf["lam_star_oracle"], ("r", "M", "rho"), factor=True)
    residuals["two_type_oracle_rho0"] = _residual(oracle_f.expr.subs(S["rho"], 0), S["M"] / (S["M"] + 1))
    args = _OMEGA_ARGS[:8] + ("M", "rho")
    return OptimalLambdaClosedForm(
        d=d, f=f,
        lam_star=_formula(closed, (Wp.tolist(), X.tolist(), Y.tolist()), ("Wp", "X", "Y")),
        value=_formula(value, (Wp.tolist(), O0.tolist(), X.tolist(), Y.tolist()), ("Wp", "O0", "X", "Y")),
        two_type_lam_star=_scenario_formula(cf["X"] / cf["Y"], args),
        two_type_X=_scenario_formula(cf["X"], args),
        two_type_Y=_scenario_formula(cf["Y"], args),
        two_type_oracle=oracle_f,
        residuals=residuals,
    )


# --------------------------------------------------------------------------------------------
# the two-type scenario as a PairPopulation


def _check_counts(counts: object) -> tuple[int, int]:
    try:
        n0, n1 = counts  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InputError(f"counts: expected two prompt counts (type 0, type 1), got {counts!r}") from None
    for name, v in (("counts[0]", n0), ("counts[1]", n1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"{name}: need a non-negative integer, got {v!r}")
    if n0 + n1 < 1:
        raise InputError("counts: need at least one prompt")
    return int(n0), int(n1)


def _check_unit(name: str, value: object, open_: bool = False) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a number, got {value!r}") from None
    ok = (0.0 < v < 1.0) if open_ else (0.0 <= v <= 1.0)
    if not ok:
        raise InputError(f"{name}: must lie in {'(0, 1)' if open_ else '[0, 1]'}, got {value!r}")
    return v


def two_type_population(counts: tuple[int, int], p: tuple[float, float], r: float = 0.5) -> PairPopulation:
    r"""The two-type scenario as a ``PairPopulation``: ``counts[x]`` prompt rows of type ``x``.

    ``PairPopulation`` averages its ``P`` rows with equal weight, so ``q = counts[0] / (counts[0] + counts[1])``.
    Rows of type ``x``: ``phi = [[+1/2], [-1/2]]``, ``pi = (r, 1 - r)``, ``g* = [[1/2, p_x], [1 - p_x, 1/2]]``
    (the tie entries do not matter: ties have ``dphi = 0``). Type-0 rows come first.
    """
    n0, n1 = _check_counts(counts)
    try:
        pp = tuple(p)
    except TypeError:
        raise InputError(f"p: expected two probabilities (p0, p1), got {p!r}") from None
    if len(pp) != 2:
        raise InputError(f"p: expected two probabilities (p0, p1), got {p!r}")
    p0, p1 = (_check_unit(f"p[{i}]", v) for i, v in enumerate(pp))
    rr = _check_unit("r", r, open_=True)
    P = n0 + n1
    phi = np.broadcast_to(np.array([[0.5], [-0.5]]), (P, 2, 1)).copy()
    pi = np.broadcast_to(np.array([rr, 1.0 - rr]), (P, 2)).copy()
    px = np.repeat([p0, p1], [n0, n1])
    g = np.full((P, 2, 2), 0.5)
    g[:, 0, 1] = px
    g[:, 1, 0] = 1.0 - px
    return PairPopulation(phi, pi, g)


def two_type_auxiliary(counts: tuple[int, int], h: tuple[float, float], k: tuple[float, float]) -> np.ndarray:
    r"""``g_hat`` (P, 2, 2) for :func:`two_type_population`: ``g_hat(x, 0, 1) = h[x]``, ``g_hat(x, 1, 0) = k[x]``."""
    n0, n1 = _check_counts(counts)
    vals = {}
    for name, pair in (("h", h), ("k", k)):
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise InputError(f"{name}: expected two probabilities (type 0, type 1), got {pair!r}") from None
        vals[name] = (_check_unit(f"{name}[0]", a), _check_unit(f"{name}[1]", b))
    g = np.full((n0 + n1, 2, 2), 0.5)
    g[:, 0, 1] = np.repeat(vals["h"], [n0, n1])
    g[:, 1, 0] = np.repeat(vals["k"], [n0, n1])
    return g


# --------------------------------------------------------------------------------------------
# 5. the second-order bias of an M-estimator


@dataclass(frozen=True)
class SecondOrderBias:
    r"""The O(1/n) bias of an M-estimator, derived from its stochastic expansion (``d`` parameters).

    The estimating equation at ``theta_dagger + delta`` is, to second order,
    ``0 = eps W + (H + eps V) delta + T[delta, delta] / 2`` with ``eps = n^{-1/2}``: ``W`` the scaled
    noise of the mean gradient (``E W = 0``, ``E W W^T = Omega``), ``V`` that of the mean Hessian
    (``E V = 0``, ``E[V_ij W_k] = K_ijk = Cov(J_ij, G_k)`` per observation) and ``T`` the third-derivative
    tensor. Solving order by order, ``delta = eps d1 + eps^2 d2`` with ``d1 = -H^-1 W`` and
    ``d2 = -H^-1 (V d1 + T[d1, d1] / 2)``; taking expectations,

    .. math::
        E[\hat\theta] - \theta^\dagger = \frac{1}{n} H^{-1}\Big(C - \tfrac12 T[\Sigma]\Big),\quad
        C_i = \sum_{jk} K_{ijk} (H^{-1})_{jk},\quad \Sigma = H^{-1} \Omega H^{-1},

    the closed form ``asymptotics.vr_bias`` evaluates (there ``C = E[J H^-1 G] - E J H^-1 E G``).

    Attributes
    ----------
    d : number of parameters.
    d1, d2 : the expansion's terms (sympy, in the symbols of ``W``, ``V``, ``H``, ``T``).
    bias : Formula of ``(H, T, Omega, K)`` (``d x d``, ``d x d x d`` as a ``d x d^2`` matrix ``T[i, j d + k]``,
        ``d x d``, and ``K[i, j d + k] = K_ijk``): the derived ``E[d2]``.
    residual : derived minus the stated closed form (zero).
    """

    d: int
    d1: Any
    d2: Any
    bias: Formula
    residual: Any

    @property
    def proven(self) -> bool:
        """Whether the residual is identically zero."""
        return _is_zero(self.residual)


def second_order_bias(d: int = 2) -> SecondOrderBias:
    """Derive the second-order bias ``H^-1 (C - T[Sigma] / 2) / n`` from the stochastic expansion
    (``d`` = 1 or 2, about a second; larger ``d`` is refused: the symbolic inverse takes minutes). ``H``, ``Omega``
    and ``T`` are symmetric symbols (``T`` fully), as the moments they stand for are: an asymmetric numeric
    input is read from one triangle only."""
    return _second_order_bias(_check_size("d", d, 2))


@functools.lru_cache(maxsize=None)
def _second_order_bias(d: int) -> SecondOrderBias:
    eps = sp.Symbol("eps", positive=True)
    idx = range(d)
    H = sp.Matrix(d, d, lambda i, j: sp.Symbol(f"H_{min(i, j)}_{max(i, j)}", real=True))
    T = {(i, j, k): sp.Symbol("T_" + "_".join(map(str, sorted((i, j, k)))), real=True)
         for i in idx for j in idx for k in idx}
    W = sp.Matrix(d, 1, lambda i, _: sp.Symbol(f"W_{i}", real=True))
    V = sp.Matrix(d, d, lambda i, j: sp.Symbol(f"V_{i}_{j}", real=True))
    a = sp.Matrix(d, 1, lambda i, _: sp.Symbol(f"a_{i}", real=True))  # unknown d1
    b = sp.Matrix(d, 1, lambda i, _: sp.Symbol(f"b_{i}", real=True))  # unknown d2
    delta = eps * a + eps**2 * b
    quad = sp.Matrix(d, 1, lambda i, _: sum(T[i, j, k] * delta[j] * delta[k] for j in idx for k in idx))
    eq = (eps * W + (H + eps * V) * delta + quad / 2).applyfunc(sp.expand)
    first = sp.solve([e.coeff(eps, 1) for e in eq], list(a), dict=True)[0]
    second = sp.solve([e.coeff(eps, 2).subs(first) for e in eq], list(b), dict=True)[0]
    d1 = a.subs(first).applyfunc(sp.simplify)
    d2 = b.subs(second)
    # E[.] of a polynomial in the noise: E W_j W_k = Omega_jk, E V_ij W_k = K_ijk, E W = E V = 0
    Om = sp.Matrix(d, d, lambda i, j: sp.Symbol(f"Omega_{min(i, j)}_{max(i, j)}", real=True))
    K = {(i, j, k): sp.Symbol(f"K_{i}_{j}_{k}", real=True) for i in idx for j in idx for k in idx}
    noise = [*W, *V]

    def expect(expr: Any) -> Any:
        poly = sp.Poly(sp.expand(sp.together(expr) * sp.denom(sp.together(expr))), *noise)
        out = 0
        for powers, coef in poly.terms():
            used = [s for s, p in zip(noise, powers) for _ in range(p)]
            if len(used) != 2:  # E of one noise term is zero; the expansion has no higher ones at this order
                continue
            s, t = used
            if s in W and t in W:
                out += coef * Om[list(W).index(s), list(W).index(t)]
            else:
                v, w = (s, t) if s in V else (t, s)
                i, j = divmod(list(V).index(v), d)
                out += coef * K[i, j, list(W).index(w)]
        return out / sp.denom(sp.together(expr))

    derived = d2.applyfunc(expect)
    Hinv = H.inv()
    Sigma = Hinv * Om * Hinv
    C = sp.Matrix(d, 1, lambda i, _: sum(K[i, j, k] * Hinv[j, k] for j in idx for k in idx))
    TS = sp.Matrix(d, 1, lambda i, _: sum(T[i, j, k] * Sigma[j, k] for j in idx for k in idx))
    closed = Hinv * (C - TS / 2)
    residual = _residual(derived, closed)
    Tm = sp.Matrix(d, d * d, lambda i, jk: T[i, jk // d, jk % d])
    Km = sp.Matrix(d, d * d, lambda i, jk: K[i, jk // d, jk % d])
    fn = _formula(closed, [H.tolist(), Tm.tolist(), Om.tolist(), Km.tolist()], ["H", "T", "Omega", "K"])
    return SecondOrderBias(d=d, d1=d1, d2=d2, bias=fn, residual=residual)
