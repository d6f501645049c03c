"""Composite models built from transformers: two encoders, a pooling head and one loss.

`model.kind: dual_encoder` builds a DualEncoder: encoder A reads `input_ids`, encoder B (the
same weights when `shared`) reads `input_ids_b`; each side is pooled (mean, CLS or attention
pooling) and the two vectors are compared by cosine similarity. The loss is a cosine regression
against `labels` (scores in [0, 1]), or in-batch contrastive (each A's positive is its own B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UserError
from .hf_config import random_init_config


class AttentionPooling(nn.Module):
    """A learned query attends over the token states; padding is masked out."""

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Linear(hidden, 1)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(states).squeeze(-1).masked_fill(mask == 0, torch.finfo(states.dtype).min)
        weights = scores.softmax(-1).unsqueeze(-1)
        return (weights * states).sum(1)


def pool(kind: str, states: torch.Tensor, mask: torch.Tensor, head: nn.Module | None) -> torch.Tensor:
    if kind == "cls":
        return states[:, 0]
    if kind == "attention":
        return head(states, mask)
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class DualEncoder(nn.Module):
    def __init__(self, encoder_a: nn.Module, encoder_b: nn.Module | None, pooling: str, loss: str,
                 temperature: float = 0.05):
        super().__init__()
        self.encoder_a = encoder_a
        self.encoder_b = encoder_b  # None: shared weights
        self.pooling, self.loss_kind, self.temperature = pooling, loss, temperature
        self.config = encoder_a.config
        hidden = encoder_a.config.hidden_size
        self.pool_a = AttentionPooling(hidden) if pooling == "attention" else None
        self.pool_b = AttentionPooling(hidden) if pooling == "attention" and encoder_b is not None else None

    def embed(self, side: str, input_ids, attention_mask, **extra) -> torch.Tensor:
        encoder = self.encoder_a if side == "a" or self.encoder_b is None else self.encoder_b
        head = self.pool_a if side == "a" or self.pool_b is None else self.pool_b
        states = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return pool(self.pooling, states, attention_mask, head)

    def forward(self, input_ids, attention_mask, input_ids_b, attention_mask_b, labels=None,
                global_attention_mask=None, global_attention_mask_b=None, **_):
        extra_a = {"global_attention_mask": global_attention_mask} if global_attention_mask is not None else {}
        extra_b = {"global_attention_mask": global_attention_mask_b} if global_attention_mask_b is not None else {}
        a = self.embed("a", input_ids, attention_mask, **extra_a)
        b = self.embed("b", input_ids_b, attention_mask_b, **extra_b)
        scores = F.cosine_similarity(a, b, dim=-1)
        out = {"logits": scores.unsqueeze(-1)}
        if labels is not None:
            if self.loss_kind == "contrastive":
                sims = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / self.temperature
                out["loss"] = F.cross_entropy(sims, torch.arange(len(a), device=a.device))
            else:
                out["loss"] = F.mse_loss(scores, labels.to(scores.dtype))
        return out


def build_dual_encoder(cfg, tokenizer) -> DualEncoder:
    from transformers import AutoModel

    m, spec = cfg.model, cfg.model.dual_encoder
    # Only models with a pooler take add_pooling_layer; pass it only to remove one.
    kwargs = {} if spec.pooler else {"add_pooling_layer": False}
    if m.name_or_path is not None:
        make = lambda: AutoModel.from_pretrained(m.name_or_path, **kwargs)  # noqa: E731
    else:
        config = random_init_config(m.config, tokenizer, cfg.data.max_length)
        make = lambda: AutoModel.from_config(config, **kwargs)  # noqa: E731
    try:
        encoder_a = make()
        encoder_b = None if spec.shared else make()
    except TypeError as err:
        raise UserError(f"model.dual_encoder.pooler: this encoder cannot drop a pooler ({err})") from None
    return DualEncoder(encoder_a, encoder_b, spec.pooling, spec.loss, spec.temperature)
