"""ModelConfig: the shape of one decoder-only transformer, plus named presets of real models.

Every preset's numbers are copied from the model's published config.json, so `ModelConfig.preset
("llama-3.2-1b")` builds the same network as the Hub checkpoint (random weights until loaded).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder (Llama 3.x, Qwen2/2.5, Qwen3, Mistral)."""

    model_type: str = "llama"
    """Hugging Face family name written to config.json: llama, qwen2, qwen3 or mistral."""
    vocab_size: int = 32000
    """Rows of the embedding matrix (may exceed the tokenizer's ids: padding rows)."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Width of the SwiGLU MLP."""
    num_layers: int = 32
    """Number of transformer blocks."""
    num_heads: int = 32
    """Query heads."""
    num_kv_heads: int = 32
    """Key/value heads (fewer than num_heads: grouped-query attention)."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    max_seq_len: int = 4096
    """Longest sequence the model was trained for (max_position_embeddings)."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """Llama-3 rope scaling: {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}; None for plain RoPE."""
    tie_embeddings: bool = False
    """Output projection shares the embedding matrix."""
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    sliding_window: int | None = None
    """Attend only to the last N positions (Mistral v0.1); None for full causal attention."""
    bos_token_id: int | None = None
    """Written to config.json; the tokenizer is the authority."""
    eos_token_id: int | list[int] | None = None
    """Written to config.json; the tokenizer is the authority."""
    extra_hf: dict = field(default_factory=dict)
    """Fields of the source config.json that do not change the math (kept for a faithful export)."""

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_params(self, include_embeddings: bool = True) -> int:
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        mlp = 3 * d * self.intermediate_size
        blocks = self.num_layers * (attn + mlp + 2 * d)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return blocks + d + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus attention scores
        (12 * layers * heads * head_dim * seq_len, halved for the causal mask as in PaLM's MFU)."""
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.hidden_size
        attn = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2
        return 6 * n + attn


def _llama3_scaling(factor: float) -> dict:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


# Numbers from each model's config.json on the Hugging Face Hub.
PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, max_seq_len=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0),
        tie_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
    "llama-3.2-3b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, max_seq_len=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0),
        tie_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
    "llama-3.1-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_seq_len=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0),
        tie_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, max_seq_len=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, max_seq_len=131072, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_embeddings=False, attention_bias=True,
        bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen3-0.6b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, max_seq_len=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True, qk_norm=True,
        bos_token_id=151643, eos_token_id=151645,
    ),
    "qwen3-8b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, max_seq_len=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=False, qk_norm=True,
        bos_token_id=151643, eos_token_id=151645,
    ),
    "mistral-7b": ModelConfig(  # Mistral-7B-v0.3
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_seq_len=32768,
        rms_norm_eps=1e-5, rope_theta=1000000.0, tie_embeddings=False, sliding_window=None,
        bos_token_id=1, eos_token_id=2,
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, max_seq_len=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_embeddings=True, bos_token_id=0, eos_token_id=0,
    ),
    # Tiny shapes for tests and the CPU quick start (a few million parameters at most).
    "tiny": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=176,
        num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256, tie_embeddings=True,
    ),
    "tiny-qwen3": ModelConfig(
        model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=176,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_seq_len=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
    ),
    "shakespeare-small": ModelConfig(
        model_type="llama", vocab_size=2048, hidden_size=192, intermediate_size=512,
        num_layers=4, num_heads=6, num_kv_heads=2, max_seq_len=256, tie_embeddings=True,
    ),
}
