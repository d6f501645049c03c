"""Rank 0's metric sender: the training step appends to a buffer; a thread sends batches.

Metrics go to MLflow in `log_batch` requests of at most 1000 points. If the server is down,
the buffer grows to a bound, then spills to a file in the trial directory; both are sent when
the server answers again. What is still unsent when the job ends is left in
`mlflow_unsent.jsonl` and reported on stderr; `python -m qarac_dist.status --sync` replays it.
Every point reaches the run once, whoever sends it: before a metric's first send, the steps the
run already holds for it are read, and those points are dropped (a resumed job recomputes the
steps after its checkpoint and replays metrics.jsonl; `--sync` replays what a job left; a
request that failed may have reached the server, so after a failure the steps are read again).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from ..base.files import NOT_A_RECORD
from .mlflow_client import client, shown

UNSENT = "mlflow_unsent.jsonl"
SPILL = "mlflow_spill.jsonl"


class MlflowLogger:
    """Rank 0's metric sender: `log` appends to a buffer; a thread sends batches."""

    BATCH = 1000
    replays_record = True
    """A resumed job sends metrics.jsonl again first: what an interrupted job had not sent."""

    def __init__(self, uri: str, run_id: str, directory: Path, max_buffer: int = 50_000, interval_s: float = 5.0):
        self.uri, self.run_id, self.directory = uri, run_id, directory
        self.max_buffer, self.interval_s = max_buffer, interval_s
        self.buffer: deque = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.failing_since: Optional[float] = None
        self.sent = 0
        self.client = client(uri)
        self.held = HeldSteps(self.client, run_id)
        self.thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self.thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        with self.lock:
            for key, value in metrics.items():
                self.buffer.append((key, float(value), now, step))
            overflow = len(self.buffer) - self.max_buffer
            if overflow > 0:
                spilled = [self.buffer.popleft() for _ in range(overflow)]
                with open(self.directory / SPILL, "a") as f:
                    f.writelines(json.dumps(p) + "\n" for p in spilled)
        if len(self.buffer) >= self.BATCH:
            self.wake.set()

    def _send(self, points: list) -> bool:
        from mlflow.entities import Metric

        try:
            fresh = self.held.fresh(points)
            if fresh:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in fresh])
            self.held.add(fresh)
        except Exception as err:  # any transport or server error: keep the points, retry later
            self.held.forget({p[0] for p in points})  # the request may have reached the server
            if self.failing_since is None:
                self.failing_since = time.time()
                print(f"qarac_dist: MLflow at {shown(self.uri)} did not take metrics ({type(err).__name__}); "
                      f"buffering and retrying", file=sys.stderr)
            return False
        if self.failing_since is not None:
            print(f"qarac_dist: MLflow is back after {time.time() - self.failing_since:.0f} s; sending the backlog",
                  file=sys.stderr)
            self.failing_since = None
        self.sent += len(points)
        return True

    def _drain_once(self) -> bool:
        """Send spilled points first (they are oldest), then the buffer. False on failure."""
        spill = self.directory / SPILL
        if spill.exists():
            points = [p for p in _points(spill) if isinstance(p, tuple)]
            for start in range(0, len(points), self.BATCH):
                if not self._send(points[start:start + self.BATCH]):
                    spill.write_text("".join(json.dumps(p) + "\n" for p in points[start:]))
                    return False
            spill.unlink()
        while True:
            with self.lock:
                points = [self.buffer.popleft() for _ in range(min(self.BATCH, len(self.buffer)))]
            if not points:
                return True
            if not self._send(points):
                with self.lock:
                    self.buffer.extendleft(reversed(points))
                return False

    def _run(self) -> None:
        backoff = self.interval_s
        while not self.closing.is_set():
            self.wake.wait(backoff)
            self.wake.clear()
            backoff = self.interval_s if self._drain_once() else min(backoff * 2, 30.0)

    def close(self, timeout_s: float = 60.0) -> int:
        """Flush for up to `timeout_s`; write what is left to mlflow_unsent.jsonl. Returns the
        number of points left unsent."""
        self.closing.set()
        self.wake.set()
        self.thread.join()
        deadline = time.time() + timeout_s
        while not self._drain_once() and time.time() < deadline:
            time.sleep(1.0)
        left = list(self.buffer)
        spill = self.directory / SPILL
        if spill.exists():
            left = [p for p in _points(spill) if isinstance(p, tuple)] + left
            spill.unlink()
        if left:
            with open(self.directory / UNSENT, "a") as f:
                f.write(json.dumps({"uri": self.uri, "run_id": self.run_id}) + "\n")
                f.writelines(json.dumps(p) + "\n" for p in left)
            print(f"qarac_dist: {len(left)} metric points could not be sent to MLflow; they are in "
                  f"{self.directory / UNSENT}; replay with python -m qarac_dist.status --sync", file=sys.stderr)
        return len(left)


def replay_unsent(directory: Path) -> int:
    """Send the points left in `mlflow_unsent.jsonl` (a header line names the run before its
    points); the file is removed once all are sent."""
    path = directory / UNSENT
    if not path.exists():
        return 0
    from mlflow.entities import Metric

    batches: list[tuple[dict, list]] = []
    for item in _points(path):
        if isinstance(item, dict):
            batches.append((item, []))
        elif batches:
            batches[-1][1].append(item)
    sent = 0
    for header, points in batches:
        c = client(header["uri"])
        held = HeldSteps(c, header["run_id"])
        for start in range(0, len(points), MlflowLogger.BATCH):
            chunk = held.fresh(points[start:start + MlflowLogger.BATCH])
            if chunk:
                c.log_batch(header["run_id"], metrics=[Metric(k, v, t, s) for k, v, t, s in chunk])
            held.add(chunk)
            sent += len(chunk)
    path.unlink()
    return sent


def _points(path: Path):
    """The points (and run headers) of a spill or unsent file. Appended without a rename, so a
    kill or a full disk can leave its last line cut short, or a line that is no point: passed
    over, with a word."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    if lines and lines[-1]:
        print(f"qarac_dist: {path}: its last line was cut short; passed over", file=sys.stderr)
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if isinstance(item, dict):  # the header of an unsent file's run
                yield {"uri": str(item["uri"]), "run_id": str(item["run_id"])}
                continue
            key, value, timestamp, step = item
            yield (str(key), float(value), int(timestamp), int(step))
        except NOT_A_RECORD:
            print(f"qarac_dist: {path}: line {number} is not a metric point; passed over", file=sys.stderr)


class HeldSteps:
    """The steps a run holds per metric, read from MLflow once per metric (and again after a
    failed request): the points to send are those it does not hold yet, each (metric, step) once."""

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
        self.steps: dict[str, set[int]] = {}

    def fresh(self, points: list) -> list:
        for key in {p[0] for p in points} - self.steps.keys():
            self.steps[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        out, seen = [], set()
        for point in points:
            if point[3] not in self.steps[point[0]] and (point[0], point[3]) not in seen:
                seen.add((point[0], point[3]))
                out.append(point)
        return out

    def add(self, points: list) -> None:
        for key, _, _, step in points:
            self.steps[key].add(step)

    def forget(self, keys) -> None:
        for key in keys:
            self.steps.pop(key, None)
