"""Token data under faults (issue 12): a damaged meta.json, a token id beyond the model's vocabulary and a
corrupt .gz input are errors naming the file (and key, line or shard); preparing again never damages the
dataset already there: it is byte for byte intact after a failure, and replaced only when the new one is
complete."""

import errno
import gzip
import json
import re

import numpy as np
import pytest

from tests.conftest import ROOT
from train import corpus
from train.batching import TokenWindows
from train.corpus import load_meta, prepare

TEXT = (ROOT / "train" / "assets" / "tinyshakespeare.txt").read_text()[:20_000]


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def jsonl(path, docs, gz=False):
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    if gz:
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


def make_dataset(tmp_path, name="data"):
    src = jsonl(tmp_path / f"{name}.jsonl", TEXT.split("\n\n"))
    out = tmp_path / name
    meta = prepare([src], out, vocab_size=300, val_fraction=0.1, workers=1, progress=False)
    return out, meta


@pytest.mark.parametrize("content, message", [
    ("", "meta.json: empty file"),
    ('{"format_version": 1,\n "dtype": "uint16", "shards": {"train": [',
     r"meta.json: invalid JSON at line 2, column \d+"),
    ('{"format_version": 1, "dtype": "uint16", "vocab_size": 300}', "meta.json: missing key 'shards'"),
    ('{"format_version": 1, "dtype": "int8", "vocab_size": 300, "shards": {}}', "meta.json: dtype 'int8'"),
    ('{"format_version": 1, "dtype": "uint16", "vocab_size": 300, "shards": {"train": [{"file": "x.bin"}]}}',
     r"meta.json: shards.train\[0\] needs a file name and a token count"),
])
def test_damaged_meta_json_is_named(tmp_path, content, message):
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + r"[/\\]" + message):
        load_meta(tmp_path)
    with pytest.raises(ValueError, match=message):
        TokenWindows(tmp_path, "train", 8, 2)


def test_token_ids_beyond_the_vocabulary_are_named_at_load(tmp_path):
    out, meta = make_dataset(tmp_path)
    assert all(s["max_id"] == int(np.fromfile(out / s["file"], "<u2").max()) for s in meta["shards"]["train"])
    TokenWindows(out, "train", 16, 2, vocab_size=meta["vocab_size"])  # fits
    with pytest.raises(ValueError, match=re.escape(str(out / "train_00000.bin")) + r": token id \d+ is outside the "
                                         r"model's vocabulary \(vocab_size 200\); the data was made with a larger "
                                         r"tokenizer"):
        TokenWindows(out, "train", 16, 2, vocab_size=200)

    # Shards without a recorded max_id (written by another tool) are read once to find it.
    hand = tmp_path / "hand"
    hand.mkdir()
    np.arange(100, dtype="<u2").tofile(hand / "train_00000.bin")
    np.array([5] * 50 + [4000] + [6] * 49, dtype="<u2").tofile(hand / "train_00001.bin")
    shards = [{"file": f"train_0000{k}.bin", "tokens": 100} for k in range(2)]
    (hand / "meta.json").write_text(json.dumps({"format_version": 1, "dtype": "uint16", "vocab_size": 300,
                                                "shards": {"train": shards}}))
    with pytest.raises(ValueError, match=re.escape(str(hand / "train_00001.bin")) + r": token id 4000 is outside "
                                         r"the model's vocabulary \(vocab_size 300\); .*says vocab_size 300: the "
                                         r"shard is damaged"):
        TokenWindows(hand, "train", 8, 2, vocab_size=300)
    TokenWindows(hand, "train", 8, 2, vocab_size=4001)


@pytest.mark.parametrize("tokenizer", ["given", "trained"])
def test_corrupt_gzip_input_is_named(tmp_path, tokenizer):
    good = jsonl(tmp_path / "good.jsonl.gz", ["one document", "another"] * 50, gz=True)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:-30])
    tok_dir = None
    if tokenizer == "given":
        tok_dir = make_dataset(tmp_path, "base")[0] / "tokenizer"
    with pytest.raises(ValueError, match=re.escape(f"{cut}: corrupt or truncated gzip file")):
        prepare([good, cut], tmp_path / "out", tokenizer_dir=tok_dir, vocab_size=300, workers=1, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_failed_prepare_leaves_the_dataset_as_it_was(tmp_path):
    out, _ = make_dataset(tmp_path)
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "fine too"}) + "\n{not json\n")
    for tokenizer_dir in (None, out / "tokenizer"):  # a new tokenizer, or the dataset's own
        with pytest.raises(ValueError, match=re.escape(f"{bad}:3: invalid JSON")):
            prepare([bad], out, tokenizer_dir=tokenizer_dir, vocab_size=300, workers=1, progress=False)
        assert snapshot(out) == before
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        load_meta(out)

    # A good prepare replaces it whole, its own tokenizer included, and leaves nothing beside it.
    new = jsonl(tmp_path / "new.jsonl", ["a new corpus, entirely different"] * 40)
    meta = prepare([new], out, tokenizer_dir=out / "tokenizer", val_fraction=0.1, workers=1, progress=False)
    assert meta["tokenizer"] == str((out / "tokenizer").resolve()) and (out / "tokenizer" / "tokenizer.json").is_file()
    assert load_meta(out) == meta and snapshot(out) != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_refuses_a_folder_holding_other_files(tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    src = jsonl(tmp_path / "src.jsonl", ["doc"] * 20)
    with pytest.raises(ValueError, match=re.escape(f"--out {out} holds files that are not part of a token dataset "
                                                   "(notes.txt)")):
        prepare([src], out, vocab_size=300, workers=1, progress=False)
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_a_prepare_killed_mid_swap_gets_the_old_dataset_back(tmp_path):
    out, _ = make_dataset(tmp_path)
    before = snapshot(out)
    # What a kill between the swap's two renames leaves: the old dataset moved aside, the new one beside it.
    out.rename(tmp_path / ".data.old")
    (tmp_path / ".data.tmp").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"the previous dataset is in {tmp_path / '.data.old'}")):
        load_meta(out)
    bad = jsonl(tmp_path / "bad.jsonl", [])
    with pytest.raises(ValueError, match="no documents"):  # the next prepare first puts it back, then fails
        prepare([bad], out, vocab_size=300, workers=1, progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failed_swap_puts_the_old_dataset_back(tmp_path, monkeypatch):
    out, _ = make_dataset(tmp_path)
    before = snapshot(out)
    real_replace = corpus.os.replace

    def second_rename_fails(a, b):
        if str(a).endswith(".data.tmp"):
            raise OSError(errno.EXDEV, "simulated failure of the second rename")
        real_replace(a, b)

    monkeypatch.setattr(corpus.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="simulated"):
        prepare([jsonl(tmp_path / "src.jsonl", ["another corpus"] * 40)], out, vocab_size=300, workers=1,
                progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
