"""The sweep directory: `runs/<sweep>/manifest.json`, one record per trial, and the trial
states read back from the scheduler and from the files each trial writes.

A trial's own `state.json` (written by rank 0 of the training job) says RUNNING, COMPLETED or
FAILED; the scheduler says whether the job is still pending or running, or how it ended.
Every write is atomic: a temporary file, then a rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

# States after which re-running the sweep submits the trial again.
RESUBMIT = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE", "LOST", "QUEUED"}
DONE = {"COMPLETED"}
FAILED = RESUBMIT - {"QUEUED"}


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def update_json(path: Path, **fields) -> None:
    """Set fields of a JSON object file (atomically); only one process writes a given file."""
    write_json(path, {**(read_json(path) or {}), **fields})


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass
class TrialRecord:
    id: str
    label: str
    overrides: dict
    config: dict
    output_dir: str
    executor: str
    state: str = "QUEUED"
    """QUEUED (not submitted yet), the scheduler's state, or the trial's own final state."""
    job_id: Optional[str] = None
    """Current SLURM job id ("123_4" for an array task) or local process id."""
    job_ids: list = field(default_factory=list)
    """Every job id this trial ran under, oldest first."""
    submissions: int = 0
    """Times submitted; restarts = submissions - 1 + requeues within a job."""
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    """Last error line, for a failed trial."""


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
        data = read_json(Path(sweep_dir) / "manifest.json")
        if data is None:
            return None
        trials = {tid: TrialRecord(**rec) for tid, rec in data.pop("trials").items()}
        return cls(**data, trials=trials)

    def save(self, sweep_dir: Path) -> None:
        data = asdict(self)
        write_json(Path(sweep_dir) / "manifest.json", data)


def trial_files(record: TrialRecord) -> dict:
    """What the trial wrote: its state file, result, best model info and last metrics row."""
    out = Path(record.output_dir)
    info = {"state": read_json(out / "state.json") or {}, "best": read_json(out / "best" / "qarac_best.json")}
    info["last_step"] = _last_step(out / "metrics.jsonl")
    return info


def _last_step(path: Path) -> Optional[int]:
    """Step of the last line of metrics.jsonl, reading only the file's tail."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue
    return None


def resolve_state(record: TrialRecord, scheduler_state: Optional[str], process_alive: Optional[bool] = None) -> str:
    """One state from the scheduler's view and the trial's own files.

    `scheduler_state` is SLURM's state (None when SLURM no longer knows the job);
    `process_alive` is for local jobs. A job the scheduler lost that left no final state behind
    is LOST, and is submitted again on the next run.
    """
    from .slurm import ACTIVE

    if record.job_id is None:
        return "QUEUED"
    own = (read_json(Path(record.output_dir) / "state.json") or {}).get("state")
    if own in ("COMPLETED", "FAILED") and (own == "COMPLETED" or scheduler_state not in ACTIVE):
        return own
    if scheduler_state is not None:
        if scheduler_state in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            return "PENDING"
        if scheduler_state == "COMPLETED":
            return own if own in ("COMPLETED", "FAILED") else "FAILED"
        return scheduler_state
    if process_alive:
        return "RUNNING" if own == "RUNNING" else "PENDING"
    return "LOST"
