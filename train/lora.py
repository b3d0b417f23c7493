"""LoRA and QLoRA fine-tuning on chat data, one process or FSDP2 under torchrun.

    python -m train.lora --config configs/lora/qwen2.5-0.5b-fastchat.yaml
    python -m train.lora --config configs/lora/qwen2.5-0.5b-fastchat.yaml --lora.quantize nf4   # QLoRA
    torchrun --nproc_per_node=8 -m train.lora --config configs/lora/qwen2.5-0.5b-fastchat.yaml

The same loop as train/sft.py (`diff train/sft.py train/lora.py` shows what LoRA changes): the
targeted projections become LoRALinear (Hu et al. 2021, https://arxiv.org/abs/2106.09685), only
the adapters train, and with `lora.quantize: nf4` the frozen base is stored in 4-bit NormalFloat
(QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314). The base is loaded whole on each
rank, frozen (and quantized), then sharded. Checkpoints hold the adapters and their optimizer
state only. At the end `<out_dir>/final/` is a PEFT adapter, and with `lora.merge` also
`<out_dir>/final/merged/`, the base with the adapters folded in, in Hugging Face format.

Conversations (OpenAI messages, ShareGPT, prompt/completion or Alpaca rows) are rendered with the
model's own chat template; the loss is on the assistant's tokens (its end-of-turn token included,
so the model learns to stop), summed and divided by the number of trained tokens of the whole
optimizer step over micro-batches and ranks. Optional packing puts several conversations in one
row with attention blocked between them. At the end, `<out_dir>/final/` is the full model in
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

from checkpoints.hf import load_hf_weights_
from checkpoints.peft import save_peft_adapter
from checkpoints.io import check_resume_config, load_checkpoint, resume_path, save_checkpoint
from model.gpt import GPT
from model.lora import apply_lora, init_lora_weights, lora_state_dict, mark_only_lora_trainable, quantize_base_nf4
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
from train.sft import SFTConfig, evaluate  # the same data fields; the same loss per trained token


@dataclass
class LoRASpec:
    """Which layers get adapters, their shape, and the base's storage."""

    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Projection names as in PEFT (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or all-linear."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    use_rslora: bool = False
    """rsLoRA scaling alpha / sqrt(r)."""
    quantize: Literal["none", "nf4"] = "none"
    """nf4: store the frozen base as torchao NF4 (QLoRA)."""
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Storage of the frozen base: auto is bf16 on GPU, fp32 on CPU (NF4 always dequantizes to bf16)."""
    nf4_block_size: int = 64
    """NF4: weights per quantization block (a weight's size must divide into them)."""
    nf4_scaler_block_size: int = 256
    """NF4: blocks per group of double-quantized block scales."""
    merge: bool = False
    """Also export the merged full model to final/merged/."""


@dataclass
class LoRAConfig(SFTConfig):
    """Fine-tune LoRA adapters (optionally on an NF4 base: QLoRA) on chat data."""

    out_dir: str = "runs/lora"
    """Run folder: config, metrics.jsonl, checkpoints, final/ (the adapter)."""
    lora: LoRASpec = field(default_factory=LoRASpec)
    """The adapters."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=10, weight_decay=0.0))
    """Optimizer and learning-rate schedule (of the adapters)."""


# Settings a resumed run may change without changing what is trained.
RESUMABLE_CHANGES = ("steps", "epochs", "stop_at_step", "out_dir", "device", "eval_every", "eval_batches",
                     "sample_prompt", "sample_tokens", "micro_batch", "parallel", "checkpoint", "log",
                     "max_skipped_steps")


def main(cfg: LoRAConfig) -> dict:
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

    # ---- model: adapters swapped in on meta, base loaded whole and frozen (quantized), then sharded
    with torch.device("meta"):
        model = GPT(mcfg)
    apply_lora(model, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.use_rslora)
    model.to_empty(device=dist.device)
    if ckpt_dir is not None:
        load_hf_weights_(model, ckpt_dir)
    else:
        model.init_weights(seed=cfg.seed)
    init_lora_weights(model, seed=cfg.seed)  # after the base: init_weights would also draw the adapters
    _store_base(model, cfg.lora, dist.device)
    trainable = mark_only_lora_trainable(model)
    model = parallelize(model, cfg.parallel, dist)
    optimizer = build_optimizer(model, cfg.optim, dist.device)

    # ---- resume from the newest complete checkpoint (any world size)
    start_step, skipped = 0, 0
    resume_from = resume_path(out_dir, cfg.checkpoint.resume)
    if resume_from is not None:
        start_step, extra, saved_cfg = load_checkpoint(resume_from, model, optimizer, trainable_only=True)
        check_resume_config(saved_cfg, to_dict(cfg), ignore=RESUMABLE_CHANGES)
        train_data.load_state_dict(extra["data"])
        skipped = extra["skipped_steps"]
        logger.print(f"resumed from {resume_from} at step {start_step}")

    stop_signal = catch_stop_signals()
    throughput = Throughput(mcfg.flops_per_token(cfg.data.max_seq_len), dist.device, dist.world_size)
    logger.print(f"model {mcfg.model_type} {mcfg.num_params() / 1e6:.2f}M params, {trainable / 1e6:.3f}M trainable "
                 f"(LoRA r={cfg.lora.r}{', NF4 base' if cfg.lora.quantize == 'nf4' else ''}) | world {dist.world_size} | "
                 f"global batch {cfg.global_batch} = {accum_steps} micro-batches of {cfg.micro_batch} per rank | "
                 f"{steps} steps")

    def save(step: int) -> None:
        extra = {"data": train_data.state_dict(), "skipped_steps": skipped,
                 "model_config": dataclasses.asdict(mcfg), "tokenizer_dir": str(tokenizer_dir)}
        path = save_checkpoint(out_dir, step, model, optimizer, extra, to_dict(cfg), cfg.checkpoint.keep_last,
                               trainable_only=True)
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
        adapters = lora_state_dict(model)  # gathered on every rank when sharded
        if dist.is_main:
            save_peft_adapter(model, final, base_model_name_or_path=cfg.model.checkpoint, state_dict=adapters)
            tokenizer.save(final)  # also writes the chat template the model was trained with
            logger.print(f"PEFT adapter written to {final}")
            if cfg.lora.merge:
                merged = merge_adapter(ckpt_dir, final, final / "merged", tokenizer_dir)
                logger.print(f"merged Hugging Face model written to {merged}")
        result["final_dir"] = str(final)
        if dist.is_main and cfg.sample_tokens:
            result["sample"] = sample_chat(ckpt_dir, final, cfg.sample_prompt, cfg.sample_tokens, dist.device)
            logger.print(f"--- sample ---\nuser: {cfg.sample_prompt}\nassistant: {result['sample']}\n--------------")
        barrier()
    logger.close()
    teardown_distributed()
    return result


def _store_base(model, lora_cfg: LoRASpec, device) -> None:
    """Frozen base weights in their storage dtype: bf16 on GPU (no fp32 master copy is needed for
    weights that never update), or NF4 for QLoRA. The adapters stay float32."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        lora_cfg.base_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if lora_cfg.quantize == "nf4":
        dtype = torch.bfloat16
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith((".lora_A", ".lora_B")):
                p.data = p.data.to(dtype)
    if lora_cfg.quantize == "nf4":
        quantize_base_nf4(model, lora_cfg.nf4_block_size, lora_cfg.nf4_scaler_block_size, dtype=dtype)


def merge_adapter(base_dir, adapter_dir, out_dir, tokenizer_dir) -> Path:
    """The base with the exported adapter folded in, as a full Hugging Face model (on CPU, from the
    files just written, so this also checks the adapter export)."""
    from checkpoints.hf import load_hf, save_hf
    from checkpoints.peft import load_peft_adapter
    from model.lora import merge_lora

    model = load_hf(base_dir)
    load_peft_adapter(model, adapter_dir)
    return save_hf(merge_lora(model), out_dir, tokenizer_dir=tokenizer_dir)


def sample_chat(base_dir, adapter_dir, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy answer of the base + exported adapter to one user message (reloading checks the export)."""
    from checkpoints.hf import load_hf
    from checkpoints.peft import load_peft_adapter
    from model.generate import generate

    tok = Tokenizer.from_dir(adapter_dir)
    model = load_peft_adapter(load_hf(base_dir, device=device), adapter_dir).eval()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    new = generate(model, [ids], max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    return tok.decode(new)


if __name__ == "__main__":
    main(parse_config(LoRAConfig))
