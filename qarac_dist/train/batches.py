"""Batching, planned per optimizer step: one step takes `micro_batch x accumulation x world`
examples, which are split into micro batches per rank. So micro batch 2 x accumulation 4 sees
exactly the examples of micro batch 8, and a step's examples do not depend on the ZeRO stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..config import UserError


class StepBatches:
    """Deterministic, length-grouped, rank-sharded batches, planned one optimizer step at a time.

    Per epoch, the indices are shuffled with `seed + epoch`, cut into windows of 50 steps,
    sorted by length inside each window (so a micro batch holds similar lengths), cut into
    steps, and the steps shuffled. A step's sorted examples are dealt as `accumulation x world`
    micro batches; micro batch `a` of rank `r` is chunk `a * world + r`, so ranks process
    similar lengths at the same time. The tail that does not fill a step is dropped.
    """

    WINDOW_STEPS = 50

    def __init__(self, lengths: np.ndarray, micro_batch: int, accumulation: int, world_size: int,
                 rank: int, seed: int, group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.micro, self.accumulation, self.world, self.rank = micro_batch, accumulation, world_size, rank
        self.seed, self.group = seed, group_by_length
        self.step_size = micro_batch * accumulation * world_size
        self.steps_per_epoch = len(self.lengths) // self.step_size
        if self.steps_per_epoch == 0:
            raise UserError(f"training.micro_batch_size: a step needs {self.step_size} examples "
                             f"(micro x accumulation x world), the training set has {len(self.lengths)}")

    def epoch_steps(self, epoch: int) -> np.ndarray:
        """All steps of an epoch, shape (steps, step_size), each row sorted by length."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.step_size]
        if self.group:
            window = self.WINDOW_STEPS * self.step_size
            order = np.concatenate([
                chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(window, len(order), window))])
        steps = order.reshape(self.steps_per_epoch, self.step_size)
        return steps[rng.permutation(self.steps_per_epoch)]

    def for_rank(self, step_indices: np.ndarray) -> list[np.ndarray]:
        chunks = step_indices.reshape(self.accumulation * self.world, self.micro)
        return [chunks[a * self.world + self.rank] for a in range(self.accumulation)]

    def iterate(self, start_step: int = 0) -> Iterator[list[np.ndarray]]:
        """Yield this rank's micro batches for each optimizer step, from global step `start_step`."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            steps = self.epoch_steps(epoch)
            for row in steps[offset:]:
                yield self.for_rank(row)
            epoch, offset = epoch + 1, 0


@dataclass
class Collator:
    """Pads a micro batch to its longest example, rounded up to `pad_multiple`; for Longformer,
    the multiple is the attention window and the first token gets global attention."""

    pad_token_id: int
    pad_multiple: int = 8
    global_first_token: bool = False
    regression: bool = False

    def __call__(self, rows: dict) -> dict:
        import torch

        batch = self._side(rows, "")
        if "input_ids_b" in rows:  # a dual encoder's second text
            batch.update(self._side(rows, "_b"))
        batch["labels"] = torch.tensor(rows["labels"], dtype=torch.float if self.regression else torch.long)
        return batch

    def _side(self, rows: dict, suffix: str) -> dict:
        import torch

        ids = rows[f"input_ids{suffix}"]
        longest = max(len(x) for x in ids)
        width = -(-longest // self.pad_multiple) * self.pad_multiple
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(x)
            attention[i, : len(x)] = 1
        batch = {f"input_ids{suffix}": input_ids, f"attention_mask{suffix}": attention}
        if f"token_type_ids{suffix}" in rows:
            types_ = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(rows[f"token_type_ids{suffix}"]):
                types_[i, : len(x)] = torch.as_tensor(x)
            batch[f"token_type_ids{suffix}"] = types_
        if self.global_first_token:
            glob = torch.zeros_like(attention)
            glob[:, 0] = 1
            batch[f"global_attention_mask{suffix}"] = glob
        return batch
