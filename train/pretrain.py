"""Pretraining: next-token prediction on a tokenized corpus, one process or FSDP2 under torchrun.

    python -m train.pretrain --config configs/pretrain/shakespeare.yaml
    torchrun --nproc_per_node=8 -m train.pretrain --config configs/pretrain/llama-3.2-1b.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m train.pretrain --config ... --parallel.dp_replicate 2      # HSDP across nodes

Setup order: config, distributed init, data, model on the meta device, parallelize (activation
checkpointing, compile, FSDP2), materialise and init or load weights, optimizer, resume. Then the
step loop: micro-batches with the loss summed over tokens and divided by the global number of
target tokens (so neither accumulation nor world size changes the gradient), clipping, AdamW,
eval and checkpoints. At the end: a training checkpoint, `final/` in Hugging Face format, a sample.

Left out on purpose: tensor/pipeline/context parallelism, float8, MoE, curriculum or data mixing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from checkpoints.convert import export_hf
from checkpoints.hf import load_hf_weights_
from checkpoints.io import check_resume_config, load_checkpoint, resume_path, save_checkpoint
from model.gpt import GPT
from train.config import (
    CheckpointConfig, LogConfig, ModelSpec, OptimConfig, ParallelConfig, model_config, parse_config, to_dict,
)
from train.data import TokenWindows, load_meta, prepare, unigram_baseline
from train.dist import all_reduce_sum, barrier, catch_stop_signals, setup_distributed, teardown_distributed
from train.log import MetricsLogger, Throughput
from train.optim import build_optimizer, clip_grad_norm_, lr_at
from train.parallel import autocast, parallelize


@dataclass
class PretrainData:
    """Token shards made by `python -m train.data prepare` (made here on first use from `inputs`)."""

    dir: str = "runs/data/shakespeare"
    """Folder with meta.json and the token shards."""
    inputs: list[str] = field(default_factory=list)
    """Text/JSONL/Parquet files to tokenize into `dir` if it holds no meta.json yet."""
    tokenizer: str | None = None
    """Tokenizer folder for preparing; None trains a byte-level BPE tokenizer on the inputs."""
    tokenizer_vocab_size: int = 2048
    """Vocabulary of the BPE tokenizer trained when `tokenizer` is None."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet inputs."""
    val_fraction: float = 0.05
    """Share of the corpus kept for validation when preparing."""
    seq_len: int = 256
    """Tokens per training sequence."""


@dataclass
class PretrainConfig:
    """Pretrain a GPT from scratch (or continue a checkpoint) on token shards."""

    out_dir: str = "runs/pretrain"
    """Run folder: config, metrics.jsonl, checkpoints, final/."""
    seed: int = 0
    """Seed of the weights and the data order."""
    device: str = "auto"
    """auto (cuda if present), cuda or cpu."""
    steps: int = 1000
    """Optimizer steps."""
    global_batch: int = 32
    """Sequences per optimizer step over all ranks and micro-batches."""
    global_batch_tokens: int | None = None
    """Alternatively tokens per step (must be a multiple of seq_len); overrides global_batch."""
    micro_batch: int = 8
    """Sequences per forward/backward on each rank."""
    eval_every: int = 100
    """Validation loss every N steps (0: only at the end)."""
    eval_batches: int = 20
    """Global batches of the validation split per evaluation."""
    stop_at_step: int | None = None
    """End this session at that step with a checkpoint, as a preempted job would (the schedule still
    follows `steps`; rerun to continue)."""
    nonfinite: Literal["error", "skip"] = "error"
    """On a NaN/inf loss or gradient: stop with an error, or skip the step."""
    max_skipped_steps: int = 10
    """With nonfinite=skip, stop with an error after this many skipped steps."""
    sample_prompt: str = "ROMEO:"
    """Text the final model continues at the end of the run."""
    sample_tokens: int = 200
    """Tokens of that sample (0 skips it)."""
    model: ModelSpec = field(default_factory=lambda: ModelSpec(preset="tiny"))
    """The network."""
    data: PretrainData = field(default_factory=PretrainData)
    """The corpus."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2, activation checkpointing, compile, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints and the HF export."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""


# Settings a resumed run may change without changing what is trained.
RESUMABLE_CHANGES = ("steps", "stop_at_step", "out_dir", "device", "eval_every", "eval_batches", "sample_prompt",
                     "sample_tokens", "micro_batch", "parallel", "checkpoint", "log", "max_skipped_steps", "data.dir",
                     "data.inputs")


def main(cfg: PretrainConfig) -> dict:
    dist = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    logger = MetricsLogger(out_dir, cfg.log, enabled=dist.is_main, run_config=to_dict(cfg))
    if dist.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ---- data: tokenized shards (prepared once, by rank 0)
    data_dir = Path(cfg.data.dir)
    if dist.is_main and not (data_dir / "meta.json").exists():
        if not cfg.data.inputs:
            raise FileNotFoundError(f"data.dir {data_dir} has no meta.json and data.inputs is empty")
        prepare(cfg.data.inputs, data_dir, tokenizer_dir=cfg.data.tokenizer, text_field=cfg.data.text_field,
                val_fraction=cfg.data.val_fraction, vocab_size=cfg.data.tokenizer_vocab_size)
    barrier()
    meta = load_meta(data_dir)
    seq_len = cfg.data.seq_len
    global_batch = cfg.global_batch
    if cfg.global_batch_tokens:
        if cfg.global_batch_tokens % seq_len:
            raise ValueError(f"global_batch_tokens {cfg.global_batch_tokens} is not a multiple of data.seq_len {seq_len}")
        global_batch = cfg.global_batch_tokens // seq_len
    if global_batch % (cfg.micro_batch * dist.world_size):
        raise ValueError(f"global_batch {global_batch} must be a multiple of micro_batch {cfg.micro_batch} "
                         f"x world size {dist.world_size}")
    accum_steps = global_batch // (cfg.micro_batch * dist.world_size)
    mcfg, ckpt_dir = model_config(cfg.model)
    if meta["vocab_size"] > mcfg.vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {meta['vocab_size']} "
                         f"ids ({data_dir / 'meta.json'}); set model.vocab_size")
    if seq_len > mcfg.max_seq_len:
        raise ValueError(f"data.seq_len {seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    train_data = TokenWindows(data_dir, "train", seq_len, cfg.micro_batch, dist.rank, dist.world_size, cfg.seed,
                              pin_memory=dist.device.type == "cuda")
    val_data = TokenWindows(data_dir, "val", seq_len, cfg.micro_batch, dist.rank, dist.world_size, cfg.seed)

    # ---- model: built on meta, parallelized, then materialised on the device
    with torch.device("meta"):
        model = GPT(mcfg)
    model = parallelize(model, cfg.parallel, dist)
    model.to_empty(device=dist.device)
    if ckpt_dir is not None:
        load_hf_weights_(model, ckpt_dir)
    else:
        model.init_weights(seed=cfg.seed)
    optimizer = build_optimizer(model, cfg.optim, dist.device)
    tokenizer_dir = ckpt_dir or meta.get("tokenizer")

    # ---- resume from the newest complete checkpoint (any world size)
    start_step, skipped = 0, 0
    resume_from = resume_path(out_dir, cfg.checkpoint.resume)
    if resume_from is not None:
        start_step, extra, saved_cfg = load_checkpoint(resume_from, model, optimizer)
        check_resume_config(saved_cfg, to_dict(cfg), ignore=RESUMABLE_CHANGES)
        train_data.load_state_dict(extra["data"])
        skipped = extra["skipped_steps"]
        logger.print(f"resumed from {resume_from} at step {start_step}")

    stop_signal = catch_stop_signals()
    tokens_per_step = global_batch * seq_len
    throughput = Throughput(mcfg.flops_per_token(seq_len), dist.device, dist.world_size)
    logger.print(f"model {mcfg.model_type} {mcfg.num_params() / 1e6:.2f}M params | world {dist.world_size} | "
                 f"global batch {global_batch} x {seq_len} tokens = {accum_steps} micro-batches of "
                 f"{cfg.micro_batch} per rank | {cfg.steps} steps")

    def save(step: int) -> None:
        extra = {"data": train_data.state_dict(), "skipped_steps": skipped,
                 "model_config": dataclasses.asdict(mcfg), "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None}
        path = save_checkpoint(out_dir, step, model, optimizer, extra, to_dict(cfg), cfg.checkpoint.keep_last)
        logger.print(f"checkpoint saved: {path}")

    model.train()
    step = start_step
    val_loss = None
    while step < cfg.steps:
        lr = lr_at(step, cfg.optim, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Every token of the global batch weighs 1 / (global target tokens): summing the
        # micro-batch losses gives the mean over the step whatever the split.
        loss_sum = torch.zeros((), device=dist.device)
        for _ in range(accum_steps):
            input_ids, targets = train_data.next_batch()
            input_ids = input_ids.to(dist.device, non_blocking=True)
            targets = targets.to(dist.device, non_blocking=True)
            with autocast(cfg.parallel, dist):
                loss = model(input_ids, targets=targets) / tokens_per_step  # summed token loss / global tokens
            loss.backward()
            loss_sum += loss.detach()
        # One all-reduce for the loss and the stop flag (any rank told to stop stops them all).
        step_stats = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(stop_signal["stop"]), device=dist.device)]))

        grad_norm = clip_grad_norm_(model, cfg.optim.grad_clip)
        loss_value, stop_votes, grad_norm_value = torch.cat([step_stats, grad_norm[None]]).tolist()  # one host sync
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            optimizer.zero_grad(set_to_none=True)
            if cfg.nonfinite == "error" or skipped >= cfg.max_skipped_steps:
                raise FloatingPointError(
                    f"non-finite loss ({loss_value}) or gradient norm ({grad_norm_value}) at step {step + 1}; "
                    f"{skipped} steps skipped before. The last checkpoint is untouched.")
            skipped += 1
            logger.print(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped} so far)")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        throughput.add(tokens_per_step)

        if step % cfg.log.every == 0 or step == cfg.steps:
            logger.log(step, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                              "tokens": step * tokens_per_step, **throughput.report(cfg.steps - step, cfg.log.every)},
                       cfg.steps)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            val_loss = evaluate(model, val_data, cfg.eval_batches, dist, cfg.parallel)
            logger.log(step, {"loss": val_loss}, cfg.steps, prefix="val")
            model.train()
        stopping = stop_votes > 0 or step == cfg.stop_at_step
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or step == cfg.steps:
            save(step)
        if stopping:
            logger.print(f"stopped at step {step}; resume with the same command")
            break

    result = {"step": step, "val_loss": val_loss}
    if step == cfg.steps:
        result.update(_finish(cfg, model, tokenizer_dir, data_dir, dist, logger, val_loss))
    logger.close()
    teardown_distributed()
    return result


@torch.no_grad()
def evaluate(model, data: TokenWindows, max_batches: int, dist, parallel_cfg) -> float:
    """Mean next-token loss over the first `max_batches` global batches of the split."""
    model.eval()
    total = torch.zeros(2, device=dist.device)  # (loss sum, tokens)
    for input_ids, targets in data.iter_eval(max_batches):
        input_ids, targets = input_ids.to(dist.device), targets.to(dist.device)
        with autocast(parallel_cfg, dist):
            total[0] += model(input_ids, targets=targets)
        total[1] += targets.numel()
    all_reduce_sum(total)
    return (total[0] / total[1]).item()


def _finish(cfg, model, tokenizer_dir, data_dir, dist, logger, val_loss) -> dict:
    """Export final/ in HF format, compare with the unigram baseline, print a sample."""
    out = {}
    if cfg.checkpoint.export_hf:
        final = Path(cfg.out_dir) / "final"
        export_hf(model, final, tokenizer_dir=tokenizer_dir)
        logger.print(f"Hugging Face model written to {final}")
        out["final_dir"] = str(final)
    if dist.is_main:
        baseline = unigram_baseline(data_dir)
        out["unigram_val_loss"] = baseline
        logger.print(f"validation loss {val_loss:.4f} vs unigram baseline {baseline:.4f} (nats/token)")
        if cfg.checkpoint.export_hf and cfg.sample_tokens and tokenizer_dir:
            out["sample"] = sample_text(out["final_dir"], cfg.sample_prompt, cfg.sample_tokens, dist.device)
            logger.print(f"--- sample ---\n{cfg.sample_prompt}{out['sample']}\n--------------")
    barrier()
    return out


def sample_text(model_dir: str, prompt: str, max_new_tokens: int, device) -> str:
    """Continue `prompt` with the exported model (reloading it also checks the export)."""
    from checkpoints.hf import load_hf
    from model.generate import generate
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    model = load_hf(model_dir, device=device).eval()
    ids = tok.encode(prompt, add_special_tokens=True)
    new = generate(model, [ids], max_new_tokens, temperature=0.8, top_k=50, seed=0)[0]
    return tok.decode(new)


if __name__ == "__main__":
    main(parse_config(PretrainConfig))
