"""A minimal hand-written DeepSpeed loop: the baseline that bench/trainer.py holds our loop to.

Same config, model, data, batch order and seed as `python -m qarac_dist.train`, but the loop is
the bare minimum: forward, backward, step, read the loss. Prints one JSON object with per-step
losses and seconds.

    python bench/minimal_loop.py CONFIG [dotted.key=value ...]
"""

import json
import os
import sys
import time

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from qarac_dist.config import deepspeed_config, load_config  # noqa: E402
from qarac_dist.train import batches as batching  # noqa: E402
from qarac_dist.train.build import build_parts, optimizer_for  # noqa: E402
from qarac_dist.train.ranks import export_from_environment  # noqa: E402


def build(cfg, ranks):
    """The same model (same seed), data and batch order as the trainer, in a bare engine."""
    parts = build_parts(cfg)
    splits, model, collate = parts.splits, parts.model, parts.collate
    optimizer = optimizer_for(cfg, model)
    warmup, total = cfg.scheduler.warmup_steps, cfg.training.max_steps
    schedule = lambda step: min(1.0, (step + 1) / (warmup + 1)) * max(  # noqa: E731
        0.0, 1 - max(0, step - warmup) / max(1, total - warmup))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, ranks.world_size),
                                           lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
    batches = batching.StepBatches(np.asarray(splits.train["length"][:]), cfg.training.micro_batch_size,
                               cfg.training.gradient_accumulation_steps, ranks.world_size, ranks.rank,
                               cfg.training.seed, cfg.data.length_grouping).iterate()
    return engine, splits, collate, batches


def step(engine, splits, collate, micro_batches) -> float:
    """Forward, backward, step; the mean loss of the micro batches."""
    total = 0.0
    for indices in micro_batches:
        loss = engine(**collate(splits.train[indices.tolist()])).loss
        engine.backward(loss)
        engine.step()
        total += loss.item()
    return total / len(micro_batches)


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    ranks = export_from_environment()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    engine, splits, collate, batches = build(cfg, ranks)
    losses, seconds = [], []
    for _ in range(cfg.training.max_steps):
        started = time.perf_counter()
        losses.append(step(engine, splits, collate, next(batches)))
        seconds.append(time.perf_counter() - started)
    if ranks.is_main:
        print(json.dumps({"losses": losses, "seconds": seconds}))


if __name__ == "__main__":
    main()
