"""Loss spikes and NaN (`training.spikes`): every rank checks, all decide together, the loop
rolls back (train/loop.py `Trainer.roll_back`).

Detection costs no forward pass: each step's loss (read anyway for the non-finite check) and
DeepSpeed's global gradient norm are compared with the mean and standard deviation of the last
`window` steps that were not spikes. Losses are rank-local, so each rank checks its own, and the
verdicts are gathered on the CPU group, in the gather that carries the stop-signal flag (no
collective of their own): every rank takes the same decision at the same step, and a spike seen
on one rank alone rolls all of them back. Losses are taken to be non-negative.

A rollback goes to the newest complete checkpoint (a trial with spikes on saves one at step 0,
so there always is one) and moves the data on: step s trains on the batch at data position
s - 1 + offset, and the rollback sets the offset so that the step after the checkpoint takes the
batch `margin` positions after the spike's. The offset travels in every checkpoint and in the
trial's rollbacks.json, which rank 0 writes before training goes on: a job killed between a
rollback and its next checkpoint resumes from that checkpoint with the offset the record gives.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..config.sections import SpikesConfig
from ..track.trial_dir import ROLLBACK, MetricsFile, TrialDir


class SpikesExhausted(RuntimeError):
    """A spike came after the trial had made its `max_rollbacks` rollbacks."""


@dataclass(frozen=True)
class Spike:
    step: int
    position: int
    """The data position of the step's batch."""
    rank: int
    """The rank whose check fired (the one furthest off, when several did)."""
    what: str
    """"loss" or "grad_norm"."""
    value: float
    z: float
    """Standard deviations above the window's mean; inf for a NaN or inf value."""

    def describe(self) -> str:
        if not math.isfinite(self.z):
            return f"{self.what} {self.value} on rank {self.rank}"
        return f"{self.what} {self.value:.4g}, z {self.z:.1f} on rank {self.rank}"


class History:
    """The last `size` values that were not spikes; z of a new one against them."""

    def __init__(self, size: int, min_ratio: float):
        self.values: deque[float] = deque(maxlen=size)
        self.min_ratio = min_ratio

    def z(self, value: float) -> float:
        """Standard deviations above the mean; 0 below `min_ratio` times the mean (a nearly
        constant window, as on the plateau before a model starts to learn, has a tiny deviation
        that ordinary noise would exceed many times over)."""
        if not math.isfinite(value):
            return math.inf
        n = len(self.values)
        if n < max(2, self.values.maxlen // 2):
            return 0.0  # too few steps to judge yet
        mean = sum(self.values) / n
        if value <= self.min_ratio * mean:
            return 0.0
        std = math.sqrt(max(0.0, sum(v * v for v in self.values) / n - mean * mean))
        return (value - mean) / std if std > 0 else math.inf


class SpikeGuard:
    """The per-trial state of `training.spikes`: the histories, and the rollbacks made."""

    def __init__(self, cfg: SpikesConfig, rank: int, world_size: int, group=None):
        self.cfg, self.rank, self.world_size, self.group = cfg, rank, world_size, group
        self.losses, self.norms = History(cfg.window, cfg.min_ratio), History(cfg.window, cfg.min_ratio)
        self.rollbacks = 0
        self.cut_after: Optional[int] = None
        """The step the last rollback went back to: the learning-rate cut counts from it."""

    def resume(self, state: dict, trial: TrialDir) -> int:
        """After loading a checkpoint (our `state` saved with it): the data offset to go on with,
        from the state and the trial's rollbacks.json (read by rank 0, which every rank follows)."""
        record: list = [trial.rollbacks() if self.rank == 0 else None]
        if self.world_size > 1:
            dist.broadcast_object_list(record, src=0, group=self.group)
        return self.reconcile(state.get("rollbacks", 0), state.get("data_offset", 0), record[0])

    def reconcile(self, saved_rollbacks: int, saved_offset: int, record: list[dict]) -> int:
        """Rollbacks the record holds beyond those the checkpoint knew were made after it, back
        to it (it was the newest): the last one's offset holds."""
        self.rollbacks = max(saved_rollbacks, len(record))
        if record:
            self.cut_after = record[-1]["to_step"]
        return record[-1]["offset"] if len(record) > saved_rollbacks else saved_offset

    def check(self, step: int, position: int, loss: float, grad_norm: Optional[float],
              stopping: int = 0) -> tuple[Optional[Spike], int]:
        """This step's verdict, the same on every rank, and the stop signal any rank got (0: none):
        both travel in the one gather a step already has (the stop flag's), so detection adds
        no collective. A step that is no spike joins the histories."""
        watched = self.cfg.grad_norm and grad_norm is not None
        mine = torch.tensor([self.losses.z(loss), loss, self.norms.z(grad_norm) if watched else 0.0,
                             grad_norm if watched else 0.0, float(stopping)], dtype=torch.float64)
        every = [mine]
        if self.world_size > 1:
            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine, group=self.group)
        stop = int(max(float(t[4]) for t in every))
        candidates = [Spike(step, position, r, what, float(t[i + 1]), float(t[i]))
                      for r, t in enumerate(every) for i, what in ((0, "loss"), (2, "grad_norm"))
                      if not float(t[i]) <= self.cfg.z]  # NaN compares false: a spike too
        if candidates:
            return max(candidates, key=lambda s: s.z), stop
        self.losses.values.append(loss)
        if watched:
            self.norms.values.append(grad_norm)
        return None, stop

    def lr_factor(self, step: int) -> float:
        """What the learning rate of `step` is multiplied by (the cut after a rollback)."""
        cut = self.cfg.lr_factor != 1 and self.cut_after is not None and \
            self.cut_after < step <= self.cut_after + self.cfg.lr_steps
        return self.cfg.lr_factor if cut else 1.0

    def exhausted(self, spike: Spike) -> Optional[str]:
        """Why the trial ends at this spike (its rollbacks are spent), or None."""
        if self.rollbacks < self.cfg.max_rollbacks:
            return None
        return (f"loss spike at step {spike.step} ({spike.describe()}) after {self.rollbacks} rollback(s), "
                f"training.spikes.max_rollbacks; lower optimizer.lr, or raise training.spikes.z or "
                f"training.spikes.max_rollbacks")

    def rolled_back(self, spike: Spike, to_step: int, offset: int, seconds: float = 0.0) -> dict:
        """Account a rollback to the checkpoint of `to_step`; returns its record (with the new
        data offset). `offset`: the data offset the spike's step ran with; `seconds`: the time
        the checkpoint took to load."""
        new_offset = spike.position + 1 + self.cfg.margin - to_step
        self.rollbacks += 1
        self.cut_after = to_step
        return {"rollback": self.rollbacks, "step": spike.step, "to_step": to_step, "what": spike.what,
                "value": spike.value if math.isfinite(spike.value) else str(spike.value),
                "z": spike.z if math.isfinite(spike.z) else None, "rank": spike.rank, "position": spike.position,
                "skipped": new_offset - offset, "offset": new_offset, "load_seconds": round(seconds, 3)}

    def line(self, spike: Spike, rollback: dict) -> str:
        """The job log's line for a rollback."""
        first, last = rollback["to_step"] + rollback["offset"] - rollback["skipped"], spike.position + self.cfg.margin
        cut = (f"; learning rate x{self.cfg.lr_factor:g} for {self.cfg.lr_steps} steps"
               if self.cfg.lr_factor != 1 and self.cfg.lr_steps else "")
        return (f"qarac_dist: loss spike at step {spike.step} ({spike.describe()}): rolled back to step "
                f"{rollback['to_step']}, skipping {rollback['skipped']} batches (data positions {first}-{last}){cut}; "
                f"rollback {rollback['rollback']} of {self.cfg.max_rollbacks}")


def announce(spike: Spike, rollback: dict, line: str, trial: TrialDir, metrics: MetricsFile, tracker,
             trial_run) -> None:
    """Rank 0 makes a rollback known: rollbacks.json first (a resume must skip the same data),
    the job's log, metrics.jsonl (the undone steps' rows go, the rollback's row stays), MLflow."""
    trial.add_rollback(rollback)
    print(line, file=sys.stderr, flush=True)
    metrics.rewind(rollback["to_step"])
    row = {ROLLBACK: rollback["rollback"], "spike_rolled_back_to": rollback["to_step"],
           "spike_batches_skipped": rollback["skipped"]}
    if rollback["z"] is not None:
        row.update(spike_value=spike.value, spike_z=spike.z)
    tracker.log(spike.step, row)
    if trial_run is not None:
        trial_run.set_tags({"spike_rollbacks": rollback["rollback"], "spike_last": line.removeprefix("qarac_dist: ")})


def grad_norm(engine, skipped_before: int) -> Optional[float]:
    """DeepSpeed's global gradient norm of the step just made; None where it reports none, or
    where it skipped the step by itself (an fp16 overflow: `skipped_steps` grew)."""
    norm = engine.get_global_grad_norm() if engine.skipped_steps == skipped_before else None
    return None if norm is None else float(norm)
