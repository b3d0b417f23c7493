"""The supervised fine-tuning data pipeline: chat files -> tokenized samples -> (B, T) batches.

Shared by the SFT and LoRA loops, and meant for DPO's too (row reading, `tokenize_conversation`, `first_fit`).

Reading. .jsonl (.jsonl.gz), .json (one list of rows) and .parquet files. Each row is one
conversation, in any of these shapes, detected row by row:
    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}      OpenAI
    {"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}       ShareGPT
        (also "user" / "assistant" as `from`; an optional top-level "system": str)
    {"prompt": str | messages, "completion": str | messages}                           prompt/completion
    {"instruction": str, "input": str (optional), "output": str}                       Alpaca
        (the user turn is instruction + "\n\n" + input when input is not empty)
All become one messages list: an optional system message first, then user and assistant turns
alternating, ending with a non-empty assistant turn. A row that breaks this, or cannot be decoded,
raises ValueError naming "file:line" (.jsonl) or "file[row]" (.json, .parquet; 0-based); with
on_bad_row="skip" it is skipped and counted under its reason (BAD_ROW_REASONS).

Samples. Each conversation is rendered by the tokenizer's chat template (`encode_chat`) and stored as
two int arrays of the same length L:
    input_ids (L,)  the rendered conversation
    labels    (L,)  labels[t] = input_ids[t + 1] if token t + 1 is trained, else IGNORE_INDEX;
                    labels[L - 1] = IGNORE_INDEX
Labels are already shifted: the loop computes cross_entropy(model(input_ids), labels) as it is.
Trained tokens are the assistant's (train_on="assistant": its content and end-of-turn token, as
`encode_chat`'s mask says) or every token (train_on="all"). A conversation longer than max_seq_len
is truncated to its first max_seq_len tokens (its last label is then the next token of the full
conversation) or dropped (overlong="drop"); one left with no trained token is dropped. Every
sample is tokenized once, when the dataset is built.

Batches. `ChatBatches` serves each rank its micro-batch of a global batch, like train/data.py's
TokenWindows: each epoch visits its units in an order seeded by (seed, epoch), global batch i is
units [i*G, (i+1)*G) with G = batch_size * world_size, and rank r takes the r-th batch_size of them.
    pack=False: a unit is one sample. A micro-batch is right-padded to its longest sample (pad_id,
        labels IGNORE_INDEX). Causal attention needs no mask: padding comes after every real token.
        {input_ids, labels, position_ids}, each (B, T).
    pack=True: a unit is one row of exactly max_seq_len tokens, samples packed into it first-fit
        in the epoch's shuffled order (a sample is never split), the rest padding.
        {input_ids, labels, position_ids, document_ids}, each (B, max_seq_len); positions restart at
        0 in each sample, document_ids number the samples of a row 0, 1, ... and padding is -1. The
        loop passes attn_mask=model.gpt.packed_attention_mask(document_ids) (dense, CPU) or
        flex_block_mask(document_ids) (CUDA).
The loss of a step is the sum over its micro-batches and ranks, divided by their number of trained
tokens (`num_trainable`), so packing and batch shape do not change it.

Deliberately left out: multi-process tokenization (about 1 ms per conversation here), tool calls
and multimodal content (only role and content are kept), per-row system prompts for formats other
than ShareGPT, length-grouped batching, and streaming of datasets that do not fit in memory.
"""

import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path

import jinja2
import numpy as np
import torch

from algos.logprobs import IGNORE_INDEX

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
BAD_ROW_REASONS = ("invalid_json", "not_utf8", "missing_fields", "unknown_role", "empty_assistant", "no_assistant",
                   "bad_order", "template_error")


class BadRow(ValueError):
    """A row that cannot become a training conversation; `reason` (one of BAD_ROW_REASONS) is what
    on_bad_row="skip" counts it under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- reading rows

def iter_rows(path):
    """Yield (where, row) for each row of a .jsonl, .json or .parquet file, in order. `where` is
    "file:line" or "file[row]"; `row` is a dict as stored, or a BadRow for a line that could not be
    decoded (invalid JSON, not UTF-8). A .json file that is not one JSON list raises at once."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise FileNotFoundError(f"chat data file not found: {path}")
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path)
    elif name.endswith(".json"):
        yield from _iter_json(path)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported chat data file (use {', '.join(SUFFIXES)})")


def _iter_jsonl(path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes, so one bad line is one bad row, not a failed file
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRow("not_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line_no == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRow("invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(path):
    try:
        rows = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a .json chat file must hold one list of rows, found a {type(rows).__name__} "
                         f"(use .jsonl for one row per line)")
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _iter_parquet(path):
    try:
        import pyarrow.parquet as pq  # optional: only parquet inputs need it
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}[{i}]", row
            i += 1


# ----------------------------------------------------------------------------- rows -> messages

def to_messages(row) -> list[dict]:
    """One row in any supported shape -> [{"role", "content"}, ...], checked (raises BadRow)."""
    if not isinstance(row, dict):
        raise BadRow("missing_fields", f"a row must be a JSON object, found a {type(row).__name__}")
    # Parquet gives every row every column, null where the row has none.
    row = {k: v for k, v in row.items() if v is not None}
    if "messages" in row:
        messages = _openai_messages(row["messages"], "messages")
    elif "conversations" in row:
        messages = _sharegpt_messages(row)
    elif "prompt" in row or "completion" in row:
        messages = _prompt_completion_messages(row)
    elif "instruction" in row or "output" in row:
        messages = _alpaca_messages(row)
    else:
        raise BadRow("missing_fields", f"no messages, conversations, prompt/completion or instruction/output "
                                       f"field (found {sorted(row)})")
    check_conversation(messages)
    return messages


def _openai_messages(value, field) -> list[dict]:
    if not isinstance(value, list):
        raise BadRow("missing_fields", f"{field!r} must be a list of messages, found a {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow("missing_fields", f"{field}[{i}] needs 'role' and 'content' (found {_keys(m)})")
        if m["role"] not in ROLES:
            raise BadRow("unknown_role", f"{field}[{i}] has role {m['role']!r} (known: {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": _text(m["content"], f"{field}[{i}].content")})
    return out


def _sharegpt_messages(row) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise BadRow("missing_fields", f"'conversations' must be a list, found a {type(turns).__name__}")
    out = []
    if row.get("system"):
        out.append({"role": "system", "content": _text(row["system"], "system")})
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise BadRow("missing_fields", f"conversations[{i}] needs 'from' and 'value' (found {_keys(t)})")
        if t["from"] not in SHAREGPT_ROLES:
            raise BadRow("unknown_role", f"conversations[{i}] is from {t['from']!r} "
                                         f"(known: {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": _text(t["value"], f"conversations[{i}].value")})
    return out


def _prompt_completion_messages(row) -> list[dict]:
    if "prompt" not in row or "completion" not in row:
        raise BadRow("missing_fields", f"a prompt/completion row needs both fields (found {sorted(row)})")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        messages = _openai_messages(prompt, "prompt")
    else:
        messages = [{"role": "user", "content": _text(prompt, "prompt")}]
    if isinstance(completion, list):
        return messages + _openai_messages(completion, "completion")
    return messages + [{"role": "assistant", "content": _text(completion, "completion")}]


def _alpaca_messages(row) -> list[dict]:
    if "instruction" not in row or "output" not in row:
        raise BadRow("missing_fields", f"an instruction/output row needs both fields (found {sorted(row)})")
    user = _text(row["instruction"], "instruction")
    extra = _text(row.get("input", ""), "input")
    if extra.strip():
        user = f"{user}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row["output"], "output")}]


def _text(value, field) -> str:
    if not isinstance(value, str):
        raise BadRow("missing_fields", f"{field} must be a string, found {type(value).__name__}")
    return value


def _keys(value):
    return sorted(value) if isinstance(value, dict) else type(value).__name__


def check_conversation(messages: list[dict]) -> None:
    """Raise BadRow unless messages are: an optional system message, then user and assistant
    alternating, starting with user and ending with a non-empty assistant turn."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise BadRow("no_assistant", "the conversation has no assistant turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRow("empty_assistant", f"assistant turn {i} is empty")
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            i += len(roles) - len(turns)
            raise BadRow("bad_order", f"message {i} is {role!r} where {expected!r} belongs (roles: {roles}); a "
                                      f"conversation is [system], user, assistant, user, assistant, ...")
    if turns[-1] != "assistant":
        raise BadRow("bad_order", f"the conversation ends with a {turns[-1]!r} turn, not the assistant's")


# ----------------------------------------------------------------------------- tokenizing

def tokenize_conversation(tokenizer, messages, train_on="assistant") -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), int32 arrays of one length L; labels[t] is the target of position t:
    input_ids[t + 1] where that token is trained, else IGNORE_INDEX (and always at L - 1)."""
    try:
        ids, mask = tokenizer.encode_chat(messages)
    except (ValueError, jinja2.TemplateError) as e:
        raise BadRow("template_error", f"the chat template cannot render it: {e}") from None
    ids = np.asarray(ids, dtype=np.int32)
    trained = np.ones(len(ids), bool) if train_on == "all" else np.asarray(mask, bool)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return ids, labels


class SFTDataset:
    """Every conversation of the input files, tokenized once. `dataset[i]` is {"input_ids": (L,),
    "labels": (L,)} (int32 numpy arrays, labels shifted as the module docstring says); `stats` counts
    rows read, skipped by reason, truncated, dropped, tokens and trained tokens."""

    def __init__(self, paths, tokenizer, max_seq_len, train_on="assistant", overlong="truncate",
                 on_bad_row="raise", progress=True):
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not paths:
            raise ValueError("SFTDataset needs at least one chat data file")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"chat data file not found: {path}")
            if not path.name.lower().endswith(SUFFIXES):
                raise ValueError(f"{path}: unsupported chat data file (use {', '.join(SUFFIXES)})")
        for name, value, allowed in (("train_on", train_on, ("assistant", "all")),
                                     ("overlong", overlong, ("truncate", "drop")),
                                     ("on_bad_row", on_bad_row, ("raise", "skip"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.paths, self.max_seq_len, self.train_on = paths, max_seq_len, train_on
        self.pad_id = tokenizer.pad_id

        skipped, dropped = Counter(), Counter()
        rows = truncated = 0
        ids_parts, label_parts, lengths = [], [], []
        start = last_report = time.time()
        for path in paths:
            for where, row in iter_rows(path):
                rows += 1
                try:
                    if isinstance(row, BadRow):
                        raise row
                    ids, labels = tokenize_conversation(tokenizer, to_messages(row), train_on)
                except BadRow as e:
                    if on_bad_row == "raise":
                        raise ValueError(f"{where}: {e} (on_bad_row='skip' skips such rows)") from None
                    skipped[e.reason] += 1
                    continue
                if len(ids) > max_seq_len:
                    if overlong == "drop":
                        dropped["too_long"] += 1
                        continue
                    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                    truncated += 1
                if not (labels != IGNORE_INDEX).any():
                    dropped["no_trainable"] += 1
                    continue
                ids_parts.append(ids)
                label_parts.append(labels)
                lengths.append(len(ids))
                if progress and time.time() - last_report >= (1.0 if sys.stderr.isatty() else 30.0):
                    last_report = time.time()
                    end = "" if sys.stderr.isatty() else "\n"  # one rewritten line on a terminal
                    print(f"\r[chat_data] {path.name}: {rows:,} rows, {len(lengths):,} samples, "
                          f"{rows / (last_report - start):,.0f} rows/s", end=end, file=sys.stderr, flush=True)
        if progress and last_report > start and sys.stderr.isatty():
            print(file=sys.stderr)
        if not lengths:
            raise ValueError(f"no usable conversation in {', '.join(map(str, paths))}: {rows} rows, "
                             f"skipped {dict(skipped)}, dropped {dict(dropped)}")

        # All samples in two flat arrays: far less memory than a Python list per sample.
        self._ids = np.concatenate(ids_parts)
        self._labels = np.concatenate(label_parts)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.stats = {
            "rows": rows,
            "skipped": dict(skipped),
            "truncated": truncated,
            "dropped": dict(dropped),
            "samples": len(lengths),
            "tokens": int(self.lengths.sum()),
            "trainable_tokens": int((self._labels != IGNORE_INDEX).sum()),
        }

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        a, b = self._offsets[i], self._offsets[i + 1]
        return {"input_ids": self._ids[a:b], "labels": self._labels[a:b]}

    def summary(self) -> str:
        s = self.stats
        parts = [f"{s['rows']:,} rows -> {s['samples']:,} samples", f"{s['tokens']:,} tokens",
                 f"{s['trainable_tokens']:,} trained ({s['trainable_tokens'] / max(s['tokens'], 1):.0%})"]
        if s["skipped"]:
            parts.append("skipped " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["skipped"].items())))
        if s["truncated"]:
            parts.append(f"truncated {s['truncated']:,} to {self.max_seq_len} tokens")
        if s["dropped"]:
            parts.append("dropped " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["dropped"].items())))
        return "; ".join(parts)


def format_example(tokenizer, sample) -> str:
    """One sample as text, each run of trained tokens wrapped in [[ ]], for the start-of-run printout.
    Token t is trained when labels[t - 1] is not IGNORE_INDEX (labels are shifted)."""
    ids = [int(i) for i in sample["input_ids"]]
    trained = [False] + [int(label) != IGNORE_INDEX for label in sample["labels"][:-1]]
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or trained[t] != trained[start]:
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False)
            out.append(f"[[{text}]]" if trained[start] else text)
            start = t
    return "".join(out)


# ----------------------------------------------------------------------------- batching

def first_fit(lengths, capacity) -> list[list[int]]:
    """Pack items, in order, into bins of `capacity`: each goes into the first bin with room for it,
    or a new bin. Returns each bin's item indices. Every length must be <= capacity.

    A segment tree over the free space of n bins (enough for n items) finds the first fit in
    O(log n); unused bins have all their space, so the leftmost fit is an open bin or the next new one.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)  # node k: the most free space of any bin below it; leaves at size + bin
    bins = []
    for item, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def num_trainable(batch) -> int:
    """Trained tokens in a batch (labels != IGNORE_INDEX): summed over micro-batches and ranks, it is
    the loss normaliser. Call it before moving the batch to the GPU, to avoid a sync."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


class ChatBatches:
    """This rank's micro-batches of an SFTDataset: dicts of (B, T) int64 tensors (see the module
    docstring). A global batch is batch_size * world_size samples (pack=False) or packed rows of
    max_seq_len tokens (pack=True). Units left over at an epoch's end (< one global batch) are
    skipped. The state is (epoch, position in units), so a resumed run continues exactly, also on
    another number of ranks as long as the global batch is the same."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, pack=False, pin_memory=False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.pack, self.pin_memory = seed, pack, pin_memory
        self.epoch, self.position = 0, 0
        self._cache = {}  # epoch -> units
        units = len(self._units(0))
        if units < self.global_batch:
            what = f"packed rows of {dataset.max_seq_len} tokens" if pack else "samples"
            raise ValueError(f"the chat data makes {units} {what}; one global batch (batch_size {batch_size} x "
                             f"world_size {world_size}) needs {self.global_batch}. Use more data or a smaller batch")

    @property
    def global_batch(self):
        return self.batch_size * self.world_size

    def _order(self, epoch):
        """The samples in epoch order; epoch None means the file order (evaluation)."""
        n = len(self.dataset)
        return np.arange(n) if epoch is None else np.random.default_rng([self.seed, epoch]).permutation(n)

    def _units(self, epoch):
        """The epoch's units: sample indices (pack=False) or rows, each a list of sample indices.
        Kept for the current epoch and for evaluation (epoch None), so an evaluation does not repack."""
        if epoch not in self._cache:
            order = self._order(epoch)
            if self.pack:
                bins = first_fit(self.dataset.lengths[order].tolist(), self.dataset.max_seq_len)
                units = [[int(order[i]) for i in b] for b in bins]
            else:
                units = order.tolist()
            if epoch is not None:
                self._cache = {k: v for k, v in self._cache.items() if k is None}
            self._cache[epoch] = units
        return self._cache[epoch]

    def batches_per_epoch(self):
        """Global batches in the current epoch (with packing it can vary a little between epochs)."""
        return len(self._units(self.epoch)) // self.global_batch

    def next_batch(self):
        """This rank's part of the next global batch."""
        if self.position + self.global_batch > len(self._units(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
            if self.global_batch > len(self._units(self.epoch)):
                raise ValueError(f"epoch {self.epoch} packs into fewer rows than one global batch "
                                 f"({self.global_batch}); use a smaller batch")
        start = self.position + self.rank * self.batch_size
        units = self._units(self.epoch)[start:start + self.batch_size]
        self.position += self.global_batch
        return self._collate(units)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def iter_eval(self, max_batches=None):
        """Every sample once, in file order, without touching the training position: the same set at
        every evaluation. The last global batch is filled up with rows of padding (no trained token),
        so every rank runs the same number of batches."""
        units = self._units(None)
        num_batches = -(-len(units) // self.global_batch)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for i in range(num_batches):
            start = i * self.global_batch + self.rank * self.batch_size
            mine = units[start:start + self.batch_size]
            yield self._collate(mine + [None] * (self.batch_size - len(mine)))

    def _collate(self, units):
        """Units (None: a row of padding) -> a dict of (B, T) int64 tensors."""
        B = len(units)
        if self.pack:
            T = self.dataset.max_seq_len
        else:
            T = max([int(self.dataset.lengths[i]) for i in units if i is not None], default=1)
        input_ids = np.full((B, T), self.dataset.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((B, T), dtype=np.int64)
        document_ids = np.full((B, T), -1, dtype=np.int64)
        for b, unit in enumerate(units):
            samples = [] if unit is None else [unit] if not self.pack else unit
            pos = 0
            for doc, i in enumerate(samples):
                sample = self.dataset[i]
                L = len(sample["input_ids"])
                input_ids[b, pos:pos + L] = sample["input_ids"]
                labels[b, pos:pos + L] = sample["labels"]
                position_ids[b, pos:pos + L] = np.arange(L)
                document_ids[b, pos:pos + L] = doc
                pos += L
            if not self.pack:
                position_ids[b, pos:] = np.arange(pos, T)  # padding continues the positions; it is never attended to
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.pack:
            batch["document_ids"] = document_ids
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state):
        """Continue where a saved run stopped; its seed wins, so the data order is the saved run's."""
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._cache = {}


# ----------------------------------------------------------------------------- attention masks

def document_mask_mod(document_ids):
    """FlexAttention mask_mod for packed rows: causal, and only within one document. document_ids (B, T)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return mask_mod


def flex_block_mask(document_ids):
    """The BlockMask equivalent of model.gpt.packed_attention_mask(document_ids), for
    model(..., attn_mask=...) on CUDA: attention skips the blocks that cross documents. Build it once
    per micro-batch, on the GPU (document_ids already there); all layers share it."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = document_ids.shape
    return create_block_mask(document_mask_mod(document_ids), B, None, T, T, device=document_ids.device)


def attention_mask_for(batch):
    """The attn_mask a batch needs: None for unpacked rows (causal attention suffices), a
    FlexAttention BlockMask for packed rows on CUDA, the dense equivalent elsewhere (FlexAttention
    has no CPU backward). Call after moving the batch to its device."""
    document_ids = batch.get("document_ids")
    if document_ids is None:
        return None
    if document_ids.device.type == "cuda":
        return flex_block_mask(document_ids)
    from model.gpt import packed_attention_mask

    return packed_attention_mask(document_ids)
