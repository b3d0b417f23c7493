"""Bad configs and unreadable JSON/YAML are errors naming the key, or the file, line and column: degenerate
numbers of every loop config are refused at parse time and again by start_run (Python callers of
main(cfg)), before torch, AdamW or a ZeroDivisionError finds them (issue 12)."""

import dataclasses
import importlib
import re
import typing

import pytest
import torch

from model.files import read_json, read_yaml
from tests.conftest import ROOT
from train.config import FIELD_BOUNDS, parse_config, validate_config
from train.dist import DistInfo
from train.lora import LORA_DEFAULTS
from train.run import start_run

LOOPS = {  # config file, top-level class (module, name), parse defaults
    "pretrain": ("configs/pretrain/tiny.yaml", ("train.pretrain", "PretrainConfig"), None),
    "sft": ("configs/sft/tiny.yaml", ("train.sft", "SFTConfig"), None),
    "lora": ("configs/lora/tiny.yaml", ("train.sft", "SFTConfig"), LORA_DEFAULTS),
    "dpo": ("configs/dpo/tiny.yaml", ("train.dpo", "DPOConfig"), None),
    "grpo": ("configs/grpo/tiny.yaml", ("train.grpo", "GRPOConfig"), None),
}


def loop_class(loop):
    module, name = LOOPS[loop][1]
    return getattr(importlib.import_module(module), name)


def parse(loop, *flags):
    path, _, defaults = LOOPS[loop]
    return parse_config(loop_class(loop), ["--config", str(ROOT / path), *flags], defaults=defaults)


@pytest.mark.parametrize("loop, flags, key", [
    ("pretrain", ["--micro_batch", "0"], "micro_batch: 0 must be >= 1"),  # was a ZeroDivisionError
    ("pretrain", ["--global_batch", "0"], "global_batch: 0 must be >= 1"),  # was a run of zero tokens, loss 0.0
    ("pretrain", ["--steps", "0"], "steps: 0 must be >= 1"),  # was a TypeError in a format string
    ("pretrain", ["--steps=-5"], "steps: -5 must be >= 1"),  # was an exit 0 having trained nothing
    ("pretrain", ["--optim.lr=-1e-3"], "optim.lr: -0.001 must be > 0"),  # was AdamW's, after the data
    ("pretrain", ["--device", "gpu"], "device: 'gpu' is not a device"),  # was torch's
    ("pretrain", ["--global_batch", "6", "--micro_batch", "4"], "global_batch: 6 is not a multiple of micro_batch 4"),
    ("pretrain", ["--global_batch_tokens", "100"], "global_batch_tokens: 100 is not a multiple of data.seq_len 64"),
    ("pretrain", ["--optim.betas", "[0.9, 1.0]"], "optim.betas[1]: 1.0 must be in [0, 1)"),
    ("pretrain", ["--data.val_fraction", "1.0"], "data.val_fraction: 1.0 must be in [0, 1)"),
    ("pretrain", ["--log.every", "0"], "log.every: 0 must be >= 1"),
    ("pretrain", ["--checkpoint.keep_last=-1"], "checkpoint.keep_last: -1 must be >= 0"),
    ("pretrain", ["--model.preset", "nope"], "model.preset: 'nope' is not one of"),
    ("sft", ["--epochs", "0"], "epochs: 0 must be >= 1"),
    ("sft", ["--data.max_seq_len", "0"], "data.max_seq_len: 0 must be >= 2"),
    ("sft", ["--optim.warmup_steps=-1"], "optim.warmup_steps: -1 must be >= 0"),
    ("lora", ["--lora.r", "0"], "lora.r: 0 must be >= 1"),
    ("lora", ["--lora.dropout", "1.0"], "lora.dropout: 1.0 must be in [0, 1)"),
    ("dpo", ["--dpo.beta", "0"], "dpo.beta: 0.0 must be > 0"),
    ("dpo", ["--dpo.label_smoothing", "0.5"], "dpo.label_smoothing: 0.5 must be in [0, 0.5)"),
    ("dpo", ["--data.max_prompt_len", "128"], "data.max_prompt_len: 128 leaves no room for a response"),
])
def test_degenerate_numbers_name_the_dotted_key(loop, flags, key):
    with pytest.raises(ValueError, match="invalid config") as info:
        parse(loop, *flags)
    assert key in str(info.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as info:
        parse("pretrain", "--micro_batch", "0", "--optim.lr=-1", "--eval_batches", "0")
    message = str(info.value)
    assert all(k in message for k in ("micro_batch: 0", "optim.lr: -1.0", "eval_batches: 0"))


def test_python_callers_are_checked_by_start_run(tmp_path):
    """main(cfg) with a config built in Python: start_run refuses it before the run folder exists."""
    cfg = parse("pretrain", "--out_dir", str(tmp_path / "run"))
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for field, value, key in [("micro_batch", 0, "micro_batch: 0"), ("steps", -1, "steps: -1"),
                              ("device", "tpu:x", "device: 'tpu:x'"), ("seed", "1", "seed: '1' is not int")]:
        bad = dataclasses.replace(cfg, **{field: value})
        with pytest.raises(ValueError, match="invalid config") as info:
            start_run(bad.out_dir, bad.log, bad, cpu)
        assert key in str(info.value)
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=float("nan"), schedule="cos"))
    with pytest.raises(ValueError) as info:
        start_run(bad.out_dir, bad.log, bad, cpu)
    assert "optim.lr: nan must be a finite number > 0" in str(info.value)
    assert "optim.schedule: 'cos' is not Literal" in str(info.value)
    assert not (tmp_path / "run").exists()


def _numeric_fields(cls, prefix=""):
    """Dotted keys of every int/float field (or list/tuple of them) under a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kinds = {a for a in typing.get_args(hints[f.name]) if a is not type(None)} or {hints[f.name]}
        nested = [k for k in kinds if dataclasses.is_dataclass(k)]
        if nested:
            yield from _numeric_fields(nested[0], f"{prefix}{f.name}.")
        elif {int, float} & (kinds | {a for k in kinds for a in typing.get_args(k)}):
            yield prefix + f.name


def test_every_numeric_field_of_every_loop_has_a_bound():
    """A loop field (DPO's, GRPO's, a new one) whose name FIELD_BOUNDS does not know is only checked to be finite:
    this test names it, so its bound is written down when the field is added."""
    from train.config import _bound

    classes = {loop_class(loop) for loop in LOOPS}
    try:
        classes.add(importlib.import_module("train.grpo").GRPOConfig)
    except (ImportError, AttributeError):
        pass
    missing = sorted({f"{cls.__name__}: {key}" for cls in classes for key in _numeric_fields(cls)
                      if _bound(key) is None})
    assert not missing, f"add these fields to train/config.py's FIELD_BOUNDS: {missing}"
    assert FIELD_BOUNDS["dpo.beta"] != FIELD_BOUNDS["beta"]  # the longest name wins: DPO's beta > 0, a KL's >= 0


def test_every_shipped_config_is_valid():
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        loop = path.parent.name
        validate_config(parse_config(loop_class(loop), ["--config", str(path)], defaults=LOOPS[loop][2]))


def test_broken_yaml_config_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nmicro_batch: [1\noptim:\n  lr: 2\n")
    for argv in (["--config", str(path)], [f"--config={path}"]):
        with pytest.raises(ValueError, match=re.escape(f"{path}: invalid YAML at line 3, column ")):
            parse_config(loop_class("pretrain"), argv)


def test_reader_names_file_line_column_and_key(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": 1, "b": [2]}')
    assert read_json(good, keys=("a", "b")) == {"a": 1, "b": [2]}
    cases = {
        "empty.json": (b"", "empty file"),
        "cut.json": (b'{\n  "a": 1,\n  "b": [2', r"invalid JSON at line 3, column 10: Expecting ',' delimiter"),
        "latin1.json": ('{"a": "caf\u00e9"}'.encode("latin-1"), r"not valid UTF-8 at line 1"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: ") + message):
            read_json(tmp_path / name)
    with pytest.raises(ValueError, match=re.escape(f"{good}: missing key 'c' (found ['a', 'b'])")):
        read_json(good, keys=("a", "c"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'absent.json'}: file not found")):
        read_json(tmp_path / "absent.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert read_yaml(tmp_path / "list.yaml") == [1, 2]
    with pytest.raises(ValueError, match=r"expected a JSON/YAML object with keys \['a'\], found a list"):
        read_yaml(tmp_path / "list.yaml", keys=("a",))
    (tmp_path / "tab.yaml").write_text("a: 1\n\tb: 2\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tab.yaml'}: invalid YAML at line 2, column 1")):
        read_yaml(tmp_path / "tab.yaml")
