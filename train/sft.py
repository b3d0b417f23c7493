"""Supervised fine-tuning (all parameters) on chat data, one process or FSDP2 under torchrun.

    python -m train.sft --config configs/sft/qwen2.5-0.5b-fastchat.yaml
    torchrun --nproc_per_node=8 -m train.sft --config configs/sft/qwen2.5-0.5b-fastchat.yaml

Conversations (OpenAI messages, ShareGPT, prompt/completion or Alpaca rows) are rendered with the
model's own chat template; the loss is on the assistant's tokens (its end-of-turn token included,
so the model learns to stop), summed and divided by the number of trained tokens of the whole
optimizer step over micro-batches and ranks. Optional packing puts several conversations in one
row with attention blocked between them. At the end, `<out_dir>/final/` is the full model in
Hugging Face format with its tokenizer.

Left out on purpose: multimodal data, tool-call rendering, NEFTune noise, sequence parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from checkpoints.convert import export_hf
from checkpoints.hf import load_hf_weights_
from checkpoints.io import check_resume_config, load_checkpoint, resume_path, save_checkpoint
from model.gpt import GPT
from model.tokenizer import Tokenizer
from train.chat_data import ChatBatches, SFTDataset, attention_mask_for, format_example, num_trainable
from train.config import (
    ChatDataConfig, CheckpointConfig, LogConfig, ModelSpec, OptimConfig, ParallelConfig, model_config, parse_config,
    to_dict,
)
from train.dist import all_reduce_sum, barrier, catch_stop_signals, setup_distributed, teardown_distributed
from train.log import MetricsLogger, Throughput
from train.optim import build_optimizer, clip_grad_norm_, lr_at
from train.parallel import autocast, parallelize


@dataclass
class SFTConfig:
    """Fine-tune every parameter of a model on chat data."""

    out_dir: str = "runs/sft"
    """Run folder: config, metrics.jsonl, checkpoints, final/."""
    seed: int = 0
    """Seed of the data order (and of dropout)."""
    device: str = "auto"
    """auto (cuda if present), cuda or cpu."""
    steps: int | None = None
    """Optimizer steps; None trains `epochs` passes over the data."""
    epochs: int = 1
    """Passes over the training data when `steps` is None."""
    global_batch: int = 16
    """Samples (or packed rows) per optimizer step over all ranks and micro-batches."""
    micro_batch: int = 4
    """Samples (or packed rows) per forward/backward on each rank."""
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end, when data.val is set)."""
    eval_batches: int = 20
    """Global batches of validation data per evaluation."""
    stop_at_step: int | None = None
    """End this session at that step with a checkpoint (rerun to continue)."""
    nonfinite: Literal["error", "skip"] = "error"
    """On a NaN/inf loss or gradient: stop with an error, or skip the step."""
    max_skipped_steps: int = 10
    """With nonfinite=skip, stop with an error after this many skipped steps."""
    sample_prompt: str = "Who are you?"
    """User message the final model answers at the end of the run."""
    sample_tokens: int = 64
    """Tokens of that answer (0 skips it)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The network to fine-tune (model.checkpoint: an HF dir or Hub id)."""
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    """The chat data."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=10, weight_decay=0.0))
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2, activation checkpointing, compile, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints and the HF export."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""


# Settings a resumed run may change without changing what is trained.
RESUMABLE_CHANGES = ("steps", "epochs", "stop_at_step", "out_dir", "device", "eval_every", "eval_batches",
                     "sample_prompt", "sample_tokens", "micro_batch", "parallel", "checkpoint", "log",
                     "max_skipped_steps")


def main(cfg: SFTConfig) -> dict:
    dist = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    logger = MetricsLogger(out_dir, cfg.log, enabled=dist.is_main, run_config=to_dict(cfg))
    if dist.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ---- tokenizer and data: every conversation rendered with the model's chat template
    mcfg, ckpt_dir = model_config(cfg.model)
    tokenizer_dir = cfg.data.tokenizer or ckpt_dir
    if tokenizer_dir is None:
        raise ValueError("data.tokenizer is required when the model is a preset (no checkpoint to take it from)")
    tokenizer = Tokenizer.from_dir(tokenizer_dir, default_chat_template=cfg.data.chat_template)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                         f"ids ({tokenizer_dir})")
    if cfg.data.max_seq_len > mcfg.max_seq_len:
        raise ValueError(f"data.max_seq_len {cfg.data.max_seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    data_args = dict(tokenizer=tokenizer, max_seq_len=cfg.data.max_seq_len, train_on=cfg.data.train_on,
                     overlong=cfg.data.overlong, on_bad_row=cfg.data.on_bad_row, progress=dist.is_main)
    train_set = SFTDataset(cfg.data.train, **data_args)
    logger.print(train_set.summary())
    logger.print("one training example, trained tokens in [[...]]:\n" + format_example(tokenizer, train_set[0]))
    if cfg.global_batch % (cfg.micro_batch * dist.world_size):
        raise ValueError(f"global_batch {cfg.global_batch} must be a multiple of micro_batch {cfg.micro_batch} "
                         f"x world size {dist.world_size}")
    accum_steps = cfg.global_batch // (cfg.micro_batch * dist.world_size)
    train_data = ChatBatches(train_set, cfg.micro_batch, dist.rank, dist.world_size, cfg.seed, pack=cfg.data.pack,
                             pin_memory=dist.device.type == "cuda")
    val_data = None
    if cfg.data.val:
        val_data = ChatBatches(SFTDataset(cfg.data.val, **data_args), cfg.micro_batch, dist.rank, dist.world_size,
                               cfg.seed, pack=cfg.data.pack)
    steps = cfg.steps or cfg.epochs * train_data.batches_per_epoch()

    # ---- model: built on meta, parallelized, then the checkpoint's weights copied in
    with torch.device("meta"):
        model = GPT(mcfg)
    model = parallelize(model, cfg.parallel, dist)
    model.to_empty(device=dist.device)
    if ckpt_dir is not None:
        load_hf_weights_(model, ckpt_dir)
    else:
        model.init_weights(seed=cfg.seed)
    optimizer = build_optimizer(model, cfg.optim, dist.device)

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
    throughput = Throughput(mcfg.flops_per_token(cfg.data.max_seq_len), dist.device, dist.world_size)
    logger.print(f"model {mcfg.model_type} {mcfg.num_params() / 1e6:.2f}M params | world {dist.world_size} | "
                 f"global batch {cfg.global_batch} = {accum_steps} micro-batches of {cfg.micro_batch} per rank | "
                 f"{steps} steps")

    def save(step: int) -> None:
        extra = {"data": train_data.state_dict(), "skipped_steps": skipped,
                 "model_config": dataclasses.asdict(mcfg), "tokenizer_dir": str(tokenizer_dir)}
        path = save_checkpoint(out_dir, step, model, optimizer, extra, to_dict(cfg), cfg.checkpoint.keep_last)
        logger.print(f"checkpoint saved: {path}")

    model.train()
    step = start_step
    val_loss = None
    while step < steps:
        lr = lr_at(step, cfg.optim, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # The loss is normalised by the trained tokens of the whole step (all micro-batches, all
        # ranks), counted before any forward, so every trained token weighs the same.
        micro_batches = [train_data.next_batch() for _ in range(accum_steps)]
        step_tokens = all_reduce_sum(torch.tensor(float(sum(num_trainable(b) for b in micro_batches)),
                                                  device=dist.device))
        loss_sum = torch.zeros((), device=dist.device)
        for batch in micro_batches:
            batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()}
            with autocast(cfg.parallel, dist):
                loss = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=attention_mask_for(batch),
                             targets=batch["labels"]) / step_tokens  # summed over trained tokens / step's count
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
        throughput.add(sum(b["input_ids"].numel() for b in micro_batches) * dist.world_size)

        if step % cfg.log.every == 0 or step == steps:
            logger.log(step, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                              "trained_tokens": int(step_tokens.item()),
                              **throughput.report(steps - step, cfg.log.every)}, steps)
        if val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            val_loss = evaluate(model, val_data, cfg.eval_batches, dist, cfg.parallel)
            logger.log(step, {"loss": val_loss}, steps, prefix="val")
            model.train()
        stopping = stop_votes > 0 or step == cfg.stop_at_step
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or step == steps:
            save(step)
        if stopping:
            logger.print(f"stopped at step {step}; resume with the same command")
            break

    result = {"step": step, "val_loss": val_loss, "loss": loss_value if step > start_step else None}
    if step == steps and cfg.checkpoint.export_hf:
        final = out_dir / "final"
        export_hf(model, final, tokenizer_dir=tokenizer_dir)
        tokenizer.save(final)  # also writes the chat template the model was trained with
        logger.print(f"Hugging Face model written to {final}")
        result["final_dir"] = str(final)
        if dist.is_main and cfg.sample_tokens:
            result["sample"] = sample_chat(final, cfg.sample_prompt, cfg.sample_tokens, dist.device)
            logger.print(f"--- sample ---\nuser: {cfg.sample_prompt}\nassistant: {result['sample']}\n--------------")
        barrier()
    logger.close()
    teardown_distributed()
    return result


@torch.no_grad()
def evaluate(model, data: ChatBatches, max_batches: int, dist, parallel_cfg) -> float:
    """Mean loss per trained token over the first `max_batches` global batches."""
    model.eval()
    total = torch.zeros(2, device=dist.device)  # (loss sum, trained tokens)
    for batch in data.iter_eval(max_batches):
        total[1] += num_trainable(batch)
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        with autocast(parallel_cfg, dist):
            total[0] += model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=attention_mask_for(batch),
                              targets=batch["labels"])
    all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def sample_chat(model_dir, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy answer of the exported model to one user message (reloading it checks the export)."""
    from checkpoints.hf import load_hf
    from model.generate import generate

    tok = Tokenizer.from_dir(model_dir)
    model = load_hf(model_dir, device=device).eval()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    new = generate(model, [ids], max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    return tok.decode(new)


if __name__ == "__main__":
    main(parse_config(SFTConfig))
