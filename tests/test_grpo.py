"""The GRPO loop (train/grpo.py) through main(cfg) on the tiny config: it runs and exports, its
sampler log-probs are the trainer's, and accumulation and resume do not change what it computes."""

import json
import math
from pathlib import Path

import pytest
import torch

from algos.logprobs import IGNORE_INDEX
from tests.conftest import ROOT
from train import grpo
from train.config import parse_config
from train.prompt_data import completion_batch

TINY = str(ROOT / "configs" / "grpo" / "tiny.yaml")


def says_the(prompts, completions, **kw):
    """A reward that varies between samples of the untrained tiny model: 1 when "the" appears."""
    return [1.0 if " the " in f" {c} " else 0.0 for c in completions]


def run(out_dir, *args, reward_funcs=None):
    cfg = parse_config(grpo.GRPOConfig, ["--config", TINY, "--out_dir", str(out_dir), "--sample_tokens", "0", *args])
    return grpo.main(cfg, reward_funcs=reward_funcs)


def metrics(out_dir, split="train"):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def test_tiny_config_runs_logs_and_exports(tmp_path):
    result = run(tmp_path)
    m = metrics(tmp_path)
    assert sorted(m) == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/boxed_math", "accuracy", "completion_len", "truncated", "kl",
                "entropy", "clip/low", "clip/high", "logprob_mismatch", "time/generate", "time/score", "time/train"):
        assert key in m[1], key
    assert 0 < m[1]["entropy"] < math.log(512)  # sampled at temperature 1 from a 512-token vocabulary
    assert m[1]["reward"] == -1.0  # stories260K cannot add: every completion is wrong
    assert "accuracy" in metrics(tmp_path, "val")[4]
    final = Path(result["final_dir"])
    assert json.loads((final / "export_check.json").read_text())["ok"]
    lines = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 4 * 4 and {"prompt", "completion", "reward", "advantage"} <= set(json.loads(lines[0]))


def test_sampler_logprobs_are_the_trainers_at_the_sampling_temperature(tmp_path):
    """mu = 2 makes the sampler's log-probs the old policy's; on the first pass over a rollout the
    trainer's teacher-forced log-probs (at the same temperature) must equal them."""
    run(tmp_path, "--grpo.mu", "2", "--grpo.temperature", "0.7", "--steps", "2", reward_funcs=[says_the])
    m = metrics(tmp_path)
    assert m[1]["logprob_mismatch"] < 1e-4  # float32, the same network: only summation order differs
    assert m[2]["logprob_mismatch"] > m[1]["logprob_mismatch"]  # one update later the policy moved


def test_completion_batch_aligns_targets_and_sampler_logprobs():
    batch = completion_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], [[-0.1, -0.2], [-0.3, -0.4, -0.5]],
                                  pad_id=0, device="cpu", share_prompt=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert batch["targets"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 1, 2, IGNORE_INDEX],
                                         [3, 4, 9, IGNORE_INDEX, IGNORE_INDEX]]
    # Completion token c of completion i is the target at flat position index[i, c].
    targets = batch["targets"].flatten()[batch["index"]] * batch["completion_mask"]
    assert targets.tolist() == [[1, 2, 0], [3, 4, 9]]
    torch.testing.assert_close(batch["old_logps"], torch.tensor([[-0.1, -0.2, 0], [-0.3, -0.4, -0.5]]))


def test_shared_prompt_rows_give_each_completions_log_probs_and_gradient():
    """Completions of one prompt in one row (the prompt once) against a row per completion: the same
    per-token log-probs of every completion, and the same gradient of a weighted sum of them."""
    from model.config import ModelConfig
    from model.gpt import GPT

    model = GPT(ModelConfig.preset("tiny"))
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.randint(0, 512, (9,), generator=g).tolist(), torch.randint(0, 512, (5,), generator=g).tolist()
    prompts = [p1, p1, p1, p2, p2]
    completions = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (4, 7, 1, 6, 3)]
    lps = [[-1.0] * len(c) for c in completions]
    plain = completion_batch(prompts, completions, lps, 0, "cpu", share_prompt=False)
    shared = completion_batch(prompts, completions, lps, 0, "cpu", share_prompt=True)
    assert shared["input_ids"].shape[0] == 2 and plain["input_ids"].shape[0] == 5
    assert shared["targets"].flatten()[shared["index"]].masked_fill(~shared["completion_mask"], 0).tolist() == \
        [c + [0] * (7 - len(c)) for c in completions]
    weights = torch.randn(5, 7, generator=g)
    values, grads = [], []
    for batch in (plain, shared):
        logps = grpo.completion_logps(model, batch, temperature=0.7)
        (logps * weights).sum().backward()
        values.append(logps.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


def test_accumulation_does_not_change_the_step(tmp_path):
    run(tmp_path / "a", "--micro_batch", "4", "--steps", "2", reward_funcs=[says_the])
    run(tmp_path / "b", "--micro_batch", "8", "--steps", "2", reward_funcs=[says_the])
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert a[1]["reward_std"] > 0  # the rewards vary, so the loss is not trivially zero
    for step in (1, 2):
        assert a[step]["reward"] == b[step]["reward"], step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-7), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4, abs=1e-7), step


def test_resume_samples_and_trains_as_the_uninterrupted_run(tmp_path):
    run(tmp_path / "full", "--steps", "4", reward_funcs=[says_the])
    run(tmp_path / "split", "--steps", "4", "--stop_at_step", "2", reward_funcs=[says_the])
    run(tmp_path / "split", "--steps", "4", reward_funcs=[says_the])
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    for step in range(1, 5):
        assert split[step]["reward"] == full[step]["reward"], step
        assert split[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=1e-8), step


def test_reward_functions_are_named_by_import_path():
    assert grpo.import_function("algos.rewards:boxed_math").__name__ == "boxed_math"
    with pytest.raises(ValueError, match="not module:function"):
        grpo.import_function("algos.rewards.boxed_math")
    with pytest.raises(ValueError, match="cannot import 'algos.rewards:nope'"):
        grpo.import_function("algos.rewards:nope")
    with pytest.raises(ValueError, match="adapters_off needs a lora"):
        grpo.pick_reference(grpo.GRPOSettings(beta=0.1, reference="adapters_off"), None)
    assert grpo.pick_reference(grpo.GRPOSettings(beta=0.0), None) == "none"


@pytest.mark.slow
def test_two_processes_train_and_export(tmp_path):
    """torchrun with FSDP2 on CPU (gloo): rollouts through the gathered weights, then training forwards
    that reuse FSDP's all-gather buffers (made during generation: no_grad, not inference mode, or the
    second forward fails), a real gradient, and the export."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "train.grpo", "--config", TINY, "--out_dir", str(tmp_path), "--steps", "2", "--sample_tokens", "0",
           "--grpo.reward_funcs", '["tests.test_grpo:says_the"]']
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = metrics(tmp_path)
    assert sorted(m) == [1, 2] and any(m[s]["grad_norm"] > 0 for s in (1, 2))
    assert json.loads((tmp_path / "final" / "export_check.json").read_text())["ok"]
