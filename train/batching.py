"""What the loops call every step: this rank's micro-batch of a global batch, as a dict of (B, T)
int64 tensors. Every loader here returns the same shape of batch:

    input_ids     (B, T)  the tokens fed to the model
    targets       (B, T)  the next token of each position, IGNORE_INDEX (-100) where nothing is scored
    position_ids  (B, T)  optional: positions restart at 0 in each packed document
    document_ids  (B, T)  optional: packed rows, the documents numbered 0, 1, ..., padding -1
                          (with the model's shared_prefix: document 0 is a prompt the others continue)

and `num_targets(batch)` counts the scored tokens, the loss normaliser.

One schedule serves every loader (`GlobalBatchSchedule`): each epoch visits its units (token
windows, samples, packed rows, preference pairs) in an order seeded by (seed, epoch); global batch
i is units [i*G, (i+1)*G) with G = batch_size x world_size, and rank r takes the r-th batch_size of
them. Units left over at an epoch's end (< G) are skipped. The state is (epoch, position), so a
resumed run continues exactly where it stopped, also on another number of ranks as long as the
global batch is the same.

    TokenWindows   pretraining: a split of token shards (train/corpus.py makes them) cut into
                   non-overlapping windows of seq_len + 1 tokens, within each shard.
    ChatBatches    fine-tuning: samples of a dataset (train/chat_data.py, train/preference_data.py),
                   one per row and right-padded, or packed first-fit into rows of max_seq_len.

Deliberately left out: DataLoader worker processes (a batch is a few memmap slices or numpy
copies, cheaper than the IPC a worker would cost), length-grouped batching, streaming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from algos.logprobs import IGNORE_INDEX
from train.corpus import load_meta, max_token_id


def num_targets(batch) -> int:
    """Scored tokens in a batch (targets != IGNORE_INDEX): summed over micro-batches and ranks, it is
    the loss normaliser. Call it before moving the batch to the GPU, to avoid a sync."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class GlobalBatchSchedule:
    """(epoch, position) bookkeeping shared by every loader: which units this rank takes next."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.position = 0, 0  # position counts units already served this epoch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def order(self, epoch: int, num_units: int) -> np.ndarray:
        """The epoch's permutation of its units, the same on every rank."""
        return np.random.default_rng([self.seed, epoch]).permutation(num_units)

    def next(self, units_in_epoch: Callable[[int], int]) -> tuple[int, slice]:
        """(epoch, slice of that epoch's ordered units) of this rank's part of the next global batch."""
        if self.position + self.global_batch > units_in_epoch(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
            if self.global_batch > units_in_epoch(self.epoch):
                raise ValueError(f"epoch {self.epoch} has fewer units than one global batch ({self.global_batch}); "
                                 "use a smaller batch")
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return self.epoch, slice(start, start + self.batch_size)

    def eval_slices(self, num_units: int, max_batches: int | None, partial_last: bool):
        """This rank's slice of each evaluation batch, in order. With partial_last the last global
        batch may be short (the loader pads it), so every unit is seen once."""
        num_batches = -(-num_units // self.global_batch) if partial_last else num_units // self.global_batch
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for i in range(num_batches):
            start = i * self.global_batch + self.rank * self.batch_size
            yield slice(start, start + self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue where a saved run stopped; its seed wins, so the data order is the saved run's."""
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


# ----------------------------------------------------------------------------- pretraining


class TokenWindows:
    """Micro-batches {input_ids, targets} of shape (batch_size, seq_len) from one split's token shards.

    The split is cut into non-overlapping windows of seq_len + 1 tokens starting every seq_len
    tokens, within each shard; every target is scored. With `vocab_size` (the model's), a shard holding
    an id the embedding does not have is an error naming it, here at load rather than an IndexError in
    the first forward: its largest id from meta.json (prepare records it), or read once from the shard.
    """

    def __init__(self, data_dir, split, seq_len, batch_size, rank=0, world_size=1, seed=0, pin_memory=False,
                 vocab_size: int | None = None):
        self.data_dir = Path(data_dir)
        meta = load_meta(self.data_dir)
        if split not in meta["shards"]:
            raise ValueError(f"{self.data_dir / 'meta.json'} has no split {split!r} (has {list(meta['shards'])})")
        self.schedule = GlobalBatchSchedule(batch_size, rank, world_size, seed)
        self.split, self.seq_len, self.pin_memory, self.meta = split, seq_len, pin_memory, meta
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        shards = [s for s in meta["shards"][split] if s["tokens"] > 0]
        self.shards = [np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        if vocab_size is not None:
            for s, ids in zip(shards, self.shards):
                max_id = s["max_id"] if isinstance(s.get("max_id"), int) else max_token_id(ids)
                if max_id >= vocab_size:
                    meta_file, data_vocab = self.data_dir / "meta.json", meta["vocab_size"]
                    why = (f"the data was made with a larger tokenizer ({meta_file}: vocab_size {data_vocab})"
                           if data_vocab > vocab_size else f"{meta_file} says vocab_size {data_vocab}: the shard "
                           "is damaged or was written with another tokenizer")
                    raise ValueError(f"{self.data_dir / s['file']}: token id {max_id} is outside the model's "
                                     f"vocabulary (vocab_size {vocab_size}); {why}")
        self.tokens = sum(s["tokens"] for s in shards)
        # Window w of the split is window w - first[k] of shard k, for first[k] <= w < first[k + 1].
        windows_per_shard = [max(0, (len(m) - 1) // seq_len) for m in self.shards]
        self._first = np.cumsum([0] + windows_per_shard)
        self.num_windows = int(self._first[-1])
        global_batch = self.schedule.global_batch
        if self.num_windows < global_batch:
            raise ValueError(
                f"the {split!r} split of {self.data_dir} has {self.tokens:,} tokens in {len(shards)} shards, "
                f"{self.num_windows} windows of seq_len {seq_len}; one global batch (batch_size {batch_size} x "
                f"world_size {world_size}) needs {global_batch} windows, about {global_batch * seq_len + 1:,} "
                f"tokens. Use more data, a smaller batch or a shorter seq_len")
        self._order, self._order_epoch = None, None

    def _permutation(self, epoch):
        if self._order_epoch != epoch:  # one (num_windows,) int64 array, made once per epoch
            self._order = self.schedule.order(epoch, self.num_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self):
        """This rank's part of the next global batch."""
        epoch, mine = self.schedule.next(lambda epoch: self.num_windows)
        return self._gather(self._permutation(epoch)[mine])

    def iter_eval(self, max_batches=None):
        """The split's first global batches in order, without shuffling and without touching the
        training position: the same validation set at every evaluation."""
        for mine in self.schedule.eval_slices(self.num_windows, max_batches, partial_last=False):
            yield self._gather(np.arange(self.num_windows)[mine])

    def _gather(self, windows):
        shard_of = np.searchsorted(self._first, windows, side="right") - 1
        rows = []
        for window, shard in zip(windows.tolist(), shard_of.tolist()):
            offset = (window - int(self._first[shard])) * self.seq_len
            rows.append(self.shards[shard][offset:offset + self.seq_len + 1])
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}  # targets shifted by one
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def state_dict(self):
        return self.schedule.state_dict()

    def load_state_dict(self, state):
        self.schedule.load_state_dict(state)
        self._order_epoch = None


# ----------------------------------------------------------------------------- fine-tuning


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


def collate_samples(samples: list[dict | None], pad_id: int, row_len: int | None = None, pack: bool = False) -> dict:
    """Samples {input_ids (L,), targets (L,)} -> a batch dict. pack=False: one sample per row (None:
    a row of padding), right-padded to the longest; positions continue into the padding, which
    causal attention never lets a real token see. pack=True: each row is a list of samples laid
    end to end in row_len tokens, positions restarting per sample, document_ids numbering them."""
    rows = [[] if s is None else (s if pack else [s]) for s in samples]
    T = row_len if pack else max([sum(len(x["input_ids"]) for x in r) for r in rows] + [1])
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    document_ids = np.full((B, T), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        pos = 0
        for doc, sample in enumerate(row):
            L = len(sample["input_ids"])
            input_ids[b, pos:pos + L] = sample["input_ids"]
            targets[b, pos:pos + L] = sample["targets"]
            position_ids[b, pos:pos + L] = np.arange(L)
            document_ids[b, pos:pos + L] = doc
            pos += L
        if not pack:
            position_ids[b, pos:] = np.arange(pos, T)
    batch = {"input_ids": input_ids, "targets": targets, "position_ids": position_ids}
    if pack:
        batch["document_ids"] = document_ids
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class ChatBatches:
    """This rank's micro-batches of a dataset of samples (`dataset[i]`, `dataset.lengths`,
    `dataset.pad_id`). A unit is one sample (pack=False), or one packed row of max_seq_len tokens
    (pack=True: samples packed first-fit in the epoch's shuffled order, a sample never split).
    `collate(samples, pad_id)` makes the batch; the default is `collate_samples`. A custom collate
    (preference pairs) gets each sample dict with its dataset "index" and a "weight" (0.0 on the rows
    of padding that fill evaluation's last batch)."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, pack=False, pin_memory=False,
                 collate: Callable | None = None):
        self.schedule = GlobalBatchSchedule(batch_size, rank, world_size, seed)
        self.dataset, self.pack, self.pin_memory = dataset, pack, pin_memory
        if collate is not None and pack:
            raise ValueError("packing uses the default collate")
        self.collate = collate
        self._cache = {}  # epoch -> units
        units = len(self._units(0))
        if units < self.schedule.global_batch:
            what = f"packed rows of {dataset.max_seq_len} tokens" if pack else "samples"
            raise ValueError(f"the data makes {units} {what}; one global batch (batch_size {batch_size} x "
                             f"world_size {world_size}) needs {self.schedule.global_batch}. Use more data or a "
                             "smaller batch")

    def _units(self, epoch):
        """The epoch's units: sample indices (pack=False) or rows, each a list of sample indices.
        Kept for the current epoch and for evaluation (epoch None: file order), so an evaluation
        does not repack."""
        if epoch not in self._cache:
            n = len(self.dataset)
            order = np.arange(n) if epoch is None else self.schedule.order(epoch, n)
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
        return len(self._units(self.schedule.epoch)) // self.schedule.global_batch

    def next_batch(self):
        """This rank's part of the next global batch."""
        epoch, mine = self.schedule.next(lambda epoch: len(self._units(epoch)))
        return self._collate(self._units(epoch)[mine])

    def iter_eval(self, max_batches=None):
        """Every sample once, in file order, without touching the training position: the same set at
        every evaluation. The last global batch is filled up with rows of padding (nothing scored),
        so every rank runs the same number of batches."""
        units = self._units(None)
        for mine in self.schedule.eval_slices(len(units), max_batches, partial_last=True):
            rows = units[mine]
            yield self._collate(rows + [None] * (self.schedule.batch_size - len(rows)))

    def _collate(self, units):
        def sample(i):
            return None if i is None else self.dataset[i]

        if self.collate is not None:
            # A custom collate gets every sample with its dataset index and a weight; rows of padding
            # (evaluation's last batch) repeat sample 0 with weight 0, so they count for nothing.
            samples = [dict(self.dataset[0], index=0, weight=0.0) if i is None
                       else dict(self.dataset[i], index=i, weight=1.0) for i in units]
            batch = self.collate(samples, self.dataset.pad_id)
        elif self.pack:
            rows = [None if u is None else [self.dataset[i] for i in u] for u in units]
            batch = collate_samples(rows, self.dataset.pad_id, self.dataset.max_seq_len, pack=True)
        else:
            batch = collate_samples([sample(i) for i in units], self.dataset.pad_id)
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def state_dict(self):
        return self.schedule.state_dict()

    def load_state_dict(self, state):
        self.schedule.load_state_dict(state)
        self._cache = {}


# ----------------------------------------------------------------------------- shared prompts

def shared_prefix_len(sequences: list, targets: list) -> int:
    """How many leading tokens several sequences can share in one forward: fewer than their common
    prefix (each response restarts with a copy of the prompt's last shared token, whose output
    predicts that response's first token) and none that is scored."""
    first = sequences[0]
    common = min(len(s) for s in sequences)
    for s in sequences[1:]:
        differ = np.flatnonzero(np.asarray(s[:common]) != np.asarray(first[:common]))
        common = int(differ[0]) if len(differ) else common
    scored = [np.flatnonzero(np.asarray(t) != IGNORE_INDEX) for t in targets]
    first_scored = min((int(x[0]) for x in scored if len(x)), default=common)
    return max(0, min(common - 1, first_scored))


def pack_shared_prefix(sequences: list, targets: list) -> tuple[np.ndarray, ...]:
    """Responses to one prompt as one row: the shared prompt once (document 0), then each sequence's
    remainder (documents 1, 2, ...) with positions continuing from the prompt, so each sees the
    prompt and itself only (the `shared_prefix` mask). Returns (ids, targets, positions, documents)."""
    k = shared_prefix_len(sequences, targets)
    ids, tgt, pos, doc = [sequences[0][:k]], [np.full(k, IGNORE_INDEX)], [np.arange(k)], [np.zeros(k, np.int64)]
    for d, (s, t) in enumerate(zip(sequences, targets, strict=True), start=1):
        ids.append(s[k:])
        tgt.append(t[k:])
        pos.append(np.arange(k, len(s)))
        doc.append(np.full(len(s) - k, d))
    return tuple(np.concatenate(x).astype(np.int64) for x in (ids, tgt, pos, doc))


def pad_rows(rows: list[tuple], pad_id: int) -> dict:
    """Rows of (ids, targets, positions[, documents]) arrays -> {input_ids, targets, position_ids
    [, document_ids]}, (R, T) int64, right-padded to the longest row (pad_id, IGNORE_INDEX, position 0,
    document -1)."""
    R, T = len(rows), max(len(r[0]) for r in rows)
    fills = {"input_ids": pad_id, "targets": IGNORE_INDEX, "position_ids": 0, "document_ids": -1}
    batch = {key: torch.full((R, T), fill, dtype=torch.int64) for key, fill in list(fills.items())[:len(rows[0])]}
    for r, row in enumerate(rows):
        for tensor, values in zip(batch.values(), row, strict=True):
            tensor[r, :len(values)] = torch.as_tensor(values)
    return batch
