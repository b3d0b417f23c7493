"""Loss math against float64 formulas written out here."""

import pytest
import torch

from algos.logprobs import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum, selective_log_softmax


def _reference_sum_ce(hidden, weight, targets):
    logits = hidden.double() @ weight.double().T  # (B, T, V)
    logp = logits - logits.logsumexp(-1, keepdim=True)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * valid).sum()


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_linear_cross_entropy_matches_float64_formula(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[0, :3] = IGNORE_INDEX
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=chunk)
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
    torch.testing.assert_close(selective_log_softmax(logits, ids).double(), ref, rtol=1e-6, atol=1e-6)
