"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

    save_peft_adapter(model, "out/adapter", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    load_peft_adapter(model, "out/adapter")   # applies LoRA first if the model has none

The directory loads with `peft.PeftModel.from_pretrained(base, "out/adapter")` and vLLM's LoRA
support. PEFT names tensors `base_model.model.<HF module>.lora_A.weight`; the HF module name comes
from checkpoints/hf.py's key table, so there is one table. Base weights (NF4 or not) are never
written. PEFT features this loader does not implement (DoRA, trained biases, modules_to_save,
per-layer ranks, ...) raise an error naming the field instead of loading something else.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoints.hf import _replace_dir, _write_json, native_to_hf_key, read_json
from model.lora import LORA_TARGETS, apply_lora, lora_modules, lora_state_dict, target_module_names

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor, distribute_tensor = (), None

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

# adapter_config.json fields whose non-default values change the math or the tensors we would
# need; each maps to the values that mean "feature off".
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none",),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "exclude_modules": (None, [], ""),
    "fan_in_fan_out": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
    "megatron_config": (None,),
}
# Inits that rewrite the base weights too (PiSSA, OLoRA, CorDA, LoftQ): the adapter only makes
# sense on that modified base, which we do not have.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def _hf_module_name(native_module: str, model_type: str) -> str:
    hf = native_to_hf_key(native_module + ".weight", model_type)
    if hf is None:
        raise ValueError(f"no Hugging Face name for {native_module}.weight (model_type {model_type})")
    return hf.removesuffix(".weight")


def _peft_key(native_key: str, model_type: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    module, _, part = native_key.rpartition(".")
    return f"{PREFIX}{_hf_module_name(module, model_type)}.{part}.weight"


def save_peft_adapter(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
) -> Path:
    """Write the adapters of `model` as a PEFT LoRA directory; it appears only when complete.
    r, alpha, dropout and rsLoRA are read from the LoRA layers themselves. `state_dict` (from
    model.lora.lora_state_dict, gathered on every rank) lets rank 0 alone write a sharded model."""
    model_type = model.config.model_type
    modules = dict(lora_modules(model))
    if not modules:
        raise ValueError("the model has no LoRA layers to save")
    settings = {(m.r, m.alpha, m.use_rslora, getattr(m.dropout, "p", 0.0)) for m in modules.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (r, alpha, rslora, dropout): {sorted(settings)}; "
                         "PEFT's rank_pattern is not written here")
    (r, alpha, use_rslora, dropout), = settings
    if any(m.merged for m in modules.values()):
        raise ValueError("the adapters are merged into the base weights; unmerge before saving them")

    # A leaf name when every layer of that kind has an adapter (as PEFT writes), otherwise the
    # full module names, which PEFT matches exactly.
    targets = []
    candidates = target_module_names(model, "all-linear")
    for leaf in LORA_TARGETS:
        of_kind = [n for n in candidates if n.rpartition(".")[2] == leaf]
        wrapped = [n for n in of_kind if n in modules]
        if wrapped and wrapped == of_kind:
            targets.append(leaf)
        else:
            targets += [_hf_module_name(n, model_type) for n in wrapped]

    state = state_dict if state_dict is not None else lora_state_dict(model)
    tensors = {_peft_key(k, model_type): v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "use_rslora": use_rslora,
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    _write_json(tmp / CONFIG_FILE, config)
    if tokenizer is not None:  # a model.tokenizer.Tokenizer: its files, chat template included
        tokenizer.save(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def export_lora(model: torch.nn.Module, out_dir: str | os.PathLike, base_dir: str | os.PathLike | None,
                tokenizer=None, merge: bool = False, base_name: str | None = None) -> Path:
    """The adapters of a live (maybe sharded) model as a PEFT directory; with `merge`, also
    out_dir/merged/, the base from `base_dir` with the written adapter folded in (rebuilt on CPU
    from the files, which also checks the adapter export). Call on every rank; rank 0 writes."""
    import torch.distributed as dist

    adapters = lora_state_dict(model)  # gathered on every rank when sharded
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_peft_adapter(model, out_dir, base_model_name_or_path=base_name or (str(base_dir) if base_dir else None),
                          state_dict=adapters, tokenizer=tokenizer)
        if merge:
            from checkpoints.hf import load_hf, save_hf
            from model.lora import merge_lora

            if base_dir is None:
                raise ValueError("lora.merge needs the base model's checkpoint directory")
            merged = load_peft_adapter(load_hf(base_dir), out_dir)
            save_hf(merge_lora(merged), Path(out_dir) / "merged", tokenizer=tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir)


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked: LoRA only, and no feature this loader would silently drop."""
    path = adapter_dir / CONFIG_FILE
    cfg = read_json(path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type {cfg['task_type']!r} is not supported; only CAUSAL_LM")
    for field, off in _UNSUPPORTED.items():
        if field in cfg and cfg[field] not in off:
            raise ValueError(f"{path}: unsupported {field}={cfg[field]!r} (only {off[0]!r} is implemented)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} rewrites the base weights; "
                         "convert the adapter to plain LoRA with PEFT first")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"{path}: target_modules as a regular expression ({targets!r}) is not supported; "
                         "list the module names")
    if not targets:
        raise ValueError(f"{path}: no target_modules")
    return cfg


def _resolve_targets(model: torch.nn.Module, targets: list[str] | str, source: Path) -> list[str]:
    """Native names of the layers PEFT's target_modules select, matched against HF module names
    the way PEFT matches them (exact name or dotted tail)."""
    candidates = target_module_names(model, "all-linear")
    if targets == "all-linear":
        return candidates
    hf_names = {n: _hf_module_name(n, model.config.model_type) for n in candidates}
    chosen = set()
    for t in targets:
        hits = [n for n, hf in hf_names.items() if hf == t or hf.endswith("." + t)]
        if not hits:
            raise ValueError(f"{source}: target module {t!r} matches no layer LoRA can wrap here "
                             f"({', '.join(LORA_TARGETS)})")
        chosen.update(hits)
    return [n for n in candidates if n in chosen]


@torch.no_grad()
def load_peft_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> torch.nn.Module:
    """Load a PEFT LoRA adapter into `model`, in place. Without adapters yet, LoRA is first applied
    with the file's r, alpha, dropout, targets and rsLoRA; with adapters, they must match it.
    Unknown or missing tensors raise an error naming them."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    model_type = model.config.model_type
    names = _resolve_targets(model, cfg["target_modules"], adapter_dir / CONFIG_FILE)
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    use_rslora = bool(cfg.get("use_rslora", False))
    existing = dict(lora_modules(model))
    if not existing:
        apply_lora(model, names, r=r, alpha=alpha, dropout=cfg.get("lora_dropout", 0.0), use_rslora=use_rslora)
    else:
        if sorted(existing) != sorted(names):
            raise ValueError(f"{adapter_dir}: the model's LoRA layers differ from the adapter's target_modules")
        bad = [n for n, m in existing.items() if (m.r, m.alpha, m.use_rslora) != (r, alpha, use_rslora)]
        if bad:
            raise ValueError(f"{adapter_dir}: r={r}, lora_alpha={alpha}, use_rslora={use_rslora} differ from "
                             f"the model's LoRA layers ({', '.join(bad[:3])}...)")

    params = {}
    for name, m in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            params[_peft_key(f"{name}.{part}", model_type)] = getattr(m, part)
    file = adapter_dir / WEIGHTS_FILE
    if not file.exists():
        pickles = [p.name for p in adapter_dir.glob("*.bin")]
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"{file}: not found{hint}")
    seen, unknown = set(), []
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in params:
                    unknown.append(key)
                    continue
                tensor, target = f.get_tensor(key), params[key]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(target.shape)}")
                tensor = tensor.to(target.device, target.dtype)
                if isinstance(target, DTensor):
                    tensor = distribute_tensor(tensor, target.device_mesh, target.placements, src_data_rank=None)
                target.copy_(tensor)
                seen.add(key)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    missing = sorted(set(params) - seen)
    if unknown or missing:
        lines = [f"{file}: adapter does not match the model's LoRA layers"]
        if missing:
            lines.append("missing tensors: " + ", ".join(missing))
        if unknown:
            lines.append("unexpected tensors: " + ", ".join(unknown))
        raise ValueError("\n".join(lines))
    return model
