"""Preference data: files of preference rows -> tokenized pairs (DPO, IPO, SimPO, ORPO, ...) or
unpaired labelled samples (KTO) -> padded batches.

Reading. The files and their decoding are the SFT pipeline's (train/chat_data.py `iter_rows`: .jsonl,
.jsonl.gz, .json, .parquet). Paired rows, in any of these shapes, detected row by row:
    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}    explicit
        a string prompt is one user message, a string response one assistant message
    {"chosen": messages, "rejected": messages}          full conversations sharing a prefix
    {"chosen": str, "rejected": str}                    Anthropic HH transcripts,
        "\n\nHuman: ...\n\nAssistant: ...", parsed into messages (each turn's text stripped; the few
        consecutive turns of one speaker in HH are joined with a blank line)
For full conversations the prompt is their shared prefix of WHOLE turns, up to its last user turn;
what follows is each side's response (usually the one final assistant turn). A `prompt` field beside
full conversations (UltraFeedback has one) is ignored. Unpaired rows for KTO:
    {"prompt": str | messages, "completion": str | messages, "label": bool}
and a paired row given to KTODataset becomes two samples, chosen desirable and rejected undesirable.

Samples. Prompt + response is rendered by the chat template (`Tokenizer.encode_chat`), exactly as for
SFT, and only the response's assistant tokens are scored: its content and end-of-turn token, as the
template's assistant mask says (so templates without generation tags work). Targets are shifted
next-token ids: targets[t] = ids[t + 1] if token t + 1 is scored, else IGNORE_INDEX (and at L - 1).
    pairs (PreferenceDataset)  {chosen_input_ids, chosen_targets, rejected_input_ids, rejected_targets}
    unpaired (KTODataset)      {input_ids, targets, label, prompt_len}
int32 numpy arrays (label a bool, prompt_len an int).

Limits. The prompt is everything before the first scored token (the template's assistant header
included). Longer than max_prompt_len tokens, it keeps its start or its end (`truncation`); then the
response is cut so prompt + response <= max_len. Both are counted. A prompt that leaves no room for
a response (max_prompt_len None or >= max_len) makes the row bad.

Bad rows, counted under their reason and skipped (on_bad_row="skip"), or a ValueError naming file and
line (on_bad_row="raise"): those of chat_data.BAD_ROW_REASONS (invalid_json, missing_fields, bad_order,
...; empty_assistant for an empty prompt turn) and identical_responses, empty_response,
different_prompts (full conversations sharing no prompt), no_room_for_response.

Batches. `collate_pairs` stacks B pairs as 2B rows, the B chosen then the B rejected, right-padded,
so one forward scores both; `collate_unpaired` batches KTO samples and `collate_kl` the mismatched
(prompt_i, completion_{i+1}) sequences of KTO's KL estimate. Which samples form a batch is decided by
train/batching.py.

Deliberately left out: packing pairs into rows, sharing one prompt between chosen and rejected in the
forward, tool calls and multimodal content, parity with TRL's tokenization (TRL tokenizes prompt and
completion separately; we render the conversation once, as SFT does).
"""

import re
import sys
import time
from collections import Counter

import numpy as np
import torch

from algos.logprobs import IGNORE_INDEX
from train.batching import pack_shared_prefix, pad_rows
from train.chat_data import BAD_ROW_REASONS as CHAT_BAD_ROW_REASONS
from train.chat_data import BadRow, data_files, format_example, iter_rows, to_messages, tokenize_conversation

BAD_ROW_REASONS = CHAT_BAD_ROW_REASONS + ("identical_responses", "empty_response", "different_prompts",
                                          "no_room_for_response")
TRUNCATION = ("keep_end", "keep_start")

# A turn marker of an Anthropic HH transcript; the text starts with one (after "\n\n", usually).
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


# ----------------------------------------------------------------------------- rows -> messages

def parse_hh(text: str, field: str) -> list[dict]:
    """An Anthropic HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages. Each turn's text is
    stripped; consecutive turns of one speaker (a few HH rows have them) are joined with a blank line."""
    parts = _HH_TURN.split(text)  # [before, speaker, text, speaker, text, ...]
    if len(parts) < 3 or parts[0].strip():
        raise BadRow("missing_fields", f"{field} is a string but not a \\n\\nHuman: ... \\n\\nAssistant: ... "
                                       f"transcript, and the row has no prompt")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(c for c in (messages[-1]["content"], content) if c)
        else:
            messages.append({"role": role, "content": content})
    return messages


def _as_messages(value, field: str, role: str) -> list:
    """A string becomes one message of `role`; a list is taken as messages (checked later)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise BadRow("missing_fields", f"{field} must be a string or a list of messages, found {type(value).__name__}")


def _role(message):
    return message.get("role") if isinstance(message, dict) else None


def split_shared_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Two full conversations -> (prompt, chosen response, rejected response): the prompt is their
    longest shared prefix of whole messages, cut back to end with a user turn, so each response
    starts with the assistant's answer to it."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and _role(chosen[n - 1]) != "user":
        n -= 1
    if n == 0:
        raise BadRow("different_prompts", "chosen and rejected share no prompt (no common turns up to a user turn)")
    return chosen[:n], chosen[n:], rejected[n:]


def _is_conversation(value) -> bool:
    """A messages list that starts with the prompt (not with the assistant's answer)."""
    return isinstance(value, list) and len(value) > 0 and _role(value[0]) in ("system", "user")


def _check_responses(responses: dict) -> None:
    """Raise BadRow for a response that has no text, before the conversation checks (which would call
    it empty_assistant)."""
    for name, response in responses.items():
        if not response:
            raise BadRow("empty_response", f"the {name} response is empty")
        for m in response:
            if _role(m) == "assistant" and isinstance(m.get("content"), str) and not m["content"].strip():
                raise BadRow("empty_response", f"the {name} response has an empty assistant turn")


def _conversation(prompt: list, response: list) -> tuple[list[dict], list[dict]]:
    """Check prompt + response as one conversation (chat_data's rules: roles, alternation, strings,
    ending with the assistant) and split it back."""
    messages = to_messages({"messages": prompt + response})
    return messages[:len(prompt)], messages[len(prompt):]


def _transcript(value, field: str) -> list:
    """A full conversation: an HH transcript string, or a messages list starting with the prompt."""
    if isinstance(value, str):
        return parse_hh(value, field)
    if not _is_conversation(value):
        raise BadRow("missing_fields", f"the row has no prompt, and {field} is not a conversation that starts "
                                       f"with a user or system message (nor an HH transcript string)")
    return value


def to_pair(row) -> tuple[list[dict], list[dict], list[dict]]:
    """One paired row in any supported shape -> (prompt, chosen, rejected) messages, checked (raises
    BadRow). chosen and rejected are the responses only."""
    if not isinstance(row, dict):
        raise BadRow("missing_fields", f"a row must be a JSON object, found a {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}  # parquet gives every row every column
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("missing_fields", f"a preference row needs 'chosen' and 'rejected' (found {sorted(row)})")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row and not (_is_conversation(chosen) and _is_conversation(rejected)):
        prompt = _as_messages(row["prompt"], "prompt", "user")
        chosen = _as_messages(chosen, "chosen", "assistant")
        rejected = _as_messages(rejected, "rejected", "assistant")
    else:
        chosen, rejected = _transcript(chosen, "chosen"), _transcript(rejected, "rejected")
        if chosen == rejected:
            raise BadRow("identical_responses", "chosen and rejected are the same conversation")
        prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
    if chosen == rejected:
        raise BadRow("identical_responses", "chosen and rejected are the same response")
    _check_responses({"chosen": chosen, "rejected": rejected})
    prompt, chosen = _conversation(prompt, chosen)
    _, rejected = _conversation(prompt, rejected)
    return prompt, chosen, rejected


def to_unpaired(row) -> list[tuple[list[dict], list[dict], bool]]:
    """One KTO row -> [(prompt, completion, label)]; a paired row -> its chosen (True) and its
    rejected (False) response. Raises BadRow."""
    if isinstance(row, dict) and "chosen" in row and "completion" not in row:
        prompt, chosen, rejected = to_pair(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    if not isinstance(row, dict):
        raise BadRow("missing_fields", f"a row must be a JSON object, found a {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}
    if not {"prompt", "completion", "label"} <= set(row):
        raise BadRow("missing_fields", f"an unpaired row needs 'prompt', 'completion' and 'label' "
                                       f"(found {sorted(row)})")
    if not isinstance(row["label"], bool):
        raise BadRow("missing_fields", f"label must be true or false, found {row['label']!r}")
    completion = _as_messages(row["completion"], "completion", "assistant")
    _check_responses({"completion": completion})
    prompt, completion = _conversation(_as_messages(row["prompt"], "prompt", "user"), completion)
    return [(prompt, completion, row["label"])]


# ----------------------------------------------------------------------------- tokenizing

def tokenize_response(tokenizer, prompt: list[dict], response: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids (L,) int32, scored (L,) bool, start): prompt + response rendered by the chat template;
    scored marks the response's assistant tokens (the template's assistant mask, less the prompt's own
    assistant turns), and start is the first of them, where the prompt ends."""
    ids, targets = tokenize_conversation(tokenizer, prompt + response)  # raises BadRow("template_error")
    assistant = np.zeros(len(ids), bool)
    assistant[1:] = targets[:-1] != IGNORE_INDEX  # the template's assistant mask, read back from the targets
    # One run of the mask per assistant turn: the response's turns are the last runs.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], assistant.view(np.int8), [0]])))
    starts, ends = edges[0::2], edges[1::2]
    turns = sum(m["role"] == "assistant" for m in response)
    if len(starts) < turns:
        raise BadRow("template_error", f"the chat template's assistant mask has {len(starts)} spans for "
                                       f"{turns} assistant turns in the response")
    scored = np.zeros(len(ids), bool)
    for a, b in zip(starts[len(starts) - turns:], ends[len(ends) - turns:]):
        scored[a:b] = True
    return ids, scored, int(starts[len(starts) - turns])


def shifted_targets(ids: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """targets[t] = ids[t + 1] where token t + 1 is scored, else IGNORE_INDEX; targets[L - 1] too."""
    targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    targets[:-1] = np.where(scored[1:], ids[1:], IGNORE_INDEX)
    return targets


def limit_lengths(ids, scored, start, max_len, max_prompt_len=None, truncation="keep_end"):
    """Cut the prompt ids[:start] to max_prompt_len tokens (keeping its start or its end), then the
    response ids[start:] so the whole is at most max_len. Returns (ids, scored, prompt_len,
    prompt_cut, response_cut); raises BadRow when no response token fits."""
    prompt, response = slice(0, start), slice(start, len(ids))
    prompt_cut = max_prompt_len is not None and start > max_prompt_len
    if prompt_cut:
        prompt = slice(0, max_prompt_len) if truncation == "keep_start" else slice(start - max_prompt_len, start)
    prompt_len = prompt.stop - prompt.start
    room = max_len - prompt_len
    if room <= 0:
        raise BadRow("no_room_for_response", f"the prompt has {prompt_len} tokens and max_len is {max_len}: "
                                             f"no room for a response (set a max_prompt_len below max_len)")
    response_cut = len(ids) - start > room
    response = slice(start, min(len(ids), start + room))
    ids = np.concatenate([ids[prompt], ids[response]])
    scored = np.concatenate([scored[prompt], scored[response]])
    return ids, scored, prompt_len, prompt_cut, response_cut


# ----------------------------------------------------------------------------- datasets

class _Ragged:
    """Arrays of varying length in one flat array and offsets: far less memory than a list of arrays."""

    def __init__(self, parts, dtype=np.int32):
        self.lengths = np.array([len(p) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.flat = np.concatenate(parts).astype(dtype, copy=False)

    def __getitem__(self, i):
        return self.flat[self.offsets[i]:self.offsets[i + 1]]


def _check_args(paths, max_len, max_prompt_len, truncation, on_bad_row):
    paths = data_files(paths, "preference data")
    for name, value, allowed in (("truncation", truncation, TRUNCATION), ("on_bad_row", on_bad_row, ("raise", "skip"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be at least 1 (or None: no limit but max_len), got {max_prompt_len}")
    return paths


def _read(paths, on_bad_row, progress, row_to_samples):
    """Every row of the files through row_to_samples(row) -> [(sample, prompt_cut, response_cut)].
    A BadRow raises ValueError naming file and line, or is counted under its reason and skipped.
    Returns (samples, rows, skipped, truncated_prompts, truncated_responses)."""
    samples, skipped, rows, cut_prompts, cut_responses = [], Counter(), 0, 0, 0
    start = last_report = time.time()
    for path in paths:
        for where, row in iter_rows(path):
            rows += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                made = row_to_samples(row)
            except BadRow as e:
                if on_bad_row == "raise":
                    raise ValueError(f"{where}: {e} (on_bad_row='skip' skips such rows)") from None
                skipped[e.reason] += 1
                continue
            for sample, prompt_cut, response_cut in made:
                samples.append(sample)
                cut_prompts += prompt_cut
                cut_responses += response_cut
            if progress and time.time() - last_report >= (1.0 if sys.stderr.isatty() else 30.0):
                last_report = time.time()
                end = "" if sys.stderr.isatty() else "\n"  # one rewritten line on a terminal
                print(f"\r[preference_data] {path.name}: {rows:,} rows, {len(samples):,} samples, "
                      f"{rows / (last_report - start):,.0f} rows/s", end=end, file=sys.stderr, flush=True)
    if progress and last_report > start and sys.stderr.isatty():
        print(file=sys.stderr)
    if not samples:
        raise ValueError(f"no usable preference row in {', '.join(map(str, paths))}: {rows} rows, "
                         f"skipped {dict(skipped)}")
    return samples, rows, dict(skipped), cut_prompts, cut_responses


class PreferenceDataset:
    """Every preference pair of the input files, tokenized once. `dataset[i]` is {"chosen_input_ids",
    "chosen_targets", "rejected_input_ids", "rejected_targets"} (int32 numpy arrays, targets shifted);
    `lengths[i]` the longer side's length; `stats` counts rows, skipped rows by reason, truncated
    prompts and responses, pairs, tokens and scored tokens (both sides)."""

    FIELDS = ("chosen_input_ids", "chosen_targets", "rejected_input_ids", "rejected_targets")

    def __init__(self, paths, tokenizer, max_len, max_prompt_len=None, truncation="keep_end",
                 on_bad_row="raise", progress=True):
        self.paths = _check_args(paths, max_len, max_prompt_len, truncation, on_bad_row)
        self.max_len, self.max_prompt_len, self.truncation = max_len, max_prompt_len, truncation
        self.pad_id = tokenizer.pad_id

        def row_to_samples(row):
            prompt, chosen, rejected = to_pair(row)
            sample, prompt_cut, response_cut = {}, False, False
            for side, response in (("chosen", chosen), ("rejected", rejected)):
                ids, scored, _, p_cut, r_cut = limit_lengths(*tokenize_response(tokenizer, prompt, response),
                                                             max_len, max_prompt_len, truncation)
                sample[f"{side}_input_ids"], sample[f"{side}_targets"] = ids, shifted_targets(ids, scored)
                prompt_cut, response_cut = prompt_cut or p_cut, response_cut or r_cut
            return [(sample, prompt_cut, response_cut)]

        samples, rows, skipped, cut_prompts, cut_responses = _read(self.paths, on_bad_row, progress, row_to_samples)
        self._columns = {f: _Ragged([s[f] for s in samples]) for f in self.FIELDS}
        self.lengths = np.maximum(self._columns["chosen_input_ids"].lengths,
                                  self._columns["rejected_input_ids"].lengths)
        self.stats = {
            "rows": rows,
            "skipped": skipped,
            "truncated_prompts": cut_prompts,
            "truncated_responses": cut_responses,
            "samples": len(samples),
            "tokens": sum(len(self._columns[f].flat) for f in ("chosen_input_ids", "rejected_input_ids")),
            "scored_tokens": sum(int((self._columns[f].flat != IGNORE_INDEX).sum())
                                 for f in ("chosen_targets", "rejected_targets")),
        }

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {f: column[i] for f, column in self._columns.items()}

    def summary(self) -> str:
        return _summary(self, "pairs")


class KTODataset:
    """Every unpaired sample of the input files (prompt/completion/label rows, or both sides of paired
    rows), tokenized once. `dataset[i]` is {"input_ids", "targets"} (int32 numpy arrays), "label"
    (bool: desirable) and "prompt_len" (the prompt's tokens, for collate_kl); `stats` as
    PreferenceDataset's, plus the number of desirable samples."""

    def __init__(self, paths, tokenizer, max_len, max_prompt_len=None, truncation="keep_end",
                 on_bad_row="raise", progress=True):
        self.paths = _check_args(paths, max_len, max_prompt_len, truncation, on_bad_row)
        self.max_len, self.max_prompt_len, self.truncation = max_len, max_prompt_len, truncation
        self.pad_id = tokenizer.pad_id

        def row_to_samples(row):
            out = []
            for prompt, completion, label in to_unpaired(row):
                ids, scored, prompt_len, p_cut, r_cut = limit_lengths(
                    *tokenize_response(tokenizer, prompt, completion), max_len, max_prompt_len, truncation)
                out.append(({"input_ids": ids, "targets": shifted_targets(ids, scored), "label": label,
                             "prompt_len": prompt_len}, p_cut, r_cut))
            return out

        samples, rows, skipped, cut_prompts, cut_responses = _read(self.paths, on_bad_row, progress, row_to_samples)
        self._ids = _Ragged([s["input_ids"] for s in samples])
        self._targets = _Ragged([s["targets"] for s in samples])
        self.labels = np.array([s["label"] for s in samples], dtype=bool)
        self.prompt_lens = np.array([s["prompt_len"] for s in samples], dtype=np.int64)
        self.lengths = self._ids.lengths
        self.stats = {
            "rows": rows,
            "skipped": skipped,
            "truncated_prompts": cut_prompts,
            "truncated_responses": cut_responses,
            "samples": len(samples),
            "desirable": int(self.labels.sum()),
            "tokens": len(self._ids.flat),
            "scored_tokens": int((self._targets.flat != IGNORE_INDEX).sum()),
        }

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {"input_ids": self._ids[i], "targets": self._targets[i], "label": bool(self.labels[i]),
                "prompt_len": int(self.prompt_lens[i])}

    def summary(self) -> str:
        return _summary(self, f"samples ({self.stats['desirable']:,} desirable)")


def _summary(dataset, what) -> str:
    s = dataset.stats
    parts = [f"{s['rows']:,} rows -> {s['samples']:,} {what}", f"{s['tokens']:,} tokens",
             f"{s['scored_tokens']:,} scored ({s['scored_tokens'] / max(s['tokens'], 1):.0%})"]
    if s["skipped"]:
        parts.append("skipped " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["skipped"].items())))
    if s["truncated_prompts"]:
        parts.append(f"{s['truncated_prompts']:,} prompts cut to {dataset.max_prompt_len} tokens "
                     f"({dataset.truncation})")
    if s["truncated_responses"]:
        parts.append(f"{s['truncated_responses']:,} responses cut to fit {dataset.max_len} tokens")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- batches

def _pad(ids_list, targets_list, pad_id) -> dict:
    """Sequences -> {input_ids, targets, position_ids}, (N, T) int64, right-padded to the longest with
    pad_id and IGNORE_INDEX. Causal attention needs no mask: padding comes after every real token;
    positions simply continue into it."""
    N, T = len(ids_list), max(len(ids) for ids in ids_list)
    input_ids = torch.full((N, T), pad_id, dtype=torch.int64)
    targets = torch.full((N, T), IGNORE_INDEX, dtype=torch.int64)
    for n, (ids, tgt) in enumerate(zip(ids_list, targets_list, strict=True)):
        input_ids[n, :len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        targets[n, :len(tgt)] = torch.from_numpy(np.asarray(tgt, dtype=np.int64))
    position_ids = torch.arange(T).repeat(N, 1)  # (N, T)
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids}


def collate_pairs(samples, pad_id) -> dict:
    """B pairs -> {input_ids, targets, position_ids}, each (2B, T) int64: rows 0..B-1 are the chosen
    responses, rows B..2B-1 the rejected ones in the same order, so the loop splits the per-sequence
    log-probs with logps[:B], logps[B:]."""
    return _pad([s["chosen_input_ids"] for s in samples] + [s["rejected_input_ids"] for s in samples],
                [s["chosen_targets"] for s in samples] + [s["rejected_targets"] for s in samples], pad_id)


def collate_shared_prompt(samples, pad_id) -> dict:
    """B pairs -> {input_ids, targets, position_ids, document_ids}, each (B, T) int64: one row per pair,
    its prompt once, then the chosen response (document 1) and the rejected one (document 2), both
    continuing the prompt. The prompt's forward is shared: fewer tokens than collate_pairs' 2B rows,
    the same log-probs (tests/test_dpo.py). Padding: document -1."""
    return pad_rows([pack_shared_prefix([s["chosen_input_ids"], s["rejected_input_ids"]],
                                        [s["chosen_targets"], s["rejected_targets"]]) for s in samples], pad_id)


def collate_unpaired(samples, pad_id) -> dict:
    """B KTO samples -> {input_ids, targets, position_ids} (B, T) int64 and label (B,) bool."""
    batch = _pad([s["input_ids"] for s in samples], [s["targets"] for s in samples], pad_id)
    batch["label"] = torch.tensor([bool(s["label"]) for s in samples], dtype=torch.bool)
    return batch


def collate_kl(samples, pad_id, max_len=None) -> dict:
    """The mismatched sequences of KTO's reference point: sample i's prompt followed by sample
    (i + 1) % B's completion, cut to max_len, scored on the completion. Same keys and shapes as
    collate_unpaired, without label. Needs B >= 2 (with one sample the "mismatched" pair is the sample
    itself, and the KL estimate would equal its own reward). The two samples a paired row makes share a
    prompt; in a shuffled epoch order they are seldom neighbours."""
    if len(samples) < 2:
        raise ValueError("KTO's KL estimate needs at least 2 samples per micro-batch")
    ids_list, targets_list = [], []
    for i, s in enumerate(samples):
        other = samples[(i + 1) % len(samples)]
        p, q = s["prompt_len"], other["prompt_len"]
        other_scored = np.concatenate([[False], np.asarray(other["targets"][:-1]) != IGNORE_INDEX])
        ids = np.concatenate([s["input_ids"][:p], other["input_ids"][q:]])[:max_len]
        scored = np.concatenate([np.zeros(p, bool), other_scored[q:]])[:max_len]
        ids_list.append(ids)
        targets_list.append(shifted_targets(ids, scored))
    return _pad(ids_list, targets_list, pad_id)


def format_pair(tokenizer, sample) -> str:
    """A pair as text for the start-of-run printout, the scored tokens of each side in [[ ]]."""
    chosen = format_example(tokenizer, {"input_ids": sample["chosen_input_ids"], "targets": sample["chosen_targets"]})
    rejected = format_example(tokenizer, {"input_ids": sample["rejected_input_ids"],
                                          "targets": sample["rejected_targets"]})
    return f"--- chosen ---\n{chosen}\n--- rejected ---\n{rejected}"


def format_unpaired(tokenizer, sample) -> str:
    """A KTO sample as text, scored tokens in [[ ]], headed by its label."""
    label = "desirable" if sample["label"] else "undesirable"
    return f"--- {label} ---\n{format_example(tokenizer, sample)}"
