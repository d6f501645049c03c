"""Test hooks, all in one place: faults the integration tests inject into real training jobs.

`QARAC_FAULT` holds comma-separated entries `NAME:N:RANK` (RANK `*`: every rank). Unset, every
hook is one dictionary lookup that finds nothing.

    checkpoint-write:STEP:RANK  SIGKILL while writing the checkpoint of STEP (once per directory)
    kill:STEP:RANK              SIGKILL right after the update of STEP (once per directory)
    usr2:STEP:RANK              SLURM's warning signal then: the job saves at STEP (once per directory)
    stop:STEP:RANK              SIGSTOP then: frozen, not ended, until a SIGCONT or a kill (once per
                                directory; its marker says it has stopped)
    loss-nan:POS:RANK           the loss of the batch at data position POS is NaN on RANK
    loss-x100:POS:RANK          the loss (and so the gradient) of that batch is 100 times larger
    drop:POS:*                  the batch at data position POS is not in the data at all

A data position counts batches from the start of the data (0-based), so a fault stays with its
batch when a rollback moves the steps (train/spikes.py).
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path


@functools.lru_cache(maxsize=4)
def _entries(value: str) -> frozenset[tuple[str, ...]]:
    return frozenset(tuple(entry.split(":")) for entry in value.split(",") if entry.count(":") == 2)


def active(name: str, n: int, rank: int) -> bool:
    entries = _entries(os.environ.get("QARAC_FAULT", ""))
    return (name, str(n), str(rank)) in entries or (name, str(n), "*") in entries


def once(name: str, step: int, rank: int, directory: Path, signum: int = signal.SIGKILL) -> None:
    """At fault point `name`: send this process `signum` if QARAC_FAULT names this step and rank,
    once per directory (a marker remembers it, so the resumed job goes past)."""
    if not active(name, step, rank):
        return
    marker = Path(directory) / f".fault-{name}-{step}-{rank}"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signum)


def loss_factor(position: int, rank: int) -> float:
    """What the loss of the batch at `position` is multiplied by on this rank (1: no fault)."""
    if active("loss-nan", position, rank):
        return float("nan")
    return 100.0 if active("loss-x100", position, rank) else 1.0


def dropped(position: int) -> bool:
    return active("drop", position, 0)


def after_step(step: int, rank: int, directory: Path) -> None:
    """The fault points right after a step's update: `kill`, `usr2` and `stop`."""
    once("kill", step, rank, directory)
    once("usr2", step, rank, directory, signal.SIGUSR2)
    once("stop", step, rank, directory, signal.SIGSTOP)
