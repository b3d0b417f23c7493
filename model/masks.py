"""Attention masks, all in one place: causal with left padding (generation), and packed rows
(several documents per row, training), each with the sliding window applied when the model has one.
A packed row may also share a prefix (`shared_prefix`): document 0 is a prompt and every later
document of the row is one response continuing it, so a prompt scored with several responses (DPO's
chosen and rejected, GRPO's group) goes through the model once.

A mask is either a bool tensor broadcastable to (B, H, T, S) (True = attend), used by SDPA, or a
FlexAttention BlockMask (CUDA), which lets attention skip whole blocks that cross documents. Both
say the same thing: query q sees key k when k <= q, k is in q's document (or is not padding), and
q - k < sliding_window. A decode step over the rollout engine's static cache has its own BlockMask
(`decode_block_mask`): it lists only the cache blocks written so far.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

# Cache columns per block of a decode BlockMask: FlexAttention's default block size.
DECODE_BLOCK = 128


def causal_mask(kv_valid: Tensor, q_len: int, sliding_window: int | None = None) -> Tensor:
    """Causal mask (B, 1, T, S) for the last `q_len` of S positions, where kv_valid (B, S) is False
    on padding. A query always sees itself, so a padding row is never all-masked (SDPA would
    return NaN there); what padding positions compute is ignored anyway."""
    S = kv_valid.shape[1]
    q_idx = torch.arange(S - q_len, S, device=kv_valid.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=kv_valid.device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed &= q_idx - k_idx < sliding_window
    mask = allowed[None] & kv_valid[:, None, :]  # (B, T, S)
    mask |= k_idx == q_idx
    return mask[:, None]


def document_mask(document_ids: Tensor, sliding_window: int | None = None, shared_prefix: bool = False) -> Tensor:
    """Dense mask (B, 1, T, T) for packed rows: causal, within the same document, and within the
    sliding window. document_ids (B, T) numbers the samples packed into each row (padding -1 forms
    a document of its own, which nothing real attends to). shared_prefix: document 0 is visible to
    every document of its row as well (it comes first, so causality keeps it a prefix)."""
    T = document_ids.shape[1]
    q_idx = torch.arange(T, device=document_ids.device)[:, None]  # (T, 1)
    k_idx = torch.arange(T, device=document_ids.device)[None, :]  # (1, T)
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed &= q_idx - k_idx < sliding_window
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    if shared_prefix:
        same_doc |= (document_ids == 0)[:, None, :]
    return (same_doc & allowed)[:, None]


def document_block_mask(document_ids: Tensor, sliding_window: int | None = None, shared_prefix: bool = False,
                        compiled: bool | None = None):
    """The FlexAttention BlockMask equivalent of document_mask, for CUDA. Built on the device of
    document_ids; every layer shares it. compiled (default: on CUDA): build it through torch.compile,
    one fused kernel over the (T, T) mask; eager evaluates mask_mod under vmap, some fifty kernels
    and about a millisecond of host time per call (measured in a GRPO step: bench/RESULTS.md)."""
    # Out of place only: an in-place `|=` here fails to compile ("Buffers cannot be created while
    # lowering a pointwise subgraph", torch 2.11).
    def mask_mod(b, h, q_idx, kv_idx):
        same = document_ids[b, q_idx] == document_ids[b, kv_idx]
        if shared_prefix:
            same = same | (document_ids[b, kv_idx] == 0)
        allowed = (q_idx >= kv_idx) & same
        if sliding_window is not None:
            allowed = allowed & (q_idx - kv_idx < sliding_window)
        return allowed

    B, T = document_ids.shape
    if compiled is None:
        compiled = document_ids.device.type == "cuda"
    build = _compiled_create_block_mask() if compiled else _create_block_mask()
    return build(mask_mod, B, None, T, T, device=document_ids.device)


def _create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask


_compiled_builder = None


def _compiled_create_block_mask():
    """torch.compile(create_block_mask), built on first use and shared: row lengths vary from batch
    to batch, so after the second length it compiles once more with a symbolic length and stops."""
    global _compiled_builder
    if _compiled_builder is None:
        _compiled_builder = torch.compile(_create_block_mask())
    return _compiled_builder


def packed_mask(document_ids: Tensor, sliding_window: int | None = None, shared_prefix: bool = False):
    """The mask a packed batch needs: FlexAttention's BlockMask on CUDA (it skips the blocks that
    cross documents), the dense equivalent elsewhere (FlexAttention has no CPU backward)."""
    if document_ids.device.type == "cuda":
        return document_block_mask(document_ids, sliding_window, shared_prefix)
    return document_mask(document_ids, sliding_window, shared_prefix)


def decode_block_mask(pad_len: Tensor, pos: Tensor, cache_len: int, sliding_window: int | None = None):
    """The FlexAttention BlockMask of one decode step over a static cache (model/generate.py's
    RolloutEngine): the query of row b, written at column pos, sees the columns pad_len[b] <= k <= pos
    (left padding before pad_len[b]) within the sliding window. The block lists hold only blocks that
    row can see, so attention reads the part of the cache written so far and no block of padding.
    Blocks wholly seen are listed as full (the kernel skips mask_mod there); the block holding pos
    and the one where the padding ends are partial (mask_mod applied). With a sliding window every
    listed block is partial. Everything is a tensor computed on the device from pad_len (B,) and pos
    (1,): no shape depends on the step, so it compiles and is captured once with the step. With one
    query per row and one block list for all heads, compiled FlexAttention runs its decoding kernel
    (the key/value sequence split across the GPU, the query heads of a key/value head in one tile)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, blocks = pad_len.shape[0], -(-cache_len // DECODE_BLOCK)
    j = torch.arange(blocks, dtype=torch.int32, device=pad_len.device)  # (blocks,)
    last = torch.div(pos, DECODE_BLOCK, rounding_mode="floor").to(torch.int32)  # (1,) holds column pos
    first = torch.div(pad_len, DECODE_BLOCK, rounding_mode="floor").to(torch.int32)  # (B,) holds column pad_len
    if sliding_window is None:
        # Full: the blocks after the one where padding ends (that one too when padding ends at its
        # edge) and before `last`. Partial: `last`, and the padding's block when it is not `last`.
        first_full = torch.div(pad_len + DECODE_BLOCK - 1, DECODE_BLOCK, rounding_mode="floor").to(torch.int32)
        full_num = (last - first_full).clamp(min=0)  # (B,)
        full_idx = (first_full[:, None] + j).clamp(max=blocks - 1)  # (B, blocks), the first full_num used
        head = (first < first_full) & (first < last)  # (B,) padding ends inside a block before `last`
        num = 1 + head.to(torch.int32)
        idx = torch.where(j == 0, torch.where(head, first, last)[:, None], last)  # (B, blocks): [first,] last
        full = (full_num.reshape(B, 1, 1).contiguous(), full_idx.reshape(B, 1, 1, blocks).contiguous())
    else:
        num = last + 1 - first  # every block from the padding's to `last`, all partial
        idx = (first[:, None] + j).clamp(max=blocks - 1)
        full = (None, None)

    def mask_mod(b, h, q_idx, kv_idx):
        seen = (kv_idx >= pad_len[b]) & (kv_idx <= pos[0])
        if sliding_window is not None:
            seen = seen & (pos[0] - kv_idx < sliding_window)
        return seen

    extra = {"compute_q_blocks": False} if _FROM_KV_BLOCKS_TAKES_COMPUTE_Q else {}  # no backward here
    return BlockMask.from_kv_blocks(num.reshape(B, 1, 1).contiguous(), idx.reshape(B, 1, 1, blocks).contiguous(),
                                    *full, BLOCK_SIZE=DECODE_BLOCK, mask_mod=mask_mod, seq_lengths=(1, cache_len),
                                    **extra)


def _from_kv_blocks_takes_compute_q() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover
        return False
    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


_FROM_KV_BLOCKS_TAKES_COMPUTE_Q = _from_kv_blocks_takes_compute_q()
