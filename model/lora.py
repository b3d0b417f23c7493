"""LoRA as a module swap: targeted nn.Linear layers become LoRALinear, everything else is frozen.

    apply_lora(model, ["q_proj", "v_proj"], r=16, alpha=32)   # or "all-linear"
    quantize_base_nf4(model)                                    # optional: QLoRA
    freeze_base(model, LoRAConfig(quantize="nf4"), device)      # the two above from a loop's `lora:` section
    with disable_lora(model): ref_logits = model(ids)           # DPO / GRPO reference model
    merge_lora(model); save_hf(model, "out")                    # plain model again

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): y = x W^T + b + (alpha / r) x A^T B^T, with
A (r, in) random and B (out, r) zero, so training starts from the base model. rsLoRA (Kalajdzievski
2023, https://arxiv.org/abs/2312.03732) scales by alpha / sqrt(r) instead. QLoRA (Dettmers et al.
2023, https://arxiv.org/abs/2305.14314) stores the frozen W as 4-bit NormalFloat (torchao's NF4Tensor).

LoRALinear holds `weight` and `bias` itself rather than wrapping the old module, so the base keys
(`layers.0.self_attn.q_proj.weight`) are unchanged and checkpoints/hf.py's key table still applies;
the adapters add `...q_proj.lora_A` and `...q_proj.lora_B`. Deliberately left out: DoRA, LoRA on
embeddings or lm_head, per-layer ranks, several named adapters at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor, distribute_tensor = (), None

# The linear layers LoRA may target, named as in HF Llama, so PEFT configs read the same.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Where torchao keeps NF4Tensor, to_nf4 and linear_nf4: newer releases (0.18 here) moved the module
# under quantization/ (and re-export NF4Tensor and to_nf4, but not linear_nf4, from
# torchao.quantization); older ones, the releases torchtune's QLoRA was written against, have
# torchao.dtypes.nf4tensor.
_NF4_MODULES = (
    "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
    "torchao.dtypes.nf4tensor",
)


@dataclass
class LoRAConfig:
    """The `lora:` section of every fine-tuning loop: which layers get adapters, their shape, and
    how the frozen base is stored (absent or null in a config: full fine-tuning)."""

    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Projection names as in PEFT (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or all-linear."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    use_rslora: bool = False
    """rsLoRA scaling alpha / sqrt(r)."""
    quantize: Literal["none", "nf4"] = "none"
    """nf4: store the frozen base as torchao NF4 (QLoRA)."""
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Storage of the frozen base: auto is bf16 on GPU, fp32 on CPU (NF4 always dequantizes to bf16)."""
    nf4_block_size: int = 64
    """NF4: weights per quantization block (a weight's size must divide into them)."""
    nf4_scaler_block_size: int = 256
    """NF4: blocks per group of double-quantized block scales."""
    merge: bool = False
    """Also export the merged full model to final/merged/."""


@functools.cache
def torchao_nf4():
    """torchao's NF4 module. Imported on first use only: importing torchao takes seconds, and
    plain LoRA does not need it. Never call it in a forward: torch.compile traces through the cache
    into import_module, and the graph breaks there."""
    tried = []
    for name in _NF4_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            tried.append(f"{name} ({e})")
            continue
        if all(hasattr(mod, attr) for attr in ("NF4Tensor", "to_nf4", "linear_nf4")):
            return mod
        tried.append(f"{name} (lacks NF4Tensor, to_nf4 or linear_nf4)")
    raise ImportError("QLoRA needs torchao's NF4 tensor (pip install torchao); tried: " + "; ".join(tried))


def is_nf4(t: Tensor) -> bool:
    """True for a torchao NF4Tensor. Checks the class name, so plain LoRA never imports torchao,
    and torch.compile guards on the tensor's type alone (a sys.modules lookup here made it guard
    on the number of imported modules and recompile whenever that changed)."""
    return type(t).__name__ == "NF4Tensor"


# ----------------------------------------------------------------------------- the NF4 matmul


# Set inside activation-checkpointed blocks (keep_dequantized_weights): see nf4_linear.
_keep_dequantized = False


@contextlib.contextmanager
def keep_dequantized_weights():
    """While active, an NF4 layer saves the weight it dequantized in forward for its backward, instead
    of dequantizing it again there. For activation-checkpointed blocks (train/parallel.py enters it
    for both runs of each checkpointed forward): the first run's saved tensors are dropped anyway, and
    the recompute's, one block's weights at full size, are freed after that block's backward. Each
    NF4 weight is then dequantized twice a step with checkpointing (forward, recompute), as without
    it (forward, backward)."""
    global _keep_dequantized
    before, _keep_dequantized = _keep_dequantized, True
    try:
        yield
    finally:
        _keep_dequantized = before


def nf4_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ W^T for a torchao NF4Tensor W (out, in), which gets no gradient. W is dequantized in
    forward and again in backward for x's gradient, so backward keeps only the NF4 tensor's own
    4-bit data and scales, never W at full size (inside checkpointed blocks, keep_dequantized_weights:
    the recompute's W serves backward instead). Each direction is one opaque op, so a compiled block
    stays one graph around it. torchao's linear_nf4 also dequantizes twice, but traced by torch.compile its two
    dequantizations of the same inputs merge into one, and the partitioner then keeps that bf16 W
    for backward (it never recomputes what a matmul reads there). The price: inductor does not fuse
    the dequantization, which runs as a few eager ops inside the op. Under autocast x is cast to the
    autocast dtype, as F.linear's input would be."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if _keep_dequantized:  # the dequantized W is saved by F.linear for x's gradient (an opaque op makes
        # it: compiled, the partitioner could otherwise choose to redo the dequantization in backward)
        return F.linear(x, _nf4_dequantized(*_nf4_parts(weight), dtype=x.dtype))
    return _nf4_matmul(x, *_nf4_parts(weight), transposed=True)


def _nf4_parts(w: Tensor) -> tuple:
    """What an NF4Tensor holds (plain tensors and ints), in nf4_dequantize's argument order."""
    return (w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4,
            w.block_size, w.scaler_block_size, list(w.shape))


def nf4_dequantize(
    quantized_data: Tensor,
    quantized_scalers: Tensor,
    quantization_factor: Tensor,
    scaler_mean: Tensor,
    levels: Tensor,
    block_size: int,
    scaler_block_size: int,
    shape: list[int],
) -> Tensor:
    """The weight an NF4Tensor stores, bit for bit what torchao's get_original_weight returns (a
    test checks), in fewer passes over it: each byte holds two 4-bit level indices (the first in its
    high nibble), so one lookup in a 256-row table of level pairs decodes both; each block of
    block_size weights is then scaled by its absmax, itself stored as int8 around the mean absmax,
    with one factor per scaler_block_size blocks (double quantization)."""
    scales = (quantized_scalers.view(-1, scaler_block_size) / quantization_factor[:, None]).flatten()
    scales = scales.to(levels.dtype) + scaler_mean  # (n_blocks,)
    pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=-1)  # (256, 2): byte -> 2 levels
    values = pairs[quantized_data.int()].view(-1, block_size)  # (n_blocks, block_size)
    return (values * scales[:, None]).view(shape)


@torch.library.custom_op("handloom::nf4_matmul", mutates_args=())
def _nf4_matmul(
    a: Tensor,
    quantized_data: Tensor,
    quantized_scalers: Tensor,
    quantization_factor: Tensor,
    scaler_mean: Tensor,
    levels: Tensor,
    block_size: int,
    scaler_block_size: int,
    shape: list[int],
    transposed: bool,
) -> Tensor:
    """a @ W^T (transposed: the forward) or a @ W (x's gradient), W dequantized in a's dtype."""
    w = nf4_dequantize(quantized_data, quantized_scalers, quantization_factor, scaler_mean, levels,
                       block_size, scaler_block_size, shape).to(a.dtype)
    return F.linear(a, w) if transposed else a @ w


@torch.library.custom_op("handloom::nf4_dequantized", mutates_args=())
def _nf4_dequantized(
    quantized_data: Tensor,
    quantized_scalers: Tensor,
    quantization_factor: Tensor,
    scaler_mean: Tensor,
    levels: Tensor,
    block_size: int,
    scaler_block_size: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """nf4_dequantize as one opaque op, in `dtype` (a fresh tensor: a custom op's output may not alias its inputs)."""
    w = nf4_dequantize(quantized_data, quantized_scalers, quantization_factor, scaler_mean, levels, block_size,
                       scaler_block_size, shape)
    return w.to(dtype, copy=True)


@_nf4_dequantized.register_fake
def _(quantized_data, quantized_scalers, quantization_factor, scaler_mean, levels, block_size, scaler_block_size,
      shape, dtype):
    return quantized_data.new_empty(shape, dtype=dtype)


@_nf4_matmul.register_fake
def _(a, quantized_data, quantized_scalers, quantization_factor, scaler_mean, levels, block_size,
      scaler_block_size, shape, transposed):
    return a.new_empty(*a.shape[:-1], shape[0] if transposed else shape[1])


def _nf4_matmul_setup(ctx, inputs, output):
    # Only the NF4 tensor's parts: W's gradient is never needed, so x is not kept either.
    ctx.save_for_backward(*inputs[1:6])
    ctx.sizes, ctx.transposed = inputs[6:9], inputs[9]


def _nf4_matmul_backward(ctx, grad):
    # d(a W^T)/da is grad @ W, and d(a W)/da is grad @ W^T.
    grad_a = _nf4_matmul(grad, *ctx.saved_tensors, *ctx.sizes, transposed=not ctx.transposed)
    return (grad_a,) + (None,) * 9


_nf4_matmul.register_autograd(_nf4_matmul_backward, setup_context=_nf4_matmul_setup)


class LoRALinear(nn.Module):
    """A frozen linear layer (weight, optional bias; weight may be NF4) plus a trainable
    low-rank update lora_B @ lora_A, scaled by alpha / r (or alpha / sqrt(r) with rsLoRA)."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.weight = weight
        self.bias = bias
        # Allocated on the base weight's device (meta included) and dtype; NF4 weights report the
        # dtype they dequantize to. Values come from init_lora_weights or a checkpoint.
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # the update has been added into weight
        self.disabled = False  # set by disable_lora(): behave as the base layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, **lora) -> "LoRALinear":
        # The same Parameter objects move over, so nothing is copied and a meta model stays meta.
        return cls(linear.weight, linear.bias, **lora)

    def forward(self, x: Tensor) -> Tensor:
        if is_nf4(self.weight):
            out = nf4_linear(x, self.weight)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        else:
            out = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return out
        # Adapters may be kept in a wider dtype than the activations (float32 adapters over a bf16
        # base), so the input is cast to theirs and the update back, as PEFT does.
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """scaling * B @ A, (out, in), in float32."""
        return lora_delta(self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into weight (rounded to weight's dtype), so forward is one matmul."""
        if self.merged:
            return
        if is_nf4(self.weight):
            raise ValueError("cannot merge into an NF4 weight in place; merge_lora(model) dequantizes instead")
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again. In bf16 the round trip is not bit-exact."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        nf4 = ", nf4" if is_nf4(self.weight) else ""
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, r={self.r}, "
                f"alpha={self.alpha}, rslora={self.use_rslora}{nf4}, merged={self.merged}")


def lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """What an adapter adds to its weight: scaling * B @ A, (out, in), in float32."""
    return (lora_B.float() @ lora_A.float()) * scaling


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def target_module_names(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the linear layers `targets` selects, matched as PEFT does: a target is a leaf name
    (q_proj) or any dotted tail of a module name (layers.0.self_attn.q_proj). "all-linear" is every
    projection inside the blocks; the output layer is never a target (PEFT's rule too)."""
    candidates = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, LoRALinear)) and n.rpartition(".")[2] in LORA_TARGETS]
    if isinstance(targets, str):
        targets = [targets]
    if "all-linear" in targets:  # a config list may name it too
        return candidates
    chosen = set()
    for t in targets:
        hits = [n for n in candidates if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"LoRA target {t!r} matches no layer; valid targets: "
                             f"{', '.join(LORA_TARGETS)} (or dotted names ending in one), or 'all-linear'")
        chosen.update(hits)
    return [n for n in candidates if n in chosen]


def apply_lora(
    model: nn.Module,
    targets: list[str] | str,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Swap the targeted nn.Linear layers for LoRALinear in place and freeze all but the adapters.
    On a materialised model the adapters are initialised at once; on a meta model call
    init_lora_weights after to_empty (and after loading base weights: GPT.init_weights would draw
    the adapters as ordinary weights)."""
    for name in target_module_names(model, targets):
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        model.set_submodule(name, LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout,
                                                         use_rslora=use_rslora))
    mark_only_lora_trainable(model)
    if not any(p.is_meta for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)):
        init_lora_weights(model, seed)
    return model


def mark_only_lora_trainable(model: nn.Module) -> int:
    """requires_grad on lora_A / lora_B only; returns the number of trainable elements."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
        n += p.numel() if p.requires_grad else 0
    return n


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int = 0) -> None:
    """PEFT's default init, adapters only: A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in),
    1/sqrt(in)), and B = 0. Each A draws from its own generator seeded by (seed, index), so the
    values are the same whole or sharded, as in GPT.init_weights."""
    for i, (_, m) in enumerate(lora_modules(model)):
        _uniform_(m.lora_A, 1.0 / math.sqrt(m.in_features), seed * 100_003 + i)
        m.lora_B.zero_()
        m.merged = False


def _uniform_(p: Tensor, bound: float, seed: int) -> None:
    """U(-bound, bound). A sharded (DTensor) parameter draws the full tensor and keeps its shard."""
    full = p.full_tensor() if isinstance(p, DTensor) else p
    gen = torch.Generator(device=full.device).manual_seed(seed)
    values = torch.empty(full.shape, dtype=torch.float32, device=full.device)
    values.uniform_(-bound, bound, generator=gen)
    if isinstance(p, DTensor):
        values = distribute_tensor(values, p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(values.to(p.dtype))


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Inside the block every LoRALinear returns its base output: the frozen reference policy of
    DPO / GRPO without a second copy of the weights."""
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules):
        raise ValueError("disable_lora on a merged model: unmerge first (the base weights are overwritten)")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear layers back, in place, so the
    model saves with checkpoints.hf.save_hf. NF4 weights are dequantized to their original dtype."""
    for name, m in list(lora_modules(model)):
        weight = m.weight
        if is_nf4(weight):
            weight = weight.get_original_weight()
        weight = weight.detach()
        if not m.merged:
            weight = (weight.float() + m.delta_weight()).to(weight.dtype)
        # Built on meta and then handed the merged tensors, so nothing is allocated twice.
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if m.bias is not None:
            linear.bias = m.bias
        model.set_submodule(name, linear)
    for m in model.modules():  # layers quantize_base_nf4(all_linear=True) reached without an adapter
        if isinstance(m, nn.Linear) and is_nf4(m.weight):
            m.weight = nn.Parameter(m.weight.get_original_weight(), requires_grad=False)
    return model


@torch.no_grad()
def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only, as full CPU tensors under native names (`layers.0.self_attn.q_proj.lora_A`).
    On a sharded model every rank must call it (DTensors are gathered)."""
    out = {}
    for name, m in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            t = getattr(m, part)
            # .cpu() also waits for the all-gather behind full_tensor(): a rank that never reads
            # its copy would otherwise leave the collective pending at process-group teardown.
            out[f"{name}.{part}"] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
    return out


@torch.no_grad()
def quantize_base_nf4(
    model: nn.Module,
    block_size: int = 64,
    scaler_block_size: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    all_linear: bool = False,
) -> nn.Module:
    """QLoRA: store the frozen base weights of the LoRA layers (with all_linear, of every linear
    layer inside the blocks) as NF4, in place. Each weight is first cast to `dtype`, the dtype it
    dequantizes to in the matmul. Each weight's numel must divide into blocks of block_size, and
    its number of blocks into groups of scaler_block_size (the double-quantized block scales).
    Cast the model (model.to(dtype)) before this, not after: Tensor.to(dtype) dequantizes NF4."""
    nf4 = torchao_nf4()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) or (all_linear and isinstance(m, nn.Linear)
                                          and name.rpartition(".")[2] in LORA_TARGETS):
            if is_nf4(m.weight):
                continue
            numel = m.weight.numel()
            if numel % block_size or (numel // block_size) % scaler_block_size:
                raise ValueError(
                    f"{name}.weight {tuple(m.weight.shape)}: {numel} elements do not split into blocks of "
                    f"{block_size} in groups of scaler_block_size={scaler_block_size}; choose smaller sizes"
                )
            q = nf4.to_nf4(m.weight.detach().to(dtype).contiguous(), block_size, scaler_block_size)
            # A plain nn.Linear still works: torchao routes F.linear on an NF4Tensor to linear_nf4
            # (which, compiled, keeps the dequantized weight for backward: see nf4_linear).
            m.weight = nn.Parameter(q, requires_grad=False)
    return model


@torch.no_grad()
def freeze_base(model: nn.Module, cfg: LoRAConfig, device: torch.device) -> int:
    """After the base weights are loaded: store the frozen base in its dtype (bf16 on GPU: no fp32
    master copy is needed for weights that never update) or as NF4 (QLoRA), keep the adapters
    float32, and leave only the adapters trainable. Returns the number of trainable elements."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.base_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.quantize == "nf4":
        dtype = torch.bfloat16
    for name, p in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):
            p.data = p.data.to(dtype)
    if cfg.quantize == "nf4":
        quantize_base_nf4(model, cfg.nf4_block_size, cfg.nf4_scaler_block_size, dtype=dtype)
    return mark_only_lora_trainable(model)
