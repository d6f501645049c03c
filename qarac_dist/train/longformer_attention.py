"""Longformer's self-attention computed in blocks, on the same parameters as Hugging Face's.

`install(model)` swaps the forward of every `LongformerSelfAttention` inside `model` for
`blocked_forward`; the module, its parameters (query, key, value and their `_global` twins) and
what `save_pretrained` writes are unchanged, so hub checkpoints load as before.

HF's semantics, reproduced exactly:
- a token attends to the tokens within `attention_window / 2` on either side of it (its own
  window, per layer) through the local projections, padded tokens never, and global tokens
  not through the window but as global keys, which every token attends to (local projections);
- a global token attends to every unpadded token through the global projections
  (query_global, key_global, value_global), and that output replaces its local one;
- padded positions' outputs are zero; attention dropout applies to the probabilities, local
  and global keys alike, in training.

How: queries in blocks of `w` (the one-sided window), each block against the three key blocks
around it (`3w` keys) plus the global keys, with a boolean band mask, through
`scaled_dot_product_attention` on 4-D tensors, so PyTorch can pick a fused kernel (its flash
kernel on CPU, a fused one on CUDA). HF instead builds overlapping chunks of twice the window,
diagonal reshapes and full-size float masks (transformers#18186). Small windows make many small
blocks; blocks of several windows are used then (`block_size`), trading a few masked scores for
larger matrix products. `output_attentions=True` falls back to HF's code, with a warning.
"""

from __future__ import annotations

import math
import types
import warnings

import torch
import torch.nn.functional as F

MIN_BLOCK = 128
"""Query blocks hold at least this many tokens (a multiple of the one-sided window)."""


def install(model: torch.nn.Module) -> int:
    """Use the blocked attention in every Longformer self-attention of `model`; returns how many."""
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    count = 0
    for module in model.modules():
        if isinstance(module, LongformerSelfAttention):
            module.forward = types.MethodType(blocked_forward, module)
            count += 1
    return count


def block_size(window: int, length: int) -> int:
    """Query block length: a multiple of the one-sided window `window`, at least MIN_BLOCK, that
    divides the (window-padded) sequence length."""
    blocks = max(1, math.ceil(MIN_BLOCK / window))
    while (length // window) % blocks:
        blocks -= 1
    return blocks * window


def blocked_forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                    is_global_attn=None, output_attentions=False):
    if output_attentions:
        _warn_once("output_attentions=True: Longformer attention falls back to Hugging Face's implementation")
        return type(self).forward(self, hidden_states, attention_mask, is_index_masked, is_index_global_attn,
                                  is_global_attn, output_attentions)
    batch, length, _ = hidden_states.shape
    heads, dim, w = self.num_heads, self.head_dim, self.one_sided_attn_window_size
    dropout = self.dropout if self.training else 0.0
    q = self.query(hidden_states).view(batch, length, heads, dim)
    k = self.key(hidden_states).view(batch, length, heads, dim)
    v = self.value(hidden_states).view(batch, length, heads, dim)

    # Global keys, gathered (local projections), each batch row's padded to the longest.
    if is_global_attn:
        counts = is_index_global_attn.sum(dim=1)
        slots = int(counts.max())
        order = torch.argsort((~is_index_global_attn).to(torch.int8), dim=1, stable=True)[:, :slots]
        present = torch.arange(slots, device=q.device)[None, :] < counts[:, None]  # (batch, slots)
        k_global = torch.gather(k, 1, order[:, :, None, None].expand(-1, -1, heads, dim))
        v_global = torch.gather(v, 1, order[:, :, None, None].expand(-1, -1, heads, dim))
    else:
        slots = 0

    size = block_size(w, length)
    blocks = length // size
    span = size + 2 * w  # a block's queries see w keys on either side of it
    # (batch * blocks, heads, size, dim): queries of each block
    q_blocks = q.view(batch, blocks, size, heads, dim).permute(0, 1, 3, 2, 4).reshape(batch * blocks, heads, size, dim)
    k_blocks = _spans(k, w, size, span)
    v_blocks = _spans(v, w, size, span)
    # Which keys each query may see: within w of it, in the sequence, not padded, not global.
    local_key = ~(is_index_masked | is_index_global_attn) if is_global_attn else ~is_index_masked
    valid = F.pad(local_key, (w, w), value=False).unfold(1, span, size)  # (batch, blocks, span)
    rows = torch.arange(size, device=q.device)[:, None]
    cols = torch.arange(span, device=q.device)[None, :]
    band = (cols - w - rows).abs() <= w  # (size, span)
    mask = band[None, None] & valid[:, :, None, :]  # (batch, blocks, size, span)
    if slots:
        k_blocks = torch.cat([_per_block(k_global, blocks), k_blocks], dim=2)
        v_blocks = torch.cat([_per_block(v_global, blocks), v_blocks], dim=2)
        mask = torch.cat([present[:, None, None, :].expand(batch, blocks, size, slots), mask], dim=3)
    # A padded query may see nothing; let it see everything (its output is zeroed below).
    padded_query = is_index_masked.view(batch, blocks, size, 1)
    mask = (mask | padded_query).reshape(batch * blocks, 1, size, -1)
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask, dropout_p=dropout)
    out = out.view(batch, blocks, heads, size, dim).permute(0, 1, 3, 2, 4).reshape(batch, length, heads, dim)
    out = out.masked_fill(is_index_masked[:, :, None, None], 0.0)

    if slots:
        out = _global_rows(self, hidden_states, out, order, present, is_index_masked, dropout)
    return (out.reshape(batch, length, heads * dim),)


def _spans(x: torch.Tensor, w: int, size: int, span: int) -> torch.Tensor:
    """(batch, length, heads, dim) -> (batch * blocks, heads, span, dim): for each query block,
    the keys from w before it to w after it (zeros beyond the sequence, masked anyway)."""
    batch, _, heads, dim = x.shape
    padded = F.pad(x, (0, 0, 0, 0, w, w))
    spans = padded.unfold(1, span, size)  # (batch, blocks, heads, dim, span)
    return spans.permute(0, 1, 2, 4, 3).reshape(-1, heads, span, dim)


def _per_block(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """(batch, slots, heads, dim) -> (batch * blocks, heads, slots, dim), the same for each block."""
    batch, slots, heads, dim = x.shape
    return x.permute(0, 2, 1, 3)[:, None].expand(batch, blocks, heads, slots, dim).reshape(-1, heads, slots, dim)


def _global_rows(self, hidden_states, out, order, present, is_index_masked, dropout):
    """Global tokens attend to every unpadded token through the global projections; their rows
    replace the local ones."""
    batch, length, heads, dim = out.shape
    slots = order.shape[1]
    hidden_global = torch.gather(hidden_states, 1, order[:, :, None].expand(-1, -1, hidden_states.shape[-1]))
    q = self.query_global(hidden_global).view(batch, slots, heads, dim).transpose(1, 2)
    k = self.key_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
    v = self.value_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
    mask = (~is_index_masked)[:, None, None, :].expand(batch, 1, slots, length)
    rows = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout).transpose(1, 2)
    # Scatter the real slots back to their positions (empty slots point at position 0 of a row
    # with fewer global tokens; their values are written to a scratch index instead).
    target = torch.where(present, order, torch.full_like(order, length))
    scratch = torch.cat([out, out.new_zeros(batch, 1, heads, dim)], dim=1)
    scratch = scratch.scatter(1, target[:, :, None, None].expand(-1, -1, heads, dim), rows)
    return scratch[:, :length]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
