"""Loss math against float64 formulas written out here."""

import pytest
import torch

from algos.logprobs import (IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum, linear_token_logprobs,
                            selective_log_softmax)
from model.config import ModelConfig
from model.gpt import GPT


def _reference_sum_ce(hidden, weight, targets):
    logits = hidden.double() @ weight.double().T  # (B, T, V)
    logp = logits - logits.logsumexp(-1, keepdim=True)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * valid).sum()


# fused: the chunks' softmax work compiled, as on CUDA (here by inductor's CPU backend), not eager.
@pytest.mark.parametrize("chunk,fused", [(1, False), (5, False), (7, False), (1000, False), (5, True), (1000, True)])
def test_linear_cross_entropy_matches_float64_formula(chunk, fused):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[0, :3] = IGNORE_INDEX
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=chunk, fused=fused)
    (loss * 0.5).backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = _reference_sum_ce(h64, w64, targets)
    (ref * 0.5).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_plain_ce_agrees():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    loss = linear_cross_entropy_sum(hidden, weight, targets)
    torch.testing.assert_close(loss, cross_entropy_sum(hidden @ weight.T, targets))
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


def test_selective_log_softmax_matches_float64():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g)
    ids = torch.randint(0, 9, (2, 4), generator=g)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, ids).double(), ref, rtol=1e-5, atol=1e-5)


def _reference_token_logprobs(hidden, weight, targets):
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)  # (B, T, V)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked, 0.0)


@pytest.mark.parametrize("chunk,fused", [(1, False), (4, False), (7, False), (1000, False), (4, True), (1000, True)])
def test_token_logprobs_and_any_weighting_match_float64_log_softmax(chunk, fused):
    """Per-token log-probs, and the gradient of a random per-token weighting of them (what DPO's
    sigmoid and GRPO's advantages feed back), against float64 log_softmax."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[1, 4:] = IGNORE_INDEX
    upstream = torch.randn(3, 7, generator=g, dtype=torch.float64)
    got = linear_token_logprobs(hidden, weight, targets, chunk_tokens=chunk, fused=fused)
    (got.double() * upstream).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = _reference_token_logprobs(h64, w64, targets)
    (ref * upstream).sum().backward()
    assert got.shape == (3, 7) and got.dtype == torch.float32
    assert torch.all(got[targets == IGNORE_INDEX] == 0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_model_token_logprobs_on_packed_rows_match_log_softmax_of_logits():
    """model(..., targets, logprobs=True) on a packed row equals log_softmax(model(x)).gather(...),
    in value and in the gradient of a nonlinear function of per-sequence sums (DPO's shape)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny-qwen3"))
    model.init_weights(seed=0)
    ids = torch.randint(0, 512, (2, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, 4] = IGNORE_INDEX  # no target across the document boundary
    targets[0, :2] = IGNORE_INDEX  # a masked prompt

    def objective(token_logps):  # a sigmoid of per-document sums, as DPO computes
        per_doc = torch.stack([token_logps[0, :5].sum(), token_logps[0, 5:].sum(), token_logps[1].sum()])
        return torch.nn.functional.logsigmoid(0.1 * (per_doc[0] - per_doc[1]) + 0.05 * per_doc[2])

    objective(model(ids, position_ids=pos, document_ids=docs, targets=targets, logprobs=True)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids, position_ids=pos, document_ids=docs)
    ref_logps = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref_logps = torch.where(targets != IGNORE_INDEX, ref_logps, 0.0)
    objective(ref_logps).backward()
    with torch.no_grad():
        value = model(ids, position_ids=pos, document_ids=docs, targets=targets, logprobs=True)
    torch.testing.assert_close(value.double(), ref_logps.detach(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():  # two float32 paths: bound relative to the tensor's scale
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=1e-4 * p.grad.abs().max().item(), msg=n)


def test_summed_loss_does_no_gradient_work_without_grad_mode(monkeypatch):
    """Evaluation under no_grad must not build the (V, C) weight gradient of the fused path."""
    from algos import logprobs

    def fail(*args, **kwargs):
        raise AssertionError("the gradient path ran under no_grad")

    monkeypatch.setattr(logprobs._LinearCrossEntropy, "apply", fail)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=3)
    torch.testing.assert_close(loss.double(), _reference_sum_ce(hidden.detach(), weight.detach(), targets),
                               rtol=1e-5, atol=1e-5)
