"""Corpus preparation, offline: text files -> a tokenizer (trained here if none is given) -> token
shards on disk. Prepare once; every pretraining run then memory-maps the shards (train/batching.py's
TokenWindows):

    python -m train.corpus prepare --input train/assets/tinyshakespeare.txt --out data/shakespeare --vocab_size 4096
    python -m train.corpus prepare --input a.jsonl.gz b.parquet --out data/web \
        --tokenizer /path/to/hf_tokenizer_dir --workers 8

Inputs: .txt (the whole file is one document), .jsonl / .jsonl.gz and .parquet (one document per
record, read from --text_field). Every document becomes `encode(doc) + [eos]`; any BOS comes from
the tokenizer's own post-processor. Without --tokenizer, a byte-level BPE tokenizer is trained
on the inputs and saved in Hugging Face layout to DIR/tokenizer/.

On disk, DIR holds raw little-endian token shards `train_00000.bin`, ..., `val_00000.bin` (uint16
when every id fits, else uint32) and `meta.json`:
    {"format_version": 1, "dtype": "uint16", "vocab_size": 50257, "eos_id": 50256,
     "tokenizer": "/abs/path/to/tokenizer_dir", "num_docs": 3,
     "shards": {"train": [{"file": "train_00000.bin", "tokens": 1234, "max_id": 50256}], "val": [...]}}
meta.json is written last, so a directory with a meta.json is complete; the whole folder is written
beside DIR and swapped in only then, so preparing again never damages the dataset already there.

Validation split: every 1/val_fraction-th document goes to val (spread over the whole corpus, so
val covers every input rather than only the last file). When the corpus has too few documents
for that (one big text file), the last val_fraction of the token stream goes to val instead.

Deliberately left out: documents are not packed with attention masks (training windows run across
EOS, as in GPT-2 and nanoGPT); no deduplication, filtering or remote streaming.
"""

import argparse
import collections
import gzip
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model.files import read_json

FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"  # the special token of tokenizers that prepare trains itself
CHUNK_CHARS = 1 << 20  # text per worker task: big enough to amortise IPC, small enough to stream


# ----------------------------------------------------------------------------- reading documents

def iter_documents(inputs, text_field="text"):
    """Yield each non-empty document (a str) of the input files, in order."""
    for path in map(Path, inputs):
        name = path.name.lower()
        if name.endswith(".txt"):
            yield from _read_txt(path)
        elif name.endswith((".jsonl", ".jsonl.gz")):
            yield from _read_jsonl(path, text_field)
        elif name.endswith(".parquet"):
            yield from _read_parquet(path, text_field)
        else:
            raise ValueError(f"{path}: unsupported input type (use .txt, .jsonl, .jsonl.gz or .parquet)")


def _read_txt(path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from None
    if text:
        yield text


def _read_jsonl(path, text_field):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(_lines(f, path), start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark is not text
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{line_no}: no field {text_field!r} (found {keys}); set --text_field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: field {text_field!r} is {type(text).__name__}, not a string")
            if text:
                yield text


def _lines(f, path):
    """The lines of an open (maybe gzip'd) file; a corrupt or truncated .gz is an error naming it."""
    try:
        yield from f
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise ValueError(f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e})") from None


def _read_parquet(path, text_field):
    try:
        import pyarrow.parquet as pq  # optional: only parquet inputs need it
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"{path}: no column {text_field!r} (found {columns}); set --text_field")
    batches = parquet.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: corrupt parquet file ({e})") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            if text:  # nulls and empty strings carry no text
                yield text


def _chunks(documents):
    """Group documents into lists of about CHUNK_CHARS characters: one worker task each."""
    chunk, chars = [], 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- tokenizers

def load_tokenizer(tokenizer_dir):
    """The `tokenizers` object of a Hugging Face tokenizer directory and its end-of-text id
    (model/tokenizer.py reads the files; documents are separated by that id)."""
    from model.tokenizer import Tokenizer as ChatTokenizer

    tok = ChatTokenizer.from_dir(tokenizer_dir)
    if tok.eos_id is None:
        raise ValueError(f"{Path(tokenizer_dir) / 'tokenizer_config.json'}: no eos_token; documents must be "
                         "separated by an end-of-text token")
    return tok.backend, tok.eos_id


def train_tokenizer(inputs, out_dir, vocab_size, text_field="text"):
    """Train a GPT-2 style byte-level BPE tokenizer on the inputs; save it in HF layout to out_dir."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 bytes + {EOS_TOKEN}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The full byte alphabet makes every string encodable, whatever bytes the corpus lacked.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet, show_progress=False
    )
    num_docs = 0

    def counted(documents):
        nonlocal num_docs
        for doc in documents:
            num_docs += 1
            yield doc

    tokenizer.train_from_iterator(counted(iter_documents(inputs, text_field)), trainer)
    if num_docs == 0:
        raise _empty_corpus_error(inputs, text_field)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # What transformers' PreTrainedTokenizerFast reads, so the directory can ship with checkpoints.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def _encode_documents(tokenizer, docs, eos_id, dtype):
    """Tokenize a list of documents -> (all ids with eos after each document, tokens per document)."""
    encodings = tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
    ids = itertools.chain.from_iterable(e.ids + [eos_id] for e in encodings)
    return np.fromiter(ids, dtype, int(lengths.sum())), lengths


_worker = {}  # each worker process loads its own tokenizer once, in _worker_init


def _worker_init(tokenizer_file, eos_id, dtype):
    # The processes are the parallelism; tokenizers' own thread pool in each would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=Tokenizer.from_file(tokenizer_file), eos_id=eos_id, dtype=dtype)


def _worker_encode(docs):
    return _encode_documents(_worker["tokenizer"], docs, _worker["eos_id"], _worker["dtype"])


def _encode_stream(inputs, text_field, tokenizer, tokenizer_file, eos_id, dtype, workers):
    """Yield (ids, lengths) per chunk of documents, in input order."""
    chunks = _chunks(iter_documents(inputs, text_field))
    first_two = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(first_two, chunks)
    if workers <= 1 or len(first_two) < 2:
        # In this process (tokenizers still uses its own threads): a pool takes seconds to start,
        # more than a one-chunk corpus such as tiny shakespeare takes to encode.
        for docs in chunks:
            yield _encode_documents(tokenizer, docs, eos_id, dtype)
        return
    # Not fork: the pretraining loop calls prepare() with CUDA and threads already live. Not spawn
    # alone: every worker would import torch again. The fork server imports the heavy modules once.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["numpy", "tokenizers", "torch"])
    with context.Pool(workers, _worker_init, (str(tokenizer_file), eos_id, dtype)) as pool:
        pending = collections.deque()
        for docs in chunks:
            pending.append(pool.apply_async(_worker_encode, (docs,)))
            if len(pending) >= 2 * workers:  # bounded: a big corpus is never all in memory at once
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- writing shards

class _ShardWriter:
    """Appends tokens to DIR/{split}_00000.bin.tmp, ...; finish() renames them to their final names."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, np.dtype(dtype), shard_tokens
        self.sizes = []  # tokens in each shard so far; shards open lazily, so an empty split has none
        self.file = None

    @property
    def tokens(self):
        return sum(self.sizes)

    def _name(self, index):
        return f"{self.split}_{index:05d}.bin"

    def _tmp_path(self, index):
        return self.out_dir / (self._name(index) + ".tmp")

    def write(self, ids):
        while len(ids):
            if self.file is None or self.sizes[-1] == self.shard_tokens:
                self._close()
                self.sizes.append(0)
                self.file = open(self._tmp_path(len(self.sizes) - 1), "wb")
            n = min(len(ids), self.shard_tokens - self.sizes[-1])
            self.file.write(ids[:n].astype(self.dtype, copy=False).tobytes())
            self.sizes[-1] += n
            ids = ids[n:]

    def pop_tail(self, n):
        """Remove the last n tokens written and return them (for the token-level val split)."""
        self._close()
        pieces = []
        while n > 0:
            index = len(self.sizes) - 1
            take = min(n, self.sizes[index])
            keep = self.sizes[index] - take
            path = self._tmp_path(index)
            pieces.append(np.fromfile(path, self.dtype, count=take, offset=keep * self.dtype.itemsize))
            os.truncate(path, keep * self.dtype.itemsize)
            self.sizes[index] = keep
            n -= take
            if keep == 0:
                path.unlink()
                self.sizes.pop()
        return np.concatenate(pieces[::-1]) if pieces else np.zeros(0, self.dtype)

    def finish(self):
        """Rename the shards into place; their list for meta.json, with each shard's largest id (so a
        loader checks it against the model's vocabulary without reading the shard)."""
        self._close()
        max_ids = [max_token_id(np.memmap(self._tmp_path(i), self.dtype, mode="r")) if n else -1
                   for i, n in enumerate(self.sizes)]
        for index in range(len(self.sizes)):
            os.replace(self._tmp_path(index), self.out_dir / self._name(index))
        return [{"file": self._name(i), "tokens": tokens, "max_id": max_ids[i]} for i, tokens in enumerate(self.sizes)]

    def abort(self):
        self._close()
        for index in range(len(self.sizes)):
            self._tmp_path(index).unlink(missing_ok=True)

    def _close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def max_token_id(ids):
    """The largest id of a (memory-mapped) shard, read 64M tokens at a time; -1 when empty."""
    return max((int(ids[i:i + (1 << 26)].max()) for i in range(0, len(ids), 1 << 26)), default=-1)


def _empty_corpus_error(inputs, text_field):
    names = ", ".join(str(p) for p in inputs)
    return ValueError(f"no documents (no tokens) in the inputs: {names} (text field {text_field!r})")


def source_record(inputs, tokenizer_dir=None, text_field="text", val_fraction=0.005, vocab_size=4096) -> dict:
    """What a dataset was made from, kept in meta.json as "source": each input's file name and size, and
    how it was tokenized and split (names and sizes rather than paths, contents or times: cheap on a
    large corpus, and the same after the repository moves, a copy or a touch). A loop that finds a
    data.dir made from other inputs says so."""
    return {"inputs": [[Path(p).name, Path(p).stat().st_size] for p in inputs],
            "tokenizer": Path(tokenizer_dir).name if tokenizer_dir else f"trained, vocab {vocab_size}",
            "text_field": text_field, "val_fraction": val_fraction}


def source_mismatch(meta: dict, record: dict) -> str | None:
    """What differs between a dataset's recorded source and `record` (None when nothing does, or when
    the dataset predates the record)."""
    saved = meta.get("source")
    if saved is None:
        return None
    for key in record:
        if saved.get(key) != record[key]:
            return f"{key}: the folder has {saved.get(key)!r}, the config asks for {record[key]!r}"
    return None


def prepare(inputs, out_dir, tokenizer_dir=None, text_field="text", val_fraction=0.005, workers=None,
            shard_tokens=100_000_000, vocab_size=4096, progress=True):
    """Tokenize the input files into token shards and meta.json in out_dir; return the meta dict.

    Without tokenizer_dir, a byte-level BPE tokenizer of vocab_size is trained on the inputs
    first and saved to out_dir/tokenizer. workers=None uses every CPU; workers=1 stays in process.

    Nothing is lost: the dataset is written into a hidden folder beside out_dir (.NAME.tmp) and
    swapped in only once complete, as checkpoints are, so a failure (a bad row, a kill) leaves a
    dataset already in out_dir as it was. out_dir must hold nothing but a dataset (it is replaced
    whole). A prepare killed between the two renames of the swap leaves the previous dataset in
    .NAME.old; the next prepare puts it back first.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("prepare needs at least one input file")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        if not path.name.lower().endswith((".txt", ".jsonl", ".jsonl.gz", ".parquet")):
            raise ValueError(f"{path}: unsupported input type (use .txt, .jsonl, .jsonl.gz or .parquet)")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    workers = workers or os.cpu_count() or 1
    out_dir = Path(out_dir)
    work, old = _swap_dirs(out_dir)
    if not out_dir.exists() and (old / "meta.json").is_file():
        os.replace(old, out_dir)  # a prepare killed between the swap's renames: the previous dataset goes back
    _check_replaceable(out_dir)
    shutil.rmtree(work, ignore_errors=True)  # leftovers of an interrupted prepare
    shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        meta = _write_dataset(inputs, work, out_dir, tokenizer_dir, text_field, val_fraction, workers,
                              shard_tokens, vocab_size, progress,
                              source_record(inputs, tokenizer_dir, text_field, val_fraction, vocab_size))
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(work, out_dir)
    except BaseException:
        if not out_dir.exists() and old.exists():
            os.replace(old, out_dir)  # failed between the two renames: the previous dataset stays
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return meta


# The names a dataset folder holds; prepare refuses to replace a folder holding anything else.
_DATASET_NAME = re.compile(r"^(meta\.json|(train|val)_\d{5}\.bin|tokenizer)(\.tmp)?$")


def _swap_dirs(out_dir):
    """The hidden folders beside out_dir: the dataset being written, and the one being replaced."""
    return out_dir.with_name(f".{out_dir.name}.tmp"), out_dir.with_name(f".{out_dir.name}.old")


def _check_replaceable(out_dir):
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    foreign = sorted(p.name for p in out_dir.iterdir() if not _DATASET_NAME.match(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"--out {out_dir} holds files that are not part of a token dataset ({shown}); prepare "
                         "replaces the whole folder, so choose a new or empty one")


def _write_dataset(inputs, work, out_dir, tokenizer_dir, text_field, val_fraction, workers, shard_tokens,
                   vocab_size, progress, source):
    """prepare's work, into the folder `work`; meta.json names out_dir's tokenizer, where it will be."""
    final_tokenizer = None
    if tokenizer_dir is None:
        tokenizer_dir, final_tokenizer = work / "tokenizer", out_dir / "tokenizer"
        if progress:
            print(f"[prepare] training a byte-level BPE tokenizer, vocab {vocab_size}", file=sys.stderr)
        train_tokenizer(inputs, tokenizer_dir, vocab_size, text_field)
    elif Path(tokenizer_dir).resolve().is_relative_to(out_dir.resolve()):
        # The tokenizer of the dataset being replaced: copied, since the old folder goes away.
        final_tokenizer = Path(tokenizer_dir)
        tokenizer_dir = work / Path(tokenizer_dir).resolve().relative_to(out_dir.resolve())
        shutil.copytree(final_tokenizer, tokenizer_dir)
    tokenizer_dir = Path(tokenizer_dir).resolve()
    tokenizer, eos_id = load_tokenizer(tokenizer_dir)
    # One past the largest id, not the token count: some vocabularies have holes in their ids.
    vocab = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    dtype = "uint16" if vocab <= 65535 else "uint32"
    disk_dtype = np.dtype(dtype).newbyteorder("<")

    writers = {split: _ShardWriter(work, split, disk_dtype, shard_tokens) for split in ("train", "val")}
    num_docs, num_tokens = 0, 0
    start = last_report = time.time()
    stream = _encode_stream(inputs, text_field, tokenizer, tokenizer_dir / "tokenizer.json", eos_id,
                            disk_dtype, workers)
    try:
        for ids, lengths in stream:
            # Document d is val when d * val_fraction crosses an integer: exactly every
            # 1/val_fraction-th document, deterministic and spread over the whole corpus.
            doc = np.arange(num_docs, num_docs + len(lengths))
            is_val = np.floor((doc + 1) * val_fraction) > np.floor(doc * val_fraction)
            token_is_val = np.repeat(is_val, lengths)
            writers["train"].write(ids[~token_is_val])
            writers["val"].write(ids[token_is_val])
            num_docs += len(lengths)
            num_tokens += len(ids)
            if progress and time.time() - last_report >= (1.0 if sys.stderr.isatty() else 30.0):
                last_report = time.time()
                _report(num_docs, num_tokens, start, final=False)
        if num_docs == 0:
            raise _empty_corpus_error(inputs, text_field)
        if writers["val"].tokens == 0 and val_fraction > 0:
            # Too few documents to hold some out (one big .txt): hold out the end of the stream.
            tail = writers["train"].pop_tail(int(writers["train"].tokens * val_fraction))
            writers["val"].write(tail)
        shards = {split: writer.finish() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        stream.close()  # stops the worker pool now, not when the traceback is collected
    if progress:
        _report(num_docs, num_tokens, start, final=True)

    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": vocab,
        "eos_id": eos_id,
        "tokenizer": str((final_tokenizer or tokenizer_dir).resolve()),
        "num_docs": num_docs,
        "shards": shards,
        "source": source,
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _report(num_docs, num_tokens, start, final):
    rate = num_tokens / max(time.time() - start, 1e-9)
    # Rewrite one line on a terminal; in a log file, one line per report.
    end = "\n" if final or not sys.stderr.isatty() else ""
    print(f"\r[prepare] {num_docs:,} docs  {num_tokens:,} tokens  {rate:,.0f} tokens/s", end=end,
          file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reading shards

def load_meta(data_dir):
    """Read DIR/meta.json and check that every shard it lists is on disk with the right size. A meta.json
    that is empty, corrupt or missing a key is an error naming it and the key."""
    data_dir = Path(data_dir)
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        old = _swap_dirs(data_dir)[1]
        hint = (f" (a prepare was interrupted: the previous dataset is in {old}; rerun prepare, which puts it "
                "back first)" if (old / "meta.json").is_file() else "")
        raise FileNotFoundError(f"{meta_file} not found: run `python -m train.corpus prepare --out {data_dir} ...`"
                                + hint)
    meta = read_json(meta_file, keys=("format_version", "dtype", "vocab_size", "shards"))
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta['format_version']}, expected {FORMAT_VERSION}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{meta_file}: dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
        raise ValueError(f"{meta_file}: vocab_size {meta['vocab_size']!r} is not a positive integer")
    if not isinstance(meta["shards"], dict):
        raise ValueError(f"{meta_file}: shards is not an object of splits")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, shards in meta["shards"].items():
        if not isinstance(shards, list):
            raise ValueError(f"{meta_file}: shards.{split} is not a list")
        for i, shard in enumerate(shards):
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                    and isinstance(shard.get("tokens"), int) and shard["tokens"] >= 0):
                raise ValueError(f"{meta_file}: shards.{split}[{i}] needs a file name and a token count, "
                                 f"found {shard!r}")
            path = data_dir / shard["file"]
            expected = shard["tokens"] * itemsize
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {meta_file} is missing")
            if path.stat().st_size != expected:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, but {meta_file} says {shard['tokens']} "
                                 f"{meta['dtype']} tokens ({expected} bytes); the shard is truncated or stale")
    return meta


def unigram_baseline(data_dir):
    """Cross-entropy (nats/token) of the validation split under the training split's unigram
    distribution (add-one smoothed): the loss of a model that ignores context. A language model
    that learned anything beats it."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    vocab = meta["vocab_size"]

    def counts(split):
        c = np.zeros(vocab, dtype=np.int64)
        for shard in meta["shards"][split]:
            c += np.bincount(np.memmap(data_dir / shard["file"], dtype=dtype, mode="r"), minlength=vocab)[:vocab]
        return c

    train, val = counts("train"), counts("val")
    log_p = np.log(train + 1.0) - np.log(train.sum() + vocab)
    return float(-(val * log_p).sum() / max(val.sum(), 1))


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.corpus", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize text files into token shards")
    p.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl, .jsonl.gz or .parquet files")
    p.add_argument("--out", required=True, help="output directory for shards and meta.json")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory; omitted: train a BPE tokenizer")
    p.add_argument("--text_field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--val_fraction", type=float, default=0.005, help="fraction of documents held out")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all CPUs)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--vocab_size", type=int, default=4096, help="vocabulary of a trained tokenizer")
    args = parser.parse_args(argv)
    meta = prepare(args.input, args.out, tokenizer_dir=args.tokenizer, text_field=args.text_field,
                   val_fraction=args.val_fraction, workers=args.workers, shard_tokens=args.shard_tokens,
                   vocab_size=args.vocab_size)
    counts = {split: sum(s["tokens"] for s in shards) for split, shards in meta["shards"].items()}
    print(f"wrote {args.out}: {meta['num_docs']:,} docs, train {counts['train']:,} / val {counts['val']:,} "
          f"tokens, {meta['dtype']}, vocab {meta['vocab_size']}")


if __name__ == "__main__":
    main()
