"""GRPO: the DeepSeek-R1 recipe as one readable loop. Sample G completions per prompt with the
policy itself, score them with reward functions, push the policy toward the completions that beat
their group. Every parameter or LoRA / QLoRA adapters (`lora:`); one process or FSDP2 under torchrun.

    python -m train.grpo --config configs/grpo/tiny.yaml
    python -m train.grpo --config configs/grpo/qwen3-0.6b-gsm8k.yaml
    torchrun --nproc_per_node=8 -m train.grpo --config configs/grpo/qwen3-0.6b-gsm8k.yaml

A step: (every grpo.mu steps) take this rank's prompts, generate G completions each with the
rollout engine (model/generate.py, in this process: no second server, no weight sync), score them
with every reward function (weighted sum), compute group-relative advantages, keep the sampler's
log-probs as the old policy's and the reference's log-probs when beta > 0 (queued before the
scoring, so the GPU runs the reference forward while the host runs the reward functions); then the clipped
policy-ratio objective (algos/grpo.py) over the completions in micro-batches, each micro-batch's sum
divided by the step's normaliser. Shao et al. 2024 (https://arxiv.org/abs/2402.03300), DeepSeek-AI
2025 (https://arxiv.org/abs/2501.12948); DAPO's clip-higher and token-level loss, Dr. GRPO's
unscaled advantages and GSPO's sequence ratio are options (algos/grpo.py has the papers).

Reward functions are named by import path in the YAML (`algos.rewards:boxed_math`) or passed from
Python: `train.grpo.main(cfg, reward_funcs=[fn, ...])`, TRL's convention: fn(prompts, completions,
**row_fields) -> one float per completion.

Left out on purpose: a separate inference server (vLLM) and its weight sync, asynchronous or
off-policy rollouts, value models (PPO), DAPO's resampling of uniform groups (they are skipped and
counted instead), entropy bonuses, multi-turn and tool-use rollouts.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from algos.grpo import AGGREGATIONS, NORMALISERS, RATIOS, clip_fractions, group_advantages, informative_groups, \
    mean_kl, per_token_loss
from algos.rewards import score_completions
from checkpoints.hf import export_hf
from checkpoints.io import save_checkpoint
from checkpoints.peft import export_lora
from model.generate import RolloutEngine
from model.gpt import GPT
from model.lora import apply_lora, disable_lora, freeze_base, init_lora_weights
from model.masks import packed_mask
from model.tokenizer import Tokenizer
from train.batching import ChatBatches
from train.config import (
    CheckpointConfig, LogConfig, LoRAConfig, ModelSource, OptimConfig, ParallelConfig, PromptDataConfig, parse_config,
    resolve_model, to_dict,
)
from train.dist import all_reduce_sum, barrier, catch_stop_signals, setup_distributed, teardown_distributed
from train.log import Throughput, seconds_since
from train.optim import build_optimizer, clip_grad_norm_, lr_at
from train.parallel import autocast, compute_dtype, forward_only, freeze_in_compute_dtype, parallelize
from train.prompt_data import PromptDataset, completion_batch
from train.plot import write_curves
from train.run import check_finite, load_or_init_weights, report_export, resume_or_start, sample_chat, start_run


@dataclass
class GRPOSettings:
    """Rollouts, rewards and the objective."""

    num_generations: int = 8
    """G: completions sampled per prompt; advantages are relative to the group."""
    mu: int = 1
    """Optimizer steps on each rollout (mu > 1 reuses it, with the sampler's log-probs as the old policy)."""
    max_completion_len: int = 256
    """Most tokens a completion may have."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling (1.0: off; anything else makes the old log-probs those of the filtered distribution)."""
    reward_funcs: list[str] = field(default_factory=lambda: ["algos.rewards:boxed_math"])
    """Reward functions by import path module:function (TRL's signature)."""
    reward_weights: list[float] | None = None
    """One weight per reward function (None: all 1)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage = reward - group mean, divided by the group's std, the batch's, or nothing (Dr. GRPO)."""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """grpo: mean over each completion's tokens, then over completions; dapo: mean over all tokens of
    the step; dr_grpo: sum over tokens / (completions x max_completion_len)."""
    ratio: Literal["token", "sequence"] = "token"
    """token: a policy ratio per token (GRPO); sequence: one length-normalised ratio per completion (GSPO)."""
    clip_low: float = 0.2
    """The ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """...and above at 1 + clip_high (DAPO's clip-higher: 0.28)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference policy (0: no reference at all)."""
    reference: Literal["auto", "copy", "adapters_off"] = "auto"
    """With beta > 0: a frozen copy, or the same network with adapters off (auto: adapters_off with LoRA)."""
    mask_truncated: bool = False
    """Leave completions that hit max_completion_len out of the loss (DAPO's overlong filtering)."""
    skip_uniform_groups: bool = False
    """Leave groups whose rewards are all equal out of the loss (they teach nothing); counted."""
    share_prompt: bool = True
    """Score a prompt's completions in one row, the prompt once (its forward and backward done once per
    group in a micro-batch, not once per completion); the same log-probs. false: a row per completion."""
    log_completions_every: int = 10
    """Print two completions with their rewards, and write the step's to completions.jsonl, every N steps."""


@dataclass
class GRPOConfig:
    """Reinforcement learning from verifiable rewards with GRPO, full or LoRA / QLoRA."""

    out_dir: str = "runs/grpo"
    """Run folder: config, metrics.jsonl, completions.jsonl, checkpoints, final/."""
    seed: int = 0
    """Seed of the prompt order, the rollouts (a function of seed, step and rank) and the initial adapters."""
    device: str = "auto"
    """auto (cuda if present), cuda or cpu."""
    steps: int | None = None
    """Optimizer steps; None makes `epochs` passes over the prompts (x mu)."""
    epochs: int = 1
    """Passes over the prompts when `steps` is None."""
    global_batch: int = 16
    """Prompts per rollout over all ranks (each gets num_generations completions)."""
    micro_batch: int = 8
    """Completions per forward/backward on each rank."""
    eval_every: int = 0
    """Greedy accuracy on data.val every N steps (0: only at the end, when data.val is set)."""
    eval_batches: int = 20
    """Global batches of validation prompts per evaluation."""
    stop_at_step: int | None = None
    """End this session at that step with a checkpoint (rerun to continue)."""
    nonfinite: Literal["error", "skip"] = "error"
    """On a NaN/inf loss or gradient: stop with an error, or skip the step."""
    max_skipped_steps: int = 10
    """With nonfinite=skip, stop with an error after this many skipped steps."""
    sample_prompt: str = "What is 12 + 30?"
    """User message the final model answers at the end of the run."""
    sample_tokens: int = 64
    """Tokens of that answer (0 skips it)."""
    model: ModelSource = field(default_factory=ModelSource)
    """The starting policy (model.checkpoint: an HF dir or Hub id), usually an instruct or SFT model."""
    lora: LoRAConfig | None = None
    """LoRA / QLoRA adapters; null trains every parameter."""
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    """Rollouts, rewards and the objective."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    """The prompts."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0,
                                                                   schedule="constant", betas=(0.9, 0.99)))
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2, activation checkpointing, compile, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints and the HF export."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""


def main(cfg: GRPOConfig, reward_funcs: list[Callable] | None = None) -> dict:
    dist = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    logger = start_run(cfg.out_dir, cfg.log, cfg, dist)
    reward_funcs = reward_funcs or [import_function(name) for name in cfg.grpo.reward_funcs]
    G = cfg.grpo.num_generations

    # ---- tokenizer and data: prompts rendered with the model's chat template and its generation prompt
    mcfg, ckpt_dir = resolve_model(cfg.model)
    tokenizer_dir = cfg.data.tokenizer or ckpt_dir
    if tokenizer_dir is None:
        raise ValueError("data.tokenizer is required when the model is a preset (no checkpoint to take it from)")
    tokenizer = Tokenizer.from_dir(tokenizer_dir, default_chat_template=cfg.data.chat_template)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                         f"ids ({tokenizer_dir})")
    max_len = cfg.data.max_prompt_len + cfg.grpo.max_completion_len
    if max_len > mcfg.max_seq_len:
        raise ValueError(f"data.max_prompt_len + grpo.max_completion_len = {max_len} exceeds the model's "
                         f"max_seq_len {mcfg.max_seq_len}")
    data_args = dict(tokenizer=tokenizer, prompt_field=cfg.data.prompt_field, system_prompt=cfg.data.system_prompt,
                     max_prompt_len=cfg.data.max_prompt_len, on_bad_row=cfg.data.on_bad_row)
    train_set = PromptDataset(cfg.data.train, **data_args)
    logger.print(train_set.summary())
    logger.print("one prompt:\n" + tokenizer.decode(train_set[0]["prompt_ids"], skip_special_tokens=False))
    if cfg.global_batch % dist.world_size or (cfg.global_batch // dist.world_size * G) % cfg.micro_batch:
        raise ValueError(f"global_batch {cfg.global_batch} prompts must split evenly over {dist.world_size} ranks, "
                         f"and each rank's {G} completions per prompt into micro_batch {cfg.micro_batch}")
    prompts_per_rank = cfg.global_batch // dist.world_size
    accum_steps = prompts_per_rank * G // cfg.micro_batch
    keep_samples = lambda samples, pad_id: samples  # noqa: E731 - prompts stay lists until the rollout
    train_data = ChatBatches(train_set, prompts_per_rank, dist.rank, dist.world_size, cfg.seed, collate=keep_samples)
    val_data = None
    if cfg.data.val:
        val_data = ChatBatches(PromptDataset(cfg.data.val, **data_args), prompts_per_rank, dist.rank,
                               dist.world_size, cfg.seed, collate=keep_samples)
    steps = cfg.steps or cfg.epochs * train_data.batches_per_epoch() * cfg.grpo.mu

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

    # ---- the reference policy (beta > 0 only), frozen: a copy, or the adapters switched off
    reference = pick_reference(cfg.grpo, cfg.lora)
    ref_model = None
    if reference == "copy":
        with torch.device("meta"):
            ref_model = GPT(mcfg)
        ref_model = parallelize(ref_model, forward_only(cfg.parallel), dist)
        ref_model.to_empty(device=dist.device)
        load_or_init_weights(ref_model, ckpt_dir, cfg.seed)
        freeze_in_compute_dtype(ref_model, cfg.parallel, dist)

    # ---- the rollout engine: generation with the policy itself, a static cache sized once
    # It samples in the compute dtype, as the trainer scores; on CUDA from a snapshot of the policy with
    # its linear weights in that dtype and any adapters merged (model/generate.py), refreshed every rollout.
    engine = RolloutEngine(model, max_batch=prompts_per_rank * G, max_prompt_len=cfg.data.max_prompt_len,
                           max_new_tokens=cfg.grpo.max_completion_len, dtype=compute_dtype(cfg.parallel, dist.device))
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
    throughput = Throughput(mcfg.flops_per_token(max_len), dist.device, dist.world_size,
                            tokens_seen=extra.get("tokens_seen", 0) if extra else 0)
    what = "all trainable" if cfg.lora is None else (
        f"{trainable / 1e6:.3f}M trainable (LoRA r={cfg.lora.r}{', NF4 base' if cfg.lora.quantize == 'nf4' else ''})")
    logger.print(f"model {mcfg.model_type} {mcfg.num_params() / 1e6:.2f}M params, {what} | world {dist.world_size} | "
                 f"{cfg.global_batch} prompts x {G} completions per rollout = {accum_steps} micro-batches of "
                 f"{cfg.micro_batch} per rank | reference {reference} | {steps} steps")
    if engine.cuda_graphs:  # minutes of silence otherwise
        logger.print(f"the first rollout compiles and captures the decode step for batch sizes {engine.buckets}")

    def save(step: int) -> None:
        extra = {"data": train_data.state_dict(), "skipped_steps": skipped, "tokens_seen": throughput.tokens_seen,
                 "model_config": dataclasses.asdict(mcfg), "tokenizer_dir": str(tokenizer_dir)}
        path = save_checkpoint(out_dir, step, model, optimizer, extra, to_dict(cfg), cfg.checkpoint.keep_last,
                               trainable_only=cfg.lora is not None)
        logger.print(f"checkpoint saved: {path}")
        if dist.is_main:
            write_curves(out_dir)

    def rollout_phase(prompts: list[dict], step: int) -> dict:
        """G completions of each prompt, their rewards and advantages, the sampler's and the reference's
        log-probs, cut into training micro-batches. Phase times are measured here."""
        times = {}
        t0 = time.perf_counter()
        model.eval()  # no dropout while sampling
        prompt_ids = [p["prompt_ids"] for p in prompts for _ in range(G)]  # (N,) grouped: G per prompt
        # The rollout's randomness is a function of (seed, step, rank): a resumed run samples what the
        # uninterrupted one would.
        completions, sampler_logps, entropies = engine.generate(
            prompt_ids, temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p, stop_ids=tokenizer.stop_ids,
            pad_id=tokenizer.pad_id or 0, seed=(cfg.seed * 1_000_003 + step) * 1_009 + dist.rank,
            return_logprobs=True, return_entropies=True)
        times["generate"] = time.perf_counter() - t0

        # Training micro-batches: prompt + completion, the completion's tokens scored, the sampler's
        # log-probs aligned with the targets they scored. The reference's log-probs need no reward, so
        # they are queued first: on a GPU the reference forward runs while the host scores the completions.
        t0 = time.perf_counter()
        micro_batches = []
        for start in range(0, len(completions), cfg.micro_batch):
            rows_mb = range(start, start + cfg.micro_batch)
            batch = completion_batch([prompt_ids[i] for i in rows_mb], [completions[i] for i in rows_mb],
                                     [sampler_logps[i] for i in rows_mb], tokenizer.pad_id or 0, dist.device,
                                     cfg.grpo.share_prompt, [entropies[i] for i in rows_mb])
            if cfg.grpo.beta:
                with torch.no_grad(), autocast(cfg.parallel, dist), disable_lora(ref_model or model):
                    batch["ref_logps"] = completion_logps(ref_model or model, batch, cfg.grpo.temperature)
            micro_batches.append(batch)
        reference_launch = time.perf_counter() - t0

        t0 = time.perf_counter()
        texts = [tokenizer.decode(c) for c in completions]
        rows = [p["row"] for p in prompts for _ in range(G)]
        prompt_msgs = [p["prompt"] for p in prompts for _ in range(G)]
        rewards, per_function = score_completions(reward_funcs, cfg.grpo.reward_weights, prompt_msgs, texts, rows)
        times["score"] = time.perf_counter() - t0

        # Advantages: reward minus its group's mean, scaled (the batch's std spans every rank).
        if cfg.grpo.scale_rewards == "batch" and dist.distributed:
            sums = all_reduce_sum(torch.stack([rewards.sum(), (rewards ** 2).sum(), torch.tensor(float(len(rewards)))]
                                              ).to(dist.device)).cpu()
            std = ((sums[1] - sums[0] ** 2 / sums[2]) / (sums[2] - 1)).clamp(min=0).sqrt()
            advantages = group_advantages(rewards, G, "none") / (std + 1e-4)
        else:
            advantages = group_advantages(rewards, G, cfg.grpo.scale_rewards)
        keep, uniform_groups = informative_groups(rewards, G)
        truncated = torch.tensor([len(c) >= cfg.grpo.max_completion_len and (not c or c[-1] not in tokenizer.stop_ids)
                                  for c in completions])
        in_loss = torch.ones(len(completions), dtype=torch.bool)
        if cfg.grpo.skip_uniform_groups:
            in_loss &= keep
        if cfg.grpo.mask_truncated:
            in_loss &= ~truncated
        normaliser = torch.zeros((), device=dist.device)
        advantages_dev, in_loss_dev = advantages.to(dist.device), in_loss.to(dist.device)
        for start, batch in zip(range(0, len(completions), cfg.micro_batch), micro_batches):
            batch["advantages"] = advantages_dev[start:start + cfg.micro_batch]
            batch["loss_mask"] = batch["completion_mask"] & in_loss_dev[start:start + cfg.micro_batch, None]
            normaliser += NORMALISERS[cfg.grpo.loss_type](batch["loss_mask"], cfg.grpo.max_completion_len)
        # The reference phase: queueing it, and whatever of its GPU work outlasted the scoring.
        times["reference"] = reference_launch + seconds_since(time.perf_counter(), dist.device)
        model.train()

        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        stats = {"reward": rewards.mean(), "reward_std": rewards.std() if len(rewards) > 1 else torch.tensor(0.0),
                 **{f"rewards/{name}": r.mean() for name, r in per_function.items()},
                 "accuracy": (next(iter(per_function.values())) > 0).float().mean(),
                 "completion_len": lengths.mean(), "completion_len_max": lengths.max(),
                 "truncated": truncated.float().mean(), "uniform_groups": uniform_groups.float()}
        if dist.is_main and cfg.grpo.log_completions_every and step % cfg.grpo.log_completions_every == 0:
            with open(out_dir / "completions.jsonl", "a", encoding="utf-8") as f:
                for i, text in enumerate(texts):
                    f.write(json.dumps({"step": step, "prompt": tokenizer.decode(prompt_ids[i]), "completion": text,
                                        "reward": rewards[i].item(), "advantage": advantages[i].item()}) + "\n")
            for i in (0, len(texts) - 1):
                logger.print(f"--- step {step} completion {i} (reward {rewards[i].item():+.2f}) ---\n{texts[i]}")
        return {"micro_batches": micro_batches, "normaliser": all_reduce_sum(normaliser).clamp(min=1),
                "stats": stats, "times": times}

    @torch.no_grad()
    def evaluate() -> dict:
        """Greedy completions of the validation prompts, scored: the mean reward and accuracy."""
        model.eval()
        totals = torch.zeros(3, device=dist.device)  # reward sum, correct, prompts
        for prompts in val_data.iter_eval(cfg.eval_batches):
            real = [p for p in prompts if p["weight"] > 0]
            if not real:
                continue
            completions = engine.generate([p["prompt_ids"] for p in real], temperature=0.0,
                                          stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0)
            texts = [tokenizer.decode(c) for c in completions]
            rewards, per_function = score_completions(reward_funcs, cfg.grpo.reward_weights, [p["prompt"] for p in real],
                                                      texts, [p["row"] for p in real])
            first = next(iter(per_function.values()))
            totals += torch.tensor([rewards.sum().item(), (first > 0).sum().item(), len(real)], device=dist.device)
        all_reduce_sum(totals)
        model.train()
        return {"reward": totals[0] / totals[2].clamp(min=1), "accuracy": totals[1] / totals[2].clamp(min=1)}

    rollout = None  # the current rollout, reused for grpo.mu steps

    # ---- the step loop: the same lines in every loop (tests/test_skeleton.py), but for the algorithm's
    model.train()
    step = start_step
    val_metrics = {}
    while step < steps:
        lr = lr_at(step, cfg.optim, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # >>> algorithm: every mu steps a rollout (generate, score, advantages, reference); then the
        # clipped policy-ratio objective over its completions, each micro-batch's sum divided by the
        # normaliser of the whole step (all micro-batches, all ranks)
        if rollout is None or step % cfg.grpo.mu == 0:
            rollout = rollout_phase(train_data.next_batch(), step)
        micro_batches = rollout["micro_batches"]
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dist.device)
        # clipped low, clipped high, kl, sampler mismatch, sampling entropy, tokens
        token_stats = torch.zeros(6, device=dist.device)
        for batch in micro_batches:
            with autocast(cfg.parallel, dist):
                logps = completion_logps(model, batch, cfg.grpo.temperature)  # (B, C), 0 past each completion
            mask = batch["loss_mask"]
            # mu = 1: pi_old is the policy itself (ratio 1, the plain policy gradient); mu > 1: the sampler's.
            old_logps = None if cfg.grpo.mu == 1 else batch["old_logps"]
            token_loss = per_token_loss(logps, old_logps, batch["advantages"], mask, ref_logps=batch.get("ref_logps"),
                                        beta=cfg.grpo.beta, clip_low=cfg.grpo.clip_low, clip_high=cfg.grpo.clip_high,
                                        ratio=RATIOS[cfg.grpo.ratio])  # (B, T)
            loss = AGGREGATIONS[cfg.grpo.loss_type](token_loss, mask) / rollout["normaliser"]
            loss.backward()
            loss_sum += loss.detach()
            with torch.no_grad():
                n = mask.sum()
                log_ratio = RATIOS[cfg.grpo.ratio](logps, logps if old_logps is None else old_logps, mask)
                low, high = clip_fractions(log_ratio, batch["advantages"], mask, cfg.grpo.clip_low, cfg.grpo.clip_high)
                kl = mean_kl(logps, batch["ref_logps"], mask) if "ref_logps" in batch else torch.zeros(())
                mismatch = ((logps - batch["old_logps"]).abs() * mask).sum() / n.clamp(min=1)
                entropy = (batch["entropies"] * mask).sum()  # the sampler's, of the tokens trained on
                token_stats += torch.stack([low * n, high * n, kl * n, mismatch * n, entropy, n.float()]).to(token_stats)
        all_reduce_sum(token_stats)
        n_tokens = token_stats[5].clamp(min=1)
        step_metrics = {**rollout["stats"], "clip/low": token_stats[0] / n_tokens, "clip/high": token_stats[1] / n_tokens,
                        "kl": token_stats[2] / n_tokens, "logprob_mismatch": token_stats[3] / n_tokens,
                        "entropy": token_stats[4] / n_tokens, **{f"time/{k}": v for k, v in rollout["times"].items()},
                        "time/train": seconds_since(t0, dist.device)}
        rollout["times"] = {}  # a reused rollout (mu > 1) reports no generation time again
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

    result = {"step": step, "val_accuracy": val_metrics.get("accuracy"), "val_reward": val_metrics.get("reward")}
    if step == steps and cfg.checkpoint.export_hf:
        final = out_dir / "final"
        if cfg.lora is None:
            export_hf(model, final, tokenizer=tokenizer)
            logger.print(f"Hugging Face model written to {final}")
        else:
            export_lora(model, final, ckpt_dir, tokenizer=tokenizer, merge=cfg.lora.merge, base_name=cfg.model.checkpoint)
            logger.print(f"PEFT adapter written to {final}" + (f", merged model to {final / 'merged'}"
                                                                 if cfg.lora.merge else ""))
        report_export(model, final, cfg, loop="grpo", base_dir=ckpt_dir, adapter=cfg.lora is not None,
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


def pick_reference(grpo: GRPOSettings, lora_cfg: LoRAConfig | None) -> str:
    """The reference policy's form: none when beta is 0, else what `auto` stands for, checked."""
    if grpo.beta == 0:
        return "none"
    reference = grpo.reference
    if reference == "auto":
        reference = "adapters_off" if lora_cfg else "copy"
    if reference == "adapters_off" and lora_cfg is None:
        raise ValueError("grpo.reference adapters_off needs a lora: section (the base without adapters is the reference)")
    return reference


def import_function(path: str) -> Callable:
    """`package.module:function` -> the function (reward functions named in the YAML)."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"grpo.reward_funcs: {path!r} is not module:function (e.g. algos.rewards:boxed_math)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"grpo.reward_funcs: cannot import {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"grpo.reward_funcs: {path!r} is not callable")
    return fn


def completion_logps(model, batch, temperature: float) -> torch.Tensor:
    """Per-token log-probs of each completion's tokens (N, C), 0 past its end, under softmax(logits /
    temperature), through the chunked per-token head over completion_batch's rows (attn_mask: the
    shared-prefix mask of its document_ids, built on the first call and kept in the batch for the others:
    the reference's forward and every training pass; rows of one completion each are plainly causal)."""
    if "document_ids" in batch and "attn_mask" not in batch:
        batch["attn_mask"] = packed_mask(batch["document_ids"], model.config.sliding_window, shared_prefix=True)
    token_logps = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch.get("attn_mask"),
                        targets=batch["targets"], logprobs=True, temperature=temperature)  # (R, T), 0 where not scored
    return token_logps.flatten()[batch["index"]] * batch["completion_mask"]


if __name__ == "__main__":
    main(parse_config(GRPOConfig))
