"""Training checkpoint -> Hugging Face directory, and the export of a live (maybe sharded) model.

    python -m checkpoints.convert --checkpoint runs/pretrain/step-00001000 --out runs/pretrain/hf-1000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from checkpoints.hf import save_hf
from checkpoints.io import load_checkpoint
from model.config import ModelConfig
from model.gpt import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors of the model on rank 0 (collective when sharded; other ranks get {})."""
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    if not sharded:
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(model: GPT, out_dir, tokenizer_dir=None, dtype: torch.dtype | None = None) -> None:
    """Write `out_dir` as a Hugging Face model. Call on every rank when sharded."""
    state = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_hf(model, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype, state_dict=state)
    if dist.is_initialized():
        dist.barrier()


def convert(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    checkpoint = Path(checkpoint)
    meta_file = checkpoint / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} not found: {checkpoint} is not a complete training checkpoint")
    extra = json.loads(meta_file.read_text())["extra"]
    if "model_config" not in extra:
        raise ValueError(f"{meta_file} has no extra.model_config; it was not written by a handloom loop")
    mcfg = ModelConfig(**extra["model_config"])
    model = GPT(mcfg)
    model.reset_rope()
    load_checkpoint(checkpoint, model, None)
    return save_hf(model, out, tokenizer_dir=extra.get("tokenizer_dir"), dtype=dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a step-XXXXXXXX folder written by a training loop")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as trained)")
    args = p.parse_args(argv)
    try:
        path = convert(args.checkpoint, args.out, DTYPES.get(args.dtype))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()
