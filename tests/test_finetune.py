"""SFT, LoRA and QLoRA loops end to end on CPU with the real stories260K model and real chat data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints.hf import load_hf
from checkpoints.io import latest_checkpoint
from tests.conftest import ROOT, shared
from train import sft as sft_loop
from train.config import parse_config
from train.lora import LORA_DEFAULTS


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """A handful of real ShareGPT conversations, as a JSONL file."""
    rows = json.loads(shared("fastchat_conversations/dummy_conversation.json").read_text())
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    return path


def sft_args(out_dir, data, *extra):
    return ["--config", str(ROOT / "configs/sft/tiny.yaml"), "--out_dir", str(out_dir),
            "--model.checkpoint", str(shared("stories260k/hf")), "--data.train", f"[{data}]",
            "--sample_tokens", "0", *extra]


def lora_args(out_dir, data, *extra):
    return ["--config", str(ROOT / "configs/lora/tiny.yaml"), "--out_dir", str(out_dir),
            "--model.checkpoint", str(shared("stories260k/hf")), "--data.train", f"[{data}]",
            "--sample_tokens", "0", *extra]


def metrics(out_dir):
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_sft_overfits_and_generates_the_memorised_answer(tmp_path):
    from model.generate import generate
    from model.tokenizer import Tokenizer

    convo = [{"role": "user", "content": "What is your name?"},
             {"role": "assistant", "content": "My name is Loom, a small model."}]
    other = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]
    data = tmp_path / "memorise.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [convo, other] * 2))
    result = sft_loop.main(parse_config(sft_loop.SFTConfig, sft_args(
        tmp_path / "run", data, "--steps", "150", "--global_batch", "4", "--micro_batch", "4",
        "--optim.lr", "3e-3", "--optim.warmup_steps", "10", "--optim.min_lr_ratio", "0.1", "--log.every", "10")))
    assert result["loss"] < 0.05
    final = Path(result["final_dir"])
    tok = Tokenizer.from_dir(final)
    model = load_hf(final).eval()
    prompt = tok.encode(tok.apply_chat_template(convo[:1], add_generation_prompt=True))
    answer = tok.decode(generate(model, [prompt], 32, stop_ids=tok.stop_ids)[0])
    # stories260K's vocabulary has no <|im_end|> token: ChatML's end of turn is plain text there,
    # and the model learned to write it after the answer.
    assert answer.startswith("My name is Loom, a small model.<|im_end|>")


def test_sft_gradient_accumulation_invariance(chats, tmp_path):
    sft_loop.main(parse_config(sft_loop.SFTConfig, sft_args(tmp_path / "a", chats, "--steps", "2",
                                                            "--global_batch", "4", "--micro_batch", "1")))
    sft_loop.main(parse_config(sft_loop.SFTConfig, sft_args(tmp_path / "b", chats, "--steps", "2",
                                                            "--global_batch", "4", "--micro_batch", "4")))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for step in (1, 2):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4)


def test_sft_packed_run_trains(chats, tmp_path):
    result = sft_loop.main(parse_config(sft_loop.SFTConfig, sft_args(
        tmp_path, chats, "--steps", "6", "--global_batch", "2", "--micro_batch", "2", "--data.pack", "true")))
    m = metrics(tmp_path)
    assert result["step"] == 6 and m[6]["loss"] < m[1]["loss"]


def test_lora_trains_adapters_only_and_exports_peft(chats, tmp_path):
    import peft
    import transformers

    result = sft_loop.main(parse_config(sft_loop.SFTConfig, defaults=LORA_DEFAULTS, argv=lora_args(
        tmp_path, chats, "--steps", "6", "--lora.merge", "true")))
    m = metrics(tmp_path)
    assert m[6]["loss"] < m[1]["loss"]
    final = Path(result["final_dir"])
    # The checkpoint holds adapters only.
    meta = json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())
    assert meta["trainable_only"]
    # PEFT on transformers' model loads our adapter; logits equal the merged export and ours.
    base = transformers.AutoModelForCausalLM.from_pretrained(shared("stories260k/hf"), attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, final).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(final / "merged", attn_implementation="eager").eval()
    from checkpoints.peft import load_peft_adapter

    ours = load_peft_adapter(load_hf(shared("stories260k/hf")), final).eval()
    ids = torch.tensor([[1, 403, 261, 365, 13, 290, 284, 22, 306]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        # Two kernel paths (transformers' eager attention, our SDPA) in float32 on logits of
        # magnitude ~10: their rounding differs by ~1e-5 on some CPUs, so 1e-4 is the honest bound.
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
    plain = load_hf(shared("stories260k/hf")).eval()
    with torch.no_grad():  # the adapters changed the model
        assert not torch.allclose(plain(ids), ours(ids), atol=1e-4)


def test_qlora_nf4_trains_on_cpu(chats, tmp_path):
    sft_loop.main(parse_config(sft_loop.SFTConfig, defaults=LORA_DEFAULTS, argv=lora_args(
        tmp_path, chats, "--steps", "8", "--lora.quantize", "nf4", "--lora.nf4_block_size", "32",
        "--lora.nf4_scaler_block_size", "8")))
    m = metrics(tmp_path)
    assert m[8]["loss"] < m[1]["loss"] - 1.0
    names = json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())
    assert names["trainable_only"]
    from safetensors import safe_open

    with safe_open(tmp_path / "final" / "adapter_model.safetensors", "pt") as f:
        assert all("lora_" in k for k in f.keys())


def test_lora_resume_equals_uninterrupted(chats, tmp_path):
    common = ("--steps", "4", "--global_batch", "2", "--micro_batch", "2")
    sft_loop.main(parse_config(sft_loop.SFTConfig, defaults=LORA_DEFAULTS, argv=lora_args(tmp_path / "full", chats, *common)))
    sft_loop.main(parse_config(sft_loop.SFTConfig, defaults=LORA_DEFAULTS, argv=lora_args(tmp_path / "split", chats, *common,
                                                                "--stop_at_step", "2")))
    sft_loop.main(parse_config(sft_loop.SFTConfig, defaults=LORA_DEFAULTS, argv=lora_args(tmp_path / "split", chats, *common)))
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    for step in range(1, 5):
        assert split[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6), step


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# QLoRA under FSDP2: NF4 shards must split evenly (q/v projections of stories260K do, with these blocks).
QLORA = ("--lora.quantize", "nf4", "--lora.nf4_block_size", "32", "--lora.nf4_scaler_block_size", "8",
         "--lora.targets", "[q_proj,v_proj]")


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["sft", "lora", "qlora"])
def test_fsdp_two_processes_match_one(loop, chats, tmp_path):
    args = sft_args if loop == "sft" else lora_args
    common = ("--steps", "3", "--global_batch", "4", "--micro_batch", "2", "--log.every", "1",
              *(QLORA if loop == "qlora" else ()))
    defaults = None if loop == "sft" else LORA_DEFAULTS
    sft_loop.main(parse_config(sft_loop.SFTConfig, args(tmp_path / "one", chats, *common), defaults=defaults))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "train.sft" if loop == "sft" else "train.lora", *args(tmp_path / "two", chats, *common)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for step in (1, 2, 3):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
