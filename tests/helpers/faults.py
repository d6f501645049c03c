"""Test hooks for failure cases, importable by jobs (the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import torch
from torch import nn


class NanAfter(nn.Module):
    """A Longformer classifier whose training loss turns NaN after `steps` forward passes."""

    def __init__(self, inner: nn.Module, steps: int):
        super().__init__()
        self.inner, self.steps, self.calls = inner, steps, 0
        self.config = inner.config

    def forward(self, **batch):
        out = self.inner(**batch)
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                out["loss"] = out["loss"] * torch.tensor(float("nan"))
        return out


def nan_after(num_labels, tokenizer, steps=3):
    from transformers import LongformerConfig, LongformerForSequenceClassification

    config = LongformerConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              attention_window=32, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              max_position_embeddings=330, num_labels=num_labels)
    return NanAfter(LongformerForSequenceClassification(config), steps)
