"""Fetch a model from the Hugging Face Hub into the local HF cache and print its directory.

    python -m checkpoints.download Qwen/Qwen3-0.6B
    python -m checkpoints.download meta-llama/Llama-3.2-1B --revision main --cache_dir /data/hf

Only safetensors weights, json configs and tokenizer files are fetched (checkpoints.hf.HUB_PATTERNS):
never *.bin / *.pt pickles, never *.py modeling code. HF_HUB_OFFLINE=1 looks in the cache alone;
HF_TOKEN (or `hf auth login`) is needed for gated models. The printed directory is what load_hf
and the training configs take; passing the repo id there instead fetches the same way.
"""

import argparse
import sys

from checkpoints.hf import download


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
