"""train/parallel.py: a frozen model stored in the compute dtype computes what autocast computes; float8
linear layers keep parameter names and compute what the plain model computes within float8's precision; the
long-context options (chunked MLP, activations in host memory: exact; bf16 checkpoints: within bf16's rounding)
keep parameter names, and a long step makes nothing quadratic in the sequence nor as wide as the vocabulary."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.config import ModelConfig
from model.gpt import GPT
from model.lora import apply_lora
from train.config import ParallelConfig, parse_config
from train.dist import DistInfo
from train.parallel import autocast, freeze_in_compute_dtype, parallelize
from train.sft import SFTConfig

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _model(preset):
    model = GPT(ModelConfig.preset(preset))
    model.init_weights(seed=0)
    return model


def test_frozen_copy_in_bf16_equals_the_float32_model_under_autocast_bit_for_bit():
    cfg = ParallelConfig(mixed_precision="bf16")
    for preset in ("tiny", "tiny-qwen3"):  # tied and untied output head, qk-norm
        model = _model(preset)
        frozen = freeze_in_compute_dtype(copy.deepcopy(model), cfg, CPU)
        linear = [m.weight for m in frozen.modules() if isinstance(m, torch.nn.Linear)]
        assert linear and all(w.dtype == torch.bfloat16 and not w.requires_grad for w in linear)
        assert frozen.embed_tokens.weight.dtype == torch.float32  # lookups and norms stay float32
        ids = torch.randint(0, model.config.vocab_size, (2, 33))
        targets = torch.randint(0, model.config.vocab_size, (2, 33))
        with torch.no_grad(), autocast(cfg, CPU):
            for kwargs in ({}, {"targets": targets, "logprobs": True}):
                torch.testing.assert_close(frozen(ids, **kwargs), model(ids, **kwargs), rtol=0, atol=0)


def test_frozen_copy_without_mixed_precision_keeps_float32():
    frozen = freeze_in_compute_dtype(_model("tiny"), ParallelConfig(mixed_precision="fp32"), CPU)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in frozen.parameters())


# ----------------------------------------------------------------------------- float8


def test_float8_keeps_parameter_names_and_converts_only_the_block_linears():
    for preset in ("tiny", "tiny-qwen3"):  # tied and untied output head
        with torch.device("meta"):
            plain = GPT(ModelConfig.preset(preset))
            converted = parallelize(copy.deepcopy(plain), ParallelConfig(float8=True), CPU)
        # Checkpoints, resume and the HF export see the same keys.
        assert list(converted.state_dict()) == list(plain.state_dict())
        assert [n for n, _ in converted.named_parameters()] == [n for n, _ in plain.named_parameters()]
        kinds = {name: type(m).__name__ for name, m in converted.named_modules() if isinstance(m, torch.nn.Linear)}
        assert kinds.pop("lm_head", "Linear") == "Linear"  # the output head stays in high precision
        assert len(kinds) == 7 * len(plain.layers) and set(kinds.values()) == {"Float8Linear"}


def _float8_against_plain(preset, device, seed, dtype=torch.float32):
    """(relative error of the logits, relative error of the loss, cosine of all gradients, lowest cosine of one
    parameter's gradient) of the float8 model against the same model without it, on one random batch."""
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    plain = GPT(ModelConfig.preset(preset)).to(device)
    plain.init_weights(seed=seed)
    converted = parallelize(copy.deepcopy(plain), ParallelConfig(float8=True), dist)
    gen = torch.Generator().manual_seed(seed)
    ids, targets = torch.randint(0, plain.config.vocab_size, (2, 4, 64), generator=gen).to(device)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        with torch.no_grad():
            logits = [model(ids).float() for model in (plain, converted)]
        losses = []
        for model in (plain, converted):
            loss = model(ids, targets=targets) / targets.numel()
            loss.backward()
            losses.append(loss.item())
    grads = [[p.grad.flatten().float() for p in model.parameters()] for model in (plain, converted)]
    return ((logits[1] - logits[0]).norm() / logits[0].norm()).item(), abs(losses[1] / losses[0] - 1), \
        F.cosine_similarity(torch.cat(grads[0]), torch.cat(grads[1]), dim=0).item(), \
        min(F.cosine_similarity(a, b, dim=0).item() for a, b in zip(*grads))


def _assert_float8_close(logits_error, loss_error, cosine, worst_cosine):
    # e4m3 keeps 3 mantissa bits: rounding an activation or a weight moves it by at most 2^-4 of its value
    # (subnormals aside), and the errors of a dot product's terms partly cancel, so the logits (the residual stream
    # through every float8 layer, then the head) stay within 2^-4 in norm (measured: 1.5% with the tied head, 3.1%
    # untied with qk-norm). They must also differ: the float8 casts ran.
    assert 1e-4 < logits_error < 2**-4
    assert loss_error < 0.01  # logits near zero at init: the loss is close to ln V either way (measured 1e-4)
    # Gradients also pass through e5m2 (2 mantissa bits, up to 2^-3 per element), layer after layer: relative
    # errors eps of 5-15% give cosines 1 - eps^2 / 2 of 0.99-0.999. Measured over 30 seeds of both shapes:
    # all gradients >= 0.997, the worst single parameter 0.988.
    assert cosine > 0.99
    assert worst_cosine > 0.98


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_float8_emulated_forward_backward_matches_the_plain_model_within_float8_precision(preset):
    for seed in (0, 1, 2):
        _assert_float8_close(*_float8_against_plain(preset, "cpu", seed))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 matmuls need a GPU of compute capability 8.9+")
def test_float8_on_the_gpu_matches_bf16_within_float8_precision():
    _assert_float8_close(*_float8_against_plain("tiny-qwen3", "cuda", seed=0, dtype=torch.bfloat16))


def test_float8_refuses_lora_and_gpus_without_float8(monkeypatch):
    with pytest.raises(ValueError, match="parallel.float8"):  # at config time, before anything runs
        parse_config(SFTConfig, ["--model.preset", "tiny", "--lora.r", "8", "--parallel.float8", "true"])
    with torch.device("meta"):
        model = apply_lora(GPT(ModelConfig.preset("tiny")), "all-linear", r=4, alpha=8)
    with pytest.raises(ValueError, match="parallel.float8"):  # and in parallelize, for callers of their own
        parallelize(model, ParallelConfig(float8=True), CPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    cuda = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"parallel.float8 needs .* 8.9 or newer.*A100 is 8.0"):
        parallelize(model, ParallelConfig(float8=True), cuda)


# ----------------------------------------------------------------------------- long context

LONG = dict(activation_checkpointing=True, mlp_chunk_tokens=8, checkpoint_dtype="bf16", offload_activations=True)


def _loss_and_grads(model, ids, targets):
    for p in model.parameters():
        p.grad = None
    loss = model(ids, targets=targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _batch(model):
    """Inputs and targets, 2 rows of 37 tokens: 74 in all, not a multiple of the chunk of 8."""
    return torch.randint(0, model.config.vocab_size, (2, 2, 37), generator=torch.Generator().manual_seed(0))


def test_long_context_options_keep_parameter_names():
    for preset in ("tiny", "tiny-qwen3"):
        with torch.device("meta"):
            plain = GPT(ModelConfig.preset(preset))
            changed = parallelize(copy.deepcopy(plain), ParallelConfig(compile=True, **LONG), CPU)
        assert list(changed.state_dict()) == list(plain.state_dict())
        assert [n for n, _ in changed.named_parameters()] == [n for n, _ in plain.named_parameters()]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_mlp_chunks_give_the_plain_models_loss_and_gradients(preset, checkpointing):
    plain = _model(preset)
    chunked = parallelize(copy.deepcopy(plain), ParallelConfig(mlp_chunk_tokens=8,
                                                               activation_checkpointing=checkpointing), CPU)
    ids, targets = _batch(plain)
    loss, grads = _loss_and_grads(plain, ids, targets)
    chunked_loss, chunked_grads = _loss_and_grads(chunked, ids, targets)
    # The same float32 sums, in chunks: equal up to the order of the weight gradients' sums over tokens (measured:
    # within 4e-7 of each gradient's largest entry, float32's rounding).
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
    assert _largest_error(chunked_grads, grads) < 2e-6


@pytest.mark.parametrize("chunks", [0, 8], ids=["blocks", "blocks-and-mlp-chunks"])
def test_checkpointed_qlora_gives_the_plain_gradients_and_dequantizes_twice_a_step(chunks, monkeypatch):
    """QLoRA under activation checkpointing (eager, on CPU): the NF4 layers save what they dequantize
    inside checkpoints (the recompute's weights serve backward), which gives the adapters exactly the
    gradients of the unchecked model, and, without MLP chunks, two dequantizations of each NF4 weight a
    step as without checkpointing (forward, recompute), not three."""
    import model.lora as lora
    from model.lora import LoRAConfig, freeze_base, lora_modules

    def qlora_model():  # built twice the same way (deepcopy would quantize NF4 again, with its defaults)
        model = apply_lora(_model("tiny"), "all-linear", r=4, alpha=8)
        for _, m in lora_modules(model):  # B away from zero, so every adapter's gradient flows through W
            torch.nn.init.normal_(m.lora_B, std=0.02, generator=torch.Generator().manual_seed(1))
        freeze_base(model, LoRAConfig(quantize="nf4", nf4_scaler_block_size=16), torch.device("cpu"))
        return model

    plain = qlora_model()
    checkpointed = parallelize(qlora_model(), ParallelConfig(activation_checkpointing=True, mlp_chunk_tokens=chunks),
                               CPU)
    ids, targets = _batch(plain)
    loss, grads = _loss_and_grads(plain, ids, targets)
    calls = [0]
    dequantize = lora.nf4_dequantize
    monkeypatch.setattr(lora, "nf4_dequantize", lambda *a: (calls.__setitem__(0, calls[0] + 1), dequantize(*a))[1])
    checkpointed_loss, checkpointed_grads = _loss_and_grads(checkpointed, ids, targets)
    assert checkpointed_loss == loss
    grads = {name: grad for name, grad in grads.items() if grad is not None}  # the adapters'
    if chunks:  # the adapters' gradients summed chunk by chunk: float32's rounding, as in the test above
        assert _largest_error(checkpointed_grads, grads) < 2e-6
    else:
        for name, grad in grads.items():
            torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=0, msg=name)
        assert calls[0] == 2 * len(list(lora_modules(plain)))


def _largest_error(got: dict, want: dict) -> float:
    """The largest gap between two sets of gradients, each relative to the largest entry of its own."""
    return max(((got[n] - g).abs().max() / g.abs().max()).item() for n, g in want.items())


def test_mlp_chunks_save_no_intermediate_of_the_whole_sequence():
    """What autograd keeps for backward: the plain MLP keeps (tokens, intermediate) tensors (gate, up, their
    product), the chunked one only its chunks' inputs, recomputing the rest chunk by chunk."""
    plain = _model("tiny")
    ids, targets = _batch(plain)
    width, tokens = plain.config.intermediate_size, ids.numel()

    def saved_shapes(model):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            model(ids, targets=targets)
        return shapes

    def sequence_wide(shapes):
        return [s for s in shapes if s[-1] == width and s[:-1].numel() == tokens]

    assert sequence_wide(saved_shapes(plain))
    chunked = parallelize(copy.deepcopy(plain), ParallelConfig(mlp_chunk_tokens=8), CPU)
    assert not sequence_wide(saved_shapes(chunked))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
def test_offloaded_activations_give_the_plain_models_loss_and_gradients_exactly(checkpointing):
    plain = _model("tiny-qwen3")
    offloaded = parallelize(copy.deepcopy(plain), ParallelConfig(offload_activations=True,
                                                                 activation_checkpointing=checkpointing), CPU)
    ids, targets = _batch(plain)
    loss, grads = _loss_and_grads(plain, ids, targets)
    seen = []  # hooks around the call: the model's own (host memory) are inside, so these must see nothing
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.shape) or t, lambda t: t):
        offloaded_loss, offloaded_grads = _loss_and_grads(offloaded, ids, targets)
    assert not seen
    torch.testing.assert_close(offloaded_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad, rtol=0, atol=0, msg=name)


def test_bf16_checkpoints_keep_the_loss_and_round_only_the_recomputed_gradients():
    """The forward runs on the float32 stream as before (the same loss, bit for bit); backward differentiates a
    recompute from the block inputs rounded to bf16 (8 significant bits): each gradient moves by about 2^-8 of its
    size (measured: at most 0.4% of the largest entry, with the other options on too), and does move."""
    plain = _model("tiny")
    ids, targets = _batch(plain)
    loss, grads = _loss_and_grads(plain, ids, targets)
    for options in (dict(activation_checkpointing=True, checkpoint_dtype="bf16"), LONG):
        rounded = parallelize(copy.deepcopy(plain), ParallelConfig(**options), CPU)
        rounded_loss, rounded_grads = _loss_and_grads(rounded, ids, targets)
        torch.testing.assert_close(rounded_loss, loss, rtol=0, atol=0)
        assert 0 < _largest_error(rounded_grads, grads) < 2**-6


def test_bf16_checkpoints_need_activation_checkpointing():
    with pytest.raises(ValueError, match="parallel.checkpoint_dtype"):  # at config time
        parse_config(SFTConfig, ["--model.preset", "tiny", "--parallel.checkpoint_dtype", "bf16"])
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="parallel.checkpoint_dtype"):  # and in parallelize
        parallelize(model, ParallelConfig(checkpoint_dtype="bf16"), CPU)


class _LargestOutput(TorchDispatchMode):
    """The most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def test_long_step_makes_nothing_quadratic_in_the_sequence_nor_vocabulary_wide(monkeypatch):
    """One training step at 1024 tokens (beyond the preset's max_seq_len of 256) with every long-context option on:
    attention gets no mask (SDPA's causal kernels keep O(T) memory), and no op returns a tensor larger than the
    (T, hidden) stream: no (T, T) scores, no (T, vocab) logits (the head's chunks, set here to 64 tokens), no
    (T, intermediate) MLP tensors."""
    import algos.logprobs

    monkeypatch.setattr(algos.logprobs, "_default_chunk", lambda vocab_size: 64)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = parallelize(_model("tiny"), ParallelConfig(**{**LONG, "mlp_chunk_tokens": 64}), CPU)
    T, C = 1024, model.config.hidden_size
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    mode = _LargestOutput()
    with mode:
        model(ids, targets=ids).backward()
    assert calls and all(mask is None and causal for mask, causal in calls)
    assert mode.numel <= T * C, (mode.numel, mode.op)
