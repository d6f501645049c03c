"""A transformers config for a randomly initialised model, filled in the one way every model
builder here uses: vocabulary size and padding id from the tokenizer, positions from the data."""

from __future__ import annotations

from typing import Optional


def random_init_config(fields: dict, tokenizer, max_length: Optional[int] = None, **head):
    """`fields`: `model_type` and fields of its config class. `vocab_size` and `pad_token_id`
    default to the tokenizer's; `max_position_embeddings` to `max_length + 2` when given
    (RoBERTa-style models offset positions by 2). `head`: num_labels, problem_type."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in fields.items() if k != "model_type"}
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if max_length is not None:
        kwargs.setdefault("max_position_embeddings", max_length + 2)
    return AutoConfig.for_model(fields["model_type"], **kwargs, **head)
