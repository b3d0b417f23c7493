"""The native decoder-only transformer: Llama 3.x, Qwen2/2.5, Qwen3 and Mistral in one module.

Module names follow Hugging Face Llama (`layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...), so the
HF key table is the identity up to the `model.` prefix and LoRA targets read like PEFT's.
RoPE uses HF's rotate-half layout, so checkpoints convert without permuting q/k rows.

`__init__` only allocates: build under `torch.device("meta")`, shard or move with `to_empty`,
then call `init_weights()` (or load a checkpoint). The model knows nothing about parallelism;
train/parallel.py applies activation checkpointing, compile and FSDP2 from outside.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads, D head dim,
C hidden size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algos.logprobs import linear_cross_entropy_sum, linear_token_logprobs
from model.config import ModelConfig
from model.masks import causal_mask, packed_mask

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor, distribute_tensor = (), None

try:  # FlexAttention block masks for packed sequences on GPU (torch >= 2.5).
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask, flex_attention = None, None
_compiled_flex_attention = None


def fused_flex_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """FlexAttention as one fused kernel: eager FlexAttention materialises every score, so outside a
    compiled block it runs through torch.compile (built on first use: compiling costs imports)."""
    global _compiled_flex_attention
    # Inside a compiled block it is traced into the block's graph; on the CPU (tests only: the loops
    # use dense masks there) eager is enough.
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention(q, k, v, **kwargs)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention(q, k, v, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and cast back before the scale, exactly as HF does, so bf16
        # runs round the same way as the reference.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> Tensor:
    """Inverse frequencies (D/2,), with Llama-3 scaling of the long wavelengths when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: llama3 (or none)")
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables (B, T, D) for integer positions (B, T), computed in float32."""
    freqs = positions[:, :, None].float() * inv_freq[None, None, :].float()  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D) rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos, sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values for every layer: (B, K, max_len, D) each.

    `pos` is how many positions are filled; a forward with T new tokens writes [pos, pos+T) and
    attends to [0, pos+T). Batched prompts of different lengths are left-padded by the caller,
    who passes a mask so padding is never attended.

    A static cache (model/generate.py's RolloutEngine) sets `pos` to a (1,) long tensor on the
    device instead: a forward then writes its columns at pos in place and attends to the whole
    buffer, the caller's mask hiding the columns not written yet. No shape depends on the position,
    so one compiled, CUDA-graph-captured decode step serves every step (the forward's `pos += T`
    advances the tensor in place, inside the graph).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.pos: int | Tensor = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = k.shape[2]
        # Under autocast RoPE leaves keys in float32; a bf16 cache stores them rounded as attention
        # would round them anyway.
        k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)
        if isinstance(self.pos, Tensor):
            # Indexing with a tensor is an index_put_ into the buffer, which the compiler keeps in
            # place (no copy of the cache); a slice at a Python int would recompile every step.
            index = self.pos + torch.arange(t, device=self.pos.device)  # (t,)
            self.k[layer][:, :, index] = k
            self.v[layer][:, :, index] = v
            return self.k[layer], self.v[layer]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {t} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) sharing this one's memory, with pos 0."""
        view = object.__new__(KVCache)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.max_len, view.pos = self.max_len, 0
        return view


class Attention(nn.Module):
    # FlexAttention kernel options for one-token calls (decode steps); the rollout engine sets them per
    # batch size on the network it decodes with. None: the kernel's own choices.
    decode_kernel_options: dict | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, k, d, c = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(c, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(c, k * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(c, k * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, c, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        if hasattr(self, "qkv_proj"):  # fused by GPT.fuse_projections: one matmul for q, k and v
            q, k, v = self.qkv_proj(x).split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                                              cfg.num_kv_heads * cfg.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)  # (B, T, H, D)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)  # (B, T, K, D)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        gqa = cfg.num_kv_heads != cfg.num_heads
        if BlockMask is not None and isinstance(mask, BlockMask):
            # One dtype for all three: under autocast RoPE leaves q and k in float32 (SDPA casts them
            # itself; FlexAttention's kernel refuses mixed dtypes).
            y = fused_flex_attention(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, enable_gqa=gqa,
                                     kernel_options=self.decode_kernel_options if T == 1 else None)
        elif isinstance(mask, Tensor) and T == 1 and gqa and mask.shape[1] == 1:
            # One query per row (a decode step): the H/K query heads that share a key/value head
            # become H/K queries of that head, so SDPA needs no GQA and keeps a fused kernel. With a
            # mask, enable_gqa falls back to the math path, which copies K and V (the whole cache,
            # every layer, every step) out to H heads.
            G = cfg.num_heads // cfg.num_kv_heads
            y = F.scaled_dot_product_attention(q.reshape(B, cfg.num_kv_heads, G, cfg.head_dim), k, v,
                                               attn_mask=mask)  # (B, K, G, D)
            y = y.reshape(B, cfg.num_heads, 1, cfg.head_dim)  # (B, H, T=1, D)
        elif isinstance(mask, Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            # No mask: plain causal over a fresh sequence, or one decoded token seeing the cache.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):  # fused by GPT.fuse_projections
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask=None, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models have no lm_head module: the output uses embed_tokens.weight directly, so the
        # state dict holds one tensor, as the HF safetensors file does.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Every tensor's initial value, in one place. Residual output projections (o_proj,
        down_proj) are scaled by 1/sqrt(2 * layers), as in GPT-2, so the residual stream's variance
        does not grow with depth. Each tensor draws from its own generator seeded by (seed, index),
        so the weights are the same whether the model is whole or sharded over any number of ranks."""
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for i, (name, p) in enumerate(self.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                _normal_(p, out_std, seed * 100_003 + i)
            else:  # embeddings, q/k/v, gate/up, lm_head
                _normal_(p, std, seed * 100_003 + i)
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Recompute the RoPE buffer (it is not in checkpoints, and is empty after meta init)."""
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            device = self.rope_inv_freq.device
        self.rope_inv_freq = rope_inv_freq(self.config, device=device)

    # What fuse_projections makes of each module's layers, in the order their outputs are concatenated.
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    @torch.no_grad()
    def fuse_projections(self) -> "GPT":
        """For inference: q/k/v of every attention and gate/up of every MLP become one linear layer
        each (weights concatenated by rows), so a decode step runs one larger matmul where it ran
        two or three small ones. Parameter names change (qkv_proj, gate_up_proj): a fused model no
        longer loads checkpoints; model/generate.py's rollout snapshot fuses its own copy."""
        for module in list(self.modules()):
            for fused, parts in self.FUSED.items():
                if not all(isinstance(getattr(module, p, None), nn.Linear) for p in parts):
                    continue
                layers = [getattr(module, p) for p in parts]
                weight = torch.cat([m.weight for m in layers])
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layers[0].bias is not None,
                                   device="meta")
                linear.weight = nn.Parameter(weight, requires_grad=False)
                if layers[0].bias is not None:
                    linear.bias = nn.Parameter(torch.cat([m.bias for m in layers]), requires_grad=False)
                setattr(module, fused, linear)
                for p in parts:
                    delattr(module, p)
        return self

    def output_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        shared_prefix: bool = False,
        attn_mask=None,
        cache: KVCache | None = None,
        targets: Tensor | None = None,
        logprobs: bool = False,
        logits_to_keep: int = 0,
        temperature: float = 1.0,
    ) -> Tensor:
        """input_ids (B, T) -> one of, by what is asked:
            logits (B, T, V), or of the last `logits_to_keep` positions only (B, logits_to_keep, V);
            targets (B, T) given (IGNORE_INDEX -100 = not scored): the summed next-token
                cross-entropy, a scalar (pretraining, SFT: a plain sum has a cheaper backward);
            targets and logprobs=True: log p(target) of every position (B, T) float32, 0.0 where
                not scored (DPO, GRPO: any weighting of them has a correct gradient), under
                softmax(logits / temperature): the distribution a sampler at that temperature drew from.
        With targets the output projection runs chunk by chunk (algos/logprobs.py), so the (B, T, V)
        logits never exist at once.

        position_ids (B, T): defaults to 0..T-1 after what the cache holds. document_ids (B, T):
        packed rows, several documents per row (positions restart in each); attention stays within
        a document. shared_prefix: document 0 of each row is a prompt every later document of the row
        continues (its responses): they all see it, and not each other. attn_mask: an explicit bool
        mask broadcastable to (B, H, T, S) (True = attend), as generation's left padding needs. With
        neither, attention is causal. The sliding window, when the model has one, applies in every case.
        """
        B, T = input_ids.shape
        window = self.config.sliding_window
        if position_ids is None:
            start = cache.pos if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if document_ids is not None:
            attn_mask = packed_mask(document_ids, window, shared_prefix)
        elif attn_mask is None and window is not None:
            S = T + (cache.pos if cache is not None else 0)
            if S > window:
                attn_mask = causal_mask(torch.ones(B, S, dtype=torch.bool, device=input_ids.device), T, window)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is not None:
            if not logprobs:
                return linear_cross_entropy_sum(x, self.output_weight(), targets)
            if temperature != 1.0:
                x = x / temperature  # (h / t) W^T = logits / t
            return linear_token_logprobs(x, self.output_weight(), targets)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return F.linear(x, self.output_weight())  # (B, T, V)


def _normal_(p: Tensor, std: float, seed: int) -> None:
    """Truncated normal init. A sharded (DTensor) parameter draws the full tensor on its device
    and keeps its own shard, so every world size gets identical weights."""
    full = p.full_tensor() if isinstance(p, DTensor) else p
    device = full.device
    gen = torch.Generator(device=device).manual_seed(seed)
    values = torch.empty(full.shape, dtype=torch.float32, device=device)
    nn.init.trunc_normal_(values, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)
    if isinstance(p, DTensor):
        values = distribute_tensor(values, p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(values.to(p.dtype))
