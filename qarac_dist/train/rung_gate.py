"""Successive halving as the loop meets it (track/rungs.py keeps the record): rank 0 records the
trial's arrival at a rung and decides, finds a decision recorded before a requeue, looks whether
a seed's configuration was stopped, or withdraws the arrivals a rollback undid; every rank
follows through the control (gloo) group."""

from __future__ import annotations

import math
from typing import Optional

import torch.distributed as dist

from ..config.sections import AshaConfig
from ..track import rungs
from ..track.job_context import JobContext
from .ranks import Ranks


def _rule(asha: AshaConfig):
    return lambda mine, before: rungs.keeps_going(mine, before, asha.reduction_factor, asha.mode)


def _seeds(context: JobContext) -> Optional[rungs.Seeds]:
    """With repeats: the trial's configuration and its seeds, whose mean a rung decides on."""
    return rungs.Seeds(context.configuration, tuple(context.seeds), tuple(context.seeds.values())) \
        if context.configuration else None


def stop_at(asha: AshaConfig, ranks: Ranks, group, context: JobContext, trial: str, step: int,
            metrics: dict[str, float]) -> Optional[dict]:
    """After a validation: where the trial stops (the loop's `pruned`), or None. At a rung it
    records the metric (or replays the decision recorded before); a seed also looks, at every
    validation, whether its configuration was stopped at a rung it passed (plan/asha.py)."""
    seeds = _seeds(context)
    if seeds is None and step not in asha.rungs:  # every rank knows: nothing to agree on
        return None
    stop: list = [None]
    if ranks.is_main:
        if seeds is not None:
            stop[0] = rungs.stopped_at(context.sweep, trial, asha.rungs, step, seeds, _rule(asha))
        if stop[0] is None and step in asha.rungs:
            rung = asha.rungs.index(step)
            score = (float(metrics[asha.metric]), float(metrics.get("loss", math.nan)))
            if not rungs.arrive(context.sweep, rung, trial, score, step, _rule(asha), seeds).keeps_going:
                stop[0] = {"rung": rung, "step": step}
    if ranks.world_size > 1:
        dist.broadcast_object_list(stop, src=0, group=group)
    return stop[0]


def recorded_stop(asha: AshaConfig, ranks: Ranks, group, context: JobContext, trial: str, step: int) -> Optional[dict]:
    """A rung at or before `step` this trial (or a seed's configuration) was told to stop at
    (the loop's `pruned`), or None."""
    stop: list = [None]
    if ranks.is_main:
        stop[0] = rungs.stopped_at(context.sweep, trial, asha.rungs, step, _seeds(context), _rule(asha))
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
