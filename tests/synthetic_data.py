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


def write_assets() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    train, val = preference_pairs()
    for name, rows in (("preference_train.jsonl", train), ("preference_val.jsonl", val)):
        (ASSETS / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_assets()
