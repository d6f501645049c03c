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

from qarac_dist import data, models  # noqa: E402
from qarac_dist.config import deepspeed_config, load_config  # noqa: E402
from qarac_dist.ranks import export_from_environment  # noqa: E402


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    ranks = export_from_environment()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    torch.manual_seed(cfg.training.seed)
    splits = data.prepare(cfg)
    torch.manual_seed(cfg.training.seed)
    model = models.build_model(cfg, splits.num_labels, splits.tokenizer)
    optimizer = torch.optim.AdamW(models.param_groups(model, cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                                  betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps)
    schedule = lambda step: min(1.0, (step + 1) / (cfg.scheduler.warmup_steps + 1)) * max(  # noqa: E731
        0.0, 1 - max(0, step - cfg.scheduler.warmup_steps) / max(1, cfg.training.max_steps - cfg.scheduler.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, ranks.world_size),
                                           lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
    spec = models.input_spec(model)
    collate = data.Collator(splits.tokenizer.pad_token_id, spec.pad_multiple, spec.global_first_token)
    batches = data.StepBatches(np.asarray(splits.train["length"]), cfg.training.micro_batch_size,
                               cfg.training.gradient_accumulation_steps, ranks.world_size, ranks.rank,
                               cfg.training.seed, cfg.data.length_grouping).iterate()
    losses, seconds = [], []
    for _ in range(cfg.training.max_steps):
        started = time.perf_counter()
        total = 0.0
        for indices in next(batches):
            loss = engine(**collate(splits.train[indices.tolist()])).loss
            engine.backward(loss)
            engine.step()
            total += loss.item()
        seconds.append(time.perf_counter() - started)
        losses.append(total / cfg.training.gradient_accumulation_steps)
    if ranks.is_main:
        print(json.dumps({"losses": losses, "seconds": seconds}))


if __name__ == "__main__":
    main()
