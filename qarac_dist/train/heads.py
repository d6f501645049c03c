"""A sentence-embedding classifier, shipped as a model factory.

    model:
      factory: qarac_dist.train.heads:sentence_classifier
      factory_kwargs: {encoder: sentence-transformers/all-MiniLM-L6-v2, hidden: 25,
                       dropout: 0.5, label_smoothing: 0.1}

A transformers encoder (a sentence-transformer checkpoint, or any AutoModel), pooled to one
vector per text (mean over tokens, as sentence-transformers do, or CLS), then a head: dropout,
an optional hidden layer of `hidden` units (0: none, a linear probe), the output layer, and
cross-entropy with label smoothing. This is the head the variants of
configs/sbert_imdb_grid.yaml vary.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..config import UserError
from .composite import pool
from .hf_config import random_init_config


class SentenceClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", hidden: int = 0,
                 dropout: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.encoder, self.pooling, self.label_smoothing = encoder, pooling, label_smoothing
        self.config = encoder.config
        width = encoder.config.hidden_size
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_labels))
        self.head = nn.Sequential(*layers)

    def forward(self, input_ids, attention_mask, labels=None, token_type_ids=None, **_):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        logits = self.head(pool(self.pooling, states, attention_mask, None))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return out


def sentence_classifier(num_labels: int, tokenizer, encoder: str | None = None, encoder_config: dict | None = None,
                        pooling: str = "mean", hidden: int = 0, dropout: float = 0.0,
                        label_smoothing: float = 0.0) -> SentenceClassifier:
    """`encoder`: a hub name or local directory (no pooler is loaded: the head pools itself);
    `encoder_config`: `model_type` and config fields for a randomly initialised encoder instead."""
    from transformers import AutoModel

    if pooling not in ("mean", "cls"):
        raise UserError(f"model.factory_kwargs.pooling: expected mean or cls, got {pooling!r}")
    if (encoder is None) == (encoder_config is None):
        raise UserError("model.factory_kwargs: give exactly one of encoder (a pretrained name or path) "
                        "and encoder_config")
    if encoder is not None:
        model = AutoModel.from_pretrained(encoder, add_pooling_layer=False)
    else:
        model = AutoModel.from_config(random_init_config(encoder_config, tokenizer), add_pooling_layer=False)
    return SentenceClassifier(model, num_labels, pooling, hidden, dropout, label_smoothing)
