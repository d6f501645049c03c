"""Validation: the forward passes over the validation set on every rank, gathered into one set
of metrics (train/metrics.py computes them)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from . import models
from .metrics import classification_metrics, regression_metrics


@torch.no_grad()
def evaluate(engine, splits, collate, order: np.ndarray, ranks, cfg, to_device) -> dict[str, float]:
    """The validation metrics, over `order` (the validation rows, longest first). Each rank runs
    the same number of forward passes (ZeRO-3 gathers parameters collectively); a rank whose
    shard ran out repeats an example and drops its output."""
    size = cfg.evaluation.batch_size
    mine = order[ranks.rank::ranks.world_size]
    num_batches = -(-(-(-len(order) // ranks.world_size)) // size)
    engine.eval()
    outputs, indices = [], []
    for b in range(num_batches):
        chunk = mine[b * size:(b + 1) * size]
        rows = chunk if len(chunk) else order[:1]
        batch = to_device(collate(splits.validation[rows.tolist()]))
        batch.pop("labels")
        logits = models.output_value(engine(**batch), "logits")
        outputs.append(logits[: len(chunk)].float().cpu().numpy())
        indices.append(chunk)
    engine.train()
    gathered = [(np.concatenate(indices), np.concatenate(outputs))]
    if ranks.world_size > 1:
        gathered = [None] * ranks.world_size
        dist.all_gather_object(gathered, (np.concatenate(indices), np.concatenate(outputs)))
    seen = np.concatenate([g[0] for g in gathered])
    logits = np.concatenate([g[1] for g in gathered])
    labels = np.asarray(splits.validation["labels"][:])[seen]
    if cfg.model.task == "regression":
        return regression_metrics(logits.reshape(-1), labels)
    return classification_metrics(logits, labels)
