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


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None
) -> Tensor:
    """cross_entropy_sum(hidden @ weight.T, targets) without materialising the (B, T, V) logits.

    hidden (B, T, C), weight (V, C), targets (B, T). The output projection and the loss run chunk
    by chunk of tokens, and each chunk's gradients (w.r.t. hidden and weight) are computed right
    away, so peak memory holds one chunk of logits instead of the whole batch's logits, their
    float32 copy and their gradient (for a 128k vocabulary and 16k tokens: ~1 GB instead of ~20 GB).
    Matmuls run in the autocast dtype when autocast is on, the softmax in float32.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if chunk_tokens is None:  # about 1 GiB of float32 logits per chunk
        chunk_tokens = max(1, 2**28 // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(), ignore_index, chunk_tokens, dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_tokens, dtype):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens].to(dtype)  # (n, C)
            t = targets[start : start + chunk_tokens]  # (n,)
            logits = (h @ w.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != ignore_index
            safe_t = torch.where(valid, t, 0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += torch.where(valid, lse - picked, 0.0).sum()
            if need_hidden_grad or need_weight_grad:
                # d(sum of CE)/d(logits) = softmax - one_hot(target), zero on ignored rows.
                g = torch.exp(logits.sub_(lse[:, None]))
                g[torch.arange(len(t), device=g.device), safe_t] -= 1.0
                g.mul_(valid[:, None])
                g = g.to(dtype)  # (n, V)
                if need_hidden_grad:
                    grad_hidden[start : start + chunk_tokens] = (g @ w).to(hidden.dtype)
                if need_weight_grad:
                    grad_weight += (g.T @ h).float()  # (V, C)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None
