"""checkpoints/export_check.py and checkpoints/model_card.py: an export checks out against the network in memory,
against transformers and against peft; a corrupted tensor or config key is caught and named; the model card's
header is the Hub's metadata."""

import json
import os
import re
import socket
import struct
import subprocess
import sys

import pytest
import torch
import yaml

from checkpoints.export_check import ExportCheckError, check_export
from checkpoints.hf import load_hf, save_hf
from checkpoints.model_card import write_model_card
from checkpoints.peft import save_peft_adapter
from model.config import ModelConfig
from model.gpt import GPT
from model.lora import apply_lora, quantize_base_nf4
from tests.conftest import ROOT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny(preset="tiny", seed=0) -> GPT:
    model = GPT(ModelConfig.preset(preset))
    model.init_weights(seed=seed, std=0.2)  # wide weights: logits far from uniform, so errors show
    return model.eval()


def corrupt(file, key, value=1000.0):
    """Overwrite the first float32 of tensor `key` inside a safetensors file (8-byte header length, JSON
    header with each tensor's data_offsets, then the data)."""
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header[key]["dtype"] == "F32"
    start = 8 + n + header[key]["data_offsets"][0]
    raw[start:start + 4] = struct.pack("<f", value)
    file.write_bytes(raw)


def edit_json(path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------- full model


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])  # tied embeddings; untied with qk-norm
def test_export_checks_out(preset, tmp_path):
    model = tiny(preset)
    save_hf(model, tmp_path / "final")
    probe = [[1, 5, 9, 200, 3, 77, 12, 0], [4, 4, 4, 4, 300, 301, 302, 303]]
    result = check_export(model, tmp_path / "final", probe)
    assert result["ok"] and result["weights"]["identical"] and result["config"]["identical"]
    assert result["native"]["max_abs_diff"] == 0.0  # same weights, same code, same CPU: equal bit for bit
    assert result["native"]["greedy_identical"]
    hf = result["transformers"]
    assert hf["ok"] and hf["greedy_identical"] and hf["max_rel_diff"] < 1e-5
    assert hf["greedy_positions"] == 16  # every probe position was decisive
    assert json.loads((tmp_path / "final" / "export_check.json").read_text()) == json.loads(json.dumps(result))


def test_bf16_export_of_fp32_weights_reports_its_rounding(tmp_path):
    model = tiny()
    save_hf(model, tmp_path / "final", dtype=torch.bfloat16)
    result = check_export(model, tmp_path / "final")
    assert result["weights"]["dtype"] == "bfloat16" and result["weights"]["in_memory_dtype"] == "float32"
    assert result["native"]["max_abs_diff"] == 0.0  # against the in-memory weights rounded to bf16
    assert 1e-4 < result["native"]["rounding_rel_diff"] < 0.1  # what bf16 costs, reported, not judged
    assert result["transformers"]["ok"]


def test_corrupted_tensor_is_named(tmp_path):
    model = tiny()
    save_hf(model, tmp_path / "final")
    key = "model.layers.1.mlp.down_proj.weight"
    corrupt(tmp_path / "final" / "model.safetensors", key)
    with pytest.raises(ExportCheckError, match=re.escape(f"tensor {key} differs")) as err:
        check_export(model, tmp_path / "final")
    assert "1 of 11264 values" in str(err.value) and "index (0, 0)" in str(err.value)
    recorded = json.loads((tmp_path / "final" / "export_check.json").read_text())
    assert recorded["ok"] is False and key in recorded["error"]


def test_changed_config_key_is_named(tmp_path):
    model = tiny()
    save_hf(model, tmp_path / "final")
    edit_json(tmp_path / "final" / "config.json", rms_norm_eps=1e-3)
    with pytest.raises(ExportCheckError, match="rms_norm_eps is 0.001 in the export, 1e-05 in the model"):
        check_export(model, tmp_path / "final")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    save_hf(model, tmp_path / "final")
    file = tmp_path / "final" / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ExportCheckError, match="missing from the export: model.norm.weight"):
        check_export(model, tmp_path / "final", with_transformers=False)


# ----------------------------------------------------------------------------- PEFT adapter


def adapted(tmp_path, qlora=False):
    """A base checkpoint on disk and, in memory, the base with trained-looking LoRA adapters (as the LoRA loop
    has it: base from the checkpoint, adapters float32, base bf16 NF4 for QLoRA)."""
    save_hf(tiny(seed=3), tmp_path / "base")
    model = load_hf(tmp_path / "base")
    apply_lora(model, "all-linear", r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lora_A", ".lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if qlora:
        for name, p in model.named_parameters():
            if not name.endswith((".lora_A", ".lora_B")):
                p.data = p.data.to(torch.bfloat16)
        quantize_base_nf4(model, block_size=64, scaler_block_size=16)
    save_peft_adapter(model, tmp_path / "final", base_model_name_or_path=str(tmp_path / "base"))
    return model.eval()


@pytest.mark.parametrize("qlora", [False, True])
def test_adapter_checks_out(qlora, tmp_path):
    model = adapted(tmp_path, qlora)
    result = check_export(model, tmp_path / "final", adapter=True, base_dir=tmp_path / "base")
    assert result["ok"] and result["kind"] == "adapter" and result["weights"]["tensors"] == 2 * 7 * 2
    assert result["native"]["max_abs_diff"] == 0.0 and result["native"]["greedy_identical"]
    assert result["peft"]["ok"] and result["peft"]["greedy_identical"] and result["peft"]["max_rel_diff"] < 1e-5


def test_corrupted_adapter_tensor_is_named(tmp_path):
    model = adapted(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    corrupt(tmp_path / "final" / "adapter_model.safetensors", key)
    with pytest.raises(ExportCheckError, match=re.escape(f"tensor {key} differs")):
        check_export(model, tmp_path / "final", adapter=True, base_dir=tmp_path / "base")


def test_changed_adapter_config_is_named(tmp_path):
    model = adapted(tmp_path)
    edit_json(tmp_path / "final" / "adapter_config.json", lora_alpha=16)
    with pytest.raises(ExportCheckError, match="lora_alpha is 16 in the export, 8 in the model"):
        check_export(model, tmp_path / "final", adapter=True, base_dir=tmp_path / "base")


# ----------------------------------------------------------------------------- model card


def card_header(path):
    text = path.read_text()
    assert text.startswith("---\n")
    header, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(header), body


def test_model_card_full_model(tmp_path):
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (tmp_path / "run" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    run_config = {"steps": 100, "optim": {"lr": 3e-4, "betas": (0.9, 0.95)}, "lora": None,
                  "data": {"train": [tmp_path / "chats.jsonl"]}}
    out = write_model_card(final, base_model="Qwen/Qwen2.5-0.5B", run_config=run_config,
                           metrics={"step": 100, "tokens": 409600, "loss": 1.234567, "val_loss": 1.3},
                           datasets=["openai/gsm8k", str(tmp_path / "chats.jsonl")], license="apache-2.0",
                           tags=["sft"], adapter=False)
    header, body = card_header(out)
    assert header == {"base_model": "Qwen/Qwen2.5-0.5B", "library_name": "transformers",
                      "pipeline_tag": "text-generation", "tags": ["handloom", "sft"],
                      "datasets": ["openai/gsm8k"], "license": "apache-2.0"}
    assert "| tokens | 409,600 |" in body and "| loss | 1.235 |" in body
    assert "chats.jsonl" in body  # a local file is named in the text, not in the Hub's datasets field
    assert "![training curves](curves.png)" in body and (final / "curves.png").is_file()
    config_block = body.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block)["optim"] == {"lr": 3e-4, "betas": [0.9, 0.95]}
    assert "lm_eval --model hf --model_args pretrained=" in body

    # huggingface_hub reads the same metadata.
    from huggingface_hub import ModelCard

    data = ModelCard.load(out).data
    assert data.base_model == "Qwen/Qwen2.5-0.5B" and data.library_name == "transformers"
    assert data.tags == ["handloom", "sft"] and data.license == "apache-2.0"


def test_model_card_adapter(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    out = write_model_card(final, base_model="meta-llama/Llama-3.2-1B", run_config={"lora": {"quantize": "nf4"}},
                           metrics={"step": 4, "loss": None}, datasets=[], license=None, tags=["sft"], adapter=True)
    header, body = card_header(out)
    assert header == {"base_model": "meta-llama/Llama-3.2-1B", "library_name": "peft",
                      "pipeline_tag": "text-generation", "tags": ["handloom", "sft", "lora", "qlora"]}
    assert "PeftModel.from_pretrained" in body and "peft=your-name/" in body
    assert "curves.png" not in body and "| loss |" not in body


# ----------------------------------------------------------------------------- what only transformers sees


def test_transformers_catches_what_our_own_reload_cannot(tmp_path, monkeypatch):
    # A bug in our model code (here: wrong RoPE frequencies) is in the network in memory and in our reload
    # alike, so they agree; transformers' implementation is the one that disagrees.
    import model.gpt

    right = model.gpt.rope_inv_freq
    monkeypatch.setattr(model.gpt, "rope_inv_freq", lambda cfg, device=None: right(cfg, device) * 1.5)
    net = tiny()
    save_hf(net, tmp_path / "final")
    with pytest.raises(ExportCheckError, match="logits of transformers' load of the export differ from ours"):
        check_export(net, tmp_path / "final")
    assert check_export(net, tmp_path / "final", with_transformers=False)["native"]["max_abs_diff"] == 0.0


# ----------------------------------------------------------------------------- FSDP2


WORKER = """
import sys
import torch
from checkpoints.export_check import ExportCheckError, check_export
from checkpoints.hf import export_hf
from model.config import ModelConfig
from model.gpt import GPT
from train.config import ParallelConfig
from train.dist import barrier, setup_distributed, teardown_distributed
from train.parallel import parallelize
sys.path.insert(0, sys.argv[2])
from tests.test_export_check import corrupt

out = sys.argv[1]
d = setup_distributed("cpu")
with torch.device("meta"):
    model = GPT(ModelConfig.preset("tiny"))
parallelize(model, ParallelConfig(), d)
model.to_empty(device="cpu")
model.init_weights(std=0.2)
export_hf(model, out)
print(f"rank {d.rank}: {check_export(model, out)['summary']}", flush=True)
if d.rank == 0:
    corrupt(__import__("pathlib").Path(out) / "model.safetensors", "model.layers.0.self_attn.k_proj.weight")
barrier()
try:
    check_export(model, out)
except ExportCheckError as e:
    print(f"rank {d.rank} raised: {str(e).splitlines()[0]}", flush=True)
teardown_distributed()
"""


@pytest.mark.slow
def test_sharded_model_is_gathered_and_every_rank_gets_the_verdict(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(tmp_path / "final"), str(ROOT)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: export check of" in proc.stdout and "transformers ok" in proc.stdout
        assert re.search(f"rank {rank} raised: .*tensor model.layers.0.self_attn.k_proj.weight differs", proc.stdout)
