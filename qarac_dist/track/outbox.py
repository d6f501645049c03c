"""A sweep trial's MLflow record, kept in its own directory when the sweep's store is a sqlite file.

SQLite's locks cannot be trusted on a shared file system (NFS; Lustre without `flock`), and a
store written from many nodes at once answers "database is locked" or is lost (optuna#815,
mlflow#4034). So no trial opens a sqlite store: global rank 0 appends what it would have sent to
`mlflow_outbox.jsonl` in its trial directory, of which it is the one writer
(TrialDir.hold_writer), and one process at a time copies it into the store
(track/store_import.py). A tracking server (`http(s)://`, a database server) is written by the
trials directly, as before (track/mlflow_runs.py).

Each line is a metric point, `[key, value, timestamp_ms, step]`, or an event, an object with one
of these keys, in the order the job made them:

    {"tags": {...}}          tags to set (the job's, the run's status of the moment excluded)
    {"status": "RUNNING",    a job started training the trial (at `time`, ms: a run ended since,
     "time": ms}             by --cancel, stays ended)
    {"params": {...}}        params (the same values again on a requeue)
    {"dict": {...}, "name"}  a JSON artifact of the run
    {"inputs": [...]}        the run's data (train/data.py's Splits.inputs)
    {"finish": {...}}        the end of the run (mlflow_runs.complete_run's `pending`, with
                             its `end_time`, ms)

A job killed mid-line leaves its last line cut short: the next job of the trial ends it first
(so it is one damaged line, passed over with a word), and the importer reads only whole lines.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from ..base.files import writing
from ..base.secrets import redact, redact_text, screen
from .job_context import JobContext
from .system_metrics import sampled

OUTBOX = "mlflow_outbox.jsonl"
MODULE = "mlflow_best_module.pt"
"""A best model that is no transformers model, pickled for the importer to log as an MLflow model."""


def is_local_store(uri: Optional[str]) -> bool:
    """A store that is a file the trials would share: written by one process, never by trials."""
    return bool(uri) and uri.startswith("sqlite:")


class Outbox:
    """The trial's outbox, open for appending (global rank 0 only)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / OUTBOX
        with writing(self.path):
            self._file = open(self.path, "a+b")
            size = self._file.seek(0, os.SEEK_END)
            if size:
                self._file.seek(size - 1)
                if self._file.read(1) != b"\n":  # a killed job's last line, cut short: end it
                    self._file.write(b"\n")
            self._file.flush()

    def write(self, *items) -> None:
        with writing(self.path):
            self._file.write(b"".join(json.dumps(item, default=str).encode() + b"\n" for item in items))
            self._file.flush()


class OutboxLogger:
    """Metric points to the outbox (a Tracker). Nothing is sent over a network, so nothing waits
    and nothing is left unsent; the importer keeps each (metric, step) once, the first."""

    replays_record = False
    """A resumed job's earlier points are in the outbox already: metrics.jsonl is not replayed."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.outbox.write(*([key, float(value), now, step] for key, value in metrics.items()))

    def close(self) -> None:
        pass


def pending_finish(tracking, context: JobContext, uri: str, run_id: str, status: str, best_dir: Optional[Path],
                   error: Optional[str]) -> dict:
    """What ends a trial's run (mlflow_runs.complete_run), as it is kept until it is done."""
    return {"uri": uri, "run_id": run_id, "status": status, "error": redact_text(error) if error else None,
            "best_dir": str(best_dir) if best_dir else None, "parent_run_id": context.parent_run_id,
            "select_metric": context.select_metric, "select_mode": context.select_mode,
            "register_model": None if context.parent_run_id else tracking.register_model,  # a sweep's: its champion
            "sweep_dir": context.sweep_dir, "log_model": tracking.log_model}


class OutboxRun:
    """What TrialRun does for a run in a tracking server, written to the trial's outbox instead."""

    def __init__(self, tracking, context: JobContext, params: dict, directory: Path, run_tags: dict, commit):
        self.directory, self.context, self.tracking = Path(directory), context, tracking
        self.run_id = context.run_id
        self.outbox = Outbox(self.directory)
        tags = screen({**tracking.tags, **context.tags, **run_tags, "git_commit": commit})
        self.outbox.write({"params": screen(params)}, {"tags": tags},
                          {"status": "RUNNING", "time": int(time.time() * 1000)})

    def logger(self):
        return sampled(OutboxLogger(self.outbox), self.tracking.system_metrics_every_s)

    def log_dict(self, obj: dict, name: str) -> None:
        self.outbox.write({"dict": redact(obj), "name": name})

    def log_params(self, params: dict) -> None:
        self.outbox.write({"params": screen(params)})

    def log_inputs(self, inputs: list) -> None:
        self.outbox.write({"inputs": redact(inputs)})

    def set_tags(self, tags: dict) -> None:
        self.outbox.write({"tags": screen(tags)})

    def finish(self, status: str, best_dir: Optional[Path] = None, error: Optional[str] = None, module=None) -> None:
        pending = pending_finish(self.tracking, self.context, self.context.tracking_uri, self.run_id, status, best_dir,
                                 error)
        if module is not None:
            import torch

            with writing(self.directory / MODULE):
                torch.save(module, self.directory / MODULE)
            pending = {**pending, "module": str(self.directory / MODULE)}
        self.outbox.write({"finish": {**pending, "end_time": int(time.time() * 1000)}})
