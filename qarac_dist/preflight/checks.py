"""Rules that need more than the config's own fields: the tokenizer, the model, the world size."""

from __future__ import annotations

from ..config.rules import batch_on_ranks


def check_config(cfg, tokenizer=None, model=None, world_size: int = 1) -> list[str]:
    """Rules that need more than the config's own fields: the tokenizer, the model, the world."""
    problems = list(batch_on_ranks(cfg, world_size))
    config = getattr(model, "config", None)
    if tokenizer is not None and config is not None and getattr(config, "vocab_size", None):
        if len(tokenizer) > config.vocab_size:
            problems.append(f"tokenizer: {len(tokenizer)} tokens, more than the model's embeddings "
                            f"(model vocab_size {config.vocab_size}); set model.config.vocab_size or tokenizer.name_or_path")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None:
        offset = 2 if getattr(config, "model_type", "") in ("roberta", "longformer", "xlm-roberta") else 0
        if cfg.data.max_length + offset > positions:
            problems.append(f"data.max_length: {cfg.data.max_length} tokens, beyond the model's "
                            f"{positions - offset} positions (model max_position_embeddings {positions})")
    if getattr(config, "model_type", None) == "longformer":
        window = config.attention_window
        windows = window if isinstance(window, (list, tuple)) else [window]
        if any(w % 2 for w in windows):
            problems.append(f"model.config.attention_window: {window} must be even")
    return problems


def warnings_for(cfg, model=None) -> list[str]:
    notes = []
    config = getattr(model, "config", None)
    if cfg.precision.dtype == "fp16" and getattr(config, "model_type", None) == "longformer":
        notes.append("precision.dtype: fp16 with Longformer is known to stall or go NaN "
                     "(transformers#21449); prefer bf16 where the GPU has it")
    if cfg.deepspeed.zero_stage == 3 and cfg.model.activation_checkpointing:
        notes.append("model.activation_checkpointing: qarac_dist uses non-reentrant checkpointing, which ZeRO-3 needs "
                     "(reentrant checkpointing breaks ZeRO-3's parameter gathering)")
    return notes
