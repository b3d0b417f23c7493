"""The tiny R1 of README's "From pretraining to R1 on a laptop", end to end on CPU: the three configs
configs/{pretrain,sft,grpo}/arithmetic.yaml run through each loop's main(cfg), and GRPO with the R1
reward (algos.rewards:boxed_math) raises greedy accuracy on 100 held-out addition problems.

What the data sets up (tests/synthetic_data.py arithmetic()): pretraining holds every pair a + b
(a, b < 20) as a fact and as a worked answer in chat form ("Adding: a + b = c. The answer is
\\boxed{c}."); 70% of the 300 SFT chats state the answer at once instead ("The answer is
\\boxed{c}."). The SFT model imitates that and mostly answers at once, which is mostly wrong on pairs
it was not fine-tuned on; its samples still work the sum out about 3 times in 10, and those are right
about twice as often. GRPO sees it in the rewards and the policy learns to write the sum first.

Measured on this 2-core CPU (greedy accuracy on the 100 validation problems, each stage's seed
set to s with --seed s; seed 0 is the configs' and this test's; seed 0 also gave the same numbers
with 1 and 2 threads):

    seed | SFT greedy (worked answers) | GRPO val accuracy at steps 10 / 20 / 30 / 40 (worked)
    0    | 0.06 (0%)                   | 0.86 / 0.80 / 0.75 / 0.81 (100%)
    1    | 0.10 (0%)                   | 0.87 / 0.89 / 0.87 / 0.91 (100%)
    2    | 0.05 (0%)                   | 0.87 / 0.88 / 0.88 / 0.88 (100%)

Thresholds, with their margins over the worst seed: SFT below 0.30 (20 points above 0.10), GRPO's
final accuracy above 0.60 (21 points below 0.81) and at least 0.40 above the SFT model's (the
smallest gain measured is 0.75); worked answers under 30% after SFT (measured 0%) and over 70%
after GRPO (measured 100%). A 100-problem accuracy has a binomial standard deviation of at most 5
points, so each margin is about four of them. The whole test takes about 2 minutes here
(pretraining 70 s, SFT 10 s, GRPO 25 s when the machine is otherwise idle).
"""

import json
from pathlib import Path

import pytest

from algos.rewards import boxed_math
from checkpoints.hf import load_hf
from model.generate import generate
from model.tokenizer import Tokenizer
from tests.conftest import ROOT
from tests.synthetic_data import ARITHMETIC_FILES, ASSETS, arithmetic
from train import grpo, pretrain, sft
from train.config import parse_config

CONFIGS = ROOT / "configs"
VAL = ASSETS / "arithmetic_val.jsonl"


def test_shipped_arithmetic_files_are_what_the_generator_makes():
    for name, rows in zip(ARITHMETIC_FILES, arithmetic(), strict=True):
        assert (ASSETS / name).read_text() == "".join(json.dumps(r) + "\n" for r in rows), name


def test_train_and_validation_problems_are_disjoint():
    prompts, val, chats, documents = arithmetic()
    assert not {r["prompt"] for r in prompts} & {r["prompt"] for r in val}
    assert [r["prompt"] for r in chats] == [r["prompt"] for r in prompts]
    worked = sum(r["completion"].startswith("Adding: ") for r in chats)
    assert 0.2 < worked / len(chats) < 0.4  # 30% of the chats work the sum out, 70% answer at once


def greedy_answers(model_dir: Path) -> tuple[float, float]:
    """Greedy completions of the validation prompts: (accuracy under boxed_math, share that work the
    sum out first). The same prompts and scoring as train.grpo's evaluation."""
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_hf(model_dir).eval()
    rows = [json.loads(line) for line in VAL.read_text().splitlines()]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
               for r in rows]
    outputs = generate(model, prompts, 40, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0)
    texts = [tokenizer.decode(o) for o in outputs]
    rewards = boxed_math([r["prompt"] for r in rows], texts, answer=[r["answer"] for r in rows])
    accuracy = sum(r > 0 for r in rewards) / len(rows)
    worked = sum(t.strip().startswith("Adding:") for t in texts) / len(rows)
    return accuracy, worked


@pytest.mark.slow
def test_pretrain_sft_grpo_raises_held_out_accuracy(tmp_path):
    # Each stage reads its config as the README's commands do; only where things are written and
    # read changes (and data paths made absolute, so the test runs from any directory).
    cfg = parse_config(pretrain.PretrainConfig, [
        "--config", str(CONFIGS / "pretrain" / "arithmetic.yaml"), "--out_dir", str(tmp_path / "pretrain"),
        "--data.dir", str(tmp_path / "data"), "--data.inputs", f"[{ASSETS / 'arithmetic_pretrain.jsonl'}]",
        "--sample_tokens", "0"])
    pretrain.main(cfg)

    cfg = parse_config(sft.SFTConfig, [
        "--config", str(CONFIGS / "sft" / "arithmetic.yaml"), "--out_dir", str(tmp_path / "sft"),
        "--model.checkpoint", str(tmp_path / "pretrain" / "final"),
        "--data.train", f"[{ASSETS / 'arithmetic_chats.jsonl'}]", "--sample_tokens", "0"])
    sft.main(cfg)
    sft_accuracy, sft_worked = greedy_answers(tmp_path / "sft" / "final")

    cfg = parse_config(grpo.GRPOConfig, [
        "--config", str(CONFIGS / "grpo" / "arithmetic.yaml"), "--out_dir", str(tmp_path / "grpo"),
        "--model.checkpoint", str(tmp_path / "sft" / "final"),
        "--data.train", f"[{ASSETS / 'arithmetic_prompts.jsonl'}]", "--data.val", f"[{VAL}]",
        "--sample_tokens", "0"])
    grpo.main(cfg)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["accuracy"] for r in rows if r["split"] == "val"}
    assert sorted(val) == [10, 20, 30, 40]
    grpo_accuracy, grpo_worked = greedy_answers(tmp_path / "grpo" / "final")

    report = f"SFT {sft_accuracy:.2f} ({sft_worked:.0%} worked), GRPO val {val}, ({grpo_worked:.0%} worked)"
    assert sft_accuracy < 0.30, report  # room to learn: the SFT model mostly answers at once, wrongly
    assert val[40] > 0.60, report
    assert val[40] - sft_accuracy >= 0.40, report
    # The loop's evaluation scores the same prompts the same way (batched differently: a near-tie may flip).
    assert grpo_accuracy == pytest.approx(val[40], abs=0.05), report
    assert sft_worked < 0.30 and grpo_worked > 0.70, report  # what GRPO learned: write the sum first
