"""The memory planner (train/plan.py) against bytes measured on CPU.

Tiny networks run a real forward, backward and AdamW step on CPU in the recipes the loops use (float32;
bf16 autocast over float32 master weights; LoRA over a bf16 base under autocast; QLoRA; activation
checkpointing; compiled blocks), and the bytes they actually hold are measured, never computed by the
planner's own code:
- parameters, gradients, optimizer state: the unique storages (NF4's inner tensors) of
  model.parameters(), their .grad, and optimizer.state;
- saved activations: every tensor autograd saves (torch.autograd.graph.saved_tensors_hooks, unique
  storages, parameters excluded), split by where it was saved: inside the blocks (the activations, and
  the weight casts autocast saves), the embedding and final norm, and the output projection;
- the peak: the profiler's record of every allocation and free of torch's CPU allocator, with its
  running total (torch.cuda's allocator counters do not exist on CPU; tracemalloc does not see
  torch's allocations); what is alive at a given moment: a dispatch mode that adds each new
  storage's bytes when an op makes it and subtracts them when it is freed.
Each prediction must land within 10% of the measurement (most are exact, and tested tighter).
"""

from __future__ import annotations

import dataclasses
import glob
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.config import ModelConfig
from model.gpt import GPT, KVCache
from model.lora import LoRAConfig, apply_lora, freeze_base
from train import plan
from train.config import ParallelConfig
from train.dist import DistInfo
from train.parallel import parallelize

ROOT = Path(__file__).resolve().parents[1]

# head_dim 24 with 4 heads: no saved tensor's width equals another's by accident; B x T (3 x 40)
# equals no weight dimension, so token-shaped tensors tell themselves from weights.
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=24, max_seq_len=256, tie_embeddings=True)
TINY_QWEN3 = dataclasses.replace(TINY, model_type="qwen3", qk_norm=True, attention_bias=True, tie_embeddings=False)
B, T = 3, 40


# ---- measuring -------------------------------------------------------------------------------

def storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind a tensor; a wrapper subclass (NF4) by its parts, a sharded one (DTensor)
    by this rank's shard. A storage's Python object lives as long as the storage, so its id() names
    it; a data pointer would not (freed memory is reused)."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in storages(getattr(t, n))]
    return [t.untyped_storage()]


def unique_bytes(tensors) -> int:
    return sum(s.nbytes() for s in {id(s): s for t in tensors for s in storages(t)}.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create while active, alive now and at most: each new storage counts
    from its creation until Python frees it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not new memory.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if type(t) in (torch.Tensor, torch.nn.Parameter)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and type(t) is torch.Tensor:
                s = t.untyped_storage()
                key = id(s)
                if key in self.tracked or s.nbytes() == 0 or s.data_ptr() in inputs:
                    continue
                self.tracked.add(key)
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, key, s.nbytes())
        return out

    def _free(self, key, nbytes):
        self.tracked.discard(key)
        self.live -= nbytes


def build(r: plan.Recipe, compile_backend: str | None = None) -> GPT:
    """The network as the loops build it on one CPU process, in the recipe's form."""
    torch.manual_seed(0)
    model = GPT(r.model)
    model.init_weights()
    if r.lora is not None:
        apply_lora(model, r.lora.targets, r.lora.r, r.lora.alpha, r.lora.dropout)
        freeze_base(model, r.lora, torch.device("cpu"))
    parallel = ParallelConfig(activation_checkpointing=r.checkpointing, mlp_chunk_tokens=r.mlp_chunk_tokens,
                              checkpoint_dtype=r.checkpoint_dtype, offload_activations=r.offload)
    parallelize(model, parallel, DistInfo(0, 1, 0, torch.device("cpu")))
    if compile_backend:
        for block in model.layers:
            block.compile(backend=compile_backend)
    return model


def forward(model: GPT, r: plan.Recipe, ids: torch.Tensor):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.compute == "bf16"):
        out = model(ids, targets=ids, logprobs=r.head == "logprobs")
    return out if r.head == "loss" else (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def measure_saved(model: GPT, r: plan.Recipe) -> dict[str, int]:
    """Bytes autograd saves in one forward, by where: 'blocks' (token-shaped tensors saved inside the
    blocks, plus the embedding and final norm: the activations), 'weight copies' (weight-shaped
    tensors saved inside the blocks: autocast's casts), 'head' (saved by the output projection)."""
    params = {id(s) for p in model.parameters() for s in storages(p)}
    region = ["outside"]
    saved: dict[int, tuple[int, str, torch.UntypedStorage]] = {}  # the storage held: its id stays its own

    def pack(t):
        for s in storages(t):
            if id(s) not in params and id(s) not in saved:
                whole = t._base if t._base is not None else t  # a chunk of the MLP's input: a view of it all
                token_shaped = whole.dim() >= 1 and whole.shape[0] in (r.rows, r.rows * r.seq_len)
                where = region[0]
                if where == "blocks" and not token_shaped:
                    where = "weight copies"
                saved[id(s)] = (s.nbytes(), where, s)
        return t

    def enter(name):
        return lambda *_: region.__setitem__(0, name)

    hooks = [model.embed_tokens.register_forward_pre_hook(enter("blocks")),
             model.norm.register_forward_hook(enter("head"))]
    ids = torch.randint(0, r.model.vocab_size, (r.rows, r.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(model, r, ids)
    for h in hooks:
        h.remove()
    out = {"blocks": 0, "weight copies": 0, "head": 0, "outside": 0}
    for nbytes, where, _ in saved.values():
        out[where] += nbytes
    loss.backward()
    return out


def recipe(model=TINY, **kw) -> plan.Recipe:
    return plan.Recipe(**{"model": model, "rows": B, "seq_len": T, "device": "cpu", **kw})


def has_torchao() -> bool:
    try:
        from model.lora import torchao_nf4
        torchao_nf4()
        return True
    except ImportError:
        return False


LORA_BF16 = LoRAConfig(targets=["all-linear"], r=4, alpha=8, base_dtype="bfloat16")
RECIPES = {
    "full fp32": recipe(compute="fp32"),
    "full bf16 autocast": recipe(),
    "lora bf16 base": recipe(lora=LORA_BF16),
    "lora fp32": recipe(compute="fp32", lora=LoRAConfig(targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8)),
    "lora dropout": recipe(lora=dataclasses.replace(LORA_BF16, dropout=0.1)),
    "qwen3 bf16 autocast": recipe(model=TINY_QWEN3),
    "full fp32 logprobs": recipe(compute="fp32", head="logprobs"),
    "lora bf16 logprobs": recipe(lora=LORA_BF16, head="logprobs"),
}
if has_torchao():  # NF4 sizes: weights' numel must divide into blocks of 64 in groups of 8 here
    RECIPES["qlora"] = recipe(lora=LoRAConfig(targets=["all-linear"], r=4, alpha=8, quantize="nf4",
                                              nf4_scaler_block_size=8))


def within(predicted: int, measured: int, rel: float) -> bool:
    return abs(predicted - measured) <= rel * measured


# ---- parameters, gradients, optimizer state: exact ------------------------------------------------

@pytest.mark.parametrize("name", ["full fp32", "lora bf16 base", "qwen3 bf16 autocast"]
                         + (["qlora"] if "qlora" in RECIPES else []))
def test_parameters_gradients_optimizer_state_exact(name):
    r = RECIPES[name]
    model = build(r)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    forward(model, r, torch.randint(0, 512, (B, T))).backward()
    optimizer.step()
    table = plan.parameter_table(r)
    assert plan.parameter_bytes(r, table) == unique_bytes(model.parameters())
    assert plan.gradient_bytes(r, table) == unique_bytes(p.grad for p in model.parameters() if p.grad is not None)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert plan.optimizer_bytes(r, table) == unique_bytes(state)


# ---- what autograd saves: exact, eager and compiled ------------------------------------------------

@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_saved_activations_exact(name, checkpointing):
    r = dataclasses.replace(RECIPES[name], checkpointing=checkpointing)
    got = measure_saved(build(r), r)
    assert plan.activation_bytes(r) == got["blocks"] + got["outside"]
    assert plan.head_saved_bytes(r) == got["head"]
    # Autocast's weight casts: the saved ones, plus the casts of trainable weights (adapters) that
    # autocast caches though nothing saves them (the first block's q/k/v lora_A, whose input has
    # no gradient; every one under checkpointing): test_forward_end_live_bytes counts those.
    predicted = plan.weight_copy_bytes(r, plan.parameter_table(r))
    assert got["weight copies"] <= predicted
    if not checkpointing:
        assert within(predicted, got["weight copies"], 0.10)


@pytest.mark.parametrize("name", ["full bf16 autocast", "lora bf16 base", "qwen3 bf16 autocast", "lora fp32"]
                         + (["qlora"] if "qlora" in RECIPES else []))
def test_saved_activations_compiled_blocks_exact(name):
    """Compiled blocks save what AOTAutograd's min-cut partitioner keeps: the aot_eager_decomp_partition
    backend partitions as inductor does, without generating kernels (seconds on CPU)."""
    r = dataclasses.replace(RECIPES[name], compile=True)
    torch._dynamo.reset()
    try:
        got = measure_saved(build(r, compile_backend="aot_eager_decomp_partition"), r)
    finally:
        torch._dynamo.reset()
    table = plan.parameter_table(r)
    assert plan.activation_bytes(r) == got["blocks"] + got["outside"]
    assert plan.head_saved_bytes(r) == got["head"]
    predicted = plan.weight_copy_bytes(r, table)
    assert got["weight copies"] <= predicted and within(predicted, got["weight copies"], 0.10)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("name", ["full fp32", "full bf16 autocast", "lora bf16 base"])
def test_forward_end_live_bytes(name, checkpointing):
    """Everything the forward leaves alive (inside autocast, before its cache of weight casts is
    dropped): activations, weight casts, the head's saved tensors."""
    assert_forward_end_live_bytes(dataclasses.replace(RECIPES[name], checkpointing=checkpointing))


def assert_forward_end_live_bytes(r: plan.Recipe) -> None:
    """What the forward leaves alive, measured, against the plan's activations, weight casts and head's
    saved tensors, within 1%."""
    model = build(r)
    ids = torch.randint(0, 512, (B, T))
    mode = LiveBytes()
    with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.compute == "bf16"):
        out = model(ids, targets=ids)
        live = mode.live
    del out
    plan_ = plan.memory_plan(r)
    predicted = plan_.components["activations"] + plan_.components["weight copies"] + plan_.components["head saved"]
    assert within(predicted, live, 0.01), (predicted, live)


# ---- the peak of a whole step: within 10% ------------------------------------------------------------

def allocated_peak(fn) -> int:
    """Peak bytes allocated by CPU tensors while fn runs, beyond what existed before: the profiler
    records every allocation and free of torch's CPU allocator with its running total (what
    torch.cuda.max_memory_allocated is on a GPU), the temporaries inside ops included. Without that
    profiler API (an older torch), the LiveBytes dispatch mode, which sees only op outputs."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        stack, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.typed[0] == _EventType.Allocation:
                peak = max(peak, event.typed[1].total_allocated)
        return peak
    except (ImportError, AttributeError):
        mode = LiveBytes()
        with mode:
            fn()
        return mode.peak


def measure_step_peak(r: plan.Recipe) -> int:
    """Peak bytes allocated during one training step (forward; DPO's reference pass; backward; AdamW
    step), after a first step has made the optimizer state: what the plan predicts beyond the
    parameters, the AdamW state and a reference copy, which exist before."""
    from model.lora import disable_lora

    model = build(r)
    reference = None
    if r.reference == "copy":  # train/dpo.py: the network as built before any freezing, without checkpointing
        reference = build(dataclasses.replace(r, lora=None, checkpointing=False)).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, r.model.vocab_size, (r.rows, r.seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.compute == "bf16"):
            out = model(ids, targets=ids, logprobs=r.head == "logprobs")
        if r.head == "logprobs":
            weights = torch.linspace(-1, 1, out.numel()).view_as(out)
            if r.reference in ("copy", "adapters_off"):
                net = reference or model
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.compute == "bf16"), \
                        disable_lora(net):
                    weights = weights + net(ids, targets=ids, logprobs=True)
            out = (out * weights).sum()
        out.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return allocated_peak(step)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_step_peak_within_10_percent(name, checkpointing):
    # 4 x 128 tokens: activations outweigh the tiny weights, as in real runs.
    r = dataclasses.replace(RECIPES[name], rows=4, seq_len=128, checkpointing=checkpointing)
    measured = measure_step_peak(r)
    p = plan.memory_plan(r)
    predicted = p.peak - p.components["parameters"] - p.components["optimizer"]
    assert within(predicted, measured, 0.10), (predicted, measured, p.peak_phase)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("name, reference", [("full bf16 autocast", "copy"), ("full fp32", "copy"),
                                             ("lora bf16 base", "adapters_off")])
def test_dpo_step_peak_with_a_reference_within_10_percent(name, reference, checkpointing):
    """DPO's step: the policy's log-probs, then the reference's (a float32 copy, or the adapters off)
    while the policy's activations are alive, then backward."""
    r = dataclasses.replace(RECIPES[name], rows=4, seq_len=128, head="logprobs", reference=reference,
                            checkpointing=checkpointing)
    measured = measure_step_peak(r)
    p = plan.memory_plan(r)
    predicted = p.peak - p.components["parameters"] - p.components["optimizer"] - p.components["reference"]
    assert within(predicted, measured, 0.10), (predicted, measured, p.peak_phase)


@pytest.mark.parametrize("name", ["full fp32", "full bf16 autocast", "lora bf16 base", "full fp32 logprobs",
                                  "lora bf16 logprobs"])
def test_step_peak_with_many_loss_chunks(name, monkeypatch):
    """The output projection in chunks of 100 of the 512 tokens (a real vocabulary's chunk is 2**28 //
    vocab tokens): the previous chunk's logits and gradient overlap the next one's."""
    import algos.logprobs

    monkeypatch.setattr(algos.logprobs, "_default_chunk", lambda vocab_size: 100)
    r = dataclasses.replace(RECIPES[name], rows=4, seq_len=128, chunk_tokens=100)
    measured = measure_step_peak(r)
    p = plan.memory_plan(r)
    assert within(p.peak - p.components["parameters"] - p.components["optimizer"], measured, 0.02)


# ---- the long-context options of train/parallel.py ----------------------------------------------------
# The MLP in chunks of 16 of the 120 tokens (the last chunk short); block inputs kept in bf16. Offloading has
# no CPU measurement (host and device memory are one there): its test checks the plan's bookkeeping.

CHUNKED = ["full fp32", "full bf16 autocast", "lora bf16 base", "lora fp32", "qwen3 bf16 autocast"]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("name", CHUNKED)
def test_saved_activations_with_mlp_chunks_exact(name, checkpointing):
    r = dataclasses.replace(RECIPES[name], checkpointing=checkpointing, mlp_chunk_tokens=16)
    got = measure_saved(build(r), r)
    assert plan.activation_bytes(r) == got["blocks"] + got["outside"]
    assert plan.head_saved_bytes(r) == got["head"]
    # The MLP's weight casts are only cached by autocast now (its chunks save nothing outside themselves).
    assert got["weight copies"] <= plan.weight_copy_bytes(r, plan.parameter_table(r))


@pytest.mark.parametrize("name", ["full bf16 autocast", "lora fp32"])  # (qlora too: 4 s more)
def test_saved_activations_compiled_blocks_with_mlp_chunks_exact(name):
    r = dataclasses.replace(RECIPES[name], compile=True, mlp_chunk_tokens=16)
    torch._dynamo.reset()
    try:
        got = measure_saved(build(r, compile_backend="aot_eager_decomp_partition"), r)
    finally:
        torch._dynamo.reset()
    assert plan.activation_bytes(r) == got["blocks"] + got["outside"]
    assert plan.head_saved_bytes(r) == got["head"]


LONG_OPTIONS = {"chunks": dict(mlp_chunk_tokens=16),
                "bf16 checkpoints": dict(checkpointing=True, checkpoint_dtype="bf16"),
                "both": dict(checkpointing=True, checkpoint_dtype="bf16", mlp_chunk_tokens=16)}


@pytest.mark.parametrize("options", list(LONG_OPTIONS))
@pytest.mark.parametrize("name", ["full bf16 autocast", "lora bf16 base"])
def test_forward_end_live_bytes_with_long_context_options(name, options):
    """bf16 checkpoints: the hooks' bf16 copies are alive, the float32 block outputs they copy are not."""
    assert_forward_end_live_bytes(dataclasses.replace(RECIPES[name], **LONG_OPTIONS[options]))


@pytest.mark.parametrize("options", list(LONG_OPTIONS))
@pytest.mark.parametrize("name", ["full bf16 autocast", "lora bf16 base", "full fp32"])
def test_step_peak_with_long_context_options_within_10_percent(name, options):
    # 1 x 512 tokens in chunks of 64: the MLP's (tokens x intermediate) tensors would dominate a block.
    r = dataclasses.replace(RECIPES[name], rows=1, seq_len=512, **LONG_OPTIONS[options])
    r = dataclasses.replace(r, mlp_chunk_tokens=64 if r.mlp_chunk_tokens else 0)
    measured = measure_step_peak(r)
    p = plan.memory_plan(r)
    predicted = p.peak - p.components["parameters"] - p.components["optimizer"]
    assert within(predicted, measured, 0.10), (predicted, measured, p.peak_phase)


def test_offload_moves_the_forwards_saved_tensors_to_host_memory():
    """llama-3.2-1b at 524,288 tokens, checkpointed and compiled: the block inputs, the final norm's and the output
    head's saved tensors leave the GPU (the shared RoPE tables stay); backward brings one block's back at a time."""
    r = plan.Recipe(model=ModelConfig.preset("llama-3.2-1b"), rows=1, seq_len=2**19, checkpointing=True, compile=True,
                    mlp_chunk_tokens=2**14)
    kept, offloaded = plan.memory_plan(r), plan.memory_plan(dataclasses.replace(r, offload=True))
    rope = r.tokens * 2 * 64 * 4  # cos and sin, (T, head_dim) float32
    moved = kept.components["activations"] + kept.components["head saved"] - rope
    assert offloaded.components["offloaded"] == moved
    assert offloaded.components["activations"] == rope and offloaded.components["head saved"] == 0
    assert offloaded.peak < kept.peak - 0.9 * moved + kept.components["head chunk"]
    assert all("offloaded" not in phase for phase in offloaded.phases.values())


# ---- FSDP2 on two CPU ranks: each rank's shards and activations, exact -------------------------------

def fsdp_worker(out_path: str) -> None:
    """Run by test_fsdp_two_ranks under torchrun: FSDP2 with the bf16 policy, as on GPUs."""
    import json

    from train.dist import setup_distributed, teardown_distributed

    dist = setup_distributed("cpu")
    r = dataclasses.replace(recipe(), shard=dist.world_size)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(r.model)
    parallelize(model, ParallelConfig(mixed_precision="bf16"), dist)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    saved = measure_saved(model, r)  # runs backward too
    optimizer.step()
    local = [p.to_local() for p in model.parameters()]
    grads = [p.grad.to_local() for p in model.parameters()]
    state = [t.to_local() if hasattr(t, "to_local") else t for s in optimizer.state.values() for t in s.values()]
    measured = {"parameters": unique_bytes(local), "gradients": unique_bytes(grads),
                "optimizer": unique_bytes(state), "activations": saved["blocks"] + saved["outside"],
                "head": saved["head"]}
    if dist.rank == 0:
        Path(out_path).write_text(json.dumps(measured))
    teardown_distributed()


def test_fsdp_two_ranks(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "measured.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(port), __file__, "fsdp_worker", str(out)], cwd=ROOT, check=True, timeout=300)
    measured = json.loads(out.read_text())
    r = dataclasses.replace(recipe(), shard=2)
    table = plan.parameter_table(r)
    assert measured["parameters"] == plan.parameter_bytes(r, table)
    assert measured["gradients"] == plan.gradient_bytes(r, table)
    assert measured["optimizer"] == plan.optimizer_bytes(r, table)
    assert measured["activations"] == plan.activation_bytes(r)
    assert measured["head"] == plan.head_saved_bytes(r)


# ---- the rest of the model -------------------------------------------------------------------------

def test_kv_cache_bytes_match_the_cache_model_gpt_allocates():
    cache = KVCache(TINY_QWEN3, batch_size=5, max_len=77, dtype=torch.bfloat16)
    measured = unique_bytes(cache.k + cache.v)
    cfg = TINY_QWEN3
    assert plan.kv_cache_bytes(5, 77, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 2) == measured


@pytest.mark.parametrize("cfg", [TINY, TINY_QWEN3], ids=["tied", "qwen3-untied-bias-qknorm"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-bf16-base"])
def test_rollout_snapshot_bytes_match_the_snapshot_the_engine_builds(cfg, lora):
    """GRPO's engine on one GPU decodes from a snapshot of the policy (float32 master weights under bf16
    autocast, or a bf16 LoRA base): the bytes of the network it builds (here on the CPU, as on CUDA)."""
    from model.generate import RolloutEngine

    model = GPT(cfg)
    model.init_weights(seed=0)
    lora_cfg = None
    if lora:
        lora_cfg = LoRAConfig(base_dtype="bfloat16")
        apply_lora(model, "all-linear", r=4, alpha=8)
        freeze_base(model, lora_cfg, torch.device("cpu"))
    engine = RolloutEngine(model, 4, 8, 8, dtype=torch.bfloat16, snapshot=True, fuse_projections=True)
    measured = unique_bytes(engine.net.parameters())
    r = plan.Recipe(model=cfg, rows=4, seq_len=16, lora=lora_cfg, device="cuda", kv_cache=(4, 16))
    assert plan.rollout_snapshot_bytes(r) == measured
    assert plan.rollout_snapshot_bytes(dataclasses.replace(r, shard=2)) == 0  # FSDP2 gathers per rollout instead


def test_largest_micro_batch_is_the_boundary():
    r = plan.Recipe(model=ModelConfig.preset("llama-3.2-1b"), rows=1, seq_len=2048, compile=True)
    capacity = 40 * 2**30
    best = plan.largest_micro_batch(lambda m: dataclasses.replace(r, rows=m), capacity)
    assert best > 0
    assert plan.memory_plan(dataclasses.replace(r, rows=best)).peak <= capacity
    assert plan.memory_plan(dataclasses.replace(r, rows=best + 1)).peak > capacity


def test_step_time_against_the_formula_written_out():
    """FSDP2 over 64 GPUs (8 nodes) and HSDP 8 x 8 for Llama-3.1-8B, one micro-batch of 2 x 2048
    tokens, against the ring-collective arithmetic written out here in float64."""
    cfg = ModelConfig.preset("llama-3.1-8b")
    cl = plan.Cluster()
    r = plan.Recipe(model=cfg, rows=2, seq_len=2048, shard=64)
    n = cfg.num_params()
    flops = (6 * (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size)
             + 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 2048) * 4096
    compute = flops / (989e12 * 0.40)
    units = cfg.num_layers + 1

    def ring(nbytes, ranks, bw, hop):
        return nbytes * (ranks - 1) / ranks / bw + units * (ranks - 1) * hop

    fsdp = ring(2 * 2 * n, 64, 45e9, 6e-6) + ring(4 * n, 64, 45e9, 6e-6)
    optimizer = 28 * n / 64 / 3350e9
    got = plan.step_time(r, world=64, replicate=1, micro_batches=1, cluster=cl)
    assert got["step_s"] == pytest.approx(max(compute, fsdp) + optimizer, rel=1e-9)
    hsdp = ring(2 * 2 * n, 8, 360e9, 2e-6) + ring(4 * n, 8, 360e9, 2e-6) + 2 * ring(4 * n / 8, 8, 45e9, 6e-6)
    got = plan.step_time(dataclasses.replace(r, shard=8), world=64, replicate=8, micro_batches=3, cluster=cl)
    assert got["step_s"] == pytest.approx(3 * max(compute, hsdp) + 28 * n / 8 / 3350e9, rel=1e-9)


# ---- the command line on every shipped config ------------------------------------------------------

@pytest.mark.parametrize("config", sorted(glob.glob(str(ROOT / "configs" / "*" / "*.yaml"))),
                         ids=lambda p: str(Path(p).relative_to(ROOT / "configs")))
def test_cli_prints_the_plan_for_every_shipped_config(config, capsys, monkeypatch):
    """Offline, a Hub model falls back to the preset its name starts with; a model out of reach (an
    earlier stage's output, or a Hub model with no such preset) is an error of one line saying how to
    plan with a preset, and the plan with one prints."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    args = ["--config", str(Path(config).relative_to(ROOT)), "--world_size", "1"]
    try:
        plan.main(args)
    except SystemExit as e:
        assert "--model.preset" in str(e.code), e.code
        plan.main(args + ["--model.checkpoint", "null", "--model.preset", "tiny"])
    out = capsys.readouterr().out
    for line in ("parameters", "activations saved by the forward", "output projection + loss: one chunk", "peak",
                 "largest micro-batch"):
        assert line in out, out


def test_cli_step_time_table(capsys):
    plan.main(["--config", str(ROOT / "configs/pretrain/llama-3.2-1b.yaml"), "--model.preset", "llama-3.1-8b",
               "--world_size", "8", "64", "--micro_batch", "2"])
    out = capsys.readouterr().out
    assert "FSDP2 over 8 GPUs" in out and "HSDP 8x8" in out and "FSDP 64" in out and "a prediction" in out


if __name__ == "__main__":  # the FSDP worker, under torchrun
    import sys

    if sys.argv[1] == "fsdp_worker":
        fsdp_worker(sys.argv[2])
