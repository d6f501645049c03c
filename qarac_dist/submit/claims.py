"""Which packed job runs which trial: `claims.json` in the sweep directory (base/layout.py), one
claim per trial, read and rewritten whole under `.claims.lock` (base/lock.py: an fcntl lock,
honoured across nodes on NFS and Lustre, released by the kernel when its holder dies), and
written atomically (base/files.py), so a reader never sees half of it.

A claim says: attempt `attempt` of the trial is run by `job` (None: reserved for that attempt,
not started yet), since `started`; `ended` and `outcome` once its step is over. Two runners
that finish trials at the same moment take the lock in turn, and the second sees the first's
claim: no trial is started twice. A claim whose job the scheduler no longer knows, and that
never ended, is released: the next runner to look takes it over, and the trial resumes from its
newest checkpoint.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

from ..base.files import DamagedFile, read_json, write_json
from ..base.layout import SweepLayout
from ..base.lock import locked


@dataclass
class Claim:
    attempt: int
    job: Optional[str] = None
    """The packed job (`<array>_<task>`, or a local runner's pid) that runs it; None: waiting."""
    started: Optional[float] = None
    ended: Optional[float] = None
    outcome: Optional[str] = None
    """How its step ended: the trial's own verdict, or `exit <code>` when it left none."""
    first_checkpoint_s: Optional[float] = None
    """Seconds from the step's start to the trial's first new checkpoint (the refill rule's measure)."""

    @property
    def open(self) -> bool:
        """Started and not ended."""
        return self.job is not None and self.ended is None


def read(layout: SweepLayout) -> dict[str, Claim]:
    """Trial id -> its claim (empty where no packed job ever ran)."""
    data = read_json(layout.claims) or {}
    try:
        return {tid: Claim(**claim) for tid, claim in data.items()}
    except TypeError as err:
        raise DamagedFile(f"{layout.claims}: not a claims file ({err})") from None


def _write(layout: SweepLayout, claims: dict[str, Claim]) -> None:
    write_json(layout.claims, {tid: asdict(c) for tid, c in claims.items()})


def take(layout: SweepLayout, job: str, queue: Iterable[tuple[str, int]], running: set[str],
         live: Callable[[list[str]], set[str]]) -> Optional[tuple[str, int]]:
    """Claim the next trial for `job` from `queue` ((trial id, attempt), in the order to start
    them), or None. First the job's own open claims (a requeued job resumes its trials), then a
    trial nobody started, then one whose job is gone without ending it. `running`: trials this
    job runs now, never taken twice. `live(jobs)`: those of the jobs that may still run (one
    scheduler query for all, asked only when nothing of the first two kinds is left: the lock
    is held meanwhile)."""
    with locked(layout.claims_lock):
        claims = read(layout)
        queue = [(tid, attempt) for tid, attempt in queue if tid not in running]

        def current(tid: str, attempt: int) -> Optional[Claim]:
            claim = claims.get(tid)
            return claim if claim is not None and claim.attempt == attempt else None

        def newer(tid: str, attempt: int) -> bool:
            return tid in claims and claims[tid].attempt > attempt

        own = [(t, a) for t, a in queue if (c := current(t, a)) is not None and c.open and c.job == job]
        free = [(t, a) for t, a in queue if not newer(t, a) and ((c := current(t, a)) is None or c.job is None)]
        others = [(t, a, c.job) for t, a in queue if (c := current(t, a)) is not None and c.open and c.job != job]
        alive = live(sorted({j for _, _, j in others})) if others and not own + free else set()
        released = [(t, a) for t, a, j in others if j not in alive and not own + free]
        for tid, attempt in own + free + released:
            previous = current(tid, attempt)
            claims[tid] = Claim(attempt, job, time.time(),
                                first_checkpoint_s=previous.first_checkpoint_s if previous else None)
            _write(layout, claims)
            return tid, attempt
    return None


def end(layout: SweepLayout, job: str, tid: str, attempt: int, outcome: str) -> None:
    """The step of `tid` that `job` ran is over (a claim taken over by another job is left alone)."""
    with locked(layout.claims_lock):
        claims = read(layout)
        claim = claims.get(tid)
        if claim is not None and claim.attempt == attempt and claim.job == job:
            claim.ended, claim.outcome = time.time(), outcome
            _write(layout, claims)


def release(layout: SweepLayout, job: str, tid: str, attempt: int) -> None:
    """`job` could not start the step of `tid`: the claim goes back to the queue, as if never
    taken (no outcome, nothing counted), for any job to take."""
    with locked(layout.claims_lock):
        claims = read(layout)
        claim = claims.get(tid)
        if claim is not None and claim.attempt == attempt and claim.job == job:
            claims[tid] = Claim(attempt, first_checkpoint_s=claim.first_checkpoint_s)
            _write(layout, claims)


def note_first_checkpoint(layout: SweepLayout, job: str, tid: str, attempt: int, seconds: float) -> None:
    with locked(layout.claims_lock):
        claims = read(layout)
        claim = claims.get(tid)
        if claim is not None and claim.attempt == attempt and claim.job == job and claim.first_checkpoint_s is None:
            claim.first_checkpoint_s = seconds
            _write(layout, claims)


def reserve(layout: SweepLayout, attempts: dict[str, tuple[int, int]],
            live: Callable[[list[str]], set[str]]) -> list[str]:
    """Reserve each trial's new attempt (trial id -> (the attempt it ran, the new one)) for the
    packed jobs about to be submitted: runners of older attempts no longer take it. A trial
    whose claim on the attempt it ran is open in a job that is still alive (another runner took
    it over meanwhile) is left to that job: the trials reserved are returned."""
    with locked(layout.claims_lock):
        claims = read(layout)
        held = {tid: c.job for tid, (old, _) in attempts.items()
                if (c := claims.get(tid)) is not None and c.attempt == old and c.open}
        alive = live(sorted(set(held.values()))) if held else set()
        reserved = []
        for tid, (old, new) in attempts.items():
            claim = claims.get(tid)
            if tid in held and held[tid] in alive:
                continue
            claims[tid] = Claim(new, first_checkpoint_s=claim.first_checkpoint_s if claim else None)
            reserved.append(tid)
        _write(layout, claims)
        return reserved


def note_bad_nodes(layout: SweepLayout, nodes: str, job: str, error: str) -> None:
    """Job `job` took no more trials: its steps could not start on `nodes` (a SLURM host list).
    The next submission of the sweep excludes them (submission.py)."""
    with locked(layout.claims_lock):
        found = bad_nodes(layout)
        found[nodes] = f"job {job}: {error}"
        write_json(layout.bad_nodes, found)


def bad_nodes(layout: SweepLayout) -> dict[str, str]:
    """Host list -> why it is excluded. A damaged file is named and passed over: it only advises."""
    try:
        data = read_json(layout.bad_nodes) or {}
    except DamagedFile as err:
        print(f"qarac_dist: {err}; no node is excluded for it", file=sys.stderr)
        return {}
    odd = [k for k in data if not HOSTLIST.fullmatch(str(k))]
    if odd:
        print(f"qarac_dist: {layout.bad_nodes}: {odd[0]!r} is no SLURM host list; passed over", file=sys.stderr)
    return {str(k): str(v) for k, v in data.items() if k not in odd}


HOSTLIST = re.compile(r"[A-Za-z0-9._-]+(?:\[[0-9,-]+\][A-Za-z0-9._-]*)*(?:,[A-Za-z0-9._-]+(?:\[[0-9,-]+\][A-Za-z0-9._-]*)*)*")


def time_needed(claims: dict[str, Claim]) -> Optional[float]:
    """What a trial needs before it has anything saved: the median time the sweep's trials took
    from their step's start to their first checkpoint; where none saved one (checkpointing off),
    the median time a whole trial took to complete or be pruned; None before either is known."""
    saved = [c.first_checkpoint_s for c in claims.values() if c.first_checkpoint_s is not None]
    whole = [c.ended - c.started for c in claims.values()
             if c.outcome in ("COMPLETED", "PRUNED") and c.started is not None and c.ended is not None]
    seen = saved or whole
    return statistics.median(seen) if seen else None
