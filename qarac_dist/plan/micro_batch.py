"""Micro batches found by `preflight --find-batch-size`, planned into the trials they fit.

Pure: the search itself runs in preflight/batch_size.py; here only which trials share a memory
shape, and how a found micro batch changes a trial's config.
"""

from __future__ import annotations

import json


def memory_key(config: dict) -> str:
    """Trials with the same key build the same model on the same inputs and need the same
    memory at the same micro batch (learning rates, seeds and step counts do not matter)."""
    data = config["data"]
    keep = {"model": config["model"], "tokenizer": config["tokenizer"],
            "data": {k: data.get(k) for k in ("max_length", "text_pair_column", "synthetic", "dataset",
                                              "train_files")},
            "deepspeed": config["deepspeed"], "precision": config["precision"]}
    return json.dumps(keep, sort_keys=True, default=str)


def found(config: dict, micro_batches: dict, world_size: int) -> dict:
    """The overrides that put the found micro batch into a resolved trial config: {} when none
    was found for its memory shape.

    With `training.global_batch_size` set, the micro batch is the largest found-or-smaller one
    that divides the per-rank batch, and accumulation makes up the rest; otherwise accumulation
    is left alone and the global batch grows with the micro batch."""
    entry = micro_batches.get(memory_key(config)) if micro_batches else None
    if not entry or not entry.get("micro_batch_size"):
        return {}
    training = config["training"]
    micro = entry["micro_batch_size"]
    out = {"training.micro_batch_size": micro}
    if training.get("global_batch_size"):
        per_rank = training["global_batch_size"] // world_size
        micro = max(b for b in range(1, min(micro, per_rank) + 1) if per_rank % b == 0)
        out = {"training.micro_batch_size": micro, "training.gradient_accumulation_steps": per_rank // micro}
    return out
