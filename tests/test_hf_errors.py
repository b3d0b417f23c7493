"""checkpoints/hf.py and checkpoints/download.py on bad input: every failure is our own ValueError or
FileNotFoundError naming the file, key or field at fault. Also: no pickle is ever loaded, dtype
conversion, memory-mapped loading, and the offline Hub cache. No test touches the network."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints.download import resolve_checkpoint
from checkpoints.hf import load_hf
from tests.hf_reference import make_hf_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Qwen3 checkpoint saved by transformers (one safetensors file)."""
    path = tmp_path_factory.mktemp("hf") / "qwen3"
    make_hf_model("qwen3").save_pretrained(path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of `saved` that a test may break."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def edit_config(ckpt: Path, **fields):
    """Set (or, with None, remove) fields of config.json."""
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


def load_fails(ckpt, exc_type, match):
    """load_hf raises exactly `exc_type` (ours, not a KeyError or library error from deep inside)
    with a message matching `match`; returns the message."""
    with pytest.raises(exc_type, match=match) as info:
        load_hf(ckpt)
    assert info.type is exc_type, f"{info.type.__name__}: {info.value}"
    return str(info.value)


# ----------------------------------------------------------------------------- config.json


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="gpt2")
    load_fails(ckpt, ValueError, re.escape(f"{ckpt / 'config.json'}: unsupported model_type 'gpt2'; "
                                           "supported: llama, mistral, qwen2, qwen3"))


@pytest.mark.parametrize("fields", [
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},  # transformers 5
    {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},  # older files
])
def test_unsupported_rope_scaling(ckpt, fields):
    edit_config(ckpt, **fields)
    load_fails(ckpt, ValueError, re.escape(f"{ckpt / 'config.json'}: unsupported rope_scaling.rope_type='yarn'"))


def test_incomplete_llama3_rope_scaling(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e6})
    load_fails(ckpt, ValueError, "config.json: llama3 rope scaling lacks low_freq_factor, high_freq_factor, "
                                 "original_max_position_embeddings")


def test_unsupported_hidden_act(ckpt):
    edit_config(ckpt, hidden_act="gelu")
    load_fails(ckpt, ValueError, re.escape(f"{ckpt / 'config.json'}: unsupported hidden_act='gelu'"))


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_missing_required_config_field(ckpt, field):
    edit_config(ckpt, **{field: None})
    load_fails(ckpt, ValueError, re.escape(f"{ckpt / 'config.json'}: missing required field {field}"))


def test_config_field_of_wrong_type(ckpt):
    edit_config(ckpt, num_hidden_layers="3")
    load_fails(ckpt, ValueError, "config.json: field num_hidden_layers must be a positive integer, got '3'")


def test_invalid_json_in_config(ckpt):
    (ckpt / "config.json").write_text('{\n  "model_type": "qwen3",\n  oops\n}\n')
    load_fails(ckpt, ValueError, re.escape(f"{ckpt / 'config.json'}: invalid JSON at line 3"))


# ----------------------------------------------------------------------------- weight files


def test_missing_shard_named_in_index(tmp_path):
    make_hf_model("qwen3").save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (tmp_path / shards[-1]).unlink()
    load_fails(tmp_path, FileNotFoundError, f"model.safetensors.index.json names shards that are missing: "
                                            f"{re.escape(str(tmp_path / shards[-1]))}")


def test_index_without_weight_map(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{}")
    load_fails(ckpt, ValueError, "model.safetensors.index.json: no weight_map")


def test_truncated_safetensors(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    load_fails(ckpt, ValueError, re.escape(f"{file}: cannot read safetensors file (truncated or corrupt?)"))


@pytest.mark.parametrize("garbage", [b"", b"\x13\x37 not a safetensors file " * 100])
def test_corrupt_safetensors(ckpt, garbage):
    file = ckpt / "model.safetensors"
    file.write_bytes(garbage)
    load_fails(ckpt, ValueError, re.escape(f"{file}: cannot read safetensors file (truncated or corrupt?)"))


def test_tensor_of_wrong_shape(ckpt):
    edit_config(ckpt, intermediate_size=64)  # the file holds 88
    msg = load_fails(ckpt, ValueError, r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape")
    assert re.search(r"has shape \((40, 88|88, 40)\), the model expects \((40, 64|64, 40)\)", msg), msg


def test_missing_and_unexpected_tensors(ckpt):
    file = ckpt / "model.safetensors"
    state = load_file(file)
    del state["model.layers.1.self_attn.k_norm.weight"]
    state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(state, file, metadata={"format": "pt"})
    msg = load_fails(ckpt, ValueError, "checkpoint does not match a qwen3 model built from its config.json")
    assert "missing tensors: model.layers.1.self_attn.k_norm.weight" in msg
    assert "unexpected tensors: model.layers.0.mlp.extra_proj.weight (in model.safetensors)" in msg


def test_pickle_checkpoint_is_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    load_fails(ckpt, FileNotFoundError, r"found pytorch_model\.bin: pickle files are never loaded")


@pytest.mark.parametrize("name", ["no_such_dir", "./missing/dir", "../missing", "a/b/c"])
def test_missing_path_that_is_not_a_repo_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    load_fails(name, FileNotFoundError, re.escape(f"checkpoint {name}: no such directory, and not a Hub repo id"))
    load_fails(tmp_path / name, FileNotFoundError, "no such directory, and not a Hub repo id")


def test_loading_never_calls_torch_load(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: loading must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    model = load_hf(saved)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


# ----------------------------------------------------------------------------- dtype and memory map


def test_load_in_bfloat16(saved):
    model = load_hf(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = make_hf_model("qwen3")
    ours = dict(model.named_parameters())
    assert torch.equal(ours["embed_tokens.weight"], ref.model.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_cpu_load_keeps_tensors_memory_mapped(saved):
    """With dtype None on CPU, every parameter's data lies inside the process's mapping of the
    safetensors file: the weights are read lazily from the page cache, never copied."""
    model = load_hf(saved)
    file = str((saved / "model.safetensors").resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == file:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    assert ranges, f"{file} is not memory-mapped"
    for name, p in model.named_parameters():
        assert any(start <= p.data_ptr() < end for start, end in ranges), f"{name} was copied out of the map"


# ----------------------------------------------------------------------------- the Hub cache, offline


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache under tmp_path with HF_HUB_OFFLINE=1. huggingface_hub reads both at import
    time, so its constants are patched as well as the environment."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay `source` out as the HF cache does: models--org--name/snapshots/<commit>/ + refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def run_download_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "checkpoints.download", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_offline_repo_not_in_cache(offline_hub):
    with pytest.raises(FileNotFoundError, match="checkpoint someorg/somerepo: not found locally, and fetching it "
                                                "from the Hugging Face Hub failed") as info:
        resolve_checkpoint("someorg/somerepo")
    assert "\n" not in str(info.value)


def test_offline_repo_in_cache_loads(offline_hub, saved):
    snapshot = put_in_cache(offline_hub, "someorg/tiny-qwen3", saved)
    assert resolve_checkpoint("someorg/tiny-qwen3") == snapshot
    model = load_hf("someorg/tiny-qwen3")
    assert torch.equal(model.embed_tokens.weight, make_hf_model("qwen3").model.embed_tokens.weight)


def test_download_cli_offline(tmp_path, saved):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")

    missing = run_download_cli("someorg/somerepo", env=env)
    assert missing.returncode == 1 and missing.stdout == ""
    assert "Traceback" not in missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint someorg/somerepo: not found locally"), missing.stderr

    cache = tmp_path / "elsewhere"
    snapshot = put_in_cache(cache, "someorg/tiny-qwen3", saved)
    found = run_download_cli("someorg/tiny-qwen3", "--cache_dir", str(cache), env=env)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == snapshot.resolve()
