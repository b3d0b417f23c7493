"""Chat data: files -> rows -> messages -> tokenized samples, for SFT (and the row reading and
tokenizing under preference data).

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
    targets   (L,)  targets[t] = input_ids[t + 1] if token t + 1 is trained, else IGNORE_INDEX;
                    targets[L - 1] = IGNORE_INDEX
Targets are already shifted: the loop computes cross_entropy(model(input_ids), targets) as it is.
Trained tokens are the assistant's (train_on="assistant": its content and end-of-turn token, as
`encode_chat`'s mask says) or every token (train_on="all"). A conversation longer than max_seq_len
is truncated to its first max_seq_len tokens (its last target is then the next token of the full
conversation) or dropped (overlong="drop"); one left with no trained token is dropped. Every
sample is tokenized once, when the dataset is built.

Batching and packing live in train/batching.py (ChatBatches); train/preference_data.py builds
preference pairs on the same row reading and tokenizing.

Deliberately left out: multi-process tokenization (about 1 ms per conversation here), tool calls
and multimodal content (only role and content are kept), per-row system prompts for formats other
than ShareGPT, and streaming of datasets that do not fit in memory.
"""

import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path

import jinja2
import numpy as np

from algos.logprobs import IGNORE_INDEX
from model.files import read_json

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

def data_files(paths, what: str) -> list[Path]:
    """The input files as Paths, each checked to exist and to have a readable suffix, before any is read."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"{what} needs at least one file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        if not path.name.lower().endswith(SUFFIXES):
            raise ValueError(f"{path}: unsupported {what} file (use {', '.join(SUFFIXES)})")
    return paths


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
    rows = read_json(path)  # names the file, line and column of invalid JSON or UTF-8
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
    """(input_ids, targets), int32 arrays of one length L; targets[t] is the target of position t:
    input_ids[t + 1] where that token is trained, else IGNORE_INDEX (and always at L - 1)."""
    try:
        ids, mask = tokenizer.encode_chat(messages)
    except (ValueError, jinja2.TemplateError) as e:
        raise BadRow("template_error", f"the chat template cannot render it: {e}") from None
    ids = np.asarray(ids, dtype=np.int32)
    trained = np.ones(len(ids), bool) if train_on == "all" else np.asarray(mask, bool)
    targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    targets[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return ids, targets


class SFTDataset:
    """Every conversation of the input files, tokenized once. `dataset[i]` is {"input_ids": (L,),
    "targets": (L,)} (int32 numpy arrays, targets shifted as the module docstring says); `stats` counts
    rows read, skipped by reason, truncated, dropped, tokens and trained tokens."""

    def __init__(self, paths, tokenizer, max_seq_len, train_on="assistant", overlong="truncate",
                 on_bad_row="raise", progress=True):
        paths = data_files(paths, "chat data")
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
        ids_parts, target_parts, lengths = [], [], []
        start = last_report = time.time()
        for path in paths:
            for where, row in iter_rows(path):
                rows += 1
                try:
                    if isinstance(row, BadRow):
                        raise row
                    ids, targets = tokenize_conversation(tokenizer, to_messages(row), train_on)
                except BadRow as e:
                    if on_bad_row == "raise":
                        raise ValueError(f"{where}: {e} (on_bad_row='skip' skips such rows)") from None
                    skipped[e.reason] += 1
                    continue
                if len(ids) > max_seq_len:
                    if overlong == "drop":
                        dropped["too_long"] += 1
                        continue
                    ids, targets = ids[:max_seq_len], targets[:max_seq_len]
                    truncated += 1
                if not (targets != IGNORE_INDEX).any():
                    dropped["no_trainable"] += 1
                    continue
                ids_parts.append(ids)
                target_parts.append(targets)
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
        self._targets = np.concatenate(target_parts)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.stats = {
            "rows": rows,
            "skipped": dict(skipped),
            "truncated": truncated,
            "dropped": dict(dropped),
            "samples": len(lengths),
            "tokens": int(self.lengths.sum()),
            "trainable_tokens": int((self._targets != IGNORE_INDEX).sum()),
        }

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        a, b = self._offsets[i], self._offsets[i + 1]
        return {"input_ids": self._ids[a:b], "targets": self._targets[a:b]}

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
    Token t is trained when targets[t - 1] is not IGNORE_INDEX (targets are shifted)."""
    ids = [int(i) for i in sample["input_ids"]]
    trained = [False] + [int(t) != IGNORE_INDEX for t in sample["targets"][:-1]]
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or trained[t] != trained[start]:
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False)
            out.append(f"[[{text}]]" if trained[start] else text)
            start = t
    return "".join(out)
