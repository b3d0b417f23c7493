"""The pieces of a run every loop shares: the run folder, resume, the non-finite policy, the weights
a model starts from, evaluation of the next-token loss. None of them calls `backward` or
`optimizer.step`: those stay visible in each loop.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from checkpoints.io import check_resume_config, load_checkpoint, resume_path, saved_config
from train.batching import num_targets, to_device
from train.config import RESUMABLE_KEYS, CheckpointConfig, LogConfig, ParallelConfig, to_dict, validate_config
from train.dist import DistInfo, all_reduce_sum
from train.log import MetricsLogger
from train.parallel import autocast


def start_run(out_dir: str, log_cfg: LogConfig, cfg, dist: DistInfo) -> MetricsLogger:
    """The run folder's logger (console on rank 0, metrics.jsonl, trackers), once the config is
    valid (`validate_config`, for Python callers of main(cfg) too) and fits the checkpoint it would
    resume from (its meta.json alone: refused before anything is prepared or written). The config is
    written into the folder only once resume has accepted it (`resume_or_start`), so a rejected
    config never overwrites a run's own."""
    validate_config(cfg)
    if (saved := saved_config(out_dir, cfg.checkpoint.resume)) is not None:
        check_resume_config(saved, to_dict(cfg), ignore=RESUMABLE_KEYS)
    return MetricsLogger(Path(out_dir), log_cfg, enabled=dist.is_main, run_config=to_dict(cfg))


def resume_or_start(out_dir: str, ckpt_cfg: CheckpointConfig, cfg, model, optimizer, dist: DistInfo,
                    logger: MetricsLogger, trainable_only: bool = False) -> tuple[int, dict | None]:
    """(step to start from, the checkpoint's `extra` or None): the newest checkpoint of out_dir that
    verifies (any world size; a newer damaged one is named in a warning and skipped, checkpoints/io.py's
    `resume_path`), after checking that the config changed only in RESUMABLE_KEYS. Then the config is
    written into the run folder."""
    start_step, extra = 0, None
    resume_from = resume_path(out_dir, ckpt_cfg.resume)
    if resume_from is not None:
        start_step, extra, saved_cfg = load_checkpoint(resume_from, model, optimizer, trainable_only=trainable_only,
                                                       check_config=lambda saved: check_resume_config(
                                                           saved, to_dict(cfg), ignore=RESUMABLE_KEYS),
                                                       verify=False)  # resume_path just verified it
        logger.print(f"resumed from {resume_from} at step {start_step}")
    if dist.is_main:
        (Path(out_dir) / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return start_step, extra


def check_finite(loss: float, grad_norm: float, step: int, policy: str, skipped: int, max_skipped: int,
                 logger: MetricsLogger) -> bool:
    """True when the step's update may be applied. A NaN/inf loss or gradient norm stops the run
    (policy "error", or too many skipped) or skips the step (policy "skip")."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    if policy == "error" or skipped >= max_skipped:
        raise FloatingPointError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step + 1}; "
                                 f"{skipped} steps skipped before. The last checkpoint is untouched.")
    logger.print(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped + 1} so far)")
    return False


def load_or_init_weights(model, ckpt_dir, seed: int) -> None:
    """The checkpoint's weights copied into the materialised (maybe sharded) model, or a fresh init."""
    if ckpt_dir is not None:
        from checkpoints.hf import load_hf_weights_

        load_hf_weights_(model, ckpt_dir)
    else:
        model.init_weights(seed=seed)


@torch.no_grad()
def evaluate_loss(model, batches, dist: DistInfo, parallel_cfg: ParallelConfig) -> float:
    """Mean next-token loss per scored token over `batches` (every rank runs the same number)."""
    model.eval()
    total = torch.zeros(2, device=dist.device)  # (loss sum, scored tokens)
    for batch in batches:
        total[1] += num_targets(batch)
        batch = to_device(batch, dist.device)
        with autocast(parallel_cfg, dist):
            total[0] += model(batch["input_ids"], position_ids=batch.get("position_ids"),
                              document_ids=batch.get("document_ids"), targets=batch["targets"])
    all_reduce_sum(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def sample_chat(final_dir, base_dir, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy answer of the exported model (or base + exported adapter) to one user message;
    reloading it from the files also checks the export."""
    from checkpoints.hf import load_hf
    from checkpoints.peft import load_peft_adapter
    from model.generate import generate
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(final_dir)
    if base_dir is None:
        model = load_hf(final_dir, device=device).eval()
    else:
        model = load_peft_adapter(load_hf(base_dir, device=device), final_dir).eval()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    new = generate(model, [ids], max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    return tok.decode(new)


def report_export(model, final: Path, cfg, *, loop: str, base_dir, adapter: bool, datasets: list[str], metrics: dict,
                  dist: DistInfo, logger: MetricsLogger) -> None:
    """After final/ is written: prove it (checkpoints/export_check.py: the files reloaded equal the network
    in memory; a mismatch raises, naming the tensor), then draw the curves and write the model card.
    Call on every rank (the check gathers a sharded model)."""
    from checkpoints.export_check import check_export
    from checkpoints.model_card import write_model_card
    from train.plot import write_curves

    if cfg.checkpoint.check_export:
        check = check_export(model, final, adapter=adapter, base_dir=base_dir if adapter else None)
        logger.print(check["summary"])
    if dist.is_main:
        write_curves(cfg.out_dir)  # before the card, which copies curves.png
        write_model_card(final, base_model=cfg.model.checkpoint, run_config=to_dict(cfg), metrics=metrics,
                         datasets=datasets, license=None, tags=[loop], adapter=adapter)
