"""Typed configuration shared by every loop, parsed by jsonargparse.

Each loop defines its own top-level dataclass from these parts, so `--help` lists every field with
the docstring written under it, a YAML file sets any of them, and dotted flags override:

    python -m train.pretrain --config configs/pretrain/shakespeare.yaml --optim.lr 3e-4
    python -m train.pretrain --config ... --print_config     # the resolved YAML

Unknown keys and wrong types are errors naming the key. Helpers take the part they need
(`build_optimizer(model, cfg.optim)`), never the whole config.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from jsonargparse import ArgumentParser, set_parsing_settings

from model.lora import LoRAConfig  # noqa: F401  (the `lora:` section of every fine-tuning loop)


@dataclass
class ModelSource:
    """Where the network comes from: a preset shape (random init) or a checkpoint."""

    preset: str | None = None
    """A named shape from model/config.py (random init), e.g. tiny, llama-3.2-1b."""
    checkpoint: str | None = None
    """A Hugging Face model directory or Hub repo id to start from (overrides preset)."""
    vocab_size: int | None = None
    """Override the preset's vocabulary size (e.g. to fit a freshly trained tokenizer)."""
    max_seq_len: int | None = None
    """Override the preset's maximum sequence length."""


@dataclass
class OptimConfig:
    """AdamW with warmup and decay; weight decay on matrices (embeddings included), none on norms and biases."""

    lr: float = 3e-4
    """Peak learning rate, reached after warmup."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to the floor over the steps after warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (never for norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""


@dataclass
class ParallelConfig:
    """How the model is spread over devices (FSDP2 under torchrun) and what speeds it up."""

    dp_replicate: int = 1
    """HSDP: replicas (usually nodes); the world size must be dp_replicate x shards per replica."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    compile: bool = False
    """torch.compile each transformer block."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: auto is bf16 on GPU (fp32 master weights and reductions), fp32 on CPU."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (less memory, one more all-gather)."""


@dataclass
class CheckpointConfig:
    """Resumable training state (torch.distributed.checkpoint) and the final export."""

    every: int = 0
    """Save every N steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    """Keep this many newest checkpoints (0 keeps all)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in out_dir if any; none; or a path."""
    export_hf: bool = True
    """Write <out_dir>/final/ in Hugging Face format at the end."""


@dataclass
class LogConfig:
    """Console, metrics.jsonl and optional trackers."""

    every: int = 10
    """Log every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard events to <out_dir>/tb (needs tensorboard installed)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs wandb installed)."""


@dataclass
class ChatDataConfig:
    """Chat files and how they become training tokens."""

    train: list[str] = field(default_factory=list)
    """Training files: .jsonl, .jsonl.gz, .json or .parquet."""
    val: list[str] = field(default_factory=list)
    """Validation files (optional)."""
    tokenizer: str | None = None
    """Tokenizer folder; default: the model checkpoint's."""
    chat_template: str | None = None
    """Template when the tokenizer has none: "chatml" or a Jinja string."""
    max_seq_len: int = 2048
    """Longest sample (and packed row) in tokens."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Which tokens carry the loss."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with samples longer than max_seq_len."""
    on_bad_row: Literal["raise", "skip"] = "raise"
    """A malformed row is an error naming file and line, or is skipped and counted."""
    pack: bool = False
    """Pack several samples per row (attention blocked between them)."""


@dataclass
class PreferenceDataConfig:
    """Preference files (prompt/chosen/rejected rows, full conversations, Anthropic HH transcripts)."""

    train: list[str] = field(default_factory=list)
    """Training files: .jsonl, .jsonl.gz, .json or .parquet."""
    val: list[str] = field(default_factory=list)
    """Validation files (optional): the same metrics every eval_every steps."""
    tokenizer: str | None = None
    """Tokenizer folder; default: the model checkpoint's."""
    chat_template: str | None = None
    """Template when the tokenizer has none: "chatml" or a Jinja string."""
    max_len: int = 1024
    """Longest prompt + response in tokens (each of chosen and rejected)."""
    max_prompt_len: int | None = 512
    """Longest prompt in tokens (None: no limit of its own)."""
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    """A long prompt keeps its end (the turn being answered) or its start."""
    on_bad_row: Literal["raise", "skip"] = "raise"
    """A bad row (identical responses, empty response, no room, missing field, bad JSON) is an error
    naming file and line, or is skipped and counted."""


T = TypeVar("T")


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None,
                 defaults: dict | None = None) -> T:
    """Parse --config YAML files and dotted flags into `cls`. `defaults` ({"out_dir": ..., "lora": {...}})
    replace the dataclass's own defaults, below what a config file or flag sets."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    spec = getattr(sys.modules[cls.__module__], "__spec__", None)  # set when run as python -m train.<loop>
    prog = f"python -m {spec.name}" if spec is not None else None
    parser = ArgumentParser(prog=prog, description=description or cls.__doc__)
    parser.add_argument("--config", action="config", help="YAML file with any of the fields below.")
    parser.add_class_arguments(cls, None, as_group=False)
    if defaults:
        parser.set_defaults(defaults)
    ns = parser.parse_args(argv)
    del ns["config"]
    ns = parser.instantiate(ns)  # nested dataclasses built
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Settings a resumed run may change without changing what is trained; the same list for every loop
# (a key a loop does not have is simply never compared).
RESUMABLE_KEYS = ("steps", "epochs", "stop_at_step", "out_dir", "device", "eval_every", "eval_batches",
                  "sample_prompt", "sample_tokens", "micro_batch", "parallel", "checkpoint", "log",
                  "max_skipped_steps", "data.dir", "data.inputs", "lora.merge")


def resolve_model(spec: ModelSource):
    """The ModelConfig (architecture) a ModelSource names, and the checkpoint directory to load (or None)."""
    from checkpoints.download import resolve_checkpoint
    from checkpoints.hf import load_hf_config
    from model.config import ModelConfig

    if spec.checkpoint:
        ckpt_dir = resolve_checkpoint(spec.checkpoint)
        cfg = load_hf_config(ckpt_dir)
    elif spec.preset:
        ckpt_dir, cfg = None, ModelConfig.preset(spec.preset)
    else:
        raise ValueError("model: set model.preset (random init) or model.checkpoint (HF dir or repo id)")
    overrides = {k: v for k, v in (("vocab_size", spec.vocab_size), ("max_seq_len", spec.max_seq_len)) if v}
    if ckpt_dir is not None and overrides.get("vocab_size", cfg.vocab_size) != cfg.vocab_size:
        raise ValueError(f"model.vocab_size cannot change the vocabulary of checkpoint {spec.checkpoint}")
    return dataclasses.replace(cfg, **overrides), ckpt_dir
