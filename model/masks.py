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


def document_block_mask(document_ids: Tensor, sliding_window: int | None = None, shared_prefix: bool = False):
    """The FlexAttention BlockMask equivalent of document_mask, for CUDA. Built once per forward,
    on the device of document_ids; every layer shares it."""
    from torch.nn.attention.flex_attention import create_block_mask

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
    return create_block_mask(mask_mod, B, None, T, T, device=document_ids.device)


def packed_mask(document_ids: Tensor, sliding_window: int | None = None, shared_prefix: bool = False):
    """The mask a packed batch needs: FlexAttention's BlockMask on CUDA (it skips the blocks that
    cross documents), the dense equivalent elsewhere (FlexAttention has no CPU backward)."""
    if document_ids.device.type == "cuda":
        return document_block_mask(document_ids, sliding_window, shared_prefix)
    return document_mask(document_ids, sliding_window, shared_prefix)


def decode_block_mask(pad_len: Tensor, pos: Tensor, cache_len: int, sliding_window: int | None = None):
    """The FlexAttention BlockMask of one decode step over a static cache (model/generate.py's
    RolloutEngine): the query of row b, written at column pos, sees the columns pad_len[b] <= k <= pos
    (left padding before pad_len[b]) within the sliding window. The block list holds the blocks up
    to pos only, so attention reads the part of the cache written so far and not the whole buffer;
    every listed block is partial (the mask is applied in it). Everything is a tensor computed on
    the device from pad_len (B,) and pos (1,): no shape depends on the step, so it compiles and is
    captured once with the step. With one query per row and one block list for all heads, compiled
    FlexAttention runs its decoding kernel (the key/value sequence split across the GPU, the query
    heads of a key/value head in one tile)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, blocks = pad_len.shape[0], -(-cache_len // DECODE_BLOCK)
    written = torch.div(pos, DECODE_BLOCK, rounding_mode="floor") + 1  # (1,) blocks holding columns <= pos
    kv_num_blocks = written.to(torch.int32).expand(B).reshape(B, 1, 1)  # (B, H=1, query blocks=1)
    kv_indices = torch.arange(blocks, dtype=torch.int32, device=pad_len.device).expand(B, 1, 1, blocks)

    def mask_mod(b, h, q_idx, kv_idx):
        seen = (kv_idx >= pad_len[b]) & (kv_idx <= pos[0])
        if sliding_window is not None:
            seen = seen & (pos[0] - kv_idx < sliding_window)
        return seen

    extra = {"compute_q_blocks": False} if _FROM_KV_BLOCKS_TAKES_COMPUTE_Q else {}  # no backward here
    return BlockMask.from_kv_blocks(kv_num_blocks.contiguous(), kv_indices.contiguous(), BLOCK_SIZE=DECODE_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(1, cache_len), **extra)


def _from_kv_blocks_takes_compute_q() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover
        return False
    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


_FROM_KV_BLOCKS_TAKES_COMPUTE_Q = _from_kv_blocks_takes_compute_q()
