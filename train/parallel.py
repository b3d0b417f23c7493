"""Applies float8 linear layers, activation checkpointing, torch.compile and FSDP2 to a model from the outside.

The model stays plain PyTorch; this pass changes how it runs, never what it computes (float8 aside:
it rounds the matmuls' inputs; checkpoint_dtype bf16 the recomputed blocks' inputs), and keeps
parameter names (so checkpoints and the HF export see the same keys). Order matters: swap in the
float8 layers first (so the compiled blocks trace them and FSDP shards their weights), then chunk
each MLP, checkpoint and compile each block (with both, the checkpoint wraps the compiled forward),
move what the forward saves to host memory (offload_activations), then `fully_shard` each block and
finally the root.

For long sequences (bench/long_context.py), what a checkpointed step keeps is, per token: each
block's input (the float32 residual stream under autocast: layers x hidden x 4 bytes, 69 GB for the
1B at 512k tokens), the final norm's and the output head's saved tensors, and, inside the one block
being recomputed, the MLP's (T, intermediate) tensors. mlp_chunk_tokens bounds the last,
checkpoint_dtype halves the first, offload_activations moves the first two to host memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.lora import LoRALinear, is_nf4, keep_dequantized_weights
from train.config import ParallelConfig
from train.dist import DistInfo


def compute_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def build_mesh(cfg: ParallelConfig, dist: DistInfo):
    """1-D mesh (shard) for FSDP, or 2-D (replicate, shard) for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.world_size % cfg.dp_replicate:
        raise ValueError(
            f"parallel.dp_replicate={cfg.dp_replicate} does not divide the world size {dist.world_size}"
        )
    if cfg.dp_replicate == 1:
        return init_device_mesh(dist.device.type, (dist.world_size,), mesh_dim_names=("shard",))
    shape = (cfg.dp_replicate, dist.world_size // cfg.dp_replicate)
    return init_device_mesh(dist.device.type, shape, mesh_dim_names=("replicate", "shard"))


def parallelize(model: nn.Module, cfg: ParallelConfig, dist: DistInfo) -> nn.Module:
    """Float8 linear layers, chunked MLPs, activation checkpointing and compile per block, saved
    activations in host memory, then FSDP2 when there are several ranks. Call on the meta-device
    model, before `to_empty` and weight init or loading."""
    if cfg.checkpoint_dtype != "same" and not cfg.activation_checkpointing:
        raise ValueError(f"parallel.checkpoint_dtype={cfg.checkpoint_dtype} sets how checkpointed blocks keep their "
                         f"input: set parallel.activation_checkpointing true (or checkpoint_dtype same)")
    if cfg.float8:
        convert_to_float8(model, dist)
    pin_memory = dist.device.type == "cuda"
    keep_input = dict(dtype=torch.bfloat16 if cfg.checkpoint_dtype == "bf16" else None,
                      host=cfg.offload_activations, pin_memory=pin_memory)
    blocks = model.layers
    for block in blocks:
        if cfg.mlp_chunk_tokens:
            _chunk_mlp(block.mlp, cfg.mlp_chunk_tokens)
        if cfg.activation_checkpointing and cfg.compile:
            # The compiled forward inside the checkpoint, not the checkpoint inside the compiled
            # block: on an H200 (llama-3.2-1b, 8 x 2048, forward + backward) 46.2k tokens/s against
            # 37.9k, for 1.8 GiB more at the peak (bench/RESULTS.md).
            _checkpoint_block(block, torch.compile(block.forward), **keep_input)
        elif cfg.activation_checkpointing:
            _checkpoint_block(block, **keep_input)
        elif cfg.compile:
            block.compile()  # in place: parameter names are unchanged
    if cfg.offload_activations:
        _offload_saved_tensors(model, pin_memory)
    if not dist.distributed:
        return model

    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = build_mesh(cfg, dist)
    dtype = compute_dtype(cfg, dist.device)
    # fp32 compute means "no cast": parameters kept in another dtype (a LoRA base in bf16) compute
    # as stored, exactly as in a single process.
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    # The loops divide the loss by the global token count themselves, so the gradient must be
    # summed over ranks, not averaged as FSDP does by default.
    # Plain SUM reductions (no pre/post-multiply, which gloo lacks) with a divide factor of 1.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def convert_to_float8(model: nn.Module, dist: DistInfo) -> nn.Module:
    """Swap the linear layers for torchao's Float8Linear, in place: each matmul (forward, and both of
    backward) casts its operands to float8 with one scale per tensor from its current max (e4m3 for
    activations and weights, e5m2 for gradients) and accumulates in higher precision; parameters,
    their gradients and the optimizer state keep their dtype, and their names. On CPU the float8
    matmul is emulated (float8-rounded operands, float32 product), so tests run it without a GPU."""
    if any(isinstance(m, LoRALinear) for m in model.modules()) or any(is_nf4(p) for p in model.parameters()):
        raise ValueError("parallel.float8 trains plain nn.Linear layers in full; this model has LoRA adapters "
                         "or NF4 weights: set parallel.float8 false (or train without lora)")
    if dist.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dist.device)
        if (major, minor) < (8, 9):
            raise ValueError(f"parallel.float8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, "
                             f"Blackwell); {torch.cuda.get_device_name(dist.device)} is {major}.{minor}")
    # Imported here: importing torchao takes a second and prints warnings on machines without its kernels.
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # Under FSDP2 each weight is cast to float8 before its all-gather, so half of bf16's bytes cross
    # the network; its scale then needs the max over all shards, one small all-reduce per weight in
    # FSDP's pre-all-gather hook. (torchao's precompute_float8_dynamic_scale_for_fsdp would batch those
    # into one all-reduce after each optimizer step: a saving in latency, left out, as it would put a
    # float8 call into every loop's step.)
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=dist.distributed, emulate=dist.device.type != "cuda")
    return convert_to_float8_training(model, config=config, module_filter_fn=_float8_eligible)


def _float8_eligible(linear: nn.Linear, name: str) -> bool:
    """The output head stays in high precision (float8 logits cost accuracy where the loss is made, and
    the loss reads its weight directly, never calling it); the float8 matmul (torch._scaled_mm) needs
    both sizes to be multiples of 16."""
    return name != "lm_head" and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def _checkpoint_block(block: nn.Module, forward=None, dtype: torch.dtype | None = None, host: bool = False,
                      pin_memory: bool = False) -> None:
    """Recompute the block's forward (or `forward`, its compiled version) during backward. Wrapping
    the bound forward (rather than the module) keeps parameter names, and FSDP's hooks on the block
    still fire. The checkpoint keeps the block's input x until then: in `dtype` (None: as it is) and,
    with `host`, in host memory (_keep_input)."""
    forward = forward or block.forward

    def checkpointed_forward(x, *args, **kwargs):
        with _keep_input(x, dtype, host, pin_memory):
            return checkpoint(forward, x, *args, use_reentrant=False, context_fn=_checkpoint_contexts, **kwargs)

    block.forward = checkpointed_forward


def _checkpoint_contexts():
    """Contexts of a checkpointed forward, its first run and its recompute: QLoRA's NF4 layers save
    the weights they dequantize for backward. The first run's saved tensors are dropped (that is what
    checkpointing does), and the recompute's, one block's weights at full size, live until that
    block's backward, which then needs no third dequantization (model/lora.py: keep_dequantized_weights).
    Both runs alike: checkpointing matches what the recompute saves to what the first run saved."""
    return keep_dequantized_weights(), keep_dequantized_weights()


def _keep_input(x: Tensor, dtype: torch.dtype | None, host: bool, pin_memory: bool):
    """Saved-tensor hooks under which a block's checkpoint keeps its input x for the recompute: in
    `dtype` and/or in host memory, given back in x's dtype on x's device. Non-reentrant checkpoint
    saves its inputs through the hooks active around the call (inside the call its own hooks keep
    nothing), so these see x, the RoPE tables and the mask, and change only x: the others are one
    tensor shared by every block. x in bf16 changes the recompute that backward differentiates,
    never the forward's loss."""
    if dtype is None and not host:
        return contextlib.nullcontext()
    key = id(x)  # not x: the hooks live as long as the saved input, and must not keep the original alive

    def pack(t: Tensor):
        if id(t) != key:
            return t
        stored = t.to(dtype) if dtype is not None else t
        if host:  # as torch.autograd.graph.save_on_cpu copies
            stored = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=pin_memory).copy_(
                stored, non_blocking=pin_memory)
        return stored, t.dtype, t.device

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        stored, original_dtype, device = packed
        return stored.to(device, non_blocking=True).to(original_dtype)  # across in bf16, then widened

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _chunk_mlp(mlp: nn.Module, chunk_tokens: int) -> None:
    """Run the MLP over chunk_tokens tokens at a time, each chunk checkpointed: its (n, intermediate)
    tensors (gate, up, their product) are dropped after the chunk's forward and recomputed in its
    backward, so those of one chunk exist at a time instead of the whole sequence's (34 GB for the
    1B at 512k tokens), for one more MLP forward (little beside attention at such lengths). The MLP
    treats each token on its own, so the result is the same. Inside a checkpointed block this runs
    again in the block's recompute, nested; inside a compiled block the compiler recomputes each
    chunk (torch.compile keeps checkpoint regions)."""
    forward = mlp.forward

    def chunked_forward(x: Tensor) -> Tensor:
        tokens = x.flatten(0, -2)  # (B*T, C)
        # Eager, each chunk's checkpoint enters _checkpoint_contexts for both of its runs, as a block's
        # does. Inside a compiled block a checkpoint takes no such contexts: the block's graph was traced
        # under its own checkpoint's, which then hold for the chunks too.
        contexts = {} if torch.compiler.is_compiling() else {"context_fn": _checkpoint_contexts}
        parts = [checkpoint(forward, part, use_reentrant=False, **contexts) for part in tokens.split(chunk_tokens)]
        return torch.cat(parts).view(*x.shape[:-1], -1)  # (B, T, C)

    mlp.forward = chunked_forward


def _offload_saved_tensors(model: nn.Module, pin_memory: bool) -> None:
    """Keep what the model's forward saves for backward in host memory (torch.autograd.graph.save_on_cpu:
    copied out as it is saved, back to the GPU when backward needs it; pinned on CUDA, so the copies run
    asynchronously). With activation checkpointing that is each block's input (moved by the block's own
    hooks, _keep_input) and what the final norm and output head save; without it, every activation.
    Wraps the bound forward, so the loops call the model as before and parameter names are unchanged."""
    forward = model.forward

    @functools.wraps(forward)
    def offloaded_forward(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
            return forward(*args, **kwargs)

    model.forward = offloaded_forward


def forward_only(cfg: ParallelConfig) -> ParallelConfig:
    """The settings for a model that only runs forward, without gradients (a reference policy): what
    keeps activations for backward (checkpointing, and how checkpoints keep their inputs) is off."""
    return dataclasses.replace(cfg, activation_checkpointing=False, checkpoint_dtype="same", offload_activations=False)


def freeze_in_compute_dtype(model: nn.Module, cfg: ParallelConfig, dist: DistInfo) -> nn.Module:
    """Freeze a model that is only run forward (a reference policy) and, in a single process under
    autocast, store its linear layers' weights in the compute dtype: autocast casts them to it on
    every forward anyway, so the model computes bit for bit the same in half their memory, and no
    cast runs per forward. Embeddings and norms stay as they are (autocast runs those in float32).
    Sharded models are left as they are: FSDP2's policy casts what it gathers."""
    model.requires_grad_(False).eval()
    dtype = compute_dtype(cfg, dist.device)
    if dtype != torch.float32 and not dist.distributed:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
    return model


def autocast(cfg: ParallelConfig, dist: DistInfo):
    """Mixed precision for a single process (FSDP2's policy does it when sharded)."""
    dtype = compute_dtype(cfg, dist.device)
    enabled = dtype != torch.float32 and not dist.distributed
    return torch.autocast(dist.device.type, dtype=dtype, enabled=enabled)
