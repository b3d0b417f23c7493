"""train/chat_data.py on real chat data from shared/data with the real Qwen3 tokenizer: every row format
gives the same conversation, the trained tokens are exactly the assistant's (checked against transformers'
rendering), bad rows are named or counted, and the batches are packed correctly, deterministic, resumable,
rank-invariant, and give the same loss packed as unpacked."""

import functools
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from algos.logprobs import IGNORE_INDEX, cross_entropy_sum
from model.config import ModelConfig
from model.gpt import GPT
from model.masks import document_block_mask, document_mask
from model.tokenizer import Tokenizer
from tests.conftest import shared
from tests.test_tokenizer import masked_runs
from train.batching import ChatBatches, first_fit, num_targets
from train.chat_data import SFTDataset, format_example, iter_rows, to_messages, tokenize_conversation

THINK = "<think>\n\n</think>\n\n"  # Qwen3 puts an empty think block before the final assistant turn


@functools.cache
def qwen3() -> Tokenizer:
    return Tokenizer.from_dir(shared("tokenizer_qwen3"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def gsm8k_rows(n):
    with open(shared("gsm8k/train.jsonl"), encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def seed_task_rows():
    """self_instruct seed tasks as Alpaca rows, from each task's first instance."""
    with open(shared("self_instruct_seed_tasks/seed_tasks.jsonl"), encoding="utf-8") as f:
        tasks = [json.loads(line) for line in f]
    return [{"instruction": t["instruction"], "input": t["instances"][0]["input"],
             "output": t["instances"][0]["output"]} for t in tasks]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The three real data sets, one per row format: ShareGPT (.json list), Alpaca and prompt/completion (.jsonl)."""
    tmp = tmp_path_factory.mktemp("chat")
    return {
        "sharegpt": shared("fastchat_conversations/dummy_conversation.json"),
        "alpaca": write_jsonl(tmp / "seed_tasks_alpaca.jsonl", seed_task_rows()),
        "prompt_completion": write_jsonl(tmp / "gsm8k_pc.jsonl", [{"prompt": r["question"], "completion": r["answer"]}
                                                                  for r in gsm8k_rows(150)]),
    }


def messages_of(path):
    return [to_messages(row) for _, row in iter_rows(path)]


def unpadded(batch, b):
    """Row b of an unpacked batch without its right padding: (input_ids, labels) as lists."""
    ids, labels = batch["input_ids"][b], batch["targets"][b]
    keep = len(ids)
    while keep and ids[keep - 1] == qwen3().pad_id and labels[keep - 1] == IGNORE_INDEX:
        keep -= 1
    return ids[:keep].tolist(), labels[:keep].tolist()


# ---- reading: every format gives the same conversation ----

def test_formats_parse_to_the_same_messages(tmp_path):
    q, a = gsm8k_rows(1)[0]["question"], gsm8k_rows(1)[0]["answer"]
    expected = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    rows = [
        {"messages": expected},
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        {"conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]},
        {"prompt": q, "completion": a},
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]},
        {"instruction": q, "input": "", "output": a},
        {"instruction": q, "output": a},
    ]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    for path in (jsonl, as_json):
        assert messages_of(path) == [expected] * len(rows)

    # Parquet holds one schema per file: one file per format, absent fields are null in the other rows.
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    for i, row in enumerate(rows):
        pq.write_table(pa.Table.from_pylist([row, row]), tmp_path / f"rows{i}.parquet")
        assert messages_of(tmp_path / f"rows{i}.parquet") == [expected] * 2
    keys = dict.fromkeys([*rows[3], *rows[5]])  # from_pylist takes its columns from the first row
    pq.write_table(pa.Table.from_pylist([{**keys, **rows[3]}, {**keys, **rows[5]}]), tmp_path / "mixed.parquet")
    assert messages_of(tmp_path / "mixed.parquet") == [expected] * 2

    # The same conversations tokenize the same, whatever the file.
    datasets = [SFTDataset(p, qwen3(), 512, progress=False) for p in (jsonl, as_json, tmp_path / "rows3.parquet")]
    for ds in datasets:
        assert all(ds[i]["input_ids"].tolist() == datasets[0][0]["input_ids"].tolist() for i in range(len(ds)))


def test_real_files_parse(files):
    sharegpt = messages_of(files["sharegpt"])
    assert len(sharegpt) == 500
    assert sharegpt[0][:2] == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Vicuna, a language model trained by researchers from Large Model "
                                         "Systems Organization (LMSYS)."},
    ]
    alpaca = messages_of(files["alpaca"])
    assert alpaca[0][0]["content"].startswith("Is there anything I can eat for a breakfast")  # no input
    assert alpaca[1][0]["content"] == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
    assert alpaca[1][1] == {"role": "assistant",
                            "content": "The relation between the given pairs is that they are opposites."}


def test_system_prompts():
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    row = {"system": "Be brief.", "conversations": turns}
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    assert to_messages(row) == expected
    assert to_messages({"messages": expected}) == expected
    assert to_messages({"prompt": expected[:2], "completion": "Hello"}) == expected


# ---- tokenizing: the trained tokens are the assistant's ----

def trained_runs(tok, sample):
    """Decode each run of trained tokens: token t is trained when labels[t - 1] is not ignored."""
    trained = [False] + [x != IGNORE_INDEX for x in sample["targets"][:-1].tolist()]
    return masked_runs(tok, sample["input_ids"].tolist(), trained)


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca", "prompt_completion"])
def test_trained_tokens_are_the_assistant_turns(files, fmt):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(shared("tokenizer_qwen3")))
    tok = qwen3()
    conversations = messages_of(files[fmt])
    ds = SFTDataset(files[fmt], tok, 4096, progress=False)
    assert len(ds) == len(conversations) and ds.stats["truncated"] == 0
    for i in range(0, len(ds), 7):
        messages, sample = conversations[i], ds[i]
        ids, labels = sample["input_ids"], sample["targets"]
        rendered = reference.apply_chat_template(messages, tokenize=False)
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == rendered
        # Labels are the next token, where that token is trained.
        assert labels[-1] == IGNORE_INDEX
        trained = labels[:-1] != IGNORE_INDEX
        assert (labels[:-1][trained] == ids[1:][trained]).all()
        # Each assistant turn with its <|im_end|>, the final one after Qwen3's empty think block, and nothing else.
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        expected = [r + "<|im_end|>" for r in replies[:-1]] + [THINK + replies[-1].lstrip("\n") + "<|im_end|>"]
        runs = trained_runs(tok, sample)
        assert runs == expected
        cursor = 0
        for run in runs:  # in transformers' rendering, in order
            cursor = rendered.index(run, cursor) + len(run)


def test_train_on_all(files):
    ds = SFTDataset(files["alpaca"], qwen3(), 4096, train_on="all", progress=False)
    for i in range(len(ds)):
        ids, labels = ds[i]["input_ids"], ds[i]["targets"]
        assert labels[:-1].tolist() == ids[1:].tolist() and labels[-1] == IGNORE_INDEX
    assert ds.stats["trainable_tokens"] == ds.stats["tokens"] - len(ds)


def test_format_example_marks_the_trained_tokens(files):
    tok = qwen3()
    ds = SFTDataset(files["sharegpt"], tok, 4096, progress=False)
    text = format_example(tok, ds[0])
    assert "[[I am Vicuna, a language model" in text and "(LMSYS).<|im_end|>]]" in text
    assert text.count("[[") == 2 and "[[<think>" in text
    plain = text.replace("[[", "").replace("]]", "")
    assert plain == tok.decode(ds[0]["input_ids"].tolist(), skip_special_tokens=False)


# ---- bad rows ----

GOOD = {"prompt": "What is 2 + 2?", "completion": "4"}
BAD_ROWS = {
    "invalid_json": b'{"prompt": "unterminated", "completion": \n',
    "not_utf8": b'{"prompt": "caf\xe9", "completion": "ok"}\n',
    "missing_fields": b'{"question": "What is 2 + 2?", "answer": "4"}\n',
    "missing_completion": b'{"prompt": "What is 2 + 2?"}\n',
    "content_not_string": b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 4}]}\n',
    "unknown_role": b'{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}\n',
    "unknown_sharegpt_role": b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}\n',
    "empty_assistant": b'{"prompt": "hi", "completion": "  \\n"}\n',
    "no_assistant": b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}\n',
    "assistant_first": b'{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}\n',
    "two_users": (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
                  b'{"role": "assistant", "content": "c"}]}\n'),
    "ends_with_user": (b'{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, '
                       b'{"from": "human", "value": "c"}]}\n'),
}
REASON = {"missing_completion": "missing_fields", "content_not_string": "missing_fields",
          "unknown_sharegpt_role": "unknown_role", "assistant_first": "bad_order", "two_users": "bad_order",
          "ends_with_user": "bad_order"}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_row_raises_naming_file_and_line(tmp_path, kind):
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n\n").encode() + BAD_ROWS[kind] + (json.dumps(GOOD) + "\n").encode())
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ")):
        SFTDataset(path, qwen3(), 256, progress=False)


def test_bad_rows_in_json_and_parquet_name_the_row(tmp_path):
    bad = {"messages": [{"role": "assistant", "content": "first"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, bad]))
    with pytest.raises(ValueError, match=re.escape(f"{path}[2]: ")):
        SFTDataset(path, qwen3(), 256, progress=False)
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "hi", "completion": ""}, GOOD]), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}[1]: assistant turn 1 is empty")):
        SFTDataset(path, qwen3(), 256, progress=False)
    # A .json file that is not one list of rows fails as a whole.
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"data": [GOOD]}))
    with pytest.raises(ValueError, match="one list of rows"):
        SFTDataset(path, qwen3(), 256, progress=False)


def test_skipped_rows_are_counted_by_reason(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join([(json.dumps(GOOD) + "\n").encode(), *BAD_ROWS.values(),
                               (json.dumps(GOOD) + "\n").encode()]))
    ds = SFTDataset(path, qwen3(), 256, on_bad_row="skip", progress=False)
    assert len(ds) == 2
    assert ds.stats["rows"] == len(BAD_ROWS) + 2
    assert ds.stats["skipped"] == dict(Counter(REASON.get(k, k) for k in BAD_ROWS))
    assert "skipped" in ds.summary()


# ---- length: truncate or drop ----

def test_truncate_and_drop(files, tmp_path):
    tok, max_len = qwen3(), 160
    full = [tokenize_conversation(tok, m) for m in messages_of(files["prompt_completion"])]
    too_long = [i for i, (ids, _) in enumerate(full) if len(ids) > max_len]
    assert 0 < len(too_long) < len(full)

    dropped = SFTDataset(files["prompt_completion"], tok, max_len, overlong="drop", progress=False)
    assert dropped.stats["dropped"] == {"too_long": len(too_long)} and dropped.stats["truncated"] == 0
    assert len(dropped) == len(full) - len(too_long)

    truncated = SFTDataset(files["prompt_completion"], tok, max_len, progress=False)
    assert truncated.stats["truncated"] == len(too_long) and truncated.stats["dropped"] == {}
    for i, (ids, labels) in enumerate(full):
        assert truncated[i]["input_ids"].tolist() == ids[:max_len].tolist()
        # The last label of a truncated sample is the next token of the full conversation.
        assert truncated[i]["targets"].tolist() == labels[:max_len].tolist()
    assert truncated.lengths.max() == max_len

    # A prompt longer than max_seq_len leaves nothing to train on after truncation.
    path = write_jsonl(tmp_path / "long_prompt.jsonl", [{"prompt": "word " * 400, "completion": "ok"}, GOOD])
    ds = SFTDataset(path, tok, max_len, progress=False)
    assert len(ds) == 1 and ds.stats["dropped"] == {"no_trainable": 1} and ds.stats["truncated"] == 1


# ---- batching ----

@pytest.fixture(scope="module")
def small(files, tmp_path_factory):
    """The first 40 ShareGPT conversations (20 to 230 tokens), so that several fit in a packed row."""
    rows = json.loads(files["sharegpt"].read_text())[:40]
    path = tmp_path_factory.mktemp("small") / "small.json"
    path.write_text(json.dumps(rows))
    return SFTDataset(path, qwen3(), 256, progress=False)


def test_first_fit_matches_the_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 65, size=int(rng.integers(1, 80))).tolist()
        bins, free = [], []  # the definition, in O(n * bins)
        for i, n in enumerate(lengths):
            b = next((b for b, f in enumerate(free) if f >= n), len(bins))
            if b == len(bins):
                bins.append([])
                free.append(64)
            bins[b].append(i)
            free[b] -= n
        assert first_fit(lengths, 64) == bins


def documents(batch):
    """Each packed document of a batch: (input_ids, labels, position_ids) as lists."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        doc_ids = batch["document_ids"][b]
        for d in range(int(doc_ids.max()) + 1):
            sel = doc_ids == d
            out.append(tuple(batch[k][b][sel].tolist() for k in ("input_ids", "targets", "position_ids")))
    return out


def test_packing_serves_every_sample_once_per_epoch(small):
    batches = ChatBatches(small, batch_size=1, pack=True, seed=3)
    rows = [batches.next_batch() for _ in range(batches.batches_per_epoch())]
    assert batches.schedule.epoch == 0
    docs = []
    for batch in rows:
        assert batch["input_ids"].shape == (1, small.max_seq_len)
        doc_ids = batch["document_ids"][0]
        n_docs = int(doc_ids.max()) + 1
        # Documents are contiguous, numbered in order, and padding (-1) only at the end.
        assert (doc_ids[: (doc_ids >= 0).sum()] == torch.repeat_interleave(
            torch.arange(n_docs), torch.bincount(doc_ids[doc_ids >= 0]))).all()
        assert (batch["targets"][0][doc_ids < 0] == IGNORE_INDEX).all()
        assert (batch["input_ids"][0][doc_ids < 0] == small.pad_id).all()
        docs += documents(batch)
    for ids, labels, positions in docs:
        assert positions == list(range(len(ids)))  # positions restart in each document
    expected = [(small[i]["input_ids"].tolist(), small[i]["targets"].tolist()) for i in range(len(small))]
    assert sorted((ids, labels) for ids, labels, _ in docs) == sorted(expected)
    # Packing packed: several samples share a row.
    assert len(rows) < len(small) / 2


def loss(model, batches):
    """Sum of cross-entropy over the trained tokens / their number; ids folded into the tiny vocabulary."""
    total, count = 0.0, 0
    for batch in batches:
        vocab = model.config.vocab_size
        labels = torch.where(batch["targets"] == IGNORE_INDEX, IGNORE_INDEX, batch["targets"] % vocab)
        mask = document_mask(batch["document_ids"]) if "document_ids" in batch else None
        logits = model(batch["input_ids"] % vocab, position_ids=batch["position_ids"], attn_mask=mask)
        total += cross_entropy_sum(logits, labels).item()
        count += num_targets(batch)
    return total / count


def test_packed_and_unpacked_give_the_same_loss(small):
    model = GPT(ModelConfig.preset("tiny-qwen3"))
    model.init_weights(seed=1, std=0.5)  # large weights: far from uniform logits, so a wrong mask shows
    with torch.no_grad():
        unpacked = loss(model, ChatBatches(small, batch_size=4).iter_eval())
        packed = loss(model, ChatBatches(small, batch_size=2, pack=True).iter_eval())
        # Without the document mask, packed samples would see each other.
        batch = next(ChatBatches(small, batch_size=2, pack=True).iter_eval())
        no_mask = loss(model, [{k: v for k, v in batch.items() if k != "document_ids"}])
        with_mask = loss(model, [batch])
    assert packed == pytest.approx(unpacked, rel=1e-5)
    assert no_mask != pytest.approx(with_mask, rel=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_the_dense_mask(small):
    # FlexAttention runs on CPU without gradients (unfused, slow), enough to check the mask.
    model = GPT(ModelConfig.preset("tiny-qwen3"))
    model.init_weights(seed=1, std=0.5)
    batch = next(ChatBatches(small, batch_size=2, pack=True).iter_eval())
    ids, pos = batch["input_ids"] % model.config.vocab_size, batch["position_ids"]
    with torch.no_grad():
        dense = model(ids, position_ids=pos, attn_mask=document_mask(batch["document_ids"]))
        flex = model(ids, position_ids=pos, attn_mask=document_block_mask(batch["document_ids"]))
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)  # a wrong mask moves logits by ~1


@pytest.mark.parametrize("pack", [False, True])
def test_batches_are_deterministic_and_resume_exactly(small, pack):
    def make(seed=0):
        return ChatBatches(small, batch_size=2, pack=pack, seed=seed)

    per_epoch = make().batches_per_epoch()
    n = 2 * per_epoch + 1  # crosses two epoch boundaries
    first, again = make(), make()
    run = [first.next_batch() for _ in range(n)]
    for expected in run:
        batch = again.next_batch()
        assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert first.schedule.epoch == 2
    # Each epoch, and each seed, is a new order.
    assert not all(torch.equal(run[i]["input_ids"], run[per_epoch + i]["input_ids"]) for i in range(per_epoch))
    other = make(seed=1)
    assert not all(torch.equal(other.next_batch()["input_ids"], run[i]["input_ids"]) for i in range(per_epoch))

    for stop in (1, per_epoch, per_epoch + 1):
        interrupted = make()
        for _ in range(stop):
            interrupted.next_batch()
        state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
        resumed = ChatBatches(small, batch_size=2, pack=pack, seed=123)  # the saved seed wins
        resumed.load_state_dict(state)
        for i in range(stop, n):
            batch = resumed.next_batch()
            assert batch.keys() == run[i].keys()
            assert all(torch.equal(batch[k], run[i][k]) for k in batch)


@pytest.mark.parametrize("pack", [False, True])
def test_ranks_split_the_global_batch(small, pack):
    whole = ChatBatches(small, batch_size=4, pack=pack, seed=5)
    ranks = [ChatBatches(small, batch_size=2, rank=r, world_size=2, pack=pack, seed=5) for r in range(2)]
    for _ in range(2 * whole.batches_per_epoch() + 1):
        expected = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        if pack:
            for k in expected:
                assert torch.equal(torch.cat([p[k] for p in parts]), expected[k])
        else:
            rows = [unpadded(p, b) for p in parts for b in range(2)]
            assert rows == [unpadded(expected, b) for b in range(4)]
        assert sum(num_targets(p) for p in parts) == num_targets(expected)
    assert ranks[0].state_dict() == whole.state_dict()


@pytest.mark.parametrize("pack", [False, True])
def test_eval_covers_every_sample_on_every_rank_count(small, pack):
    for world in (1, 2, 3):
        served, trained = [], 0
        for rank in range(world):
            batches = ChatBatches(small, batch_size=3, rank=rank, world_size=world, pack=pack)
            before = batches.state_dict()
            evals = list(batches.iter_eval())
            assert batches.state_dict() == before
            units = len(first_fit(small.lengths.tolist(), small.max_seq_len)) if pack else len(small)
            assert len(evals) == -(-units // (3 * world))  # the same number on every rank
            for batch in evals:
                assert batch["input_ids"].shape[0] == 3
                trained += num_targets(batch)
                if pack:
                    served += [ids for ids, _, _ in documents(batch)]
                else:
                    served += [ids for b in range(3) if (ids := unpadded(batch, b)[0])]
        assert sorted(served) == sorted(small[i]["input_ids"].tolist() for i in range(len(small)))
        assert trained == small.stats["trainable_tokens"]


def test_too_small_for_one_global_batch(small):
    with pytest.raises(ValueError, match="global batch"):
        ChatBatches(small, batch_size=len(small), world_size=2)
