"""Attention masks, all in one place: causal with left padding (generation), and packed rows
(several documents per row, training), each with the sliding window applied when the model has one.
A packed row may also share a prefix (`shared_prefix`): document 0 is a prompt and every later
document of the row is one response continuing it, so a prompt scored with several responses (DPO's
chosen and rejected, GRPO's group) goes through the model once.

A mask is either a bool tensor broadcastable to (B, H, T, S) (True = attend), used by SDPA, or a
FlexAttention BlockMask (CUDA), which lets attention skip whole blocks that cross documents. Both
say the same thing: query q sees key k when k <= q, k is in q's document (or is not padding), and
q - k < sliding_window.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
