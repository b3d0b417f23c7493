"""Tiny random transformers models, the reference our model is compared against."""

import transformers

# Odd sizes on purpose: GQA, head_dim != hidden/heads, tied and untied, llama3 rope scaling.
TINY_HF_CONFIGS = {
    "llama": dict(
        cls="LlamaConfig", vocab_size=301, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "llama_tied": dict(
        cls="LlamaConfig", vocab_size=257, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "qwen2": dict(
        cls="Qwen2Config", vocab_size=311, hidden_size=56, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "qwen3": dict(
        cls="Qwen3Config", vocab_size=293, hidden_size=40, intermediate_size=88, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "mistral": dict(
        cls="MistralConfig", vocab_size=263, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
    ),
}


def make_hf_model(name: str, seed: int = 0):
    import torch

    spec = dict(TINY_HF_CONFIGS[name])
    cfg = getattr(transformers, spec.pop("cls"))(**spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.float().eval()
    # Norm weights and biases start at 1 and 0: perturb them so the test sees if we mix them up.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(name: str, path, seed: int = 0):
    model = make_hf_model(name, seed)
    model.save_pretrained(path)
    return model
