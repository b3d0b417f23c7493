"""Batched autoregressive generation: the simple reference path, and the rollout engine.

    from model.generate import generate, RolloutEngine
    new_tokens = generate(model, [[1, 415, 263], [1, 9038]], max_new_tokens=64, temperature=0.8,
                          top_p=0.95, stop_ids={2}, seed=0)

    engine = RolloutEngine(model, max_batch=64, max_prompt_len=512, max_new_tokens=256)  # once
    tokens, logprobs = engine.generate(prompts, temperature=1.0, stop_ids={2}, seed=step,
                                       return_logprobs=True)            # every GRPO step

    python -m model.generate --checkpoint /path/or/org/repo --prompt "Once upon a time" --max_new_tokens 64
    python -m model.generate --checkpoint Qwen/Qwen3-0.6B --chat --system "Be brief." --prompt "Hi!" --temperature 0.7

Prompts of different lengths share one batch: they are left-padded, so every row's next token is
read from the same last column and one decode step appends one column for all rows. Padding is
kept out of attention by a mask, and positions count real tokens only, so each row computes what it
would compute alone (tests/test_generate.py checks this token for token against transformers).
Stop tokens are tracked on the device; the host looks at "all rows finished" only every few steps.

`generate` is the simple path: eager, a fresh cache per call, slow, the reference that the engine is
tested against. `RolloutEngine` is GRPO's rollout engine, the same algorithm built to run near the
memory-bandwidth limit inside the training process (no second inference server, no weight sync):

- A static KV cache and static per-row state, allocated once and reused by every call.
- Prefill: every prompt token but the last goes through the model in one eager forward (rows in
  chunks), each distinct prompt once (GRPO samples G completions of each: their slots copy its cache
  rows). The decode step then feeds the last column of every row, samples one token, and handles
  stops; it is the only place where tokens are sampled, and its shapes never change: the write
  column is a device tensor, and so is the attention mask that hides the columns not written yet.
  On CUDA attention runs FlexAttention's decoding kernel with a BlockMask that lists only the cache
  blocks written so far (model/masks.py's decode_block_mask: a block count computed on the device,
  so the shapes stay fixed while the reads grow with the sequence); elsewhere SDPA reads the whole
  cache with an additive mask. On CUDA the step is compiled (torch.compile, elementwise work fused)
  and captured into a CUDA graph per batch bucket, so a step is one graph launch with no host
  synchronisation (on an H200, llama-3.2-1b shape, batch 64: 9.5 ms a step eager, 3.7 compiled,
  1.45 compiled and captured, early in a call; bench/RESULTS.md). The capture is explicit
  (torch.cuda.CUDAGraph) rather than mode="reduce-overhead": the cache and the state are our own
  static buffers, which cudagraph trees would copy into the graph on every replay unless each were
  marked static, and the step's one RNG draw goes through our generator, registered with each graph.
- Batch-size buckets (powers of two from 8): a call runs in the smallest bucket that holds its
  prompts, so a handful of graphs serve every call.
- Finished rows stop costing compute by compaction: every few steps, once `compact_share` of the
  bucket has finished and the live rows fit a smaller bucket, they are moved to the front of the
  cache (one gather) and decoding continues in that bucket's graph. Compaction, not refill, because
  a GRPO rollout knows all of its prompts up front and ends when its last completion ends, and
  because a refilled row would need its own prefill in the middle of decoding and its own cache
  column, where compaction keeps one write column for all rows and one fixed-shape step per bucket.
- Log-probs (`return_logprobs`) are those of each sampled token under the distribution it was drawn
  from: softmax(logits / temperature), restricted to the top-k / top-p set and renormalised when
  those filters are on, computed in float32 from the step's logits. Without the filters that is
  exactly what a teacher-forced forward gives (`model(ids, targets=t, logprobs=True,
  temperature=temperature)`). Greedy (temperature 0) reports the unscaled, unfiltered
  log-probability. GRPO's old-policy log-probs should come from sampling without top-k / top-p,
  or the trainer must apply the same filter. `return_entropies` adds the entropy of that same
  distribution at every step (GRPO logs its mean: the policy's entropy where it sampled).
- Precision and the snapshot: `dtype` is the compute dtype, and generation runs under autocast to it
  as training does (float32 master weights, bf16 matmuls, a bf16 cache). A float32 policy would then
  have every weight cast on every token, and LoRA adds two small matmuls per layer; so on CUDA the
  engine by default decodes with a snapshot: a plain copy of the policy whose linear weights are
  stored in the compute dtype with the adapters merged in and q/k/v and gate/up fused into one
  matmul each (`GPT.fuse_projections`), refreshed in place (one copy of the weights, a few
  milliseconds) at the start of every call. It costs that copy's memory (about 2 bytes a parameter:
  2.5 GB for a 1B model) and keeps the graphs valid while the policy trains; bench/RESULTS.md
  measures what it gains. `snapshot=False` decodes with the policy itself.
- FSDP2: each rank generates for its own prompts. Without a snapshot, the full weights are gathered
  once per call (`full_weights`), not once per layer per token, and the step runs eager (the
  gathered weights are re-allocated at other addresses between rollouts, and FSDP's hooks are not
  capturable); with `snapshot=True` each parameter is gathered into the snapshot once per call and
  the step is compiled and captured as in one process, for a full bf16 copy of the model per rank.
  LoRA without a snapshot runs its adapters unmerged (the graph is captured again when adapters are
  merged, disabled or re-allocated).

Deliberately left out: beam search, repetition penalties, speculative decoding, paged attention and
continuous batching (refill), and a decode attention kernel of our own (FlexAttention's takes about
a sixth of a step at batch 64 in the middle of a call, some 1.7 times what its cache reads need; most
of the rest goes to the matmuls, the small ones well below the bandwidth, and to the launch latency
of about ten kernels a layer: bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from model.gpt import GPT, Attention, KVCache
from model.lora import LoRALinear, is_nf4, lora_delta
from model.masks import causal_mask, decode_block_mask

# Looking at `finished` makes the host wait for the device, which stalls kernel launches for the
# next step. Checking every few steps costs at most that many wasted steps of padding.
CHECK_FINISHED_EVERY = 8


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Next token ids (B,) from logits (B, V). temperature 0 is greedy (argmax; top_k and top_p
    are then irrelevant). Filters apply in transformers' order: temperature, top-k, top-p.

    noise (B, V): Exp(1) draws to use instead of drawing from `generator` (the engine draws them
    outside its compiled step). return_logprobs: also log p(token) (B,) float32 under the distribution
    the token was drawn from (after temperature and the filters; greedy: the unscaled softmax).
    return_entropy: also that distribution's entropy (B,) float32, in nats (after the logprobs)."""
    logits = logits.float()
    if temperature == 0:
        token = logits.argmax(dim=-1)
        return _with_stats(token, logits, return_logprobs, return_entropy)
    logits = logits / temperature
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
    # This is torch.multinomial(softmax(logits), 1) written out: argmax of p / q with q ~ Exp(1) draws
    # index i with probability p_i, and with the same generator it returns the same tokens (the test
    # checks this). multinomial itself first checks its input with a host sync on every call. In logs,
    # argmax of logits - log q: the softmax's normaliser is the same for every i, so it is not computed.
    if noise is None:
        noise = torch.empty_like(logits).exponential_(1, generator=generator)
    token = argmax_rows(logits - noise.log())
    return _with_stats(token, logits, return_logprobs, return_entropy)


def argmax_rows(x: Tensor, parts: int = 32) -> Tensor:
    """x.argmax(-1) for x (B, V), in two reductions: the maximum of each of `parts` slices of a row,
    then of those. Compiled, a one-stage reduction gives each row one thread block: at batch 64 that
    left half of an H200 idle while it read 128k columns, 62 us of a 1.6 ms decode step
    (bench/RESULTS.md). Ties go to the lowest index, as in argmax."""
    B, V = x.shape
    width = -(-V // parts)
    x = F.pad(x, (0, width * parts - V), value=float("-inf")).view(B, parts, width)
    best, where = x.max(dim=-1)  # (B, parts) each slice's maximum and its first index
    part = best.argmax(dim=-1, keepdim=True)  # (B, 1) the first slice holding the row's maximum
    return (part * width + where.gather(-1, part))[:, 0]


def _with_stats(token: Tensor, logits: Tensor, logprob: bool, entropy: bool):
    """token, then what was asked of the distribution softmax(logits) it was drawn from: log p(token)
    and the entropy -sum p log p (entr: 0 where a filter set p to 0), each (B,) float32."""
    if not (logprob or entropy):
        return token
    out = (token,)
    if logprob:  # log softmax(logits)[token], without keeping the (B, V) log-probs
        out += (logits.gather(-1, token[:, None])[:, 0] - logits.logsumexp(dim=-1),)
    if entropy:
        out += (torch.special.entr(logits.softmax(dim=-1)).sum(dim=-1),)
    return out


# ----------------------------------------------------------------------------- the simple path


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
    return_logprobs: bool = False,
    return_entropies: bool = False,
):
    """The new tokens of each prompt. A row ends with the first token in `stop_ids`, which is
    included (so a caller can tell "stopped" from "ran out of budget"), or after max_new_tokens.
    With return_logprobs, (tokens, logprobs): the log-probability of each new token, as in
    `sample_next`; with return_entropies the entropy of the distribution each was drawn from comes
    after them (tokens[, logprobs], entropies), one list per prompt like the tokens.

    temperature 0 is greedy. Sampling draws from `generator`, else from a fresh one seeded with
    `seed`, else from torch's global generator. `pad_id` fills the left padding and the columns of
    finished rows; no kept token ever attends to it, so any id works. use_cache=False recomputes the whole
    sequence at every step: slow, and the reference the cached path is tested against.
    """
    _check_prompts(prompts)
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
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    entropies = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
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
        token, logprob, entropy = sample_next(logits, temperature, top_k, top_p, generator, return_logprobs=True,
                                              return_entropy=True)
        token = torch.where(finished, pad_id, token)
        ids[:, S] = token
        logprobs[:, step] = logprob.masked_fill(finished, 0.0)
        entropies[:, step] = entropy.masked_fill(finished, 0.0)
        S += 1
        num_new += ~finished
        finished |= torch.isin(token, stop)
        if (step + 1) % CHECK_FINISHED_EVERY == 0 and finished.all():
            break
    lengths = num_new.tolist()

    def per_row(t: Tensor) -> list[list]:  # the transfers to the host, each row cut to its length
        return [row[:n] for row, n in zip(t.tolist(), lengths)]

    return _results(per_row(ids[:, P:S]), per_row(logprobs) if return_logprobs else None,
                    per_row(entropies) if return_entropies else None)


def _results(tokens: list, logprobs: list | None, entropies: list | None):
    """tokens, or (tokens[, logprobs][, entropies]): what the caller asked for, in that order."""
    extra = tuple(x for x in (logprobs, entropies) if x is not None)
    return (tokens, *extra) if extra else tokens


def _check_prompts(prompts) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")


# ----------------------------------------------------------------------------- FSDP2


@contextlib.contextmanager
def full_weights(model: torch.nn.Module):
    """FSDP2: all-gather every sharded module's parameters once and keep them gathered inside the
    block (no reshard after each forward), so a rollout does not all-gather every layer for every
    token. Costs the full model in FSDP's param dtype on every rank for the block's duration. Does
    nothing to a model without FSDP."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        FSDPModule = ()
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield model
        return
    # FSDP2 has no public getter for reshard_after_forward; each module's parameter groups know it.
    before = [any(g._reshard_after_forward for g in m._get_fsdp_state()._fsdp_param_groups) for m in modules]
    handles = [m.unshard(async_op=True) for m in modules]  # all the all-gathers issued, then awaited
    for handle in handles:
        handle.wait()
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.set_reshard_after_forward(was, recurse=False)
            m.reshard()


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


# ----------------------------------------------------------------------------- the rollout snapshot


def _build_snapshot(model: torch.nn.Module, matmul_dtype: torch.dtype | None, fuse: bool) -> GPT:
    """A plain GPT of the policy's shape for generation to run: linear weights in `matmul_dtype` (what
    autocast would cast them to on every step), embeddings and norms in the policy's dtype, and an
    output projection of its own when the policy ties it to the embedding (the tied float32 table
    would otherwise be cast for every token); with `fuse`, q/k/v and gate/up fused into one matmul
    each (GPT.fuse_projections). Values come from _refresh_snapshot."""
    cfg = dataclasses.replace(model.config, tie_embeddings=False)
    with torch.device("meta"):
        net = GPT(cfg)
        if fuse:
            net.fuse_projections()
    weight = model.embed_tokens.weight
    dtype = torch.float32 if is_nf4(weight) else weight.dtype
    net.to_empty(device=weight.device).to(dtype)
    if matmul_dtype is not None:
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(matmul_dtype)
    net.reset_rope()
    return net.requires_grad_(False).eval()


def _full(t: Tensor) -> Tensor:
    """A parameter whole: an FSDP2 shard (DTensor) is all-gathered; NF4 is dequantized."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.get_original_weight() if is_nf4(t) else t


@torch.no_grad()
def _refresh_snapshot(net: GPT, policy: torch.nn.Module) -> None:
    """Copy the policy's current weights into the snapshot, in place (its addresses, which the CUDA
    graphs hold, never change): LoRA adapters merged in float32 (base + scale * B @ A, then rounded
    once to the snapshot's dtype), or left out while they are disabled. Under FSDP2 each parameter is
    all-gathered once here, so every rank must generate at the same time."""
    modules = dict(policy.named_modules())

    def value(name: str) -> Tensor:  # the policy's tensor `name` as its forward uses it
        owner, _, attr = name.rpartition(".")
        source = modules.get(owner)
        if name == "lm_head.weight" and policy.lm_head is None:
            return _full(policy.embed_tokens.weight)
        if isinstance(source, LoRALinear) and attr == "weight":
            weight = _full(source.weight)
            if source.merged or source.disabled:
                return weight
            return weight.float() + lora_delta(_full(source.lora_A), _full(source.lora_B), source.scaling)
        return _full(getattr(source, attr))

    for name, dst in net.named_parameters():
        owner, _, attr = name.rpartition(".")
        module, _, layer = owner.rpartition(".")
        if layer in GPT.FUSED:  # rows of a fused layer, one source layer after another
            row = 0
            for part in GPT.FUSED[layer]:
                src = value(f"{module}.{part}.{attr}")
                dst[row:row + src.shape[0]].copy_(src)
                row += src.shape[0]
        else:
            dst.copy_(value(name))


# ----------------------------------------------------------------------------- the rollout engine


class _Slots:
    """Per-slot decode state of one bucket: views [:b] of the engine's static buffers. A slot is a
    row of the bucket; compaction moves prompts between slots, `row` says which prompt a slot holds."""

    PER_SLOT = ("token", "position", "pad_len", "finished", "row", "out_tokens", "out_logprobs", "out_entropies",
                "out_len", "budget")

    def __init__(self, engine: "RolloutEngine", b: int):
        for name in self.PER_SLOT:
            setattr(self, name, getattr(engine, "_" + name)[:b])
        # token (b,): fed at the next step; position (b,): its position (real tokens before it);
        # pad_len (b,): columns < pad_len are left padding, never attended; out_tokens and
        # out_logprobs, out_entropies (b, N): what the slot generated; out_len (b,): how many it keeps;
        # budget (b,).
        self.step = engine._step  # (1,) the output column of the token sampled next
        self.is_stop = engine._is_stop  # (V,) True at the stop ids


def flex_decode_kernel_options(batch: int, kv_heads: int, sm_count: int, split_kv: int | None) -> dict | None:
    """FlexAttention's decoding kernel runs one thread block per (row, kv head, part of the cache), and
    its own rule cuts each row's cache into sm_count // (batch x kv_heads) x 2 parts, at least one:
    from batch x kv_heads >= sm_count on, one block reads a row's whole cache. Measured on an H200
    (132 SMs, 8 kv heads, 288 columns written; bench/RESULTS.md), two parts are 18% faster at batch 64
    (512 blocks: under 4 waves of the SMs) and 5% slower at batch 256 (2048 blocks), so the engine
    splits in two only while one part per (row, head) fills fewer than 4 waves.
    split_kv None: that choice; 0: the kernel's own rule; n: n parts."""
    if split_kv is None:
        split_kv = 2 if sm_count <= batch * kv_heads < 4 * sm_count else 0
    return {"SPLIT_KV": split_kv} if split_kv else None


def decode_step(model: GPT, cache: KVCache, s: _Slots, noise: Tensor | None, temperature: float,
                top_k: int | None, top_p: float | None, pad_id: int, window: int | None, flex: bool) -> None:
    """One token for every row of a bucket, everything on the device and in place: the forward of
    the last column, sampling, recording, stop handling. No shape depends on the step (cache.pos is
    a (1,) tensor: the column written now), so the engine compiles it once and captures it per bucket.
    flex: attention through FlexAttention's decoding kernel, reading only the cache blocks written
    so far; otherwise SDPA over the whole cache with an additive mask."""
    b, L = s.token.shape[0], cache.k[0].shape[2]
    if flex:
        mask = decode_block_mask(s.pad_len, cache.pos, L, window)
    else:
        col = torch.arange(L, device=s.token.device)
        valid = (col >= s.pad_len[:, None]) & (col <= cache.pos)  # (b, L) written, non-padding columns
        if window is not None:
            valid &= col > cache.pos - window
        mask = torch.zeros(b, 1, 1, L, dtype=cache.k[0].dtype, device=col.device).masked_fill(
            ~valid[:, None, None], float("-inf"))
    logits = model(s.token[:, None], position_ids=s.position[:, None], attn_mask=mask, cache=cache,
                   logits_to_keep=1)[:, -1]  # (b, V); the forward advanced cache.pos
    token, logprob, entropy = sample_next(logits, temperature, top_k, top_p, noise=noise, return_logprobs=True,
                                          return_entropy=True)
    token = torch.where(s.finished, pad_id, token)
    s.out_tokens[:, s.step] = token[:, None]
    s.out_logprobs[:, s.step] = logprob.masked_fill(s.finished, 0.0)[:, None]
    s.out_entropies[:, s.step] = entropy.masked_fill(s.finished, 0.0)[:, None]
    s.out_len += ~s.finished
    s.finished |= s.is_stop[token] | (s.out_len >= s.budget)
    s.token.copy_(token)
    s.position += 1
    s.step += 1


class RolloutEngine:
    """Fast batched generation with a static cache, compiled and CUDA-graph-captured decode steps,
    batch buckets and compaction. Build once with the largest shapes; call `generate` every step.

    compile / cuda_graphs: default on for CUDA, off elsewhere (on the CPU the same step runs eager).
    compact_share: compact once this share of the bucket has finished and the live rows fit a
    smaller bucket; None never compacts. buckets: batch sizes to round up to (default powers of two
    from 8 up to max_batch). prefill_rows: rows per prefill forward (bounds its activation memory).
    dtype: the compute dtype (autocast to it; the cache's dtype); None: the weights' own, no autocast.
    snapshot: decode with a refreshed copy of the policy, linear weights in `dtype`, adapters merged
    (default: on CUDA, for a model without FSDP); see the module docstring.
    fuse_projections: the snapshot's q/k/v and gate/up as one matmul each (default: on CUDA).
    flex_decode: decode attention through FlexAttention's decoding kernel over the written cache
    blocks only (default: on CUDA); otherwise SDPA over the whole cache with an additive mask.
    decode_split_kv: how many parts that kernel splits each row's cache into (see
    flex_decode_kernel_options); None: that function's choice by batch size; 0: the kernel's own rule.
    """

    def __init__(
        self,
        model: GPT,
        max_batch: int,
        max_prompt_len: int,
        max_new_tokens: int,
        *,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        compact_share: float | None = 0.5,
        buckets: list[int] | None = None,
        prefill_rows: int = 64,
        dtype: torch.dtype | None = None,
        snapshot: bool | None = None,
        fuse_projections: bool | None = None,
        flex_decode: bool | None = None,
        decode_split_kv: int | None = None,
    ):
        weight = model.embed_tokens.weight
        self.model, self.cfg = model, model.config
        self.device = weight.device
        cuda = self.device.type == "cuda"
        # Generation computes in `dtype` the way training does: autocast over the weights as stored.
        weights_dtype = torch.float32 if is_nf4(weight) else weight.dtype
        self.autocast = dtype is not None and dtype != weights_dtype
        self.dtype = dtype or weights_dtype  # the cache's dtype: what attention reads
        fsdp = _is_fsdp(model)
        if snapshot is None:  # on CUDA it is the faster path (pre-cast, merged, fused weights)
            snapshot = cuda and not fsdp
        # The network that decodes: the policy itself, or its snapshot (see _build_snapshot).
        if fuse_projections and not snapshot:
            raise ValueError("fuse_projections fuses the snapshot's layers: it needs snapshot=True")
        fuse = cuda if fuse_projections is None else fuse_projections
        self.net = _build_snapshot(model, self.dtype if self.autocast else None, fuse) if snapshot else model
        # FSDP2's hooks run Python around every forward and its gathered weights move between
        # rollouts: such a model decodes eager, with its weights gathered once per call. A snapshot is
        # a plain module whatever the policy is.
        live_fsdp = fsdp and not snapshot
        self.compile = (cuda and not live_fsdp) if compile is None else compile
        self.cuda_graphs = (cuda and not live_fsdp) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not cuda:
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        if buckets is None:
            buckets, b = [], 8
            while b < max_batch:
                buckets.append(b)
                b *= 2
            buckets.append(b)
        self.buckets = sorted(buckets)
        if self.buckets[-1] < max_batch:
            raise ValueError(f"largest bucket {self.buckets[-1]} < max_batch {max_batch}")
        self.max_batch, self.max_prompt_len, self.max_new_tokens = max_batch, max_prompt_len, max_new_tokens
        self.compact_share, self.prefill_rows = compact_share, prefill_rows
        # The cache length rounded up to 64 columns keeps the attention mask's rows aligned for the
        # fused attention kernels.
        self.max_len = -(-(max_prompt_len + max_new_tokens) // 64) * 64
        # FlexAttention takes head sizes from 16 (stories260K's 8 decodes through SDPA), and its Triton
        # kernels are built for Ampere and newer.
        if flex_decode is None:
            flex_decode = cuda and self.cfg.head_dim >= 16 and torch.cuda.get_device_capability(self.device) >= (8, 0)
        self.flex_decode = flex_decode
        if decode_split_kv is not None and decode_split_kv < 0:
            raise ValueError(f"decode_split_kv must be None, 0 (the kernel's own rule) or a number of parts; "
                             f"got {decode_split_kv}")
        self.decode_split_kv = decode_split_kv
        self._sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 0
        self._attention = [m for m in self.net.modules() if isinstance(m, Attention)]  # where those options go
        # FlexAttention's decoding kernel needs a static batch size: with it, each bucket compiles
        # its own step (about 25 s each for llama-3.2-1b on an H200; see the limit in _run_step);
        # without it, one step with a symbolic batch serves every bucket.
        self._step_fn = decode_step
        if self.compile:
            self._step_fn = torch.compile(decode_step, fullgraph=True, dynamic=False if self.flex_decode else None)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_signature = None
        self._allocated = False
        self._pool = None

    # ---- static buffers, allocated on first use (under no_grad, like every use of them)

    def _allocate(self) -> None:
        Bmax, N, V, dev = self.buckets[-1], self.max_new_tokens, self.cfg.vocab_size, self.device
        self.cache = KVCache(self.cfg, Bmax, self.max_len, device=dev, dtype=self.dtype)
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # the cache column written next
        self._token = torch.zeros(Bmax, dtype=torch.long, device=dev)
        self._position = torch.zeros(Bmax, dtype=torch.long, device=dev)
        self._pad_len = torch.zeros(Bmax, dtype=torch.long, device=dev)
        self._finished = torch.ones(Bmax, dtype=torch.bool, device=dev)
        self._row = torch.zeros(Bmax, dtype=torch.long, device=dev)
        self._out_tokens = torch.zeros(Bmax, N, dtype=torch.long, device=dev)
        self._out_logprobs = torch.zeros(Bmax, N, dtype=torch.float32, device=dev)
        self._out_entropies = torch.zeros(Bmax, N, dtype=torch.float32, device=dev)
        self._out_len = torch.zeros(Bmax, dtype=torch.long, device=dev)
        self._budget = torch.zeros(Bmax, dtype=torch.long, device=dev)
        self._step = torch.zeros(1, dtype=torch.long, device=dev)
        self._is_stop = torch.zeros(V, dtype=torch.bool, device=dev)
        self._gen = torch.Generator(device=dev)
        self._slots = {b: _Slots(self, b) for b in self.buckets}
        self._caches = {}
        for b in self.buckets:  # the decode views: rows [0, b), the device-side write column
            view = self.cache.rows(0, b)
            view.pos = self._pos
            self._caches[b] = view
        self._allocated = True

    # no_grad, not inference_mode: FSDP2 allocates its all-gather buffers in the first unshard and
    # reuses them in training's forwards, where a buffer made in inference mode may not be written.
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int] | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_ids=(),
        pad_id: int = 0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        return_logprobs: bool = False,
        return_entropies: bool = False,
        compact: bool = True,
    ):
        """As `generate` (same arguments and results). max_new_tokens: at most the engine's (its
        default), or one budget per prompt. More prompts than max_batch run in consecutive batches."""
        _check_prompts(prompts)
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else \
            [max_new_tokens or self.max_new_tokens] * len(prompts)
        if len(budgets) != len(prompts) or max(budgets) > self.max_new_tokens or min(budgets) < 1:
            raise ValueError(f"max_new_tokens must be 1..{self.max_new_tokens}, one int or one per prompt")
        if max(len(p) for p in prompts) > self.max_prompt_len:
            raise ValueError(f"a prompt is longer than max_prompt_len={self.max_prompt_len}")
        if not self._allocated:
            self._allocate()
        if generator is not None:  # one draw from the caller's generator seeds this call
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        elif seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        self._is_stop.zero_()
        stops = [i for i in set(stop_ids) if 0 <= i < self.cfg.vocab_size]
        if stops:
            self._is_stop[torch.tensor(stops, device=self.device)] = True
        sampling = (temperature, top_k, top_p, pad_id)

        tokens, logprobs, entropies = [], [], []
        if self.net is not self.model:
            _refresh_snapshot(self.net, self.model)
        live = full_weights(self.model) if self.net is self.model else contextlib.nullcontext()
        with live, torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            for i in range(0, len(prompts), self.max_batch):
                t, lp, ent = self._generate_batch(prompts[i : i + self.max_batch], budgets[i : i + self.max_batch],
                                                  sampling, compact, seed + i)
                tokens += t
                logprobs += lp
                entropies += ent
        return _results(tokens, logprobs if return_logprobs else None, entropies if return_entropies else None)

    def _generate_batch(self, prompts, budgets, sampling, compact, seed):
        n, P = len(prompts), max(len(p) for p in prompts)
        b = self._bucket(n)
        if self.cuda_graphs:
            self._capture_graphs(b, sampling)  # before the prefill: capture runs the step on scratch state
        self._gen.manual_seed(seed)  # after capturing, whose warm-up steps draw from it
        dev, pad_id = self.device, sampling[3]

        # ---- state: n prompts, then padding slots that start finished
        ids = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True, padding_value=pad_id,
                           padding_side="left")
        ids = F.pad(ids, (0, 0, 0, b - n), value=pad_id).to(dev)  # (b, P)
        lengths = torch.tensor([len(p) for p in prompts] + [1] * (b - n), device=dev)
        self._pad_len[:b] = P - lengths
        self._token[:b] = ids[:, -1]  # the last prompt column is fed by the first decode step
        self._position[:b] = lengths - 1
        self._finished[:b] = torch.arange(b, device=dev) >= n
        self._row[:b] = torch.arange(b, device=dev)
        self._out_len[:b] = 0
        self._budget[:b] = torch.tensor(budgets + [0] * (b - n), device=dev)
        # What each prompt generated, by prompt: slots are copied here before compaction drops them.
        self._results = (torch.zeros_like(self._out_tokens[:b]), torch.zeros_like(self._out_logprobs[:b]),
                         torch.zeros_like(self._out_entropies[:b]), torch.zeros_like(self._out_len[:b]))
        self._step.zero_()

        # ---- prefill: every column but the last, written into the cache at [0, P - 1). A prompt that
        # appears several times (GRPO's G completions of each) goes through the model once: the distinct
        # prompts fill rows [0, u), then every slot takes the rows of its prompt (one gather per layer).
        # Padding slots need none: they start finished and attend only to columns from P - 1 on.
        if P > 1:
            # Per distinct prompt: its prefill row, and the first slot holding it; per slot: its prompt's row.
            row_of, first_slots, slot_rows = {}, [], []
            for slot, p in enumerate(prompts):
                row = row_of.setdefault(tuple(p), len(first_slots))
                if row == len(first_slots):
                    first_slots.append(slot)
                slot_rows.append(row)
            distinct, u = torch.tensor(first_slots, device=dev), len(first_slots)  # (u,)
            pad_len = self._pad_len[distinct]  # (u,)
            valid = torch.arange(P - 1, device=dev)[None, :] >= pad_len[:, None]  # (u, P - 1)
            positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
            for r in range(0, u, self.prefill_rows):
                rows = slice(r, min(u, r + self.prefill_rows))
                view = self.cache.rows(rows.start, rows.stop)  # pos 0, a plain slice write
                mask = causal_mask(valid[rows], P - 1, self.cfg.sliding_window)  # (rows, 1, P-1, P-1)
                self.net(ids[distinct[rows], :-1], position_ids=positions[rows], attn_mask=mask, cache=view,
                         logits_to_keep=1)
            if u < n:
                index = torch.tensor(slot_rows, device=dev)  # (n,)
                for buf in (*self.cache.k, *self.cache.v):  # the right side is gathered before it is written
                    buf[:n, :, : P - 1] = buf[index, :, : P - 1]
        self._pos.fill_(P - 1)

        # ---- decode: one step per new token, compacting finished rows away now and then
        for step in range(max(budgets)):
            self._decode(b, sampling)
            if (step + 1) % CHECK_FINISHED_EVERY == 0:
                live = int((~self._finished[:b]).sum())  # the host waits for the device here only
                if live == 0:
                    break
                smaller = self._bucket(live)
                if compact and self.compact_share is not None and smaller < b and live <= (1 - self.compact_share) * b:
                    self._compact(b, smaller)
                    b = smaller

        self._save_results(b)
        new, lp, ent, length = (t[:n].tolist() for t in self._results)  # the transfers to the host
        return tuple([r[:k] for r, k in zip(rows, length)] for rows in (new, lp, ent))

    def _decode(self, b: int, sampling: tuple) -> None:
        key = (b, sampling)
        if key in self._graphs:
            self._graphs[key].replay()
        else:
            self._run_step(b, sampling)

    def _run_step(self, b: int, sampling: tuple) -> None:
        temperature, top_k, top_p, pad_id = sampling
        noise = None
        if temperature != 0:  # drawn eagerly: the compiled step gets it as an input
            noise = torch.empty(b, self.cfg.vocab_size, device=self.device).exponential_(1, generator=self._gen)
        if self.compile and not self.flex_decode:  # one compiled step for every bucket: a symbolic batch
            cache, s = self._caches[b], self._slots[b]
            for t in (*cache.k, *cache.v, *(getattr(s, name) for name in _Slots.PER_SLOT), noise):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        if self.flex_decode:  # read while compiling (the option is part of the bucket's kernel) or running eager
            options = flex_decode_kernel_options(b, self.cfg.num_kv_heads, self._sm_count, self.decode_split_kv)
            if self._attention[0].decode_kernel_options != options:  # changes with the bucket only
                for module in self._attention:
                    module.decode_kernel_options = options
        # Each bucket, sampling setting and network is a compiled version of this one function, and
        # engines in one process share them: more than dynamo's default 8, past which it would run
        # the step eager (and the CUDA-graph capture of an eager step fails).
        with torch._dynamo.config.patch(recompile_limit=64):
            self._step_fn(self.net, self._caches[b], self._slots[b], noise, temperature, top_k, top_p, pad_id,
                          self.cfg.sliding_window, self.flex_decode)

    def _compact(self, b: int, new_b: int) -> None:
        """Move the live slots to [0, new_b), in order; finished ones fill the rest."""
        self._save_results(b)
        order = torch.argsort(self._finished[:b].to(torch.int8), stable=True)[:new_b]  # live first
        for buf in (*self.cache.k, *self.cache.v, *(getattr(self, "_" + name) for name in _Slots.PER_SLOT)):
            buf[:new_b] = buf[:b][order]

    def _save_results(self, b: int) -> None:
        row = self._row[:b]
        for result, out in zip(self._results, (self._out_tokens, self._out_logprobs, self._out_entropies,
                                               self._out_len)):
            result[row] = out[:b]

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # ---- CUDA graphs

    def _signature(self) -> tuple:
        """What a captured graph bakes in besides the engine's buffers: the addresses of the weights
        and the modules that run (merging or disabling LoRA adapters changes them)."""
        m = self.net
        return (tuple(t.data_ptr() for t in (*m.parameters(), *m.buffers())),
                tuple((id(x), getattr(x, "merged", None), getattr(x, "disabled", None)) for x in m.modules()))

    def _capture_graphs(self, b: int, sampling: tuple) -> None:
        signature = self._signature()
        if signature != self._graph_signature:
            self._graphs.clear()
            self._graph_signature = signature
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
        for bucket in self.buckets:
            if bucket > b or (bucket, sampling) in self._graphs:
                continue
            self._pos.zero_()
            self._step.zero_()
            # Warm up on a side stream (compiles, runs autotuning), as torch.cuda.graphs asks.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run_step(bucket, sampling)
            torch.cuda.current_stream().wait_stream(stream)
            self._pos.zero_()
            self._step.zero_()
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self._gen)  # replays advance our generator's offset
            with torch.cuda.graph(graph, pool=self._pool):
                self._run_step(bucket, sampling)
            self._graphs[(bucket, sampling)] = graph


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
