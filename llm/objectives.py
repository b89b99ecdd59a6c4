r"""The training objectives of the LLM trainers, as calls to the loss functions of ``theory``.

A batch of ``B`` rows gives a labelled margin ``z_i`` (chosen minus rejected), and, with ``M``
reference pairs per row, reference margins ``z_ij``. The margin is
``beta * [(log pi(a|x) - log pi_ref(a|x)) - (log pi(b|x) - log pi_ref(b|x))]`` (one-stage) or
``r(x, a) - r(x, b)`` (two-stage). The chosen response won, so the label is ``Z_i = 1``. Per row,
with ``m_g(z) = g l(z) + (1 - g) l(-z)`` (``theory.losses.pair_loss``):

* ``mle`` (DPO with the logistic loss, IPO with ``Squared``, SLiC with ``Hinge``): ``A_i = m_1(z_i) = l(z_i)``;
* ``cdpo`` (label smoothing ``eps``): ``m_{1-eps}(z_i)``;
* ``rdpo`` (flip rate ``eps``): ``theory.losses.robust_pair_loss``;
* ``vrpo`` / ``vrpo_tuned``: ``A_i - lam C_i`` with the control variate
  ``C_i = m_{g_i}(z_i) - (1/M) sum_j m_{g_ij}(z_ij)``, which is ``theory.losses.vr_objective`` on row ``i``
  (``vr_terms`` gives ``A_i``, ``m_{g_i}(z_i)`` and the reference mean).

The batch loss is the mean over rows, which equals ``vr_objective`` on the flattened batch because
every row has the same ``M``. ``lam = 0`` is the MLE exactly.

``vrpo_tuned`` estimates ``lam`` from per-row values gathered across processes: it minimises the
empirical variance of ``u_i(lam) = a_i - lam c_i`` over the gathered rows, ``lam_hat = Cov(a, c) / Var(c)``,
clipped to ``[0, 1]``, with ``(a_i, c_i)`` either

* ``target="loss"``: the per-row objective pieces ``(A_i, C_i)``, or
* ``target="margin_shift"``: the per-row gradient projected on a common shift ``delta`` of every margin
  of the row, ``a_i = dA_i/d delta``, ``c_i = dC_i/d delta`` (autograd through ``vr_terms``). For the
  logistic loss ``a_i = -(1 - s_i)`` and ``c_i = -(g_i - s_i) + mean_j (g_ij - s_ij)``, ``s = sigmoid(z)``.
  The labelled pair is shifted in its chosen-first order, which is the label: the label noise is not in
  ``a_i`` (at initialisation ``s_i = 1/2`` and ``a_i`` is constant).
* ``target="oriented_shift"``: the same with the labelled pair shifted in a label-independent order
  (``orientation``, from the collator: chosen first when its token ids sort first), so for the logistic
  loss ``a_i = -(Z_i - s_i)``, ``c_i = -(g_i - s_i) + mean_j (g_ij - s_ij)`` in that order: the influence
  function of DESIGN.md 3.5 with ``dphi`` replaced by the unit shift, label noise included.

Optionally the covariance and variance are exponentially averaged over steps (``ema``) before the ratio.
``lam`` is a constant in the gradient (it is computed from detached values); the trainer folds in a step's
rows after the step, so each step uses the estimate from the steps before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from robust_rlhf.theory.errors import InputError
from robust_rlhf.theory.losses import (
    MarginLoss,
    get_loss,
    pair_loss,
    robust_pair_loss,
    vr_objective,
    vr_terms,
)

__all__ = [
    "METHODS",
    "METHOD_ALIASES",
    "LAMBDA_TARGETS",
    "PreferenceObjective",
    "ObjectiveOutput",
    "LambdaEstimator",
    "margin_shift_scores",
    "variance_summary",
]

METHODS: tuple[str, ...] = ("mle", "vrpo", "vrpo_tuned", "cdpo", "rdpo")
#: baselines named by their usual names: ``method -> (method, loss)``
METHOD_ALIASES: dict[str, tuple[str, str]] = {
    "dpo": ("mle", "logistic"),
    "ipo": ("mle", "ipo"),
    "hinge": ("mle", "hinge"),
}
LAMBDA_TARGETS: tuple[str, ...] = ("loss", "margin_shift", "oriented_shift")


@dataclass(frozen=True)
class ObjectiveOutput:
    """Result of one batch: ``loss`` (scalar, differentiable) and per-row pieces (detached).

    ``labelled`` is ``A_i``; ``control`` is ``m_{g_i}(z_i)`` and ``reference`` the reference mean
    ``(1/M) sum_j m_{g_ij}(z_ij)`` (None unless the method uses the control variate).
    """

    loss: Tensor
    per_example: Tensor
    labelled: Tensor
    control: Tensor | None
    reference: Tensor | None
    lam: float


@dataclass(frozen=True)
class PreferenceObjective:
    """A method and a margin loss; ``evaluate`` turns margins into the batch loss.

    ``lam``: the VRPO weight (``vrpo``), or the starting value of ``vrpo_tuned``; ``eps``: cDPO's label
    smoothing or rDPO's flip rate.
    """

    method: str = "mle"
    loss: MarginLoss = field(default_factory=lambda: get_loss("logistic"))
    lam: float = 1.0
    eps: float = 0.0
    lambda_target: str = "loss"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"method: unknown {self.method!r}; allowed: {', '.join(METHODS + tuple(METHOD_ALIASES))}")
        if not math.isfinite(self.lam):
            raise InputError(f"lam must be finite, got {self.lam}")
        if self.method == "vrpo_tuned" and not 0.0 <= self.lam <= 1.0:
            raise InputError(f"lam: the starting value of vrpo_tuned must lie in [0, 1], got {self.lam}")
        if self.method == "cdpo" and not 0.0 <= self.eps < 0.5:
            raise InputError(f"eps: cDPO label smoothing must lie in [0, 1/2), got {self.eps}")
        if self.method == "rdpo" and not 0.0 <= self.eps < 0.5:
            raise InputError(f"eps: rDPO flip rate must lie in [0, 1/2), got {self.eps}")
        if self.lambda_target not in LAMBDA_TARGETS:
            raise InputError(f"lambda_target: unknown {self.lambda_target!r}; allowed: {', '.join(LAMBDA_TARGETS)}")

    @classmethod
    def from_names(
        cls,
        method: str = "mle",
        loss: str | None = None,
        *,
        truncation: float = -0.5,
        lam: float = 1.0,
        eps: float = 0.0,
        lambda_target: str = "loss",
    ) -> "PreferenceObjective":
        """Resolve names: ``method`` in ``METHODS`` or an alias (``dpo``, ``ipo``, ``hinge``); ``loss`` in
        ``theory.losses.LOSSES`` (default logistic); ``truncation`` is the truncated hinge's ``s``."""
        if method in METHOD_ALIASES:
            method, alias_loss = METHOD_ALIASES[method]
            if loss is not None and loss != alias_loss:
                raise InputError(f"method {method!r} fixes loss={alias_loss!r}, but loss={loss!r} was given")
            loss = alias_loss
        loss = loss or "logistic"
        params = {"s": truncation} if loss == "truncated_hinge" else {}
        return cls(method=method, loss=get_loss(loss, **params), lam=lam, eps=eps, lambda_target=lambda_target)

    @property
    def uses_control_variate(self) -> bool:
        """Whether the method needs reference pairs and ``g_hat``."""
        return self.method in ("vrpo", "vrpo_tuned")

    def evaluate(
        self,
        margin: Tensor,
        ref_margin: Tensor | None = None,
        g: Tensor | None = None,
        ref_g: Tensor | None = None,
        lam: float | None = None,
    ) -> ObjectiveOutput:
        """Batch loss from margins ``(B,)``, reference margins ``(B, M)`` and ``g_hat`` ``(B,)``, ``(B, M)``.

        ``lam`` overrides ``self.lam`` (the tuned value of ``vrpo_tuned``).
        """
        if margin.ndim != 1:
            raise InputError(f"margin: expected shape (B,), got {tuple(margin.shape)}")
        ones = torch.ones_like(margin)
        if self.method == "mle":
            per = pair_loss(self.loss, margin, ones)
            return ObjectiveOutput(per.mean(), per, per.detach(), None, None, 0.0)
        if self.method == "cdpo":
            per = pair_loss(self.loss, margin, 1.0 - self.eps)
            return ObjectiveOutput(per.mean(), per, pair_loss(self.loss, margin, ones).detach(), None, None, 0.0)
        if self.method == "rdpo":
            per = robust_pair_loss(self.loss, margin, self.eps)
            return ObjectiveOutput(per.mean(), per, pair_loss(self.loss, margin, ones).detach(), None, None, 0.0)
        if g is None or ref_g is None or ref_margin is None:
            raise InputError(f"method {self.method!r} needs g_hat (g, ref_g) and reference margins")
        B = margin.shape[0]
        if ref_margin.ndim != 2 or ref_margin.shape[0] != B or ref_margin.shape[1] == 0:
            raise InputError(f"ref_margin: expected shape (B={B}, M>=1), got {tuple(ref_margin.shape)}")
        if tuple(g.shape) != (B,) or tuple(ref_g.shape) != tuple(ref_margin.shape):
            raise InputError(
                f"g/ref_g: expected shapes {(B,)} and {tuple(ref_margin.shape)}, "
                f"got {tuple(g.shape)}, {tuple(ref_g.shape)}"
            )
        lam_value = float(self.lam if lam is None else lam)
        g = g.to(margin.dtype)
        ref_g = ref_g.to(margin.dtype)
        # rows are the leading axis, so theory's reduction over the last axis gives per-row values
        per = vr_objective(self.loss, margin[:, None], ones[:, None], g[:, None], ref_margin, ref_g, lam=lam_value)
        with torch.no_grad():
            lab, ctl, ref = vr_terms(self.loss, margin[:, None], ones[:, None], g[:, None], ref_margin, ref_g)
        return ObjectiveOutput(per.mean(), per, lab, ctl, ref, lam_value)


def margin_shift_scores(
    loss: MarginLoss,
    margin: Tensor,
    g: Tensor,
    ref_margin: Tensor,
    ref_g: Tensor,
    orientation: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-row ``(dA_i/d delta, dC_i/d delta)`` for a shift ``delta_i`` added to every margin of row ``i``.

    ``A_i`` and ``C_i = control_i - reference_i`` come from ``theory.losses.vr_terms``; the derivative is
    taken by autograd, so no loss derivative is written here.

    With ``orientation`` (``o_i = +-1`` per row) the labelled pair is shifted in a label-independent order:
    its margin becomes ``z_i + o_i delta_i`` (``o_i = +1`` when the chosen response is the first of the
    pair's fixed order), the reference margins ``z_ij + delta_i``. The chosen-first order of the data is
    the label itself, so without ``orientation`` the label noise ``Z`` drops out of the projection (for the
    logistic loss ``a_i = -(1 - s_i)`` at any label); with it, ``a_i = -(Z_i - s_i)`` and
    ``c_i = -(g_i - s_i) + mean_j (g_ij - s_ij)`` in the fixed order: DESIGN.md 3.5's influence function
    with ``dphi`` replaced by the unit shift.
    """
    with torch.enable_grad():
        delta = torch.zeros_like(margin, dtype=torch.float64, requires_grad=True)
        delta_ref = delta if orientation is None else torch.zeros_like(delta, requires_grad=True)
        shift = delta if orientation is None else orientation.detach().to(torch.float64) * delta
        z = margin.detach().to(torch.float64) + shift
        zr = ref_margin.detach().to(torch.float64) + delta_ref[:, None]
        lab, ctl, ref = vr_terms(
            loss,
            z[:, None],
            torch.ones_like(z)[:, None],
            g.detach().to(torch.float64)[:, None],
            zr,
            ref_g.detach().to(torch.float64),
        )
        (da,) = torch.autograd.grad(lab.sum(), delta, retain_graph=True)
        if orientation is None:
            (dc,) = torch.autograd.grad((ctl - ref).sum(), delta)
        else:
            (dctl,) = torch.autograd.grad(ctl.sum(), delta, retain_graph=True)
            (dref,) = torch.autograd.grad(ref.sum(), delta_ref)
            dc = dctl - dref
    return da.to(margin.dtype), dc.to(margin.dtype)


def _cov_var(a: Tensor, c: Tensor) -> tuple[float, float]:
    a = a.detach().to(torch.float64)
    c = c.detach().to(torch.float64)
    n = a.numel()
    ca, cc = a - a.mean(), c - c.mean()
    return float((ca * cc).sum() / (n - 1)), float((cc * cc).sum() / (n - 1))


@dataclass
class LambdaEstimator:
    r"""``lam_hat = Cov(a, c) / Var(c)``, clipped to ``[0, 1]``, from gathered per-row values.

    With ``ema = rho > 0`` the covariance and variance are averaged over calls,
    ``S_t = rho S_{t-1} + (1 - rho) S_batch`` (the first call sets ``S_1 = S_batch``), and the ratio of the
    averages is used. While ``Var(c)`` is 0 (or fewer than 2 rows were seen) the previous value is kept,
    starting from ``initial``.
    """

    initial: float = 1.0
    ema: float = 0.0
    value: float = field(init=False)
    cov: float | None = field(init=False, default=None)
    var: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= 1.0:
            raise InputError(f"lam: the starting value of vrpo_tuned must lie in [0, 1], got {self.initial}")
        if not 0.0 <= self.ema < 1.0:
            raise InputError(f"lambda_ema must lie in [0, 1), got {self.ema}")
        self.value = float(self.initial)

    def update(self, a: Tensor, c: Tensor) -> float:
        """Fold in one gathered batch and return the new ``lam``."""
        if a.numel() != c.numel():
            raise InputError(f"lambda estimate: a and c differ in size ({a.numel()} vs {c.numel()})")
        if a.numel() >= 2:
            cov, var = _cov_var(a.reshape(-1), c.reshape(-1))
            if self.cov is None or self.ema == 0.0:
                self.cov, self.var = cov, var
            else:
                self.cov = self.ema * self.cov + (1.0 - self.ema) * cov
                self.var = self.ema * self.var + (1.0 - self.ema) * var
            if self.var > 0.0 and math.isfinite(self.cov) and math.isfinite(self.var):
                self.value = min(1.0, max(0.0, self.cov / self.var))
        return self.value

    def state_dict(self) -> dict[str, float | None]:
        """What a checkpoint stores (for an exact resume)."""
        return {"value": self.value, "cov": self.cov, "var": self.var}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        """Restore ``state_dict()``."""
        self.value = float(state["value"])  # type: ignore[arg-type]
        self.cov = state.get("cov")
        self.var = state.get("var")


def variance_summary(a: Tensor, c: Tensor | None, lam: float) -> dict[str, float]:
    """Empirical variances (``n - 1`` denominator) of ``a`` and of ``a - lam c`` over gathered rows."""
    a64 = a.detach().to(torch.float64).reshape(-1)
    if a64.numel() < 2:
        return {}
    out = {"without_cv": float(a64.var(unbiased=True))}
    if c is not None:
        out["with_cv"] = float((a64 - lam * c.detach().to(torch.float64).reshape(-1)).var(unbiased=True))
    return out
