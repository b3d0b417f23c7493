"""algos/grpo.py against float64 formulas written out here from the papers (DeepSeekMath eq. 3-4,
DAPO eq. 10-12, Dr. GRPO, GSPO eq. 7), and the invariance the loop relies on: micro-batch sums
divided by the step's normaliser equal the one-shot loss."""

import math

import pytest
import torch

from algos.grpo import (
    AGGREGATIONS,
    NORMALISERS,
    RATIOS,
    clip_fractions,
    clipped_policy_loss,
    drop_truncated,
    group_advantages,
    grpo_loss,
    informative_groups,
    mean_kl,
    per_token_loss,
    sequence_log_ratio,
)

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def _batch(B=6, T=7, seed=0, spread=0.3):
    """Random log-probs (B, T), an old policy near them (some ratios fall outside the clip range),
    a reference, advantages (B,) and a mask of completions of lengths 1..T (right padding)."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + spread * torch.randn(B, T, generator=g)
    ref = logps + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logps, old, ref, adv, mask


# ---- float64 references, written from the papers --------------------------------------------


def _ref_token_losses(logps, old, ref, adv, beta):
    """Per-token loss, plain Python loops over float64 values: -min(r A, clip(r) A) + beta * k3."""
    B, T = logps.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            r = torch.exp(logps[i, t] - old[i, t])
            clipped = torch.clamp(r, 1 - CLIP_LOW, 1 + CLIP_HIGH)
            pg = -torch.minimum(r * adv[i], clipped * adv[i])
            kl = torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1
            out[i, t] = pg + beta * kl
    return out


def _ref_loss(logps, old, ref, adv, mask, beta, loss_type, max_len):
    tok = _ref_token_losses(logps, old, ref, adv, beta)
    B = logps.shape[0]
    lengths = [int(mask[i].sum()) for i in range(B)]
    sums = [sum(tok[i, t] for t in range(logps.shape[1]) if mask[i, t]) for i in range(B)]
    if loss_type == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        return sum(s / n for s, n in zip(sums, lengths)) / B
    if loss_type == "dapo":  # 1/sum_i |o_i| sum_i sum_t
        return sum(sums) / sum(lengths)
    if loss_type == "dr_grpo":  # 1/(G * L_max) sum_i sum_t
        return sum(sums) / (B * max_len)
    raise AssertionError(loss_type)


def _ref_gspo_loss(logps, old, ref, adv, mask, beta):
    """GSPO eq. 7 (+ DeepSeekMath's per-token k3 KL averaged per sequence):
    1/G sum_i [ -min(s_i A_i, clip(s_i) A_i) + beta/|o_i| sum_t k3_it ],
    s_i = exp(1/|o_i| sum_t log(pi/pi_old))."""
    total = 0.0
    B = logps.shape[0]
    for i in range(B):
        idx = mask[i].nonzero().flatten()
        n = len(idx)
        s = torch.exp((logps[i, idx] - old[i, idx]).sum() / n)
        pg = -torch.minimum(s * adv[i], torch.clamp(s, 1 - CLIP_LOW, 1 + CLIP_HIGH) * adv[i])
        kl = (torch.exp(ref[i, idx] - logps[i, idx]) - (ref[i, idx] - logps[i, idx]) - 1).sum() / n
        total = total + pg + beta * kl
    return total / B


# ---- advantages --------------------------------------------------------------------------------


def test_group_advantages_match_formula():
    g = torch.Generator().manual_seed(1)
    G = 4
    rewards = torch.randn(3 * G, generator=g)
    rewards[G : 2 * G] = 1.0  # a uniform group: advantages exactly 0
    r = rewards.double().tolist()
    eps = 1e-4
    groups = [r[k : k + G] for k in range(0, len(r), G)]
    means = [sum(x) / G for x in groups]
    stds = [math.sqrt(sum((v - m) ** 2 for v in x) / (G - 1)) for x, m in zip(groups, means)]  # unbiased
    mean_all = sum(r) / len(r)
    std_all = math.sqrt(sum((v - mean_all) ** 2 for v in r) / (len(r) - 1))
    want_group = [(v - means[i // G]) / (stds[i // G] + eps) for i, v in enumerate(r)]
    want_batch = [(v - means[i // G]) / (std_all + eps) for i, v in enumerate(r)]
    want_none = [v - means[i // G] for i, v in enumerate(r)]
    for scale, want in [("group", want_group), ("batch", want_batch), ("none", want_none)]:
        got = group_advantages(rewards, G, scale=scale, eps=eps)
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert torch.all(got[G : 2 * G] == 0)
    with pytest.raises(ValueError):
        group_advantages(rewards, 5)
    with pytest.raises(ValueError):
        group_advantages(rewards, G, scale="rank")


def test_informative_groups_and_truncation_mask():
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.5, 0.5, 0.25])
    keep, uniform = informative_groups(rewards, 3)
    assert keep.tolist() == [True] * 3 + [False] * 6 + [True] * 3
    assert int(uniform) == 2
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = drop_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[True] * 4, [False] * 4, [True] * 4]


# ---- every aggregation against its formula, value and gradient ----------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_float64_formula(loss_type, beta):
    logps, old, ref, adv, mask = _batch()
    max_len = 11  # the configured maximum, larger than this batch's padded length
    assert all(f > 0 for f in clip_fractions(logps - old, adv, mask, CLIP_LOW, CLIP_HIGH))  # both clips occur
    x = logps.clone().requires_grad_()
    loss = grpo_loss(x, old, adv, mask, ref_logps=ref, beta=beta, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                     loss_type=loss_type, max_completion_len=max_len)
    loss.backward()
    x64 = logps.double().requires_grad_()
    want = _ref_loss(x64, old.double(), ref.double(), adv.double(), mask, beta, loss_type, max_len)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    # Padding positions get no gradient.
    assert torch.all(x.grad[~mask] == 0)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_sequence_ratio_matches_formula(beta):
    logps, old, ref, adv, mask = _batch(seed=4, spread=0.4)
    lr = sequence_log_ratio(logps, old, mask)
    assert all(f > 0 for f in clip_fractions(lr, adv, mask, CLIP_LOW, CLIP_HIGH))  # both clips occur
    for i in range(logps.shape[0]):
        idx = mask[i].nonzero().flatten()
        want = (logps[i, idx].double() - old[i, idx].double()).mean()
        torch.testing.assert_close(lr[i].double(), want.expand(logps.shape[1]), rtol=1e-5, atol=1e-6)
    x = logps.clone().requires_grad_()
    loss = grpo_loss(x, old, adv, mask, ref_logps=ref, beta=beta, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                     ratio="sequence", loss_type="grpo")
    loss.backward()
    x64 = logps.double().requires_grad_()
    want = _ref_gspo_loss(x64, old.double(), ref.double(), adv.double(), mask, beta)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_first_pass_is_the_plain_policy_gradient(loss_type, ratio):
    """mu = 1: pi_old = pi (old_logps None, or logps.detach()), the ratio is 1, nothing is clipped,
    and the loss's gradient is that of -A * log pi aggregated the same way (REINFORCE with the
    group baseline)."""
    logps, _, _, adv, mask = _batch(seed=5)
    x = logps.clone().requires_grad_()
    loss = grpo_loss(x, None, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, loss_type=loss_type)
    loss.backward()
    y = logps.clone().requires_grad_()
    loss_detached = grpo_loss(y, y.detach(), adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                              ratio=ratio, loss_type=loss_type)
    loss_detached.backward()
    x64 = logps.double().requires_grad_()
    m = mask.double()
    pg = -adv.double()[:, None] * x64 * m  # (B, T)
    B, T = logps.shape
    want = {"grpo": (pg.sum(1) / m.sum(1)).sum() / B, "dapo": pg.sum() / m.sum(), "dr_grpo": pg.sum() / (B * T)}[loss_type]
    want.backward()
    want_value = {"grpo": -adv.double().mean(), "dapo": (-adv.double()[:, None] * m).sum() / m.sum(),
                  "dr_grpo": (-adv.double()[:, None] * m).sum() / (B * T)}[loss_type]
    torch.testing.assert_close(loss.double(), want_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_detached.double(), want_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    # At r = 1 the sequence ratio's gradient, d exp(mean_t log r_t), is 1/|o| per token, like the
    # token ratio's averaged over the completion: both levels agree with the plain gradient.
    torch.testing.assert_close(y.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_clip_higher_clips_exactly_where_the_formula_says():
    """Ratios just inside and just outside [1 - clip_low, 1 + clip_high], for both advantage signs.
    The clipped surrogate has zero gradient exactly where r > 1 + clip_high with A > 0 or
    r < 1 - clip_low with A < 0, and the gradient A * r everywhere else."""
    d = 1e-3
    ratios = [1 - CLIP_LOW - d, 1 - CLIP_LOW + d, 1.0, 1 + CLIP_HIGH - d, 1 + CLIP_HIGH + d,
              1 + CLIP_LOW + d]  # the last one is clipped only with a symmetric range
    r = torch.tensor(ratios, dtype=torch.float64)
    for a in (1.5, -0.7):
        log_ratio = r.log()[None, :].repeat(1, 1).requires_grad_()  # (1, 6)
        adv = torch.tensor([a], dtype=torch.float64)
        loss = clipped_policy_loss(log_ratio, adv, CLIP_LOW, CLIP_HIGH)
        loss.sum().backward()
        for k, rv in enumerate(ratios):
            clipped = (a > 0 and rv > 1 + CLIP_HIGH) or (a < 0 and rv < 1 - CLIP_LOW)
            want_value = -(min(rv * a, max(min(rv, 1 + CLIP_HIGH), 1 - CLIP_LOW) * a))
            want_grad = 0.0 if clipped else -a * rv  # d(-r A)/d(log r) = -A r
            assert loss[0, k].item() == pytest.approx(want_value, rel=1e-12)
            assert log_ratio.grad[0, k].item() == pytest.approx(want_grad, abs=1e-12), (a, rv)
        low, high = clip_fractions(log_ratio.detach(), adv, torch.ones(1, 6, dtype=torch.bool), CLIP_LOW, CLIP_HIGH)
        n_low = sum(a < 0 and rv < 1 - CLIP_LOW for rv in ratios)
        n_high = sum(a > 0 and rv > 1 + CLIP_HIGH for rv in ratios)
        assert (low.item() * 6, high.item() * 6) == (pytest.approx(n_low), pytest.approx(n_high))
        assert n_low + n_high == 1  # one clipped ratio per advantage sign
    # The symmetric range (clip_high = clip_low) clips the last ratio; clip-higher lets it through.
    lr = torch.tensor([[math.log(1 + CLIP_LOW + d)]], requires_grad=True)
    clipped_policy_loss(lr, torch.tensor([1.0]), CLIP_LOW, CLIP_LOW).sum().backward()
    assert lr.grad.item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_micro_batch_sums_equal_one_shot_loss(loss_type, ratio):
    """The loop's way: split the step into ragged micro-batches (each padded only to its own longest
    completion, as a collator does; some on 'another rank'), sum AGGREGATIONS / step normaliser.
    Value and gradient equal grpo_loss on the whole batch; the normaliser is additive."""
    logps, old, ref, adv, mask = _batch(B=8, T=9, seed=7, spread=0.6)
    mask[3] = False  # a completion dropped entirely (e.g. truncated)
    max_len = 12
    beta = 0.04
    x = logps.clone().requires_grad_()
    one_shot = grpo_loss(x, old, adv, mask, ref_logps=ref, beta=beta, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                         ratio=ratio, loss_type=loss_type, max_completion_len=max_len)
    one_shot.backward()

    splits = [(0, 3), (3, 4), (4, 8)]
    normaliser = sum(NORMALISERS[loss_type](mask[a:b], max_len) for a, b in splits)  # per rank, then all-reduce
    assert normaliser == NORMALISERS[loss_type](mask, max_len)
    y = logps.clone().requires_grad_()
    total = 0.0
    for a, b in splits:
        width = max(int(mask[a:b].sum(1).max()), 1)  # pad only to this micro-batch's longest
        tok = per_token_loss(y[a:b, :width], old[a:b, :width], adv[a:b], mask[a:b, :width], ref_logps=ref[a:b, :width],
                             beta=beta, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ratio=RATIOS[ratio])
        part = AGGREGATIONS[loss_type](tok, mask[a:b, :width]) / normaliser.clamp(min=1.0)
        part.backward()
        total = total + part.detach()
    # Two float32 summation orders of the same terms: a few ulps apart, so 1e-5 (not 1 ulp) is the bound.
    torch.testing.assert_close(total, one_shot.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)


def test_all_masked_batch_is_zero_and_beta_zero_needs_no_reference():
    logps, old, ref, adv, mask = _batch(seed=9)
    for loss_type in AGGREGATIONS:
        assert grpo_loss(logps, old, adv, torch.zeros_like(mask), loss_type=loss_type).item() == 0.0
    grpo_loss(logps, old, adv, mask, beta=0.0)  # ref_logps None is fine
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, adv, mask, beta=0.1)


def test_mean_kl_matches_formula():
    logps, _, ref, _, mask = _batch(seed=11)
    p, q = logps.double(), ref.double()
    k3 = torch.exp(q - p) - (q - p) - 1
    want = k3[mask].mean()
    torch.testing.assert_close(mean_kl(logps, ref, mask).double(), want, rtol=1e-5, atol=1e-7)
    assert (k3 >= 0).all()


# ---- TRL's GRPO loss, called on a stand-in for its trainer ---------------------------------------


class _OneProcess:
    """What TRL's _compute_loss asks of accelerate's Accelerator, for one process."""

    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trl_loss(logps, old, ref, adv, mask, *, loss_type, level, beta, max_len):
    """TRL 1.16's GRPOTrainer._compute_loss, called unbound on a namespace holding the attributes it
    reads, with the model's forward replaced by the given log-probs: no trainer, model or data."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    import collections
    import types

    B, T = logps.shape
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)}, accelerator=_OneProcess())
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    try:
        loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
    except AttributeError as e:  # a TRL version that reads more of its trainer than this stand-in holds
        pytest.skip(f"TRL's _compute_loss needs more than the stand-in trainer: {e}")
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "token"), ("dr_grpo", "token"),
                                             ("grpo", "sequence")])
def test_matches_trl_grpo_loss(loss_type, level):
    logps, old, ref, adv, mask = _batch(seed=4, spread=0.4)
    x = logps.clone().requires_grad_()
    want, metrics = _trl_loss(x, old, ref, adv, mask, loss_type=loss_type, level=level, beta=0.04, max_len=11)
    want.backward()
    y = logps.clone().requires_grad_()
    got = grpo_loss(y, old, adv, mask, ref_logps=ref, beta=0.04, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                    ratio=level, loss_type=loss_type, max_completion_len=11)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # two implementations' float32 summation orders
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)
    assert mean_kl(logps, ref, mask).item() == pytest.approx(metrics["kl"][0], rel=1e-5)
    if level == "token":  # TRL averages sequence-level clip flags over sequences, ours over tokens
        low, high = clip_fractions(logps - old, adv, mask, CLIP_LOW, CLIP_HIGH)
        assert (low.item(), high.item()) == (pytest.approx(metrics["clip_ratio/low_mean"][0]),
                                             pytest.approx(metrics["clip_ratio/high_mean"][0]))
