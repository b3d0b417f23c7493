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

Left out on purpose: tensor/pipeline/context parallelism, MoE, curriculum or data mixing. Float8
matmuls are an option (`parallel.float8`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from checkpoints.hf import export_hf
from checkpoints.io import save_checkpoint
from model.gpt import GPT
from train.batching import TokenWindows, num_targets, to_device
from train.config import (
    CheckpointConfig, LogConfig, ModelSource, OptimConfig, ParallelConfig, parse_config, resolve_model, to_dict,
)
from train.corpus import load_meta, prepare, source_mismatch, source_record, unigram_baseline
from train.dist import all_reduce_sum, barrier, catch_stop_signals, setup_distributed, teardown_distributed
from train.log import Throughput
from train.optim import build_optimizer, clip_grad_norm_, lr_at
from train.parallel import autocast, parallelize
from train.plot import write_curves
from train.run import check_finite, evaluate_loss, load_or_init_weights, report_export, resume_or_start, start_run


@dataclass
class PretrainData:
    """Token shards made by `python -m train.corpus prepare` (made here on first use from `inputs`)."""

    dir: str = "runs/data/shakespeare"
    """Folder with meta.json and the token shards."""
    inputs: list[str] = field(default_factory=list)
    """Text/JSONL/Parquet files to tokenize into `dir` if it holds no meta.json yet; a `dir` made from
    other inputs (names, sizes, tokenizer or split differ) is an error. [] uses `dir` as it is."""
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
    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny"))
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


def main(cfg: PretrainConfig) -> dict:
    dist = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    logger = start_run(cfg.out_dir, cfg.log, cfg, dist)

    # ---- data: tokenized shards (prepared once, by rank 0)
    data_dir = Path(cfg.data.dir)
    if dist.is_main and not (data_dir / "meta.json").exists():
        if not cfg.data.inputs:
            raise FileNotFoundError(f"data.dir {data_dir} has no meta.json and data.inputs is empty")
        prepare(cfg.data.inputs, data_dir, tokenizer_dir=cfg.data.tokenizer, text_field=cfg.data.text_field,
                val_fraction=cfg.data.val_fraction, vocab_size=cfg.data.tokenizer_vocab_size)
    barrier()
    meta = load_meta(data_dir)
    # A data.dir made earlier from other inputs would train on the wrong text, silently. (Inputs deleted
    # since the folder was made are no reason to stop.)
    if cfg.data.inputs and all(Path(p).is_file() for p in cfg.data.inputs):
        wanted = source_record(cfg.data.inputs, cfg.data.tokenizer, cfg.data.text_field, cfg.data.val_fraction,
                               cfg.data.tokenizer_vocab_size)
        mismatch = source_mismatch(meta, wanted)
        if mismatch:
            raise ValueError(f"data.dir {data_dir} was prepared from other inputs ({mismatch}); point data.dir at a "
                             f"new folder, or delete {data_dir} to tokenize again")
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
    mcfg, ckpt_dir = resolve_model(cfg.model)
    if meta["vocab_size"] > mcfg.vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {meta['vocab_size']} "
                         f"ids ({data_dir / 'meta.json'}); set model.vocab_size")
    if seq_len > mcfg.max_seq_len:
        raise ValueError(f"data.seq_len {seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    train_data = TokenWindows(data_dir, "train", seq_len, cfg.micro_batch, dist.rank, dist.world_size, cfg.seed,
                              pin_memory=dist.device.type == "cuda", vocab_size=mcfg.vocab_size)
    val_data = TokenWindows(data_dir, "val", seq_len, cfg.micro_batch, dist.rank, dist.world_size, cfg.seed,
                            vocab_size=mcfg.vocab_size)
    steps = cfg.steps
    tokenizer_dir = ckpt_dir or meta.get("tokenizer")

    # ---- model: built on meta, parallelized (checkpointing, compile, FSDP2), materialised, then
    # initialised or loaded shard by shard
    with torch.device("meta"):
        model = GPT(mcfg)
    model = parallelize(model, cfg.parallel, dist)
    model.to_empty(device=dist.device)
    load_or_init_weights(model, ckpt_dir, cfg.seed)
    optimizer = build_optimizer(model, cfg.optim, dist.device)

    # ---- resume from the newest complete checkpoint (any world size)
    start_step, extra = resume_or_start(cfg.out_dir, cfg.checkpoint, cfg, model, optimizer, dist, logger)
    skipped = extra["skipped_steps"] if extra else 0
    if extra:
        train_data.load_state_dict(extra["data"])
    if start_step >= steps:  # a finished run: nothing to train, nothing to overwrite
        logger.print(f"{out_dir} is complete ({start_step} steps); its model is in {out_dir / 'final'}")
        logger.close()
        teardown_distributed()
        return {"step": start_step, "complete": True, "final_dir": str(out_dir / "final")}

    stop_signal = catch_stop_signals()
    throughput = Throughput(mcfg.flops_per_token(seq_len), dist.device, dist.world_size,
                            tokens_seen=extra.get("tokens_seen", 0) if extra else 0)
    logger.print(f"model {mcfg.model_type} {mcfg.num_params() / 1e6:.2f}M params | world {dist.world_size} | "
                 f"global batch {global_batch} x {seq_len} tokens = {accum_steps} micro-batches of "
                 f"{cfg.micro_batch} per rank | {steps} steps")

    def save(step: int) -> None:
        extra = {"data": train_data.state_dict(), "skipped_steps": skipped, "tokens_seen": throughput.tokens_seen,
                 "model_config": dataclasses.asdict(mcfg), "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None}
        path = save_checkpoint(out_dir, step, model, optimizer, extra, to_dict(cfg), cfg.checkpoint.keep_last)
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

        # >>> algorithm: next-token loss, summed over each micro-batch's target tokens and divided by the
        # target tokens of the whole step (all micro-batches, all ranks), so every token weighs the same
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
        step_metrics = {}
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

    result = {"step": step, "val_loss": val_metrics.get("loss")}
    if step == steps:
        result.update(_finish(cfg, model, tokenizer_dir, data_dir, dist, logger, val_metrics.get("loss")))
        if cfg.checkpoint.export_hf:
            report_export(model, out_dir / "final", cfg, loop="pretrain", base_dir=None, adapter=False,
                          datasets=[str(cfg.data.dir)], metrics={"step": step, "tokens": throughput.tokens_seen,
                                                                 "loss": loss_value, "val_loss": val_metrics.get("loss")},
                          dist=dist, logger=logger)
    logger.close()
    teardown_distributed()
    return result


def _finish(cfg, model, tokenizer_dir, data_dir, dist, logger, val_loss) -> dict:
    """Export final/ in HF format, compare with the unigram baseline, print a sample."""
    out = {}
    if cfg.checkpoint.export_hf:
        final = Path(cfg.out_dir) / "final"
        export_hf(model, final, tokenizer=tokenizer_dir)
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
