"""train/corpus.py and train/batching.py's TokenWindows: shards equal transformers' tokenization, the trained tokenizer loads in
transformers, and the loader is deterministic, rank-invariant and resumable."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import shared
from train import corpus as data
from train.batching import TokenWindows
from train.corpus import load_meta, prepare

transformers = pytest.importorskip("transformers")

GPT2 = shared("tokenizer_gpt2")  # shipped in tests/assets/
SHAKESPEARE = Path(__file__).resolve().parents[1] / "train" / "assets" / "tinyshakespeare.txt"
needs_gpt2 = pytest.mark.skipif(not GPT2.is_dir(), reason="needs the GPT-2 tokenizer in shared/data")

DOCS = [
    "First document, from a text file.\nIt has two lines.",
    "Hello world.",
    "Ünïcödé, emoji 🙂 and  double  spaces\ttabs",
    "  leading spaces and a trailing newline\n",
    "gzip'd one",
    "gzip'd two: 12345 numbers",
    "from parquet",
    "from parquet, again",
]


@pytest.fixture(scope="module")
def gpt2():
    return transformers.AutoTokenizer.from_pretrained(GPT2)


def reference_ids(tokenizer, docs):
    """What the shards must hold: each document's ids from transformers, then EOS."""
    ids = []
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def read_split(out_dir, meta, split):
    files = [np.fromfile(Path(out_dir) / s["file"], dtype="<u2") for s in meta["shards"][split]]
    return np.concatenate(files).tolist() if files else []


def write_inputs(tmp_path):
    """One of each input type holding DOCS in order, with the noise the readers must skip."""
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": DOCS[1], "id": 1}) + "\n\n")  # a blank line in between
        f.write(json.dumps({"text": DOCS[2]}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": DOCS[3]}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")  # empty documents are skipped
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": DOCS[4]}) + "\n" + json.dumps({"text": DOCS[5]}) + "\n")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [DOCS[6], None, DOCS[7]], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    return [tmp_path / name for name in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet")]


# ----------------------------------------------------------------------------- prepare

@needs_gpt2
def test_prepare_matches_transformers_tokenization(tmp_path, gpt2):
    inputs = write_inputs(tmp_path)
    out = tmp_path / "out"
    meta = prepare(inputs, out, tokenizer_dir=GPT2, val_fraction=0, workers=1, shard_tokens=7, progress=False)

    assert read_split(out, meta, "train") == reference_ids(gpt2, DOCS)
    assert meta["dtype"] == "uint16"  # 50257 ids fit
    assert meta["vocab_size"] == 50257 and meta["eos_id"] == 50256
    assert meta["num_docs"] == len(DOCS) and meta["format_version"] == 1
    assert meta["tokenizer"] == str(GPT2.resolve())
    assert meta["shards"]["val"] == []
    sizes = [s["tokens"] for s in meta["shards"]["train"]]
    assert sizes[:-1] == [7] * (len(sizes) - 1) and 0 < sizes[-1] <= 7
    assert [s["file"] for s in meta["shards"]["train"]][:2] == ["train_00000.bin", "train_00001.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert not list(out.glob("*.tmp"))


@needs_gpt2
def test_validation_split_by_documents(tmp_path, gpt2):
    docs = [f"document number {i} says {'hello ' * i}" for i in range(10)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    meta = prepare([path], tmp_path / "out", tokenizer_dir=GPT2, text_field="body", val_fraction=0.2,
                   workers=1, progress=False)
    # Every fifth document is held out.
    assert read_split(tmp_path / "out", meta, "val") == reference_ids(gpt2, [docs[4], docs[9]])
    train_docs = [d for i, d in enumerate(docs) if i not in (4, 9)]
    assert read_split(tmp_path / "out", meta, "train") == reference_ids(gpt2, train_docs)


@needs_gpt2
def test_worker_processes_write_the_same_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_CHARS", 100)  # many small chunks, so the pool path runs
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + "lorem ipsum " * (i % 7)}) + "\n" for i in range(300)))
    shards = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        meta = prepare([path], out, tokenizer_dir=GPT2, val_fraction=0.05, workers=workers, shard_tokens=500,
                       progress=False)
        shards[workers] = (meta["shards"], {p.name: p.read_bytes() for p in out.glob("*.bin")})
    assert shards[1] == shards[2]


def test_trained_bpe_tokenizer_on_shakespeare(tmp_path):
    out = tmp_path / "out"
    # Small shards, so the held-out tail is taken from several of them.
    meta = prepare([SHAKESPEARE], out, val_fraction=0.01, vocab_size=512, workers=1, shard_tokens=2000,
                   progress=False)
    assert len(meta["shards"]["val"]) == 3 and meta["shards"]["val"][-1]["tokens"] < 2000
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["num_docs"] == 1
    assert meta["tokenizer"] == str((out / "tokenizer").resolve())

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer" / "tokenizer.json"))
    eos = hf.convert_tokens_to_ids("<|endoftext|>")
    assert meta["eos_id"] == eos
    text = SHAKESPEARE.read_text(encoding="utf-8")
    expected = hf(text)["input_ids"] + [eos]
    train, val = read_split(out, meta, "train"), read_split(out, meta, "val")
    # One document: the last 1% of the token stream is the validation split.
    assert train + val == expected
    assert len(val) == int(len(expected) * 0.01)
    assert hf.decode(expected[:-1]) == text

    # The directory is a complete HF tokenizer, ready to copy into an exported checkpoint.
    auto = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == eos
    assert auto("First Citizen:")["input_ids"] == hf("First Citizen:")["input_ids"]


@needs_gpt2
def test_command_line(tmp_path, gpt2):
    path = tmp_path / "a.txt"
    path.write_text("To be, or not to be")
    data.main(["prepare", "--input", str(path), "--out", str(tmp_path / "out"), "--tokenizer", str(GPT2),
               "--workers", "1", "--val_fraction", "0"])
    meta = load_meta(tmp_path / "out")
    assert read_split(tmp_path / "out", meta, "train") == reference_ids(gpt2, ["To be, or not to be"])


@needs_gpt2
def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare([path], tmp_path / "out", tokenizer_dir=GPT2, workers=1, progress=False)
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / "meta.json").exists()


@needs_gpt2
def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no field 'text'"):
        prepare([path], tmp_path / "out", tokenizer_dir=GPT2, workers=1, progress=False)


def test_missing_parquet_column_is_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text'"):
        prepare([tmp_path / "d.parquet"], tmp_path / "out", tokenizer_dir=GPT2, workers=1, progress=False)


@pytest.mark.parametrize("tokenizer_dir", [GPT2, None], ids=["given_tokenizer", "trained_tokenizer"])
def test_empty_corpus_names_the_inputs(tmp_path, tokenizer_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('\n{"text": ""}\n')
    with pytest.raises(ValueError, match=r"no documents.*empty\.txt.*blank\.jsonl"):
        prepare([tmp_path / "empty.txt", tmp_path / "blank.jsonl"], tmp_path / "out", tokenizer_dir=tokenizer_dir,
                workers=1, progress=False)


def test_missing_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        prepare([tmp_path / "nope.jsonl"], tmp_path / "out", tokenizer_dir=GPT2, progress=False)


# ----------------------------------------------------------------------------- loader

def write_shards(data_dir, train_sizes, val_sizes=(100,)):
    """Hand-written shards in the documented format. Shard k holds k*1000, k*1000 + 1, ..., so a
    window's tokens tell which shard and offset it came from."""
    data_dir.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        shards[split] = []
        for k, size in enumerate(sizes):
            name = f"{split}_{k:05d}.bin"
            (np.arange(size) + k * 1000).astype("<u2").tofile(data_dir / name)
            shards[split].append({"file": name, "tokens": size})
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": 65535, "eos_id": 0, "tokenizer": None,
            "num_docs": 1, "shards": shards}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


def take(loader, n):
    """n batches as (input_ids, targets) pairs."""
    return [(b["input_ids"], b["targets"]) for b in (loader.next_batch() for _ in range(n))]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_windows_are_whole_and_never_cross_shards(tmp_path):
    write_shards(tmp_path, train_sizes=[21, 10, 3])  # 5 + 2 + 0 windows of seq_len 4
    loader = TokenWindows(tmp_path, "train", seq_len=4, batch_size=1)
    assert loader.num_windows == 7 and loader.tokens == 34
    starts = set()
    for x, y in take(loader, 7):
        assert x.shape == y.shape == (1, 4) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[0, 1:], y[0, :-1])
        assert torch.equal(y[0], x[0] + 1)  # consecutive tokens of one shard
        starts.add(int(x[0, 0]))
    assert starts == {0, 4, 8, 12, 16, 1000, 1004}  # one epoch visits every window once


def test_same_seed_same_batches(tmp_path):
    write_shards(tmp_path, train_sizes=[400, 300])
    batches = [take(TokenWindows(tmp_path, "train", 8, 3, seed=seed), 30) for seed in (0, 0, 1)]
    assert_same(batches[0], batches[1])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches[0], batches[2]))


def test_ranks_partition_the_global_batch(tmp_path):
    write_shards(tmp_path, train_sizes=[250, 200])  # 56 windows: 14 global batches of 4 per epoch
    single = take(TokenWindows(tmp_path, "train", 8, batch_size=4), 40)  # crosses two epoch ends
    ranks = [take(TokenWindows(tmp_path, "train", 8, batch_size=2, rank=r, world_size=2), 40) for r in (0, 1)]
    joined = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*ranks)]
    assert_same(single, joined)


def test_resume_continues_exactly(tmp_path):
    write_shards(tmp_path, train_sizes=[250, 200])
    uninterrupted = take(TokenWindows(tmp_path, "train", 8, 4, seed=3), 25)

    first = TokenWindows(tmp_path, "train", 8, 4, seed=3)
    take(first, 12)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints survive any checkpoint format
    assert state == {"epoch": 0, "position": 48, "seed": 3}

    resumed = TokenWindows(tmp_path, "train", 8, 4, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    assert_same(take(resumed, 13), uninterrupted[12:])

    # The same global batch on two ranks continues the same stream.
    ranks = [TokenWindows(tmp_path, "train", 8, 2, rank=r, world_size=2) for r in (0, 1)]
    for loader in ranks:
        loader.load_state_dict(state)
    batches = [take(loader, 13) for loader in ranks]
    joined = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*batches)]
    assert_same(joined, uninterrupted[12:])


def test_eval_batches_are_in_order_and_leave_state_alone(tmp_path):
    write_shards(tmp_path, train_sizes=[100], val_sizes=[41])  # 10 windows of seq_len 4
    loader = TokenWindows(tmp_path, "val", 4, batch_size=2, rank=1, world_size=2)
    batches = [(b["input_ids"], b["targets"]) for b in loader.iter_eval()]
    assert len(batches) == 2  # 10 windows // global batch 4
    assert batches[0][0][:, 0].tolist() == [8, 12]  # rank 1 of global batch 0: windows 2 and 3
    assert batches[1][0][:, 0].tolist() == [24, 28]
    assert len(list(loader.iter_eval(max_batches=1))) == 1
    assert loader.state_dict() == {"epoch": 0, "position": 0, "seed": 0}


def test_truncated_shard_is_named(tmp_path):
    write_shards(tmp_path, train_sizes=[100, 100])
    with open(tmp_path / "train_00001.bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(ValueError, match=r"train_00001\.bin: 150 bytes.*100 uint16 tokens"):
        TokenWindows(tmp_path, "train", 8, 2)
    (tmp_path / "train_00001.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_00001\.bin"):
        TokenWindows(tmp_path, "train", 8, 2)


def test_too_small_split_is_explained(tmp_path):
    write_shards(tmp_path, train_sizes=[1000], val_sizes=[30])
    with pytest.raises(ValueError, match=r"'val' split .* 30 tokens .* needs 8 windows"):
        TokenWindows(tmp_path, "val", seq_len=16, batch_size=4, world_size=2)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenWindows(tmp_path / "nowhere", "train", 8, 2)
