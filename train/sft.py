"""Supervised fine-tuning on chat data: every parameter, or LoRA / QLoRA adapters through the
`lora:` section; one process or FSDP2 under torchrun.

    python -m train.sft --config configs/sft/qwen2.5-0.5b-fastchat.yaml
    python -m train.sft --config configs/lora/qwen2.5-0.5b-fastchat.yaml          # a config with a lora: section
    python -m train.lora --config configs/lora/qwen2.5-0.5b-fastchat.yaml --lora.quantize nf4   # QLoRA
    torchrun --nproc_per_node=8 -m train.sft --config configs/sft/qwen2.5-0.5b-fastchat.yaml

Conversations (OpenAI messages, ShareGPT, prompt/completion or Alpaca rows) are rendered with the
model's own chat template; the loss is on the assistant's tokens (its end-of-turn token included,
so the model learns to stop), summed and divided by the number of trained tokens of the whole
optimizer step over micro-batches and ranks. Optional packing puts several conversations in one
row with attention blocked between them.

With `lora:` the targeted projections become LoRALinear (Hu et al. 2021,
https://arxiv.org/abs/2106.09685) and only the adapters train; `lora.quantize: nf4` stores the
frozen base in 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).
The base is then loaded whole on each rank, frozen (and quantized), and sharded after; checkpoints
hold the adapters and their optimizer state only.

At the end `<out_dir>/final/` is the full model in Hugging Face format with its tokenizer, or with
LoRA a PEFT adapter (and with `lora.merge` also `final/merged/`, the base with the adapters folded in).

Left out on purpose: multimodal data, tool-call rendering, NEFTune noise, sequence parallelism.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from checkpoints.hf import export_hf
from checkpoints.io import save_checkpoint
from checkpoints.peft import export_lora
from model.gpt import GPT
from model.lora import apply_lora, freeze_base, init_lora_weights
from model.tokenizer import Tokenizer
from train.batching import ChatBatches, num_targets, to_device
from train.chat_data import SFTDataset, format_example
from train.config import (
    ChatDataConfig, CheckpointConfig, LogConfig, LoRAConfig, ModelSource, OptimConfig, ParallelConfig, parse_config,
    resolve_model, to_dict,
)
from train.dist import all_reduce_sum, barrier, catch_stop_signals, setup_distributed, teardown_distributed
from train.log import Throughput
from train.optim import build_optimizer, clip_grad_norm_, lr_at
from train.parallel import autocast, parallelize
from train.plot import write_curves
from train.run import check_finite, evaluate_loss, load_or_init_weights, report_export, resume_or_start, sample_chat, start_run


@dataclass
class SFTConfig:
    """Fine-tune a model on chat data: every parameter, or LoRA / QLoRA adapters (`lora:`)."""

    out_dir: str = "runs/sft"
    """Run folder: config, metrics.jsonl, checkpoints, final/."""
    seed: int = 0
    """Seed of the data order and of the initial adapters (dropout draws from torch's global generator)."""
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
    model: ModelSource = field(default_factory=ModelSource)
    """The network to fine-tune (model.checkpoint: an HF dir or Hub id)."""
    lora: LoRAConfig | None = None
    """LoRA / QLoRA adapters; null trains every parameter."""
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


def main(cfg: SFTConfig) -> dict:
    dist = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    logger = start_run(cfg.out_dir, cfg.log, cfg, dist)

    # ---- tokenizer and data: every conversation rendered with the model's chat template
    mcfg, ckpt_dir = resolve_model(cfg.model)
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

    # ---- model: built on meta. Full fine-tuning shards it there and loads each rank's shard; LoRA
    # swaps the adapters in, loads the base whole, freezes (and quantizes) it, then shards.
    with torch.device("meta"):
        model = GPT(mcfg)
    if cfg.lora is None:
        model = parallelize(model, cfg.parallel, dist)
        model.to_empty(device=dist.device)
        load_or_init_weights(model, ckpt_dir, cfg.seed)
    else:
        apply_lora(model, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.use_rslora)
        model.to_empty(device=dist.device)
        load_or_init_weights(model, ckpt_dir, cfg.seed)
        init_lora_weights(model, seed=cfg.seed)  # after the base: init_weights would also draw the adapters
        freeze_base(model, cfg.lora, dist.device)
        model = parallelize(model, cfg.parallel, dist)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, cfg.optim, dist.device)

    # ---- resume from the newest complete checkpoint (any world size)
    start_step, extra = resume_or_start(cfg.out_dir, cfg.checkpoint, cfg, model, optimizer, dist, logger,
                                        trainable_only=cfg.lora is not None)
    skipped = extra["skipped_steps"] if extra else 0
    if extra:
        train_data.load_state_dict(extra["data"])
    if start_step >= steps:  # a finished run: nothing to train, nothing to overwrite
        logger.print(f"{out_dir} is complete ({start_step} steps); its model is in {out_dir / 'final'}")
        logger.close()
        teardown_distributed()
        return {"step": start_step, "complete": True, "final_dir": str(out_dir / "final")}

    stop_signal = catch_stop_signals()
    throughput = Throughput(mcfg.flops_per_token(cfg.data.max_seq_len), dist.device, dist.world_size,
                            tokens_seen=extra.get("tokens_seen", 0) if extra else 0)
    what = "all trainable" if cfg.lora is None else (
        f"{trainable / 1e6:.3f}M trainable (LoRA r={cfg.lora.r}{', NF4 base' if cfg.lora.quantize == 'nf4' else ''})")
    logger.print(f"model {mcfg.model_type} {mcfg.num_params() / 1e6:.2f}M params, {what} | world {dist.world_size} | "
                 f"global batch {cfg.global_batch} = {accum_steps} micro-batches of {cfg.micro_batch} per rank | "
                 f"{steps} steps")

    def save(step: int) -> None:
        extra = {"data": train_data.state_dict(), "skipped_steps": skipped, "tokens_seen": throughput.tokens_seen,
                 "model_config": dataclasses.asdict(mcfg), "tokenizer_dir": str(tokenizer_dir)}
        path = save_checkpoint(out_dir, step, model, optimizer, extra, to_dict(cfg), cfg.checkpoint.keep_last,
                               trainable_only=cfg.lora is not None)
        logger.print(f"checkpoint saved: {path}")
        if dist.is_main:
            write_curves(out_dir)

    def evaluate() -> dict:
        return {"loss": evaluate_loss(model, val_data.iter_eval(cfg.eval_batches), dist, cfg.parallel)}

    # ---- the step loop: the same lines in every loop (tests/test_skeleton.py), but for the algorithm's
    model.train()
    step = start_step
    val_metrics = {}
    while step < steps:
        lr = lr_at(step, cfg.optim, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # >>> algorithm: next-token loss on the assistant's tokens, summed over each micro-batch and divided
        # by the trained tokens of the whole step (all micro-batches, all ranks), so every token weighs the same
        micro_batches = [train_data.next_batch() for _ in range(accum_steps)]
        step_tokens = all_reduce_sum(torch.tensor(float(sum(num_targets(b) for b in micro_batches)),
                                                  device=dist.device))
        loss_sum = torch.zeros((), device=dist.device)
        for batch in micro_batches:
            batch = to_device(batch, dist.device)
            with autocast(cfg.parallel, dist):
                loss = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                             document_ids=batch.get("document_ids"), targets=batch["targets"]) / step_tokens
            loss.backward()
            loss_sum += loss.detach()
        step_metrics = {"trained_tokens": step_tokens}
        # <<< algorithm
        # One all-reduce for the loss and the stop flag (any rank told to stop stops them all).
        step_stats = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(stop_signal["stop"]), device=dist.device)]))

        grad_norm = clip_grad_norm_(model, cfg.optim.grad_clip)
        loss_value, stop_votes, grad_norm_value = torch.cat([step_stats, grad_norm[None]]).tolist()  # one host sync
        if check_finite(loss_value, grad_norm_value, step, cfg.nonfinite, skipped, cfg.max_skipped_steps, logger):
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        throughput.add(sum(b["input_ids"].numel() for b in micro_batches) * dist.world_size)

        if step % cfg.log.every == 0 or step == steps:
            logger.log(step, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value, **step_metrics,
                              **throughput.report(steps - step, cfg.log.every)}, steps)
        if val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            val_metrics = evaluate()
            logger.log(step, val_metrics, steps, prefix="val")
        stopping = stop_votes > 0 or step == cfg.stop_at_step
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or step == steps:
            save(step)
        if stopping:
            logger.print(f"stopped at step {step}; resume with the same command")
            break

    result = {"step": step, "val_loss": val_metrics.get("loss"), "loss": loss_value if step > start_step else None}
    if step == steps and cfg.checkpoint.export_hf:
        final = out_dir / "final"
        if cfg.lora is None:
            export_hf(model, final, tokenizer=tokenizer)
            logger.print(f"Hugging Face model written to {final}")
        else:
            export_lora(model, final, ckpt_dir, tokenizer=tokenizer, merge=cfg.lora.merge, base_name=cfg.model.checkpoint)
            logger.print(f"PEFT adapter written to {final}" + (f", merged model to {final / 'merged'}"
                                                                 if cfg.lora.merge else ""))
        report_export(model, final, cfg, loop="sft", base_dir=ckpt_dir, adapter=cfg.lora is not None,
                      datasets=[str(p) for p in cfg.data.train], metrics={"step": step, "tokens": throughput.tokens_seen, "loss": loss_value, **{f"val_{k}": v for k, v in val_metrics.items()}}, dist=dist, logger=logger)
        result["final_dir"] = str(final)
        if dist.is_main and cfg.sample_tokens:
            result["sample"] = sample_chat(final, ckpt_dir if cfg.lora else None, cfg.sample_prompt,
                                           cfg.sample_tokens, dist.device)
            logger.print(f"--- sample ---\nuser: {cfg.sample_prompt}\nassistant: {result['sample']}\n--------------")
        barrier()
    logger.close()
    teardown_distributed()
    return result


if __name__ == "__main__":
    main(parse_config(SFTConfig))
