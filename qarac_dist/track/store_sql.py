"""The importer's writes to a sqlite store, with SQL: metric points, and the events MLflow's
client would spend a session and several queries each on (tags, params, a job's start, the end
of a run that has no model to log). One transaction per chunk holds them all, so a kill leaves
a chunk whole or absent.

Written as MLflow's SqlAlchemyStore writes them (MLflow pinned in constraints.txt), and only
after the tables are checked to have the columns this code knows; a store whose tables differ,
and an event this code does not take on (a model to log, an artifact, a run's name, a name
MLflow would refuse), go through MLflow's client (track/store_import.py). What MLflow does that
is kept here: a point of a (run, metric, step) the run holds is not added again, and the latest
point moves only forward (`latest_metrics`); a param keeps its first value; a tag takes the
last; a start (`RUNNING`) never overrides an end of the run made later (a --cancel); only runs
not deleted are written.
"""

from __future__ import annotations

import math
import posixpath
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Optional

from ..base.secrets import redact_text

_COLUMNS = {
    "metrics": {"key", "value", "timestamp", "run_uuid", "step", "is_nan"},
    "latest_metrics": {"key", "value", "timestamp", "run_uuid", "step", "is_nan"},
    "tags": {"key", "value", "run_uuid"},
    "params": {"key", "value", "run_uuid"},
}
_RUN_COLUMNS = {"run_uuid", "status", "end_time", "lifecycle_stage"}
_BIGGEST = 1.7976931348623157e308
"""What MLflow stores for an infinite value (SQL has no infinity)."""
INT64 = 1 << 63
"""MLflow keeps steps and timestamps as signed 64-bit integers."""
_NAME = re.compile(r"[\w\-. /:]{1,250}")
_STATUSES = {"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"}


def name_ok(name) -> bool:
    """A metric, param or tag name MLflow takes (on POSIX): letters, digits, _ - . / : and spaces,
    at most 250 characters, and a path that names itself (no `a//b`, `./a`, `..`, leading `/`)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return False
    norm = posixpath.normpath(name)
    return norm == name and norm != "." and not norm.startswith(("..", "/"))


def ms(value) -> Optional[int]:
    """A time in ms since the epoch as MLflow takes one (a nonnegative int64), or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < INT64 else None


def sql_event(item: dict) -> bool:
    """Whether this event is written with SQL: tags (not the run's name), params, a start, and
    an end with no model and no pickled module to log."""
    if "tags" in item or "params" in item:
        return all(name_ok(k) and k != "mlflow.runName" for k in item.get("tags", item.get("params")))
    if "status" in item:
        return item["status"] in _STATUSES
    return "finish" in item and not item["finish"].get("best_dir") and not item["finish"].get("module") and \
        str(item["finish"].get("status")) in _STATUSES


class StoreWriter:
    """Points and events queued per run, written in one transaction per chunk (`flush`)."""

    def __init__(self, db: Path, mlflow_client):
        self.path, self.client = db, mlflow_client
        self.points: dict[str, list] = {}
        self.events: dict[str, list] = {}
        self.size = 0

    def __enter__(self) -> "StoreWriter":
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA cache_size = -65536")  # 64 MiB: the metrics' index outgrows SQLite's 2 MiB
        columns = {table: {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                   for table in [*_COLUMNS, "runs"]}
        self.fast = all(columns[table] == known for table, known in _COLUMNS.items()) and _RUN_COLUMNS <= columns["runs"]
        return self

    def __exit__(self, *_) -> None:
        self.db.close()

    def add(self, run_id: str, items: list) -> list:
        """Queue the trial's points and, in order, its events up to the first that MLflow's client
        must write (an artifact or the data inputs, which nothing else depends on, are passed by);
        returns the events for the client, in order."""
        points = [item for item in items if isinstance(item, tuple)]
        if points:
            self.points.setdefault(run_id, []).extend(points)
            self.size += len(points)
        queued, client, held = [], [], False
        for event in (item for item in items if isinstance(item, dict)):
            if held or not (self.fast and sql_event(event)):
                held = held or not ("dict" in event or "inputs" in event)  # order-free: MLflow keeps each once
                client.append(event)
            else:
                queued.append(event)
        if queued:
            self.events.setdefault(run_id, []).extend(queued)
        return client

    def flush(self) -> tuple[int, int, list[dict]]:
        """Write what is queued: the points written, the events, and the ends of runs (for the
        parents' verdict)."""
        points, events = self.points, self.events
        self.points, self.events, self.size = {}, {}, 0
        if not points and not events:
            return 0, 0, []
        if not self.fast:
            return self._client(points), 0, []
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            active = self._active(list({**points, **events}))
            for run in {**points, **events}.keys() - active:
                print(f"qarac_dist: MLflow run {run} is not in the store or was deleted; its record is not imported "
                      f"(restored, it gets it with python -m qarac_dist.status --sync)", file=sys.stderr)
            written = self._points({run: p for run, p in points.items() if run in active})
            ends = self._events({run: e for run, e in events.items() if run in active})
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends some failed transactions itself (a full disk)
                db.execute("ROLLBACK")
            raise
        return written, sum(len(e) for run, e in events.items() if run in active), ends

    def _active(self, runs: list[str]) -> set[str]:
        active: set[str] = set()
        for start in range(0, len(runs), 500):
            part = runs[start:start + 500]
            active.update(run for (run,) in self.db.execute(
                f"SELECT run_uuid FROM runs WHERE run_uuid IN ({','.join('?' * len(part))}) "
                f"AND lifecycle_stage = 'active'", part))
        return active

    def _points(self, queued: dict[str, list]) -> int:
        db, runs = self.db, list(queued)
        latest: dict[tuple[str, str], int] = {}
        for start in range(0, len(runs), 500):
            part = runs[start:start + 500]
            latest.update(((run, key), step) for run, key, step in db.execute(
                f"SELECT run_uuid, key, step FROM latest_metrics WHERE run_uuid IN ({','.join('?' * len(part))})",
                part))
        rows, newest, held, added = [], {}, {}, {}
        for run, points in queued.items():
            for key, value, timestamp, step in points:
                pair = (run, key)
                mine = added.setdefault(pair, set())
                if step in mine:
                    continue  # each (metric, step) once: the first
                if pair in latest and step <= latest[pair]:
                    # Mostly a resumed job's replay of steps the store holds (the first value
                    # stays); a step it lacks (validated again after a rollback) is added.
                    if pair not in held:
                        held[pair] = {n for (n,) in db.execute(
                            "SELECT step FROM metrics WHERE run_uuid = ? AND key = ?", pair)}
                    if step in held[pair]:
                        continue
                else:
                    latest[pair] = step
                mine.add(step)
                nan = math.isnan(value)
                row = (key, 0.0 if nan else max(-_BIGGEST, min(_BIGGEST, value)), timestamp, run, step, nan)
                rows.append(row)
                if latest[pair] == step:
                    newest[pair] = row
        db.executemany("INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                       "VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT OR REPLACE INTO latest_metrics (key, value, timestamp, run_uuid, step, is_nan) "
                       "VALUES (?, ?, ?, ?, ?, ?)", newest.values())
        return len(rows)

    def _events(self, queued: dict[str, list]) -> list[dict]:
        db, ends = self.db, []
        for run, events in queued.items():
            for event in events:
                if "tags" in event:
                    db.executemany("INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                                   [(k, str(v)[:5000], run) for k, v in event["tags"].items()])
                elif "params" in event:  # a param keeps its first value
                    db.executemany("INSERT OR IGNORE INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                                   [(k, str(v)[:6000], run) for k, v in event["params"].items()])
                elif "status" in event:  # not over an end made later (--cancel's KILLED)
                    at = ms(event.get("time"))
                    db.execute("UPDATE runs SET status = ? WHERE run_uuid = ? AND (? IS NULL OR end_time IS NULL "
                               "OR end_time = 0 OR ? > end_time)", (event["status"], run, at, at))
                else:
                    finish = event["finish"]
                    if finish.get("error"):
                        db.execute("INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES ('error', ?, ?)",
                                   (str(finish["error"])[:5000], run))
                    db.execute("UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                               (str(finish["status"]), ms(finish.get("end_time")) or int(time.time() * 1000), run))
                    ends.append({**finish, "run_id": run})
        return ends

    def _client(self, queued: dict[str, list]) -> int:
        from mlflow.entities import Metric

        from .mlflow_logger import HeldSteps

        sent = 0
        for run, points in queued.items():
            try:
                fresh = HeldSteps(self.client, run).fresh(points)
                for start in range(0, len(fresh), 1000):
                    self.client.log_batch(run, metrics=[Metric(*p) for p in fresh[start:start + 1000]])
                    sent += len(fresh[start:start + 1000])
            except Exception as err:  # noqa: BLE001 - a run deleted, a point refused: the other runs go on
                print(f"qarac_dist: MLflow run {run}: its points were not all imported ({type(err).__name__}: "
                      f"{redact_text(str(err))[:300]})", file=sys.stderr)
        return sent
