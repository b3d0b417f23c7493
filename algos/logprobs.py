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


# A chunk's softmax work, per element of its (n, V) logits. Eager PyTorch runs it as several passes,
# each reading and writing a float32 (n, V) tensor; at a 128k vocabulary those passes took longer
# than the head's matmuls (bench/RESULTS.md). On CUDA each function below is compiled into one or two
# kernels that read the logits in the matmul's dtype and write only what is asked; elsewhere it runs
# eagerly, in place where it can (one float32 copy of the chunk at a time).

def _chunk_logsumexp_picked(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of a chunk's logits (n, V): the logsumexp and the target's logit, float32."""
    x = logits.float()
    return torch.logsumexp(x, dim=-1), x.gather(1, targets[:, None]).squeeze(1)


def _chunk_logits_grad(logits: Tensor, lse: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """scale * (one_hot(target) - softmax) per row of a chunk's logits (n, V), in their dtype: the
    gradient of sum_i scale_i log p_i(target_i) with respect to the logits."""
    one_hot = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    return ((one_hot.float() - torch.exp(logits.float() - lse[:, None])) * scale[:, None]).to(logits.dtype)


def _chunk_logits_grad_eager(logits: Tensor, lse: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """_chunk_logits_grad, in place on a float32 copy (on float32 logits: on the logits themselves)."""
    g = torch.exp(logits.float().sub_(lse[:, None])).neg_()
    g[torch.arange(len(targets), device=g.device), targets] += 1.0
    return g.mul_(scale[:, None]).to(logits.dtype)


_compiled: dict = {}


def _fused(fn):
    """fn compiled (once per process, dynamic shapes: every chunk length and vocabulary share it)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def chunk_logsumexp_picked(logits: Tensor, targets: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    return (_fused(_chunk_logsumexp_picked) if fused else _chunk_logsumexp_picked)(logits, targets)


def chunk_logits_grad(logits: Tensor, lse: Tensor, targets: Tensor, scale: Tensor, fused: bool) -> Tensor:
    return (_fused(_chunk_logits_grad) if fused else _chunk_logits_grad_eager)(logits, lse, targets, scale)


def add_weight_grad(grad_weight: Tensor, g: Tensor, h: Tensor) -> None:
    """grad_weight (V, C) float32 += g^T h. On CUDA with half-precision g and h the matmul accumulates
    into grad_weight in float32 itself; elsewhere the product and its float32 copy are two (V, C)
    temporaries."""
    if g.is_cuda and g.dtype != torch.float32:
        torch.addmm(grad_weight, g.T, h, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight += (g.T @ h).float()


def _use_fused(fused: bool | None, hidden: Tensor) -> bool:
    return hidden.is_cuda if fused is None else fused


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None,
    fused: bool | None = None,
) -> Tensor:
    """cross_entropy_sum(hidden @ weight.T, targets) without materialising the (B, T, V) logits.

    hidden (B, T, C), weight (V, C), targets (B, T). Each chunk's gradients (w.r.t. hidden and
    weight) are computed right away in forward, which saves recomputing the logits in backward but
    is only correct for a loss that is this plain sum times a scalar. With grad mode off (evaluation)
    no gradient work is done. Matmuls run in the autocast dtype when autocast is on, the softmax in
    float32. fused: each chunk's softmax work compiled into fused kernels (default: on CUDA).
    """
    dtype = _matmul_dtype(hidden)
    chunk_tokens = chunk_tokens or _default_chunk(weight.shape[0])
    fused = _use_fused(fused, hidden)
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            logits = (hidden[start : start + chunk_tokens].to(dtype) @ w.T).float()  # (n, V)
            t = targets[start : start + chunk_tokens]
            loss += F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
        return loss
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_tokens, dtype, fused)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_tokens, dtype, fused):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens].to(dtype)  # (n, C)
            t = targets[start : start + chunk_tokens]  # (n,)
            logits = h @ w.T  # (n, V)
            valid = t != ignore_index
            safe_t = torch.where(valid, t, 0)
            lse, picked = chunk_logsumexp_picked(logits, safe_t, fused)
            loss += torch.where(valid, lse - picked, 0.0).sum()
            # d(sum of CE)/d(logits) = softmax - one_hot(target), zero on ignored rows.
            g = chunk_logits_grad(logits, lse, safe_t, -valid.float(), fused)  # (n, V)
            del logits
            if need_hidden_grad:
                grad_hidden[start : start + chunk_tokens] = (g @ w).to(hidden.dtype)
            if need_weight_grad:
                add_weight_grad(grad_weight, g, h)  # (V, C)
            del g
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None,
    fused: bool | None = None,
) -> Tensor:
    """log_softmax(hidden @ weight.T).gather(targets) -> (B, T) float32, 0.0 where targets ==
    ignore_index, without materialising the (B, T, V) logits in forward or backward.

    hidden (B, T, C), weight (V, C), targets (B, T). Forward keeps only each token's logsumexp;
    backward recomputes one chunk of logits at a time from it, so the result may be weighted,
    summed per sequence, passed through a sigmoid (DPO) or multiplied by advantages (GRPO) freely.
    fused: each chunk's softmax work compiled into fused kernels (default: on CUDA).
    """
    B, T = targets.shape
    dtype = _matmul_dtype(hidden)
    chunk_tokens = chunk_tokens or _default_chunk(weight.shape[0])
    fused = _use_fused(fused, hidden)
    out = _LinearTokenLogprobs.apply(hidden.flatten(0, 1), weight, targets.flatten(), ignore_index, chunk_tokens,
                                     dtype, fused)
    return out.view(B, T)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_tokens, dtype, fused):
        w = weight.to(dtype)
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, 0)
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            logits = hidden[start:end].to(dtype) @ w.T  # (n, V)
            lse[start:end], picked = chunk_logsumexp_picked(logits, safe_t[start:end], fused)
            logprobs[start:end] = picked - lse[start:end]
            del logits
        logprobs.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse)
        ctx.chunk_tokens, ctx.dtype, ctx.fused = chunk_tokens, dtype, fused
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
            logits = h @ w.T  # (n, V), recomputed
            # d log p(t) / d logits = one_hot(t) - softmax, times the upstream gradient of each token.
            g = chunk_logits_grad(logits, lse[start:end], safe_t[start:end], grad_out[start:end], ctx.fused)
            del logits
            if need_hidden_grad:
                grad_hidden[start:end] = (g @ w).to(hidden.dtype)
            if need_weight_grad:
                add_weight_grad(grad_weight, g, h)  # (V, C)
            del g
        gw = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, gw, None, None, None, None, None
