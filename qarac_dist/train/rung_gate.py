"""Successive halving as the loop meets it (track/rungs.py keeps the record): rank 0 records the
trial's arrival at a rung and decides, finds a decision recorded before a requeue, or withdraws
the arrivals a rollback undid; every rank follows through the control (gloo) group."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..config.sections import AshaConfig
from ..track import rungs
from .ranks import Ranks


def keeps_going(asha: AshaConfig, ranks: Ranks, group, sweep, trial: str, rung: int, step: int,
                metrics: dict[str, float]) -> bool:
    """Record the metric at `rung` (or replay the decision recorded before) and decide."""
    going = torch.tensor([1])
    if ranks.is_main:
        score = (float(metrics[asha.metric]), float(metrics.get("loss", math.nan)))
        arrival = rungs.arrive(sweep, rung, trial, score, step,
                               lambda mine, before: rungs.keeps_going(mine, before, asha.reduction_factor, asha.mode))
        going[0] = int(arrival.keeps_going)
    if ranks.world_size > 1:
        dist.broadcast(going, src=0, group=group)
    return bool(going.item())


def recorded_stop(asha: AshaConfig, ranks: Ranks, group, sweep, trial: str, step: int) -> Optional[dict]:
    """A rung at or before `step` this trial was told to stop at (the loop's `pruned`), or None."""
    stop: list = [None]
    if ranks.is_main:
        stop[0] = rungs.stopped_at(sweep, trial, asha.rungs, step)
    if ranks.world_size > 1:
        dist.broadcast_object_list(stop, src=0, group=group)
    return stop[0]


def withdraw_after(asha: AshaConfig, ranks: Ranks, sweep, trial: str, step: int) -> None:
    """A rollback to `step` undid the steps that brought the trial to the rungs past it: rank 0
    withdraws those arrivals, to be decided again when the trial reaches them (a config run on
    its own keeps no rung record)."""
    if ranks.is_main and sweep is not None:
        for rung, rung_step in enumerate(asha.rungs):
            if rung_step > step:
                rungs.withdraw(sweep, rung, trial, step)
