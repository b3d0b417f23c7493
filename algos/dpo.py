"""Preference-optimisation losses: DPO and its family, as functions of per-sequence log-probabilities.

Every input is a (B,) tensor holding one number per response: log pi(y | x), summed over the response's
tokens unless the function says "length-averaged" (then divided by the number of response tokens).
The per-token log-probs come from `algos.logprobs.linear_token_logprobs`; the loop sums (or averages)
them per sequence. Every function returns per-example losses (B,), not reduced, so the loop writes its
own normaliser, and the detached rewards that the metrics report:

    dpo_loss    paired, with a reference model; loss_type picks one of DPO_LOSSES:
                sigmoid (DPO; label_smoothing > 0 is conservative DPO), ipo, hinge (SLiC), robust
    simpo_loss  paired, no reference: length-averaged log-probs and a target margin
    orpo_loss   paired, no reference: odds-ratio term plus the NLL of the chosen response
    kto_loss    unpaired desirable / undesirable responses, the batch KL estimate as reference point

A new variant of dpo_loss is a new small function of the margin h = (pi_c - ref_c) - (pi_r - ref_r),
added to DPO_LOSSES. Inputs in bfloat16 or float16 are computed in float32.

Deliberately left out: TRL's other loss types (exo_pair, nca_pair, bco_pair, sppo_hard, aot, apo,
discopop, sigmoid_norm), its f-divergence scores and weighted sums of several loss types, and the
length-desensitisation (LD-DPO) weighting of tokens, which belongs where the log-probs are summed.

Pure tensor functions: no I/O, no distributed calls, no config objects.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- DPO variants
# Each takes the margin h (B,) = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), the
# log-ratio of the chosen response minus that of the rejected one, and returns the losses (B,).

def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(f"loss_type {name!r} takes no label_smoothing (got {label_smoothing}); "
                         f"it applies to 'sigmoid' (conservative DPO) and 'robust'")


def dpo_sigmoid(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """-log sigmoid(beta * h): the Bradley-Terry likelihood of the preference under the implicit reward
    beta * log(pi / pi_ref) (Eq. 7 of the DPO paper).

    "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Rafailov, Sharma,
    Mitchell, Ermon, Manning, Finn, 2023. https://arxiv.org/abs/2305.18290

    label_smoothing = eps > 0 is conservative DPO (cDPO): each label is taken to be flipped with
    probability eps, so the loss is the cross-entropy against the soft label (1 - eps, eps):
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    "A note on DPO with noisy preferences & relationship to IPO", Mitchell, 2023.
    https://ericmitchell.ai/cdpo.pdf
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    logits = beta * margin
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_ipo(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """(h - 1 / (2 beta))^2: regresses the log-ratio margin onto a fixed target instead of pushing it to
    infinity, so deterministic preferences do not make the policy drift arbitrarily far from the
    reference (Eq. 17, with beta playing the paper's tau).

    "A General Theoretical Paradigm to Understand Learning from Human Preferences", Azar, Rowland, Piot,
    Guo, Calandriello, Valko, Munos, 2023. https://arxiv.org/abs/2310.12036

    The caller passes length-AVERAGED log-probs (each sequence's sum divided by its number of response
    tokens), for policy and reference alike: with sums the squared loss grows with the response length
    and 1 / (2 beta) means something different for every pair. TRL does the same, and notes that the
    IPO authors confirmed the paper's results use this normalised form.
    """
    _no_smoothing("ipo", label_smoothing)
    return (margin - 1 / (2 * beta)) ** 2


def dpo_hinge(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """max(0, 1 - beta * h): SLiC's rank-calibration hinge loss, on reference-normalised
    log-likelihoods as the RSO paper writes it (a margin of 1 / beta on the log-ratio margin).

    "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Zhao, Joshi, Liu, Khalman, Saleh,
    Liu, 2023. https://arxiv.org/abs/2305.10425
    "Statistical Rejection Sampling Improves Preference Optimization", Liu, Zhao, Joshi, Khalman,
    Saleh, Liu, Liu, 2023 (the normalised hinge). https://arxiv.org/abs/2309.06657
    """
    _no_smoothing("hinge", label_smoothing)
    return torch.relu(1 - beta * margin)


def dpo_robust(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO: an unbiased estimate of the clean-label DPO loss when each label is flipped with the
    known probability eps = label_smoothing in [0, 0.5):
    [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps), with l(h) = -log sigmoid(beta h).
    Unlike cDPO it is unbounded below in h: it does not stop the margin from growing.

    "Provably Robust DPO: Aligning Language Models with Noisy Feedback", Chowdhury, Kini, Natarajan,
    2024. https://arxiv.org/abs/2403.00409
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing (the flip rate) must lie in [0, 0.5) for 'robust', got {label_smoothing}")
    logits = beta * margin
    clean, flipped = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    return ((1 - label_smoothing) * clean - label_smoothing * flipped) / (1 - 2 * label_smoothing)


DPO_LOSSES = {"sigmoid": dpo_sigmoid, "ipo": dpo_ipo, "hinge": dpo_hinge, "robust": dpo_robust}


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(losses, chosen_rewards, rejected_rewards), each (B,), for pairs of responses to the same prompt.

    Inputs (B,): summed response log-probs of the policy and of the frozen reference (length-averaged
    for loss_type "ipo", see dpo_ipo). loss_type is a key of DPO_LOSSES; the papers are in each
    variant's docstring. The rewards are beta * (policy - reference) log-ratios, detached: the implicit
    reward of DPO, which the metrics report as rewards/chosen and rewards/rejected.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSSES)}")
    chosen_logratios = _at_least_f32(policy_chosen_logps) - _at_least_f32(ref_chosen_logps)  # (B,)
    rejected_logratios = _at_least_f32(policy_rejected_logps) - _at_least_f32(ref_rejected_logps)  # (B,)
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------- reference-free

def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: -log sigmoid(beta * (avg_c - avg_r) - gamma), no reference model (Eq. 6).

    "SimPO: Simple Preference Optimization with a Reference-Free Reward", Meng, Xia, Chen, 2024.
    https://arxiv.org/abs/2405.14734

    Inputs (B,) are length-AVERAGED log-probs (sum over the response tokens / their number): the
    reward beta * avg log pi(y | x) is what removes DPO's bias towards long responses. The target
    reward margin gamma is given as gamma / beta (`gamma_beta_ratio`), as the paper's code does, so it
    stays meaningful when beta changes. label_smoothing > 0 smooths the labels as in cDPO (dpo_sigmoid).
    Returns (losses, chosen_rewards, rejected_rewards), rewards = beta * avg log-prob, detached.
    """
    chosen, rejected = _at_least_f32(policy_chosen_logps), _at_least_f32(policy_rejected_logps)
    losses = dpo_sigmoid(chosen - rejected - gamma_beta_ratio, beta, label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation: log(-expm1(x)) near 0, log1p(-exp(x)) below
    -log 2 ("Accurately Computing log(1 - exp(-|a|))", Maechler, 2012). x is clamped just below 0,
    where the result would be -inf."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2)
    # Each branch sees only the inputs it serves (-1 elsewhere): torch.where's backward multiplies the
    # unused branch's gradient by 0, and 0 * inf (log1p(-exp(x)) at x ~ 0) would be NaN.
    near = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, near, far)


def orpo_log_odds(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> Tensor:
    """log(odds(y_c) / odds(y_r)) with odds(y) = P(y) / (1 - P(y)) and P(y) = exp(avg log-prob) (B,):
    ORPO's log odds ratio (Eqs. 4 and 7), worked out in log space. Inputs are length-averaged."""
    chosen, rejected = _at_least_f32(policy_chosen_logps), _at_least_f32(policy_rejected_logps)
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_nll: Tensor,
              beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO: chosen_nll - beta * log sigmoid(log odds ratio), no reference model (Eq. 6, with the
    paper's lambda called beta as in TRL).

    "ORPO: Monolithic Preference Optimization without Reference Model", Hong, Lee, Thorne, 2024.
    https://arxiv.org/abs/2403.07691

    policy_chosen_logps, policy_rejected_logps (B,): length-AVERAGED log-probs (the paper's P(y|x) is
    the geometric mean of the token probabilities). chosen_nll (B,): the supervised term of each pair;
    the paper's is the length-averaged NLL of the chosen response, i.e. -policy_chosen_logps. It is a
    separate argument so a loop may weigh the SFT term per token instead (TRL averages it over all
    chosen tokens of the batch). Returns (losses, chosen_rewards, rejected_rewards), rewards =
    beta * avg log-prob, detached, as TRL logs them; orpo_log_odds gives the log odds ratio for the
    metrics.
    """
    log_odds = orpo_log_odds(policy_chosen_logps, policy_rejected_logps)  # (B,)
    losses = _at_least_f32(chosen_nll) - beta * F.logsigmoid(log_odds)
    return (losses, beta * _at_least_f32(policy_chosen_logps).detach(),
            beta * _at_least_f32(policy_rejected_logps).detach())


# ----------------------------------------------------------------------------- unpaired

def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl_estimate: Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """KTO: a Kahneman-Tversky value of each response's implied reward r = log(pi / pi_ref), relative
    to the reference point z0:
        desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))

    "KTO: Model Alignment as Prospect Theoretic Optimization", Ethayarajh, Xu, Muennighoff, Jurafsky,
    Kiela, 2024. https://arxiv.org/abs/2402.01306

    policy_logps, ref_logps (B,): summed response log-probs; desirable (B,) bool, the row's label.
    kl_estimate: z0 before clamping, the mean of (policy - reference) log-probs of MISMATCHED pairs
    (prompt x_i with the completion of another example) over the whole batch, all ranks included. As in
    the paper it is clamped at 0 and carries no gradient (detached here). desirable_weight and
    undesirable_weight are lambda_D and lambda_U: the paper advises lambda_D n_D / (lambda_U n_U) in
    [1, 4/3] when the classes are unbalanced.
    Returns (losses (B,) in batch order, desirable_rewards (n_D,), undesirable_rewards (n_U,)), the
    rewards beta * r, detached.
    """
    logratios = _at_least_f32(policy_logps) - _at_least_f32(ref_logps)  # (B,)
    z0 = torch.as_tensor(kl_estimate, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    desirable = desirable.to(device=logratios.device, dtype=torch.bool)
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    rewards = beta * logratios.detach()
    return losses, rewards[desirable], rewards[~desirable]
