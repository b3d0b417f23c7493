"""Typed configuration shared by every loop, parsed by jsonargparse.

Each loop defines its own top-level dataclass from these parts, so `--help` lists every field with
the docstring written under it, a YAML file sets any of them, and dotted flags override:

    python -m train.pretrain --config configs/pretrain/shakespeare.yaml --optim.lr 3e-4
    python -m train.pretrain --config ... --print_config     # the resolved YAML

Unknown keys, wrong types and numbers out of range (`validate_config`: micro_batch 0, a negative lr, a
bad device name) are errors naming the dotted key, before anything runs. Helpers take the part they need
(`build_optimizer(model, cfg.optim)`), never the whole config.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from jsonargparse import ArgumentParser, set_parsing_settings

from model.files import read_yaml
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
    float8: bool = False
    """Float8 matmuls (torchao, tensorwise dynamic scales) in the blocks' linear layers (q/k/v/o, gate/up/down; not the
    output head, nor layers whose sizes are not multiples of 16); fast with compile. Needs a GPU of compute capability
    8.9+ (H100, H200, L40S); emulated on CPU (tests). Full training only: not with lora."""
    mlp_chunk_tokens: int = 0
    """Long sequences: run each block's MLP over this many tokens at a time, each chunk recomputed in backward, so
    one chunk's (tokens x intermediate) tensors exist at once instead of the sequence's; the same result (0: off)."""
    checkpoint_dtype: Literal["same", "bf16"] = "same"
    """Long sequences, with activation_checkpointing: keep each block's input (the float32 residual stream under
    autocast) in bf16 until its recompute, half the bytes; the loss is unchanged, gradients move within bf16's
    rounding."""
    offload_activations: bool = False
    """Long sequences: keep what the forward saves for backward in host memory (pinned; copied back as backward needs
    it). Best with activation_checkpointing: then only the blocks' inputs and the output head's tensors move."""


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
    check_export: bool = True
    """Reload final/ and compare it with the trained network (tensors, logits, greedy tokens; with
    transformers installed, its loader too); a mismatch is an error. Gathers the model on rank 0."""


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


@dataclass
class PromptDataConfig:
    """Prompt files for RL: one prompt per row, the row's other fields passed to the reward functions."""

    train: list[str] = field(default_factory=list)
    """Training files: .jsonl, .jsonl.gz, .json or .parquet."""
    val: list[str] = field(default_factory=list)
    """Held-out prompts (optional): greedy completions scored every eval_every steps."""
    prompt_field: str = "prompt"
    """The field holding the prompt: a string (one user message) or a messages list (GSM8K: question)."""
    system_prompt: str | None = None
    """A system message put before every prompt."""
    tokenizer: str | None = None
    """Tokenizer folder; default: the model checkpoint's."""
    chat_template: str | None = None
    """Template when the tokenizer has none: "chatml" or a Jinja string."""
    max_prompt_len: int = 512
    """Longest prompt in tokens; longer rows are bad rows."""
    on_bad_row: Literal["raise", "skip"] = "raise"
    """A bad row (missing field, prompt too long, bad JSON) is an error naming file and line, or is
    skipped and counted."""


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
    argv = sys.argv[1:] if argv is None else list(argv)
    for path in _config_files(argv):
        read_yaml(path)  # jsonargparse's own message names no file: a broken one is named here first
    ns = parser.parse_args(argv)
    del ns["config"]
    ns = parser.instantiate(ns)  # nested dataclasses built
    cfg = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    validate_config(cfg)
    return cfg


def _config_files(argv: list[str]) -> list[str]:
    values = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    values += [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]
    return [v for v in values if Path(v).is_file()]  # anything else jsonargparse reads (or rejects) itself


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Settings a resumed run may change without changing what is trained; the same list for every loop
# (a key a loop does not have is simply never compared).
RESUMABLE_KEYS = ("steps", "epochs", "stop_at_step", "out_dir", "device", "eval_every", "eval_batches",
                  "sample_prompt", "sample_tokens", "micro_batch", "parallel", "checkpoint", "log",
                  "max_skipped_steps", "data.dir", "data.inputs", "lora.merge")


# ----------------------------------------------------------------------------- validation
# Every loop config is checked before anything runs (`parse_config`, and `train/run.py`'s `start_run` for
# Python callers of main(cfg)): types, then each number against the bounds below, then the few rules that
# tie two fields together. A bad value is an error naming its dotted key, never a ZeroDivisionError or a
# run that "trains" zero steps, and never first found by torch or AdamW after the data is prepared.


@dataclass(frozen=True)
class Bound:
    """An interval of allowed numbers; `integer` also requires a whole number."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


AT_LEAST_1 = Bound(1)
AT_LEAST_0 = Bound(0)
ABOVE_0 = Bound(0, lo_open=True)
UNIT = Bound(0, 1)  # [0, 1]
BELOW_1 = Bound(0, 1, hi_open=True)  # [0, 1)

# The bounds of every numeric field of every loop config, by name. A name means one thing in every loop;
# where it does not, the parent's name comes first ("log.every" > 0, "checkpoint.every" >= 0) and the
# longest match wins. A field named nowhere is only checked to be finite, and tests/test_reliability_config.py
# fails until it is named here, so a new loop field (DPO's, GRPO's) gets a bound when it is added.
FIELD_BOUNDS: dict[str, Bound] = {
    # counts and lengths: 0 would divide by zero, or train or evaluate nothing
    "steps": AT_LEAST_1, "epochs": AT_LEAST_1, "stop_at_step": AT_LEAST_1,
    "global_batch": AT_LEAST_1, "global_batch_tokens": AT_LEAST_1, "micro_batch": AT_LEAST_1,
    "eval_batches": AT_LEAST_1, "log.every": AT_LEAST_1, "dp_replicate": AT_LEAST_1,
    "seq_len": Bound(2), "max_seq_len": Bound(2), "max_len": Bound(2), "max_prompt_len": AT_LEAST_1,
    "vocab_size": AT_LEAST_1, "tokenizer_vocab_size": Bound(257),  # byte-level BPE: 256 bytes + end of text
    "r": AT_LEAST_1, "nf4_block_size": AT_LEAST_1, "nf4_scaler_block_size": AT_LEAST_1,
    # GRPO and generation (train/grpo.py): a group needs two samples to have a spread
    "num_generations": Bound(2), "prompts_per_step": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
    "max_completion_len": AT_LEAST_1, "max_prompt_tokens": AT_LEAST_1, "num_iterations": AT_LEAST_1,
    "generation_batch": AT_LEAST_1, "rollout_batch": AT_LEAST_1, "top_k": AT_LEAST_0, "mu": AT_LEAST_1,
    "log_completions_every": AT_LEAST_0,
    # counts where 0 means off / none
    "seed": AT_LEAST_0, "eval_every": AT_LEAST_0, "checkpoint.every": AT_LEAST_0, "keep_last": AT_LEAST_0,
    "warmup_steps": AT_LEAST_0, "max_skipped_steps": AT_LEAST_0, "sample_tokens": AT_LEAST_0,
    "mlp_chunk_tokens": AT_LEAST_0,
    # rates and scales
    "lr": ABOVE_0, "eps": ABOVE_0, "alpha": ABOVE_0, "temperature": ABOVE_0, "dpo.beta": ABOVE_0,
    "weight_decay": AT_LEAST_0, "grad_clip": AT_LEAST_0, "simpo_gamma_beta_ratio": AT_LEAST_0,
    "beta": AT_LEAST_0, "epsilon": AT_LEAST_0, "epsilon_high": AT_LEAST_0, "epsilon_low": AT_LEAST_0,
    "clip_low": BELOW_1, "clip_high": AT_LEAST_0,  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    "reward_weights": AT_LEAST_0, "kto_desirable_weight": AT_LEAST_0, "kto_undesirable_weight": AT_LEAST_0,
    # fractions
    "min_lr_ratio": UNIT, "betas": BELOW_1, "val_fraction": BELOW_1, "dropout": BELOW_1,
    "top_p": Bound(0, 1, lo_open=True),
    "label_smoothing": Bound(0, 0.5, hi_open=True),  # robust DPO divides by 1 - 2 * label_smoothing
}


def validate_config(cfg) -> None:
    """Raise ValueError listing every field of the loop config `cfg` (a dataclass) that holds a wrong type, a
    number out of its FIELD_BOUNDS, or breaks a rule between fields, each by its dotted key."""
    problems = [f"{key}: {value!r} {why}" for key, value, why in _check_fields(cfg, "")]
    problems += _check_relations(cfg)
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _check_fields(obj, prefix: str):
    """(dotted key, value, what is wrong) for each bad field under the dataclass `obj`."""
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # an annotation that does not resolve: check the values without their types
        hints = {}
    for f in dataclasses.fields(obj):
        key, value, hint = prefix + f.name, getattr(obj, f.name), hints.get(f.name, Any)
        if not _is_type(value, hint):
            yield key, value, f"is not {_type_name(hint)}"
        elif dataclasses.is_dataclass(value):
            yield from _check_fields(value, key + ".")
        elif f.name == "device" and isinstance(value, str) and value != "auto":
            try:
                import torch

                torch.device(value)
            except (RuntimeError, ValueError):
                yield key, value, "is not a device (auto, cpu, cuda, cuda:N, ...)"
        else:
            if isinstance(value, (list, tuple)):  # betas, reward weights: each element
                numbers = [(f"{key}[{i}]", v) for i, v in enumerate(value) if _is_number(v)]
            else:
                numbers = [(key, value)] if _is_number(value) else []
            bound = _bound(key)
            for k, v in numbers:
                if not math.isfinite(v):
                    yield k, v, "must be a finite number" + (f" {bound}" if bound is not None else "")
                elif bound is not None and v not in bound:
                    yield k, v, f"must be {bound}"


def _bound(key: str) -> Bound | None:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if (bound := FIELD_BOUNDS.get(".".join(parts[-n:]))) is not None:
            return bound
    return None


def _check_relations(cfg) -> list[str]:
    """The rules between fields, wherever a loop config has both fields."""
    out = []
    gb, mb = _get(cfg, "global_batch"), _get(cfg, "micro_batch")
    gbt, seq_len = _get(cfg, "global_batch_tokens"), _get(cfg, "data.seq_len")
    what = "global_batch"
    if _positive_int(gbt) and _positive_int(seq_len):  # tokens per step set: it decides the global batch
        what, gb = "global_batch_tokens / data.seq_len", gbt // seq_len
        if gbt % seq_len:
            out.append(f"global_batch_tokens: {gbt} is not a multiple of data.seq_len {seq_len}")
    group = _get(cfg, "grpo.num_generations")
    if _positive_int(group) and _positive_int(gb):  # GRPO: micro-batches hold completions, G per prompt
        what, gb = "global_batch x grpo.num_generations", gb * group
    if not out and _positive_int(gb) and _positive_int(mb) and gb % mb:
        out.append(f"{what}: {gb} is not a multiple of micro_batch {mb}")
    max_len, max_prompt = _get(cfg, "data.max_len"), _get(cfg, "data.max_prompt_len")
    if _positive_int(max_len) and _positive_int(max_prompt) and max_prompt >= max_len:
        out.append(f"data.max_prompt_len: {max_prompt} leaves no room for a response in data.max_len {max_len}")
    if _get(cfg, "parallel.float8") is True and _get(cfg, "lora") is not None:
        out.append("parallel.float8: float8 training converts plain nn.Linear layers for full training; it does not "
                   "combine with lora (LoRA adapters, NF4 base weights): set parallel.float8 false or lora null")
    if _get(cfg, "parallel.checkpoint_dtype") == "bf16" and _get(cfg, "parallel.activation_checkpointing") is False:
        out.append("parallel.checkpoint_dtype: bf16 sets how checkpointed blocks keep their input; set "
                   "parallel.activation_checkpointing true (or checkpoint_dtype same)")
    model = _get(cfg, "model")
    if isinstance(model, ModelSource):
        if not (model.preset or model.checkpoint):
            out.append("model: set model.preset (random init) or model.checkpoint (HF dir or repo id)")
        elif model.preset and not model.checkpoint:
            from model.config import PRESETS

            if model.preset not in PRESETS:
                out.append(f"model.preset: {model.preset!r} is not one of {', '.join(sorted(PRESETS))}")
    return out


def _get(obj, key: str):
    for name in key.split("."):
        obj = getattr(obj, name, None)
    return obj


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_type(value, hint) -> bool:
    """Whether `value` fits the annotation (the kinds config dataclasses use; anything else passes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_is_type(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_is_type(v, a) for v, a in zip(value, args))
        return not args or all(_is_type(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    name = str(hint).replace("typing.", "")
    return getattr(hint, "__name__", name) if not typing.get_args(hint) else name


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
