"""train/preference_data.py with the real Qwen3 tokenizer on real Anthropic HH rows (the first 200 of
harmless-base test, shipped in tests/assets): the scored tokens of each side are exactly its response,
the prompt is the shared whole-turn prefix, every bad-row reason is counted or named by file and line,
the truncation modes keep what they say, and the batches are stacked and padded as documented."""

import functools
import gzip
import json
from collections import Counter

import numpy as np
import pytest
import torch

from algos.logprobs import IGNORE_INDEX
from model.tokenizer import CHATML_TEMPLATE, Tokenizer
from tests.conftest import ROOT, shared
from train.preference_data import (KTODataset, PreferenceDataset, collate_kl, collate_pairs, collate_unpaired,
                                   format_pair, to_pair)

THINK = "<think>\n\n</think>\n\n"  # Qwen3 renders an empty think block into the final assistant turn
END = "<|im_end|>"


@functools.cache
def qwen3() -> Tokenizer:
    return Tokenizer.from_dir(shared("tokenizer_qwen3"))


def hh_path():
    # The shipped first 200 rows themselves, never the full file of shared/data: the tests count its bad rows.
    return ROOT / "tests" / "assets" / "hh_rlhf_harmless_base" / "test.jsonl.gz"


def hh_rows():
    with gzip.open(hh_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def scored_runs(ids, targets):
    """The decoded runs of scored tokens: token t is scored when targets[t - 1] != IGNORE_INDEX."""
    scored = [False] + [int(t) != IGNORE_INDEX for t in targets[:-1]]
    runs, t = [], 0
    while t < len(ids):
        if scored[t]:
            start = t
            while t < len(ids) and scored[t]:
                t += 1
            runs.append(qwen3().decode([int(i) for i in ids[start:t]], skip_special_tokens=False))
        else:
            t += 1
    return runs


def check_targets_are_shifted(ids, targets):
    targets = np.asarray(targets)
    assert targets[-1] == IGNORE_INDEX
    scored = targets[:-1] != IGNORE_INDEX
    assert (targets[:-1][scored] == np.asarray(ids)[1:][scored]).all()


def first_scored(targets):
    """The index of the first scored token (the end of the prompt)."""
    return int(np.flatnonzero(np.asarray(targets) != IGNORE_INDEX)[0]) + 1


def hh_turns(text):
    """Written independently of parse_hh: split on the turn markers of these rows (which have no
    consecutive turns of one speaker)."""
    assert text.startswith("\n\nHuman:")
    out = []
    for chunk in text.split("\n\n")[1:]:
        if chunk.startswith(("Human:", "Assistant:")):
            role, content = chunk.split(":", 1)
            out.append({"role": "user" if role == "Human" else "assistant", "content": content})
        else:
            out[-1]["content"] += "\n\n" + chunk
    return [{**m, "content": m["content"].strip()} for m in out]


# ---- HH transcripts: exactly the final assistant turn is scored, after the shared prefix ----

def test_hh_pairs_score_exactly_the_final_turn_after_the_shared_prompt():
    rows = hh_rows()
    ds = PreferenceDataset(hh_path(), qwen3(), max_len=100_000, on_bad_row="skip", progress=False)
    # Row 87 of harmless-base test has an empty chosen answer ("Assistant: ").
    assert ds.stats["skipped"] == {"empty_response": 1}
    kept = [r for r in rows if hh_turns(r["chosen"])[-1]["content"]]
    assert len(ds) == len(kept) == len(rows) - 1
    for i in (0, 1, 2, 50, 100, len(ds) - 1):
        row, sample = kept[i], ds[i]
        chosen, rejected = hh_turns(row["chosen"]), hh_turns(row["rejected"])
        assert chosen[:-1] == rejected[:-1]  # these rows differ in their last turn only
        prompt_text = qwen3().apply_chat_template(chosen[:-1], add_generation_prompt=True)
        for side, turns in (("chosen", chosen), ("rejected", rejected)):
            ids, targets = sample[f"{side}_input_ids"], sample[f"{side}_targets"]
            check_targets_are_shifted(ids, targets)
            assert scored_runs(ids, targets) == [THINK + turns[-1]["content"] + END]
            start = first_scored(targets)
            assert qwen3().decode(ids[:start].tolist(), skip_special_tokens=False) == prompt_text
        assert ds.lengths[i] == max(len(sample["chosen_input_ids"]), len(sample["rejected_input_ids"]))
    text = format_pair(qwen3(), ds[0])
    assert f"[[{THINK}{hh_turns(kept[0]['chosen'])[-1]['content']}{END}]]" in text
    assert f"[[{THINK}{hh_turns(kept[0]['rejected'])[-1]['content']}{END}]]" in text
    assert ds.stats["scored_tokens"] == sum(int((ds[i][f] != IGNORE_INDEX).sum()) for i in range(len(ds))
                                            for f in ("chosen_targets", "rejected_targets"))


def test_hh_shared_prefix_of_whole_turns(tmp_path):
    """Turns that differ in their last words still differ as whole turns; consecutive turns of one
    speaker are one turn; a longer side keeps its extra turns in its response."""
    h, a = "\n\nHuman: ", "\n\nAssistant: "
    rows = [
        {"chosen": f"{h}Hi there{a}Hello! How can I help{h}Tell me a joke{a}Why did the chicken cross the road?",
         "rejected": f"{h}Hi there{a}Hello! How can I help{h}Tell me a joke{a}Why did the chicken cross the street?"},
        {"chosen": f"{h}Question{a}Part one.{a}Part two.", "rejected": f"{h}Question{a}Other answer."},
        {"chosen": f"{h}Q{a}A1{h}Q2{a}A2", "rejected": f"{h}Q{a}A1"},
    ]
    assert to_pair(rows[0]) == ([{"role": "user", "content": "Hi there"},
                                 {"role": "assistant", "content": "Hello! How can I help"},
                                 {"role": "user", "content": "Tell me a joke"}],
                                [{"role": "assistant", "content": "Why did the chicken cross the road?"}],
                                [{"role": "assistant", "content": "Why did the chicken cross the street?"}])
    assert to_pair(rows[1])[1] == [{"role": "assistant", "content": "Part one.\n\nPart two."}]
    prompt, chosen, rejected = to_pair(rows[2])
    assert prompt == [{"role": "user", "content": "Q"}]
    assert [m["content"] for m in chosen] == ["A1", "Q2", "A2"] and rejected == [{"role": "assistant", "content": "A1"}]
    ds = PreferenceDataset(write_jsonl(tmp_path / "hh.jsonl", rows), qwen3(), max_len=1000, progress=False)
    # A multi-turn response scores each of its assistant turns; the empty think block goes into the last one.
    assert scored_runs(ds[2]["chosen_input_ids"], ds[2]["chosen_targets"]) == ["A1" + END, THINK + "A2" + END]
    assert scored_runs(ds[2]["rejected_input_ids"], ds[2]["rejected_targets"]) == [THINK + "A1" + END]


# ---- explicit prompt / chosen / rejected, strings or messages ----

def test_explicit_rows_score_only_the_response(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    history = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [system, *history, {"role": "user", "content": "And of Spain?"}],
         "chosen": [{"role": "assistant", "content": "Madrid."}],
         "rejected": [{"role": "assistant", "content": "Barcelona."}]},
        # UltraFeedback's shape: full conversations, the prompt field beside them ignored.
        {"prompt": "ignored", "chosen": [*history, {"role": "user", "content": "Germany?"},
                                         {"role": "assistant", "content": "Berlin."}],
         "rejected": [*history, {"role": "user", "content": "Germany?"}, {"role": "assistant", "content": "Bonn."}]},
    ]
    ds = PreferenceDataset(write_jsonl(tmp_path / "explicit.jsonl", rows), qwen3(), max_len=1000, progress=False)
    expected = [("4", "5"), ("Madrid.", "Barcelona."), ("Berlin.", "Bonn.")]
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}],
               [system, *history, {"role": "user", "content": "And of Spain?"}],
               [*history, {"role": "user", "content": "Germany?"}]]
    for sample, (chosen, rejected), prompt in zip((ds[i] for i in range(3)), expected, prompts, strict=True):
        assert scored_runs(sample["chosen_input_ids"], sample["chosen_targets"]) == [THINK + chosen + END]
        assert scored_runs(sample["rejected_input_ids"], sample["rejected_targets"]) == [THINK + rejected + END]
        start = first_scored(sample["chosen_targets"])
        assert (qwen3().decode(sample["chosen_input_ids"][:start].tolist(), skip_special_tokens=False)
                == qwen3().apply_chat_template(prompt, add_generation_prompt=True))


def test_a_template_without_generation_tags(tmp_path):
    """GPT-2 has no chat template; with ChatML as the default, the plain-text markers still delimit the
    response through the assistant mask."""
    tok = Tokenizer.from_dir(shared("tokenizer_gpt2"), default_chat_template="chatml")
    assert "{% generation %}" not in CHATML_TEMPLATE
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}])
    sample = PreferenceDataset(path, tok, max_len=200, progress=False)[0]
    for side, text in (("chosen", "Hi!"), ("rejected", "No.")):
        ids, targets = sample[f"{side}_input_ids"], sample[f"{side}_targets"]
        scored = [False] + [int(t) != IGNORE_INDEX for t in targets[:-1]]
        assert tok.decode([int(i) for i, s in zip(ids, scored) if s]) == text + "<|im_end|>"


# ---- bad rows ----

LONG = " ".join(["word"] * 300)
BAD_ROWS = {
    "invalid_json": '{"prompt": "x", "chosen": \n',
    "missing_fields": {"prompt": "x", "chosen": "y"},
    "identical_responses": {"prompt": "x", "chosen": "same", "rejected": "same"},
    "empty_response": {"prompt": "x", "chosen": "  ", "rejected": "fine"},
    "no_room_for_response": {"prompt": LONG, "chosen": "a", "rejected": "b"},
    "different_prompts": {"chosen": "\n\nHuman: one\n\nAssistant: a", "rejected": "\n\nHuman: two\n\nAssistant: b"},
    "bad_order": {"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                  "chosen": "a", "rejected": "b"},
    "unknown_role": {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
}
GOOD = {"prompt": "Hello", "chosen": "Hi.", "rejected": "Go away."}


def test_bad_rows_are_counted_when_skipped(tmp_path):
    rows = [GOOD] + [row for row in BAD_ROWS.values() for _ in range(2)] + [GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = PreferenceDataset(path, qwen3(), max_len=128, on_bad_row="skip", progress=False)
    assert ds.stats["skipped"] == {reason: 2 for reason in BAD_ROWS}
    assert ds.stats["rows"] == len(rows) and len(ds) == 2
    assert "skipped" in ds.summary() and "no_room_for_response 2" in ds.summary()


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_rows_raise_naming_file_and_line(tmp_path, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, BAD_ROWS[reason], GOOD])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*on_bad_row='skip'"):
        PreferenceDataset(path, qwen3(), max_len=128, progress=False)
    assert PreferenceDataset(path, qwen3(), max_len=128, on_bad_row="skip", progress=False).stats["skipped"] == {
        reason: 1}


def test_all_bad_raises(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [BAD_ROWS["identical_responses"]])
    with pytest.raises(ValueError, match="no usable preference row"):
        PreferenceDataset(path, qwen3(), max_len=128, on_bad_row="skip", progress=False)


# ---- truncation ----

@pytest.mark.parametrize("truncation", ["keep_end", "keep_start"])
def test_prompt_truncation_keeps_its_end_or_start(tmp_path, truncation):
    prompt = " ".join(f"w{i}" for i in range(200))
    chosen, rejected = " ".join(f"c{i}" for i in range(100)), "short answer"
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    full = PreferenceDataset(path, qwen3(), max_len=10_000, progress=False)[0]
    ds = PreferenceDataset(path, qwen3(), max_len=120, max_prompt_len=64, truncation=truncation, progress=False)
    sample = ds[0]
    for side in ("chosen", "rejected"):
        full_ids, ids = full[f"{side}_input_ids"], sample[f"{side}_input_ids"]
        full_start, start = first_scored(full[f"{side}_targets"]), first_scored(sample[f"{side}_targets"])
        assert start == 64 and full_start > 64
        kept = full_ids[:64] if truncation == "keep_start" else full_ids[full_start - 64:full_start]
        assert (ids[:64] == kept).all()
        # The response follows whole, or cut to fit max_len; its scored tokens are a prefix of the full ones.
        response = ids[64:]
        assert len(ids) <= 120 and (response == full_ids[full_start:full_start + len(response)]).all()
        check_targets_are_shifted(ids, sample[f"{side}_targets"])
        assert (sample[f"{side}_targets"] != IGNORE_INDEX).sum() == len(response) - (side == "rejected")
    assert len(sample["chosen_input_ids"]) == 120  # the 100-word answer was cut
    assert ds.stats["truncated_prompts"] == 1 and ds.stats["truncated_responses"] == 1
    assert "1 prompts cut to 64 tokens" in ds.summary() and "1 responses cut to fit 120 tokens" in ds.summary()


# ---- batches ----

def test_collate_pairs_stacks_chosen_then_rejected_right_padded():
    ds = PreferenceDataset(hh_path(), qwen3(), max_len=300, max_prompt_len=200, on_bad_row="skip", progress=False)
    samples = [ds[i] for i in (3, 0, 7)]
    batch = collate_pairs(samples, pad_id=qwen3().pad_id)
    B = len(samples)
    T = max(len(s[f"{side}_input_ids"]) for s in samples for side in ("chosen", "rejected"))
    assert set(batch) == {"input_ids", "targets", "position_ids"}
    for key in batch:
        assert batch[key].shape == (2 * B, T) and batch[key].dtype == torch.int64
    assert (batch["position_ids"] == torch.arange(T)).all()
    for row, (s, side) in enumerate([(s, "chosen") for s in samples] + [(s, "rejected") for s in samples]):
        ids, targets = s[f"{side}_input_ids"], s[f"{side}_targets"]
        L = len(ids)
        assert batch["input_ids"][row, :L].tolist() == ids.tolist()
        assert batch["targets"][row, :L].tolist() == targets.tolist()
        assert (batch["input_ids"][row, L:] == qwen3().pad_id).all()
        assert (batch["targets"][row, L:] == IGNORE_INDEX).all()


def test_kto_samples_batches_and_mismatched_kl_pairs(tmp_path):
    rows = [
        {"prompt": "Name a fruit.", "completion": "An apple.", "label": True},
        {"prompt": [{"role": "user", "content": "Name a colour."}], "completion": [{"role": "assistant",
                                                                                     "content": "Blue."}],
         "label": False},
        {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "A rock."},  # a pair: two samples
        {"prompt": "x", "completion": "y", "label": "yes"},  # not a bool
        {"prompt": "x", "completion": "", "label": True},
    ]
    ds = KTODataset(write_jsonl(tmp_path / "kto.jsonl", rows), qwen3(), max_len=200, on_bad_row="skip",
                    progress=False)
    assert ds.stats["skipped"] == {"missing_fields": 1, "empty_response": 1}
    assert [ds[i]["label"] for i in range(len(ds))] == [True, False, True, False]
    completions = ["An apple.", "Blue.", "A pear.", "A rock."]
    for i, text in enumerate(completions):
        assert scored_runs(ds[i]["input_ids"], ds[i]["targets"]) == [THINK + text + END]
        assert ds[i]["prompt_len"] == first_scored(ds[i]["targets"])
    samples = [ds[i] for i in range(len(ds))]
    batch = collate_unpaired(samples, qwen3().pad_id)
    assert batch["label"].tolist() == [True, False, True, False] and batch["input_ids"].shape[0] == 4
    kl = collate_kl(samples, qwen3().pad_id, max_len=200)
    for i in range(4):
        j = (i + 1) % 4
        ids = kl["input_ids"][i][kl["input_ids"][i] != qwen3().pad_id].tolist()
        p = samples[i]["prompt_len"]
        assert ids[:p] == samples[i]["input_ids"][:p].tolist()
        assert scored_runs(np.array(ids), kl["targets"][i, :len(ids)].numpy()) == [THINK + completions[j] + END]
    with pytest.raises(ValueError, match="at least 2"):
        collate_kl(samples[:1], qwen3().pad_id)
    assert Counter(ds.labels.tolist()) == {True: 2, False: 2} and ds.stats["desirable"] == 2
