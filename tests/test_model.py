"""Native model vs transformers: logits, HF round trip, KV cache, packing, meta-device build."""

import dataclasses
import json

import pytest
import torch
import transformers

from checkpoints.hf import load_hf, save_hf
from model.config import PRESETS, ModelConfig
from model.gpt import GPT, KVCache
from model.masks import causal_mask
from tests.hf_reference import TINY_HF_CONFIGS, make_hf_model

FAMILIES = list(TINY_HF_CONFIGS)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, tmp_path):
    ref = make_hf_model(name)
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert _rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_bit_exact(name, tmp_path):
    ref = make_hf_model(name, seed=3)
    ref.save_pretrained(tmp_path / "src")
    ours = load_hf(tmp_path / "src")
    save_hf(ours, tmp_path / "out", max_shard_bytes=20_000)  # force several shards + an index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    src_state = ref.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, src_state[key]), key
    ids = torch.randint(0, ref.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, ref(ids).logits)


def test_attention_mask_padding_matches_transformers(tmp_path):
    """Left-padded batch with an attention mask: the rows' real positions match HF."""
    ref = make_hf_model("qwen3")
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=valid.long(), position_ids=pos).logits
        got = ours(ids, position_ids=pos, attn_mask=causal_mask(valid, 12))
    assert _rel_err(got[valid], expected[valid]) < 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_kv_cache_decoding_equals_full_forward(name, tmp_path):
    make_hf_model(name).save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    cache = KVCache(model.config, batch_size=2, max_len=32)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :8], cache=cache)]
        for t in range(8, 20):
            steps.append(model(ids[:, t : t + 1], cache=cache))
    assert _rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_packed_rows_equal_separate_sequences():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny-qwen3"))
    model.init_weights(seed=0)
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 11))
    packed = torch.cat([a, b], dim=1)
    docs = torch.tensor([[0] * 7 + [1] * 11])
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=pos, document_ids=docs)
        expected = torch.cat([model(a), model(b)], dim=1)
    assert _rel_err(got, expected) < 1e-5


def test_shared_prefix_rows_equal_the_prompt_run_with_each_response():
    """[prompt, response 1, response 2] with shared_prefix: each response's outputs equal those of
    prompt + that response run alone; the prompt's equal the prompt's alone."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny-qwen3"))
    model.init_weights(seed=0)
    p, r1, r2 = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 8))
    row = torch.cat([p, r1, r2], dim=1)
    docs = torch.tensor([[0] * 9 + [1] * 5 + [2] * 8])
    pos = torch.cat([torch.arange(9), torch.arange(9, 14), torch.arange(9, 17)])[None]
    with torch.no_grad():
        got = model(row, position_ids=pos, document_ids=docs, shared_prefix=True)
        one, two = model(torch.cat([p, r1], 1)), model(torch.cat([p, r2], 1))
    assert _rel_err(got[:, :9], one[:, :9]) < 1e-5
    assert _rel_err(got[:, 9:14], one[:, 9:]) < 1e-5
    assert _rel_err(got[:, 14:], two[:, 9:]) < 1e-5


def test_meta_device_build_and_init_is_deterministic():
    cfg = ModelConfig.preset("llama-3.1-8b")
    with torch.device("meta"):
        big = GPT(cfg)  # 8B parameters, no memory
    assert sum(p.numel() for p in big.parameters()) == cfg.num_params()
    small = ModelConfig.preset("tiny")
    with torch.device("meta"):
        m1 = GPT(small)
    m1.to_empty(device="cpu")
    m1.init_weights(seed=5)
    m2 = GPT(small)
    m2.init_weights(seed=5)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n
    assert all(torch.isfinite(p).all() for p in m1.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent(name):
    cfg = PRESETS[name]
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert cfg.head_dim % 2 == 0


def test_num_params_matches_hf_for_real_shape():
    """Our parameter count formula vs a transformers model built from the same shape (on meta)."""
    from checkpoints.hf import config_to_hf

    for name in ["qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "smollm2-135m"]:
        cfg = PRESETS[name]
        hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(cfg, torch.bfloat16))
        with torch.device("meta"):
            ref = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        n_ref = sum(p.numel() for p in ref.parameters())
        assert cfg.num_params() == n_ref, name


def test_packed_rows_apply_the_sliding_window():
    """A packed Mistral-style row longer than the window: each document attends only within its
    window, as it would alone (the unpacked path builds the windowed causal mask itself)."""
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), sliding_window=4)
    model = GPT(cfg)
    model.init_weights(seed=0)
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 6))
    docs = torch.tensor([[0] * 9 + [1] * 6])
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        got = model(torch.cat([a, b], dim=1), position_ids=pos, document_ids=docs)
        expected = torch.cat([model(a), model(b)], dim=1)
        no_window = dataclasses.replace(cfg, sliding_window=None)
        unwindowed = GPT(no_window)
        unwindowed.load_state_dict(model.state_dict())
        unwindowed.reset_rope()
        differs = unwindowed(a)
    assert _rel_err(got, expected) < 1e-5
    assert _rel_err(differs, expected[:, :9]) > 1e-3  # the window really changes the result


@pytest.mark.parametrize("shared_prefix,window", [(True, None), (False, 100)])
def test_compiled_document_block_mask_lists_the_blocks_of_the_dense_mask(shared_prefix, window):
    """The compiled BlockMask builder (the CUDA default), on rows of two lengths (the second compiles
    with a symbolic length): each 128 x 128 block is listed exactly when the dense mask allows some
    pair in it, and the kernel's full-block lists equal eager create_block_mask's."""
    from model.masks import document_block_mask, document_mask

    for docs in ([0] * 150 + [1] * 200 + [2] * 90 + [-1] * 60, [0] * 300 + [1] * 400 + [2] * 100 + [-1] * 20):
        T = len(docs)
        doc_ids = torch.tensor([docs, [0] * 200 + [1] * (T - 210) + [-1] * 10])  # two rows, other boundaries
        got = document_block_mask(doc_ids, window, shared_prefix, compiled=True)
        eager = document_block_mask(doc_ids, window, shared_prefix, compiled=False)
        dense = document_mask(doc_ids, window, shared_prefix)[:, 0]  # (B, T, T)
        n = -(-T // 128)
        padded = torch.nn.functional.pad(dense, (0, n * 128 - T, 0, n * 128 - T))
        any_in_block = padded.reshape(2, n, 128, n, 128).any(dim=(2, 4))  # (B, q blocks, kv blocks)
        assert torch.equal(got.to_dense()[:, 0].bool(), any_in_block)
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(got, name), getattr(eager, name)), name
