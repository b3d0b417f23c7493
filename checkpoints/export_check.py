"""Prove an export: reload final/ and compare it with the network still in memory.

    check = check_export(model, out_dir / "final", probe_ids)                              # full model
    check = check_export(model, out_dir / "final", probe_ids, adapter=True, base_dir=base)  # PEFT adapter

In this order, each failure raising ExportCheckError that names what is at fault:
  1. config: config.json (adapter_config.json: r, lora_alpha, use_rslora, targets) against the model's;
  2. weights: every tensor of the safetensors file(s) against the model's, bit for bit once the model's is
     rounded to the file's dtype; the first key that differs is named, with its file;
  3. logits: the reloaded export (checkpoints.hf.load_hf, + load_peft_adapter for an adapter) against the
     network in memory on a fixed probe batch, and its greedy next tokens;
  4. when transformers is installed, AutoModelForCausalLM.from_pretrained (and peft's PeftModel for an
     adapter, when peft is installed) against our reload, both in float32.
The result is written to final/export_check.json and returned.

Memory. Call it on every rank: a sharded (FSDP2) model is gathered into full CPU tensors on rank 0 (as
checkpoints.hf.export_hf does), rank 0 runs the check on CPU copies, and every rank gets its verdict (and
raises together). Rank 0 holds the gathered state plus about one float32 copy of the model at a time (the
networks are built, run and freed one after the other; a bf16 file loaded by transformers and upcast is 1.5
copies for a moment); the probe batch is a few dozen tokens. For a model whose copies do not fit in host
memory, turn the check off in the loop's config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from checkpoints.hf import _write_json, full_state_dict, iter_hf_tensors, load_hf, load_hf_config, native_to_hf_key
from checkpoints.peft import (CONFIG_FILE, WEIGHTS_FILE, _peft_key, _resolve_targets, load_peft_adapter,
                              read_adapter_config)
from model.gpt import GPT
from model.lora import apply_lora, is_nf4, lora_modules, lora_state_dict, quantize_base_nf4

RESULT_FILE = "export_check.json"
# Allowed max |logits difference|, as a fraction of the largest reference logit.
# Ours against ours: the reference is the network in memory with its weights rounded to the export's dtype,
# and it runs the same code on the same CPU as the reload, so the logits are equal bit for bit unless
# config.json changed the math; 1e-5 only guards against a kernel picking another summation order. (The
# rounding itself, when the export is narrower than the weights in memory, e.g. fp32 -> bf16 costs about 2%
# of the largest logit on stories260K, is reported as `rounding_rel_diff`, never judged: it is what was asked.)
NATIVE_RTOL = 1e-5
# transformers against ours, both float32 from the same file: two implementations, so float32 rounding
# differences that grow with depth (1e-6 on tiny models); 1e-4 leaves room for 100-layer models.
REFERENCE_RTOL = 1e-4


class ExportCheckError(ValueError):
    """The export differs from the network in memory; the message names the key or tensor at fault."""


def default_probe(vocab_size: int, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids (batch, length) when the caller has no text to probe with."""
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def check_export(model: torch.nn.Module, final_dir: str | os.PathLike, probe_ids=None, adapter: bool = False,
                 base_dir: str | os.PathLike | None = None, atol: float = 0.0, rtol: float | None = None,
                 with_transformers: bool = True) -> dict:
    """Reload the export in `final_dir` and compare it with `model` (see the module docstring). probe_ids:
    (B, T) token ids (a tensor or lists; default `default_probe`). adapter: final_dir is a PEFT adapter whose
    base is `base_dir`. The logits pass when max |diff| <= atol + rtol * max |reference logit|, rtol
    defaulting to NATIVE_RTOL (ours) and REFERENCE_RTOL (transformers). with_transformers=False skips step 4.
    Call on every rank; returns the result (rank 0 also writes final_dir/export_check.json)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    # Collective on a sharded model: every rank takes part in the gather, rank 0 gets the tensors.
    state = lora_state_dict(model) if adapter else full_state_dict(model)
    settings = _lora_settings(model) if adapter else None
    final_dir = Path(final_dir)
    verdict = None
    if not distributed or dist.get_rank() == 0:
        try:
            verdict = _check(model.config, state, settings, final_dir, probe_ids, adapter, base_dir, atol, rtol,
                             with_transformers)
        except Exception as e:  # noqa: BLE001  recorded, then raised on every rank below
            error = str(e) if isinstance(e, ExportCheckError) else f"{type(e).__name__}: {e}"
            verdict = {"ok": False, "export": str(final_dir), "error": error}
            if not distributed:
                _record(final_dir, verdict)
                raise
        _record(final_dir, verdict)
    del state
    if distributed:  # rank 0's verdict to every rank, so that all of them stop when it failed
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if not verdict["ok"]:
        raise ExportCheckError(verdict["error"])
    return verdict


def _record(final_dir: Path, result: dict) -> None:
    if final_dir.is_dir():
        _write_json(final_dir / RESULT_FILE, result)


def _check(cfg, state, settings, final_dir, probe_ids, adapter, base_dir, atol, rtol, with_transformers) -> dict:
    if probe_ids is None:
        probe_ids = default_probe(cfg.vocab_size)
    probe = torch.as_tensor(probe_ids, dtype=torch.long).cpu()
    if probe.dim() != 2:
        raise ValueError(f"probe_ids must be (batch, length), got shape {tuple(probe.shape)}")
    result = {"ok": True, "export": str(final_dir), "kind": "adapter" if adapter else "full",
              "probe_ids": probe.tolist()}
    if adapter:
        if base_dir is None:
            raise ValueError("checking an adapter needs base_dir, the base model's directory")
        parts, ref, ours, rounding = _adapter_parts(cfg, state, settings, final_dir, Path(base_dir), probe)
    else:
        parts, ref, ours, rounding = _full_parts(cfg, state, final_dir, probe)
    result.update(parts)
    result["native"] = _compare(ref, ours, atol, NATIVE_RTOL if rtol is None else rtol,
                                "logits of the reloaded export differ from the network in memory, though weights and "
                                "config are identical (nondeterministic model code?)")
    if rounding is not None:
        result["native"]["rounding_rel_diff"] = rounding
    if with_transformers:
        result.update(_reference_parts(final_dir, adapter, base_dir, probe, atol,
                                       REFERENCE_RTOL if rtol is None else rtol))
    done = ", ".join(f"{k} skipped" if "skipped" in v else f"{k} ok" for k, v in result.items() if isinstance(v, dict))
    result["summary"] = f"export check of {final_dir}: {done}"
    return result


# ----------------------------------------------------------------------------- full model


def _full_parts(cfg, state: dict[str, torch.Tensor], final_dir: Path, probe: torch.Tensor):
    """Config and weights compared (raising at the first difference); then (results, reference logits, reloaded
    logits, the relative cost of rounding to the export's dtype or None)."""
    out = {"config": _compare_config(cfg, load_hf_config(final_dir), final_dir / "config.json")}
    # Weights, file by file, tensor by tensor (memory-mapped, so one tensor is read at a time).
    expected = {native_to_hf_key(k, cfg.model_type): k for k in state}
    seen, unknown, dtypes = set(), [], set()
    for file, hf_key, tensor in iter_hf_tensors(final_dir):
        if hf_key not in expected:
            unknown.append(f"{hf_key} (in {file.name})")
            continue
        _compare_tensor(state[expected[hf_key]], tensor, f"{file}: tensor {hf_key}")
        seen.add(hf_key)
        dtypes.add(tensor.dtype)
    _missing_unknown(sorted(set(expected) - seen), unknown, final_dir)
    out["weights"] = {"tensors": len(seen), "identical": True, "dtype": _names(dtypes),
                      "in_memory_dtype": _names({t.dtype for t in state.values()})}

    # The network in memory, rebuilt on CPU from the gathered state with each tensor rounded as exported.
    file_dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    rounded = {k: v.to(file_dtype) if file_dtype is not None else v for k, v in state.items()}
    ref = _logits(_build(cfg, rounded), probe)
    del rounded
    rounding = None
    if file_dtype is not None and any(v.dtype != file_dtype for v in state.values()):
        unrounded = _logits(_build(cfg, state), probe)
        rounding = _rel(ref.float() - unrounded.float(), unrounded)
    return out, ref, _logits(load_hf(final_dir), probe), rounding


def _build(cfg, state: dict[str, torch.Tensor]) -> GPT:
    """A CPU network of config `cfg` over these tensors, without copying them."""
    with torch.device("meta"):
        net = GPT(cfg)
    net.load_state_dict(state, assign=True, strict=True)
    net.reset_rope()
    return net


def _compare_config(cfg, exported, path: Path) -> dict:
    ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(exported)
    for key in ours:
        if ours[key] != theirs.get(key):
            raise ExportCheckError(f"{path}: {key} is {theirs.get(key)!r} in the export, {ours[key]!r} in the "
                                   "model in memory")
    return {"fields": len(ours), "identical": True}


# ----------------------------------------------------------------------------- PEFT adapter


def _lora_settings(model: torch.nn.Module) -> dict:
    """What the loaded adapter must reproduce: the wrapped layers, r, alpha, rsLoRA, and how the frozen base
    is stored (dtype, NF4 block sizes), read from the LoRA layers themselves."""
    modules = dict(lora_modules(model))
    if not modules:
        raise ValueError("adapter=True, but the model has no LoRA layers")
    m = next(iter(modules.values()))
    weight = m.weight.to_local() if hasattr(m.weight, "to_local") else m.weight
    nf4 = is_nf4(weight)
    return {"names": sorted(modules), "r": m.r, "alpha": m.alpha, "use_rslora": m.use_rslora,
            "adapter_dtype": m.lora_A.dtype, "base_dtype": weight.dtype,
            "nf4": (weight.block_size, weight.scaler_block_size) if nf4 else None,
            # QLoRA with quantize_base_nf4(all_linear=True) also quantized the plain linears.
            "nf4_all_linear": nf4 and any(is_nf4(getattr(mod, "weight", None)) for name, mod in model.named_modules()
                                          if isinstance(mod, torch.nn.Linear))}


def _adapter_parts(cfg, state, settings, final_dir: Path, base_dir: Path, probe: torch.Tensor):
    """As _full_parts, for a PEFT adapter: adapter_config.json and adapter_model.safetensors."""
    file_cfg = read_adapter_config(final_dir)
    path = final_dir / CONFIG_FILE
    for key, ours in (("r", settings["r"]), ("lora_alpha", settings["alpha"]),
                      ("use_rslora", settings["use_rslora"])):
        theirs = file_cfg.get(key, {"lora_alpha": 8, "use_rslora": False}.get(key))
        if theirs != ours:
            raise ExportCheckError(f"{path}: {key} is {theirs!r} in the export, {ours!r} in the model in memory")
    with torch.device("meta"):
        names = _resolve_targets(GPT(cfg), file_cfg["target_modules"], path)
    if sorted(names) != settings["names"]:
        differ = sorted(set(names) ^ set(settings["names"]))
        raise ExportCheckError(f"{path}: target_modules {file_cfg['target_modules']!r} select {differ[:4]} "
                               "differently from the model in memory")
    out = {"config": {"fields": 4, "identical": True}}

    file = final_dir / WEIGHTS_FILE
    expected = {_peft_key(k, cfg.model_type): k for k in state}
    seen, unknown, dtypes = set(), [], set()
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    unknown.append(key)
                    continue
                tensor = f.get_tensor(key)
                _compare_tensor(state[expected[key]], tensor, f"{file}: tensor {key}")
                seen.add(key)
                dtypes.add(tensor.dtype)
    except (SafetensorError, OSError) as e:
        raise ExportCheckError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    _missing_unknown(sorted(set(expected) - seen), unknown, final_dir)
    out["weights"] = {"tensors": len(seen), "identical": True, "dtype": _names(dtypes),
                      "in_memory_dtype": _names({t.dtype for t in state.values()})}

    # The network in memory: the frozen base is base_dir's weights (they never train), stored as in memory,
    # with the adapters gathered from memory. The reload stores its base the same way.
    ref = _like_in_memory(apply_lora(load_hf(base_dir, dtype=torch.float32), settings["names"], r=settings["r"],
                                     alpha=settings["alpha"], use_rslora=settings["use_rslora"]), settings)
    with torch.no_grad():
        for name, m in lora_modules(ref):
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])
    ref_logits = _logits(ref, probe)
    del ref
    ours = _like_in_memory(load_peft_adapter(load_hf(base_dir, dtype=torch.float32), final_dir), settings)
    return out, ref_logits, _logits(ours, probe), None


def _like_in_memory(net: torch.nn.Module, settings: dict) -> torch.nn.Module:
    """Store the base as the training run did (model.lora.freeze_base): its dtype, or NF4; adapters in theirs."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.data = p.data.to(settings["adapter_dtype"] if name.endswith((".lora_A", ".lora_B"))
                               else settings["base_dtype"])
    if settings["nf4"] is not None:
        block, scaler_block = settings["nf4"]
        quantize_base_nf4(net, block, scaler_block, dtype=settings["base_dtype"], all_linear=settings["nf4_all_linear"])
    return net


# ----------------------------------------------------------------------------- transformers / peft


@contextlib.contextmanager
def _quiet_third_party_logs():
    """The reference load is a check, not the user's load: its noise is kept out of the run's output.
    transformers imports torchao when it is installed, and on a CPU build torchao logs that its CUDA
    kernels failed to load (a newcomer reads "Failed to load" as our error) and torch that torchao
    registers enums it need not; transformers draws a weight-loading bar, and peft calls a deprecated
    transformers method (a FutureWarning)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    bar = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bar:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


@_quiet_third_party_logs()
def _reference_parts(final_dir: Path, adapter: bool, base_dir, probe: torch.Tensor, atol: float, rtol: float) -> dict:
    """transformers (and peft) load the export; compared in float32 with our load of the same files."""
    try:
        import transformers
    except ImportError:
        return {"transformers": {"skipped": "transformers is not installed"}}
    if adapter:
        try:
            import peft
        except ImportError:
            return {"peft": {"skipped": "peft is not installed"}}
        ours = load_peft_adapter(load_hf(base_dir, dtype=torch.float32), final_dir)
    else:
        ours = load_hf(final_dir, dtype=torch.float32)
    ours_logits = _logits(ours, probe)
    del ours
    gc.collect()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir if adapter else final_dir),
                                                           attn_implementation="eager").float().eval()
    name = "transformers"
    if adapter:
        hf = peft.PeftModel.from_pretrained(hf, str(final_dir)).eval()
        name = "peft"
    with torch.no_grad():
        hf_logits = hf(input_ids=probe).logits.float()
    del hf
    gc.collect()
    return {name: _compare(ours_logits, hf_logits, atol, rtol,
                           f"logits of {name}' load of the export differ from ours (float32 both, the same file): "
                           "our model code and theirs disagree")}


# ----------------------------------------------------------------------------- comparisons


@torch.no_grad()
def _logits(net: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    return net.eval()(probe)  # (B, T, V)


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    return (diff.abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def _compare(ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float, failure: str) -> dict:
    """Logits within atol + rtol * max|ref|, and the same greedy next token wherever the reference's top two
    logits are further apart than twice that bound (closer ones may swap within the tolerance)."""
    ref, got = ref.float(), got.float()
    scale = ref.abs().max().item()
    bound = atol + rtol * scale
    diff = (got - ref).abs()
    top2 = ref.topk(2, dim=-1).values  # (B, T, 2)
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * bound
    flips = (got.argmax(-1) != ref.argmax(-1)) & decisive
    result = {"ok": True, "max_abs_diff": diff.max().item(), "max_rel_diff": diff.max().item() / max(scale, 1e-30),
              "bound_abs": bound, "rtol": rtol, "atol": atol, "greedy_identical": not flips.any().item(),
              "greedy_positions": int(decisive.sum())}
    if diff.max().item() > bound or flips.any():
        b, t = divmod(int(diff.flatten(0, 1).max(-1).values.argmax()), ref.shape[1])
        raise ExportCheckError(
            f"{failure}: max |diff| {diff.max().item():.3g} > "
            f"bound {bound:.3g} (rtol {rtol:g} of max |logit| {scale:.3g}), worst at probe row {b}, position {t}; "
            f"greedy next tokens differ at {int(flips.sum())} of {int(decisive.sum())} decisive positions")
    return result


def _compare_tensor(mem: torch.Tensor, file: torch.Tensor, what: str) -> None:
    if tuple(mem.shape) != tuple(file.shape):
        raise ExportCheckError(f"{what} has shape {tuple(file.shape)}, {tuple(mem.shape)} in memory")
    mem = mem.to(file.dtype)
    same = (mem == file) | (mem.isnan() & file.isnan()) if file.is_floating_point() else mem == file
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        diff = (mem.float() - file.float()).abs()
        raise ExportCheckError(f"{what} differs from the model in memory: {int((~same).sum())} of {file.numel()} "
                               f"values, max |diff| {diff.nan_to_num(float('inf')).max().item():.3g}, first at "
                               f"index {tuple(bad)}")


def _missing_unknown(missing: list[str], unknown: list[str], final_dir: Path) -> None:
    if missing or unknown:
        lines = [f"{final_dir}: the export's tensors differ from the model's"]
        if missing:
            lines.append("missing from the export: " + ", ".join(missing))
        if unknown:
            lines.append("not in the model: " + ", ".join(unknown))
        raise ExportCheckError("\n".join(lines))


def _names(dtypes) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
