"""Batched generation throughput: handloom's KV-cache sampler vs transformers' generate, same weights.

    python bench/generate.py                       # llama-3.2-1b shape, bf16, 32 prompts x 128 tokens, 256 new
    python bench/generate.py --preset tiny --batch 4 --prompt_len 16 --new_tokens 16 --device cpu

Both decode greedily from the same random weights with no stop token, so both produce exactly
batch x new_tokens tokens; the table gives new tokens per second and peak memory, and whether the
two produced the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.hf import config_to_hf, hf_to_native_key  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.generate import generate  # noqa: E402
from model.gpt import GPT  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return out, time.perf_counter() - t0, mem


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    import transformers

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.preset(args.preset)
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(cfg, dtype))
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: on the CPU it takes minutes for 1B parameters
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype).eval()
    ours = GPT(cfg).to(device=device, dtype=dtype)
    ours.load_state_dict({hf_to_native_key(k, cfg.model_type): v for k, v in hf.state_dict().items()
                          if hf_to_native_key(k, cfg.model_type) in ours.state_dict()})
    ours.reset_rope()
    ours.eval()
    gen = torch.Generator().manual_seed(1)
    # Prompts of different lengths (up to prompt_len), as a rollout batch would have.
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=gen).tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]

    def run_ours():
        return generate(ours, prompts, args.new_tokens)

    def run_hf():
        P = max(lengths)
        ids = torch.zeros(args.batch, P, dtype=torch.long)
        mask = torch.zeros(args.batch, P, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, P - len(prompt):] = torch.tensor(prompt)
            mask[i, P - len(prompt):] = 1
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                          eos_token_id=None)
        return out[:, P:].tolist()

    print(f"# {args.preset} {dtype}, {args.batch} prompts of {min(lengths)}-{max(lengths)} tokens, "
          f"{args.new_tokens} new tokens each, greedy, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"{'implementation':24s} {'new tok/s':>10s} {'seconds':>8s} {'peak GiB':>9s}")
    results = {}
    with torch.inference_mode():
        for name, fn in (("ours (KV cache)", run_ours), ("transformers generate", run_hf)):
            fn()  # warm-up
            out, seconds, mem = timed(fn, device)
            results[name] = out
            print(f"{name:24s} {args.batch * args.new_tokens / seconds:10,.0f} {seconds:8.2f} {mem:9.1f}", flush=True)
    a, b = results.values()
    same = sum(x == y for x, y in zip(a, b))
    print(f"# identical continuations: {same}/{args.batch} (bf16 rounding can flip near-ties on random weights)")


if __name__ == "__main__":
    main()
