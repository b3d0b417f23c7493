"""Generation throughput: handloom's RolloutEngine vs transformers' generate, same weights, one process.

    python bench/generate.py        # llama-3.2-1b shape, bf16, 128-token prompts, 256 new tokens, batch 8/64/256
    python bench/generate.py --preset tiny --batches 4 --prompt_len 16 --new_tokens 16 --device cpu --hf_static ""

Every row samples at temperature 1.0 (no top-k / top-p) from the same random weights with no stop
token, so every row of every implementation produces exactly new_tokens tokens. Tables:

1. new tokens/s and peak memory at each batch size: ours (static cache, compiled step captured in
   CUDA graphs), transformers' generate with its default cache, and with its static cache
   (`cache_implementation="static"`, which transformers compiles itself). "bound" is the
   memory-bandwidth bound: every step reads all weights once (KV-cache reads not counted), at the
   copy bandwidth measured in the same run. "peak GiB" counts the implementation's own weights plus
   everything allocated during its call (ours: the static cache, graphs and state, allocated once).
2. A GRPO length mix: completion lengths uniform in [32, 256], ours with and without compaction.
   A row ends when it reaches its length, through the same device-side `finished` flag a stop token
   sets (per-row budgets: `max_new_tokens` given as a list), so the schedule is exact and seeded
   instead of depending on what random weights sample. tokens/s counts the tokens kept.
3. The log-probs the sampler returns against a teacher-forced bf16 forward of the same sequences.
4. One decode step at batch 64: eager, compiled, compiled + CUDA graph; and where its time goes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.hf import config_to_hf, hf_to_native_key  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.generate import RolloutEngine  # noqa: E402
from model.gpt import GPT  # noqa: E402

START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, baseline: int, own_bytes: int, repeats: int = 1):
    """Median seconds of `repeats` calls, and peak GiB: own weights + the peak allocated above
    `baseline`, the memory in use before this implementation allocated anything (both models'
    weights, and whatever earlier rows keep: one implementation's row never counts another's)."""
    times, out = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() - baseline + own_bytes) / 2**30 if device.type == "cuda" else float("nan")
    return out, statistics.median(times), mem


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (bytes read + written)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() / (start.elapsed_time(end) / 1e3)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def logprob_mismatch(ours, engine, prompts, P, N, dtype, device, sampling):
    """The sampler's log-probs against a teacher-forced forward of the same sequences."""
    b = len(prompts)
    tokens, logprobs = engine.generate(prompts, N, seed=4, return_logprobs=True, **sampling)
    ids = torch.tensor([p + t for p, t in zip(prompts, tokens)], device=device)  # (b, P + N)
    targets = torch.full_like(ids, -100)
    targets[:, P - 1 : -1] = ids[:, P:]
    teacher = ours(ids, targets=targets, logprobs=True)[:, P - 1 : -1]  # (b, N)
    diff = torch.tensor(logprobs, device=device) - teacher
    print(f"\n# sampler vs teacher-forced log-probs, batch {b} x {N} tokens, {str(dtype).removeprefix('torch.')}: "
          f"mean |diff| {diff.abs().mean():.2e}, max |diff| {diff.abs().max():.2e}, mean diff {diff.mean():+.2e} "
          f"(mean log-prob {teacher.mean():.2f})", flush=True)


def attention_backends(cfg, L, batches, bandwidth):
    """One layer's decode attention over a static cache with columns written up to the middle of a call:
    through each SDPA backend with a mask over the whole cache (eager), written out, and FlexAttention's
    decoding kernel over the written blocks as the engine runs it (the block mask built on the device
    inside the compiled function, captured in a CUDA graph), with its default kernel options and others."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from model.masks import decode_block_mask

    K, G, D = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    written = 3 * L // 4  # columns written at the middle of a call (prompt 128 + 128 of 256 new)
    for b in batches:
        q = torch.randn(b, K, G, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, K, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        bias = torch.zeros(b, 1, 1, L, device="cuda", dtype=torch.bfloat16)
        bias[:, :, :, written:] = float("-inf")

        def written_out():
            scores = (q @ k.transpose(-1, -2)).float() / D**0.5 + bias  # (b, K, G, L)
            return scores.softmax(-1).to(v.dtype) @ v

        pad_len, pos = torch.zeros(b, dtype=torch.long, device="cuda"), torch.tensor([written - 1], device="cuda")
        q_heads = q.reshape(b, K * G, 1, D)  # (b, H, T=1, D)
        variants = {"written out": written_out}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def fn(backend=backend):
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            variants[name] = fn
        for options in ({}, {"SPLIT_KV": 2}, {"SPLIT_KV": 4}, {"SPLIT_KV": 8}, {"BLOCK_N": 128},
                        {"SPLIT_KV": 4, "BLOCK_N": 128}, {"num_warps": 2}, {"num_stages": 1}):
            def flex_step(q_heads, k, v, pad_len, pos, options=options):
                return flex_attention(q_heads, k, v, block_mask=decode_block_mask(pad_len, pos, L), enable_gqa=True,
                                      kernel_options=options or None)
            compiled = torch.compile(flex_step, dynamic=False)
            name = "flex " + (",".join(f"{k}={v}" for k, v in options.items()) or "default")
            try:
                # One code object compiled per option and batch: more versions than dynamo's default 8.
                with torch._dynamo.config.patch(recompile_limit=64):
                    for _ in range(2):
                        compiled(q_heads, k, v, pad_len, pos)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(10):
                        compiled(q_heads, k, v, pad_len, pos)
                variants[name] = lambda graph=graph: graph.replay()
            except Exception as e:
                print(f"#   {name}: {type(e).__name__}: {str(e)[:120]}")
        times = {}
        for name, fn in variants.items():
            per_call = 10 if name.startswith("flex") else 1  # a replay runs 10 captured calls
            try:
                fn()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times[name] = start.elapsed_time(end) / 20 / per_call * 1e3
            except Exception as e:
                times[name] = float("nan")
                print(f"#   {name}: {type(e).__name__}: {str(e)[:120]}")
        kv_bytes = 2 * b * K * written * D * k.element_size()
        print(f"# decode attention, one layer, batch {b}, {written} of {L} columns written ({kv_bytes / 2**20:.0f} MiB "
              f"of K/V, {kv_bytes / bandwidth * 1e6:.1f} us at the copy bandwidth), us: " +
              ", ".join(f"{n} {t:.1f}" for n, t in times.items()), flush=True)


def decode_step_profile(ours, engine, b, P, N, weight_bytes, bandwidth, with_eager=True):
    """One decode step: eager, compiled, compiled + CUDA graph; then where the compiled step's time goes."""
    key = (b, (1.0, None, None, 0))
    eager = RolloutEngine(ours, b, P, N, compile=False, cuda_graphs=False)
    eager._allocate()
    eager.net = engine.net  # the same snapshot: only the way the step runs differs

    def at_mid_call(n):
        """Steps that write the columns around the middle of a call's decode (attention reads the blocks
        written so far, so steps from column 0 would read less than a call's average step)."""
        column = P - 1 + max(0, (N - n) // 2)
        for e in (engine, eager):
            e._pos.fill_(column), e._step.zero_()

    def per_step(fn, n):
        at_mid_call(n)
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    steps = {"eager": per_step(lambda: eager._run_step(b, key[1]), 20)} if with_eager else {}
    steps |= {"compiled": per_step(lambda: engine._run_step(b, key[1]), 50),
              "compiled + CUDA graph": per_step(lambda: engine._graphs[key].replay(), 100)}
    print(f"\n# one decode step at batch {b} (ms; bound {weight_bytes / bandwidth * 1e3:.2f} ms): " +
          ", ".join(f"{k} {v:.3f} ({b / v * 1e3:,.0f} tok/s)" for k, v in steps.items()))
    attention_backends(ours.config, engine.max_len, [b, 4 * b], bandwidth)
    at_mid_call(10)
    from torch.profiler import ProfilerActivity, profile

    sys.stdout.flush()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine._run_step(b, key[1])
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"# kernels of 10 compiled steps, by time (total {total / 10 / 1e3:.3f} ms a step):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:18]:
        print(f"#   {e.self_device_time_total / total:6.1%} {e.count // 10:4d}/step  {e.key[:90]}")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--batches", default="8,64,256")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--hf_static", default="64", help="batch sizes for transformers' static cache (each compiles)")
    p.add_argument("--lora", action="store_true", help="also time ours with unmerged LoRA r=16 at the middle batch")
    p.add_argument("--deadline_s", type=float, default=1e9, help="skip the remaining slow rows after this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", type=int, default=0,
                   help="only profile one decode step at this batch size (section 4), then stop")
    p.add_argument("--step_compile_mode", default=None,
                   help="torch.compile mode for the decode step (e.g. max-autotune-no-cudagraphs: tunes the matmuls)")
    p.add_argument("--decode_split_kv", type=int, default=None,
                   help="RolloutEngine's decode_split_kv for our rows (default: the engine's rule; 0: the kernel's)")
    args = p.parse_args()
    import transformers

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    hf_static = [int(b) for b in args.hf_static.split(",") if b]
    N, P = args.new_tokens, args.prompt_len
    cfg = ModelConfig.preset(args.preset)
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(cfg, dtype))
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: on the CPU it takes minutes for 1B parameters
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype).eval()
    ours = GPT(cfg).to(device=device, dtype=dtype)
    ours.load_state_dict({hf_to_native_key(k, cfg.model_type): v for k, v in hf.state_dict().items()
                          if hf_to_native_key(k, cfg.model_type) in ours.state_dict()})
    ours.reset_rope()
    ours.eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in ours.parameters())
    bandwidth = copy_bandwidth(device)
    free(device)

    def allocated():
        return torch.cuda.memory_allocated() if device.type == "cuda" else 0
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (max(batches), P), generator=gen).tolist()

    def bound(b):  # tokens/s if a step only read the weights, at the measured bandwidth
        return b * bandwidth / weight_bytes

    print(f"# {args.preset} ({weight_bytes / 1e9:.2f} GB of {str(dtype).removeprefix('torch.')} weights), "
          f"prompts of {P} tokens, {N} new tokens sampled at temperature 1.0, no stop token; "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'implementation':34s} {'batch':>5s} {'new tok/s':>10s} {'seconds':>8s} {'peak GiB':>9s} {'of bound':>9s}")

    def row(name, b, tokens, seconds, mem):
        rate = tokens / seconds
        print(f"{name:34s} {b:5d} {rate:10,.0f} {seconds:8.2f} {mem:9.1f} {rate / bound(b):9.0%}", flush=True)

    engines, sampling = {}, dict(temperature=1.0)

    def engine_for(b, **options):
        engine = RolloutEngine(ours, b, P, N, **{"decode_split_kv": args.decode_split_kv, **options})
        if args.step_compile_mode and engine.compile:
            engine._step_fn = torch.compile(engine._step_fn._torchdynamo_orig_callable, fullgraph=True,
                                            dynamic=False if engine.flex_decode else None, mode=args.step_compile_mode)
        return engine

    if args.profile:
        with torch.inference_mode():
            b = args.profile
            engine = engine_for(b, buckets=[b])  # one graph to compile and capture
            t0 = time.perf_counter()
            engine.generate(prompts[:b], 8, seed=0, **sampling)
            print(f"# warm-up (compile + capture of {len(engine._graphs)} graphs): {time.perf_counter() - t0:.1f}s")
            out, seconds, _ = timed(lambda: engine.generate(prompts[:b], N, seed=1, **sampling), device, 0, 0, 3)
            row("ours (static cache, graphs)", b, b * N, seconds, float("nan"))
            # What a call costs besides its decode steps: the prefill and the per-call work.
            _, fixed, _ = timed(lambda: engine.generate(prompts[:b], 1, seed=1, **sampling), device, 0, 0, 5)
            print(f"# a call for 1 new token (prefill of {b} x {P - 1} tokens, snapshot refresh, one step): "
                  f"{fixed * 1e3:.1f} ms")
            from model.generate import _refresh_snapshot
            from model.masks import causal_mask

            _, refresh, _ = timed(lambda: _refresh_snapshot(engine.net, engine.model), device, 0, 0, 5)
            ids = torch.tensor(prompts[:b], device=device)[:, :-1]
            mask = causal_mask(torch.ones_like(ids, dtype=torch.bool), P - 1)
            _, prefill, _ = timed(lambda: engine.net(ids, attn_mask=mask, cache=engine.cache.rows(0, b),
                                                     logits_to_keep=1), device, 0, 0, 5)
            print(f"#   of which the snapshot refresh {refresh * 1e3:.1f} ms, the prefill forward {prefill * 1e3:.1f} ms "
                  f"({2 * sum(t.numel() for t in engine.net.parameters()) * b * (P - 1) / prefill / 1e12:.0f} TFLOP/s)")
            if device.type == "cuda":
                decode_step_profile(ours, engine, b, P, N, weight_bytes, bandwidth, with_eager=False)
        return
    with torch.inference_mode():
        # ---- 1. ours at every batch size
        for b in batches:
            baseline = allocated()  # before the engine's static cache, state and graphs
            engine = engine_for(b)
            t0 = time.perf_counter()
            engines[b] = engine
            engine.generate(prompts[:b], 8, seed=0, **sampling)  # compiles once, captures this batch's buckets
            sync(device)
            warmup = time.perf_counter() - t0
            out, seconds, mem = timed(lambda: engine.generate(prompts[:b], N, seed=1, **sampling), device,
                                      baseline, weight_bytes, repeats=3)
            assert sum(map(len, out)) == b * N
            row("ours (static cache, graphs)", b, b * N, seconds, mem)
            print(f"#   warm-up (compile + capture of {len(engine._graphs)} graphs): {warmup:.1f}s", flush=True)
        # What FlexAttention's decode kernel, its cache split and the snapshot's fused layers gain: at the
        # middle batch, the split wherever the engine overrides the kernel's own rule.
        middle = batches[len(batches) // 2]
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        variants = [("ours, SDPA over the whole cache", dict(flex_decode=False), middle),
                    ("ours, no snapshot (unfused)", dict(snapshot=False), middle)]
        variants += [("ours, the decode kernel's own split", dict(decode_split_kv=0), b) for b in batches
                     if sm_count <= b * cfg.num_kv_heads < 4 * sm_count]  # where the engine overrides it
        for name, options, b in variants:
            if device.type != "cuda" or elapsed() > args.deadline_s:
                continue
            baseline = allocated()
            variant = engine_for(b, **options)
            variant.generate(prompts[:b], 8, seed=0, **sampling)
            out, seconds, mem = timed(lambda: variant.generate(prompts[:b], N, seed=1, **sampling), device,
                                      baseline, weight_bytes, repeats=3)
            row(name, b, b * N, seconds, mem)
            del variant

        # ---- 2. the GRPO length mix
        print(f"\n# GRPO length mix: completion lengths uniform in [32, {N}] (seeded per-row budgets), "
              f"temperature 1.0; tokens/s counts kept tokens")
        print(f"{'implementation':34s} {'batch':>5s} {'tokens/s':>10s} {'seconds':>8s} {'tokens':>8s}")
        for b in [b for b in batches if b >= 64] or batches[-1:]:
            budgets = torch.randint(min(32, N), N + 1, (b,), generator=torch.Generator().manual_seed(2)).tolist()
            for compact in (True, False):
                out, seconds, _ = timed(lambda: engines[b].generate(prompts[:b], budgets, seed=3, compact=compact,
                                                                    **sampling), device, 0, 0, repeats=3)
                assert [len(o) for o in out] == budgets
                name = "ours, compaction" if compact else "ours, no compaction"
                print(f"{name:34s} {b:5d} {sum(budgets) / seconds:10,.0f} {seconds:8.2f} {sum(budgets):8d}", flush=True)

        # ---- 3. sampler log-probs vs a teacher-forced forward (bf16 both)
        b = 64 if 64 in engines else batches[0]
        try:
            logprob_mismatch(ours, engines[b], prompts[:b], P, N, dtype, device, sampling)
            if device.type == "cuda":
                decode_step_profile(ours, engines[b], b, P, N, weight_bytes, bandwidth)
        except Exception as e:  # a failing section does not end the benchmark
            print(f"# failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
        free(device)
        # ---- 1b. transformers: static cache (compiled by transformers) first, it is the slow one to set up
        ids_mask = {}
        for b in batches:
            ids_mask[b] = (torch.tensor(prompts[:b], device=device), torch.ones(b, P, dtype=torch.long, device=device))
        hf.generation_config.update(do_sample=True, temperature=1.0, top_k=None, top_p=None, pad_token_id=0,
                                    eos_token_id=None)

        def run_hf(b, n, **kw):
            ids, mask = ids_mask[b]
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)

        for b in hf_static:
            if elapsed() > args.deadline_s:
                print(f"# skipped transformers static cache at batch {b}: past --deadline_s")
                continue
            try:
                baseline = allocated()  # before its static cache and graph pool, kept after warm-up
                t0 = time.perf_counter()
                for _ in range(2):  # compiles, then records its CUDA graphs
                    run_hf(b, N, cache_implementation="static")
                sync(device)
                warmup = time.perf_counter() - t0
                out, seconds, mem = timed(lambda: run_hf(b, N, cache_implementation="static"), device, baseline,
                                          weight_bytes)
                row("transformers, static cache compiled", b, b * N, seconds, mem)
                print(f"#   warm-up (2 calls, compile included): {warmup:.1f}s", flush=True)
            except Exception as e:  # a failing row does not end the table
                print(f"# transformers static cache at batch {b} failed: {type(e).__name__}: {str(e)[:300]}")
            free(device)
        for b in batches:
            run_hf(b, 8)
            baseline = allocated()
            out, seconds, mem = timed(lambda: run_hf(b, N), device, baseline, weight_bytes)
            assert out.shape == (b, P + N)
            row("transformers, default cache", b, b * N, seconds, mem)
            free(device)
        b = 64 if 64 in batches else batches[0]
        baseline = allocated()
        out, seconds, mem = timed(lambda: run_hf(b, N, do_sample=False), device, baseline, weight_bytes)
        row("transformers, default cache, greedy", b, b * N, seconds, mem)

        # ---- 1c. LoRA r=16: the snapshot (adapters merged into its bf16 copy, the default on CUDA)
        # against decoding with the adapters unmerged (snapshot=False: two small matmuls per layer more)
        if args.lora and elapsed() < args.deadline_s:
            from model.lora import apply_lora

            baseline = allocated()  # before the LoRA model (a copy of ours plus adapters): its own weights count
            lora = apply_lora(copy.deepcopy(ours), "all-linear", r=16, alpha=32)
            for name, options in (("ours + LoRA r=16, merged snapshot", {}),
                                  ("ours + LoRA r=16, unmerged", dict(snapshot=False))):
                engine = RolloutEngine(lora, b, P, N, **options)
                t0 = time.perf_counter()
                engine.generate(prompts[:b], 8, seed=0, **sampling)
                warmup = time.perf_counter() - t0
                out, seconds, mem = timed(lambda: engine.generate(prompts[:b], N, seed=1, **sampling), device,
                                          baseline, 0, repeats=3)
                row(name, b, b * N, seconds, mem)
                print(f"#   warm-up (compile + capture): {warmup:.1f}s")
                del engine
        elif args.lora:
            print("# skipped LoRA: past --deadline_s")
    print(f"# total {elapsed():.0f}s")


if __name__ == "__main__":
    main()
