"""Asynchronous successive halving (ASHA), the stopping variant: where the rungs are and what a
sweep can spend, as pure functions. The rule a trial applies at a rung runs inside the trial's
job, beside the record it reads (track/rungs.py `keeps_going`); it is described here.

Rungs sit at `grace_steps * reduction_factor**k` training steps, below the trial's last step.
When a trial validates at a rung it records its score there and continues only if the score is
among the top `1/reduction_factor` of the scores recorded at that rung so far, its own
included; no trial waits for another. Where fewer than `reduction_factor` scores are recorded
(the first arrivals), there is no top fraction yet and the trial continues.

A score is the select metric, then the validation loss: trials equal on the metric are ranked
by their loss, the order that picks the best trial (track/best.py). Accuracy on a few hundred
examples ties often early in training (every trial that predicts the majority class scores the
same), and ties would otherwise all continue.

Against Optuna's SuccessiveHalvingPruner (tests/unit/test_asha.py runs both on the same
arrivals): with `reduction_factor` or more scores recorded the decisions are the same, except
at a tie on the metric at the threshold, which Optuna lets continue and which is decided here
by the loss. With fewer, Optuna continues only a trial whose value is the best so far; here
every first arrival continues, so an early slow starter is not cut before there is anything to
compare it with. A NaN metric stops the trial in both, first arrival or not, and counts as the
worst for the trials after it; a NaN loss ranks last among equal metrics.

With repeats (K seeds per configuration) a rung decides a configuration, not a trial, and its
seeds are pruned together. Each seed records its score at the rung and goes on training; the
seed whose arrival completes the configuration there (all K recorded) decides on the
configuration's mean score (metric, then loss; a NaN in any seed makes the mean NaN, which
stops it) against the means of the configurations decided at that rung before it, by the rule
above. A seed that ended (failed, cancelled, completed or pruned otherwise) before the rung
cannot report there: the configuration is then decided on the seeds that reported, by
whichever of its seeds looks next (one arriving, or one waiting at its next validation), and
the decision names the seeds it was taken without. No seed waits: an earlier seed keeps
training, looks at each validation (and on resuming) whether its configuration was stopped,
and stops PRUNED at that rung, so it may train a few validation intervals past the rung. A
configuration whose living seeds all ended before the decision could be taken stays undecided
there (`waiting` in the rung table), and nothing of it is stopped.

The first arrivals at a rung are whoever starts first, so a sweep with successive halving
starts its trials in the order of their ids (plan/expand.py), a shuffle that re-planning
reproduces: a grid written in sorted order would otherwise start one end of every axis first
(the smallest learning rates, the shallowest models), and those would pass the first rungs
unopposed. Optuna's GridSampler takes grid points in random order for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

def rung_steps(grace_steps: int, reduction_factor: int, max_steps: int) -> list[int]:
    """The steps at which a trial of `max_steps` meets a rung (its last step is not one)."""
    steps, step = [], grace_steps
    while step < max_steps:
        steps.append(step)
        step *= reduction_factor
    return steps


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
