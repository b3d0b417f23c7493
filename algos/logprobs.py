"""Token-level log-probabilities and cross-entropy: the shared math of every loss.

Two ways from the final hidden states to the loss, both running the output projection chunk by
chunk so the (B, T, V) logits never exist at once (for a 128k vocabulary and 16k tokens, ~1 GB of
float32 logits per chunk instead of ~20 GB for the whole batch, its float32 copy and its gradient):

    linear_cross_entropy_sum   the summed next-token loss: pretraining and SFT. Its gradient is
                               computed during forward, so it is valid for a plain sum only.
    linear_token_logprobs      log p(target) of every token (B, T): DPO, GRPO, any weighting. Its
                               backward recomputes each chunk's logits, so any upstream gradient works.

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
    """log p(ids) under logits (..., V) -> (...): one gather and one logsumexp over the last axis,
    so no second (..., V) tensor of log-probabilities is kept beside the logits."""
    logits = logits.float()
    picked = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the output projection runs in: autocast's when it is on, else the hidden states'."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _default_chunk(vocab_size: int) -> int:
    return max(1, 2**28 // vocab_size)  # about 1 GiB of float32 logits per chunk


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None
) -> Tensor:
    """cross_entropy_sum(hidden @ weight.T, targets) without materialising the (B, T, V) logits.

    hidden (B, T, C), weight (V, C), targets (B, T). Each chunk's gradients (w.r.t. hidden and
    weight) are computed right away in forward, which saves recomputing the logits in backward but
    is only correct for a loss that is this plain sum times a scalar. With grad mode off (evaluation)
    no gradient work is done. Matmuls run in the autocast dtype when autocast is on, the softmax in
    float32.
    """
    dtype = _matmul_dtype(hidden)
    chunk_tokens = chunk_tokens or _default_chunk(weight.shape[0])
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            logits = (hidden[start : start + chunk_tokens].to(dtype) @ w.T).float()  # (n, V)
            t = targets[start : start + chunk_tokens]
            loss += F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
        return loss
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_tokens, dtype)


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


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None
) -> Tensor:
    """log_softmax(hidden @ weight.T).gather(targets) -> (B, T) float32, 0.0 where targets ==
    ignore_index, without materialising the (B, T, V) logits in forward or backward.

    hidden (B, T, C), weight (V, C), targets (B, T). Forward keeps only each token's logsumexp;
    backward recomputes one chunk of logits at a time from it, so the result may be weighted,
    summed per sequence, passed through a sigmoid (DPO) or multiplied by advantages (GRPO) freely.
    """
    B, T = targets.shape
    dtype = _matmul_dtype(hidden)
    chunk_tokens = chunk_tokens or _default_chunk(weight.shape[0])
    out = _LinearTokenLogprobs.apply(hidden.flatten(0, 1), weight, targets.flatten(), ignore_index, chunk_tokens, dtype)
    return out.view(B, T)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_tokens, dtype):
        w = weight.to(dtype)
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, 0)
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            logits = (hidden[start:end].to(dtype) @ w.T).float()  # (n, V)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logprobs[start:end] = logits.gather(1, safe_t[start:end, None]).squeeze(1) - lse[start:end]
        logprobs.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe_t, valid, lse = ctx.saved_tensors
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, n_tok = ctx.dtype, hidden.shape[0]
        w = weight.to(dtype)
        grad_out = torch.where(valid, grad_out.float(), 0.0)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, n_tok, ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            h = hidden[start:end].to(dtype)  # (n, C)
            logits = (h @ w.T).float()  # (n, V), recomputed
            # d log p(t) / d logits = one_hot(t) - softmax, times the upstream gradient of each token.
            g = torch.exp(logits.sub_(lse[start:end, None])).neg_()
            g[torch.arange(h.shape[0], device=g.device), safe_t[start:end]] += 1.0
            g.mul_(grad_out[start:end, None])
            g = g.to(dtype)
            if need_hidden_grad:
                grad_hidden[start:end] = (g @ w).to(hidden.dtype)
            if need_weight_grad:
                grad_weight += (g.T @ h).float()  # (V, C)
        gw = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, gw, None, None, None, None
