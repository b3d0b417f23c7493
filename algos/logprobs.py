"""Token-level log-probabilities and cross-entropy: the shared math of every loss.

Pure tensor functions: no I/O, no distributed calls, no config objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def cross_entropy_sum(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sum of -log p(target) over the tokens whose target is not ignore_index.

    logits (B, T, V), targets (B, T). The caller divides by the number of target tokens of the
    whole optimizer step (over micro-batches and ranks), so every token weighs the same however
    the batch is split.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum"
    )


def selective_log_softmax(logits: Tensor, ids: Tensor) -> Tensor:
    """log p(ids) under logits (B, T, V) -> (B, T), without keeping the full (B, T, V) log-softmax:
    logsumexp row by row, then one gather."""
    logits = logits.float()
    picked = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
