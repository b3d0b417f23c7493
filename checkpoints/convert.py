"""Training checkpoint -> Hugging Face directory (the export of a live model is checkpoints.hf.export_hf).

    python -m checkpoints.convert --checkpoint runs/pretrain/step-00001000 --out runs/pretrain/hf-1000

A checkpoint folder from someone else is safe to convert: its files are checked against meta.json and
its pickles are read with unpicklers that admit DCP's metadata classes and plain data only, so nothing
in it runs (checkpoints/io.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from checkpoints.hf import save_hf
from checkpoints.io import DamagedCheckpointError, load_checkpoint, verify_checkpoint
from model.config import ModelConfig
from model.gpt import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model of a training checkpoint folder as a Hugging Face directory. The folder is verified
    first (checkpoints/io.py): a damaged file, or a folder that is not a checkpoint, is an error naming
    it, and nothing in it is unpickled but DCP's own metadata classes."""
    checkpoint = Path(checkpoint)
    meta_file = checkpoint / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} not found: {checkpoint} is not a complete training checkpoint")
    extra = verify_checkpoint(checkpoint)["extra"]
    if not isinstance(extra.get("model_config"), dict):
        raise ValueError(f"{meta_file} has no extra.model_config; it was not written by a handloom loop")
    try:
        mcfg = ModelConfig(**extra["model_config"])
    except TypeError as e:
        raise ValueError(f"{meta_file}: extra.model_config does not fit this version's ModelConfig ({e})") from None
    model = GPT(mcfg)
    model.reset_rope()
    load_checkpoint(checkpoint, model, None, verify=False)
    return save_hf(model, out, tokenizer=extra.get("tokenizer_dir"), dtype=dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a step-XXXXXXXX folder written by a training loop")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as trained)")
    args = p.parse_args(argv)
    try:
        path = convert(args.checkpoint, args.out, DTYPES.get(args.dtype))
    except (FileNotFoundError, ValueError, DamagedCheckpointError) as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()
