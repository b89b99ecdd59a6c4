r"""Sequence log-probabilities of responses under a causal LM, one forward pass per batch.

``log pi(y|x) = sum_t log softmax(logits_{t-1})[y_t]`` over the response tokens ``t`` (the completion
mask), or its mean over those tokens with ``length_normalize`` (IPO as TRL runs it). Computed in
float32 whatever the model's dtype.

A batch of ``K B`` right-padded sequences costs ``K B L_max`` token positions in one forward pass. With
``groups > 1`` the sequences are split, by length, into at most that many forward passes over the
sorted lengths ``l_(1) >= ... >= l_(N)``, each trimmed to its own longest sequence: the split into
contiguous runs minimising the padded positions ``sum_g |g| max_{i in g} l_i`` (dynamic programming),
with the fewest passes within 5 % of the best. The log-probabilities are the same up to rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["token_logps", "sequence_logps", "model_sequence_logps", "length_groups"]


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[targets]`` elementwise over ``(N, T)``, in float32, one row at a time.

    Row by row keeps the float32 copy of the ``(T, V)`` logits to one row, not the whole batch.
    """
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for r in range(logits.shape[0]):
        row = logits[r].float()
        out[r] = row.gather(-1, targets[r].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out


def sequence_logps(
    logits: Tensor, input_ids: Tensor, completion_mask: Tensor, length_normalize: bool = False
) -> Tensor:
    """Per-sequence response log-probability ``(N,)`` from causal-LM logits ``(N, L, V)``."""
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.float32)
    lp = token_logps(logits[:, :-1, :], targets) * mask
    total = lp.sum(-1)
    if length_normalize:
        total = total / mask.sum(-1).clamp_min(1.0)
    return total


def length_groups(lengths: Tensor | np.ndarray, groups: int, tolerance: float = 0.05) -> list[np.ndarray]:
    """Indices of the sequences in each forward pass: contiguous runs of the lengths sorted in decreasing
    order minimising the padded positions ``sum_g |g| max(l_g)`` over at most ``groups`` runs; the fewest
    runs whose cost is within ``tolerance`` of the minimum."""
    lengths = np.asarray(lengths.cpu() if isinstance(lengths, Tensor) else lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    ls = lengths[order].astype(np.float64)
    N = ls.size
    groups = max(1, min(groups, N))
    i, j = np.arange(N + 1)[:, None], np.arange(N + 1)[None, :]
    span = np.where((i >= 1) & (i < j), (j - i) * np.append(ls, 0.0)[:, None], np.inf)
    # f[k][j]: fewest padded positions of the j longest sequences in at most k + 1 runs; cut[k][j]: the
    # start of the last run (-1: no better than k runs)
    f = [np.arange(N + 1) * (ls[0] if N else 0.0)]
    cut = [np.full(N + 1, -1)]
    for _ in range(1, groups):
        total = f[-1][:, None] + span
        start = np.argmin(total, axis=0)
        last = total[start, np.arange(N + 1)]
        better = last < f[-1]
        f.append(np.where(better, last, f[-1]))
        cut.append(np.where(better, start, -1))
    k = next(k for k in range(groups) if f[k][N] <= (1 + tolerance) * f[-1][N])
    bounds = [N]  # run boundaries, from the last run backwards
    for kk in range(k, 0, -1):
        if cut[kk][bounds[-1]] >= 0:
            bounds.append(int(cut[kk][bounds[-1]]))
    bounds = [0, *bounds[::-1]]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _logps(model: nn.Module, batch: dict[str, Tensor], length_normalize: bool) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"], length_normalize)


def model_sequence_logps(model: nn.Module, batch: dict[str, Tensor], length_normalize: bool = False,
                         groups: int = 1) -> Tensor:
    """Response log-probs ``(N,)`` of the batch's right-padded sequences: one forward pass, or with
    ``groups > 1`` up to that many over sequences of similar length (``length_groups``)."""
    if groups > 1:
        lengths = batch["attention_mask"].sum(1).cpu().numpy()  # one device sync for the whole split
        parts = length_groups(lengths, groups)
    if groups <= 1 or len(parts) == 1:
        return _logps(model, batch, length_normalize)
    device = batch["input_ids"].device
    values = []
    for idx in parts:
        rows = torch.as_tensor(idx, device=device)
        L = int(lengths[idx].max())
        sub = {k: batch[k][rows, :L] for k in ("input_ids", "attention_mask", "completion_mask")}
        values.append(_logps(model, sub, length_normalize))
    inverse = torch.empty(lengths.size, dtype=torch.long)
    inverse[np.concatenate(parts)] = torch.arange(lengths.size)
    return torch.cat(values)[inverse.to(device)]
