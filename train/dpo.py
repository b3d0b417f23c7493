"""Preference optimisation on pairs of responses: DPO and its family (cDPO, IPO, hinge, robust,
SimPO, ORPO; KTO on unpaired samples), every parameter or LoRA / QLoRA adapters (`lora:`); one process
or FSDP2 under torchrun.

    python -m train.dpo --config configs/dpo/tiny.yaml
    python -m train.dpo --config configs/dpo/qwen2.5-0.5b-hh-lora.yaml --lora.quantize nf4   # QLoRA
    python -m train.dpo --config configs/dpo/tiny.yaml --dpo.loss kto                         # unpaired
    torchrun --nproc_per_node=8 -m train.dpo --config configs/dpo/qwen2.5-0.5b-hh-full.yaml

One forward of the policy scores the chosen and the rejected response of every pair of a
micro-batch (layout below). The model returns per-token log-probs of the response tokens
(the prompt is masked through the chat template's assistant mask); a response's log-prob is their
sum (or mean, for the length-normalised losses), and algos/dpo.py turns the two into the loss:
Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290) and the variants in its docstrings. The loss
of a step is the mean over its pairs (all micro-batches, all ranks).

The reference policy (`dpo.reference`): a frozen copy of the starting model, sharded like the policy
(copy); the same network with its adapters off, no second copy (adapters_off, LoRA only); its
log-probs computed in one pass before training and kept in the run folder (precomputed: the policy
at step 0 is the reference, so no copy either); or none for the reference-free SimPO and ORPO.

`diff train/sft.py train/dpo.py` shows what preference optimisation changes. At the end
`<out_dir>/final/` is a Hugging Face model, or with LoRA a PEFT adapter, as in SFT.

A micro-batch of B pairs is B rows, each the prompt once followed by the chosen and the rejected
response (`dpo.share_prompt`, the default): both responses attend to the one prompt and not to each
other (model/masks.py's shared prefix), so the prompt's forward and backward are done once per pair
(bench/RESULTS.md: 27% fewer tokens at a 512-token prompt and 448-token responses). With
`share_prompt: false` it is 2B rows, the chosen responses then the rejected ones.

KTO (`dpo.loss: kto`) trains on unpaired samples, one row each; its reference point is the batch's
KL estimate, the policy-reference log-ratio of mismatched rows (each prompt with the next sample's
completion), averaged over the micro-batch on every rank, without gradient, as in the paper. So,
as in TRL, how samples split into micro-batches and ranks changes the estimate.

Left out on purpose: packing several pairs into a row, online/iterative DPO, reward-model training.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from checkpoints.hf import export_hf
from checkpoints.io import save_checkpoint
from checkpoints.peft import export_lora
from algos.dpo import dpo_loss, kto_loss, orpo_loss, simpo_loss
from algos.logprobs import IGNORE_INDEX
from model.files import read_json
from model.gpt import GPT
from model.lora import apply_lora, disable_lora, freeze_base, init_lora_weights
from model.tokenizer import Tokenizer
from train.batching import ChatBatches, to_device
from train.config import (
    CheckpointConfig, LogConfig, LoRAConfig, ModelSource, OptimConfig, ParallelConfig, PreferenceDataConfig,
    parse_config, resolve_model, to_dict,
)
from train.preference_data import (
    KTODataset, PreferenceDataset, collate_kl, collate_pairs, collate_shared_prompt, collate_unpaired, format_pair,
    format_unpaired,
)
from train.dist import all_reduce_sum, barrier, catch_stop_signals, setup_distributed, teardown_distributed
from train.log import Throughput
from train.optim import build_optimizer, clip_grad_norm_, lr_at
from train.parallel import autocast, forward_only, freeze_in_compute_dtype, parallelize
from train.plot import write_curves
from train.run import check_finite, load_or_init_weights, report_export, resume_or_start, sample_chat, start_run


# Losses that need no reference policy, and those computed on length-averaged log-probs.
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo")


@dataclass
class DPOLoss:
    """Which preference loss, and where its reference log-probs come from."""

    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = "sigmoid"
    """sigmoid (DPO; with label_smoothing: cDPO), ipo, hinge (SLiC), robust, simpo, orpo, kto (algos/dpo.py).
    kto trains on unpaired samples (prompt/completion/label rows, or both sides of paired rows), and
    global_batch / micro_batch count samples."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (SimPO's paper uses ~2; ORPO's lambda is this beta)."""
    label_smoothing: float = 0.0
    """sigmoid: conservative DPO's label-flip rate; robust: the known flip rate; simpo: cDPO-style smoothing."""
    simpo_gamma_beta_ratio: float = 0.5
    """SimPO's target reward margin gamma, as gamma / beta."""
    kto_desirable_weight: float = 1.0
    """KTO's lambda_D (the paper: keep lambda_D n_D / (lambda_U n_U) within [1, 4/3])."""
    kto_undesirable_weight: float = 1.0
    """KTO's lambda_U."""
    reference: Literal["auto", "copy", "adapters_off", "precomputed", "none"] = "auto"
    """auto: none for simpo/orpo, adapters_off with LoRA, else copy. precomputed: one pass before
    training, stored in the run folder and reused on resume."""
    share_prompt: bool = True
    """One row per pair: the prompt once, the chosen and the rejected response each continuing it, so
    the prompt's forward (and backward) is done once, not twice; the same log-probs. false: 2B rows."""


@dataclass
class DPOConfig:
    """Optimise a policy on preference pairs: DPO and its family, full or LoRA / QLoRA."""

    out_dir: str = "runs/dpo"
    """Run folder: config, metrics.jsonl, checkpoints, reference log-probs, final/."""
    seed: int = 0
    """Seed of the data order and of the initial adapters (dropout draws from torch's global generator)."""
    device: str = "auto"
    """auto (cuda if present), cuda or cpu."""
    steps: int | None = None
    """Optimizer steps; None trains `epochs` passes over the data."""
    epochs: int = 1
    """Passes over the training pairs when `steps` is None."""
    global_batch: int = 16
    """Pairs per optimizer step over all ranks and micro-batches."""
    micro_batch: int = 2
    """Pairs per forward/backward on each rank (2 x micro_batch rows)."""
    eval_every: int = 0
    """Validation metrics every N steps (0: only at the end, when data.val is set)."""
    eval_batches: int = 20
    """Global batches of validation pairs per evaluation."""
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
    """The starting policy (model.checkpoint: an HF dir or Hub id), usually an SFT model."""
    lora: LoRAConfig | None = None
    """LoRA / QLoRA adapters; null trains every parameter."""
    dpo: DPOLoss = field(default_factory=DPOLoss)
    """The loss and the reference policy."""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    """The preference pairs."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-7, warmup_steps=10, weight_decay=0.0,
                                                                   schedule="linear", min_lr_ratio=0.0))
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2, activation checkpointing, compile, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints and the HF export."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""


def main(cfg: DPOConfig) -> dict:
    dist = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    logger = start_run(cfg.out_dir, cfg.log, cfg, dist)

    # ---- tokenizer and data: prompt + response rendered with the model's chat template, the response scored
    mcfg, ckpt_dir = resolve_model(cfg.model)
    tokenizer_dir = cfg.data.tokenizer or ckpt_dir
    if tokenizer_dir is None:
        raise ValueError("data.tokenizer is required when the model is a preset (no checkpoint to take it from)")
    tokenizer = Tokenizer.from_dir(tokenizer_dir, default_chat_template=cfg.data.chat_template)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                         f"ids ({tokenizer_dir})")
    if cfg.data.max_len > mcfg.max_seq_len:
        raise ValueError(f"data.max_len {cfg.data.max_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    reference = pick_reference(cfg.dpo, cfg.lora)
    data_args = dict(tokenizer=tokenizer, max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len,
                     truncation=cfg.data.truncation, on_bad_row=cfg.data.on_bad_row, progress=dist.is_main)
    kto = cfg.dpo.loss == "kto"
    Dataset = KTODataset if kto else PreferenceDataset
    if kto and cfg.micro_batch < 2:
        raise ValueError("dpo.loss kto needs micro_batch >= 2: its reference point pairs each prompt with "
                         "another sample's completion")
    train_set = Dataset(cfg.data.train, **data_args)
    logger.print(train_set.summary())
    logger.print(f"one training {'sample' if kto else 'pair'}, scored tokens in [[...]]:\n" +
                 (format_unpaired if kto else format_pair)(tokenizer, train_set[0]))
    if cfg.global_batch % (cfg.micro_batch * dist.world_size):
        raise ValueError(f"global_batch {cfg.global_batch} must be a multiple of micro_batch {cfg.micro_batch} "
                         f"x world size {dist.world_size}")
    accum_steps = cfg.global_batch // (cfg.micro_batch * dist.world_size)
    collate = (functools.partial(collate_indexed_kto, max_len=cfg.data.max_len) if kto else
               functools.partial(collate_indexed_pairs, share_prompt=cfg.dpo.share_prompt))
    train_data = ChatBatches(train_set, cfg.micro_batch, dist.rank, dist.world_size, cfg.seed,
                             pin_memory=dist.device.type == "cuda", collate=collate)
    val_data = None
    if cfg.data.val:
        val_data = ChatBatches(Dataset(cfg.data.val, **data_args), cfg.micro_batch, dist.rank,
                               dist.world_size, cfg.seed, collate=collate)
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

    # ---- the reference policy, frozen: a copy, the adapters switched off, log-probs kept from a pass
    # before training, or none
    ref_model, ref_table = None, {}
    if reference == "copy":
        with torch.device("meta"):
            ref_model = GPT(mcfg)
        ref_model = parallelize(ref_model, forward_only(cfg.parallel), dist)
        ref_model.to_empty(device=dist.device)
        load_or_init_weights(ref_model, ckpt_dir, cfg.seed)
        freeze_in_compute_dtype(ref_model, cfg.parallel, dist)
    elif reference == "precomputed":
        fingerprint = reference_fingerprint(cfg, ckpt_dir, tokenizer_dir)
        for split, data in (("train", train_data), ("val", val_data)):
            if data is not None:
                ref_table[split] = precomputed_logps(out_dir / f"reference_logps_{split}.json", fingerprint, model,
                                                     data, dist, cfg.parallel, logger)

    @torch.no_grad()
    def reference_logps(batch, split: str = "train") -> torch.Tensor | None:
        """Summed response log-probs (2B,) of the reference policy; None without one."""
        if reference == "none":
            return None
        if reference == "precomputed":
            table = ref_table[split].to(batch["index"].device)  # (N, 2): chosen, rejected
            return torch.cat([table[batch["index"], 0], table[batch["index"], 1]])
        net = ref_model if reference == "copy" else model
        with autocast(cfg.parallel, dist), disable_lora(net):
            return sequence_logps(net, batch)

    @torch.no_grad()
    def kto_reference_point(batch) -> torch.Tensor | None:
        """KTO's z0: the mean policy-reference log-ratio of the batch's mismatched rows, over every rank
        (rows of padding excluded); None for the paired losses."""
        if not kto:
            return None
        mismatched = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
        with autocast(cfg.parallel, dist):
            ratio = sequence_logps(model, mismatched) - reference_logps(mismatched)
        total = all_reduce_sum(torch.stack([(ratio * batch["weight"]).sum(), batch["weight"].sum()]))
        return total[0] / total[1].clamp(min=1)

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
    throughput = Throughput(mcfg.flops_per_token(cfg.data.max_len), dist.device, dist.world_size,
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

    @torch.no_grad()
    def evaluate() -> dict:
        """The step's metrics over the validation pairs, mean per pair."""
        model.eval()
        names = stat_names(cfg.dpo.loss)
        totals = torch.zeros(2, len(names) + 1, device=dist.device)  # (sums, counts) of the stats and the loss
        for batch in val_data.iter_eval(cfg.eval_batches):
            batch = to_device(batch, dist.device)
            with autocast(cfg.parallel, dist):
                logps = sequence_logps(model, batch)
            losses, stats = pair_losses(cfg.dpo, logps, reference_logps(batch, "val"), batch, kto_reference_point(batch))
            loss = torch.stack([(losses * batch["weight"]).sum(), batch["weight"].sum()])
            totals += torch.cat([stats, loss[:, None]], dim=1)
        totals = all_reduce_sum(totals)
        means = totals[0] / totals[1].clamp(min=1)
        model.train()
        return {"loss": means[-1], **dict(zip(names, means[:-1]))}

    # ---- the step loop: the same lines in every loop (tests/test_skeleton.py), but for the algorithm's
    model.train()
    step = start_step
    val_metrics = {}
    while step < steps:
        lr = lr_at(step, cfg.optim, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # >>> algorithm: the preference loss of each pair, chosen and rejected scored in one forward; the
        # step's loss is the mean over its pairs (all micro-batches, all ranks)
        micro_batches = [train_data.next_batch() for _ in range(accum_steps)]
        loss_sum = torch.zeros((), device=dist.device)
        stat_sums = torch.zeros(2, len(stat_names(cfg.dpo.loss)), device=dist.device)  # sums, counts
        for batch in micro_batches:
            batch = to_device(batch, dist.device)
            with autocast(cfg.parallel, dist):
                logps = sequence_logps(model, batch)  # (2B,) summed log-probs of each response
            losses, stats = pair_losses(cfg.dpo, logps, reference_logps(batch), batch, kto_reference_point(batch))
            loss = losses.sum() / cfg.global_batch
            loss.backward()
            loss_sum += loss.detach()
            stat_sums += stats
        stat_sums = all_reduce_sum(stat_sums)
        step_metrics = dict(zip(stat_names(cfg.dpo.loss), stat_sums[0] / stat_sums[1].clamp(min=1)))
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
        report_export(model, final, cfg, loop="dpo", base_dir=ckpt_dir, adapter=cfg.lora is not None,
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


# Per-pair metrics, with TRL's names: summed over pairs (weighted) by pair_losses, divided by the count.
PAIR_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected")
# KTO's: chosen are the desirable samples, rejected the undesirable ones, each averaged over its own
# count; kl is the reference point z0 before clamping.
KTO_STATS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")


def stat_names(loss: str) -> tuple[str, ...]:
    return KTO_STATS if loss == "kto" else PAIR_STATS


def pick_reference(loss_cfg: DPOLoss, lora_cfg: LoRAConfig | None) -> str:
    """The reference mode `auto` stands for, and a clear error for a combination that cannot work."""
    reference = loss_cfg.reference
    if reference == "auto":
        reference = "none" if loss_cfg.loss in REFERENCE_FREE else ("adapters_off" if lora_cfg else "copy")
    if loss_cfg.loss in REFERENCE_FREE and reference != "none":
        raise ValueError(f"dpo.loss {loss_cfg.loss} uses no reference policy; set dpo.reference to none or auto")
    if loss_cfg.loss == "kto" and reference == "precomputed":
        raise ValueError("dpo.reference precomputed is not available for kto: its mismatched rows change with "
                         "every batch (use copy, or adapters_off with LoRA)")
    if loss_cfg.loss not in REFERENCE_FREE and reference == "none":
        raise ValueError(f"dpo.loss {loss_cfg.loss} needs a reference policy (dpo.reference copy, adapters_off "
                         "or precomputed)")
    if reference == "adapters_off" and lora_cfg is None:
        raise ValueError("dpo.reference adapters_off needs a lora: section (the base without adapters is the reference)")
    return reference


def collate_indexed_pairs(samples, pad_id, share_prompt: bool = True) -> dict:
    """collate_shared_prompt (B rows) or collate_pairs (2B rows), plus each pair's dataset index (for
    precomputed reference log-probs) and weight (0 on evaluation's rows of padding)."""
    batch = (collate_shared_prompt if share_prompt else collate_pairs)(samples, pad_id)
    batch["index"] = torch.tensor([s["index"] for s in samples])
    batch["weight"] = torch.tensor([s["weight"] for s in samples])
    return batch


def collate_indexed_kto(samples, pad_id, max_len: int) -> dict:
    """collate_unpaired (B rows and their labels), the mismatched rows of KTO's reference point under
    kl_ keys (collate_kl), and each sample's index and weight (0 on evaluation's rows of padding)."""
    batch = collate_unpaired(samples, pad_id)
    batch.update({f"kl_{k}": v for k, v in collate_kl(samples, pad_id, max_len).items()})
    batch["index"] = torch.tensor([s["index"] for s in samples])
    batch["weight"] = torch.tensor([s["weight"] for s in samples])
    return batch


def sequence_logps(model, batch) -> torch.Tensor:
    """Summed log-probs of each pair's scored (response) tokens, (2B,): the chosen responses, then the
    rejected ones. Through the chunked per-token head: the (rows, T, V) logits never exist at once."""
    shared = "document_ids" in batch
    token_logps = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch.get("document_ids"),
                        shared_prefix=shared, targets=batch["targets"], logprobs=True)  # (rows, T), 0 where not scored
    return per_response(token_logps, batch)


def per_response(token_values, batch) -> torch.Tensor:
    """Sum a (rows, T) per-token tensor over each response: (2B,), chosen then rejected. Shared-prompt
    rows hold the chosen response as document 1 and the rejected one as document 2."""
    if "document_ids" not in batch:
        return token_values.sum(-1)
    doc = batch["document_ids"]
    return torch.cat([(token_values * (doc == 1)).sum(-1), (token_values * (doc == 2)).sum(-1)])


def pair_losses(loss_cfg: DPOLoss, logps, ref_logps, batch, kl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), stats (2, n): the stat_names' sums over the batch and the counts they average over)
    from the policy's and the reference's summed response log-probs (2B,): chosen rows first, then
    rejected; for KTO (B,) unpaired samples and kl, the reference point. Rows of padding (weight 0)
    count for nothing."""
    weight = batch["weight"]  # (B,)
    B = weight.shape[0]
    if loss_cfg.loss == "kto":
        desirable = batch["label"]
        losses, _, _ = kto_loss(logps, ref_logps, desirable, kl, loss_cfg.beta, loss_cfg.kto_desirable_weight,
                                loss_cfg.kto_undesirable_weight)
        rewards = loss_cfg.beta * (logps - ref_logps).detach()
        d, u = weight * desirable, weight * ~desirable
        sums = torch.stack([(rewards * d).sum(), (rewards * u).sum(), (logps.detach() * d).sum(),
                            (logps.detach() * u).sum(), kl * weight.sum()])
        counts = torch.stack([d.sum(), u.sum(), d.sum(), u.sum(), weight.sum()])
        return losses * weight, torch.stack([sums, counts.to(sums)])
    if loss_cfg.loss in LENGTH_AVERAGED:  # those losses compare per-token means, not sums
        n_tokens = per_response((batch["targets"] != IGNORE_INDEX).long(), batch).clamp(min=1)  # (2B,)
        logps = logps / n_tokens
        ref_logps = None if ref_logps is None else ref_logps / n_tokens
    chosen, rejected = logps[:B], logps[B:]
    if loss_cfg.loss == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, loss_cfg.beta,
                                                              loss_cfg.simpo_gamma_beta_ratio, loss_cfg.label_smoothing)
    elif loss_cfg.loss == "orpo":  # the paper's supervised term: the mean NLL of the chosen response
        losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, -chosen, loss_cfg.beta)
    else:
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_logps[:B], ref_logps[B:],
                                                            loss_cfg.beta, loss_cfg.loss, loss_cfg.label_smoothing)
    losses = losses * weight
    stats = torch.stack([chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                         chosen_rewards - rejected_rewards, chosen.detach(), rejected.detach()])  # (6, B)
    sums = (stats * weight).sum(-1)
    return losses, torch.stack([sums, weight.sum().expand_as(sums)])


def reference_fingerprint(cfg: DPOConfig, ckpt_dir, tokenizer_dir) -> str:
    """What the precomputed reference log-probs depend on: the data files (path, size, mtime), the
    starting model and tokenizer, and how the pairs are cut. Anything else changing keeps them valid."""
    files = [(str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in cfg.data.train + cfg.data.val]
    key = {"files": files, "model": str(ckpt_dir or cfg.model.preset), "tokenizer": str(tokenizer_dir),
           "data": {k: v for k, v in to_dict(cfg.data).items() if k not in ("train", "val")},
           "mixed_precision": cfg.parallel.mixed_precision, "seed": None if ckpt_dir else cfg.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def precomputed_logps(path: Path, fingerprint: str, model, data: ChatBatches, dist, parallel_cfg, logger) -> torch.Tensor:
    """The reference's summed log-probs of every pair (N, 2): chosen, rejected. Read from `path` when
    it was made for the same fingerprint; otherwise one pass of the (still untrained) model over the
    pairs, each rank scoring its share, then written there by rank 0."""
    if path.is_file():
        try:
            saved = read_json(path)
        except ValueError:  # a damaged file is stale: computed again below
            saved = {}
        if saved.get("fingerprint") == fingerprint:
            logger.print(f"reference log-probs read from {path}")
            return torch.tensor(saved["logps"], dtype=torch.float32)
        logger.print(f"{path} was made for other data or another model: computing the reference log-probs again")
    n = len(data.dataset)
    table = torch.zeros(n, 2, device=dist.device)
    model.eval()
    for batch in data.iter_eval():
        batch = to_device(batch, dist.device)
        with autocast(parallel_cfg, dist), disable_lora(model):
            logps = sequence_logps(model, batch)
        B = batch["index"].shape[0]
        real = batch["weight"] > 0
        table[batch["index"][real]] = torch.stack([logps[:B], logps[B:]], dim=1)[real]
    model.train()
    all_reduce_sum(table)  # every pair was scored by exactly one rank
    table = table.cpu()
    if dist.is_main:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "logps": table.tolist()}))
        tmp.replace(path)
        logger.print(f"reference log-probs of {n} pairs written to {path}")
    return table


if __name__ == "__main__":
    main(parse_config(DPOConfig))
