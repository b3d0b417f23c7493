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
ARITHMETIC_FILES = ("arithmetic_prompts.jsonl", "arithmetic_val.jsonl", "arithmetic_chats.jsonl",
                    "arithmetic_pretrain.jsonl")  # what arithmetic() returns, in order


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


def arithmetic(n_train: int = 300, n_val: int = 100, seed: int = 0, high: int = 20, direct_share: float = 0.7):
    """Addition problems a + b with 0 <= a, b < high, for the tiny R1 (README: "From pretraining to
    R1 on a laptop"). Returns
      prompts, val_prompts: rows {"prompt": "What is a + b?", "answer": "a + b"} for GRPO, on
        disjoint (a, b) pairs, so validation measures what transfers, not memory of the pairs;
      chats: the training pairs as {"prompt", "completion"} for SFT. A share `direct_share` of them
        states the answer at once ("The answer is \\boxed{c}."), the rest work it out first
        ("Adding: a + b = c. The answer is \\boxed{c}."): the SFT model imitates both, and the direct form
        is mostly wrong on new pairs, which leaves GRPO a behaviour to discover (write the sum first);
      documents: pretraining rows {"text"}, every pair (validation pairs too, as a real model's
        pretraining holds the arithmetic that fine-tuning then teaches it to state in a checkable
        form) six times, alternately as a fact "a + b = c" and as a worked answer in the chat
        form of configs/sft/arithmetic.yaml. The worked form opens with a word, not with the number
        a, so choosing to work (one token) and copying a (the next) are separate decisions. One document per row, so each ends with the
        end-of-text token that also ends an assistant turn.
    """
    pairs = list(itertools.product(range(high), range(high)))
    random.Random(seed).shuffle(pairs)
    train, val = pairs[:n_train], pairs[n_train:n_train + n_val]

    def prompt(a, b):
        return f"What is {a} + {b}?"

    def worked(a, b):
        return f"Adding: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."

    prompts = [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in train]
    val_prompts = [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in val]
    rng = random.Random(seed + 2)
    chats = [{"prompt": prompt(a, b),
              "completion": f"The answer is \\boxed{{{a + b}}}." if rng.random() < direct_share else worked(a, b)}
             for a, b in train]
    everything = pairs * 6
    random.Random(seed + 1).shuffle(everything)
    documents = [{"text": f"user: {prompt(a, b)}\nassistant: {worked(a, b)}" if i % 2 else f"{a} + {b} = {a + b}"}
                 for i, (a, b) in enumerate(everything)]
    return prompts, val_prompts, chats, documents


def write_assets() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    train, val = preference_pairs()
    for name, rows in (("preference_train.jsonl", train), ("preference_val.jsonl", val)):
        (ASSETS / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, rows in zip(ARITHMETIC_FILES, arithmetic()):
        (ASSETS / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_assets()
