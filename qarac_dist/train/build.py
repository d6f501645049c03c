"""A trial's parts, built the one way the trainer, preflight and the benches all use: the data
(prepared and tokenized), the model (seeded), and the collator the model's inputs need."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig, UserError
from . import batches, data, models


@dataclass
class Parts:
    splits: data.Splits
    model: nn.Module
    collate: batches.Collator


def build_parts(cfg: TrainConfig, with_validation: bool = False) -> Parts:
    """Prepare the data (call on rank 0 first when the cache is cold: see Trainer), then build
    the model from `training.seed` and its collator. `with_validation`: the validation rows join
    the training split (a final retraining, submit/retrain.py)."""
    splits = data.prepare(cfg)
    if with_validation:
        splits = data.with_validation(splits)
    torch.manual_seed(cfg.training.seed)
    model = models.build_model(cfg, splits.num_labels, splits.tokenizer)
    spec = models.input_spec(model)
    collate = batches.Collator(splits.tokenizer.pad_token_id, spec.pad_multiple, spec.global_first_token,
                            cfg.model.task == "regression")
    return Parts(splits, model, collate)


def build_on_ranks(cfg: TrainConfig, ranks, group, with_validation: bool = False) -> Parts:
    """`build_parts` on every rank of a job. On a cold cache rank 0 goes first: it generates
    data, checks the labels, trains the tokenizer and fills the datasets cache; the others then
    read the cache instead of racing to write it, or learn the mistake it found (one line on
    every rank, no rank left waiting). Once every rank sees a completed preparation of this
    recipe, they all read at once."""
    import torch.distributed as dist

    warm = torch.tensor([int(data.prepared_marker(cfg).exists())])
    if ranks.world_size > 1:
        dist.all_reduce(warm, op=dist.ReduceOp.MIN, group=group)
    if warm or ranks.world_size == 1:
        return build_parts(cfg, with_validation)
    failure: list = [None]
    if ranks.is_main:
        try:
            parts = build_parts(cfg, with_validation)
        except UserError as err:
            failure[0] = str(err)
    dist.broadcast_object_list(failure, src=0, group=group)
    if failure[0] is not None:
        raise UserError(failure[0])
    return parts if ranks.is_main else build_parts(cfg, with_validation)


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
