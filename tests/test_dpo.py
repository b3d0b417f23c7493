"""The DPO loop (train/dpo.py) through main(cfg) on tiny configs: it learns a preference held-out pairs
confirm, its response log-probs equal a log_softmax of full logits, its reference modes agree, and
accumulation, resume and world size do not change what it computes."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algos.dpo import dpo_loss
from algos.logprobs import IGNORE_INDEX
from checkpoints.hf import load_hf
from model.lora import apply_lora, disable_lora
from model.tokenizer import Tokenizer
from tests.conftest import ROOT
from tests.synthetic_data import ASSETS, preference_pairs
from train import dpo
from train.batching import ChatBatches
from train.config import parse_config
from train.preference_data import PreferenceDataset

TINY = str(ROOT / "configs" / "dpo" / "tiny.yaml")
BASE = ROOT / "tests" / "assets" / "stories260k" / "hf"


def run(out_dir, *args, config=TINY):
    cfg = parse_config(dpo.DPOConfig, ["--config", config, "--out_dir", str(out_dir), "--sample_tokens", "0", *args])
    return dpo.main(cfg)


def metrics(out_dir, split="train"):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def test_shipped_synthetic_pairs_are_what_the_generator_makes():
    train, val = preference_pairs()
    for name, rows in (("preference_train.jsonl", train), ("preference_val.jsonl", val)):
        assert (ASSETS / name).read_text() == "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def pairs():
    tok = Tokenizer.from_dir(BASE, default_chat_template="chatml")
    return tok, PreferenceDataset([ASSETS / "preference_val.jsonl"], tok, max_len=128, max_prompt_len=64,
                                  progress=False)


def _batch(pairs, n=4, share_prompt=False):
    _, dataset = pairs
    collate = functools.partial(dpo.collate_indexed_pairs, share_prompt=share_prompt)
    return next(ChatBatches(dataset, n, collate=collate).iter_eval())


def test_response_logprobs_equal_log_softmax_of_full_logits_in_value_and_gradient(pairs):
    """sequence_logps (chunked per-token head) vs log_softmax(model(x)) gathered and summed over the
    response tokens, then through the DPO loss: the same value and the same gradient."""
    batch = _batch(pairs)
    model = load_hf(BASE)
    ref = load_hf(BASE)
    torch.manual_seed(0)
    with torch.no_grad():  # make the policy differ from the reference
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def loss_of(logps, ref_logps):
        B = logps.shape[0] // 2
        return dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=0.1)[0].sum()

    with torch.no_grad():
        ref_logps = dpo.sequence_logps(ref, batch)
    ours = dpo.sequence_logps(model, batch)
    loss_of(ours, ref_logps).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(batch["input_ids"], position_ids=batch["position_ids"]).double()  # (2B, T, V)
    targets = batch["targets"]
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = torch.where(targets != IGNORE_INDEX, token, 0.0).sum(-1)
    loss_of(expected, ref_logps.double()).backward()
    torch.testing.assert_close(ours.double(), expected.detach(), rtol=1e-5, atol=1e-4)
    # float32 chunked vs float64: measured within 1e-5 of each tensor's largest gradient; 1e-4 of it
    # leaves 10x room, while near-zero elements make any purely relative bound flaky.
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad.double(), rtol=0, atol=1e-4 * p.grad.abs().max().item(),
                                   msg=n)


def test_shared_prompt_rows_give_the_log_probs_and_gradient_of_separate_rows(pairs):
    """One row per pair (the prompt once, both responses continuing it) against 2B plain rows: the
    same response log-probs and the same gradient of a DPO loss, in fewer tokens."""
    plain, shared = _batch(pairs, n=6), _batch(pairs, n=6, share_prompt=True)
    assert shared["input_ids"].shape[0] * 2 == plain["input_ids"].shape[0]
    real = lambda b: int((b["targets"] != IGNORE_INDEX).sum())  # noqa: E731
    assert real(shared) == real(plain)  # every scored token, once
    assert (shared["document_ids"] >= 0).sum() < (plain["input_ids"] != 0).sum()  # the prompt once per pair
    model = load_hf(BASE)
    torch.manual_seed(0)
    ref_logps = torch.randn(12)
    grads, values = [], []
    for batch in (plain, shared):
        logps = dpo.sequence_logps(model, batch)
        dpo_loss(logps[:6], logps[6:], ref_logps[:6], ref_logps[6:], beta=0.1)[0].sum().backward()
        values.append(logps.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    # Summation order differs (other row lengths, other chunks): float32 noise, well under 1e-4.
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-4)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=1e-4 * g.abs().max().item(), msg=n)


def test_adapters_off_reference_equals_a_separately_loaded_base(pairs):
    batch = _batch(pairs)
    model = load_hf(BASE)
    apply_lora(model, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)  # adapters that change the output
        with disable_lora(model):
            off = dpo.sequence_logps(model, batch)
        on = dpo.sequence_logps(model, batch)
        base = dpo.sequence_logps(load_hf(BASE), batch)
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    assert not torch.allclose(on, base, atol=1e-3)


def test_sigmoid_dpo_with_lora_learns_the_preference_on_held_out_pairs(tmp_path):
    result = run(tmp_path)
    val = metrics(tmp_path, "val")
    assert val[4]["rewards/accuracies"] > 0.9 or val[12]["rewards/accuracies"] > 0.9
    assert val[12]["rewards/accuracies"] > 0.9 and val[12]["rewards/margins"] > 0
    train = metrics(tmp_path)
    assert train[12]["loss"] < train[1]["loss"]
    assert train[1]["loss"] == pytest.approx(0.693147, abs=1e-4)  # step 1: policy == reference, -log sigmoid(0)
    final = Path(result["final_dir"])
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()


def test_simpo_full_fine_tuning_learns_the_preference_on_held_out_pairs(tmp_path, pairs):
    tok, val_set = pairs
    base = load_hf(BASE)
    with torch.no_grad():
        batch = next(ChatBatches(val_set, len(val_set), collate=dpo.collate_indexed_pairs).iter_eval())
        n = dpo.per_response((batch["targets"] != IGNORE_INDEX).long(), batch)
        avg = dpo.sequence_logps(base, batch) / n
    B = len(val_set)
    before = (avg[:B] > avg[B:]).float().mean().item()
    run(tmp_path, "--lora", "null", "--dpo.loss", "simpo", "--dpo.beta", "2.0", "--optim.lr", "3e-4",
        "--steps", "16", "--eval_every", "8")
    after = metrics(tmp_path, "val")[16]["rewards/accuracies"]
    assert before < 0.9 < after, (before, after)


def test_precomputed_reference_equals_the_copy_and_is_reused(tmp_path):
    common = ("--lora", "null", "--steps", "3", "--optim.lr", "1e-4", "--eval_every", "0")
    run(tmp_path / "copy", *common, "--dpo.reference", "copy")
    run(tmp_path / "pre", *common, "--dpo.reference", "precomputed")
    a, b = metrics(tmp_path / "copy"), metrics(tmp_path / "pre")
    for step in (1, 2, 3):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
        assert b[step]["rewards/margins"] == pytest.approx(a[step]["rewards/margins"], rel=1e-4, abs=1e-5), step
    table = tmp_path / "pre" / "reference_logps_train.json"
    saved = table.read_text()
    run(tmp_path / "pre", *common, "--dpo.reference", "precomputed", "--steps", "4")  # resumes, reuses the table
    assert table.read_text() == saved


def test_accumulation_does_not_change_the_step(tmp_path):
    run(tmp_path / "a", "--steps", "3", "--micro_batch", "1")
    run(tmp_path / "b", "--steps", "3", "--micro_batch", "2")
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), step


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_resume_equals_uninterrupted_run(tmp_path, loss):
    common = ("--steps", "6", "--eval_every", "0", "--dpo.loss", loss)
    run(tmp_path / "full", *common)
    run(tmp_path / "split", *common, "--stop_at_step", "3")
    run(tmp_path / "split", *common)
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    for step in range(1, 7):
        assert split[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=1e-7), step


def test_reference_choices_are_checked():
    def pick(loss, reference, lora):
        return dpo.pick_reference(dpo.DPOLoss(loss=loss, reference=reference), lora)

    assert pick("sigmoid", "auto", None) == "copy"
    assert pick("sigmoid", "auto", object()) == "adapters_off"
    assert pick("simpo", "auto", None) == "none"
    with pytest.raises(ValueError, match="dpo.reference adapters_off needs a lora"):
        pick("sigmoid", "adapters_off", None)
    with pytest.raises(ValueError, match="simpo uses no reference"):
        pick("simpo", "copy", None)
    with pytest.raises(ValueError, match="needs a reference policy"):
        pick("ipo", "none", None)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--steps", "3", "--eval_every", "0", "--sample_tokens", "0"]
    run(tmp_path / "one", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "train.dpo", "--config", TINY, "--out_dir", str(tmp_path / "two"), *common]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for step in (1, 2, 3):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-6), step
        assert two[step]["rewards/accuracies"] == pytest.approx(one[step]["rewards/accuracies"]), step


def test_rerunning_a_finished_run_says_it_is_complete(tmp_path):
    run(tmp_path, "--steps", "2", "--eval_every", "0")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    result = run(tmp_path, "--steps", "2", "--eval_every", "0")
    assert result["complete"] and result["final_dir"] == str(tmp_path / "final")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    assert before == after


def test_kto_learns_the_preference_from_unpaired_samples(tmp_path):
    """dpo.loss kto on the paired synthetic rows split into desirable / undesirable samples: step 1 is
    the formula at r = z0 = 0 (lambda (1 - sigmoid(0)) = 0.5), and on held-out samples the desirable
    ones' implied reward ends clearly above the undesirable ones', further apart than early on."""
    run(tmp_path, "--dpo.loss", "kto")
    train, val = metrics(tmp_path), metrics(tmp_path, "val")
    assert train[1]["loss"] == pytest.approx(0.5, abs=1e-6) and train[1]["kl"] == pytest.approx(0.0, abs=1e-5)
    margin = {s: val[s]["rewards/chosen"] - val[s]["rewards/rejected"] for s in (4, 12)}
    assert margin[12] > 1.0 and margin[12] > margin[4], margin
    assert train[12]["loss"] < train[1]["loss"]


def test_kto_rejects_what_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="precomputed is not available for kto"):
        run(tmp_path / "a", "--dpo.loss", "kto", "--lora", "null", "--dpo.reference", "precomputed")
    with pytest.raises(ValueError, match="micro_batch >= 2"):
        run(tmp_path / "b", "--dpo.loss", "kto", "--micro_batch", "1")
