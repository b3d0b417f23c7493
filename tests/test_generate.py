"""Generation vs transformers' generate (tiny random models and the trained stories260K), the
sampler's distribution, stop tokens, and the command line."""

import re
import subprocess
import sys

import pytest
import torch
import transformers

import model.generate as gen
from checkpoints.hf import load_hf
from model.generate import generate, sample_next
from model.masks import DECODE_BLOCK
from tests.conftest import ROOT, shared
from tests.hf_reference import make_hf_model

PAD = 0


@pytest.fixture(scope="module")
def stories():
    """(our model, transformers' model) on the real stories260K weights."""
    path = shared("stories260k/hf")
    return load_hf(path).eval(), transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _tiny(name, tmp_path):
    ref = make_hf_model(name)
    ref.save_pretrained(tmp_path)
    return load_hf(tmp_path).eval(), ref


def _random_prompts(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(ref, prompts, max_new_tokens, eos_token_id=None):
    """transformers' greedy generate on a left-padded batch built by hand (no tokenizer)."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ref.generation_config.eos_token_id = eos_token_id  # None: never stop early, every row gets all tokens
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=PAD)
    return out[:, P:].tolist()


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_greedy_batch_matches_transformers(name, use_cache, tmp_path):
    ours, ref = _tiny(name, tmp_path)
    prompts = _random_prompts(ref.config.vocab_size, [5, 11, 1, 8])  # different lengths: left padding
    expected = _hf_greedy(ref, prompts, 20)
    assert [len(e) for e in expected] == [20] * 4
    assert generate(ours, prompts, 20, pad_id=PAD, use_cache=use_cache) == expected


def test_stories260k_greedy_matches_transformers(stories):
    from model.tokenizer import Tokenizer

    ours, ref = stories
    tok = Tokenizer.from_dir(shared("stories260k/hf"))
    prompts = [[1], tok.encode("Tom had a red ball. He", add_special_tokens=True)]
    assert prompts[1][0] == 1  # the Llama post-processor added BOS
    expected = []
    for p in prompts:  # one at a time, so the reference involves no padding at all
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=100, do_sample=False, eos_token_id=1,
                               pad_token_id=PAD)
        expected.append(out[0, len(p):].tolist())
    got = generate(ours, prompts, 100, stop_ids=[1])  # the model ends a story with BOS (id 1)
    assert got == expected
    assert all(len(g) >= 50 for g in got)

    story = tok.decode(got[0])
    assert story.startswith("Once upon a time")
    words = story.split()
    assert all(w.strip(".,!?\"'").replace("'", "").isalpha() for w in words), story
    assert {"the", "was", "to", "a"} <= {w.strip(".,!?\"'").lower() for w in words}, story


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_consistent(stories):
    ours, _ = stories
    prompts = [[1], [1, 415, 263], [1, 9, 10, 11, 12]]
    kw = dict(max_new_tokens=24, temperature=1.0)
    a = generate(ours, prompts, seed=0, **kw)
    assert generate(ours, prompts, seed=0, **kw) == a
    assert generate(ours, prompts, generator=torch.Generator().manual_seed(0), **kw) == a
    assert generate(ours, prompts, seed=1, **kw) != a
    # The cache changes nothing: the same draws from the same logits.
    assert generate(ours, prompts, seed=0, use_cache=False, **kw) == a

    greedy = generate(ours, prompts, 24)
    assert generate(ours, prompts, 24, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(ours, prompts, 24, temperature=1.0, top_p=1e-6, seed=0) == greedy
    assert generate(ours, prompts, 24, temperature=2.0, seed=0) != greedy


def _sampled_frequencies(logits, n=20_000, seed=0, **kw):
    tokens = sample_next(logits.expand(n, -1), generator=torch.Generator().manual_seed(seed), **kw)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n


def _chi_square(freq, probs, n=20_000):
    keep = probs > 0
    return (n * (freq[keep] - probs[keep]) ** 2 / probs[keep]).sum().item()


def test_sample_next_matches_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    for temperature in (1.0, 0.5):
        probs = (logits[0].double() / temperature).softmax(-1)
        freq = _sampled_frequencies(logits, temperature=temperature)
        # 5 degrees of freedom: chi-square above 30 has probability below 1e-5.
        assert _chi_square(freq, probs) < 30, (temperature, freq, probs)


def test_sample_next_top_k_and_top_p_supports():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs = logits[0].double().softmax(-1)

    freq = _sampled_frequencies(logits, temperature=1.0, top_k=2)
    assert freq[2:].sum() == 0  # never outside the top 2
    top2 = torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(4, dtype=torch.double)])
    assert _chi_square(freq, top2) < 20

    # p = [0.561, 0.206, 0.125, 0.076, ...]: the first two hold 0.767 >= 0.75, the first alone 0.561.
    freq = _sampled_frequencies(logits, temperature=1.0, top_p=0.75)
    assert freq[2:].sum() == 0
    assert _chi_square(freq, top2) < 20
    freq = _sampled_frequencies(logits, temperature=1.0, top_p=0.85)  # now the third is needed
    assert freq[:3].min() > 0 and freq[3:].sum() == 0


def test_sample_next_draws_what_multinomial_draws():
    """sample_next avoids torch.multinomial's host sync but must make the same draws."""
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    ours = sample_next(logits, temperature=0.7, generator=torch.Generator().manual_seed(5))
    expected = torch.multinomial((logits / 0.7).softmax(-1), 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, expected[:, 0])


# ----------------------------------------------------------------------------- stop tokens


def test_stop_token_ends_its_row_only(tmp_path):
    ours, ref = _tiny("llama", tmp_path)
    prompts = _random_prompts(ref.config.vocab_size, [6, 3, 9], seed=1)
    free = generate(ours, prompts, 20)
    stop = free[0][0]  # row 0's first greedy token: row 0 stops at once
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    assert expected[0] == [stop] and any(len(row) == 20 for row in expected)
    assert generate(ours, prompts, 20, stop_ids={stop}) == expected
    assert generate(ours, prompts, 20, stop_ids={stop}, use_cache=False) == expected
    # Same as transformers, whose batch also stops row by row (it pads finished rows).
    hf = _hf_greedy(ref, prompts, 20, eos_token_id=stop)
    assert [row[: len(e)] for row, e in zip(hf, expected)] == expected


def test_generation_ends_early_when_every_row_stopped(tmp_path):
    ours, ref = _tiny("qwen3", tmp_path)
    prompts = _random_prompts(ref.config.vocab_size, [4, 7])
    firsts = {row[0] for row in generate(ours, prompts, 1)}
    calls = []
    handle = ours.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(ours, prompts, 200, stop_ids=firsts)
    finally:
        handle.remove()
    assert all(len(row) == 1 and row[0] in firsts for row in out)
    assert len(calls) <= gen.CHECK_FINISHED_EVERY  # not 200 forwards


# ----------------------------------------------------------------------------- command line


def test_cli_generates_text():
    ckpt = shared("stories260k/hf")
    cmd = [sys.executable, "-m", "model.generate", "--checkpoint", str(ckpt), "--prompt", "Once upon a time",
           "--prompt", "Tom", "--max_new_tokens", "20"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first = result.stdout.split("-" * 40)[0].strip()
    assert first.startswith("Once upon a time") and len(re.findall(r"[A-Za-z]+", first)) > 8, result.stdout
    assert "tokens/s" in result.stderr


# ----------------------------------------------------------------------------- the rollout engine


def _engine(model, max_batch=8, max_prompt_len=12, max_new_tokens=24, **kw):
    # Small buckets, so tiny batches exercise bucketing and compaction; the CPU runs the step eager.
    return gen.RolloutEngine(model, max_batch, max_prompt_len, max_new_tokens, buckets=[1, 2, 4, 8], **kw)


def _sliding_window_model():
    from model.config import ModelConfig
    from model.gpt import GPT

    model = GPT(ModelConfig.preset("tiny", sliding_window=4))
    model.init_weights(seed=3)
    return model.eval()


@pytest.mark.parametrize("name", ["llama", "qwen3", "sliding_window"])
def test_engine_greedy_equals_uncached(name, tmp_path):
    """The static cache (whole buffer + mask, device-side write column) and the decode step equal
    recomputing the whole sequence at every step."""
    model = _sliding_window_model() if name == "sliding_window" else _tiny(name, tmp_path)[0]
    prompts = _random_prompts(model.config.vocab_size, [5, 11, 1, 8, 3])
    expected = generate(model, prompts, 20, use_cache=False)
    engine = _engine(model)
    assert engine.generate(prompts, 20) == expected
    assert engine.generate(prompts, 20, compact=False) == expected


@pytest.mark.parametrize("name", ["llama", "qwen3", "sliding_window"])
def test_engine_flex_decode_equals_uncached(name, tmp_path):
    """FlexAttention's decode mask (only the cache blocks written so far, padding and the window
    masked inside them) gives what recomputing the whole sequence gives, across a block boundary
    (a cache of 192 columns, blocks of 128). On the CPU FlexAttention runs eager."""
    model = _sliding_window_model() if name == "sliding_window" else _tiny(name, tmp_path)[0]
    prompts = _random_prompts(model.config.vocab_size, [5, 11, 1, 8, 3], seed=2)
    expected = generate(model, prompts, 140, use_cache=False)
    engine = _engine(model, max_new_tokens=140, flex_decode=True)
    assert engine.max_len > DECODE_BLOCK
    assert engine.generate(prompts, 140) == expected


def test_engine_batched_equals_one_by_one_and_reuses_its_cache(stories):
    ours, _ = stories
    prompts = _random_prompts(512, [12, 1, 7, 3, 9, 2], seed=4)
    engine = _engine(ours, max_new_tokens=30)
    batched = engine.generate(prompts, 30)
    buffers = [t.data_ptr() for t in engine.cache.k + engine.cache.v]
    # One at a time (bucket 1), after a longer call left stale columns behind in the cache.
    assert [engine.generate([p], 30)[0] for p in prompts] == batched
    assert [t.data_ptr() for t in engine.cache.k + engine.cache.v] == buffers  # nothing allocated per call
    assert batched == generate(ours, prompts, 30)


def test_engine_compaction_equals_no_compaction(stories, monkeypatch):
    """Rows finish at different steps (a stop token and per-row budgets); moving the live rows
    into smaller buckets changes no row's tokens."""
    ours, _ = stories
    prompts = _random_prompts(512, [3, 9, 1, 6, 12, 4, 7, 2], seed=5)
    free = generate(ours, prompts, 24)
    stop = free[2][4]  # row 2 stops at its 5th token at the latest
    budgets = [24, 3, 24, 9, 20, 5, 2, 11]
    reference = generate(ours, prompts, 24, stop_ids={stop})
    expected = [row[:n] for row, n in zip(reference, budgets)]
    assert len(expected[2]) <= 5 and max(len(r) for r in expected) == 24

    engine = _engine(ours)
    sizes = []
    compact = engine._compact
    monkeypatch.setattr(engine, "_compact", lambda b, new_b: (sizes.append(new_b), compact(b, new_b)))
    assert engine.generate(prompts, budgets, stop_ids={stop}) == expected
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] <= 2, sizes  # it did compact
    sizes.clear()
    assert engine.generate(prompts, budgets, stop_ids={stop}, compact=False) == expected
    assert sizes == []


def _teacher_logprobs(model, prompt, new, temperature=1.0, top_k=None):
    """log p(new token) of each new token from one full forward over prompt + new, float64: the
    logits divided by the temperature, then restricted to the top k and renormalised."""
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : -1].double() / temperature  # (N, V) predicting new
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(new)[:, None])[:, 0]


def test_returned_logprobs_equal_teacher_forced_forward(stories):
    ours, _ = stories
    prompts = [[1], [1, 415, 263], [1, 9, 10, 11, 12]]
    engine = _engine(ours)
    for temperature, top_k in ((1.0, None), (0.7, None), (1.3, 5), (0.0, None)):
        for run in (engine.generate, lambda p, n, **kw: generate(ours, p, n, **kw)):
            tokens, logprobs = run(prompts, 20, temperature=temperature, top_k=top_k, seed=0, return_logprobs=True)
            for prompt, new, lp in zip(prompts, tokens, logprobs):
                assert len(lp) == len(new) == 20
                expected = _teacher_logprobs(ours, prompt, new, temperature or 1.0, top_k)
                torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), expected, rtol=0, atol=1e-4)
    # Without top-k / top-p they are what the training forward computes at the sampling temperature
    # (the fused head, as GRPO's old-policy log-probs).
    for temperature in (1.0, 0.7):
        tokens, logprobs = engine.generate(prompts, 20, temperature=temperature, seed=1, return_logprobs=True)
        for prompt, new, lp in zip(prompts, tokens, logprobs):
            ids = torch.tensor([prompt + new])
            targets = torch.full_like(ids, -100)
            targets[0, len(prompt) - 1 : -1] = torch.tensor(new)
            with torch.no_grad():
                teacher = ours(ids, targets=targets, logprobs=True, temperature=temperature)[0, len(prompt) - 1 : -1]
            torch.testing.assert_close(torch.tensor(lp), teacher, rtol=0, atol=1e-4)


def test_returned_entropies_are_those_of_the_distributions_sampled_from(stories):
    """Entropy of each step's distribution, from the engine and the simple path, against float64
    -sum p log p of a teacher-forced forward's logits at the temperature, restricted to the top k."""
    ours, _ = stories
    prompts = [[1], [1, 415, 263], [1, 9, 10, 11, 12]]
    engine = _engine(ours)
    for temperature, top_k in ((1.0, None), (0.7, None), (1.3, 5), (0.0, None)):
        for run in (engine.generate, lambda p, n, **kw: generate(ours, p, n, **kw)):
            tokens, logprobs, entropies = run(prompts, 20, temperature=temperature, top_k=top_k, seed=0,
                                              return_logprobs=True, return_entropies=True)
            assert run(prompts, 20, temperature=temperature, top_k=top_k, seed=0, return_entropies=True) == \
                (tokens, entropies)
            for prompt, new, ent in zip(prompts, tokens, entropies):
                with torch.no_grad():
                    logits = ours(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1].double() / (temperature or 1.0)
                if top_k is not None:
                    logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
                p = logits.softmax(-1)
                expected = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
                torch.testing.assert_close(torch.tensor(ent, dtype=torch.float64), expected, rtol=0, atol=1e-4)


def test_engine_sampling_is_reproducible(stories):
    ours, _ = stories
    prompts = [[1], [1, 415, 263], [1, 9, 10, 11, 12]]
    engine = _engine(ours)
    kw = dict(max_new_tokens=24, temperature=1.0, stop_ids={2})
    a = engine.generate(prompts, seed=0, **kw)
    assert engine.generate(prompts, seed=0, **kw) == a
    assert engine.generate(prompts, generator=torch.Generator().manual_seed(7), **kw) == \
        engine.generate(prompts, generator=torch.Generator().manual_seed(7), **kw)
    assert engine.generate(prompts, seed=1, **kw) != a
    assert engine.generate(prompts, 24, temperature=1.0, top_k=1, seed=0) == engine.generate(prompts, 24)


def test_engine_with_unmerged_lora_equals_merged_model(stories):
    import copy

    from model.lora import apply_lora, lora_modules, merge_lora

    ours, _ = stories
    lora = apply_lora(copy.deepcopy(ours), "all-linear", r=4, alpha=8)
    with torch.no_grad():  # B = 0 at init: give the adapters something to change
        for _, m in lora_modules(lora):
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(m.out_features))
    prompts = [[1], [1, 415, 263], [1, 9, 10, 11, 12]]
    got = _engine(lora).generate(prompts, 24)
    merged = merge_lora(copy.deepcopy(lora))
    assert got == generate(merged, prompts, 24)
    assert got != generate(ours, prompts, 24)  # the adapters did change the output


def _lora_with_adapters(ours):
    import copy

    from model.lora import apply_lora, lora_modules

    lora = apply_lora(copy.deepcopy(ours), "all-linear", r=4, alpha=8)
    with torch.no_grad():  # B = 0 at init: give the adapters something to change
        for _, m in lora_modules(lora):
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(m.out_features))
    return lora


def test_engine_snapshot_merges_adapters_and_follows_the_policy(stories):
    """The snapshot (a plain copy, adapters merged) decodes what the live LoRA model decodes, follows the
    adapters when they change between calls, and leaves them out while they are disabled."""
    from model.lora import disable_lora, lora_modules

    ours, _ = stories
    lora = _lora_with_adapters(ours)
    prompts = [[1], [1, 415, 263], [1, 9, 10, 11, 12]]
    snap, live = _engine(lora, snapshot=True), _engine(lora, snapshot=False)
    assert snap.net is not lora and live.net is lora
    got, got_lp = snap.generate(prompts, 24, return_logprobs=True)
    want, want_lp = live.generate(prompts, 24, return_logprobs=True)
    assert got == want
    for a, b in zip(got_lp, want_lp):  # merged in float32 vs the adapters' own matmuls: rounding only
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    with torch.no_grad():
        for _, m in lora_modules(lora):
            m.lora_B.mul_(-1)
    assert snap.generate(prompts, 24) == live.generate(prompts, 24) != got
    with disable_lora(lora):
        assert snap.generate(prompts, 24) == generate(ours, prompts, 24)


def test_fused_projections_compute_what_the_separate_layers_compute(tmp_path):
    """GPT.fuse_projections on a model with q/k/v biases (qwen2) and on llama: the same logits, and a
    fused LoRA snapshot decodes what the live model decodes."""
    import copy

    for name in ("qwen2", "llama"):
        ours, _ = _tiny(name, tmp_path / name)
        fused = copy.deepcopy(ours).fuse_projections()
        assert not hasattr(fused.layers[0].self_attn, "q_proj") and hasattr(fused.layers[0].mlp, "gate_up_proj")
        ids = torch.randint(0, ours.config.vocab_size, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(fused(ids), ours(ids), rtol=1e-5, atol=1e-5)
        lora = _lora_with_adapters(ours)
        prompts = [[1], [1, 5, 7], [3, 9, 10, 11, 12]]
        snap = _engine(lora, snapshot=True, fuse_projections=True)
        assert hasattr(snap.net.layers[0].self_attn, "qkv_proj")
        assert snap.generate(prompts, 16) == _engine(lora, snapshot=False).generate(prompts, 16)


def test_engine_snapshot_in_bf16_equals_the_float32_policy_under_autocast(stories):
    """With a compute dtype, the snapshot's pre-cast weights (and its own copy of the tied output
    projection) compute bit for bit what autocast computes over the float32 policy: same tokens, same
    log-probs."""
    ours, _ = stories
    prompts = [[1], [1, 415, 263], [1, 9, 10, 11, 12]]
    kw = dict(max_new_tokens=24, temperature=1.0, seed=3, return_logprobs=True)
    snap = _engine(ours, dtype=torch.bfloat16, snapshot=True)
    live = _engine(ours, dtype=torch.bfloat16, snapshot=False)
    got, want = snap.generate(prompts, **kw), live.generate(prompts, **kw)
    assert snap.cache.k[0].dtype == torch.bfloat16
    assert got == want
    assert got != _engine(ours).generate(prompts, **kw)  # bf16 is not float32: the check has teeth


def _fsdp_generate_worker(rank, world_size, port, path, out):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = load_hf(path).eval()
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        gathers = []
        try:  # count FSDP's all-gathers (one per sharded module when gathered once per call)
            import torch.distributed.fsdp._fully_shard._fsdp_param_group as group

            real = group.foreach_all_gather
            group.foreach_all_gather = lambda *a, **k: (gathers.append(1), real(*a, **k))[1]
        except (ImportError, AttributeError):
            gathers = None
        prompts = _random_prompts(512, [3, 7, 1], seed=10 + rank)  # each rank its own prompts
        engine = gen.RolloutEngine(model, 4, 8, 16)
        tokens = engine.generate(prompts, 16, stop_ids={2})
        snapshot_tokens = gen.RolloutEngine(model, 4, 8, 16, snapshot=True).generate(prompts, 16, stop_ids={2})
        torch.save({"prompts": prompts, "tokens": tokens, "snapshot_tokens": snapshot_tokens, "gathers": gathers,
                    "sharded": type(model.layers[0].mlp.up_proj.weight).__name__}, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/test_checkpoint_io.py: gloo teardown after FSDP2 aborts now and then


@pytest.mark.slow
def test_engine_under_fsdp2_gathers_once_and_matches_one_process(stories, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(shared("stories260k/hf"))
    mp.spawn(_fsdp_generate_worker, args=(2, port, path, str(tmp_path)), nprocs=2)
    ours, _ = stories
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["tokens"] == generate(ours, result["prompts"], 16, stop_ids={2})
        assert result["snapshot_tokens"] == result["tokens"]  # each parameter gathered into the snapshot
        assert result["sharded"] == "DTensor"  # resharded after the rollout
        if result["gathers"] is not None:
            assert len(result["gathers"]) == len(ours.layers) + 1  # each block and the root, once


@pytest.mark.parametrize("window", [None, 100])
def test_decode_block_mask_lists_exactly_the_columns_a_row_sees(window):
    """decode_block_mask's block lists against the rule written out: row b, writing column pos, sees
    pad_len[b] <= k <= pos (and pos - k < window). Partial blocks count the columns mask_mod allows,
    full blocks all of theirs; no block may be listed twice (the kernel would count it twice), and
    no block of padding alone is listed (it would be read for nothing)."""
    from model.masks import decode_block_mask

    L = 5 * DECODE_BLOCK
    pad_len = torch.tensor([0, 1, 127, 128, 129, 300, 383, 384])
    for pos in (383, 384, 450, 511, 512, 639):
        bm = decode_block_mask(pad_len, torch.tensor([pos]), L, window)
        for b, pad in enumerate(pad_len.tolist()):
            if pad > pos:  # never in the engine: a row's last prompt token is at a column >= pad_len
                continue
            partial = bm.kv_indices[b, 0, 0, : bm.kv_num_blocks[b, 0, 0]].tolist()
            full = [] if bm.full_kv_num_blocks is None else \
                bm.full_kv_indices[b, 0, 0, : bm.full_kv_num_blocks[b, 0, 0]].tolist()
            assert len(set(partial + full)) == len(partial) + len(full), (b, pos, partial, full)
            seen = {c for blk in full for c in range(blk * DECODE_BLOCK, (blk + 1) * DECODE_BLOCK)}
            seen |= {c for blk in partial for c in range(blk * DECODE_BLOCK, (blk + 1) * DECODE_BLOCK)
                     if bool(bm.mask_mod(torch.tensor(b), 0, 0, torch.tensor(c)))}
            expected = {c for c in range(L) if pad <= c <= pos and (window is None or pos - c < window)}
            assert seen == expected, (b, pos)
            assert all(blk >= pad // DECODE_BLOCK for blk in partial + full)


def test_argmax_rows_equals_argmax_with_ties_and_ragged_width():
    g = torch.Generator().manual_seed(3)
    for V in (50, 131, 1000):
        x = torch.randint(0, 6, (9, V), generator=g).float()  # many ties: the first index must win
        x[0] = float("-inf")
        x[0, V - 1] = 0.0  # the maximum in the padded last slice
        x[1, 2:] = float("-inf")
        assert torch.equal(gen.argmax_rows(x), x.argmax(dim=-1))
        assert torch.equal(gen.argmax_rows(x, parts=7), x.argmax(dim=-1))


def test_engine_prefills_a_repeated_prompt_once_and_every_copy_continues_it(stories, monkeypatch):
    """GRPO's rollouts: G copies of each prompt. The distinct prompts go through the prefill once and
    their cache rows are copied to every slot; greedy copies equal the simple path, and sampled copies
    differ from each other while their log-probs are a teacher-forced forward's."""
    ours, _ = stories
    p1, p2, p3 = _random_prompts(512, [9, 4, 12], seed=6)
    prompts = [p1, p1, p1, p2, p3, p3]  # 6 slots of bucket 8: two padding slots, no prefill for them
    engine = _engine(ours)
    engine.generate(_random_prompts(512, [12] * 8, seed=7), 24)  # stale cache rows everywhere
    expected = generate(ours, prompts, 20)
    prefilled = []
    net_forward = engine.net.forward

    def counting(ids, *args, **kw):
        if ids.shape[1] > 1:
            prefilled.append(ids.shape[0])
        return net_forward(ids, *args, **kw)

    monkeypatch.setattr(engine.net, "forward", counting)
    assert engine.generate(prompts, 20) == expected
    assert prefilled == [3]  # the prefill's rows: the three distinct prompts
    tokens, logprobs = engine.generate(prompts, 20, temperature=1.0, seed=3, return_logprobs=True)
    assert len({tuple(t) for t in tokens[:3]}) > 1
    for prompt, new, lp in zip(prompts, tokens, logprobs):
        ids = torch.tensor([prompt + new])
        targets = torch.full_like(ids, -100)
        targets[0, len(prompt) - 1 : -1] = torch.tensor(new)
        with torch.no_grad():
            teacher = ours(ids, targets=targets, logprobs=True)[0, len(prompt) - 1 : -1]
        torch.testing.assert_close(torch.tensor(lp), teacher, rtol=0, atol=1e-4)
