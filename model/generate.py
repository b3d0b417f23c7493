"""Batched autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

    from model.generate import generate
    new_tokens = generate(model, [[1, 415, 263], [1, 9038]], max_new_tokens=64, temperature=0.8,
                          top_p=0.95, stop_ids={2}, seed=0)

    python -m model.generate --checkpoint /path/or/org/repo --prompt "Once upon a time" --max_new_tokens 64
    python -m model.generate --checkpoint Qwen/Qwen3-0.6B --chat --system "Be brief." --prompt "Hi!" --temperature 0.7

Prompts of different lengths share one batch: they are left-padded, so every row's next token is
read from the same last column and one decode step appends one column for all rows. Padding is
kept out of attention by a bool mask, and positions count real tokens only, so each row computes
what it would compute alone (tests/test_generate.py checks this token for token against
transformers).

This is also the rollout engine of GRPO, so the decode step has no Python loop over rows and no
per-row host sync: stop tokens are tracked on the device, and the host looks at "all rows
finished" only every few steps.

Deliberately left out: beam search, repetition penalties, speculative decoding, CUDA graphs and
torch.compile, paged attention and continuous batching (a finished row keeps its slot and decodes
padding until the whole batch is done or the token budget is spent).
"""

from __future__ import annotations

import sys
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from model.gpt import GPT, KVCache
from model.masks import causal_mask

# Looking at `finished.all()` makes the host wait for the device, which stalls kernel launches for
# the next step. Checking every few steps costs at most that many wasted steps of padding.
CHECK_FINISHED_EVERY = 8


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V). temperature 0 is greedy (argmax; top_k and top_p
    are then irrelevant). Filters apply in transformers' order: temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p. A token is
        # dropped when the tokens ranked above it already hold top_p; the top token has nothing
        # above it, so it is always kept.
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = torch.zeros_like(mass_above, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    # This is torch.multinomial(probs, 1) written out: argmax of p / q with q ~ Exp(1) draws index i
    # with probability p_i, and with the same generator it returns the same tokens (the test checks
    # this). multinomial itself first checks its input with a host sync on every call.
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(dim=-1)


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids=(),
    pad_id: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt. A row ends with the first token in `stop_ids`, which is
    included (so a caller can tell "stopped" from "ran out of budget"), or after max_new_tokens.

    temperature 0 is greedy. Sampling draws from `generator`, else from a fresh one seeded with
    `seed`, else from torch's global generator. `pad_id` fills the left padding and the columns of
    finished rows; no kept token ever attends to it, so any id works. use_cache=False recomputes the whole
    sequence at every step: slow, and the reference the cached path is tested against.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    weight = model.embed_tokens.weight
    device, dtype, cfg = weight.device, weight.dtype, model.config
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    # The whole token buffer up front: prompts left-padded, then one column per step.
    ids = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True, padding_value=pad_id,
                       padding_side="left")
    ids = F.pad(ids, (0, max_new_tokens), value=pad_id).to(device)  # (B, total)
    # kv_valid: False on the left padding only; generated columns are valid as they are appended
    # (slicing [:, :S] is the mask growing). Positions count real tokens, so every row starts at 0.
    pad_len = torch.tensor([P - len(p) for p in prompts], device=device)
    valid = torch.arange(total, device=device)[None, :] >= pad_len[:, None]  # (B, total)
    positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)

    cache = KVCache(cfg, B, total, device=device, dtype=dtype) if use_cache else None
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    num_new = torch.zeros(B, dtype=torch.long, device=device)  # tokens each row keeps
    S = P  # columns filled so far
    for step in range(max_new_tokens):
        # The prefill feeds the prompts; each later step feeds only the column added last.
        start = cache.pos if cache is not None else 0
        mask = causal_mask(valid[:, :S], S - start, cfg.sliding_window)  # (B, 1, S - start, S)
        # Project the last position only: the prefill's logits for every prompt position would be
        # B x P x V floats, gigabytes for a 150k vocabulary.
        logits = model(ids[:, start:S], position_ids=positions[:, start:S], attn_mask=mask, cache=cache,
                       logits_to_keep=1)[:, -1]  # (B, V)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, pad_id, token)
        ids[:, S] = token
        S += 1
        num_new += ~finished
        finished |= torch.isin(token, stop)
        if (step + 1) % CHECK_FINISHED_EVERY == 0 and finished.all():
            break
    new = ids[:, P:S].tolist()  # the one transfer to the host
    return [row[:n] for row, n in zip(new, num_new.tolist())]


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    from checkpoints.hf import load_hf, resolve_checkpoint
    from model.tokenizer import Tokenizer

    parser = ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n")[0],
                            default_meta=False)
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="Hugging Face model directory or Hub repo id.")
    parser.add_argument("--prompt", type=str, action="append", required=True,
                        help="Prompt text; repeat the flag to generate for several prompts in one batch.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Most tokens generated per prompt.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature; 0 is greedy.")
    parser.add_argument("--top_k", type=int | None, default=None, help="Sample among the k most likely tokens.")
    parser.add_argument("--top_p", type=float | None, default=None,
                        help="Nucleus sampling: the smallest set of tokens holding this probability mass.")
    parser.add_argument("--chat", action="store_true",
                        help="Render each prompt as a user message with the model's chat template.")
    parser.add_argument("--system", type=str | None, default=None, help="System message (with --chat).")
    parser.add_argument("--default_chat_template", type=str | None, default=None,
                        help="With --chat, for a tokenizer that has no template: 'chatml' or a Jinja string.")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu or cuda.")
    parser.add_argument("--dtype", type=Literal["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU.")
    parser.add_argument("--seed", type=int | None, default=0, help="Seed of the sampling generator.")
    args = parser.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    ckpt_dir = resolve_checkpoint(args.checkpoint)
    model = load_hf(ckpt_dir, device=device, dtype=dtype).eval()
    tok = Tokenizer.from_dir(ckpt_dir, default_chat_template=args.default_chat_template)

    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        try:
            prompts = [tok.encode_chat(system + [{"role": "user", "content": p}], add_generation_prompt=True)[0]
                       for p in args.prompt]
        except ValueError as e:  # no chat template: a usage error, not a crash
            parser.error(str(e))
    else:
        # The tokenizer's post-processor adds BOS where the model expects one (Llama), none otherwise (Qwen).
        prompts = [tok.encode(p, add_special_tokens=True) for p in args.prompt]

    t0 = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, stop_ids=tok.stop_ids, pad_id=tok.pad_id or 0, seed=args.seed)
    elapsed = time.perf_counter() - t0  # generate ends with a copy to the host, so the device is done

    for i, (prompt, new) in enumerate(zip(prompts, outputs)):
        if i:
            print("-" * 40)
        # A plain prompt is printed with its continuation, decoded together: SentencePiece decoders
        # drop the leading space of a text, which would glue the first new word to the prompt.
        print(tok.decode(new) if args.chat else tok.decode(prompt + new))
    n = sum(len(o) for o in outputs)
    print(f"{n} tokens in {elapsed:.2f}s: {n / elapsed:.1f} tokens/s (batch {len(prompts)}, {device}, "
          f"{str(dtype).removeprefix('torch.')})", file=sys.stderr)


if __name__ == "__main__":
    main()
