"""final/README.md: a model card in the Hugging Face Hub's format, so `hf upload` publishes a complete model.

    write_model_card(out_dir / "final", base_model="Qwen/Qwen2.5-0.5B", run_config=to_dict(cfg),
                     metrics={"step": 1000, "tokens": 4.1e6, "loss": 1.21, "val_loss": 1.30},
                     datasets=cfg.data.train, license="apache-2.0", tags=["sft"], adapter=False)

The card opens with the Hub's YAML metadata block (base_model, library_name, tags, datasets, license,
pipeline_tag; https://huggingface.co/docs/hub/model-cards), then says how the model was trained: steps,
tokens, final losses, the loss curves (the run's curves.png, copied beside the card), how to load and
evaluate it, and the resolved training config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

# A Hub id (owner/name, or a bare canonical name like "gsm8k"): what the `datasets` metadata field accepts.
# Local files and folders are listed in the card's text instead.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt", ".csv", ".gz", ".arrow", ".bin")


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id rather than a local file or folder."""
    return bool(_HUB_ID.match(name)) and not name.endswith(_DATA_SUFFIXES) and not Path(name).exists()


def write_model_card(final_dir: str | os.PathLike, *, base_model: str | None, run_config: dict, metrics: dict,
                     datasets: list[str], license: str | None, tags: list[str], adapter: bool,
                     curves: str | os.PathLike | None = None) -> Path:
    """Write final_dir/README.md and return its path. base_model: the Hub id (or path) trained from, None for a
    model pretrained from scratch. metrics: what the run ended with (step, tokens, loss, val_loss, ... any
    numbers). tags: the loop's name and anything else; "handloom", and "lora" / "qlora" from run_config's lora
    section or `adapter`, are added. curves: the loss curves picture, default the run folder's curves.png
    (final_dir/..), copied beside the card when it exists."""
    final_dir = Path(final_dir)
    lora = run_config.get("lora") or {}
    all_tags = ["handloom", *tags]
    if adapter or lora:
        all_tags.append("lora")
    if lora.get("quantize") == "nf4":
        all_tags.append("qlora")
    all_tags = list(dict.fromkeys(all_tags))  # in order, once each
    hub_datasets = [str(d) for d in datasets if is_hub_id(str(d))]

    header = {}
    if base_model and is_hub_id(str(base_model)):  # the Hub links models by id; a local path stays in the text
        header["base_model"] = str(base_model)
    header["library_name"] = "peft" if adapter else "transformers"
    header["pipeline_tag"] = "text-generation"
    header["tags"] = all_tags
    if hub_datasets:
        header["datasets"] = hub_datasets
    if license:
        header["license"] = license

    curves = Path(curves) if curves is not None else final_dir.parent / "curves.png"
    has_curves = curves.is_file()
    if has_curves and curves.resolve() != (final_dir / "curves.png").resolve():
        shutil.copyfile(curves, final_dir / "curves.png")

    name = final_dir.resolve().parent.name if final_dir.name == "final" else final_dir.resolve().name
    loop = next((t for t in tags if t not in ("lora", "qlora")), None)
    if base_model and is_hub_id(str(base_model)):
        origin = f"from [{base_model}](https://huggingface.co/{base_model})"
    else:
        origin = f"from `{base_model}`" if base_model else "from scratch"
    kind = "A LoRA adapter" if adapter else "A causal language model"
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {name}", "",
        f"{kind} trained {origin} with handloom" + (f"'s `{loop}` loop" if loop else "") + ".", "",
        "## Training", "",
        "| metric | value |", "|---|---|",
    ]
    for key, value in _plain(metrics).items():
        if value is not None:
            lines.append(f"| {key} | {_fmt(value)} |")
    lines.append("")
    if datasets:
        lines += ["Data: " + ", ".join(f"`{d}`" for d in datasets), ""]
    if has_curves:
        lines += ["![training curves](curves.png)", ""]
    lines += _usage(f"your-name/{name}", base_model, adapter)
    lines += ["## Training config", "", "The resolved configuration of the run:", "", "```yaml",
              yaml.safe_dump(_plain(run_config), sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    out = final_dir / "README.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _usage(repo: str, base_model: str | None, adapter: bool) -> list[str]:
    """How to load and evaluate it, once uploaded as `repo` (a local folder path works the same)."""
    if adapter:
        load = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_model or "<base model>"}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
        lm_eval = (f"lm_eval --model hf --model_args pretrained={base_model or '<base model>'},peft={repo} "
                   "--tasks hellaswag")
    else:
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
        lm_eval = f"lm_eval --model hf --model_args pretrained={repo} --tasks hellaswag"
    return ["## Use", "", "```python", *load, "```", "", "Evaluate with "
            "[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness):", "", "```bash",
            lm_eval, "```", ""]


def _plain(obj):
    """YAML- and JSON-safe values: paths and other objects as strings, tuples as lists."""
    return json.loads(json.dumps(obj, default=str))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
