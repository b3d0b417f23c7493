"""LoRA and QLoRA against PEFT: adapters cross-load both ways with equal logits; merge, disable,
freezing, NF4 error bounds, QLoRA overfitting a batch, meta-device construction."""

import contextlib
import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

import model.lora as lora
from checkpoints.hf import load_hf, save_hf
from checkpoints.peft import load_peft_adapter, save_peft_adapter
from model.config import ModelConfig
from model.gpt import GPT, rope_cos_sin
from model.lora import (
    LoRAConfig, LoRALinear, _nf4_parts, apply_lora, disable_lora, freeze_base, init_lora_weights, is_nf4,
    keep_dequantized_weights, lora_modules, lora_state_dict, merge_lora, nf4_dequantize, quantize_base_nf4, torchao_nf4,
)
from tests.hf_reference import make_hf_model


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# Logits of two paths that sum in different orders (ours vs PEFT on transformers' eager attention; merged
# W + sBA vs the unmerged x W + s (x A) B) differ by float32 noise: max|diff| / max|logit| is at most 2.5e-6
# here (1 and 2 threads). A real fault (a mixed-up key, a transpose, a wrong scaling) moves them by more than
# 1e-2 (test_merge_disable_and_export checks that the adapters' effect is that large). 1e-4 sits 40x above
# the noise and 100x below a fault.
CROSS_PATH = 1e-4


def _ids(vocab, shape=(2, 23), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize_adapters(params, seed=0):
    """Non-zero A and B, so a mixed-up key, transpose or scaling shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _our_base(name, path):
    make_hf_model(name).save_pretrained(path)
    return load_hf(path, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- PEFT -> ours


@pytest.mark.parametrize("name,targets,rslora", [
    ("llama", ["q_proj", "v_proj"], False),
    ("qwen3", "all-linear", False),
    ("qwen2", "all-linear", True),  # q/k/v biases stay on the frozen base
])
def test_peft_adapter_loads_into_ours(name, targets, rslora, tmp_path):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path / "base")
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora))
    _randomize_adapters([p for n, p in ref.named_parameters() if "lora_" in n])
    ref.save_pretrained(tmp_path / "adapter")

    ours = load_hf(tmp_path / "base", dtype=torch.float32).eval()
    load_peft_adapter(ours, tmp_path / "adapter")
    wrapped = dict(lora_modules(ours))
    expected = 7 * hf.config.num_hidden_layers if targets == "all-linear" else 2 * hf.config.num_hidden_layers
    assert len(wrapped) == expected
    assert all(m.scaling == (8 / 2 if rslora else 8 / 4) for m in wrapped.values())
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        assert _rel_err(ours(ids), ref(ids).logits) < CROSS_PATH


# ----------------------------------------------------------------------------- ours -> PEFT


@pytest.mark.parametrize("name,targets", [
    ("llama", "all-linear"),
    ("qwen3", ["layers.0.self_attn.q_proj", "v_proj", "down_proj"]),  # one layer-specific target
])
def test_our_adapter_loads_in_peft(name, targets, tmp_path):
    ours = _our_base(name, tmp_path / "base")
    apply_lora(ours, targets, r=4, alpha=8)
    _randomize_adapters(lora_state_dict(ours).values(), seed=2)  # views of the parameters
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    # load_adapter returns PEFT's own key check (from_pretrained only warns).
    result = ref.load_adapter(tmp_path / "adapter", adapter_name="check")
    assert not result.missing_keys and not result.unexpected_keys
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert _rel_err(ours(ids), ref(ids).logits) < CROSS_PATH


# ----------------------------------------------------------------------------- merge / disable


def test_merge_disable_and_export(tmp_path):
    ours = _our_base("qwen3", tmp_path / "base")
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        base_logits = ours(ids)
        apply_lora(ours, "all-linear", r=4, alpha=8)
        _randomize_adapters(lora_state_dict(ours).values())
        adapted = ours(ids)
        assert _rel_err(adapted, base_logits) > 1e-2  # the adapters do something
        with disable_lora(ours):
            assert torch.equal(ours(ids), base_logits)  # the same matmuls as the plain model
        assert torch.equal(ours(ids), adapted)  # re-enabled on exit

        for _, m in lora_modules(ours):
            m.merge()
        assert _rel_err(ours(ids), adapted) < CROSS_PATH
        with pytest.raises(ValueError, match="merged"):
            with disable_lora(ours):
                pass
        for _, m in lora_modules(ours):
            m.unmerge()
        assert _rel_err(ours(ids), adapted) < CROSS_PATH

        merge_lora(ours)
        assert not list(lora_modules(ours))
        assert all(type(ours.get_submodule(f"layers.0.mlp.{p}")) is nn.Linear for p in ("gate_proj", "down_proj"))
        assert _rel_err(ours(ids), adapted) < CROSS_PATH
    save_hf(ours, tmp_path / "merged")
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert _rel_err(ref.eval()(ids).logits, adapted) < CROSS_PATH


# ----------------------------------------------------------------------------- training


def _tiny(dtype=torch.float32):
    model = GPT(ModelConfig.preset("tiny"))
    model.init_weights(seed=0)
    return model.to(dtype)


def _lm_loss(model, ids):
    logits = model(ids[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_only_adapters_train():
    model = _tiny()
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(model.config.vocab_size, (2, 17))
    model.train()
    for _ in range(3):
        _lm_loss(model, ids).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if k in trainable:
            assert not torch.equal(v, before[k]), f"adapter {k} did not move"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"


# ----------------------------------------------------------------------------- NF4 / QLoRA

# The 16 NormalFloat-4 levels from the QLoRA paper (Dettmers et al. 2023, appendix E / bitsandbytes).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def test_nf4_error_within_bound():
    block, scaler_block = 64, 16
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.02
    w[3, 5] = 0.5  # an outlier: its block's absmax (and error) is larger than the others'
    linear = nn.Linear(128, 96, bias=False)
    linear.weight.data.copy_(w)
    holder = nn.Module()
    holder.q_proj = linear
    apply_lora(holder, ["q_proj"], r=2, alpha=4)
    quantize_base_nf4(holder, block_size=block, scaler_block_size=scaler_block)
    q = holder.q_proj.weight
    assert is_nf4(q) and q.dtype == torch.bfloat16 and not q.requires_grad

    original = w.to(torch.bfloat16).float().view(-1, block)  # what was quantized
    err = (q.get_original_weight().float().view(-1, block) - original).abs().amax(dim=1)  # (blocks,)
    absmax = original.abs().amax(dim=1)
    # Rounding to the nearest level errs by at most half the widest gap between levels, times the
    # block's scale. The scale itself is stored as int8 around the mean scale (double quantization),
    # off by at most half a step: (max |scale - mean| over its group of scales) / 256. A little slack
    # for bf16 arithmetic.
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    dev = (absmax - absmax.mean()).view(-1, scaler_block).abs().amax(dim=1).repeat_interleave(scaler_block)
    bound = absmax * half_gap + dev / 256 + absmax * 2**-7
    assert (err <= bound).all(), (err / bound).max()
    rel = (q.get_original_weight().float() - w).norm() / w.norm()
    assert rel < 0.15, rel


def _overfit(model, ids, steps=20):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = _lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_trains_on_cpu_bf16(tmp_path):
    ids = _ids(512, (2, 33))
    lora = apply_lora(_tiny(torch.bfloat16), "all-linear", r=8, alpha=16)
    lora_losses = _overfit(lora, ids)

    model = apply_lora(_tiny(torch.bfloat16), "all-linear", r=8, alpha=16)
    # Block sizes that divide the tiny shapes (k/v weights are 32 x 64: 32 blocks of 64).
    quantize_base_nf4(model, block_size=64, scaler_block_size=16)
    assert all(is_nf4(m.weight) for _, m in lora_modules(model))
    losses = _overfit(model, ids)
    assert losses[-1] < losses[0] - 0.5, losses
    # 4-bit base weights barely change the curve of the same run on bf16 base weights.
    assert abs(losses[-1] - lora_losses[-1]) < 0.1, (losses, lora_losses)
    assert all(is_nf4(m.weight) and m.weight.grad is None for _, m in lora_modules(model))

    save_peft_adapter(model, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * len(list(lora_modules(model)))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    # Merging dequantizes: plain bf16 linears whose output matches the QLoRA model's.
    with torch.no_grad():
        qlora_logits = model(ids).float()
        merge_lora(model)
        assert not any(is_nf4(p) for p in model.parameters())
        assert _rel_err(model(ids).float(), qlora_logits) < 0.05  # bf16 rounding of W + BA


# ----------------------------------------------------------------------------- the NF4 matmul


def _nf4_layer(out_features=96, in_features=128, seed=0):
    """A LoRALinear over an NF4 base as freeze_base leaves it: bf16 NF4 weight, float32 adapters
    (random, so both adapters get a gradient that depends on the base's output)."""
    holder = nn.Module()
    holder.q_proj = nn.Linear(in_features, out_features, bias=False)
    g = torch.Generator().manual_seed(seed)
    holder.q_proj.weight.data.copy_(torch.randn(out_features, in_features, generator=g) * 0.02)
    apply_lora(holder, ["q_proj"], r=4, alpha=8)
    quantize_base_nf4(holder, block_size=64, scaler_block_size=16)
    _randomize_adapters([holder.q_proj.lora_A, holder.q_proj.lora_B], seed=seed)
    return holder.q_proj


def _count_dequantizations(monkeypatch) -> list[int]:
    """Counts calls of lora.nf4_dequantize from now on (the NF4 op looks it up at each call)."""
    calls = [0]
    dequantize = lora.nf4_dequantize

    def counted(*args):
        calls[0] += 1
        return dequantize(*args)

    monkeypatch.setattr(lora, "nf4_dequantize", counted)
    return calls


def test_nf4_dequantize_is_torchaos_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for shape, block, scaler_block in [((96, 128), 64, 16), ((176, 64), 64, 16), ((64, 176), 32, 8)]:
        w = torch.randn(shape, generator=g) * 0.02
        w[1, 2] = 0.7  # an outlier: one block's scale far from the mean
        q = torchao_nf4().to_nf4(w.to(torch.bfloat16), block, scaler_block)
        ours = nf4_dequantize(*_nf4_parts(q))
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, q.get_original_weight())


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-under-bf16-autocast"])
def test_nf4_layer_equals_torchaos_linear_nf4(dtype, autocast, monkeypatch):
    """The same layer through torchao's linear_nf4: the same ops on the same values, so the output and
    the gradients of x and of both adapters are equal, not just close."""
    layer = _nf4_layer()
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(2))

    def run():
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.backward(grad_out.to(out.dtype))
        return out, x.grad, layer.lora_A.grad, layer.lora_B.grad

    ours = run()
    monkeypatch.setattr(lora, "nf4_linear", torchao_nf4().linear_nf4)
    for a, b in zip(ours, run()):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_nf4_layer_keeps_no_dequantized_weight_for_backward(monkeypatch):
    """Backward keeps the NF4 tensor's 4-bit data and scales, nothing of the weight's size: the weight
    is dequantized in forward, again in backward, and once more where checkpointing recomputes the forward,
    unless the checkpointed layer keeps what it dequantizes (keep_dequantized_weights)."""
    layer = _nf4_layer()
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def weight_sized_saved(module):
        """Shapes of the float tensors module's forward saves for backward with W's shape or W^T's."""
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = module(x)
        return out, [tuple(t.shape) for t in saved if t.is_floating_point() and sorted(t.shape) == [96, 128]]

    plain = LoRALinear(nn.Parameter(layer.weight.get_original_weight().float(), requires_grad=False), None, r=4,
                       alpha=8)
    assert weight_sized_saved(plain)[1] == [(128, 96)]  # a plain base: its matmul keeps W^T (the check sees it)
    calls = _count_dequantizations(monkeypatch)
    out, kept = weight_sized_saved(layer)
    assert kept == [] and calls[0] == 1
    out.sum().backward()
    assert calls[0] == 2
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert calls[0] == 2 + 3
    # Checkpointed with NF4 layers saving what they dequantize (train/parallel.py's checkpoints do this):
    # the first run's saved weight is dropped, the recompute's serves backward: twice a step again, and
    # the same gradient.
    grad = x.grad.clone()
    x.grad = None
    keeping = lambda: (keep_dequantized_weights(), keep_dequantized_weights())  # noqa: E731
    checkpoint(layer, x, use_reentrant=False, context_fn=keeping).sum().backward()
    assert calls[0] == 2 + 3 + 2
    assert torch.equal(x.grad, grad / 2)  # grad accumulated the two checkpointed backwards above


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside inductor, torch 2.13
def test_compiled_qlora_block_is_one_graph(monkeypatch):
    """A QLoRA block (bf16 NF4 base, float32 adapters, bf16 autocast, as on the GPU) compiled by
    inductor with fullgraph=True: one graph, no recompilation on later steps with other inputs, and,
    as the partitioner decides what a compiled graph keeps, nothing of a weight's size saved for
    backward. Each NF4 layer dequantizes twice a step; under plain activation checkpointing three times,
    and twice again when checkpointed as train/parallel.py does (the recompute's weights serve backward)."""
    model = _tiny()
    apply_lora(model, "all-linear", r=4, alpha=8)
    freeze_base(model, LoRAConfig(quantize="nf4", nf4_scaler_block_size=16), torch.device("cpu"))
    block = model.layers[1]
    n_nf4 = len(list(lora_modules(block)))
    weights = {tuple(m.weight.shape) for _, m in lora_modules(block)}
    B, T, C = 3, 7, model.config.hidden_size
    cos, sin = rope_cos_sin(model.rope_inv_freq, torch.arange(T).expand(B, T), torch.bfloat16)
    g = torch.Generator().manual_seed(0)

    def step(forward):
        """Forward and backward on new random inputs; returns the output, x, and the shapes of what
        the forward saved for backward that have a weight's shape (or its transpose)."""
        x = torch.randn(B, T, C, generator=g).to(torch.bfloat16).requires_grad_()
        saved = []
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = forward(x, cos, sin)
        out.float().square().sum().backward()
        return out, x, [tuple(t.shape) for t in saved if t.is_floating_point() and t.dim() == 2
                        and (tuple(t.shape) in weights or tuple(t.shape[::-1]) in weights)]

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: a graph break is an error
    try:
        try:
            out, x, kept = step(compiled)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if "CppCompileError" in str(e) or "InvalidCxxCompiler" in str(e):
                pytest.skip(f"inductor cannot build CPU kernels here: {str(e).splitlines()[0][:200]}")
            raise
        assert kept == []
        g.manual_seed(0)  # the same x, eager: inductor rounds bf16 intermediates differently (2e-3 here)
        out_eager, x_eager, _ = step(block)
        assert _rel_err(out.float(), out_eager.float()) < 2e-2
        assert _rel_err(x.grad.float(), x_eager.grad.float()) < 2e-2

        calls = _count_dequantizations(monkeypatch)
        with torch.compiler.set_stance("fail_on_recompile"):
            assert step(compiled)[2] == []
            assert calls[0] == 2 * n_nf4  # forward, and x's gradient in backward
            step(lambda *args: checkpoint(compiled, *args, use_reentrant=False))
            assert calls[0] == 2 * n_nf4 + 3 * n_nf4  # and the forward that checkpointing recomputes
        counters = torch._dynamo.utils.counters
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
        # Checkpointed as train/parallel.py does, the NF4 layers saving what they dequantize (the
        # recompute's serves backward): a second graph, compiled once; then twice a step, as without
        # checkpointing.
        contexts = lambda: (keep_dequantized_weights(), keep_dequantized_weights())  # noqa: E731
        keeping = lambda *args: checkpoint(compiled, *args, use_reentrant=False, context_fn=contexts)  # noqa: E731
        step(keeping)
        calls[0] = 0
        with torch.compiler.set_stance("fail_on_recompile"):
            step(keeping)
            assert calls[0] == 2 * n_nf4
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- meta device


def test_meta_device_build():
    cfg = ModelConfig.preset("tiny")
    with torch.device("meta"):
        model = GPT(cfg)
    apply_lora(model, "all-linear", r=4, alpha=8)
    assert all(m.lora_A.is_meta and m.lora_B.is_meta for _, m in lora_modules(model))
    model.to_empty(device="cpu")
    model.init_weights(seed=0)  # would also draw the adapters as ordinary weights...
    init_lora_weights(model, seed=0)  # ...so they are initialised after it
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))

    eager = _tiny()
    apply_lora(eager, "all-linear", r=4, alpha=8, seed=0)
    for k, v in lora_state_dict(eager).items():
        assert torch.equal(v, lora_state_dict(model)[k]), k  # same per-parameter seeds
    for _, m in lora_modules(model):
        assert not m.lora_B.any()
        assert m.lora_A.abs().max() <= 1 / m.in_features**0.5 and m.lora_A.std() > 0
    ids = _ids(cfg.vocab_size)
    with torch.no_grad(), disable_lora(model):
        base = model(ids)
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B = 0: LoRA starts as the base model


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_problem(tmp_path):
    model = _tiny()
    with pytest.raises(ValueError, match="lm_head.*valid targets: q_proj, k_proj"):
        apply_lora(model, ["q_proj", "lm_head"], r=4, alpha=8)
    apply_lora(model, ["q_proj"], r=4, alpha=8)
    assert isinstance(model.layers[1].self_attn.q_proj, LoRALinear)
    save_peft_adapter(model, tmp_path / "a")

    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(_tiny(), tmp_path / "a")
    config_path.write_text(json.dumps(config | {"target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(ValueError, match=r"missing tensors: .*layers\.0\.self_attn\.k_proj\.lora_A\.weight"):
        load_peft_adapter(_tiny(), tmp_path / "a")
    config_path.write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(ValueError, match="shape"):
        load_peft_adapter(_tiny(), tmp_path / "a")
