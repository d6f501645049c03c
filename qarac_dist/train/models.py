"""Model building: from the hub or a local directory, from a config alone, or from a factory."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..config import TrainConfig, UserError
from .hf_config import random_init_config

# Model types whose attention is windowed: inputs are padded to a multiple of the window and
# the first token gets global attention.
WINDOWED = {"longformer", "led"}


@dataclass
class InputSpec:
    """What the collator must do for this model."""

    pad_multiple: int
    global_first_token: bool


def input_spec(model: nn.Module) -> InputSpec:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in WINDOWED:
        window = config.attention_window
        return InputSpec(max(window) if isinstance(window, (list, tuple)) else int(window), True)
    return InputSpec(8, False)


def _import_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"model.factory: cannot import {spec!r}: {err}") from None


def build_model(cfg: TrainConfig, num_labels: int, tokenizer) -> nn.Module:
    """Build the model the config describes; random init is seeded by the caller."""
    from transformers import AutoModelForSequenceClassification

    m = cfg.model
    head = {"num_labels": num_labels}
    if m.task == "regression":
        head = {"num_labels": 1, "problem_type": "regression"}
    elif num_labels > 1:
        head["problem_type"] = "single_label_classification"
    if m.kind == "dual_encoder":
        from .composite import build_dual_encoder

        model = build_dual_encoder(cfg, tokenizer)
    elif m.name_or_path is not None:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(m.name_or_path, **head)
        except Exception as err:  # noqa: BLE001 - hub, network and cache errors, in one line
            from .hub import load_error

            raise load_error("model.name_or_path", m.name_or_path, err) from None
    elif m.config is not None:
        config = random_init_config(m.config, tokenizer, cfg.data.max_length, **head)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = _import_factory(m.factory)(num_labels=head["num_labels"], tokenizer=tokenizer, **m.factory_kwargs)
        if not isinstance(model, nn.Module):
            raise UserError(f"model.factory: {m.factory} returned {type(model).__name__}, not an nn.Module")
    if m.longformer_attention == "blocked":
        from .longformer_attention import install

        install(model)
    if m.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant activation checkpointing in every transformers model inside `model`.

    Non-reentrant: it works when inputs need no grad, with ZeRO-3, and with unused parameters.
    """
    from transformers import PreTrainedModel

    enabled = 0
    covered: set[int] = set()
    for module in model.modules():  # parents come before their children
        if id(module) in covered or not isinstance(module, PreTrainedModel):
            continue
        if not module.supports_gradient_checkpointing:
            continue
        kwargs = {"use_reentrant": False}
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        covered.update(id(m) for m in module.modules())
        enabled += 1
    if not enabled:
        raise UserError("model.activation_checkpointing: the model contains no transformers model "
                         "that supports activation checkpointing")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for weight matrices, none for biases, norms and embeddings' norms.

    A parameter of a normalization layer, or any 1-D parameter (biases, norm scales), goes to
    the no-decay group.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)
    no_decay = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norm_types) or "norm" in type(module).__name__.lower() or p.ndim < 2:
                no_decay.add(id(p))
    decay_params, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if id(p) in no_decay else decay_params).append(p)
    return [{"params": decay_params, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def output_value(output, key: str):
    """`output.loss` or `output["loss"]` for transformers outputs and plain dicts alike."""
    return output[key] if isinstance(output, Mapping) else getattr(output, key)
