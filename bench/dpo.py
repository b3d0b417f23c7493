"""DPO step throughput and memory: train/dpo.py against TRL's DPOTrainer, same model shape, same text.

    python bench/dpo.py                          # llama-3.2-1b shape, 8 pairs of ~1,000 tokens per step
    python bench/dpo.py --only ours --steps 8    # just our rows

Each row runs in a fresh process: our loop through `train.dpo.main` (its real data pipeline, chat
template, metrics), TRL's `DPOTrainer` through `trainer.train()`. TRL 1.16 checkpoints activations (gradient_checkpointing) by
default; "ckpt" rows of ours turn on `parallel.activation_checkpointing`, "no ckpt" rows of TRL turn
its off, so each comparison pairs the same memory policy. Ours shares each pair's prompt between
its two responses (`dpo.share_prompt`, the default; "2B rows" turns it off). Both train a randomly initialised model
of the preset's shape in bf16 autocast over fp32 master weights, on the same rows of text cut from
tiny Shakespeare and tokenized with the GPT-2 tokenizer shipped in tests/assets. Rows:

    full, reference copy          a frozen second model
    full, precomputed reference   the reference log-probs of every pair computed once before training
                                  (that pass is timed separately, "precompute s")
    LoRA r=16, adapters off       ours: the same network with its adapters disabled; TRL: its PEFT path

s/step is the mean over the steps after warm-up (the first half), tokens/s counts each side's own real
(unpadded) tokens of prompt + chosen and prompt + rejected, MFU counts the policy's training FLOPs only
(6 N + attention per token, not the reference's forward) against 989 TFLOP/s, over those tokens (with a
shared prompt ours runs fewer: its MFU is then the equivalent of the unshared work), and peak memory is
torch.cuda.max_memory_allocated of the whole run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

ROWS = [  # (name, mode, reference, checkpointing: ours activation checkpointing / TRL gradient checkpointing)
    ("ours full, ref copy", "ours", "copy", False),
    ("TRL full, ref copy", "trl", "copy", True),
    ("ours full, precomputed ref", "ours", "precomputed", False),
    ("TRL full, precomputed ref", "trl", "precomputed", True),
    ("ours LoRA r=16, adapters off", "ours", "lora", False),
    ("TRL LoRA r=16 (PEFT)", "trl", "lora", True),
    ("ours full, ref copy, ckpt", "ours", "copy", True),
    ("ours full, precomputed, ckpt", "ours", "precomputed", True),
    ("TRL full, ref copy, no ckpt", "trl", "copy", False),
    ("TRL full, precomputed, no ckpt", "trl", "precomputed", False),
    ("ours full, ref copy, 2B rows", "ours", "copy-unshared", False),
    ("ours full, precomputed, 2B rows", "ours", "precomputed-unshared", False),
    ("ours LoRA r=16, adapters off, ckpt", "ours", "lora", True),
]
# Pairs compared in the summary: (ours, TRL) with the same reference and the same checkpointing.
COMPARE = [(6, 1), (7, 3), (12, 5), (4, 5), (0, 8), (2, 9)]
PEAK_FLOPS = 989e12


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _model_config(args):
    import dataclasses

    from model.config import ModelConfig

    mcfg = ModelConfig.preset(args.model)
    return dataclasses.replace(mcfg, vocab_size=args.vocab_size) if args.vocab_size else mcfg


def make_data(out: Path, pairs: int, prompt_tokens: int, response_tokens: int) -> Path:
    """A tokenizer folder (GPT-2) and `rows.jsonl` of prompt/chosen/rejected strings of about the
    asked lengths, cut from tiny Shakespeare."""
    from tokenizers import Tokenizer

    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    src = ROOT / "tests" / "assets" / "tokenizer_gpt2"
    with gzip.open(src / "tokenizer.json.gz", "rb") as f:
        (tok_dir / "tokenizer.json").write_bytes(f.read())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, tok_dir / name)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = tok.encode((ROOT / "train" / "assets" / "tinyshakespeare.txt").read_text()).ids
    step = prompt_tokens + 2 * response_tokens
    with open(out / "rows.jsonl", "w") as f:
        for i in range(pairs):
            a = (i * step) % (len(ids) - step)
            chunk = ids[a:a + step]
            f.write(json.dumps({"prompt": tok.decode(chunk[:prompt_tokens]),
                                "chosen": tok.decode(chunk[prompt_tokens:prompt_tokens + response_tokens]),
                                "rejected": tok.decode(chunk[prompt_tokens + response_tokens:])}) + "\n")
    return out


def run_ours(args, data: Path, reference: str, ckpt: bool) -> dict:
    from train import dpo
    from train.config import parse_config

    out = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    argv = ["--out_dir", str(out), "--steps", str(args.steps), "--global_batch", str(args.pairs),
            "--micro_batch", str(args.pairs), "--eval_every", "0", "--sample_tokens", "0",
            "--model.preset", args.model, *(["--model.vocab_size", str(args.vocab_size)] if args.vocab_size else []), "--data.train", f"[{data / 'rows.jsonl'}]",
            "--data.tokenizer", str(data / "tokenizer"), "--data.chat_template", "chatml",
            "--data.max_len", str(args.max_len), "--data.max_prompt_len", str(args.max_len - 64),
            "--checkpoint.export_hf", "false", "--log.every", "1",
            "--parallel.compile", str(torch.cuda.is_available()).lower(),
            "--optim.lr", "5e-7"]
    argv += ["--parallel.activation_checkpointing", str(ckpt).lower()]
    if reference == "lora":
        argv += ["--lora.r", "16", "--lora.alpha", "32", "--dpo.reference", "adapters_off", "--optim.lr", "5e-6"]
    elif reference.endswith("-unshared"):
        argv += ["--dpo.reference", reference.removesuffix("-unshared"), "--dpo.share_prompt", "false"]
    else:
        argv += ["--dpo.reference", reference]
    precompute = {}
    original = dpo.precomputed_logps

    def timed(*a, **k):
        t0 = time.perf_counter()
        table = original(*a, **k)
        _sync()
        precompute["s"] = time.perf_counter() - t0
        return table

    dpo.precomputed_logps = timed
    if args.profile:
        from kernels import profile_steps

        profile_steps(dpo, "ours " + reference, start=max(1, args.steps // 2 - 3))  # ends before the timed half
    dpo.main(parse_config(dpo.DPOConfig, argv))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    times = [r["time"] for r in train]
    half = len(times) // 2
    s_per_step = (times[-1] - times[half]) / (len(times) - 1 - half)
    from train.preference_data import PreferenceDataset
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(data / "tokenizer", default_chat_template="chatml")
    ds = PreferenceDataset([data / "rows.jsonl"], tok, args.max_len, args.max_len - 64, progress=False)
    tokens_per_pair = ds.stats["tokens"] / len(ds)
    shutil.rmtree(out, ignore_errors=True)
    mcfg = _model_config(args)
    return {"s_per_step": s_per_step, "tokens_per_pair": tokens_per_pair, "peak_gib": train[-1].get("peak_mem_gib") or 0.0,
            "precompute_s": precompute.get("s"), "flops_per_token": mcfg.flops_per_token(args.max_len)}


def run_trl(args, data: Path, reference: str, ckpt: bool) -> dict:
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    from checkpoints.hf import config_to_hf

    mcfg = _model_config(args)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer" / "tokenizer.json"),
                                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(mcfg, torch.float32))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32)
    rows = [json.loads(line) for line in (data / "rows.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    config = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
                       max_steps=args.steps, learning_rate=5e-7, bf16=torch.cuda.is_available(),
                       use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no",
                       report_to=[], max_length=args.max_len, precompute_ref_log_probs=reference == "precomputed",
                       dataloader_num_workers=0, gradient_checkpointing=ckpt)
    peft_config = None
    if reference == "lora":
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            _sync()
            times.append(time.perf_counter())

    # Without PEFT or precomputed log-probs TRL needs a reference model; it would load one from the
    # model's Hub name, which a randomly initialised model has not, so it gets the same frozen copy as ours.
    ref_model = None
    if reference == "copy":
        import copy

        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tok,
                         peft_config=peft_config, callbacks=[Clock()])
    ds = trainer.train_dataset
    tokens_per_pair = sum(2 * len(p) + len(c) + len(r) + 0 for p, c, r in
                          zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])) / len(ds)
    t0 = time.perf_counter()
    trainer.train()
    half = len(times) // 2
    s_per_step = (times[-1] - times[half]) / (len(times) - 1 - half)
    shutil.rmtree(out, ignore_errors=True)
    return {"s_per_step": s_per_step, "tokens_per_pair": tokens_per_pair,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            "precompute_s": (times[0] - t0) if reference == "precomputed" else None,
            "flops_per_token": mcfg.flops_per_token(args.max_len)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=512)
    p.add_argument("--response_tokens", type=int, default=448)
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--vocab_size", type=int, default=None, help="override the preset's (CPU smoke runs of tiny shapes)")
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--rows", default=None, help="comma-separated row numbers of ROWS to run (default: all)")
    p.add_argument("--profile", action="store_true", help="our rows: profile 3 steps that end before the timed half "
                   "(GPU time by part, longest kernels, host operations)")
    p.add_argument("--worker", nargs=4, metavar=("MODE", "REFERENCE", "CKPT", "DATA"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        mode, reference, ckpt, data = args.worker
        result = (run_ours if mode == "ours" else run_trl)(args, Path(data), reference, ckpt == "1")
        print("RESULT " + json.dumps(result), flush=True)
        return

    data = make_data(Path(tempfile.mkdtemp(prefix="bench-dpo-data-")), args.pairs * args.steps,
                     args.prompt_tokens, args.response_tokens)
    print(f"{args.model}, {args.pairs} pairs per step, max_len {args.max_len}, {args.steps} steps, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    header = f"| {'run':30s} | s/step | tokens/s | MFU | peak GiB | precompute s |"
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
    results = {}
    picked = None if args.rows is None else {int(i) for i in args.rows.split(",")}
    for i, (name, mode, reference, ckpt) in enumerate(ROWS):
        if (args.only and mode != args.only) or (picked is not None and i not in picked):
            continue
        cmd = [sys.executable, __file__, "--worker", mode, reference, str(int(ckpt)), str(data), "--model", args.model,
               "--pairs", str(args.pairs), "--max_len", str(args.max_len), "--steps", str(args.steps),
               *(["--vocab_size", str(args.vocab_size)] if args.vocab_size else []),
               *(["--profile"] if args.profile else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
        for x in proc.stdout.splitlines():  # --profile's tables
            if x.startswith("# "):
                print(x, flush=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:  # a failing row does not end the table
            why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            print("\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:]), file=sys.stderr)
            print(f"| {name:30s} | failed: {why[0][:150]} |", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        tps = args.pairs * r["tokens_per_pair"] / r["s_per_step"]
        mfu = tps * r["flops_per_token"] / PEAK_FLOPS
        pre = f"{r['precompute_s']:.1f}" if r["precompute_s"] is not None else ""
        results[name] = tps
        print(f"| {name:30s} | {r['s_per_step']:.3f} | {tps:,.0f} | {100 * mfu:.1f}% | {r['peak_gib']:.1f} | {pre} |",
              flush=True)
    for ours, trl in ((ROWS[a][0], ROWS[b][0]) for a, b in COMPARE):
        if ours in results and trl in results:
            print(f"{ours} / {trl}: {results[ours] / results[trl]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
