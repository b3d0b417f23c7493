"""Fetch a model from the Hugging Face Hub into the local HF cache and print its directory.

    python -m checkpoints.download Qwen/Qwen3-0.6B
    python -m checkpoints.download meta-llama/Llama-3.2-1B --revision main --cache_dir /data/hf

Only safetensors weights, json configs and tokenizer files are fetched (HUB_PATTERNS below):
never *.bin / *.pt pickles, never *.py modeling code. HF_HUB_OFFLINE=1 looks in the cache alone;
HF_TOKEN (or `hf auth login`) is needed for gated models. The printed directory is what load_hf
and the training configs take; passing the repo id there instead fetches the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

# What is fetched from the Hub: weights, configs and tokenizer files; never pickles or code.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.txt"]


def resolve_checkpoint(path_or_repo: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub repo id, fetched (weights, configs and tokenizer
    files only) into the standard HF cache. HF_HUB_OFFLINE=1 makes this use the cache alone."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists():
        raise ValueError(f"checkpoint {name} is a file; expected a Hugging Face model directory")
    if not re.fullmatch(r"\w[\w.\-]*/\w[\w.\-]*", name):  # not ./x or ../x
        raise FileNotFoundError(f"checkpoint {name}: no such directory, and not a Hub repo id (org/name)")
    return download(name)


def download(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch a Hub repo's weights, configs and tokenizer files (HUB_PATTERNS) into the HF cache and
    return its local snapshot directory. With HF_HUB_OFFLINE=1 only the cache is looked at."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model: say which and why, on one line
        why = " ".join(str(e).split())
        raise FileNotFoundError(
            f"checkpoint {repo_id}: not found locally, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}): {why}"
        ) from e




def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m checkpoints.download", description=__doc__.split("\n")[0])
    parser.add_argument("repo_id", help="Hub repo id, org/name")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--cache_dir", default=None, help="cache directory (default: HF_HUB_CACHE)")
    args = parser.parse_args(argv)
    try:
        path = download(args.repo_id, revision=args.revision, cache_dir=args.cache_dir)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")  # one line on stderr, exit status 1, no traceback
    print(path)


if __name__ == "__main__":
    main()
