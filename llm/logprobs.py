r"""Sequence log-probabilities of responses under a causal LM, one forward pass per batch.

``log pi(y|x) = sum_t log softmax(logits_{t-1})[y_t]`` over the response tokens ``t`` (the completion
mask), or its mean over those tokens with ``length_normalize`` (IPO as TRL runs it). Computed in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["token_logps", "sequence_logps", "model_sequence_logps"]


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


def model_sequence_logps(model: nn.Module, batch: dict[str, Tensor], length_normalize: bool = False) -> Tensor:
    """Run ``model`` once on the batch's concatenated sequences and return their response log-probs."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"], length_normalize)
