"""The sweep's records in its directory (paths: base/layout.py): the manifest, one record per
trial with its attempts, job ids, state and MLflow run; the resolved sweep; the micro-batch
plan; and the driver's lock. How a trial's state is read from the scheduler's view and the
trial's own files is `resolve_state`.

Every JSON file is written atomically (base/files.py). A manifest that is there but damaged is
an error, never taken for a missing one and never replaced; `status --repair` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..base.files import DamagedFile, read_json, write_json
from ..base.layout import SweepLayout
from ..base.lock import LockHeld, hold
from ..base.secrets import redact, redact_text
from ..config import UserError
from ..config.schema import build, to_dict
from ..config.sweep import SweepSpec
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
QUIET = {"PREEMPTED", "CANCELLED"}
"""Ends that need no error line: saved to resume, or stopped by the user."""


def layout_for(spec: SweepSpec) -> SweepLayout:
    return SweepLayout.of(spec.runs_dir, spec.name)


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
    pack_jobs: list = field(default_factory=list)
    """Where trials run as steps (pack > 1, search): the jobs submitted for this attempt, any of which may
    start it (the one that did is `job_id`, from its claim: submit/claims.py)."""
    step: Optional[str] = None
    """The job step that runs it in a packed job (`<array>_<task>.<step>`)."""
    slot: Optional[int] = None
    """A model-based search's slot: label, overrides, config and MLflow run come from its ask
    (track/search_record.py) once a job has started it."""
    history: list[Attempt] = field(default_factory=list)
    """Earlier attempts, oldest first."""
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    """Last error line, for a failed trial."""
    configuration: Optional[str] = None
    """With repeats: the configuration it is a seed of (plan/expand.py's Trial.configuration)."""
    retired: bool = False
    """No longer in the sweep file as last run: shown apart, never chosen best (its MLflow run is
    tagged so, track/sweep_runs.py); back in the file, back in the running."""

    @property
    def trial_dir(self) -> TrialDir:
        return TrialDir(self.output_dir)

    @property
    def active(self) -> bool:
        return self.state in RUNNING_STATES and self.state != "QUEUED"

    @property
    def jobs(self) -> list[str]:
        """The jobs that run this attempt, or may start it (a packed trial waiting for a slot)."""
        return [self.job_id] if self.job_id else list(self.pack_jobs)


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
    code: dict = field(default_factory=dict)
    """The user's code as the last submission read it (track/code_record.py): its runs' tags."""
    requested: dict = field(default_factory=dict)
    """GPU-hours and CPU-hours the submissions asked for at most (`gpu_hours`, `cpu_hours`)."""
    configurations: dict = field(default_factory=dict)
    """With repeats: configuration id -> its MLflow run, the parent of its seeds' runs."""
    alias: str = "champion"
    """The registry alias of the sweep's champion (final.alias in the sweep file)."""
    final_split: Optional[str] = None
    """With final: how the sweep file last said to test the choice (report.py split_digest)."""
    final_job: dict = field(default_factory=dict)
    """With final: with SLURM the evaluation's latest job (`id`), what it was given and the
    retrainings it waits for (submit/final.py); locally the retrainings the driver runs (retrain.py)."""

    @classmethod
    def load(cls, sweep_dir: Path) -> Optional["Manifest"]:
        """The manifest; None when there is none; DamagedFile (one line) when it is damaged."""
        path = SweepLayout(Path(sweep_dir)).manifest
        hint = f"; repair it with python -m qarac_dist.status --repair {shlex.quote(str(sweep_dir))}"
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
        trials, trials_dir = {}, SweepLayout(Path(sweep_dir)).trials.absolute()
        for tid, rec in records.items():
            if not isinstance(rec, dict):
                errors.append(f"trials.{tid}: expected a trial record, got {type(rec).__name__}")
                continue
            record = build(TrialRecord, rec, f"trials.{tid}", errors)
            if record is not None:
                if isinstance(record.output_dir, str) and not Path(record.output_dir).is_absolute():
                    # Planned under a relative runs_dir, from the driver's folder: found from any other
                    record.output_dir = str(trials_dir / Path(record.output_dir).name)
                trials[tid] = record
        if errors:
            raise DamagedFile(f"{path}: {errors[0]}{hint}")
        manifest.trials = trials
        return manifest

    def save(self, sweep_dir: Path) -> None:
        """Atomically; O(trials), and no deep copy (asdict's was half the time at 1,000 trials)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["trials"] = {tid: {**vars(r), "history": [vars(a) for a in r.history]} for tid, r in self.trials.items()}
        write_json(SweepLayout(Path(sweep_dir)).manifest, data, compact=True)

    def retrain_jobs(self) -> list[str]:
        """The retraining jobs `final_job` names (job ids only: a hand-edited manifest names no others)."""
        jobs = self.final_job.get("retrain")
        return [j for j in jobs if isinstance(j, str) and j] if isinstance(jobs, list) else []

    def seeds(self) -> dict[str, int]:
        """With repeats: configuration id -> its seeds in the sweep file; empty without."""
        return dict(Counter(r.configuration for r in self.trials.values() if r.configuration and not r.retired))

    def seeds_of(self, record: TrialRecord) -> dict[str, int]:
        """With repeats: the seeds of `record`'s configuration in the sweep file, its own included,
        each with its current attempt."""
        return {r.id: r.attempt for r in sorted(self.trials.values(), key=lambda r: r.id)
                if record.configuration is not None and r.configuration == record.configuration and not r.retired}

    def all_ended(self) -> bool:
        """No trial runs or waits to (one no longer in the sweep file and never submitted waits
        for nothing)."""
        return not any(r.state in RUNNING_STATES and not (r.retired and r.state == "QUEUED")
                       for r in self.trials.values())


def resolve_state(record: TrialRecord, scheduler_state: Optional[str]) -> str:
    """One state from the scheduler's view and what the current attempt's job wrote.

    `scheduler_state` is the executor's state of the job (SLURM's names; None when the
    scheduler no longer knows it). A state.json from an earlier attempt says nothing about this
    one. A job the scheduler lost that left no final state behind is LOST, and is submitted
    again on the next run.
    """
    if record.job_id is None:
        return "QUEUED"
    status = record.trial_dir.status_of(record.attempt)
    own = status.state.value if status is not None else None
    if own in DONE or (own in ("FAILED", "CANCELLED") and scheduler_state not in ACTIVE):
        return own
    if record.state == "CANCELLED" and scheduler_state not in ACTIVE:
        return "CANCELLED"  # the user cancelled it (the trial itself saw only a signal)
    if scheduler_state is None:
        return "PREEMPTED" if own == "PREEMPTED" else "LOST"  # stopped and saved, not requeued
    if scheduler_state in REQUEUED:
        return "PENDING"
    if scheduler_state == "COMPLETED":  # the job exited 0 without a verdict: it did not finish
        return "FAILED"
    return scheduler_state


def own_error(record: TrialRecord) -> Optional[str]:
    status = record.trial_dir.status_of(record.attempt)
    return status.error if status is not None else None


SRUN_ECHO = re.compile(r"srun: (?:error: \S+: tasks? [\d,-]+: (?:Exited|Killed)|launch/slurm: _step_signal|"
                       r"Job step aborted|Force Terminated)")
"""srun's words after a task failed: the task's own line above says why."""
ERROR_LINE = re.compile(r"error|exception|traceback|killed|cancelled|due to|srun:|slurmstepd:", re.IGNORECASE)
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]: ?")
"""What torch's distributed launch puts before each line a rank writes (`[rank0]:     raise X`)."""
RAISED = re.compile(r"(?:[A-Za-z_]\w*\.)*[A-Z]\w*: ")
"""A traceback's last line, after its frames: `qarac_dist.base.files.DiskFull: /x: No space left`."""


def job_error(layout: SweepLayout, record: TrialRecord) -> Optional[str]:
    """A job that left no verdict: the last error line of its log, and the log's path (the
    newest job first), so a LOST or FAILED trial never shows an empty error."""
    for job in reversed(record.jobs):
        found = last_error(layout, job)
        if found is not None:
            return found
    return f"the job left no verdict and no log (looked in {layout.submitit})" if record.jobs else None


def last_error(layout: SweepLayout, job: str) -> Optional[str]:
    """The last error line of a job's log (its last line, said as such, where none looks like
    one), with its path. A traceback's own lines (its head, its indented frames and source: `raise error`, after
    a rank's prefix) and srun's echo of a failed task are passed over for the line that says what
    went wrong."""
    for path in layout.job_logs(job):
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
                lines = [RANK_PREFIX.sub("", line.rstrip()) for line in f.read().decode(errors="replace").splitlines()
                         if line.strip()]
        except OSError:
            continue
        errors = [line for i, line in enumerate(lines) if not line[:1].isspace() and not line.startswith("Traceback (")
                  and (ERROR_LINE.search(line) or (i and lines[i - 1][:1].isspace() and RAISED.match(line)))]
        causes = [line for line in errors if not SRUN_ECHO.match(line)]
        if lines:  # none like an error (a job killed outright): its last line, said as such, never as the cause
            line, ends = (causes or errors)[-1] if errors else lines[-1], "" if errors else "no error in its log, which ends: "
            return f"{ends}{redact_text(line.strip())[:300]} ({path})"
    return None


class SweepLock:
    """One driver per sweep directory, by an exclusive lock on its lock file (base/lock.py: what
    it relies on, on NFS and Lustre). The holder's host and pid are written into it, for the
    next driver's message."""

    def __init__(self, sweep_dir: Path):
        self.path = SweepLayout(Path(sweep_dir)).lock
        self.file = None

    def acquire(self) -> None:
        try:
            self.file = hold(self.path, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                    "since": time.time()}))
        except LockHeld as held:
            raise UserError(f"{self.path.parent}: another driver is working on this sweep "
                            f"({_describe(str(held))}); wait for it to end, or stop it") from None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"host {info['host']}, pid {info['pid']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def read_sweep_file(sweep_dir: Path) -> Optional[dict]:
    return read_json(SweepLayout(Path(sweep_dir)).sweep_file)


def same_record(manifest: Manifest, layout: SweepLayout, spec: SweepSpec, select: tuple[str, str],
                source: str) -> None:
    """What the sweep's record was made with (how the best is picked, where it is tracked, the
    rungs, a search's space and sampler: the record's values and states are of them) cannot
    change under it: a re-run (or its --dry-run) whose file changed it is refused in one line
    naming the key. `select`: the metric and mode this file picks the best by. A search may be
    given more trials."""
    from ..track.mlflow_client import absolute_uri

    t = spec.tracking
    saved = (read_json(layout.sweep_file) or {}).get("spec") or {}
    changed = {"select": (f"{manifest.select_mode} {manifest.select_metric}", f"{select[1]} {select[0]}"),
               "tracking.uri": (manifest.tracking_uri, absolute_uri(t.uri) if t.uri else manifest.tracking_uri),
               "tracking.experiment": (manifest.experiment, t.experiment or manifest.experiment),
               "asha": (saved.get("asha"), to_dict(spec).get("asha") if saved else saved.get("asha")),
               "repeats": (saved.get("repeats", 1), spec.repeats if saved else saved.get("repeats", 1)),
               "search": (_searched(saved.get("search")), _searched(to_dict(spec).get("search")) if saved else
                          _searched(saved.get("search")))}
    for key, (was, now) in changed.items():
        if was != now:
            raise UserError(f"{source}: {key}: {layout.root} was made with {was}, this file asks for {now}; its "
                            f"trials were picked and recorded by the first. Start a new sweep for it: another name= "
                            f"(or runs_dir=)")


def _searched(search: Optional[dict]) -> Optional[dict]:
    return None if not search else {k: search.get(k) for k in ("sampler", "seed", "startup_trials", "params",
                                                               "warm_start")}


def write_sweep_file(sweep_dir: Path, spec: dict, base: dict, source: str, trials: list) -> None:
    """sweep.json: what --repair rebuilds the manifest from (its environment's secrets masked:
    the jobs were given them, the record needs none)."""
    spec = {**spec, "environment": redact(spec.get("environment") or {})}
    write_json(SweepLayout(Path(sweep_dir)).sweep_file, {"spec": spec, "base": base, "source": source,
                                                        "trials": [{"id": t.id, "label": t.label} for t in trials]})


def read_micro_batches(sweep_dir: Path) -> Optional[dict]:
    return read_json(SweepLayout(Path(sweep_dir)).micro_batches)


def write_micro_batches(sweep_dir: Path, found: dict) -> None:
    write_json(SweepLayout(Path(sweep_dir)).micro_batches, found)


def read_cancels(sweep_dir: Path) -> dict:
    """Trial id -> the attempt the user cancelled; DamagedFile (one line, with what to do) when
    the file is damaged."""
    path = SweepLayout(Path(sweep_dir)).cancels
    try:
        return read_json(path) or {}
    except DamagedFile as err:
        raise DamagedFile(f"{err}; it holds only what --cancel stopped: delete it, and cancel again what should "
                          f"stay cancelled") from None


def record_cancels(sweep_dir: Path, cancelled: dict) -> None:
    if cancelled:
        write_json(SweepLayout(Path(sweep_dir)).cancels, {**read_cancels(sweep_dir), **cancelled})


FINAL_CANCELS = "final"
"""The key of the cancels that holds the final evaluation's jobs the user cancelled (no trial's id)."""


def cancelled_final(sweep_dir: Path) -> list:
    """The final evaluation's jobs that `--cancel` stopped (submit/retrain.py's, run here)."""
    jobs = read_cancels(sweep_dir).get(FINAL_CANCELS)
    return jobs if isinstance(jobs, list) else []
