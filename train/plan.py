"""Will it fit? The peak GPU memory of a training run, component by component, and the step time of
FSDP2 / HSDP training, predicted from the config a loop reads, before any GPU is rented.

    python -m train.plan --config configs/pretrain/llama-3.2-1b.yaml
    python -m train.plan --config configs/lora/llama-3.2-1b-qlora-alpaca.yaml --gpu_memory_gib 24
    python -m train.plan --config configs/dpo/tiny.yaml --micro_batch 16 --world_size 8
    python -m train.plan --config configs/pretrain/llama-3.2-1b.yaml --model.preset llama-3.1-8b \
        --global_batch_tokens 4194304 --world_size 8 64 512       # step time on 1, 8 and 64 nodes

It parses the loop's own config class (the loop is the config's folder, or --loop; configs/lora/ is
the SFT config with train/lora.py's defaults), so any dotted flag the loop takes works here too, and
reads the model's shape from the preset or the checkpoint's config.json, never its weights. It
prints, per GPU: parameters, gradients, AdamW state, the compute-dtype weight copies (autocast) or
FSDP2's gathered blocks, the activations autograd saves (with and without activation
checkpointing), the output projection + loss chunk, the reference model (DPO, GRPO), the rollout
KV cache and snapshot (GRPO), the peak, and the largest micro-batch that fits. With several GPUs it also
predicts the step time from FLOPs and the bytes FSDP2 moves.

How memory is counted (bytes per GPU, from the real tensor shapes):
- parameters, gradients, optimizer state: the network built on the meta device (LoRA swapped in,
  NF4 sizes from torchao's layout), each tensor split over the shard group as FSDP2 splits it;
- activations: what autograd saves, op by op, in the small functions below (one per op group, the
  docstring says what each term is), for eager blocks and for blocks compiled by torch.compile, with
  the long-context options of train/parallel.py (chunked MLP, bf16 checkpoints, offload to host);
- the peak: the largest of the phases a step goes through (the end of the forward, inside the loss
  chunk; the backward; the reference pass; the optimizer step), each the sum of what is alive then.
tests/test_plan.py checks each term against bytes measured on CPU; bench/RESULTS.md compares the
peaks with `torch.cuda.max_memory_allocated` of the bench/ runs.

Left out: the CUDA context and allocator fragmentation (so a run fits when its peak stays under
`--headroom` of the card), NCCL's buffers, compile's workspaces, tensor/context/pipeline
parallelism, packed rows shorter than the longest (the plan assumes every row is full length),
attention kernels' backward workspaces (flash's float32 dq accumulator: 4 bytes x heads x head_dim
per token, for one block at a time). Offloaded activations are a prediction nothing measures on CPU
(there host and device memory are one): the GPU side drops them, the host side is a lower bound
without checkpointing (save_on_cpu copies a tensor each time an op saves it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from model.config import PRESETS, ModelConfig
from model.lora import LORA_TARGETS, LoRAConfig

GiB = 2**30

# ---------------------------------------------------------------------------------------------
# One run as one GPU sees it
# ---------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """What the memory model needs to know about one run, on one GPU."""

    model: ModelConfig
    rows: int
    """Sequences per forward/backward on this GPU (DPO: 2 x micro_batch, chosen and rejected: as many
    tokens at worst as micro_batch shared-prompt rows of twice the length)."""
    seq_len: int
    """Tokens per sequence (the config's longest: padded or packed rows are full at worst)."""
    compute: Literal["bf16", "fp32"] = "bf16"
    """Matmul dtype."""
    shard: int = 1
    """FSDP2 shard group (1: one process, bf16 through autocast over fp32 weights)."""
    lora: LoRAConfig | None = None
    """Adapters and how the frozen base is stored; None trains every parameter."""
    checkpointing: bool = False
    """Activation checkpointing per block."""
    compile: bool = False
    """torch.compile per block."""
    head: Literal["loss", "logprobs"] = "loss"
    """The summed next-token loss (pretraining, SFT) or per-token log-probs (DPO, GRPO)."""
    reference: Literal["none", "copy", "adapters_off", "precomputed"] = "none"
    """The frozen reference policy of DPO / GRPO."""
    grads_held: bool = False
    """The step accumulates: earlier micro-batches' gradients are alive through this one's forward."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where it runs (LoRA's base_dtype auto is bf16 on cuda, fp32 on cpu)."""
    kv_cache: tuple[int, int] | None = None
    """GRPO: (rows, positions) of the rollout engine's static KV cache, allocated for the whole run.
    GRPO also scores the reference in the rollout phase, before the training forwards; DPO scores it
    after the policy's forward, with the policy's activations alive."""
    chunk_tokens: int | None = None
    """Tokens per output-projection chunk (None: algos/logprobs.py's 2**28 // vocab)."""
    mlp_chunk_tokens: int = 0
    """parallel.mlp_chunk_tokens: each MLP runs over chunks of this many tokens, recomputed in backward (0: off)."""
    checkpoint_dtype: Literal["same", "bf16"] = "same"
    """parallel.checkpoint_dtype: with checkpointing, the blocks' inputs kept in bf16."""
    offload: bool = False
    """parallel.offload_activations: what the forward saves lives in host memory."""

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


def compute_bytes(r: Recipe) -> int:
    return 2 if r.compute == "bf16" else 4


def uses_autocast(r: Recipe) -> bool:
    """One process with bf16 compute runs under autocast (train/parallel.py: autocast); FSDP2 casts
    the parameters themselves (MixedPrecisionPolicy) and autocast stays off."""
    return r.shard == 1 and r.compute == "bf16"


def base_bytes(r: Recipe) -> int:
    """Storage of the weights that are not adapters: float32 master weights when everything trains;
    LoRA's frozen base in lora.base_dtype (auto: bf16 on GPU, fp32 on CPU; NF4's other tensors bf16)."""
    if r.lora is None:
        return 4
    if r.lora.quantize == "nf4" or r.lora.base_dtype == "bfloat16":
        return 2
    return 4 if r.lora.base_dtype == "float32" or r.device == "cpu" else 2


def stream_bytes(r: Recipe) -> int:
    """Dtype of the residual stream (and of every RMSNorm's output): the embedding's output, so the
    embedding's storage in one process (float32 when everything trains, even under autocast), the
    compute dtype under FSDP2's bf16 policy."""
    c = compute_bytes(r)
    return c if (r.shard > 1 and c == 2) else base_bytes(r)


def adapter_bytes(r: Recipe) -> int:
    """Dtype LoRA's A and B have when used: float32, cast to bf16 by FSDP2's policy when sharded."""
    c = compute_bytes(r)
    return c if (r.shard > 1 and c == 2) else 4


def adapted(r: Recipe) -> set[str]:
    """Projection names that carry a LoRA adapter."""
    if r.lora is None:
        return set()
    targets = r.lora.targets if isinstance(r.lora.targets, list) else [r.lora.targets]
    return set(LORA_TARGETS) if "all-linear" in targets else {t.rpartition(".")[2] for t in targets}


# ---------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state
# ---------------------------------------------------------------------------------------------


@dataclass
class Param:
    name: str
    shape: tuple[int, ...]
    nbytes: int
    """Bytes as stored (NF4: torchao's codes, scales and table)."""
    trainable: bool
    nf4: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def block(self) -> int | None:
        return int(self.name.split(".")[1]) if self.name.startswith("layers.") else None


def nf4_bytes(numel: int, block_size: int = 64, scaler_block_size: int = 256) -> int:
    """torchao's NF4Tensor: 4-bit codes (numel / 2 bytes), an int8 scale per block, a bf16 factor per
    group of block scales, a bf16 mean and the 16-entry bf16 lookup table."""
    blocks = numel // block_size
    return numel // 2 + blocks + 2 * (blocks // scaler_block_size) + 2 + 32


def parameter_table(r: Recipe) -> list[Param]:
    """Every parameter of the network as the loop builds it: the module built on the meta device (no
    memory), LoRA swapped in, each tensor's storage as freeze_base leaves it."""
    from model.gpt import GPT
    from model.lora import apply_lora

    with torch.device("meta"):
        model = GPT(r.model)
        if r.lora is not None:
            apply_lora(model, r.lora.targets, r.lora.r, r.lora.alpha)
    lora_layers = {n for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"}
    out = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if r.lora is None or name.endswith((".lora_A", ".lora_B")):
            out.append(Param(name, shape, p.numel() * 4, trainable=True))
        elif r.lora.quantize == "nf4" and name.endswith(".weight") and name[: -len(".weight")] in lora_layers:
            nbytes = nf4_bytes(p.numel(), r.lora.nf4_block_size, r.lora.nf4_scaler_block_size)
            out.append(Param(name, shape, nbytes, trainable=False, nf4=True))
        else:
            out.append(Param(name, shape, p.numel() * base_bytes(r), trainable=False))
    return out


def sharded(p: Param, shard: int) -> int:
    """Bytes of one rank's shard: FSDP2 splits dim 0 into shard-group chunks of ceil(rows / shard),
    padded, so every rank holds the same size."""
    if shard == 1:
        return p.nbytes
    rows = -(-p.shape[0] // shard)
    return p.nbytes * rows // p.shape[0]


def parameter_bytes(r: Recipe, table: list[Param]) -> int:
    """Parameters as stored on this GPU: float32 master weights (everything trains), or the frozen
    base (bf16 or NF4) plus float32 adapters; one shard of each under FSDP2."""
    return sum(sharded(p, r.shard) for p in table)


def gradient_bytes(r: Recipe, table: list[Param]) -> int:
    """One gradient per trainable parameter, in its dtype (float32), sharded like it (FSDP2
    reduce-scatters in float32)."""
    return sum(sharded(p, r.shard) for p in table if p.trainable)


def optimizer_bytes(r: Recipe, table: list[Param]) -> int:
    """AdamW (train/optim.py): exp_avg and exp_avg_sq, float32, shaped like each trainable
    parameter's shard, plus a float32 step counter per parameter."""
    trainable = [p for p in table if p.trainable]
    return sum(2 * sharded(p, r.shard) + 4 for p in trainable)


def weight_copy_bytes(r: Recipe, table: list[Param]) -> int:
    """Autocast (one process, bf16) casts every float32 weight to bf16 at each use. A trainable
    weight's cast is cached until the forward's autocast region ends and saved for backward, with or
    without checkpointing; a frozen float32 weight's cast is saved when its input needs a gradient
    (not the first block's q/k/v under LoRA), unless checkpointing (or, for the MLP's, its chunks'
    checkpoints) drops it. The output layer casts its own copy inside the loss (counted with the
    loss chunk)."""
    c = compute_bytes(r)
    if not uses_autocast(r):
        return 0
    total = 0
    for p in table:
        if p.block is None or len(p.shape) != 2 or p.nf4 or p.nbytes == p.numel * c:
            continue
        leaf = p.name.rsplit(".", 2)[-2]  # q_proj in layers.0.self_attn.q_proj.weight or .lora_A
        no_input_grad = r.lora is not None and p.block == 0 and leaf in ("q_proj", "k_proj", "v_proj")
        dropped = r.checkpointing or (r.mlp_chunk_tokens and leaf in MLP_LAYERS)
        if p.trainable or (not dropped and not no_input_grad):
            total += p.numel * c
    return total


def fsdp_in_flight_bytes(r: Recipe, table: list[Param]) -> int:
    """FSDP2 all-gathers a block's parameters in the compute dtype just before the block runs and
    frees them after (reshard_after_forward); with the next block prefetched, two blocks are whole at
    once. The root's own parameters (embedding, final norm, output layer) stay gathered through the
    forward and backward."""
    if r.shard == 1:
        return 0
    c = compute_bytes(r)

    def whole(p: Param) -> int:
        return p.nbytes if (p.nf4 or c == 4) else p.numel * c

    block = sum(whole(p) for p in table if p.block == 0)
    root = sum(whole(p) for p in table if p.block is None)
    return 2 * block + root


def fsdp_gradient_in_flight_bytes(r: Recipe, table: list[Param]) -> int:
    """FSDP2 in backward: one block's unsharded gradients in the compute dtype and their float32
    copy for the reduce-scatter."""
    if r.shard == 1:
        return 0
    c = compute_bytes(r)
    return sum(p.numel * (c + (4 if c != 4 else 0)) for p in table if p.block == 0 and p.trainable)


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves, per token, op group by op group (model/gpt.py, model/lora.py)
# ---------------------------------------------------------------------------------------------


def rmsnorm_saved(width: int, rows: int, in_bytes: int, weight_trains: bool) -> int:
    """RMSNorm on `rows` vectors of `width` per token, input of in_bytes: x.float() (4 bytes each:
    the input itself when already float32, else a copy) for the square and the product, rsqrt's
    output (4 bytes per row), and, when the scale trains, the normalised value cast back to in_bytes
    that the scale multiplies."""
    return 4 * width + 4 * rows + (in_bytes * width if weight_trains else 0)


def projections_saved(r: Recipe, names: tuple[str, ...], width: int, in_bytes: int, input_saved: bool = False,
                      input_grad: bool = True) -> int:
    """What the projections reading one input (of `width`, in_bytes) save of it. A trainable
    weight's matmul saves its input: autocast casts the input once per projection, so a c-byte copy
    each when the input is not in the compute dtype, else the input itself, shared. A frozen weight
    saves nothing of it. A LoRA adapter saves its own input (x.to(A's dtype), then autocast's cast:
    a fresh copy unless both casts are no-ops; with dropout always fresh, plus dropout's mask when
    the input carries a gradient: bool on GPU's fused kernel, the input's dtype on CPU) and the
    rank-r product x A^T that B multiplies. `input_saved`: the shared input is already counted (the
    attention output that o_proj reads through a view)."""
    c, a, auto = compute_bytes(r), adapter_bytes(r), uses_autocast(r)
    matmul = c if auto else a  # the adapters' matmul dtype
    mask = (1 if r.device == "cuda" else in_bytes) if input_grad else 0
    total, shared = 0, False
    for name in names:
        if r.lora is None:
            if auto and in_bytes != c:
                total += c * width
            else:
                shared = True
        if name in adapted(r):
            if r.lora.dropout > 0:
                total += mask * width + matmul * width
            elif in_bytes != a or matmul != a:
                total += matmul * width
            else:
                shared = True
            total += matmul * r.lora.r
    return total + (in_bytes * width if shared and not input_saved else 0)


def attention_saved(cfg: ModelConfig, c: int) -> int:
    """Flash-style scaled_dot_product_attention (the kernel for causal bf16 on GPU, and on CPU): q,
    k, v and the output in the compute dtype, k and v at the K key/value heads (native GQA), plus a
    float32 logsumexp per query head. RoPE's products save only the shared cos/sin tables."""
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return c * (2 * H * D + 2 * K * D) + 4 * H


def qk_norm_saved(cfg: ModelConfig, c: int, weight_trains: bool) -> int:
    """Qwen3's RMSNorm over each query and key head, on the c-byte projection outputs."""
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return rmsnorm_saved(H * D, H, c, weight_trains) + rmsnorm_saved(K * D, K, c, weight_trains)


def mlp_saved(cfg: ModelConfig, c: int) -> int:
    """SwiGLU: the gate projection's output (silu's input), silu's output and the up projection's
    output (the product's factors), in the compute dtype. down_proj's input, the product, is counted
    with the projections."""
    return 3 * c * cfg.intermediate_size


def block_saved_eager(r: Recipe, first: bool) -> int:
    """Bytes per token one eager block saves for backward. Under LoRA the first block's input carries
    no gradient (frozen embeddings), so its first RMSNorm saves nothing."""
    cfg, c, s = r.model, compute_bytes(r), stream_bytes(r)
    C, HD, I = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size
    full = r.lora is None
    input_grad = full or not first
    total = rmsnorm_saved(C, 1, s, full) if input_grad else 0
    total += projections_saved(r, ("q_proj", "k_proj", "v_proj"), C, s, input_grad=input_grad)
    if cfg.qk_norm:
        total += qk_norm_saved(cfg, c, full)
    total += attention_saved(cfg, c)
    total += projections_saved(r, ("o_proj",), HD, c, input_saved=True)
    total += rmsnorm_saved(C, 1, s, full)
    if r.mlp_chunk_tokens:  # each chunk's checkpoint keeps its input, a view of the norm's output
        return total + s * C
    return total + mlp_block_saved_eager(r)


def mlp_block_saved_eager(r: Recipe) -> int:
    """Bytes per token an eager MLP saves: what its projections keep of their inputs, and SwiGLU's."""
    cfg, c, s = r.model, compute_bytes(r), stream_bytes(r)
    return (projections_saved(r, ("gate_proj", "up_proj"), cfg.hidden_size, s) + mlp_saved(cfg, c)
            + projections_saved(r, ("down_proj",), cfg.intermediate_size, c))


def block_saved_compiled(r: Recipe, first: bool) -> int:
    """Bytes per token one torch.compile'd block saves: AOTAutograd's min-cut partitioner (what
    inductor uses) keeps fewer tensors and recomputes elementwise work (silu, casts, the norms'
    products) in backward. Kept: the block input and each norm's rsqrt row; each norm's output once
    in the compute dtype (one cast serves every projection) when a projection reading it trains or
    has an adapter; Qwen3's q and k before their norms and the norms' rsqrt rows; q, k, v, the
    attention output and logsumexp; the attention branch's output (the residual after it is
    rebuilt from it); gate and up, and their product when down_proj trains or has an adapter; each
    adapter's rank-r product; under autocast a cast copy of the attention output for an o_proj
    adapter. With the MLP in checkpointed chunks nothing of the MLP: the partitioner rebuilds each
    chunk's input from what the attention half keeps. Measured with the aot_eager_decomp_partition
    backend, which partitions as inductor."""
    cfg, c, s = r.model, compute_bytes(r), stream_bytes(r)
    C, HD, KD, I = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    lora = adapted(r)

    def needs_input(*names: str) -> bool:
        return r.lora is None or any(n in lora for n in names)

    total = (s * C + 4) if (r.lora is None or not first) else 0
    total += c * C if needs_input("q_proj", "k_proj", "v_proj") else 0
    if cfg.qk_norm:
        total += c * (HD + KD) + 4 * (cfg.num_heads + cfg.num_kv_heads)
    total += attention_saved(cfg, c)
    total += c * HD if ("o_proj" in lora and uses_autocast(r)) else 0
    total += min(s, c) * C + 4
    total += c * r.lora.r * len(lora - MLP_LAYERS) if r.lora is not None else 0
    return total + (0 if r.mlp_chunk_tokens else mlp_block_saved_compiled(r))


MLP_LAYERS = {"gate_proj", "up_proj", "down_proj"}


def mlp_block_saved_compiled(r: Recipe) -> int:
    """Bytes per token a compiled block saves for its MLP: the norm's output once in the compute dtype
    when gate or up needs it, gate and up, their product when down_proj needs it, the adapters'
    rank-r products."""
    cfg, c, lora = r.model, compute_bytes(r), adapted(r)
    C, I = cfg.hidden_size, cfg.intermediate_size

    def needs_input(*names: str) -> bool:
        return r.lora is None or any(n in lora for n in names)

    total = (c * C if needs_input("gate_proj", "up_proj") else 0) + 2 * c * I
    total += c * I if needs_input("down_proj") else 0
    return total + (c * r.lora.r * len(lora & MLP_LAYERS) if r.lora is not None else 0)


def block_saved(r: Recipe, first: bool) -> int:
    """Bytes per token one block saves for backward, eager or compiled (QLoRA's NF4 matmul is one
    opaque op in the compiled graph that keeps only the 4-bit weight: model/lora.py's nf4_linear)."""
    return block_saved_compiled(r, first) if r.compile else block_saved_eager(r, first)


def outside_blocks_saved(r: Recipe) -> int:
    """Bytes per token saved outside the blocks: the token ids the embedding's backward indexes
    (int64, when the embedding trains), RoPE's cos and sin tables ((B, T, D) each in the stream's
    dtype, shared by every block), and the final RMSNorm."""
    cfg, s = r.model, stream_bytes(r)
    full = r.lora is None
    return (8 if full else 0) + 2 * cfg.head_dim * s + rmsnorm_saved(cfg.hidden_size, 1, s, full)


def activation_bytes(r: Recipe, checkpointing: bool | None = None) -> int:
    """Activations saved for backward by one micro-batch (rows x seq_len tokens), at the end of its
    forward. With activation checkpointing each block keeps only its input (the stream, s bytes per
    token; 2 with checkpoint_dtype bf16); its saved tensors come back one block at a time in backward
    (block_recompute_bytes)."""
    checkpointing = r.checkpointing if checkpointing is None else checkpointing
    L = r.model.num_layers
    if checkpointing:
        per_token = L * checkpoint_input_bytes(r) * r.model.hidden_size
    else:
        per_token = block_saved(r, first=True) + (L - 1) * block_saved(r, first=False)
    return r.tokens * (per_token + outside_blocks_saved(r))


def checkpoint_input_bytes(r: Recipe) -> int:
    """Bytes per element of a checkpointed block's kept input: the stream's, or bf16's."""
    return 2 if r.checkpoint_dtype == "bf16" else stream_bytes(r)


def resident_activation_bytes(r: Recipe) -> int:
    """What stays on the GPU of the forward's saved activations with offload_activations: with
    checkpointing the RoPE tables (the blocks keep them, shared, where they are), else nothing."""
    return r.tokens * 2 * r.model.head_dim * stream_bytes(r) if r.checkpointing else 0


def block_recompute_bytes(r: Recipe) -> int:
    """With checkpointing: one block's saved tensors, recomputed at the start of its backward; under
    QLoRA these include the block's NF4 weights dequantized to the compute dtype, which the recompute
    keeps for that backward (model/lora.py: keep_dequantized_weights)."""
    weights = 0
    if r.lora is not None and r.lora.quantize == "nf4":
        weights = sum(p.numel * compute_bytes(r) for p in parameter_table(r) if p.nf4 and p.block == 0)
    return r.tokens * block_saved(r, first=False) + weights


def backward_working_bytes(r: Recipe) -> int:
    """Gradients flowing through one block in backward, net of the saved tensors it frees as it
    goes: the stream's gradient and one c-byte (tokens x I) gradient in the MLP; an adapter's input
    gradient passes through float32 on its way back through autocast's casts (4 bytes per I more).
    A trainable weight's gradient, made in the compute dtype, is copied to float32 to accumulate:
    the largest (C x I) in both dtypes. With the MLP in chunks, its gradient is one chunk's, beside
    that chunk's recomputed saved tensors. An estimate (tests/test_plan.py measures the whole peak)."""
    cfg, c, s = r.model, compute_bytes(r), stream_bytes(r)
    fp32_detour = 4 if (r.lora is not None and uses_autocast(r)) else 0
    mlp = (c + fp32_detour) * cfg.intermediate_size
    if r.mlp_chunk_tokens:
        n = min(r.tokens, r.mlp_chunk_tokens)
        mlp_saved_per_token = mlp_block_saved_compiled(r) if r.compile else mlp_block_saved_eager(r)
        acts = r.tokens * s * cfg.hidden_size + n * (mlp + mlp_saved_per_token)
    else:
        acts = r.tokens * (s * cfg.hidden_size + mlp)
    weight = cfg.hidden_size * cfg.intermediate_size * (c + 4 if c != 4 else 4) if r.lora is None else 0
    return acts + weight


# ---------------------------------------------------------------------------------------------
# The output projection and the loss (algos/logprobs.py)
# ---------------------------------------------------------------------------------------------


def output_trains(r: Recipe) -> bool:
    return r.lora is None


def output_weight_bytes(r: Recipe) -> int:
    """The output weight (V, C) as the head gets it: as stored (the embedding's when tied), or
    gathered in the compute dtype by FSDP2's bf16 policy."""
    c = compute_bytes(r)
    return r.model.vocab_size * r.model.hidden_size * (c if (r.shard > 1 and c == 2) else base_bytes(r))


def head_saved_bytes(r: Recipe) -> int:
    """What the output projection keeps for backward. Loss head (linear_cross_entropy_sum): the
    gradient w.r.t. the hidden states (tokens x C, the stream's dtype), computed in forward, and the
    output weight's (V x C, float32) when it trains. Log-prob head (linear_token_logprobs): the
    hidden states, the targets (int64), the valid mask, the logsumexp and the log-probs (float32)."""
    C, V, s = r.model.hidden_size, r.model.vocab_size, stream_bytes(r)
    if r.head == "loss":
        return r.tokens * C * s + (V * C * 4 if output_trains(r) else 0)
    return r.tokens * (C * s + 8 + 1 + 4 + 4)


def chunk_tokens(r: Recipe) -> int:
    """Tokens per chunk of the output projection: about 1 GiB of float32 logits."""
    return min(r.tokens, r.chunk_tokens or max(1, 2**28 // r.model.vocab_size))


def fused_head(r: Recipe) -> bool:
    """On CUDA the head's softmax work is compiled into fused kernels (algos/logprobs.py)."""
    return r.device == "cuda"


def chunk_softmax_bytes(r: Recipe) -> int:
    """One chunk's logits (n x V) and what its softmax work allocates beside them. Eager: a float32
    copy of the logits (unless they are float32) and logsumexp's float32 temporary, or the
    gradient's float32 exp and its cast, whichever is larger; fused: only the logits. The previous
    chunk's tensors are freed before the next chunk's logits are made."""
    c, A = compute_bytes(r), chunk_tokens(r) * r.model.vocab_size
    if fused_head(r):
        return c * A
    return (c + 8) * A if c != 4 else 8 * A


def head_chunk_bytes(r: Recipe) -> int:
    """The transient peak inside the output projection, on top of what is saved: one chunk's softmax
    work (chunk_softmax_bytes); with a gradient, the chunk's logits beside their gradient (fused) or
    the gradient's float32 exp and its cast (eager). When the output weight trains, its gradient is
    added chunk by chunk: eager through (g^T h) and a float32 copy (V x C each), beside the chunk's
    gradient; fused inside the matmul (compute bf16) with no temporary. Plus the weight and the
    chunk's hidden states cast to the compute dtype, and the final norm's output the head reads
    (the log-prob head saves it anyway). The log-prob head's backward recomputes each chunk the same
    way (its forward needs less) and allocates the hidden states' and the output weight's gradients
    there."""
    c, V, C = compute_bytes(r), r.model.vocab_size, r.model.hidden_size
    n = chunk_tokens(r)
    A = n * V
    peak = max(chunk_softmax_bytes(r), 2 * c * A)
    if output_trains(r) and not (fused_head(r) and c != 4):  # the chunk's gradient beside (g^T h) and its copy
        peak = max(peak, c * A + V * C * (c + 4 if c != 4 else 4))
    w_copy = V * C * c if output_weight_bytes(r) != V * C * c else 0
    h_copy = n * C * c if stream_bytes(r) != c else 0  # the chunk's hidden states in the compute dtype
    if r.head == "logprobs":  # its backward allocates the gradients the loss head made in forward
        peak += r.tokens * C * stream_bytes(r) + (V * C * 4 if output_trains(r) else 0)
    else:  # the final norm's output, which the loss head reads but nothing saves
        peak += r.tokens * C * stream_bytes(r)
    return peak + w_copy + h_copy


# ---------------------------------------------------------------------------------------------
# Reference model (DPO, GRPO) and rollout KV cache (GRPO)
# ---------------------------------------------------------------------------------------------


def reference_bytes(r: Recipe, table: list[Param]) -> int:
    """The frozen reference policy. copy: a second network built like the policy before any
    freezing (float32, sharded like it; in one process under autocast its linear weights in the
    compute dtype: train/parallel.py's freeze_in_compute_dtype); adapters_off: the policy itself with
    its adapters off; precomputed: a table of two floats per pair, made before training; none: nothing."""
    if r.reference != "copy":
        return 0

    def stored(p: Param) -> int:
        return p.numel * (compute_bytes(r) if is_linear(p) and uses_autocast(r) else 4)

    return sum(sharded(Param(p.name, p.shape, stored(p), True), r.shard) for p in table if not is_adapter(p))


def is_linear(p: Param) -> bool:
    """A linear layer's weight or bias: what autocast casts, and what frozen copies store in the compute dtype."""
    return p.name.endswith(("_proj.weight", "_proj.bias", "lm_head.weight"))


def is_adapter(p: Param) -> bool:
    return p.name.endswith((".lora_A", ".lora_B"))


def reference_pass_bytes(r: Recipe) -> int:
    """Transient of the reference's forward (no grad; DPO runs it while the policy's activations are
    alive): the larger of its log-prob head (the hidden states, the output weight in the compute
    dtype, one chunk's softmax work: chunk_softmax_bytes) and one block's largest working set (the
    stream, the norm output, gate, up and their product)."""
    if r.reference not in ("copy", "adapters_off"):
        return 0
    cfg, c, s = r.model, compute_bytes(r), stream_bytes(r)
    C, V = cfg.hidden_size, cfg.vocab_size
    w_copy = V * C * c if output_weight_bytes(r) != V * C * c else 0
    head = r.tokens * C * s + w_copy + chunk_softmax_bytes(r)
    block = r.tokens * (2 * s * C + 3 * c * cfg.intermediate_size)
    return max(head, block)


def kv_cache_bytes(batch: int, length: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """A static KV cache (model/gpt.py: KVCache): keys and values, (batch, kv_heads, length,
    head_dim) each, for every layer."""
    return 2 * layers * batch * kv_heads * length * head_dim * dtype_bytes


def rollout_cache_bytes(r: Recipe) -> int:
    """GRPO's rollout engine (model/generate.py: RolloutEngine) allocates its cache once, in the
    compute dtype (GRPO passes it), rows rounded up to a power-of-two bucket (at least 8) and
    positions to a multiple of 64, and keeps it through training."""
    if r.kv_cache is None:
        return 0
    rows, length = r.kv_cache
    bucket = 8
    while bucket < rows:
        bucket *= 2
    length = -(-length // 64) * 64
    cfg = r.model
    return kv_cache_bytes(bucket, length, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, compute_bytes(r))


def rollout_snapshot_bytes(r: Recipe) -> int:
    """GRPO on one GPU: the rollout engine decodes from a snapshot of the policy kept for the whole run
    (model/generate.py: _build_snapshot): every linear layer in the compute dtype, with an output
    projection of its own when the policy ties it to the embedding, and the embedding and norms as
    the policy stores them. Under FSDP2 the engine gathers the full weights during each rollout
    instead (not a training phase, so not counted here)."""
    if r.kv_cache is None or r.device != "cuda" or r.shard > 1:
        return 0
    total = sum(p.numel * (compute_bytes(r) if is_linear(p) else base_bytes(r))
                for p in parameter_table(r) if not is_adapter(p))
    head = r.model.vocab_size * r.model.hidden_size * compute_bytes(r) if r.model.tie_embeddings else 0
    return total + head


# ---------------------------------------------------------------------------------------------
# The peak: what is alive in each phase of a step
# ---------------------------------------------------------------------------------------------

LABELS = {
    "parameters": "parameters",
    "gradients": "gradients (float32)",
    "optimizer": "AdamW state (float32 m, v, step)",
    "weight copies": "bf16 weight casts (autocast)",
    "activations": "activations saved by the forward",
    "recompute": "  one block recomputed in backward",
    "backward working": "  gradients flowing through one block",
    "head saved": "output projection + loss: saved",
    "head chunk": "output projection + loss: one chunk",
    "offloaded": "saved activations in host memory (offload)",
    "reference": "reference model",
    "reference pass": "  reference forward (transient)",
    "kv cache": "rollout KV cache",
    "snapshot": "rollout snapshot of the policy",
}


@dataclass
class Plan:
    """Predicted bytes per GPU of each component, and of each phase of a step (what is alive then)."""

    components: dict[str, int]
    phases: dict[str, dict[str, int]]

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    @property
    def peak(self) -> int:
        return sum(self.phases[self.peak_phase].values())


def memory_plan(r: Recipe) -> Plan:
    """Every component, and the peak as the largest of the phases of a step:
    forward end: the last loss chunk runs with every activation saved;
    backward start: activations still saved, one block's gradients flowing (with checkpointing,
        that block recomputed first); the log-prob head's backward recomputes its chunks here;
    backward end: every gradient made, the first block's backward still running (with
        checkpointing, recomputed) or a tied embedding's gradient being added to the output's;
    reference pass (DPO): the reference's forward after the policy's, its activations alive;
    optimizer step: parameters, gradients and AdamW state.
    Parameters, AdamW state, a reference copy, a rollout cache and snapshot are alive throughout, and the
    gradients too when the step accumulates (grads_held); otherwise they grow through the backward
    as the activations are freed. With offload, the activations and the head's saved tensors are in
    host memory (never in a phase); each block's come back for its backward, as a recompute does."""
    table = parameter_table(r)
    L = r.model.num_layers
    copies = weight_copy_bytes(r, table) + fsdp_in_flight_bytes(r, table)
    comp = {
        "parameters": parameter_bytes(r, table),
        "gradients": gradient_bytes(r, table),
        "optimizer": optimizer_bytes(r, table),
        "weight copies": copies,
        "activations": activation_bytes(r),
        "recompute": block_recompute_bytes(r) if r.checkpointing else 0,
        "backward working": backward_working_bytes(r) + fsdp_gradient_in_flight_bytes(r, table),
        "head saved": head_saved_bytes(r),
        "head chunk": head_chunk_bytes(r),
        "offloaded": 0,
        "reference": reference_bytes(r, table),
        "reference pass": reference_pass_bytes(r),
        "kv cache": rollout_cache_bytes(r),
        "snapshot": rollout_snapshot_bytes(r),
    }
    if r.offload:
        comp["offloaded"] = comp["activations"] + comp["head saved"] - resident_activation_bytes(r)
        comp["activations"], comp["head saved"] = resident_activation_bytes(r), 0
        comp["recompute"] = block_recompute_bytes(r)  # one block's saved tensors back at a time
    resident = ("parameters", "optimizer", "reference", "kv cache", "snapshot")
    resident += ("gradients",) if r.grads_held else ()

    def alive(*keys: str) -> dict[str, int]:
        return {k: comp[k] for k in dict.fromkeys(resident + keys)}

    forward = alive("weight copies", "activations", "head saved", "head chunk")
    if r.head == "logprobs":  # its forward keeps less than its backward's recomputed chunk: counted there
        forward["head chunk"] = 0
    backward = alive("weight copies", "activations", "recompute", "backward working", "head saved")
    one_block_copies = comp["weight copies"] // L if r.shard == 1 else comp["weight copies"]
    if r.checkpointing or r.offload:  # autocast's cache of the weight casts ended with the forward: one block's again
        backward["weight copies"] = one_block_copies
    if r.head == "logprobs":  # the head's backward runs (and frees its chunks) before any block's
        block = comp["recompute"] + comp["backward working"]
        backward["recompute"], backward["backward working"] = 0, max(block, comp["head chunk"])
    end = alive("gradients", "recompute", "backward working")
    end["weight copies"] = one_block_copies
    end["gradients"] -= gradient_bytes(r, [p for p in table if p.block == 0])  # the first block's: not yet
    if r.model.tie_embeddings and r.lora is None:  # embedding's gradient, then added to the output's
        end["backward working"] = max(end["backward working"], r.model.vocab_size * r.model.hidden_size * 4)
    phases = {"forward end": forward, "backward start": backward, "backward end": end}
    if comp["reference pass"] and r.kv_cache is None:  # DPO: after the policy's forward
        phases["reference pass"] = alive("weight copies", "activations", "head saved", "reference pass")
        if r.checkpointing and r.shard == 1:  # the policy's autocast cache ended with its forward
            phases["reference pass"]["weight copies"] = 0
    elif comp["reference pass"]:  # GRPO: in the rollout phase, no training activations yet
        phases["reference pass"] = alive("reference pass")
    phases["optimizer step"] = alive("gradients")
    return Plan(comp, phases)


FIT_LIMIT = 1 << 16  # the search for the largest micro-batch stops here


def largest_micro_batch(make, capacity: int, limit: int = FIT_LIMIT) -> int:
    """The most sequences per micro-batch whose predicted peak fits in `capacity` bytes (0 if even
    one does not); make(micro_batch) -> Recipe."""
    if memory_plan(make(1)).peak > capacity:
        return 0
    lo, hi = 1, 2
    while hi <= limit and memory_plan(make(hi)).peak <= capacity:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_plan(make(mid)).peak <= capacity else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------
# Step time of FSDP2 / HSDP training
# ---------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The machines. Bandwidths are what NCCL achieves per GPU (nccl-tests' bus bandwidth), not the
    link's spec. Defaults: H100/H200 SXM nodes of 8 GPUs, NVLink 4, one 400 Gb/s NIC per GPU."""

    gpus_per_node: int = 8
    peak_tflops: float = 989.0
    """Dense bf16 peak (H100 and H200 SXM: 989 TFLOP/s)."""
    mfu: float = 0.40
    """Share of the peak the matmuls reach (bench/RESULTS.md measures 40% for the 1B on one H200)."""
    nvlink_gbs: float = 360.0
    """GB/s per GPU within a node (NVLink 4: 450 GB/s each way; all-gather reaches ~80%)."""
    network_gbs: float = 45.0
    """GB/s per GPU between nodes (400 Gb/s InfiniBand or RoCE: 50 GB/s; ~90%)."""
    hbm_gbs: float = 3350.0
    """GB/s of GPU memory, for the optimizer step (H100 SXM: 3350; H200: 4800)."""
    hop_latency_us: tuple[float, float] = (2.0, 6.0)
    """Latency per ring step within a node and across nodes, microseconds."""


def train_flops_per_token(r: Recipe) -> float:
    """FLOPs per trained token: forward 2N + attention, backward twice that (model/config.py's
    flops_per_token); LoRA's backward skips the frozen weights' gradients (2 forwards' worth in
    all); checkpointing runs the forward again; a reference model one more forward."""
    full = r.model.flops_per_token(r.seq_len)  # 3 forwards
    forward = full / 3
    total = full if r.lora is None else 2 * forward
    if r.checkpointing:
        total += forward
    if r.reference in ("copy", "adapters_off"):
        total += forward
    return total


def step_time(r: Recipe, world: int, replicate: int, micro_batches: int, cluster: Cluster) -> dict:
    """Seconds per optimizer step of FSDP2 over shard groups of world // replicate GPUs (HSDP when
    replicate > 1). Per micro-batch and GPU:
      compute   = train FLOPs of its tokens / (peak x MFU);
      collectives: all-gather of every parameter in the compute dtype in forward, again in backward
                (reshard_after_forward), reduce-scatter of the trainable gradients in float32, and
                with HSDP an all-reduce of the gradient shards across replicas; a ring passes
                (n-1)/n of the buffer through each GPU's link (an all-reduce twice that), over
                NVLink when the group sits in one node, else over the network, plus a latency per
                ring step for each block's collective.
    FSDP2 prefetches, so a micro-batch takes the longer of compute and communication; the loops
    reduce every micro-batch (no gradient-sync skipping). Then the optimizer step streams the
    shards' parameters, gradients and moments through memory once."""
    table = parameter_table(r)
    c, S = compute_bytes(r), world // replicate
    gpn = cluster.gpus_per_node
    trainable = sum(p.numel for p in table if p.trainable)
    gathered = sum(p.nbytes if (p.nf4 or c == 4) else p.numel * c for p in table)
    units = r.model.num_layers + 1  # FSDP2 units: every block and the root

    def ring(nbytes: float, n: int, inside: bool) -> float:
        if n == 1:
            return 0.0
        bw = (cluster.nvlink_gbs if inside else cluster.network_gbs) * 1e9
        hop = cluster.hop_latency_us[0 if inside else 1] * 1e-6
        return nbytes * (n - 1) / n / bw + units * (n - 1) * hop

    shard_inside = S <= gpn
    shard_comm = ring(2 * gathered, S, shard_inside) + ring(4 * trainable, S, shard_inside)
    replicate_comm = 2 * ring(4 * trainable / S, replicate, False) if replicate > 1 else 0.0
    compute = train_flops_per_token(r) * r.tokens / (cluster.peak_tflops * 1e12 * cluster.mfu)
    comm = shard_comm + replicate_comm
    optimizer = 28 * trainable / S / (cluster.hbm_gbs * 1e9)  # read p, g, m, v; write p, m, v (float32)
    step = micro_batches * max(compute, comm) + optimizer
    tokens = r.tokens * micro_batches
    return {
        "compute_s": micro_batches * compute,
        "intra_s": micro_batches * (shard_comm if shard_inside else 0.0),
        "inter_s": micro_batches * ((0.0 if shard_inside else shard_comm) + replicate_comm),
        "step_s": step,
        "tokens_per_s_gpu": tokens / step,
        "mfu": r.model.flops_per_token(r.seq_len) * tokens / step / (cluster.peak_tflops * 1e12),
        "bound": "compute" if compute >= comm else ("NVLink" if shard_inside and shard_comm > replicate_comm
                                                   else "network"),
        "hiding_tokens": comm / (train_flops_per_token(r) / (cluster.peak_tflops * 1e12 * cluster.mfu)),
    }


# ---------------------------------------------------------------------------------------------
# From a loop's config to recipes
# ---------------------------------------------------------------------------------------------

# loop -> (module, config class); lora is the SFT config with train/lora.py's defaults.
LOOPS = {"pretrain": ("train.pretrain", "PretrainConfig"), "sft": ("train.sft", "SFTConfig"),
         "lora": ("train.sft", "SFTConfig"), "dpo": ("train.dpo", "DPOConfig"), "grpo": ("train.grpo", "GRPOConfig")}


def parse_loop_config(loop: str, argv: list[str]):
    """The loop's own config from --config and dotted flags, exactly as `python -m train.<loop>` parses it."""
    import importlib

    from train.config import parse_config

    module, name = LOOPS[loop]
    defaults = importlib.import_module("train.lora").LORA_DEFAULTS if loop == "lora" else None
    return parse_config(getattr(importlib.import_module(module), name), argv, defaults=defaults)


def model_shape(spec) -> tuple[ModelConfig, str]:
    """The architecture a ModelSource names, and where it came from, without reading any weights: a
    preset, a local checkpoint's config.json, or a Hub repo's config.json alone (from the HF cache,
    else fetched by itself unless HF_HUB_OFFLINE=1). A Hub repo out of reach falls back to the preset
    its name starts with (meta-llama/Llama-3.2-1B-Instruct: llama-3.2-1b), and says so."""
    from checkpoints.hf import config_from_hf
    from model.files import read_json

    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser()
        if path.is_dir():
            cfg, source = config_from_hf(read_json(path / "config.json"), str(path / "config.json")), str(path)
        else:
            cfg, source = _hub_shape(str(spec.checkpoint))
    elif spec.preset:
        cfg, source = ModelConfig.preset(spec.preset), f"preset {spec.preset}"
    else:
        raise ValueError("model: set model.preset or model.checkpoint")
    overrides = {k: v for k, v in (("vocab_size", spec.vocab_size), ("max_seq_len", spec.max_seq_len)) if v}
    return dataclasses.replace(cfg, **overrides), source


def _hub_shape(repo: str) -> tuple[ModelConfig, str]:
    import re

    from checkpoints.hf import config_from_hf
    from model.files import read_json

    if not re.fullmatch(r"\w[\w.\-]*/\w[\w.\-]*", repo):  # a local path (an earlier stage's output?)
        raise FileNotFoundError(f"model.checkpoint {repo}: no such directory (yet?), and not a Hub repo id; plan "
                                f"with a shape instead: --model.checkpoint null --model.preset <one of "
                                f"{', '.join(PRESETS)}>")
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json")
        if not isinstance(found, str) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
            found = hf_hub_download(repo, "config.json")
        if isinstance(found, str):
            return config_from_hf(read_json(Path(found)), f"{repo}/config.json"), f"{repo} (config.json)"
    except Exception:  # offline, gated, unknown: try the presets below
        pass
    name = repo.rpartition("/")[2].lower()
    matches = [p for p in PRESETS if name.startswith(p)]
    if not matches:
        raise FileNotFoundError(f"model.checkpoint {repo}: its config.json is not in the HF cache and could not be "
                                f"fetched; download it (python -m checkpoints.download {repo}) or pass "
                                f"--model.checkpoint null --model.preset <one of {', '.join(PRESETS)}>")
    preset = max(matches, key=len)
    return ModelConfig.preset(preset), f"preset {preset} (the shape of {repo}: its config.json is out of reach)"


@dataclass
class Run:
    """A loop config read as the planner needs it."""

    loop: str
    recipe: Recipe
    source: str
    micro_batch: int
    global_rows: int
    """Sequences (pairs for DPO, completions for GRPO) per optimizer step over all GPUs."""
    replicate: int

    def with_micro_batch(self, micro_batch: int, world: int, **changes) -> Recipe:
        """The recipe for another micro-batch (sequences per GPU; pairs for DPO)."""
        rows = 2 * micro_batch if self.loop == "dpo" else micro_batch
        held = self.global_rows > micro_batch * world
        return dataclasses.replace(self.recipe, rows=rows, grads_held=held, **changes)


def run_from_config(loop: str, cfg, world: int) -> Run:
    """Shapes, precision, parallelism, LoRA and the reference policy of a parsed loop config."""
    mcfg, source = model_shape(cfg.model)
    par = cfg.parallel
    replicate = par.dp_replicate if world % par.dp_replicate == 0 else 1
    common = dict(model=mcfg, compute="fp32" if par.mixed_precision == "fp32" else "bf16", shard=world // replicate,
                  checkpointing=par.activation_checkpointing, compile=par.compile,
                  mlp_chunk_tokens=par.mlp_chunk_tokens, checkpoint_dtype=par.checkpoint_dtype,
                  offload=par.offload_activations)
    lora = getattr(cfg, "lora", None)
    kv = None
    if loop == "pretrain":
        seq = cfg.data.seq_len
        global_rows = cfg.global_batch_tokens // seq if cfg.global_batch_tokens else cfg.global_batch
        extra = {}
    elif loop in ("sft", "lora"):
        seq, global_rows, extra = cfg.data.max_seq_len, cfg.global_batch, {}
    elif loop == "dpo":
        from train.dpo import pick_reference

        seq, global_rows = cfg.data.max_len, cfg.global_batch
        extra = dict(head="logprobs", reference=pick_reference(cfg.dpo, lora))
    else:
        from train.grpo import pick_reference

        G = cfg.grpo.num_generations
        seq = cfg.data.max_prompt_len + cfg.grpo.max_completion_len
        global_rows = cfg.global_batch * G  # completions
        kv = (max(1, cfg.global_batch // world) * G, seq)
        extra = dict(head="logprobs", reference=pick_reference(cfg.grpo, lora))
    rows = 2 * cfg.micro_batch if loop == "dpo" else cfg.micro_batch
    recipe = Recipe(rows=rows, seq_len=seq, lora=lora, kv_cache=kv,
                    grads_held=global_rows > cfg.micro_batch * world, **common, **extra)
    return Run(loop, recipe, source, cfg.micro_batch, global_rows, replicate)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def describe(run: Run, world: int) -> str:
    r, cfg = run.recipe, run.recipe.model
    if r.lora is None:
        weights = "float32 master weights" + (", bf16 compute" if r.compute == "bf16" else "")
    else:
        base = "NF4" if r.lora.quantize == "nf4" else ("bf16" if base_bytes(r) == 2 else "float32")
        targets = "all-linear" if adapted(r) == set(LORA_TARGETS) else ",".join(sorted(adapted(r)))
        weights = f"LoRA r={r.lora.r} on {targets}, {base} frozen base, {r.compute} compute"
    what = "pairs (2 rows each)" if run.loop == "dpo" else ("completions" if run.loop == "grpo" else "sequences")
    layout = ("1 process" + (" (bf16 autocast)" if uses_autocast(r) else "")) if r.shard == 1 else (
        f"FSDP2 over {r.shard} GPUs" + (f" x {run.replicate} replicas (HSDP)" if run.replicate > 1 else ""))
    steps = run.global_rows // max(1, run.micro_batch * world)
    lines = [
        f"model: {run.source}: {millions(cfg.num_params())} parameters, {cfg.num_layers} layers, "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}",
        f"per GPU: micro-batch {run.micro_batch} {what} x {r.seq_len} tokens, {steps} micro-batch(es) per step; "
        f"{weights}; {layout}; compile {'on' if r.compile else 'off'}"
        + (f"; reference {r.reference}" if r.reference != "none" else ""),
    ]
    return "\n".join(lines)


def millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def memory_table(run: Run, world: int, capacity: int, gpu_gib: float) -> str:
    """Components for the config's micro-batch, without and with checkpointing, and the largest
    micro-batch that fits."""
    plans, fits = {}, {}
    for ac in (False, True):
        plans[ac] = memory_plan(dataclasses.replace(run.recipe, checkpointing=ac))
        fits[ac] = largest_micro_batch(lambda m: run.with_micro_batch(m, world, checkpointing=ac), capacity)
    chosen = run.recipe.checkpointing
    head = (f"{'per GPU, GiB (a prediction)':52s} {'no checkpointing':>17s} {'checkpointing':>14s}")
    out = [head]
    for key, label in LABELS.items():
        if not any(p.components[key] for p in plans.values()):
            continue
        if key == "parameters":
            r = run.recipe
            label = "parameters (" + ("float32" if r.lora is None else
                                      "NF4/bf16 base + float32 adapters" if r.lora.quantize == "nf4" else
                                      f"{'bf16' if base_bytes(r) == 2 else 'float32'} base + float32 adapters") + ")"
        if key == "head chunk":
            label += f" ({chunk_tokens(run.recipe)} tokens)"
        if key == "weight copies" and run.recipe.shard > 1:
            label = "FSDP2 gathered: root + 2 blocks"
        cells = []
        for ac in (False, True):
            p = plans[ac]
            value = gib(p.components[key])
            alive = p.phases[p.peak_phase].get(key, 0)
            cells.append("-" if not p.components[key] else value if alive else f"({value})")
        out.append(f"{label:52s} {cells[0]:>17s} {cells[1]:>14s}")
    out.append(f"{'peak':52s} {gib(plans[False].peak):>17s} {gib(plans[True].peak):>14s}")
    out.append(f"{'  reached at':52s} {plans[False].peak_phase:>17s} {plans[True].peak_phase:>14s}")
    unit = {"dpo": "pairs", "grpo": "completions"}.get(run.loop, "sequences")
    shown = [f"{n}+" if n >= FIT_LIMIT else str(n) for n in (fits[False], fits[True])]
    out.append(f"{'largest micro-batch (' + unit + f') in {capacity / GiB:.0f} of {gpu_gib:g} GiB':52s} "
               f"{shown[0]:>17s} {shown[1]:>14s}")
    out.append(f"(x): not alive at the peak. The config runs {'with' if chosen else 'without'} checkpointing.")
    if run.recipe.offload:
        out.append("offload_activations: the host memory (pinned) holds what the GPU peak leaves out; the largest "
                   "micro-batch counts the GPU only.")
    return "\n".join(out)


def step_table(run: Run, worlds: list[int], nodes: int | None, cluster: Cluster, capacity: int) -> str:
    """Step time for each world size, as plain FSDP2 over every GPU and as HSDP (FSDP2 within a node,
    replicated across nodes) when there are several nodes."""
    rows = []
    header = (f"{'GPUs':>5s} {'nodes':>5s} {'layout':>12s} {'micro':>6s} {'accum':>5s} {'tokens/step':>11s} "
              f"{'compute s':>9s} {'NVLink s':>8s} {'network s':>9s} {'step s':>7s} {'bound':>8s} "
              f"{'MFU':>5s} {'tok/s/GPU':>9s} {'peak GiB':>8s} {'hides at':>9s}")
    rows.append(header)
    for world in worlds:
        n = nodes if nodes is not None else max(1, -(-world // cluster.gpus_per_node))
        gpn = -(-world // n)
        layouts = [(1, f"FSDP {world}")]
        if n > 1:
            layouts.append((n, f"HSDP {n}x{gpn}"))
        if run.replicate > 1 and run.replicate not in (1, n) and world % run.replicate == 0:
            layouts.append((run.replicate, f"HSDP {run.replicate}x{world // run.replicate}"))
        per_gpu = run.global_rows // world
        if per_gpu == 0:
            rows.append(f"{world:>5d} {n:>5d}  global batch of {run.global_rows} is smaller than {world} GPUs")
            continue
        micro = min(run.micro_batch, per_gpu)
        while per_gpu % micro:
            micro -= 1
        accum = per_gpu // micro
        for replicate, name in layouts:
            cl = dataclasses.replace(cluster, gpus_per_node=gpn)
            r = dataclasses.replace(run.with_micro_batch(micro, world), shard=world // replicate)
            t = step_time(r, world, replicate, accum, cl)
            peak = memory_plan(r).peak
            tokens = r.tokens * accum * world
            rows.append(f"{world:>5d} {n:>5d} {name:>12s} {micro:>6d} {accum:>5d} {tokens / 1e6:>10.2f}M "
                        f"{t['compute_s']:>9.2f} {t['intra_s']:>8.2f} {t['inter_s']:>9.2f} {t['step_s']:>7.2f} "
                        f"{t['bound']:>8s} {100 * t['mfu']:>4.0f}% {t['tokens_per_s_gpu']:>9,.0f} "
                        f"{peak / GiB:>7.1f}{'' if peak <= capacity else '!'} {t['hiding_tokens']:>9,.0f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m train.plan",
        description="Will it fit? Peak GPU memory per component, and FSDP2/HSDP step time, predicted from a loop's config.",
        epilog="Every other flag is the loop's own (--config FILE, --micro_batch 4, --parallel.compile true, "
               "--model.preset llama-3.1-8b, ...): see python -m train.<loop> --help.")
    p.add_argument("--loop", choices=sorted(LOOPS), help="default: the config's folder name (configs/<loop>/x.yaml)")
    p.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU (H100: 80, H200: 141)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of the GPU kept free for the CUDA context, NCCL and fragmentation")
    p.add_argument("--world_size", type=int, nargs="+", default=[1], help="GPUs in all; several values: a table")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: world_size / gpus_per_node)")
    cluster = Cluster()
    helps = {"gpus_per_node": "GPUs per node", "peak_tflops": "dense bf16 TFLOP/s of one GPU (H100/H200: 989)",
             "mfu": "share of the peak the matmuls reach", "nvlink_gbs": "achieved GB/s per GPU within a node",
             "network_gbs": "achieved GB/s per GPU between nodes", "hbm_gbs": "GPU memory GB/s (H200: 4800)"}
    for name, text in helps.items():
        default = getattr(cluster, name)
        p.add_argument(f"--{name}", type=type(default), default=default, help=f"{text} (default {default})")
    args, rest = p.parse_known_args(argv)
    loop = args.loop
    if loop is None:
        config = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--config"), None)
        config = config or next((a.split("=", 1)[1] for a in rest if a.startswith("--config=")), None)
        loop = Path(config).parent.name if config else None
        if loop not in LOOPS:
            p.error(f"cannot tell the loop from {config!r}; pass --loop {{{','.join(sorted(LOOPS))}}}")
    cfg = parse_loop_config(loop, rest)
    cluster = Cluster(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Cluster) if f.name != "hop_latency_us"})
    world = args.world_size[0]
    try:
        run = run_from_config(loop, cfg, world)
    except (FileNotFoundError, ValueError) as e:  # the model's shape is out of reach: one line, no traceback
        sys.exit(f"error: {e}")
    capacity = int(args.gpu_memory_gib * (1 - args.headroom) * GiB)
    print(f"train.plan: {loop} loop, {world} GPU{'s' if world > 1 else ''} (a prediction, not a measurement)")
    print(describe(run, world))
    print()
    print(memory_table(run, world, capacity, args.gpu_memory_gib))
    if max(args.world_size) > 1 or args.nodes:
        print()
        print(f"step time (a prediction: {cluster.peak_tflops:g} TFLOP/s at {100 * cluster.mfu:.0f}% MFU, NVLink "
              f"{cluster.nvlink_gbs:g} GB/s, network {cluster.network_gbs:g} GB/s per GPU; collectives overlap compute; "
              f"'hides at': tokens per micro-batch per GPU from which compute hides communication; "
              f"'!': does not fit" + ("; GRPO: training passes only, not the rollouts" if loop == "grpo" else "") + ")")
        print(step_table(run, args.world_size, args.nodes, cluster, capacity))


if __name__ == "__main__":
    main()
