"""A trial's parts, built the one way the trainer, preflight and the benches all use: the data
(prepared and tokenized), the model (seeded), and the collator the model's inputs need."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from . import data, models


@dataclass
class Parts:
    splits: data.Splits
    model: nn.Module
    collate: data.Collator


def build_parts(cfg: TrainConfig) -> Parts:
    """Prepare the data (call on rank 0 first when the cache is cold: see Trainer), then build
    the model from `training.seed` and its collator."""
    splits = data.prepare(cfg)
    torch.manual_seed(cfg.training.seed)
    model = models.build_model(cfg, splits.num_labels, splits.tokenizer)
    spec = models.input_spec(model)
    collate = data.Collator(splits.tokenizer.pad_token_id, spec.pad_multiple, spec.global_first_token,
                            cfg.model.task == "regression")
    return Parts(splits, model, collate)


def optimizer_for(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over decay and no-decay groups (DeepSpeed's CPU Adam when optimizer states are
    offloaded)."""
    opt = cfg.optimizer
    groups = models.param_groups(model, opt.weight_decay)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(kind: str, warmup_steps: int, max_steps: int):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn
