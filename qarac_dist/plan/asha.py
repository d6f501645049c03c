"""Asynchronous successive halving (ASHA), the stopping variant, as pure functions.

Rungs sit at `grace_steps * reduction_factor**k` training steps, below the trial's last step.
When a trial validates at a rung it records its value there and continues only if the value is
among the top `1/reduction_factor` of the values recorded at that rung so far, its own
included; no trial waits for another. Where fewer than `reduction_factor` values are recorded
(the first arrivals), there is no top fraction yet and the trial continues.

Against Optuna's SuccessiveHalvingPruner (tests/unit/test_asha.py runs both on the same
arrivals): with `reduction_factor` or more values recorded the decisions are the same, ties at
the threshold continuing in both. With fewer, Optuna continues only a trial whose value is the
best so far; here every first arrival continues, so an early slow starter is not cut before
there is anything to compare it with. A NaN value stops the trial in both, first arrival or not,
and counts as the worst for the trials after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def rung_steps(grace_steps: int, reduction_factor: int, max_steps: int) -> list[int]:
    """The steps at which a trial of `max_steps` meets a rung (its last step is not one)."""
    steps, step = [], grace_steps
    while step < max_steps:
        steps.append(step)
        step *= reduction_factor
    return steps


def keeps_going(value: float, recorded: list[float], reduction_factor: int, mode: str) -> bool:
    """Whether a trial whose metric at a rung is `value` continues, given the values recorded at
    that rung before it (in any order)."""
    if math.isnan(value):
        return False
    values = [*recorded, value]
    top = len(values) // reduction_factor
    if top == 0:
        return True
    finite = sorted((v for v in values if not math.isnan(v)), reverse=(mode == "max"))
    threshold = finite[top - 1] if top <= len(finite) else finite[-1]
    return value >= threshold if mode == "max" else value <= threshold


@dataclass(frozen=True)
class Budget:
    """Training steps a sweep of `num_trials` identical trials can spend."""

    most: int
    """If no trial is stopped."""
    halving: int
    """If each rung passes exactly 1/reduction_factor of the trials that reach it."""


def budget(num_trials: int, max_steps: int, rungs: list[int], reduction_factor: int) -> Budget:
    steps, alive, previous = 0.0, float(num_trials), 0
    for rung in rungs:
        steps += alive * (rung - previous)
        alive, previous = max(1.0, alive / reduction_factor), rung
    steps += alive * (max_steps - previous)
    return Budget(num_trials * max_steps, round(steps))
