"""A trial's parts, built the one way the trainer, preflight and the benches all use: the data
(prepared and tokenized), the model (seeded), and the collator the model's inputs need."""

from __future__ import annotations

from dataclasses import dataclass

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
