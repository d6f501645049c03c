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

With repeats the decision is a configuration's (plan/asha.py says when it is taken): a seed's
line names its configuration and says `continue: true` until a decision line for that
configuration (its mean, the seeds in it, those it was taken without) says otherwise; reading
gives each seed its configuration's decision. Lines of a sweep without repeats are unchanged.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
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
    configuration: Optional[str] = None
    """With repeats: the configuration the trial is a seed of; as read, `keeps_going` is that
    configuration's decision at the rung, True while it is `pending`."""
    pending: bool = False
    """A seed whose configuration is not decided at the rung yet (as read; never written)."""

    def to_json(self) -> str:
        seed = {} if self.configuration is None else {"configuration": self.configuration}
        return json.dumps({"trial": self.trial, **seed, "value": self.value, "loss": self.loss, "step": self.step,
                           "continue": self.keeps_going, "seen": self.seen, "time": self.time})

    @property
    def score(self) -> Score:
        return self.value, self.loss


@dataclass(frozen=True)
class Decision:
    """A configuration's decision at a rung (with repeats), on the mean over its seeds there."""

    configuration: str
    value: float
    """The mean select metric over `seeds` (NaN if any seed's is)."""
    loss: float
    """The mean validation loss over `seeds`."""
    step: int
    keeps_going: bool
    seen: int
    """Values (configurations' means) decided at the rung before this one."""
    time: float
    seeds: tuple[str, ...]
    """The seeds whose scores the mean is of."""
    without: tuple[str, ...] = ()
    """Seeds of the configuration that ended before reaching the rung: decided without them."""

    def to_json(self) -> str:
        return json.dumps({"configuration": self.configuration, "seeds": list(self.seeds),
                           "without": list(self.without), "value": self.value, "loss": self.loss, "step": self.step,
                           "continue": self.keeps_going, "seen": self.seen, "time": self.time})

    @property
    def score(self) -> Score:
        return self.value, self.loss


@dataclass(frozen=True)
class Seeds:
    """A seed trial's configuration and every seed of it, its own id included (JobContext)."""

    configuration: str
    trials: tuple[str, ...]
    attempts: tuple[int, ...] = ()
    """Each seed's attempt as the sweep submitted it when this trial's job was made (none: any):
    a verdict of an earlier attempt (a seed re-run since, still queued) is no end of it."""

    def attempt(self, trial: str) -> Optional[int]:
        return dict(zip(self.trials, self.attempts)).get(trial)


@dataclass
class RungRecord:
    """A rung's file as read: arrivals in order (seeds' as written) and configurations' decisions."""

    arrivals: list[Arrival] = field(default_factory=list)
    decisions: dict[str, Decision] = field(default_factory=dict)

    def scores(self) -> list[Score]:
        """What a new score is ranked against: trials' own (without repeats), configurations' means."""
        return [a.score for a in self.arrivals if a.configuration is None] + [d.score for d in self.decisions.values()]

    def resolved(self, arrival: Arrival) -> Arrival:
        """`arrival` as read: a seed's decision is its configuration's, or pending."""
        if arrival.configuration is None:
            return arrival
        decision = self.decisions.get(arrival.configuration)
        return replace(arrival, keeps_going=True, pending=True) if decision is None else \
            replace(arrival, keeps_going=decision.keeps_going)


def read(sweep: SweepLayout, rung: int) -> list[Arrival]:
    """The arrivals recorded at a rung, in order (a last line cut short is left out), each seed's
    with its configuration's decision."""
    record = read_record(sweep, rung)
    return [record.resolved(a) for a in record.arrivals]


def read_record(sweep: SweepLayout, rung: int) -> RungRecord:
    try:
        data = sweep.rung(rung).read_bytes()
    except FileNotFoundError:
        return RungRecord()
    return _parse(data, sweep, rung)[0]


def _apply(line: str, record: RungRecord) -> None:
    """One line onto the record: an arrival or a configuration's decision is added; a withdrawal
    (a rollback undid the steps that brought the trial to the rung) takes the trial's arrival
    back, and its configuration's decision if that said continue (one that said stop stands: its
    other seeds may have stopped on it, and PRUNED is final)."""
    d = json.loads(line)
    if "withdrawn" in d:
        if set(d) != {"withdrawn", "step", "time"} or not isinstance(d["withdrawn"], str) or type(d["step"]) is not int:
            raise ValueError("not a withdrawal")
        for a in record.arrivals:
            decision = record.decisions.get(a.configuration) if a.trial == d["withdrawn"] else None
            if decision is not None and decision.keeps_going:
                del record.decisions[a.configuration]
        record.arrivals[:] = [a for a in record.arrivals if a.trial != d["withdrawn"]]
    elif "seeds" in d:
        if not isinstance(d["seeds"], list) or not isinstance(d["without"], list):
            raise ValueError("not a decision")
        decision = Decision(str(d["configuration"]), float(d["value"]), float(d["loss"]), int(d["step"]),
                            bool(d["continue"]), int(d["seen"]), float(d["time"]), tuple(map(str, d["seeds"])),
                            tuple(map(str, d["without"])))
        record.decisions[decision.configuration] = decision
    else:
        record.arrivals.append(_arrival(d))


def _arrival(d: dict) -> Arrival:
    configuration = d.get("configuration")
    return Arrival(str(d["trial"]), float(d["value"]), float(d.get("loss", "nan")), int(d["step"]),
                   bool(d["continue"]), int(d["seen"]), float(d["time"]),
                   None if configuration is None else str(configuration))


def _parse(data: bytes, sweep: SweepLayout, rung: int) -> tuple[RungRecord, int]:
    """The record, and the bytes that hold whole lines. A whole line that is no record stops every
    trial that reaches the rung (its decisions depend on every line), so it is named, with the
    way to rebuild the file."""
    record, good = RungRecord(), 0
    *whole, _cut_short = data.split(b"\n")
    for number, raw in enumerate(whole, 1):
        line = raw.decode(errors="replace")
        try:
            _apply(line, record)
        except NOT_A_RECORD:
            raise DamagedFile(f"{sweep.rung(rung)}: rung {rung}, line {number} is not a rung record: {line[:100]!r}; "
                              f"rebuild the file from the trials' own records with python -m qarac_dist.status "
                              f"--repair {sweep.root}") from None
        good += len(raw) + 1
    return record, good


def rebuild(sweep: SweepLayout, rung: int, metric: str, trials: list[tuple[str, TrialDir, int]],
            configurations: Optional[dict[str, str]] = None) -> Optional[Path]:
    """Rebuild rung `rung`'s file if a line of it is damaged: the lines that are records, then
    each trial (id, directory, its step at this rung) that validated there and has no line, its
    decision from its own state (PRUNED at this rung: stopped; else it went on). With repeats
    (`configurations`: seed trial -> its configuration) a configuration left undecided is
    decided from its seeds' states: stopped if one is PRUNED at this rung, else continued once
    every seed has a line (otherwise its next seed to look decides it). The damaged file is kept
    beside it; returns that copy's path (None: the file was whole or absent)."""
    path = sweep.rung(rung)
    try:
        data = path.read_bytes()
        _parse(data, sweep, rung)
        return None
    except FileNotFoundError:
        return None
    except DamagedFile:
        pass
    record = RungRecord()
    for line in data.decode(errors="replace").splitlines():
        try:
            _apply(line, record)
        except NOT_A_RECORD:
            continue
    configurations = configurations or {}
    dirs = {trial: directory for trial, directory, _ in trials}
    for trial, directory, step in trials:
        row = next((r for r in directory.metrics() if r.get("step") == step and f"val_{metric}" in r), None)
        if row is None or any(a.trial == trial for a in record.arrivals):
            continue
        stopped = _pruned_at(directory, rung)
        record.arrivals.append(Arrival(trial, float(row[f"val_{metric}"]), float(row.get("val_loss", math.nan)), step,
                                       not stopped, len(record.scores()), time.time(), configurations.get(trial)))
    for configuration in dict.fromkeys(a.configuration for a in record.arrivals if a.configuration):
        seeds = [a for a in record.arrivals if a.configuration == configuration]
        # A seed's own line says continue until its configuration is decided: its state says more.
        stopped = not all(a.keeps_going for a in seeds) or any(_pruned_at(dirs.get(a.trial), rung) for a in seeds)
        planned = {t for t, c in configurations.items() if c == configuration}
        if configuration not in record.decisions and (stopped or planned <= {a.trial for a in seeds}):
            record.decisions[configuration] = _mean_decision(record, configuration, seeds, seeds[0].step,
                                                             lambda _mine, _before: not stopped)
    kept = path.with_name(f"{path.name}.before-repair-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, kept)
    lines = [a.to_json() for a in record.arrivals] + [d.to_json() for d in record.decisions.values()]
    replace_with(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))
    return kept


def _pruned_at(directory: Optional[TrialDir], rung: int) -> bool:
    status = directory.status() if directory is not None else None
    return status is not None and status.state == TrialState.PRUNED and status.rung == rung


ENDED = (TrialState.FAILED, TrialState.CANCELLED, TrialState.COMPLETED, TrialState.PRUNED)
"""A seed in one of these states and with no line at a rung will not report there."""


def _cannot_report(sweep: SweepLayout, trial: str, attempt: Optional[int]) -> bool:
    """The seed ended, in its attempt `attempt` or a later one (None: in any)."""
    status = TrialDir(sweep.trial(trial)).status()
    return status is not None and status.state in ENDED and (attempt is None or (status.attempt or 0) >= attempt)


def _mean_decision(record: RungRecord, configuration: str, seeds: list[Arrival], step: int,
                   decide: Callable[[Score, list[Score]], bool], without: tuple[str, ...] = ()) -> Decision:
    """The configuration's decision on the mean of its `seeds`' scores, against the scores decided before."""
    mean = (statistics.fmean(a.value for a in seeds), statistics.fmean(a.loss for a in seeds))
    before = record.scores()
    return Decision(configuration, *mean, step, decide(mean, before), len(before), time.time(),
                    tuple(sorted(a.trial for a in seeds)), without)


def arrive(sweep: SweepLayout, rung: int, trial: str, score: Score, step: int,
           decide: Callable[[Score, list[Score]], bool], seeds: Optional[Seeds] = None) -> Arrival:
    """Record `trial`'s score (metric, validation loss) at `rung` and return the decision, or
    replay the one recorded. A seed (`seeds`: with repeats) records its score and goes on until
    its configuration is decided; it decides it when its seeds have all recorded, or the rest
    ended before the rung (then its line says which seeds it was taken without)."""
    with locked(sweep.rung(rung), mode="a+b") as f:  # closing the file releases the lock
        f.seek(0)
        record, good = _parse(f.read(), sweep, rung)
        mine: Optional[Arrival] = next((a for a in record.arrivals if a.trial == trial), None)
        if mine is None:
            before = record.scores()
            mine = Arrival(trial, *score, step, decide(score, before) if seeds is None else True, len(before),
                           time.time(), None if seeds is None else seeds.configuration)
            if seeds is not None and seeds.configuration in record.decisions:  # a late seed follows it
                mine = replace(mine, keeps_going=record.decisions[seeds.configuration].keeps_going)
            append_line(f, good, mine.to_json())
            record.arrivals.append(mine)
        if seeds is not None and seeds.configuration not in record.decisions:
            reported = [a for a in record.arrivals if a.configuration == seeds.configuration]
            missing = tuple(s for s in seeds.trials if s not in {a.trial for a in reported})
            if all(_cannot_report(sweep, s, seeds.attempt(s)) for s in missing):
                decision = _mean_decision(record, seeds.configuration, reported, mine.step, decide, missing)
                append_line(f, f.tell(), decision.to_json())
                record.decisions[seeds.configuration] = decision
        return record.resolved(mine)


def withdraw(sweep: SweepLayout, rung: int, trial: str, step: int) -> bool:
    """Take back `trial`'s arrival at `rung` (a line saying so): a rollback to `step` undid the
    steps that brought it there, so its score there belongs to no model, and it is decided again
    when it reaches the rung (a seed: its configuration, unless that was stopped). False: it had none."""
    if not sweep.rung(rung).exists():
        return False
    with locked(sweep.rung(rung), mode="a+b") as f:
        f.seek(0)
        record, good = _parse(f.read(), sweep, rung)
        if not any(a.trial == trial for a in record.arrivals):
            return False
        append_line(f, good, json.dumps({"withdrawn": trial, "step": step, "time": time.time()}))
        return True


def stopped_at(sweep: SweepLayout, trial: str, rung_steps: list[int], step: int, seeds: Optional[Seeds] = None,
               decide: Optional[Callable[[Score, list[Score]], bool]] = None) -> Optional[dict]:
    """The first rung at or before `step` where `trial` was told to stop, as the loop's `pruned`
    (None: none). A job that resumes past such a rung (a signal or a kill came between the
    decision and the trial's end) stops there: a decision recorded is acted on, whatever came next.
    A seed (`seeds`, `decide`) whose configuration is pending at a rung decides it if the seeds
    that have not reported ended (`arrive`), and stops where its configuration was stopped."""
    for k, rung_step in enumerate(rung_steps):
        if rung_step > step:
            break
        mine = next((a for a in read(sweep, k) if a.trial == trial), None)
        if mine is not None and mine.pending and seeds is not None and decide is not None:
            mine = arrive(sweep, k, trial, mine.score, mine.step, decide, seeds)
        if mine is not None and not mine.keeps_going:
            return {"rung": k, "step": rung_step}
    return None
