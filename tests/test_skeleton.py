"""The loops share one skeleton, word for word, so `diff train/sft.py train/dpo.py` shows the
algorithm and nothing else: the step loop of every train/<loop>.py, minus the block each marks as
its algorithm's own (`# >>> algorithm` ... `# <<< algorithm`), is the same text. And no loop
imports another."""

import ast
import re

import pytest

from tests.conftest import ROOT

START = "    # ---- the step loop"
END = "    result = "
LOOP_FILES = sorted(p for p in (ROOT / "train").glob("*.py") if START in p.read_text())


def step_loop(path) -> list[str]:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(START))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(END))
    kept, inside = [], False
    for line in lines[start:end]:
        if line.strip().startswith("# >>> algorithm"):
            assert not inside, f"{path}: nested algorithm block"
            inside = True
        elif line.strip() == "# <<< algorithm":
            assert inside, f"{path}: unopened algorithm block"
            inside = False
        elif not inside:
            kept.append(line)
    assert not inside, f"{path}: unclosed algorithm block"
    return kept


def test_there_are_loops_to_compare():
    names = {p.stem for p in LOOP_FILES}
    assert {"pretrain", "sft"} <= names, names


@pytest.mark.parametrize("path", LOOP_FILES, ids=lambda p: p.stem)
def test_step_loop_is_the_shared_skeleton(path):
    reference = step_loop(ROOT / "train" / "pretrain.py")
    got = step_loop(path)
    if got != reference:
        import difflib

        diff = "\n".join(difflib.unified_diff(reference, got, "train/pretrain.py", str(path.relative_to(ROOT)),
                                              lineterm=""))
        pytest.fail(f"the step loop of {path.name} drifted from the shared skeleton (outside its algorithm "
                    f"block):\n{diff}")


def test_fine_tuning_loops_build_the_model_alike():
    """Full fine-tuning vs LoRA: the same setup lines in every fine-tuning loop."""
    def block(path):
        text = path.read_text()
        m = re.search(r"\n    # ---- model: built on meta\..*?\n\n", text, re.S)
        return m.group(0) if m else None

    blocks = {p.stem: block(p) for p in LOOP_FILES if p.stem != "pretrain"}
    assert blocks and all(blocks.values()), {k: v is not None for k, v in blocks.items()}
    assert len(set(blocks.values())) == 1, f"model setup differs between {sorted(blocks)}"


@pytest.mark.parametrize("path", LOOP_FILES, ids=lambda p: p.stem)
def test_no_loop_imports_another(path):
    loops = {p.stem for p in LOOP_FILES}
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    others = {f"train.{name}" for name in loops - {path.stem}}
    assert not (imported & others), f"{path.name} imports {sorted(imported & others)}"


def test_model_imports_nothing_from_train_and_checkpoints_only_in_main():
    for path in sorted((ROOT / "model").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module-level imports only; a command-line main() may load checkpoints
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert not (name or "").startswith(("train", "checkpoints")), f"{path.name} imports {name}"
