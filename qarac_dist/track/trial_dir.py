"""A trial's directory, the one owner of its files: every other module reads and writes them here.

    state.json            TrialStatus: the trial's own state (written by global rank 0 only)
    result.json           what the finished training run reports (steps, best metric and step)
    metrics.jsonl         one JSON line per logged step or validation, and one per rollback
    rollbacks.json        the loss-spike rollbacks so far: where each went and the data it skipped
    usage.json            each job's clock: when it began and was last seen, its GPUs and CPUs
                          (track/usage.py)
    config.json           the resolved config the job ran, secrets redacted
    deepspeed_config.json the exact DeepSpeed JSON used
    best/, last/          save_pretrained exports; best/qarac_best.json says which step and metrics
    checkpoints/          resumable checkpoints (contents: train/checkpoint.py)
    mlflow_*.json(l)      what could not reach MLflow yet (track/mlflow_logger.py, mlflow_runs.py)
    mlflow_outbox.jsonl   on a sqlite store, the trial's whole MLflow record, for the one importer
                          (track/outbox.py; mlflow_best_module.pt beside it: a best model to log)
    .writer               the one live writer: an fcntl lock the training job's global rank 0 holds
                          while it runs (the kernel drops it when that process dies), naming it

Whatever a sweep's bookkeeping says (a claim taken over on a scheduler's wrong answer, an
orphan of a killed runner), a second job on one directory refuses to start: `hold_writer`.

The scheduler's view of a job is another matter (submit/sweep_dir.py); `state.json` is what the
training job itself says, stamped with the sweep's attempt number so that a new submission
never reads an old attempt's verdict.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from ..base.errors import UserError
from ..base.files import DamagedFile, read_json, write_json, writing
from ..base.lock import LockHeld, hold

BEST_INFO = "qarac_best.json"
LAST_INFO = "qarac_last.json"
ROLLBACK = "spike_rollback"
"""The metric a rollback's row in metrics.jsonl carries (its number: 1, 2, ...)."""


class TrialState(str, enum.Enum):
    """What a trial's own job last said of it."""

    RUNNING = "RUNNING"
    """A job is training it."""
    PREEMPTED = "PREEMPTED"
    """Stopped on a signal after saving a checkpoint; the job is requeued and resumes."""
    COMPLETED = "COMPLETED"
    """Trained to the end (or stopped early by its own early stopping)."""
    PRUNED = "PRUNED"
    """Stopped by the sweep's successive halving at a rung; final, not resubmitted."""
    FAILED = "FAILED"
    """Ended by an error (the `error` field says which)."""
    CANCELLED = "CANCELLED"
    """Interrupted by the user."""

    def __str__(self) -> str:
        return self.value


@dataclass
class TrialStatus:
    """state.json."""

    state: TrialState
    attempt: Optional[int] = None
    """The sweep's submission this job belongs to (None for a run outside a sweep)."""
    starts: int = 0
    """Jobs started for this attempt: 1, plus one per requeue."""
    idle_starts: int = 0
    """Consecutive jobs of this attempt that ended without a new checkpoint."""
    last_checkpoint: Optional[int] = None
    """Step of the newest complete checkpoint ever saved in this directory."""
    step: Optional[int] = None
    """Where the last job stopped (PREEMPTED, PRUNED)."""
    error: Optional[str] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    world_size: Optional[int] = None
    job_id: Optional[str] = None
    nodes: Optional[str] = None
    started: Optional[float] = None
    rung: Optional[int] = None
    """PRUNED: the successive-halving rung it stopped at."""
    resumed_from: Optional[int] = None
    """The step the current job resumed from (None: it started from scratch)."""

    @classmethod
    def from_dict(cls, data: dict) -> "TrialStatus":
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            state = TrialState(data.get("state"))
        except ValueError:
            raise DamagedFile(f"state {data.get('state')!r} is not one of {', '.join(s.value for s in TrialState)}") \
                from None
        return cls(**{k: v for k, v in data.items() if k in names and k != "state"}, state=state)


class WriterHeld(UserError):
    """A live process holds the trial directory's writer lock."""


class TrialDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------ paths
    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def rollbacks_file(self) -> Path:
        return self.path / "rollbacks.json"

    @property
    def usage_file(self) -> Path:
        return self.path / "usage.json"

    @property
    def writer(self) -> Path:
        return self.path / ".writer"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def last(self) -> Path:
        return self.path / "last"

    # ------------------------------------------------------------------ state.json
    def status(self) -> Optional[TrialStatus]:
        """The trial's own state; None before its first job wrote one. A damaged file reads as
        FAILED with the reason, so a sweep shows it rather than stopping on it."""
        try:
            data = read_json(self.state_file)
            return None if data is None else TrialStatus.from_dict(data)
        except DamagedFile as err:
            return TrialStatus(TrialState.FAILED, error=f"damaged state.json: {err}")

    def status_of(self, attempt: Optional[int]) -> Optional[TrialStatus]:
        """The trial's state if it was written by this attempt's jobs, else None."""
        status = self.status()
        return status if status is not None and status.attempt == attempt else None

    def write_status(self, status: TrialStatus) -> None:
        write_json(self.state_file, {k: (str(v) if isinstance(v, TrialState) else v)
                                     for k, v in dataclasses.asdict(status).items()})

    def begin(self, attempt: Optional[int], **job) -> TrialStatus:
        """A job starts: RUNNING, counting the starts of this attempt."""
        previous = self.status()
        same = previous is not None and previous.attempt == attempt
        status = TrialStatus(TrialState.RUNNING, attempt=attempt, starts=(previous.starts if same else 0) + 1,
                             idle_starts=previous.idle_starts if same else 0,
                             last_checkpoint=previous.last_checkpoint if previous else None, **job)
        self.write_status(status)
        return status

    def hold_writer(self, holder: str) -> IO:
        """Become the directory's one writer (close the file to stop being it), or raise
        WriterHeld naming the live holder. `holder`: who this is, as the refusal shows it."""
        try:
            return hold(self.writer, holder)
        except LockHeld as held:
            raise WriterHeld(f"{self.path}: another process is training this trial ({held or 'unnamed'}); a second "
                             f"one does not start. Wait for it to end, or stop it") from None

    def update(self, **fields) -> TrialStatus:
        status = self.status() or TrialStatus(TrialState.RUNNING)
        status = dataclasses.replace(status, **fields)
        self.write_status(status)
        return status

    # ------------------------------------------------------------------ results
    def write_result(self, result: dict) -> None:
        write_json(self.result_file, result)

    def best_info(self) -> Optional[dict]:
        """Step, metric name and validation metrics of the exported best model."""
        try:
            return read_json(self.best / BEST_INFO)
        except DamagedFile:
            return None

    def last_info(self) -> Optional[dict]:
        """Step of the model exported at the end of training (output.export_last)."""
        try:
            return read_json(self.last / LAST_INFO)
        except DamagedFile:
            return None

    def write_config(self, config: dict, deepspeed: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)
        write_json(self.path / "deepspeed_config.json", deepspeed)

    # ------------------------------------------------------------------ rollbacks.json
    def rollbacks(self) -> list[dict]:
        """The loss-spike rollbacks so far, oldest first (train/spikes.py); DamagedFile for a
        file that is not such a record (the data offset to resume with is unknown then)."""
        data = read_json(self.rollbacks_file)
        if data is None:
            return []
        rollbacks = data.get("rollbacks")
        if not isinstance(rollbacks, list) or not all(
                isinstance(r, dict) and all(type(r.get(k)) is int for k in ("to_step", "offset")) for r in rollbacks):
            raise DamagedFile(f"{self.rollbacks_file}: not a record of rollbacks (a list of them, each with an integer "
                              f"to_step and offset)")
        return rollbacks

    def add_rollback(self, rollback: dict) -> None:
        """Rank 0 records a rollback before training goes on, so a job killed in the skip window
        resumes past the skipped data (the whole file is replaced atomically)."""
        write_json(self.rollbacks_file, {"rollbacks": [*self.rollbacks(), rollback]})

    # ------------------------------------------------------------------ metrics.jsonl
    def metrics(self) -> list[dict]:
        return read_metrics(self.metrics_file) if self.metrics_file.exists() else []

    def last_step(self) -> Optional[int]:
        """Step of the last row of metrics.jsonl, reading only the file's tail."""
        try:
            with open(self.metrics_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
        return None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file. A last line cut short (the writer was killed
    mid-write) is skipped; damage anywhere else is an error."""
    text = Path(path).read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # cut short: its writer was killed, or its disk filled, mid-line
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DamagedFile(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


class MetricsFile:
    """Appends one JSON line per logged step to `metrics.jsonl` (a Tracker)."""

    def __init__(self, path: Path, keep_through_step: Optional[int] = None):
        self.path = path
        with writing(path):
            if keep_through_step is not None and path.exists():
                self._keep_through(keep_through_step)
            self._file = open(path, "a", buffering=1)

    def _keep_through(self, step: int) -> None:
        """A resumed or rolled-back job recomputes the steps after its checkpoint: drop their old
        rows (and a last line cut short), but never a rollback's own row."""
        rows = [row for row in read_metrics(self.path) if row["step"] <= step or ROLLBACK in row]
        write_lines = "".join(json.dumps(r) + "\n" for r in rows)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(write_lines)
        os.replace(tmp, self.path)

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: the rows after it are of steps no longer in the run."""
        with writing(self.path):
            self._file.close()
            self._keep_through(step)
            self._file = open(self.path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with writing(self.path):
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._file.close()
