"""GRPO: group-relative advantages, the clipped policy-ratio objective, KL to a reference, and the
loss aggregations that papers compare.

Papers:
- GRPO: Shao, Wang, Zhu, Xu, Song, Bi, Zhang, Zhang, Li, Wu, Guo, "DeepSeekMath: Pushing the Limits
  of Mathematical Reasoning in Open Language Models", arXiv:2402.03300,
  https://arxiv.org/abs/2402.03300 (the recipe at scale: DeepSeek-AI, "DeepSeek-R1", arXiv:2501.12948).
- DAPO: Yu, Zhang, Zhu, Yuan, Zuo, Yue et al., "DAPO: An Open-Source LLM Reinforcement Learning System
  at Scale", arXiv:2503.14476, https://arxiv.org/abs/2503.14476 (clip-higher, token-level loss,
  dynamic sampling, overlong filtering).
- Dr. GRPO: Liu, Chen, Li, Qi, Pang, Du, Lee, Lin, "Understanding R1-Zero-Like Training: A Critical
  Perspective", arXiv:2503.20783, https://arxiv.org/abs/2503.20783 (no std scaling, no 1/|o| length
  normalisation).
- GSPO: Zheng, Liu, Li, Chen, Yu, Gao et al., "Group Sequence Policy Optimization", arXiv:2507.18071,
  https://arxiv.org/abs/2507.18071 (one length-normalised ratio per sequence).
- k3 KL estimator: Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.

How the loop uses this file (B completions per micro-batch, T completion positions, G per prompt):

    adv = group_advantages(rewards, G, scale="group")                  # (N,) for the whole step
    normaliser = NORMALISERS[loss_type](step_mask, max_completion_len)  # all-reduced (SUM), once
    for each micro-batch (its rows of adv, its masks and log-probs):
        tok = per_token_loss(logps, old_logps, adv_mb, mask, ref_logps=ref, beta=beta,
                             clip_low=0.2, clip_high=0.28, ratio=RATIOS["token"])  # (B, T)
        (AGGREGATIONS[loss_type](tok, mask) / normaliser.clamp(min=1)).backward()

Every aggregation returns a SUM over the micro-batch and every normaliser is a sum over
completions, so the micro-batches of all ranks add up to exactly the loss of the whole batch
(`grpo_loss`), however the step is split.

Pure tensor functions: no I/O, no torch.distributed, no config objects. Deliberately left out:
entropy bonus and entropy masking, CISPO/SAPO/other ratio shapes, vLLM importance-sampling
correction, off-policy masking, multi-objective reward normalisation, the KL-in-reward (PPO) form.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# --- advantages ---------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages (N,): each reward minus the mean of its group, divided by a std.

    rewards (N,) holds N = P * G rewards grouped consecutively: the G completions of prompt 0,
    then the G of prompt 1, and so on. `scale` picks the divisor:
      "group": the std of the reward's own group (GRPO, DeepSeekMath eq. 3);
      "batch": the std of all N rewards (the "batch" option of TRL, following Dr. GRPO's
               observation that a per-group std up-weights easy and hard prompts);
      "none":  no division (Dr. GRPO, arXiv:2503.20783, section 3.2).
    The std is the unbiased one (Bessel's correction, divide by n - 1), as torch.std, TRL
    (`nanstd`) and verl compute it, so that the same rewards give the same advantages as those
    trainers; it needs at least 2 values. `eps` is added to the std (TRL's 1e-4), so a group whose
    rewards are all equal gets advantages 0 rather than 0/0.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (N,)
    if scale == "none":
        return centred
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (the std of one reward is undefined)")
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # (N,)
    elif scale == "batch":
        if rewards.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards")
        std = rewards.std()
    else:
        raise ValueError(f"unknown advantage scale {scale!r}: expected 'group', 'batch' or 'none'")
    return centred / (std + eps)


def informative_groups(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """DAPO's dynamic sampling (arXiv:2503.14476, section 3.2): find the groups whose rewards are all
    equal (all right or all wrong). Their advantages are 0, so they add no gradient but still count
    in the normaliser and dilute the batch.

    Returns keep (N,) bool, True for every completion of a group with at least two distinct
    rewards, and the number of uniform groups as a 0-dim int64 tensor (for logging). Equality is
    exact: equal inputs to the reward functions give bit-equal rewards.
    """
    grouped = rewards.view(-1, group_size)  # (P, G)
    uniform = grouped.amax(dim=1) == grouped.amin(dim=1)  # (P,)
    keep = (~uniform).repeat_interleave(group_size)  # (N,)
    return keep, uniform.sum()


def drop_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """The loss mask with truncated completions removed entirely (DAPO's overlong filtering,
    arXiv:2503.14476 section 3.4): a completion cut at the maximum length has no final answer, so
    its reward says nothing about its reasoning. mask (B, T) bool, truncated (B,) bool -> (B, T)."""
    return mask & ~truncated[:, None]


# --- importance ratios (log form), one function per level, picked by name through RATIOS --------


def token_log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """log pi(o_t) / pi_old(o_t) for every token (B, T): GRPO's token-level ratio (DeepSeekMath eq. 3)."""
    return logps - old_logps


def sequence_log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence-level ratio (arXiv:2507.18071, eq. 7), in log form, broadcast to (B, T):
    log s_i = (1 / |o_i|) * sum_t log pi(o_t) / pi_old(o_t) over the completion's masked tokens.

    Every token of a completion carries the same value, so the `grpo` aggregation (mean over a
    completion's tokens, then over completions) gives GSPO's objective exactly, and its gradient
    (eq. 10: the length-normalised sum of token gradients, weighted by s_i).
    """
    m = mask.to(logps.dtype)
    length = m.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
    seq = ((logps - old_logps) * m).sum(dim=1, keepdim=True) / length  # (B, 1)
    return seq.expand_as(logps)  # (B, T)


RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


# --- the per-token loss -------------------------------------------------------------------------


def clipped_policy_loss(log_ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """PPO's clipped surrogate, negated to a loss, with separate clip ranges (B, T):

        -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A),   r = exp(log_ratio)

    DAPO's clip-higher (arXiv:2503.14476, eq. 10) sets clip_high > clip_low (0.28 vs 0.2) so that
    low-probability tokens with a positive advantage can still grow. advantages (B,) or (B, T).
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return -torch.minimum(ratio * adv, clipped * adv)


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(pi || pi_ref) with Schulman's k3 estimator, as in DeepSeekMath eq. 4 (B, T):
    exp(ref - logp) - (ref - logp) - 1. Unbiased for tokens sampled from pi, and never negative."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1.0


def per_token_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio: Callable[[Tensor, Tensor, Tensor], Tensor] = token_log_ratio,
) -> Tensor:
    """The GRPO loss of every completion token (B, T), before masking and aggregation:
    the clipped policy loss plus beta * k3 KL to the reference.

    logps (B, T): the current policy's log-probs of the completion tokens (with grad);
    old_logps (B, T): the sampling policy's (no grad). None means this is the first pass over the
    batch (mu = 1), where pi_old = pi: logps.detach() is used, the ratio is 1 and the gradient is
    the plain policy gradient A * grad log pi;
    advantages (B,); mask (B, T) bool, the completion tokens (used by the sequence ratio);
    ref_logps (B, T): the reference policy's, needed only when beta != 0 (beta = 0 needs no
    reference model at all); ratio: token_log_ratio or sequence_log_ratio (RATIOS[name]).
    """
    if old_logps is None:
        old_logps = logps.detach()
    loss = clipped_policy_loss(ratio(logps, old_logps, mask), advantages, clip_low, clip_high)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference policy's log-probs)")
        loss = loss + beta * kl_k3(logps, ref_logps)
    return loss


# --- aggregation: a micro-batch SUM, divided by the loop by a normaliser of the whole step ------
# Each normaliser is a sum over completions, so the loop computes it once from the step's masks
# (all micro-batches) and all-reduces it with SUM over ranks; it divides by normaliser.clamp(min=1)
# so that a step whose every completion is masked out gives a zero loss, not NaN.


def grpo_aggregate(loss: Tensor, mask: Tensor) -> Tensor:
    """GRPO (DeepSeekMath eq. 3): sum over completions of the mean of each completion's masked token
    losses. Divided by grpo_normaliser it is the mean over completions of those means."""
    m = mask.to(loss.dtype)
    return ((loss * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum()


def grpo_normaliser(mask: Tensor, max_completion_len: int) -> Tensor:
    """The number of completions with at least one loss token. A completion masked out entirely
    (truncated, dropped) counts as absent, not as a zero loss (TRL counts it in the mean as 0)."""
    return mask.any(dim=1).sum().to(torch.float32)


def dapo_aggregate(loss: Tensor, mask: Tensor) -> Tensor:
    """DAPO's token-level loss (arXiv:2503.14476, eq. 12): the sum of all masked token losses.
    Divided by dapo_normaliser it is the mean over every token of the step, so a long completion
    weighs in proportion to its length."""
    return (loss * mask.to(loss.dtype)).sum()


def dapo_normaliser(mask: Tensor, max_completion_len: int) -> Tensor:
    """The number of loss tokens."""
    return mask.sum().to(torch.float32)


def dr_grpo_aggregate(loss: Tensor, mask: Tensor) -> Tensor:
    """Dr. GRPO (arXiv:2503.20783, eq. 3 and its code's constant normaliser): the sum of all masked
    token losses, with no per-completion length normalisation."""
    return (loss * mask.to(loss.dtype)).sum()


def dr_grpo_normaliser(mask: Tensor, max_completion_len: int) -> Tensor:
    """A constant: number of completions x the configured maximum completion length (the paper's
    code, oat's `constant_normalizer=generate_max_length`, and TRL's `dr_grpo`:
    B x max_completion_length). Every completion counts, masked out or not, so the constant does
    not depend on what was sampled."""
    return torch.tensor(float(mask.shape[0] * max_completion_len), device=mask.device)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "grpo": grpo_aggregate,
    "dapo": dapo_aggregate,
    "dr_grpo": dr_grpo_aggregate,
}
NORMALISERS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": grpo_normaliser,
    "dapo": dapo_normaliser,
    "dr_grpo": dr_grpo_normaliser,
}


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio: str = "token",
    loss_type: str = "grpo",
    max_completion_len: int | None = None,
) -> Tensor:
    """The whole batch's loss in one call: AGGREGATIONS[loss_type](per_token_loss) / NORMALISERS[loss_type].

    Shapes as in per_token_loss. max_completion_len (for dr_grpo) defaults to T, the padded
    completion length of this batch; pass the configured maximum to match a run. A batch with no
    loss token gives 0, not NaN.
    """
    tok = per_token_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps, beta=beta,
                         clip_low=clip_low, clip_high=clip_high, ratio=RATIOS[ratio])
    normaliser = NORMALISERS[loss_type](mask, logps.shape[1] if max_completion_len is None else max_completion_len)
    return AGGREGATIONS[loss_type](tok, mask) / normaliser.clamp(min=1.0).to(tok.device)


# --- metrics (detached, for logging) ------------------------------------------------------------


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


@torch.no_grad()
def clip_fractions(
    log_ratio: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """Shares of loss tokens where clipping removed the gradient (low, high), as TRL logs them:
    low: r < 1 - clip_low with A < 0 (the loss would push r lower still);
    high: r > 1 + clip_high with A > 0.
    Where r is outside the range but the advantage points back inside, min() keeps the unclipped
    term and the gradient flows, so those tokens are not counted. log_ratio (B, T) from RATIOS."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_ratio)
    low = (ratio < 1.0 - clip_low) & (adv < 0)
    high = (ratio > 1.0 + clip_high) & (adv > 0)
    return _masked_mean(low.float(), mask), _masked_mean(high.float(), mask)


@torch.no_grad()
def mean_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """The k3 KL to the reference averaged over loss tokens (0-dim)."""
    return _masked_mean(kl_k3(logps.float(), ref_logps.float()), mask)
