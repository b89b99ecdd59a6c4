r"""Pairwise margin losses, the soft-labelled pair loss and the variance-reduced (VR) objective.

Written once, in torch, on plain tensors of margins and probabilities. The linear estimators of
``theory`` (margin ``theta . dphi``) and the LLM trainers of ``llm`` (margin ``beta`` times a
log-ratio difference, or a reward-model difference) call these same functions.

Notation (DESIGN.md 3.3-3.4): a margin loss ``l(z)``; for a pair with probability ``g`` that its
first response wins, ``m_g(z) = g l(z) + (1 - g) l(-z)``; the VR objective

.. math::
    L_{VR} = \sum_i w_i [m_{Z_i}(z_i) - \lambda m_{\hat g_i}(z_i)] + \lambda \sum_j v_j m_{\hat g_j}(z_j)

with labelled weights ``w`` (default ``1/n``) and reference weights ``v`` (default ``1/N``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

__all__ = [
    "MarginLoss",
    "Logistic",
    "Hinge",
    "TruncatedHinge",
    "SmoothedTruncatedHinge",
    "Squared",
    "Recession",
    "get_loss",
    "LOSSES",
    "pair_loss",
    "robust_pair_loss",
    "vr_objective",
    "vr_terms",
    "pair_loss_derivatives",
    "VRDerivatives",
    "vr_derivatives",
]


class MarginLoss(ABC):
    """A loss ``l(z)`` of a pairwise margin ``z`` (large positive margin: first response preferred)."""

    name: str = "abstract"
    #: whether ``l`` is twice continuously differentiable (Newton and sandwich bread apply)
    smooth: bool = True
    #: whether ``l`` is convex (a linear-reward fit has a unique minimiser)
    convex: bool = True

    @abstractmethod
    def __call__(self, z: Tensor) -> Tensor:
        """Elementwise ``l(z)``."""

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(l(z), l'(z), l''(z))`` elementwise, by automatic differentiation of ``__call__``.

        Losses on hot paths override this with closed forms; the tests check every override against
        this automatic derivative, so the two cannot drift.
        """
        return tuple(self._autograd(z, 2))  # type: ignore[return-value]

    def derivatives_pm(self, z: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """``derivatives(z)`` and ``derivatives(-z)`` (a loss may share work between the two)."""
        return self.derivatives(z), self.derivatives(-z)

    def third(self, z: Tensor) -> Tensor:
        """The third derivative ``l^(3)(z)`` elementwise (the second-order bias of an estimator needs
        it), by automatic differentiation of ``__call__``; closed forms override it as for ``derivatives``."""
        return self._autograd(z, 3)[3]

    def fourth(self, z: Tensor) -> Tensor:
        """The fourth derivative ``l^(4)(z)`` elementwise (the second-order covariance of an estimator needs
        it), by automatic differentiation of ``__call__``; closed forms override it as for ``derivatives``."""
        return self._autograd(z, 4)[4]

    def _autograd(self, z: Tensor, order: int) -> list[Tensor]:
        """``[l, l', ..., l^(order)]`` at ``z`` by repeated automatic differentiation of ``__call__``; a
        derivative of a piecewise-polynomial loss whose graph ends (e.g. ``l''`` of a hinge) is zero almost
        everywhere, and so are the ones after it."""
        with torch.enable_grad():
            zz = z.detach().clone().requires_grad_(True)
            out = [self(zz)]
            for k in range(order):
                if out[-1].requires_grad:
                    (nxt,) = torch.autograd.grad(out[-1].sum(), zz, create_graph=k + 1 < order)
                else:
                    nxt = torch.zeros_like(zz)
                out.append(nxt)
        return [t.detach() for t in out]

    def pair_derivatives(self, z: Tensor, g: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(m_g, m_g', m_g'')`` with ``m_g' = g l'(z) - (1-g) l'(-z)`` and ``m_g'' = g l''(z) + (1-g) l''(-z)``."""
        (lp, d1p, d2p), (lm, d1m, d2m) = self.derivatives_pm(z)
        return g * lp + (1.0 - g) * lm, g * d1p - (1.0 - g) * d1m, g * d2p + (1.0 - g) * d2m

    def pair_slopes(self, z: Tensor, g: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(m_g', m_g'')`` of ``pair_derivatives`` (a loss may skip the value's work)."""
        return self.pair_derivatives(z, g)[1:]

    def pair_value(self, z: Tensor, g: Tensor | float) -> Tensor:
        """``m_g(z)`` alone, for float64 work (``pair_loss``; a loss may use an identity with fewer calls)."""
        return pair_loss(self, z, g)

    def pair_derivatives_many(self, z: Tensor, gs: tuple[Tensor | float, ...]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``[pair_derivatives(z, g) for g in gs]``; a loss may share the work on ``z`` between them."""
        return [self.pair_derivatives(z, g) for g in gs]

    def curvature_surrogate(self, bandwidth: float | Tensor) -> "MarginLoss":
        """A smooth loss whose curvature estimates this loss's bread (itself if already smooth); the
        bandwidth may be a tensor broadcasting against the margins."""
        return self

    def recession(self) -> "MarginLoss | None":
        """The recession loss ``l_inf(z) = lim_{t -> inf} l(t z) / t`` when ``l`` grows linearly (so an
        objective built from ``l`` can be unbounded below along a ray); None when ``l`` grows faster."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# torch's softplus returns x itself above its threshold; at 20 that is off by e^-20 ~ 2e-9. At 40
# the error e^-40 ~ 4e-18 is below double precision, and exp(40) does not overflow float32 or bf16.
_SOFTPLUS_THRESHOLD = 40.0


class Recession(MarginLoss):
    r"""``l_inf(z) = [-z]_+``, the recession loss of the logistic and hinge losses. A positively
    homogeneous objective: ``L_inf(theta) = lim_t L(t theta) / t`` is the VR objective built from it."""

    name = "recession"
    smooth = False

    def __call__(self, z: Tensor) -> Tensor:
        return torch.relu(-z)


class Logistic(MarginLoss):
    r"""Bradley-Terry log-loss ``l(z) = log(1 + e^{-z}) = softplus(-z)``; convex, stable at any ``|z|``."""

    name = "logistic"

    def __call__(self, z: Tensor) -> Tensor:
        return F.softplus(-z, threshold=_SOFTPLUS_THRESHOLD)

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``l' = -sigmoid(-z)``, ``l'' = sigmoid(z) sigmoid(-z)``."""
        s = torch.sigmoid(-z)
        return self(z), -s, s * torch.sigmoid(z)

    def derivatives_pm(self, z: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """With ``s = sigmoid(-z)``: ``l(-z) = l(z) + z``, ``l'(-z) = s - 1``, ``l''(-z) = l''(z)``."""
        s = torch.sigmoid(-z)
        value = self(z)
        curv = s * torch.sigmoid(z)
        return (value, -s, curv), (value + z, s - 1.0, curv)

    def third(self, z: Tensor) -> Tensor:
        """``l^(3) = -s (1 - s) (1 - 2 s)`` with ``s = sigmoid(-z)`` (``1 - s = sigmoid(z)``: no cancellation)."""
        s, t = torch.sigmoid(-z), torch.sigmoid(z)
        return -s * t * (t - s)

    def fourth(self, z: Tensor) -> Tensor:
        """``l^(4) = s (1 - s) (1 - 6 s + 6 s^2)`` with ``s = sigmoid(-z)`` (``1 - s = sigmoid(z)``)."""
        st = torch.sigmoid(-z) * torch.sigmoid(z)
        return st * (1.0 - 6.0 * st)

    def pair_derivatives(self, z: Tensor, g: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """By ``l(z) - l(-z) = -z``: ``m_g = softplus(z) - g z``, ``m_g' = sigmoid(z) - g``,
        ``m_g'' = sigmoid(z) sigmoid(-z)``."""
        return self.pair_value(z, g), *self.pair_slopes(z, g)

    def pair_value(self, z: Tensor, g: Tensor | float) -> Tensor:
        """``m_g = softplus(z) - g z``: one softplus. The difference of a confident pair's ``softplus(z) ~ z`` and
        ``g z`` loses the value's digits in low precision, where ``pair_loss``'s two terms keep them."""
        return F.softplus(z, threshold=_SOFTPLUS_THRESHOLD) - g * z

    def pair_slopes(self, z: Tensor, g: Tensor | float) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(z)
        return s - g, s * torch.sigmoid(-z)

    def recession(self) -> MarginLoss:
        return Recession()

    def pair_derivatives_many(self, z: Tensor, gs: tuple[Tensor | float, ...]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``pair_derivatives`` for every ``g`` with one sigmoid and one softplus of ``z`` (same numbers)."""
        s = torch.sigmoid(z)
        sp = F.softplus(z, threshold=_SOFTPLUS_THRESHOLD)
        curv = s * torch.sigmoid(-z)
        return [(sp - g * z, s - g, curv) for g in gs]


class Hinge(MarginLoss):
    """Hinge (SLiC) loss ``l(z) = [1 - z]_+``; convex, not differentiable at ``z = 1``."""

    name = "hinge"
    smooth = False

    def __call__(self, z: Tensor) -> Tensor:
        return torch.relu(1.0 - z)

    def curvature_surrogate(self, bandwidth: float | Tensor) -> MarginLoss:
        return SmoothedTruncatedHinge(s=-math.inf, bandwidth=bandwidth)

    def recession(self) -> MarginLoss:
        return Recession()


@dataclass(repr=False)
class TruncatedHinge(MarginLoss):
    """Truncated hinge ``l(z) = [1 - z]_+ - [s - z]_+`` (VRPO authors' loss): bounded, non-convex.

    Its derivative is ``-1`` on ``(s, 1)`` and ``0`` elsewhere; ``s < 1`` (default ``-1/2``).
    """

    s: float = -0.5
    name = "truncated_hinge"
    smooth = False
    convex = False

    def __post_init__(self) -> None:
        if not self.s < 1.0:
            raise InputError(f"truncated hinge: s must be < 1, got s={self.s}")

    def __call__(self, z: Tensor) -> Tensor:
        return torch.relu(1.0 - z) - torch.relu(self.s - z)

    def curvature_surrogate(self, bandwidth: float | Tensor) -> MarginLoss:
        return SmoothedTruncatedHinge(s=self.s, bandwidth=bandwidth)

    def __repr__(self) -> str:
        return f"TruncatedHinge(s={self.s})"


@dataclass(repr=False)
class SmoothedTruncatedHinge(MarginLoss):
    r"""Gaussian smoothing ``E[l(z + h e)]``, ``e ~ N(0,1)``, of the truncated hinge (``s = -inf``: hinge).

    With ``q_h(t) = t Phi(t/h) + h phi(t/h) = E[t + h e]_+``: ``l_h(z) = q_h(1 - z) - q_h(s - z)``.
    Its second derivative is a kernel density estimate at the kinks, used as the sandwich bread of
    the non-smooth losses.
    """

    s: float = -0.5
    #: a number, or a tensor broadcasting against the margins (one bandwidth per replication)
    bandwidth: float | Tensor = 0.1
    name = "smoothed_truncated_hinge"

    def __post_init__(self) -> None:
        if not bool(torch.all(torch.as_tensor(self.bandwidth) > 0)):
            raise InputError(f"smoothing bandwidth must be > 0, got {self.bandwidth}")
        self.convex = not math.isfinite(self.s)  # the smoothed hinge is convex, the truncated one is not

    def recession(self) -> MarginLoss | None:
        return None if math.isfinite(self.s) else Recession()

    def _q(self, t: Tensor) -> Tensor:
        h = self.bandwidth
        u = t / h
        return t * torch.special.ndtr(u) + h * torch.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)

    def __call__(self, z: Tensor) -> Tensor:
        out = self._q(1.0 - z)
        if math.isfinite(self.s):
            out = out - self._q(self.s - z)
        return out

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q_h'(t) = Phi(t/h)``, ``q_h''(t) = phi(t/h)/h``, by the chain rule in ``t = 1 - z``, ``s - z``."""
        h = self.bandwidth
        u1 = (1.0 - z) / h
        d1 = -torch.special.ndtr(u1)
        d2 = torch.exp(-0.5 * u1 * u1) / (h * math.sqrt(2.0 * math.pi))
        if math.isfinite(self.s):
            u2 = (self.s - z) / h
            d1 = d1 + torch.special.ndtr(u2)
            d2 = d2 - torch.exp(-0.5 * u2 * u2) / (h * math.sqrt(2.0 * math.pi))
        return self(z), d1, d2


class Squared(MarginLoss):
    """IPO loss in margin units: ``l(z) = (z - 1/2)^2`` (with ``z = beta h`` this is ``beta^2 (h - 1/(2 beta))^2``)."""

    name = "ipo"

    def __call__(self, z: Tensor) -> Tensor:
        return (z - 0.5) ** 2

    def derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``l' = 2 (z - 1/2)``, ``l'' = 2``."""
        return self(z), 2.0 * (z - 0.5), torch.full_like(z, 2.0)

    def third(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)

    def fourth(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)


LOSSES: dict[str, type[MarginLoss]] = {
    "logistic": Logistic,
    "hinge": Hinge,
    "truncated_hinge": TruncatedHinge,
    "ipo": Squared,
}


def get_loss(loss: str | MarginLoss, **params: float) -> MarginLoss:
    """Resolve a loss name (``logistic``, ``hinge``, ``truncated_hinge``, ``ipo``) or pass a loss through."""
    if isinstance(loss, MarginLoss):
        return loss
    try:
        cls = LOSSES[loss]
    except KeyError:
        raise InputError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}") from None
    return cls(**params)


def pair_loss(loss: MarginLoss, margin: Tensor, g: Tensor | float) -> Tensor:
    """Soft-labelled pair loss ``m_g(z) = g l(z) + (1 - g) l(-z)``, elementwise.

    With a hard label ``g = Z`` in {0, 1} this is the log-likelihood term of the MLE.
    """
    return g * loss(margin) + (1.0 - g) * loss(-margin)


def robust_pair_loss(loss: MarginLoss, margin: Tensor, eps: float) -> Tensor:
    """rDPO's unbiased loss under symmetric label flips at a known rate ``eps < 1/2``.

    ``[(1 - eps) l(z) - eps l(-z)] / (1 - 2 eps)``; its expectation over a flipped label equals
    ``l`` of the clean label (Chowdhury et al. 2024).
    """
    if not 0.0 <= eps < 0.5:
        raise InputError(f"rDPO flip rate eps must be in [0, 1/2), got {eps}")
    return ((1.0 - eps) * loss(margin) - eps * loss(-margin)) / (1.0 - 2.0 * eps)


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return values.mean(dim=-1)
    return (values * weight).sum(dim=-1)


def _require_reference(ref_margin: Tensor | None, ref_g: Tensor | None) -> None:
    if ref_margin is None or ref_g is None or ref_margin.shape[-1] == 0:
        raise InputError("VR objective: g is given but there are no reference pairs (ref_margin, ref_g)")


def vr_terms(
    loss: MarginLoss,
    margin: Tensor,
    z: Tensor,
    g: Tensor | None,
    ref_margin: Tensor | None,
    ref_g: Tensor | None,
    weight: Tensor | None = None,
    ref_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The three terms of the VR objective, each reduced over the last axis.

    Returns ``(labelled, control, reference)`` with
    ``labelled = sum_i w_i m_{Z_i}(z_i)``, ``control = sum_i w_i m_{g_i}(z_i)`` and
    ``reference = sum_j v_j m_{g_j}(z_j)``; ``L_VR = labelled - lam * (control - reference)``.
    Weights default to uniform means; missing ``g``/reference give zero terms.
    """
    labelled = _weighted_mean(pair_loss(loss, margin, z), weight)
    if g is None:
        zero = torch.zeros_like(labelled)
        return labelled, zero, zero
    control = _weighted_mean(pair_loss(loss, margin, g), weight)
    _require_reference(ref_margin, ref_g)
    reference = _weighted_mean(pair_loss(loss, ref_margin, ref_g), ref_weight)
    return labelled, control, reference


def vr_objective(
    loss: MarginLoss,
    margin: Tensor,
    z: Tensor,
    g: Tensor | None = None,
    ref_margin: Tensor | None = None,
    ref_g: Tensor | None = None,
    lam: Tensor | float = 1.0,
    weight: Tensor | None = None,
    ref_weight: Tensor | None = None,
) -> Tensor:
    r"""VR objective ``sum_i w_i [m_Z(z_i) - lam m_g(z_i)] + lam sum_j v_j m_g(z_j)``.

    Reduced over the last axis, so leading axes (replications) are kept. ``lam = 0`` (or ``g`` None)
    is the MLE/ERM objective exactly; ``lam = 1`` is VRPO as published. ``lam`` may be a tensor
    broadcasting against the leading axes (one weight per replication).
    """
    labelled, control, reference = vr_terms(loss, margin, z, g, ref_margin, ref_g, weight, ref_weight)
    if g is None:
        return labelled
    return labelled - lam * (control - reference)


def pair_loss_derivatives(loss: MarginLoss, margin: Tensor, g: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """``(m_g, m_g', m_g'')`` elementwise (``MarginLoss.pair_derivatives``)."""
    return loss.pair_derivatives(margin, g)


@dataclass
class VRDerivatives:
    """Derivatives of the VR objective with respect to each margin (weights included).

    ``d_lab``, ``d_ctrl`` (..., n): first derivatives of the labelled and control terms;
    ``d_ref`` (..., N): of the reference term; so ``dL/dz_i = d_lab - lam d_ctrl`` and
    ``dL/dz_j = lam d_ref``. ``h`` (..., n), ``h_ref`` (..., N): second derivatives of ``L``.
    """

    value: Tensor
    d_lab: Tensor
    d_ctrl: Tensor | None
    d_ref: Tensor | None
    h: Tensor
    h_ref: Tensor | None

    def first(self, lam: Tensor | float) -> tuple[Tensor, Tensor | None]:
        """``(dL/dz_i, dL/dz_j)`` at weight ``lam`` (broadcast over the leading axes)."""
        if self.d_ctrl is None:
            return self.d_lab, None
        lam_ = lam[..., None] if isinstance(lam, Tensor) else lam
        return self.d_lab - lam_ * self.d_ctrl, lam_ * self.d_ref


def _weights(values: Tensor, weight: Tensor | None) -> Tensor | float:
    return 1.0 / values.shape[-1] if weight is None else weight


def vr_derivatives(
    loss: MarginLoss,
    margin: Tensor,
    z: Tensor,
    g: Tensor | None = None,
    ref_margin: Tensor | None = None,
    ref_g: Tensor | None = None,
    lam: Tensor | float = 1.0,
    weight: Tensor | None = None,
    ref_weight: Tensor | None = None,
) -> VRDerivatives:
    """``vr_objective`` and its first and second derivatives in every margin, in closed form.

    The objective is a weighted sum of pair losses, so its Hessian in the margins is diagonal.
    Tested against automatic differentiation of ``vr_objective``.
    """
    w = _weights(margin, weight)
    if g is None:
        m_z, d_z, h_z = pair_loss_derivatives(loss, margin, z)
        return VRDerivatives((w * m_z).sum(-1), w * d_z, None, None, w * h_z, None)
    _require_reference(ref_margin, ref_g)
    (m_z, d_z, h_z), (m_g, d_g, h_g) = loss.pair_derivatives_many(margin, (z, g))
    labelled = (w * m_z).sum(-1)
    v = _weights(ref_margin, ref_weight)
    m_r, d_r, h_r = pair_loss_derivatives(loss, ref_margin, ref_g)
    lam_v = lam
    lam_e = lam[..., None] if isinstance(lam, Tensor) else lam
    value = labelled - lam_v * ((w * m_g).sum(-1) - (v * m_r).sum(-1))
    return VRDerivatives(value, w * d_z, w * d_g, v * d_r, w * (h_z - lam_e * h_g), lam_e * v * h_r)
