"""Model-based search's record, `search.jsonl` in the sweep directory (base/layout.py): a line
per ask (the slot, the values chosen, the sampler's state after it as data, how many results it
was told) and a line per result (the slot and trial, how it ended, its value, its values at
validations). Every line is JSON of numbers and strings, never a pickle, so the record is
O(trials) and reading it runs no code.

With repeats a slot is a configuration: one ask, whose values its K seeds (trials) all run
with, and a result line per seed; the sampler is told the configuration's result once every
seed has one (Record.results).

Kept as the rung records are (track/rungs.py says why on NFS): each writer locks the file
(`fcntl.lockf`, exclusive; the kernel releases it when the holder dies, so a killed process
never blocks the next), reads every line, appends, fsyncs and unlocks. A slot asked once is
never asked again: a requeued or re-run job finds its line and replays the values. A last line
cut short by a killed writer is dropped on the next write; a whole line that is no record is
named and skipped.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..base.files import NOT_A_RECORD, append_line, replace_with
from ..base.layout import SweepLayout
from ..base.lock import locked


@dataclass(frozen=True)
class Ask:
    slot: int
    trial: str
    """The trial id the slot runs as."""
    params: dict
    state: dict
    """The sampler's state after this ask, as data (plan/search.py's state_of); {} in a line an
    older qarac_dist wrote, which pickled the sampler instead (never read)."""
    told_before: int
    """Results recorded when it was asked: it was chosen from all of them."""
    time: float
    run_id: Optional[str] = None
    """The trial's MLflow child run, made when it was asked; with repeats, the configuration's
    run (made by the driver), which was given the values asked."""
    seeds: tuple = ()
    """With repeats: the trial ids of the configuration's seeds, whose results make its result;
    empty without (the slot's one trial is `trial`)."""


@dataclass(frozen=True)
class Tell:
    slot: int
    state: str
    """COMPLETE, PRUNED or FAIL (Optuna's names)."""
    value: Optional[float] = None
    intermediate: dict = field(default_factory=dict)
    time: float = 0.0
    attempt: Optional[int] = None
    """The sweep's attempt of the slot's trial this result is of (None: a record from before
    attempts were kept). A later attempt's result replaces an earlier one's."""
    trial: Optional[str] = None
    """The trial this result is of (with repeats, one seed of the slot's configuration); None in
    a line from before trials were named, of the slot's one trial."""


@dataclass
class Record:
    asks: list[Ask]
    tells: list[Tell]
    damaged: list[str] = field(default_factory=list)
    """A line per complete line that is no record, skipped (its number and its start)."""

    def asked(self, slot: int) -> Optional[Ask]:
        return next((a for a in self.asks if a.slot == slot), None)

    def told(self, slot: int, trial: Optional[str] = None) -> Optional[Tell]:
        """The latest result of the slot (of its trial `trial`, with repeats)."""
        return next((t for t in reversed(self.tells) if t.slot == slot and (trial is None or t.trial in (None, trial))),
                    None)

    def results(self) -> dict[int, Tell]:
        """What the sampler is told of each slot that has a result: its trial's latest result;
        with repeats, its configuration's (configuration_result), once each of its seeds has one."""
        latest = {}
        for t in self.tells:  # a later line is of a later attempt (tell)
            latest[t.slot] = latest[t.slot, t.trial] = t
        out = {}
        for a in self.asks:
            if not a.seeds:
                if a.slot in latest:
                    out[a.slot] = latest[a.slot]
            elif all((a.slot, trial) in latest for trial in a.seeds):
                out[a.slot] = configuration_result([latest[a.slot, trial] for trial in a.seeds])
        return out


def configuration_result(seeds: list[Tell]) -> Tell:
    """A configuration's result from its seeds' latest ones. PRUNED when a rung stopped a seed
    (successive halving stops a configuration, all its seeds, on their mean: plan/asha.py);
    else COMPLETE with the mean score of the seeds that completed with a finite one: a seed that
    failed (or completed without a score) is left out of the mean, as the sweep's choice leaves
    it out (track/best.py); FAIL when none did. Its values at validations: at each step, the
    mean over the seeds that reported there."""
    steps: dict[str, list[float]] = {}
    for t in seeds:
        for step, v in t.intermediate.items():
            if math.isfinite(v):
                steps.setdefault(step, []).append(v)
    curve = {step: statistics.fmean(steps[step]) for step in sorted(steps, key=int)}
    scores = [t.value for t in seeds if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    state, value = ("PRUNED", None) if any(t.state == "PRUNED" for t in seeds) else \
        ("COMPLETE", statistics.fmean(scores)) if scores else ("FAIL", None)
    return Tell(seeds[0].slot, state, value, curve, max(t.time for t in seeds))


_REPORTED: set[str] = set()
STATES = ("COMPLETE", "PRUNED", "FAIL")


def _params(params: dict) -> dict:
    """An ask's values: searched keys to numbers, strings and booleans (what the sampler gives)."""
    if not all(isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in params.items()):
        raise ValueError("params")
    return dict(params)


def _parse(data: bytes, where: str) -> tuple[Record, int]:
    """The record, and the bytes that hold whole lines. A whole line that is no record (a disk's
    or an editor's damage) is skipped and said once per process, with its number: one bad line
    must not stop every ask, tell and runner of the sweep."""
    record, good = Record([], []), 0
    *whole, _cut_short = data.split(b"\n")
    for number, raw in enumerate(whole, 1):
        line = raw.decode(errors="replace")
        try:
            d = json.loads(line)
            if "ask" in d:
                record.asks.append(Ask(int(d["ask"]), str(d["trial"]), _params(d["params"]), dict(d.get("state", {})),
                                       int(d["told_before"]), float(d["time"]), d.get("run_id"),
                                       tuple(str(t) for t in d.get("seeds", ()))))
            elif d["state"] in STATES:
                record.tells.append(Tell(int(d["tell"]), d["state"], None if d["value"] is None else float(d["value"]),
                                         {str(int(k)): float(v) for k, v in d.get("intermediate", {}).items()},
                                         float(d["time"]), None if d.get("attempt") is None else int(d["attempt"]),
                                         None if d.get("trial") is None else str(d["trial"])))
            else:
                raise ValueError(f"state {d['state']!r}")
        except NOT_A_RECORD:
            damage = f"{where}: line {number} is not a search record, skipped: {line[:100]!r}"
            record.damaged.append(damage)
            if damage not in _REPORTED:
                _REPORTED.add(damage)
                print(f"qarac_dist: {damage}", file=sys.stderr, flush=True)
        good += len(raw) + 1
    return record, good


def read(sweep: SweepLayout) -> Record:
    try:
        data = sweep.search.read_bytes()
    except FileNotFoundError:
        return Record([], [])
    return _parse(data, str(sweep.search))[0]


def ask(sweep: SweepLayout, slot: int, trial: str,
        choose: Callable[[Record], tuple[dict, dict, Optional[str]]], seeds: tuple = ()) -> Ask:
    """The values of `slot`: those recorded, or chosen now (`choose(record)` -> params, sampler
    state, MLflow run id) from everything recorded, and recorded. With repeats, `seeds` (the
    configuration's trials) asks for all of them: whichever starts first asks, the others replay."""
    with locked(sweep.search, mode="a+b") as f:  # closing the file releases the lock
        f.seek(0)
        record, good = _parse(f.read(), str(sweep.search))
        mine = record.asked(slot)
        if mine is not None:
            return mine
        params, state, run_id = choose(record)
        mine = Ask(slot, trial, params, state, len(record.tells), time.time(), run_id, tuple(seeds))
        line = asdict(mine)
        line["ask"] = line.pop("slot")
        if not seeds:  # the line a sweep without repeats always wrote
            line.pop("seeds")
        append_line(f, good, json.dumps(line))
        return mine


def tell(sweep: SweepLayout, slot: int, state: str, value: Optional[float], intermediate: dict,
         attempt: Optional[int] = None, trial: Optional[str] = None) -> None:
    """Record how attempt `attempt` of `slot`'s trial `trial` ended: once per attempt (a second
    result for it is ignored), and a later attempt's result after an earlier one's (the latest
    counts: a trial that failed, then completed on a re-run, is complete)."""
    with locked(sweep.search, mode="a+b") as f:
        f.seek(0)
        record, good = _parse(f.read(), str(sweep.search))
        latest = record.told(slot, trial)
        if latest is None or (attempt or 0) > (latest.attempt or 0):
            append_line(f, good, json.dumps({"tell": slot, "state": state, "value": value,
                                             "intermediate": {str(k): v for k, v in intermediate.items()},
                                             "time": time.time(), "attempt": attempt, "trial": trial}))


def write_history(sweep: SweepLayout, mode: str, metric: str) -> Path:
    """The optimization history: each finished trial's value in the order it was asked, and
    the best so far; returns the plot's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = read(sweep)
    told = record.results()
    points = [(n, told[a.slot].value) for n, a in enumerate(record.asks)
              if a.slot in told and told[a.slot].state == "COMPLETE" and told[a.slot].value is not None]
    pick = max if mode == "max" else min
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    if points:
        numbers, values = zip(*points)
        best = [pick(values[: i + 1]) for i in range(len(values))]
        ax.plot(numbers, values, "o", color="tab:blue", label="trial")
        ax.step(numbers, best, where="post", color="tab:red", label=f"best so far ({mode})")
    pruned = [n for n, a in enumerate(record.asks) if a.slot in told and told[a.slot].state == "PRUNED"]
    for n in pruned:
        ax.axvline(n, color="grey", alpha=0.2)
    ax.set_xlabel("trial, in the order asked (grey: stopped at a rung)")
    ax.set_ylabel(f"best validation {metric}")
    ax.set_title(f"search {sweep.root.name}: {len(points)} completed, {len(pruned)} stopped at a rung")
    if points:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    replace_with(sweep.search_history, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return sweep.search_history
