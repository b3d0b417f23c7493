"""GPU paths: bf16 parity, torch.compile without graph breaks, FlexAttention packing, generation.
Skipped on machines without CUDA (see conftest.py)."""

import pytest
import torch

from checkpoints.hf import load_hf
from model.config import ModelConfig
from model.gpt import GPT
from model.masks import document_mask
from tests.hf_reference import make_hf_model

pytestmark = pytest.mark.gpu


def _tiny(name="tiny-qwen3"):
    model = GPT(ModelConfig.preset(name)).cuda()
    model.init_weights(seed=0)
    return model


def test_bf16_logits_close_to_transformers(tmp_path):
    ref = make_hf_model("llama")
    ref.save_pretrained(tmp_path)
    ref = ref.cuda().to(torch.bfloat16)
    ours = load_hf(tmp_path, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = ours(ids).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2


def test_compile_full_graph_forward_and_backward():
    model = _tiny()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    ids = torch.randint(0, 512, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(ids)
    out.float().logsumexp(-1).mean().backward()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(ids)
    torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_flex_attention_packing_matches_dense_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    model = _tiny()
    T = 256
    docs = torch.tensor([[0] * 100 + [1] * 60 + [2] * 96], device="cuda")
    pos = torch.cat([torch.arange(100), torch.arange(60), torch.arange(96)]).cuda()[None]
    ids = torch.randint(0, 512, (1, T), device="cuda")

    def mask_mod(b, h, q, k):
        return (docs[b, q] == docs[b, k]) & (k <= q)

    block_mask = create_block_mask(mask_mod, B=1, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
    flex = torch.compile(model)
    with torch.no_grad():
        got = flex(ids, position_ids=pos, attn_mask=block_mask)
        expected = model(ids, position_ids=pos, attn_mask=document_mask(docs))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_generation_on_gpu_equals_cpu():
    from model.generate import generate

    torch.manual_seed(0)
    cpu_model = GPT(ModelConfig.preset("tiny"))
    cpu_model.init_weights(seed=1)
    gpu_model = GPT(ModelConfig.preset("tiny")).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.reset_rope()
    prompts = [[1, 5, 9, 11], [3, 4]]
    a = generate(cpu_model.eval(), prompts, max_new_tokens=16)
    b = generate(gpu_model.eval(), prompts, max_new_tokens=16)
    assert a == b


def test_qlora_nf4_trains_on_gpu():
    from model.lora import apply_lora, mark_only_lora_trainable, quantize_base_nf4

    cfg = ModelConfig.preset("tiny", hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=4,
                             head_dim=32)
    model = GPT(cfg).cuda()
    model.init_weights(seed=0)
    apply_lora(model, "all-linear", r=8, alpha=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith((".lora_A", ".lora_B")):
                p.data = p.data.to(torch.bfloat16)
    quantize_base_nf4(model)
    mark_only_lora_trainable(model)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 65), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], targets=ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_flex_block_mask_with_sliding_window_matches_dense():
    from model.masks import document_block_mask

    model = _tiny()
    T = 256
    docs = torch.tensor([[0] * 150 + [1] * 106], device="cuda")
    pos = torch.cat([torch.arange(150), torch.arange(106)]).cuda()[None]
    ids = torch.randint(0, 512, (1, T), device="cuda")
    with torch.no_grad():
        got = model(ids, position_ids=pos, attn_mask=document_block_mask(docs, sliding_window=48))
        expected = model(ids, position_ids=pos, attn_mask=document_mask(docs, sliding_window=48))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_token_logprobs_in_bf16_match_float64():
    """The per-token path under bf16 autocast: values and the gradient of a weighting, within bf16 tolerance."""
    from algos.logprobs import linear_token_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4, 64, 128, device="cuda", generator=g, requires_grad=True)
    weight = (0.05 * torch.randn(2000, 128, device="cuda", generator=g)).requires_grad_()
    targets = torch.randint(0, 2000, (4, 64), device="cuda", generator=g)
    upstream = torch.randn(4, 64, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_token_logprobs(hidden, weight, targets, chunk_tokens=100)
    (got * upstream).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=5e-2, atol=5e-2)
