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
kernel on CPU, a fused one on CUDA). The keys of each block are gathered in one copy whose
backward adds the three overlapping slices back (`_Spans`), rather than through unfold, whose
backward fills and scatters a padded buffer. HF instead builds overlapping chunks of twice the
window, diagonal reshapes and full-size float masks (transformers#18186).
`output_attentions=True` falls back to HF's code, with a warning.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch
import torch.nn.functional as F

def install(model: torch.nn.Module) -> int:
    """Use the blocked attention in every Longformer self-attention of `model`; returns how many."""
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    count = 0
    for module in model.modules():
        if isinstance(module, LongformerSelfAttention):
            module.forward = types.MethodType(blocked_forward, module)
            count += 1
    return count


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

    size = w  # queries per block: one-sided window (larger blocks measured slower, bench/RESULTS.md)
    blocks = length // size
    q_blocks = q.view(batch, blocks, size, heads, dim).permute(0, 1, 3, 2, 4).reshape(batch * blocks, heads, size, dim)
    # Which keys each query may see: within w of it, in the sequence, not padded, not global.
    local_key = ~(is_index_masked | is_index_global_attn) if is_global_attn else ~is_index_masked
    valid = F.pad(local_key, (w, w), value=False).unfold(1, size + 2 * w, size)  # (batch, blocks, size + 2w)
    mask = _band(size, w, q.device)[None, None] & valid[:, :, None, :]  # (batch, blocks, size, size + 2w)
    k_blocks = _Spans.apply(k, w, size, k_global if slots else None)
    v_blocks = _Spans.apply(v, w, size, v_global if slots else None)
    if slots:
        mask = torch.cat([present[:, None, None, :].expand(batch, blocks, size, slots), mask], dim=3)
    padded = bool(is_index_masked.any())
    if padded:  # a padded query may see nothing: let it see all (its output is zeroed below)
        mask = mask | is_index_masked.view(batch, blocks, size, 1)
    mask = mask.reshape(batch * blocks, 1, size, -1)
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask, dropout_p=dropout)
    out = out.view(batch, blocks, heads, size, dim).permute(0, 1, 3, 2, 4).reshape(batch, length, heads, dim)
    if padded:
        out = out.masked_fill(is_index_masked[:, :, None, None], 0.0)

    if slots:
        out = _global_rows(self, hidden_states, out, order, present, is_index_masked, dropout)
    return (out.reshape(batch, length, heads * dim),)


class _Spans(torch.autograd.Function):
    """(batch, length, heads, dim) -> (batch * blocks, heads, [slots +] size + 2w, dim): for each
    block of `size` queries, the global keys (if any), then the last w keys of the block before
    it, its own and the first w of the one after it (zeros beyond the sequence: masked anyway),
    gathered in one copy. Backward adds the overlapping slices back into place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: int, size: int, global_: torch.Tensor | None) -> torch.Tensor:
        batch, length, heads, dim = x.shape
        blocks, slots = length // size, 0 if global_ is None else global_.shape[1]
        own = x.view(batch, blocks, size, heads, dim).permute(0, 1, 3, 2, 4)  # a view
        out = x.new_empty(batch, blocks, heads, slots + size + 2 * w, dim)
        if slots:
            out[:, :, :, :slots] = global_.permute(0, 2, 1, 3)[:, None]
        before, mine, after = slice(slots, slots + w), slice(slots + w, slots + w + size), slice(slots + w + size, None)
        out[:, 1:, :, before] = own[:, :-1, :, size - w:]
        out[:, :1, :, before] = 0
        out[:, :, :, mine] = own
        out[:, :-1, :, after] = own[:, 1:, :, :w]
        out[:, -1:, :, after] = 0
        ctx.shape, ctx.w, ctx.size, ctx.slots = x.shape, w, size, slots
        return out.view(batch * blocks, heads, slots + size + 2 * w, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        batch, length, heads, dim = ctx.shape
        w, size, slots = ctx.w, ctx.size, ctx.slots
        grad = grad.view(batch, length // size, heads, slots + size + 2 * w, dim)
        own = grad[:, :, :, slots + w:slots + w + size].clone()
        own[:, :-1, :, size - w:] += grad[:, 1:, :, slots:slots + w]  # the next block saw these as before it
        own[:, 1:, :, :w] += grad[:, :-1, :, slots + w + size:]  # the previous block saw these as after it
        grad_x = own.permute(0, 1, 3, 2, 4).reshape(batch, length, heads, dim)
        grad_global = grad[:, :, :, :slots].sum(dim=1).permute(0, 2, 1, 3) if slots else None
        return grad_x, None, None, grad_global


@functools.lru_cache(maxsize=64)
def _band_cpu(size: int, w: int) -> torch.Tensor:
    rows = torch.arange(size)[:, None]
    cols = torch.arange(size + 2 * w)[None, :]
    return (cols - w - rows).abs() <= w  # query r of a block sees key column c: |c - w - r| <= w


def _band(size: int, w: int, device: torch.device) -> torch.Tensor:
    band = _band_cpu(size, w)
    return band if device.type == "cpu" else band.to(device)


def _global_rows(self, hidden_states, out, order, present, is_index_masked, dropout):
    """Global tokens attend to every unpadded token through the global projections; their rows
    replace the local ones."""
    batch, length, heads, dim = out.shape
    slots = order.shape[1]
    hidden_global = torch.gather(hidden_states, 1, order[:, :, None].expand(-1, -1, hidden_states.shape[-1]))
    q = self.query_global(hidden_global).view(batch, slots, heads, dim).transpose(1, 2)  # (b, h, slots, d)
    if slots * 4 <= hidden_states.shape[-1]:
        rows = _few_global_queries(self, hidden_states, q, is_index_masked, dropout)
    else:
        k = self.key_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
        v = self.value_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
        mask = None if not bool(is_index_masked.any()) else \
            (~is_index_masked)[:, None, None, :].expand(batch, 1, slots, length)
        rows = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    rows = rows.transpose(1, 2)  # (batch, slots, heads, dim)
    # Scatter the real slots back to their positions (empty slots point at position 0 of a row
    # with fewer global tokens; their values are written to a scratch index instead).
    if bool(present.all()):
        return out.scatter(1, order[:, :, None, None].expand(-1, -1, heads, dim), rows)
    target = torch.where(present, order, torch.full_like(order, length))
    scratch = torch.cat([out, out.new_zeros(batch, 1, heads, dim)], dim=1)
    scratch = scratch.scatter(1, target[:, :, None, None].expand(-1, -1, heads, dim), rows)
    return scratch[:, :length]


def _few_global_queries(self, hidden_states, q, is_index_masked, dropout):
    """The global rows without the global keys and values of every token: with few global
    queries, (q Wk) X^T is far cheaper than q (X Wk^T)^T, and P (X Wv^T) is (P X) Wv^T. The key
    bias adds the same to every score of a row, which softmax ignores; the value bias comes
    out as itself, since each row of P sums to 1. Same result, up to float rounding; used where
the global queries are few against the width (4 or more times fewer)."""
    batch, heads, slots, dim = q.shape
    width = hidden_states.shape[-1]
    scale = dim ** -0.5
    w_key = self.key_global.weight.view(heads, dim, width)
    q = q * scale
    scores = torch.einsum("bhgd,hdw,blw->bhgl", q, w_key, hidden_states)
    # The key bias's term is the same for a whole row; kept so its gradient is HF's (about zero).
    scores = scores + torch.einsum("bhgd,hd->bhg", q, self.key_global.bias.view(heads, dim))[..., None]
    scores = scores.masked_fill(is_index_masked[:, None, None, :], float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), p=dropout)
    mixed = torch.einsum("bhgl,blw->bhgw", probs, hidden_states)
    w_value = self.value_global.weight.view(heads, dim, width)
    return torch.einsum("bhgw,hdw->bhgd", mixed, w_value) + self.value_global.bias.view(1, heads, 1, dim)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
