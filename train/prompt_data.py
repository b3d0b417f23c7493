"""Prompt data for RL: files of rows -> prompts rendered with the chat template (generation prompt
added), each kept with its row so reward functions see the row's other fields (an `answer`, ...).

Rows (the SFT pipeline's readers: .jsonl, .jsonl.gz, .json, .parquet) hold the prompt in
`prompt_field`, a string (one user message) or an OpenAI messages list; `system_prompt`, when set,
is put before it. GSM8K's rows are {"question", "answer"}: prompt_field "question", and the
`answer` field reaches the gsm8k reward as is. A row without the field, or a prompt longer than
max_prompt_len tokens, is counted and skipped (on_bad_row="skip") or an error naming file and line.

`completion_batch` turns a rollout back into training rows: each prompt with its completions (once
per group with shared prompts), and where each completion's tokens sit in them.

Deliberately left out: multimodal prompts, tools, prompts cut to fit (a cut math problem is a
different problem: such rows are dropped instead).
"""

from collections import Counter

import numpy as np
import torch

from algos.logprobs import IGNORE_INDEX
from train.batching import pack_shared_prefix, pad_rows
from train.chat_data import BadRow, data_files, iter_rows


class PromptDataset:
    """`dataset[i]` is {"prompt_ids": list[int], "prompt": the messages, "row": the row's other fields}."""

    def __init__(self, paths, tokenizer, prompt_field="prompt", system_prompt=None, max_prompt_len=512,
                 on_bad_row="raise"):
        paths = data_files(paths, "prompt data")
        self.pad_id = tokenizer.pad_id
        self.samples, skipped, rows = [], Counter(), 0
        for path in paths:
            for where, row in iter_rows(path):
                rows += 1
                try:
                    if isinstance(row, BadRow):
                        raise row
                    messages = _prompt_messages(row, prompt_field, system_prompt)
                    ids = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
                    if len(ids) > max_prompt_len:
                        raise BadRow("prompt_too_long", f"the prompt has {len(ids)} tokens > max_prompt_len "
                                                        f"{max_prompt_len}")
                except BadRow as e:
                    if on_bad_row == "raise":
                        raise ValueError(f"{where}: {e} (on_bad_row='skip' skips such rows)") from None
                    skipped[e.reason] += 1
                    continue
                fields = {k: v for k, v in row.items() if k != prompt_field}
                self.samples.append({"prompt_ids": ids, "prompt": messages, "row": fields})
        if not self.samples:
            raise ValueError(f"no usable prompt in {', '.join(map(str, paths))}: {rows} rows, skipped {dict(skipped)}")
        self.lengths = np.array([len(s["prompt_ids"]) for s in self.samples], dtype=np.int64)
        self.stats = {"rows": rows, "skipped": dict(skipped), "prompts": len(self.samples)}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def summary(self) -> str:
        s = self.stats
        parts = [f"{s['rows']:,} rows -> {s['prompts']:,} prompts",
                 f"prompt tokens mean {self.lengths.mean():.0f}, max {self.lengths.max()}"]
        if s["skipped"]:
            parts.append("skipped " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["skipped"].items())))
        return "; ".join(parts)


def _prompt_messages(row: dict, field: str, system_prompt: str | None) -> list[dict]:
    if field not in row:
        raise BadRow("missing_fields", f"no {field!r} field (has {sorted(row)})")
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("missing_fields", f"empty {field!r}")
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise BadRow("missing_fields", f"{field!r} must be a string or a list of {{role, content}} messages")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def completion_batch(prompts: list[list[int]], completions: list[list[int]], sampler_logps: list[list[float]],
                     pad_id: int, device, share_prompt: bool = True, sampler_entropies: list[list[float]] | None = None
                     ) -> dict:
    """Training rows for N completions, and the map from them back to each completion's tokens.

    Rows: one per completion (prompt + completion), or with share_prompt one per run of consecutive
    completions of the same prompt, the prompt once and each completion continuing it as documents
    1, 2, ... of a shared-prefix row (the prompt's forward is done once per group, not G times):
    input_ids, targets, position_ids (R, T) [, document_ids].
    Completions: index (N, C), where in the flattened (R * T) rows the target is completion token c;
    completion_mask (N, C); old_logps (N, C), the sampler's log-prob of completion token c; entropies
    (N, C), the entropy of the distribution it was sampled from (0 when not given)."""
    groups = [[0]]  # the completions of each row
    for i in range(1, len(completions)):
        if share_prompt and prompts[i] == prompts[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    rows, starts = [], {}  # starts[i]: (row, column) of completion i's first target
    for group in groups:
        P = len(prompts[group[0]])
        seqs = [np.asarray(prompts[i] + completions[i], dtype=np.int64) for i in group]
        tgts = [np.concatenate([np.full(P - 1, IGNORE_INDEX), s[P:], [IGNORE_INDEX]]) for s in seqs]  # t predicts t + 1
        if not share_prompt:
            starts[group[0]] = (len(rows), P - 1)
            rows.append((seqs[0], tgts[0], np.arange(len(seqs[0]))))
            continue
        row = pack_shared_prefix(seqs, tgts)
        doc, shared = row[3], int((row[3] == 0).sum())
        for d, i in enumerate(group, start=1):  # document d holds sequence positions shared, shared + 1, ...
            starts[i] = (len(rows), int(np.flatnonzero(doc == d)[0]) + P - 1 - shared)
        rows.append(row)
    batch = pad_rows(rows, pad_id)
    T = batch["input_ids"].shape[1]
    N, C = len(completions), max(1, max(len(c) for c in completions))
    batch.update(index=torch.zeros(N, C, dtype=torch.long), completion_mask=torch.zeros(N, C, dtype=torch.bool),
                 old_logps=torch.zeros(N, C), entropies=torch.zeros(N, C))
    for i, c in enumerate(completions):
        r, start = starts[i]
        batch["index"][i, :len(c)] = r * T + start + torch.arange(len(c))
        batch["completion_mask"][i, :len(c)] = True
        batch["old_logps"][i, :len(c)] = torch.tensor(sampler_logps[i], dtype=torch.float32)
        if sampler_entropies is not None:
            batch["entropies"][i, :len(c)] = torch.tensor(sampler_entropies[i], dtype=torch.float32)
    # Pinned and asynchronous on CUDA: a plain copy would make the host wait for the GPU's queued work
    # (the previous micro-batch's forward) before it could build the next micro-batch.
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}
