"""The sweep directory, `<runs_dir>/<sweep>/`, and the one owner of its files:

    .lock            held by the one driver working on this sweep (`SweepLock`)
    sweep.json       the resolved sweep: spec, base config, trial ids and labels
    manifest.json    one record per trial: config, attempts, job ids, state, MLflow run ids
    trials/<id>/     each trial's directory (track/trial_dir.py)
    submitit/        submitit's pickles and job logs
    micro_batch.json what `preflight --find-batch-size` found
    asha/            successive halving's rung records (track/rungs.py)

Every JSON file is written atomically (track/files.py). A manifest that is there but damaged is
an error, never taken for a missing one and never replaced; `status --repair` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import UserError
from ..config.schema import build
from ..config.sweep import SweepSpec
from ..track.files import DamagedFile, read_json, write_json
from ..track.trial_dir import TrialDir, TrialState
from .cluster import ACTIVE, REQUEUED

# States, as the sweep sees them: QUEUED (not submitted yet), PENDING and RUNNING (a job is
# there), LOST (the scheduler forgot a job that left no verdict), SLURM's own end states, and
# the trial's own verdicts (track/trial_dir.TrialState).
RUNNING_STATES = {"QUEUED", "PENDING", "RUNNING"} | ACTIVE
DONE = {TrialState.COMPLETED.value, TrialState.PRUNED.value}
RESUBMIT = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE", "LOST", "QUEUED"}
FAILED = RESUBMIT - {"QUEUED"}


def path_for(spec: SweepSpec) -> Path:
    return Path(spec.runs_dir) / spec.name


@dataclass
class Attempt:
    """An earlier submission of a trial and how it ended."""

    attempt: int
    job_ids: list = field(default_factory=list)
    state: Optional[str] = None
    error: Optional[str] = None


@dataclass
class TrialRecord:
    id: str
    label: str
    overrides: dict
    config: dict
    output_dir: str
    executor: str
    state: str = "QUEUED"
    """QUEUED (not submitted yet), the scheduler's state, or the trial's own verdict."""
    attempt: int = 0
    """Submissions so far; the jobs of submission N write `attempt: N` into state.json, and only
    such a state counts for this record."""
    job_id: Optional[str] = None
    """Current SLURM job id ("123_4" for an array task) or local process id."""
    job_ids: list = field(default_factory=list)
    """Every job id this trial ran under, oldest first."""
    history: list[Attempt] = field(default_factory=list)
    """Earlier attempts, oldest first."""
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    """Last error line, for a failed trial."""

    @property
    def trial_dir(self) -> TrialDir:
        return TrialDir(self.output_dir)

    @property
    def active(self) -> bool:
        return self.state in RUNNING_STATES and self.state != "QUEUED"


@dataclass
class Manifest:
    sweep: str
    executor: str
    select_metric: str
    select_mode: str
    trials: dict = field(default_factory=dict)
    mlflow_parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None

    @classmethod
    def load(cls, sweep_dir: Path) -> Optional["Manifest"]:
        """The manifest; None when there is none; DamagedFile (one line) when it is damaged."""
        path = Path(sweep_dir) / "manifest.json"
        hint = f"; repair it with python -m qarac_dist.status --repair {sweep_dir}"
        try:
            data = read_json(path)
        except DamagedFile as err:
            raise DamagedFile(f"{err}{hint}") from None
        if data is None:
            return None
        errors: list[str] = []
        records = data.pop("trials", None)
        if not isinstance(records, dict):
            errors.append(f"trials: expected a mapping of trial records, got {type(records).__name__}")
            records = {}
        manifest = build(cls, data, "", errors)
        trials = {}
        for tid, rec in records.items():
            if not isinstance(rec, dict):
                errors.append(f"trials.{tid}: expected a trial record, got {type(rec).__name__}")
                continue
            record = build(TrialRecord, rec, f"trials.{tid}", errors)
            if record is not None:
                trials[tid] = record
        if errors:
            raise DamagedFile(f"{path}: {errors[0]}{hint}")
        manifest.trials = trials
        return manifest

    def save(self, sweep_dir: Path) -> None:
        write_json(Path(sweep_dir) / "manifest.json", dataclasses.asdict(self))

    def all_ended(self) -> bool:
        return not any(r.state in RUNNING_STATES for r in self.trials.values())


def resolve_state(record: TrialRecord, scheduler_state: Optional[str], process_alive: Optional[bool] = None) -> str:
    """One state from the scheduler's view and what the current attempt's job wrote.

    `scheduler_state` is SLURM's state (None when SLURM no longer knows the job);
    `process_alive` is for local jobs. A state.json from an earlier attempt says nothing about
    this one. A job the scheduler lost that left no final state behind is LOST, and is
    submitted again on the next run.
    """
    if record.job_id is None:
        return "QUEUED"
    status = record.trial_dir.status_of(record.attempt)
    own = status.state.value if status is not None else None
    if own in DONE or (own in ("FAILED", "CANCELLED") and scheduler_state not in ACTIVE):
        return own
    if scheduler_state is not None:
        if scheduler_state in REQUEUED:
            return "PENDING"
        if scheduler_state == "COMPLETED":  # the job exited 0 without a verdict: it did not finish
            return "FAILED"
        return scheduler_state
    if process_alive:
        return "RUNNING" if own == "RUNNING" else "PENDING"
    return "LOST"


def own_error(record: TrialRecord) -> Optional[str]:
    status = record.trial_dir.status_of(record.attempt)
    return status.error if status is not None else None


class SweepLock:
    """One driver per sweep directory: an exclusive `fcntl.lockf` lock on `<sweep>/.lock`.

    lockf (POSIX record locks) is honoured across machines on NFS (NLM or NFSv4 locks) and on
    Lustre mounted with `-o flock` (with `localflock` it holds only within one node). The kernel
    drops it when the holder dies, however it dies. Hazard of POSIX locks: closing any file
    descriptor of the lock file in the holding process drops the lock, so only this object
    opens that file. The holder's host and pid are written into it, for the next driver's
    message."""

    def __init__(self, sweep_dir: Path):
        self.path = Path(sweep_dir) / ".lock"
        self.file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(f)
            f.close()
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"{self.path.parent}: another driver is working on this sweep "
                                f"({_describe(holder)}); wait for it to end, or stop it") from None
            raise UserError(f"{self.path}: cannot lock ({err.strerror}); the filesystem must support fcntl locks "
                            f"(Lustre: mount with -o flock)") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> "SweepLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(f) -> str:
    """What the holder wrote about itself; it writes just after it locks, so wait a moment for
    it (bounded: a holder that never writes is shown as unknown)."""
    for _ in range(40):
        f.seek(0)
        text = f.read().strip()
        if text.endswith("}"):
            return text
        time.sleep(0.05)
    return text


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"host {info['host']}, pid {info['pid']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def read_sweep_file(sweep_dir: Path) -> Optional[dict]:
    return read_json(Path(sweep_dir) / "sweep.json")


def write_sweep_file(sweep_dir: Path, spec: dict, base: dict, source: str, trials: list) -> None:
    write_json(Path(sweep_dir) / "sweep.json", {"spec": spec, "base": base, "source": source,
                                                 "trials": [{"id": t.id, "label": t.label} for t in trials]})


def read_micro_batches(sweep_dir: Path) -> Optional[dict]:
    return read_json(Path(sweep_dir) / "micro_batch.json")


def write_micro_batches(sweep_dir: Path, found: dict) -> None:
    write_json(Path(sweep_dir) / "micro_batch.json", found)
