"""Successive halving's record and its rule: one file per rung (base/layout.py), a line per
trial that reached it: its metric and validation loss, and the decision taken then. No process
but the trials themselves keeps it.

Each trial's rank 0, on reaching a rung, locks the rung's file (`fcntl.lockf`, exclusive),
reads every line, and either finds its own line (a requeued or re-run job: the decision is
replayed, never taken again) or decides from the values recorded so far (`keeps_going`),
appends its line, fsyncs, and unlocks. Trials arriving at once are so put in one order, each
deciding on the values of those before it.

Why a lock and an append rather than a file per trial renamed into place: on NFS a directory
listing and a rename made on another node may be seen late (attribute caching), while taking a
lock makes the client re-read the locked file, so every trial decides on every value recorded
before it. This needs locks that hold across nodes: NFS (NLM or v4) and Lustre mounted with
`-o flock`. A line cut short by a process killed mid-write is dropped on the next read.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..base.files import NOT_A_RECORD, DamagedFile, append_line, replace_with
from ..base.layout import SweepLayout
from ..base.lock import locked
from .trial_dir import TrialDir, TrialState

Score = tuple[float, float]
"""(the select metric, the validation loss) of a trial at a rung."""


def rank(score: Score, mode: str) -> tuple[float, float]:
    """Sort key, best first: the metric in its direction, then the lower loss; NaN last."""
    value, loss = score
    return (math.inf if math.isnan(value) else -value if mode == "max" else value,
            math.inf if math.isnan(loss) else loss)


def keeps_going(score: Score, recorded: list[Score], reduction_factor: int, mode: str) -> bool:
    """The rule (plan/asha.py says why): whether a trial with `score` at a rung continues,
    given the scores recorded at that rung before it (in any order)."""
    if math.isnan(score[0]):
        return False
    top = (len(recorded) + 1) // reduction_factor
    if top == 0:
        return True
    threshold = sorted(rank(s, mode) for s in [*recorded, score])[top - 1]
    return rank(score, mode) <= threshold


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
    def score(self) -> Score:
        return self.value, self.loss


def read(sweep: SweepLayout, rung: int) -> list[Arrival]:
    """The arrivals recorded at a rung, in order (a last line cut short is left out)."""
    try:
        data = sweep.rung(rung).read_bytes()
    except FileNotFoundError:
        return []
    return _parse(data, sweep, rung)[0]


def _apply(line: str, arrivals: list[Arrival]) -> None:
    """One line onto the arrivals: an arrival is added; a withdrawal (a rollback undid the steps
    that brought the trial to the rung) takes the trial's arrival back."""
    d = json.loads(line)
    if "withdrawn" in d:
        if set(d) != {"withdrawn", "step", "time"} or not isinstance(d["withdrawn"], str) or type(d["step"]) is not int:
            raise ValueError("not a withdrawal")
        arrivals[:] = [a for a in arrivals if a.trial != d["withdrawn"]]
    else:
        arrivals.append(_arrival(d))


def _arrival(d: dict) -> Arrival:
    return Arrival(str(d["trial"]), float(d["value"]), float(d.get("loss", "nan")), int(d["step"]),
                   bool(d["continue"]), int(d["seen"]), float(d["time"]))


def _parse(data: bytes, sweep: SweepLayout, rung: int) -> tuple[list[Arrival], int]:
    """Arrivals, and the bytes that hold whole lines. A whole line that is no record stops every
    trial that reaches the rung (its decisions depend on every line), so it is named, with the
    way to rebuild the file."""
    arrivals, good = [], 0
    *whole, _cut_short = data.split(b"\n")
    for number, raw in enumerate(whole, 1):
        line = raw.decode(errors="replace")
        try:
            _apply(line, arrivals)
        except NOT_A_RECORD:
            raise DamagedFile(f"{sweep.rung(rung)}: rung {rung}, line {number} is not a rung record: {line[:100]!r}; "
                              f"rebuild the file from the trials' own records with python -m qarac_dist.status "
                              f"--repair {sweep.root}") from None
        good += len(raw) + 1
    return arrivals, good


def rebuild(sweep: SweepLayout, rung: int, metric: str, trials: list[tuple[str, TrialDir, int]]) -> Optional[Path]:
    """Rebuild rung `rung`'s file if a line of it is damaged: the lines that are records, then
    each trial (id, directory, its step at this rung) that validated there and has no line, its
    decision from its own state (PRUNED at this rung: stopped; else it went on). The damaged
    file is kept beside it; returns that copy's path (None: the file was whole or absent)."""
    path = sweep.rung(rung)
    try:
        data = path.read_bytes()
        _parse(data, sweep, rung)
        return None
    except FileNotFoundError:
        return None
    except DamagedFile:
        pass
    arrivals = []
    for line in data.decode(errors="replace").splitlines():
        try:
            _apply(line, arrivals)
        except NOT_A_RECORD:
            continue
    for trial, directory, step in trials:
        row = next((r for r in directory.metrics() if r.get("step") == step and f"val_{metric}" in r), None)
        if row is None or any(a.trial == trial for a in arrivals):
            continue
        status = directory.status()
        stopped = status is not None and status.state == TrialState.PRUNED and status.rung == rung
        arrivals.append(Arrival(trial, float(row[f"val_{metric}"]), float(row.get("val_loss", math.nan)), step,
                                not stopped, len(arrivals), time.time()))
    kept = path.with_name(f"{path.name}.before-repair-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, kept)
    replace_with(path, lambda tmp: tmp.write_text("".join(a.to_json() + "\n" for a in arrivals)))
    return kept


def arrive(sweep: SweepLayout, rung: int, trial: str, score: Score, step: int,
           decide: Callable[[Score, list[Score]], bool]) -> Arrival:
    """Record `trial`'s score (metric, validation loss) at `rung` and return the decision, or
    replay the one recorded."""
    with locked(sweep.rung(rung), mode="a+b") as f:  # closing the file releases the lock
        f.seek(0)
        arrivals, good = _parse(f.read(), sweep, rung)
        mine: Optional[Arrival] = next((a for a in arrivals if a.trial == trial), None)
        if mine is not None:
            return mine
        arrival = Arrival(trial, *score, step, decide(score, [a.score for a in arrivals]), len(arrivals), time.time())
        append_line(f, good, arrival.to_json())
        return arrival


def withdraw(sweep: SweepLayout, rung: int, trial: str, step: int) -> bool:
    """Take back `trial`'s arrival at `rung` (a line saying so): a rollback to `step` undid the
    steps that brought it there, so its score there belongs to no model, and it is decided again
    when it reaches the rung. False: it had none."""
    if not sweep.rung(rung).exists():
        return False
    with locked(sweep.rung(rung), mode="a+b") as f:
        f.seek(0)
        arrivals, good = _parse(f.read(), sweep, rung)
        if not any(a.trial == trial for a in arrivals):
            return False
        append_line(f, good, json.dumps({"withdrawn": trial, "step": step, "time": time.time()}))
        return True


def stopped_at(sweep: SweepLayout, trial: str, rung_steps: list[int], step: int) -> Optional[dict]:
    """The first rung at or before `step` where `trial` was told to stop, as the loop's `pruned`
    (None: none). A job that resumes past such a rung (a signal or a kill came between the
    decision and the trial's end) stops there: a decision recorded is acted on, whatever came next."""
    for k, rung_step in enumerate(rung_steps):
        if rung_step > step:
            break
        mine = next((a for a in read(sweep, k) if a.trial == trial), None)
        if mine is not None and not mine.keeps_going:
            return {"rung": k, "step": rung_step}
    return None
