"""Successive halving's record: one file per rung, `<sweep>/asha/rung<k>.jsonl`, a line per trial
that reached it: its metric and validation loss, and the decision taken then. No process but
the trials themselves keeps it.

Each trial's rank 0, on reaching a rung, locks the rung's file (`fcntl.lockf`, exclusive),
reads every line, and either finds its own line (a requeued or re-run job: the decision is
replayed, never taken again) or decides from the values recorded so far (plan/asha.py),
appends its line, fsyncs, and unlocks. Trials arriving at once are so put in one order, each
deciding on the values of those before it.

Why a lock and an append rather than a file per trial renamed into place: on NFS a directory
listing and a rename made on another node may be seen late (attribute caching), while taking a
lock makes the client re-read the locked file, so every trial decides on every value recorded
before it. This needs locks that hold across nodes: NFS (NLM or v4) and Lustre mounted with
`-o flock`. A line cut short by a process killed mid-write is dropped on the next read.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import UserError


@dataclass(frozen=True)
class Arrival:
    trial: str
    value: float
    """The select metric."""
    loss: float
    """The validation loss (NaN in records written before it was kept)."""
    step: int
    keeps_going: bool
    seen: int
    """Values recorded at the rung before this one."""
    time: float

    def to_json(self) -> str:
        return json.dumps({"trial": self.trial, "value": self.value, "loss": self.loss, "step": self.step,
                           "continue": self.keeps_going, "seen": self.seen, "time": self.time})

    @property
    def score(self) -> tuple[float, float]:
        return self.value, self.loss


def rung_file(record_dir: Path, rung: int) -> Path:
    return Path(record_dir) / f"rung{rung}.jsonl"


def read(record_dir: Path, rung: int) -> list[Arrival]:
    """The arrivals recorded at a rung, in order (a last line cut short is left out)."""
    try:
        text = rung_file(record_dir, rung).read_text()
    except FileNotFoundError:
        return []
    return _parse(text)[0]


def _parse(text: str) -> tuple[list[Arrival], int]:
    """Arrivals, and the length of the text that holds whole lines."""
    arrivals, good = [], 0
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            d = json.loads(line)
            arrivals.append(Arrival(d["trial"], float(d["value"]), float(d.get("loss", "nan")), int(d["step"]),
                                    bool(d["continue"]), int(d["seen"]), float(d["time"])))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"asha record damaged: a line of rung file is not a record: {line[:100]!r}") from None
        good += len(line)
    return arrivals, good


def arrive(record_dir: Path, rung: int, trial: str, score: tuple[float, float], step: int,
           decide: Callable[[tuple[float, float], list[tuple[float, float]]], bool]) -> Arrival:
    """Record `trial`'s score (metric, validation loss) at `rung` and return the decision, or
    replay the one recorded."""
    path = rung_file(record_dir, rung)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise UserError(f"{path}: cannot lock ({err.strerror}); successive halving needs fcntl locks on the "
                                f"sweep's filesystem (Lustre: mount with -o flock)") from None
            raise
        f.seek(0)
        arrivals, good = _parse(f.read())
        mine: Optional[Arrival] = next((a for a in arrivals if a.trial == trial), None)
        if mine is not None:
            return mine
        if good != f.tell():
            f.truncate(good)  # a line cut short by a killed writer
        arrival = Arrival(trial, *score, step, decide(score, [a.score for a in arrivals]), len(arrivals), time.time())
        f.write(arrival.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
        return arrival  # closing the file releases the lock
