"""algos/dpo.py: each loss equals its paper's formula, written out here in float64, in value and in
gradient (autograd of the written-out formula), on random log-probs; and TRL's CPO / ORPO loss methods
(pure tensor math on a stand-in object) give the same numbers where they compute the same loss."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from algos.dpo import DPO_LOSSES, dpo_loss, kto_loss, orpo_log_odds, orpo_loss, simpo_loss

B = 32
# Float32 evaluation against a float64 formula: relative error ~1e-7 per operation, a few dozen operations.
TOL = dict(rtol=1e-5, atol=1e-6)


def summed_logps(seed):
    """Summed response log-probs: policy and reference near each other, as during training."""
    g = torch.Generator().manual_seed(seed)
    ref_c = -torch.rand(B, generator=g, dtype=torch.float64) * 200 - 5
    ref_r = -torch.rand(B, generator=g, dtype=torch.float64) * 200 - 5
    pol_c = ref_c + torch.randn(B, generator=g, dtype=torch.float64) * 8
    pol_r = ref_r + torch.randn(B, generator=g, dtype=torch.float64) * 8
    return pol_c, pol_r, ref_c, ref_r


def averaged_logps(seed):
    """Length-averaged log-probs, in [-4, -0.02]: P(y) = exp(avg) well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return (-(torch.rand(B, generator=g, dtype=torch.float64) * 4 + 0.02),
            -(torch.rand(B, generator=g, dtype=torch.float64) * 4 + 0.02))


def value_and_grads(fn, inputs64, weights):
    """fn(*inputs) -> losses (B,); returns (weighted sum, its gradient w.r.t. each input), inputs in
    the dtype given. The random weights make every example's gradient count separately."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs64]
    losses = fn(*inputs)
    total = (losses.double() * weights).sum()
    total.backward()
    return losses.detach().double(), [x.grad.double() if x.grad is not None else torch.zeros_like(x) for x in inputs]


def assert_same(ours_fn, formula_fn, inputs64, tol=TOL):
    weights = torch.rand(B, generator=torch.Generator().manual_seed(99), dtype=torch.float64) + 0.5
    ours, ours_grads = value_and_grads(ours_fn, [x.float() for x in inputs64], weights)
    ref, ref_grads = value_and_grads(formula_fn, inputs64, weights)
    torch.testing.assert_close(ours, ref, **tol)
    for g, r in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **tol)


def sigmoid64(x):
    return 1 / (1 + torch.exp(-x))


# ---- DPO and its variants, written out from the papers ----

def dpo_paper(pc, pr, rc, rr, beta, eps):
    """Rafailov et al. Eq. 7, with Mitchell's cDPO soft labels (1 - eps, eps)."""
    h = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * torch.log(sigmoid64(h)) - eps * torch.log(sigmoid64(-h))


def ipo_paper(pc, pr, rc, rr, beta):
    """Azar et al. Eq. 17: (log-ratio margin - 1 / (2 tau))^2."""
    return (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2


def hinge_paper(pc, pr, rc, rr, beta):
    """SLiC / RSO normalised hinge: max(0, 1 - beta * margin)."""
    return torch.clamp(1 - beta * ((pc - rc) - (pr - rr)), min=0)


def robust_paper(pc, pr, rc, rr, beta, eps):
    """Chowdhury et al.: [(1 - eps) L(y_w, y_l) - eps L(y_l, y_w)] / (1 - 2 eps), L = -log sigmoid."""
    def bt_loss(a, b, ra, rb):
        return -torch.log(sigmoid64(beta * ((a - ra) - (b - rb))))
    return ((1 - eps) * bt_loss(pc, pr, rc, rr) - eps * bt_loss(pr, pc, rr, rc)) / (1 - 2 * eps)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_and_cdpo_equal_the_paper(beta, eps):
    assert_same(lambda *x: dpo_loss(*x, beta=beta, loss_type="sigmoid", label_smoothing=eps)[0],
                lambda *x: dpo_paper(*x, beta, eps), summed_logps(0))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_equals_the_paper(beta):
    # IPO takes length-averaged log-probs (dpo_ipo's docstring); the formula does not care which.
    pc, pr = averaged_logps(1)
    rc, rr = pc + 0.3 * torch.randn(B, dtype=torch.float64), pr + 0.3 * torch.randn(B, dtype=torch.float64)
    assert_same(lambda *x: dpo_loss(*x, beta=beta, loss_type="ipo")[0],
                lambda *x: ipo_paper(*x, beta), (pc, pr, rc, rr))


def test_hinge_equals_the_paper():
    inputs = summed_logps(2)
    losses = hinge_paper(*inputs, 0.1)
    assert (losses > 0).any() and (losses == 0).any(), "both sides of the hinge should be tested"
    assert_same(lambda *x: dpo_loss(*x, beta=0.1, loss_type="hinge")[0],
                lambda *x: hinge_paper(*x, 0.1), inputs)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_equals_the_paper(eps):
    assert_same(lambda *x: dpo_loss(*x, beta=0.1, loss_type="robust", label_smoothing=eps)[0],
                lambda *x: robust_paper(*x, 0.1, eps), summed_logps(3))


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES))
def test_rewards_are_the_detached_implicit_rewards(loss_type):
    pc, pr, rc, rr = (x.float().requires_grad_(True) for x in summed_logps(4))
    _, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    torch.testing.assert_close(chosen_rewards.double(), 0.3 * (pc - rc).detach().double(), **TOL)
    torch.testing.assert_close(rejected_rewards.double(), 0.3 * (pr - rr).detach().double(), **TOL)
    assert chosen_rewards.shape == rejected_rewards.shape == (B,)


def test_bfloat16_inputs_are_computed_in_float32():
    inputs = [x.bfloat16() for x in summed_logps(5)]
    losses, chosen_rewards, _ = dpo_loss(*inputs)
    assert losses.dtype == chosen_rewards.dtype == torch.float32
    torch.testing.assert_close(losses.double(), dpo_paper(*(x.double() for x in inputs), 0.1, 0.0), **TOL)


def test_bad_arguments_raise():
    inputs = [x.float() for x in summed_logps(6)]
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(*inputs, loss_type="sigmod")
    for loss_type in ("ipo", "hinge"):
        with pytest.raises(ValueError, match="takes no label_smoothing"):
            dpo_loss(*inputs, loss_type=loss_type, label_smoothing=0.1)
    for loss_type in ("sigmoid", "robust"):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            dpo_loss(*inputs, loss_type=loss_type, label_smoothing=0.5)


# ---- SimPO, ORPO, KTO ----

@pytest.mark.parametrize("beta, ratio, eps", [(2.0, 0.5, 0.0), (2.5, 0.3, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_equals_the_paper(beta, ratio, eps):
    """Meng et al. Eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)."""
    gamma = ratio * beta

    def paper(c, r):
        x = beta * c - beta * r - gamma
        return -(1 - eps) * torch.log(sigmoid64(x)) - eps * torch.log(sigmoid64(-x))

    pc, pr = averaged_logps(7)
    assert_same(lambda c, r: simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)[0],
                paper, (pc, pr))
    _, chosen_rewards, rejected_rewards = simpo_loss(pc.float(), pr.float(), beta=beta, gamma_beta_ratio=ratio)
    torch.testing.assert_close(chosen_rewards.double(), beta * pc, **TOL)
    torch.testing.assert_close(rejected_rewards.double(), beta * pr, **TOL)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_equals_the_paper(lam):
    """Hong et al. Eqs. 2-7: L_SFT + lambda * -log sigmoid(log(odds(y_w) / odds(y_l))), with
    odds(y) = P / (1 - P) and P = exp(mean token log-prob)."""
    def paper(c, r, nll):
        p_c, p_r = torch.exp(c), torch.exp(r)
        odds_ratio = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
        return nll - lam * torch.log(sigmoid64(torch.log(odds_ratio)))

    pc, pr = averaged_logps(8)
    # The paper's SFT term of each pair is the length-averaged NLL of the chosen response: -pc.
    assert_same(lambda c, r: orpo_loss(c, r, -c, beta=lam)[0], lambda c, r: paper(c, r, -c), (pc, pr))
    # And a separately given NLL enters as it is, with its own gradient.
    nll = torch.rand(B, dtype=torch.float64) * 3
    assert_same(lambda c, r, n: orpo_loss(c, r, n, beta=lam)[0], paper, (pc, pr, nll))
    p_c, p_r = torch.exp(pc), torch.exp(pr)
    torch.testing.assert_close(orpo_log_odds(pc.float(), pr.float()).double(),
                               torch.log((p_c / (1 - p_c)) / (p_r / (1 - p_r))), **TOL)


def test_orpo_is_finite_near_probability_one():
    c = torch.tensor([-1e-9, 0.0, -30.0], requires_grad=True)
    r = torch.tensor([-0.5, -0.5, -1e-12], requires_grad=True)
    losses, _, _ = orpo_loss(c, r, -c)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def kto_paper(pol, ref, desirable, kl, beta, lam_d, lam_u):
    """Ethayarajh et al.: L = E[lambda_y - v(x, y)], v = lambda_D sigmoid(beta (r - z0)) if desirable,
    lambda_U sigmoid(beta (z0 - r)) if undesirable, z0 = max(0, KL estimate) without gradient."""
    z0 = max(0.0, float(kl))
    r = pol - ref
    v = torch.where(desirable, lam_d * sigmoid64(beta * (r - z0)), lam_u * sigmoid64(beta * (z0 - r)))
    lam = torch.where(desirable, torch.full_like(r, lam_d), torch.full_like(r, lam_u))
    return lam - v


@pytest.mark.parametrize("kl, lam_d, lam_u", [(3.0, 1.0, 1.0), (0.7, 1.33, 1.0), (-2.0, 1.0, 0.8)])
def test_kto_equals_the_paper(kl, lam_d, lam_u):
    pol, _, ref, _ = summed_logps(9)
    desirable = torch.rand(B, generator=torch.Generator().manual_seed(3)) < 0.6
    assert 0 < desirable.sum() < B
    assert_same(lambda p, q: kto_loss(p, q, desirable, torch.tensor(kl), beta=0.1, desirable_weight=lam_d,
                                      undesirable_weight=lam_u)[0],
                lambda p, q: kto_paper(p, q, desirable, kl, 0.1, lam_d, lam_u), (pol, ref))
    _, rewards_d, rewards_u = kto_loss(pol.float(), ref.float(), desirable, kl)
    torch.testing.assert_close(rewards_d.double(), 0.1 * (pol - ref)[desirable], **TOL)
    torch.testing.assert_close(rewards_u.double(), 0.1 * (pol - ref)[~desirable], **TOL)


def test_kto_kl_estimate_has_no_gradient():
    pol, _, ref, _ = (x.float() for x in summed_logps(10))
    kl = torch.tensor(1.5, requires_grad=True)
    desirable = torch.arange(B) % 3 == 0
    losses, _, _ = kto_loss(pol.requires_grad_(True), ref, desirable, kl)
    losses.sum().backward()
    assert kl.grad is None and pol.grad is not None


# ---- TRL, where its loss math is callable without building a trainer ----

@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl")
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    return CPOTrainer, ORPOTrainer


def trl_self(**fields):
    """What CPOTrainer.cpo_loss / ORPOTrainer.odds_ratio_loss read from `self`."""
    defaults = dict(alpha=0.0, simpo_gamma=0.0, label_smoothing=0.0)
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **{**defaults, **fields})


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_variants_match_trl(trl_trainers, loss_type, eps):
    """CPO's loss of (a, b) is DPO's loss of the margin a - b, so with a, b the policy-reference
    log-ratios it is TRL's DPO loss."""
    cpo = trl_trainers[0]
    pc, pr, rc, rr = (x.float() for x in summed_logps(11))
    ours = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=eps)[0]
    theirs = cpo.cpo_loss(trl_self(beta=0.2, loss_type=loss_type, label_smoothing=eps), pc - rc, pr - rr)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_simpo_matches_trl(trl_trainers):
    cpo = trl_trainers[0]
    pc, pr = (x.float() for x in averaged_logps(12))
    ours = simpo_loss(pc, pr, beta=2.0, gamma_beta_ratio=0.5)
    theirs = cpo.cpo_loss(trl_self(beta=2.0, loss_type="simpo", simpo_gamma=1.0), pc, pr)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_orpo_matches_trl(trl_trainers):
    orpo = trl_trainers[1]
    pc, pr = (x.float() for x in averaged_logps(13))
    nll = torch.rand(B) * 2
    losses, chosen_rewards, rejected_rewards = orpo_loss(pc, pr, nll, beta=0.1)
    # TRL returns beta * log sigmoid(log odds) and subtracts its mean from the NLL of the batch.
    trl_or, trl_chosen, trl_rejected, _, trl_log_odds = orpo.odds_ratio_loss(trl_self(beta=0.1), pc, pr)
    torch.testing.assert_close(losses, nll - trl_or, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-5, atol=1e-6)
    assert math.isclose(orpo_log_odds(pc, pr).mean().item(), trl_log_odds.item(), rel_tol=1e-5, abs_tol=1e-6)
