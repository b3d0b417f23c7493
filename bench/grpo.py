"""One GRPO step: train/grpo.py against TRL's GRPOTrainer, same model shape, prompts and reward.

    python bench/grpo.py                       # llama-3.2-1b shape, 8 prompts x G=8 x 256 new tokens
    python bench/grpo.py --only ours

Each row runs in a fresh process. Both train a randomly initialised model of the preset's shape in
bf16 autocast over fp32 master weights, full fine-tuning, beta = 0.04 (so a frozen reference model
scores every completion), 8 prompts of about 128 tokens cut from tiny Shakespeare (GPT-2 tokenizer
from tests/assets), G = 8 completions of max 256 tokens each, sampled at temperature 1 (a random
model almost never samples its end token, so completions run to the limit), one optimizer step per
rollout (mu = 1), micro-batches of 8 completions. The reward is a cheap function of the text.

Rows: ours (the rollout engine: static cache, CUDA graphs, in-process), with --micro_batch completions
per micro-batch, and with all of them in one ("ours, one micro-batch": each prompt's row holds its G
completions; TRL's micro-batch is --micro_batch in every row); TRL with its default
generation path (transformers generate); TRL with `cache_implementation="static"` (which fails on
float32 weights under bf16 autocast: transformers allocates the static cache in the weights' dtype),
and the same with the model loaded in bf16 (`model_init_kwargs`: bf16 weights, a different recipe); TRL
with transformers' paged continuous batching (`use_transformers_continuous_batching`, formerly
`use_transformers_paged`).
TRL 1.16 checkpoints activations by default (gradient_checkpointing); ours does not here. s/step is the
mean over the steps after the first two (warm-up: compilation and graph capture); ours also prints
the phase split its loop logs (generation, scoring, reference, training).
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from dpo import _model_config, make_data  # noqa: E402  (the same text and tokenizer as the DPO bench)

ROWS = [("ours", "ours", None), ("TRL default generate", "trl", None), ("TRL static cache", "trl", "static"),
        ("TRL static, bf16 weights", "trl", "static-bf16"), ("ours, one micro-batch", "ours", "one"),
        ("TRL continuous batching", "trl", "continuous")]
WARMUP = 3


def vowel_share(prompts, completions, **kw):
    """A cheap reward that varies between samples: the share of vowels in the completion."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def write_prompts(data: Path) -> Path:
    rows = [json.loads(line) for line in (data / "rows.jsonl").read_text().splitlines()]
    with open(data / "prompts.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"]}) + "\n")
    return data / "prompts.jsonl"


def run_ours(args, data: Path, micro_batch: int) -> dict:
    from train import grpo
    from train.config import parse_config

    out = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    argv = ["--out_dir", str(out), "--steps", str(args.steps), "--global_batch", str(args.prompts),
            "--micro_batch", str(micro_batch), "--eval_every", "0", "--sample_tokens", "0",
            "--model.preset", args.model, *(["--model.vocab_size", str(args.vocab_size)] if args.vocab_size else []),
            "--data.train", f"[{data / 'prompts.jsonl'}]", "--data.tokenizer", str(data / "tokenizer"),
            "--data.chat_template", "chatml", "--data.max_prompt_len", str(args.prompt_tokens + 32),
            "--grpo.num_generations", str(args.G), "--grpo.max_completion_len", str(args.completion_tokens),
            "--grpo.beta", "0.04", "--grpo.log_completions_every", "0", "--checkpoint.export_hf", "false",
            "--log.every", "1", "--parallel.compile", str(torch.cuda.is_available()).lower(), "--optim.lr", "1e-6"]
    if args.profile:
        from kernels import profile_steps

        profile_steps(grpo, "ours", start=WARMUP)
    grpo.main(parse_config(grpo.GRPOConfig, argv), reward_funcs=[vowel_share])
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"][WARMUP + (3 if args.profile else 0):]  # profiled steps untimed
    times = [r["time"] for r in train]
    # s/step is the span between the first timed step's end and the last's: the phases of the same
    # steps (the first timed step's own time is outside that span).
    timed = train[1:] or train
    phases = {k: sum(r[f"time/{k}"] for r in timed) / len(timed) for k in ("generate", "score", "reference", "train")}
    s_per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else sum(phases.values())
    shutil.rmtree(out, ignore_errors=True)
    return {"s_per_step": s_per_step, "phases": phases,
            "completion_len": sum(r["completion_len"] for r in train) / len(train),
            "peak_gib": train[-1].get("peak_mem_gib") or 0.0}


def run_trl(args, data: Path, cache: str | None) -> dict:
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from checkpoints.hf import config_to_hf

    mcfg = _model_config(args)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer" / "tokenizer.json"),
                                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.padding_side = "left"
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(mcfg, torch.float32))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32)
    dataset = datasets.Dataset.from_list([json.loads(x) for x in (data / "prompts.jsonl").read_text().splitlines()])
    out = tempfile.mkdtemp(prefix="bench-trl-grpo-")
    cuda = torch.cuda.is_available()
    config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.micro_batch,
                        gradient_accumulation_steps=args.prompts * args.G // args.micro_batch,
                        num_generations=args.G, max_completion_length=args.completion_tokens,
                        max_steps=args.steps, learning_rate=1e-6, beta=0.04, bf16=cuda, use_cpu=not cuda,
                        logging_steps=1, save_strategy="no", report_to=[], temperature=1.0,
                        cache_implementation=cache.removesuffix("-bf16") if cache in ("static", "static-bf16") else None,
                        dataloader_num_workers=0,
                        # transformers' paged continuous batching (TRL's use_transformers_paged, renamed)
                        use_transformers_continuous_batching=cache == "continuous",
                        model_init_kwargs={"dtype": torch.bfloat16} if cache and cache.endswith("-bf16") else None)
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    # With beta > 0 TRL loads its reference model by name, so the random model is saved and named by its folder.
    model_dir = Path(out) / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[vowel_share], args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    timed = times[WARMUP:]
    s_per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    shutil.rmtree(out, ignore_errors=True)
    return {"s_per_step": s_per_step, "phases": None, "completion_len": None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=128)
    p.add_argument("--completion_tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=None, help="override the preset's (CPU smoke runs)")
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--rows", default=None, help="comma-separated row numbers of ROWS to run (default: all)")
    p.add_argument("--profile", action="store_true", help="our row: profile 3 steps after warm-up (GPU time by "
                   "part, longest kernels, host operations; those steps are left out of s/step)")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "CACHE", "DATA"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < WARMUP + 2:
        p.error(f"--steps must be at least {WARMUP + 2}: the first {WARMUP} warm up, and s/step is timed between "
                "the ends of the later ones")
    if args.worker:
        mode, cache, data = args.worker
        if mode == "ours":  # "one": every completion of the step in one micro-batch (one row per prompt)
            result = run_ours(args, Path(data), args.prompts * args.G if cache == "one" else args.micro_batch)
        else:
            result = run_trl(args, Path(data), None if cache == "none" else cache)
        print("RESULT " + json.dumps(result), flush=True)
        return

    data = make_data(Path(tempfile.mkdtemp(prefix="bench-grpo-data-")), args.prompts * args.steps, args.prompt_tokens, 1)
    write_prompts(data)
    print(f"{args.model}, {args.prompts} prompts x G={args.G} x {args.completion_tokens} new tokens, beta 0.04, "
          f"{args.steps} steps ({WARMUP} warm-up), torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    header = f"| {'run':22s} | s/step | completion tokens/s | generate | score | reference | train | peak GiB |"
    print(header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|", flush=True)
    results = {}
    picked = None if args.rows is None else {int(i) for i in args.rows.split(",")}
    for i, (name, mode, cache) in enumerate(ROWS):
        if (args.only and mode != args.only) or (picked is not None and i not in picked):
            continue
        cmd = [sys.executable, __file__, "--worker", mode, cache or "none", str(data), "--model", args.model,
               "--prompts", str(args.prompts), "--G", str(args.G), "--micro_batch", str(args.micro_batch),
               "--prompt_tokens", str(args.prompt_tokens), "--completion_tokens", str(args.completion_tokens),
               "--steps", str(args.steps), *(["--vocab_size", str(args.vocab_size)] if args.vocab_size else []),
               *(["--profile"] if args.profile else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
        for x in proc.stdout.splitlines():  # --profile's tables
            if x.startswith("# "):
                print(x, flush=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:  # a failing row does not end the table
            why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            print("\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:]), file=sys.stderr)
            print(f"| {name:22s} | failed: {why[0][:150]} |", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        tokens = args.prompts * args.G * (r["completion_len"] or args.completion_tokens)
        ph = r["phases"] or {}
        cols = " | ".join(f"{ph[k]:.2f}" if k in ph else "" for k in ("generate", "score", "reference", "train"))
        results[name] = r["s_per_step"]
        print(f"| {name:22s} | {r['s_per_step']:.2f} | {tokens / r['s_per_step']:,.0f} | {cols} | {r['peak_gib']:.1f} |",
              flush=True)
    for ours in ("ours", "ours, one micro-batch"):
        for name in (name for name, mode, _ in ROWS if mode == "trl"):
            if ours in results and name in results:
                print(f"{ours} vs {name}: {results[name] / results[ours]:.1f}x faster per step")


if __name__ == "__main__":
    main()
