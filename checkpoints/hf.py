"""Hugging Face format <-> native model: config.json, safetensors (one file or sharded), tokenizer.

    model = load_hf("path/or/org-name/repo-id", device="cpu", dtype=torch.bfloat16)
    save_hf(model, "out/final", tokenizer=Tokenizer.from_dir("path/of/the/source"))
    export_hf(model, "out/final", tokenizer)     # the same from a sharded model, on every rank

One key table per family maps HF names to ours; the inverse is derived from it. Weights are read
through safetensors' memory map and assigned into a model built on the meta device, so loading
never holds a second full copy. Nothing here unpickles a file or runs code shipped with a model.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoints.download import resolve_checkpoint
from model.config import ModelConfig
from model.files import read_json
from model.gpt import GPT
from model.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Files fetched from the Hub: weights, configs and tokenizer files. Never *.bin / *.pt pickles,
# never *.py modeling code.

# HF key -> native key. `{}` stands for the layer index.
_COMMON_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}
_BIAS_KEYS = {
    f"model.layers.{{}}.self_attn.{p}_proj.bias": f"layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"
}
_QK_NORM_KEYS = {
    f"model.layers.{{}}.self_attn.{p}_norm.weight": f"layers.{{}}.self_attn.{p}_norm.weight" for p in "qk"
}
KEY_TABLES = {
    "llama": _COMMON_KEYS | _BIAS_KEYS,  # bias present only when attention_bias
    "mistral": _COMMON_KEYS,
    "qwen2": _COMMON_KEYS | _BIAS_KEYS,
    "qwen3": _COMMON_KEYS | _BIAS_KEYS | _QK_NORM_KEYS,
}
# Tensors some checkpoints carry that hold nothing we need (derived or duplicated).
_IGNORED_HF_KEYS = re.compile(r"(.*rotary_emb\.inv_freq$)")


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


def _translate(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, dst in rules:
        m = pattern.match(key)
        if m:
            return dst.replace("{}", m.group(1)) if m.groups() else dst
    return None


@functools.lru_cache(maxsize=None)
def _rules(model_type: str, to_hf: bool) -> list[tuple[re.Pattern, str]]:
    """The compiled key table of a family, HF -> native or (derived) native -> HF."""
    table = KEY_TABLES[model_type]
    return _compile({dst: src for src, dst in table.items()} if to_hf else table)


def hf_to_native_key(key: str, model_type: str) -> str | None:
    return _translate(key, _rules(model_type, to_hf=False))


def native_to_hf_key(key: str, model_type: str) -> str | None:
    return _translate(key, _rules(model_type, to_hf=True))


# ----------------------------------------------------------------------------- config.json


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a config.json dict. Fields that would change the math and that we do not
    implement raise an error naming the field, rather than being silently ignored."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    def unsupported(field: str, value, why: str):
        raise ValueError(f"{source}: unsupported {field}={value!r} ({why})")

    def required(field: str) -> int:
        value = hf.get(field)
        if field not in hf:
            raise ValueError(f"{source}: missing required field {field}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{source}: field {field} must be a positive integer, got {value!r}")
        return value

    if hf.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", hf["hidden_act"], "only silu (SwiGLU) is implemented")
    if hf.get("mlp_bias", False):
        unsupported("mlp_bias", True, "MLP projections have no bias here")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
        unsupported("use_sliding_window", True, "per-layer sliding windows are not implemented")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        unsupported("layer_types", sorted(set(layer_types)), "only full_attention layers are implemented")

    # transformers 5 nests rope settings under rope_parameters; older files use the flat fields.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = hf.get("rope_scaling")
    if rope_type not in (None, "default"):
        scaling = rope
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            unsupported("rope_scaling.rope_type", kind, "supported: llama3 or none")
        else:
            fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in fields if k not in scaling]
            if missing:
                raise ValueError(f"{source}: llama3 rope scaling lacks {', '.join(missing)}")
            scaling = {"rope_type": "llama3", **{k: scaling[k] for k in fields}}

    if model_type == "qwen2":
        bias = True  # Qwen2 always has q/k/v bias; the field is absent from its config.json
    else:
        bias = bool(hf.get("attention_bias", False))
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    heads = required("num_attention_heads")
    known = {
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
        "attention_bias", "sliding_window", "bos_token_id", "eos_token_id", "hidden_act", "mlp_bias",
        "use_sliding_window", "layer_types", "architectures", "torch_dtype", "dtype",
        "transformers_version",
    }
    return ModelConfig(
        model_type=model_type,
        vocab_size=required("vocab_size"),
        hidden_size=required("hidden_size"),
        intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or required("hidden_size") // heads,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bias,
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        extra_hf={k: v for k, v in hf.items() if k not in known},
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for transformers and vLLM. Uses the flat rope_theta / rope_scaling fields,
    which every transformers version and vLLM read."""
    hf = dict(cfg.extra_hf)
    hf.update(
        architectures=[ARCHITECTURES[cfg.model_type]],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "llama":
        hf["mlp_bias"] = False
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    return hf


# ----------------------------------------------------------------------------- locating files


def weight_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object")
        names = sorted(set(weight_map.values()))
        files = [ckpt_dir / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    single = ckpt_dir / "model.safetensors"
    if single.exists():
        return [single]
    pickles = [p.name for p in ckpt_dir.glob("*.bin")] + [p.name for p in ckpt_dir.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json{hint}")


def iter_hf_tensors(ckpt_dir: Path):
    """(file, hf_key, tensor) for every tensor, memory-mapped from the safetensors files."""
    for file in weight_files(ckpt_dir):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield file, key, f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None


# ----------------------------------------------------------------------------- load / save


def load_hf_config(path: str | os.PathLike) -> ModelConfig:
    ckpt_dir = resolve_checkpoint(path)
    return config_from_hf(read_json(ckpt_dir / "config.json"), str(ckpt_dir / "config.json"))


def load_hf(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> GPT:
    """Build the native model from a Hugging Face directory or Hub repo id. dtype None keeps the
    stored dtype."""
    ckpt_dir = resolve_checkpoint(path)
    cfg = load_hf_config(ckpt_dir)
    with torch.device("meta"):
        model = GPT(cfg)
    state = read_hf_state(ckpt_dir, model, device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_rope()
    return model


def read_hf_state(ckpt_dir: Path, model: torch.nn.Module, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    """Native state dict from the checkpoint, checked key by key and shape by shape against
    `model` (which may live on the meta device)."""
    cfg: ModelConfig = model.config
    # LoRA adapters (lora_A / lora_B) are not part of a base checkpoint.
    expected = {k: v.shape for k, v in model.state_dict().items() if ".lora_" not in k}
    rules = _rules(cfg.model_type, to_hf=False)
    state, unknown = {}, []
    for file, hf_key, tensor in iter_hf_tensors(ckpt_dir):
        key = _translate(hf_key, rules)
        if key is None or (key not in expected and not (key == "lm_head.weight" and cfg.tie_embeddings)):
            if not _IGNORED_HF_KEYS.match(hf_key):
                unknown.append(f"{hf_key} (in {file.name})")
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(
                f"{file}: tensor {hf_key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key])} (from config.json)"
            )
        state[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        lines = [f"{ckpt_dir}: checkpoint does not match a {cfg.model_type} model built from its config.json"]
        if missing:
            lines.append("missing tensors: " + ", ".join(native_to_hf_key(k, cfg.model_type) or k for k in missing))
        if unknown:
            lines.append("unexpected tensors: " + ", ".join(unknown))
        raise ValueError("\n".join(lines))
    return state


def save_hf(
    model: GPT,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete Hugging Face directory: config.json, generation_config.json, safetensors
    (sharded with an index past max_shard_bytes) and the files of `tokenizer` (a Tokenizer, or a
    folder to load one from; its chat template included when it was a default given at training
    time). Everything is written into a temporary folder that is renamed into place only when
    complete. `state_dict` lets callers pass full tensors gathered from a sharded model."""
    cfg: ModelConfig = model.config
    out_dir = Path(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for key, t in state.items():
        hf_key = native_to_hf_key(key, cfg.model_type)
        if hf_key is None:
            raise ValueError(f"no Hugging Face name for tensor {key} (model_type {cfg.model_type})")
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        tensors[hf_key] = t.to("cpu").contiguous()
    save_dtype = dtype or next(iter(tensors.values())).dtype

    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for key in sorted(tensors, key=_natural_key):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata=metadata)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    _write_json(tmp / "config.json", config_to_hf(cfg, save_dtype))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if tokenizer is not None:
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_dir(tokenizer)
        tokenizer.save(tmp)
        gen = tokenizer.generation_config or gen
    _write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    _replace_dir(tmp, out_dir)
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _natural_key(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older one is removed only after the swap."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def load_hf_weights_(model: GPT, path: str | os.PathLike) -> None:
    """Copy a checkpoint's weights into a materialised model, in place. Sharded (FSDP2 DTensor)
    parameters keep only their own shard, cut from the memory-mapped full tensor, so no rank
    holds a second full copy of the model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    ckpt_dir = resolve_checkpoint(path)
    params = model.state_dict()
    for key, full in read_hf_state(ckpt_dir, model).items():  # base weights only, never adapters
        target = params[key]
        if isinstance(target, DTensor):
            full = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                     src_data_rank=None)
        target.copy_(full)
    model.reset_rope()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors of the model on rank 0 (collective when sharded; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    if not sharded:
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(model: GPT, out_dir, tokenizer: Tokenizer | str | os.PathLike | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """save_hf for a model that may be sharded: call on every rank; rank 0 writes."""
    import torch.distributed as dist

    state = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_hf(model, out_dir, tokenizer=tokenizer, dtype=dtype, state_dict=state)
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir)
