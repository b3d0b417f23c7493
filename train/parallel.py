"""Applies float8 linear layers, activation checkpointing, torch.compile and FSDP2 to a model from the outside.

The model stays plain PyTorch; this pass changes how it runs, never what it computes (float8 aside:
it rounds the matmuls' inputs), and keeps parameter names (so checkpoints and the HF export see the
same keys). Order matters: swap in the float8 layers first (so the compiled blocks trace them and
FSDP shards their weights), then checkpoint and compile each block (with both, the checkpoint wraps
the compiled forward), then `fully_shard` each block and finally the root.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.lora import LoRALinear, is_nf4
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
    """Float8 linear layers, activation checkpointing and compile per block, then FSDP2 when there are
    several ranks. Call on the meta-device model, before `to_empty` and weight init or loading."""
    if cfg.float8:
        convert_to_float8(model, dist)
    blocks = model.layers
    for block in blocks:
        if cfg.activation_checkpointing and cfg.compile:
            # The compiled forward inside the checkpoint, not the checkpoint inside the compiled
            # block: on an H200 (llama-3.2-1b, 8 x 2048, forward + backward) 46.2k tokens/s against
            # 37.9k, for 1.8 GiB more at the peak (bench/RESULTS.md).
            _checkpoint_block(block, torch.compile(block.forward))
        elif cfg.activation_checkpointing:
            _checkpoint_block(block)
        elif cfg.compile:
            block.compile()  # in place: parameter names are unchanged
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


def _checkpoint_block(block: nn.Module, forward=None) -> None:
    """Recompute the block's forward (or `forward`, its compiled version) during backward. Wrapping
    the bound forward (rather than the module) keeps parameter names, and FSDP's hooks on the block
    still fire."""
    forward = forward or block.forward

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


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
