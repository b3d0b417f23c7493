"""Synthetic data the tests and tiny configs learn from, made here (not third-party): deterministic
functions, and `python -m tests.synthetic_data` rewrites the shipped copies in tests/assets/synthetic/
(tests check that the shipped files equal what these functions make)."""

import itertools
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets" / "synthetic"
NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Tim", "Mia", "Sam", "Lucy", "Jack", "Zoe", "Kate", "Bob"]
THINGS = ["ball", "dog", "cat", "toy", "car", "tree", "bird", "cake", "box", "hat", "fish", "boat", "frog", "kite"]


def preference_pairs(n_train: int = 160, n_val: int = 40, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Pairs whose chosen response follows a rule the rejected one breaks: a story that ends happy is
    preferred to the same story ending sad. Train and validation use disjoint (name, thing) pairs, so
    the validation accuracy measures the rule, not memory."""
    combos = list(itertools.product(NAMES, THINGS))
    random.Random(seed).shuffle(combos)
    rows = []
    for name, thing in combos[: n_train + n_val]:
        story = f"{name} saw a {thing}."
        rows.append({"prompt": f"What did {name} see?",
                     "chosen": f"{story} {name} was happy.", "rejected": f"{story} {name} was sad."})
    return rows[:n_train], rows[n_train:]


def arithmetic(n_train: int = 600, n_val: int = 100, seed: int = 0, high: int = 30):
    """Addition problems a + b with 0 <= a, b < high: prompt rows {"prompt", "answer"} for GRPO,
    chats whose answer ends in \\boxed{a + b} for SFT, and plain text lines "a + b = c" for
    pretraining. The prompts and chats of train and validation use disjoint (a, b) pairs; the
    pretraining text holds every pair, as a real model's pretraining holds the arithmetic that
    fine-tuning and RL then teach it to state in a checkable form."""
    pairs = list(itertools.product(range(high), range(high)))
    random.Random(seed).shuffle(pairs)
    train, val = pairs[:n_train], pairs[n_train:n_train + n_val]

    def prompt(a, b):
        return f"What is {a} + {b}?"

    def solution(a, b):
        return f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."

    prompts = [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in train]
    val_prompts = [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in val]
    chats = [{"prompt": prompt(a, b), "completion": solution(a, b)} for a, b in train]
    everything = pairs * 3
    random.Random(seed + 1).shuffle(everything)
    text = "".join(f"What is {a} + {b}? {a} + {b} = {a + b}.\n" if i % 2 else f"{a} + {b} = {a + b}\n"
                   for i, (a, b) in enumerate(everything))
    return prompts, val_prompts, chats, text


def write_assets() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    train, val = preference_pairs()
    for name, rows in (("preference_train.jsonl", train), ("preference_val.jsonl", val)):
        (ASSETS / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, val_prompts, chats, text = arithmetic()
    for name, rows in (("arithmetic_prompts.jsonl", prompts), ("arithmetic_val.jsonl", val_prompts),
                       ("arithmetic_chats.jsonl", chats)):
        (ASSETS / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ASSETS / "arithmetic.txt").write_text(text)


if __name__ == "__main__":
    write_assets()
