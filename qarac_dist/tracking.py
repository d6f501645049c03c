"""Where metrics go: metrics.jsonl in the output directory, and MLflow.

Only global rank 0 holds a tracker; other ranks hold `NullTracker`. MLflow runs are created
when the sweep submits (one parent per sweep, one child per trial) and their ids travel with
the trial, so a job, a requeued job and a re-run all reattach to the same run instead of
opening new ones (mlflow#11782, Lightning#6205).

Metrics go to MLflow from a background thread in `log_batch` requests of at most 1000 points;
the training step only appends to a buffer. If the server is down, the buffer grows to a bound,
then spills to a file in the trial directory; both are sent when the server answers again.
What is still unsent when the job ends is left in `mlflow_unsent.jsonl` and reported on stderr;
`python -m qarac_dist.status --sync runs/<sweep>` replays it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional, Protocol

SECRET_PATTERNS = ("*TOKEN*", "*PASSWORD*", "*SECRET*", "*KEY*", "*CREDENTIAL*")
UNSENT = "mlflow_unsent.jsonl"
SPILL = "mlflow_spill.jsonl"


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class Trackers:
    """Several trackers as one."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


class MetricsFile:
    """Appends one JSON line per logged step to `metrics.jsonl`."""

    def __init__(self, path: Path, keep_through_step: Optional[int] = None):
        self.path = path
        if keep_through_step is not None and path.exists():
            # A resumed job recomputes the steps after its checkpoint: drop their old rows.
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step]
            path.write_text("".join(r + "\n" for r in rows))
        self._file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- MLflow

def default_uri() -> str:
    """sqlite:///mlflow.db in the working directory, made absolute so jobs find the same file."""
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def absolute_uri(uri: Optional[str]) -> str:
    if not uri:
        return default_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def client(uri: str):
    # Our own retry loop decides how long to wait; MLflow's default retries block for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, p) for p in SECRET_PATTERNS)


def safe_params(flat: dict, environ=os.environ) -> dict[str, str]:
    """Flattened config -> MLflow params, without secrets: no key whose name looks like a
    token, password, secret or key, and no value equal to such an environment variable."""
    secret_values = {v for k, v in environ.items() if is_secret(k) and len(v) >= 4}
    params = {}
    for key, value in flat.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if any(is_secret(part) for part in key.split(".")) or text in secret_values or any(
                s in text for s in secret_values):
            continue
        params[key[:250]] = text[:6000]
    return params


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def experiment_id(mlflow_client, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:  # created by another process meanwhile
        return mlflow_client.get_experiment_by_name(name).experiment_id


def create_run(mlflow_client, exp_id: str, name: str, tags: dict, params: Optional[dict] = None,
               parent_run_id: Optional[str] = None) -> str:
    from mlflow.entities import Param

    tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(exp_id, tags=tags, run_name=name)
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in (params or {}).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])
    return run_id


def update_parent(mlflow_client, parent_run_id: str, metric: str, mode: str) -> Optional[tuple[str, float]]:
    """Name the best finished child on the parent (tags best_trial, best_run_id; metric
    best_<metric>) and attach a summary table of all children. Recomputed from every child,
    so concurrent callers converge."""
    parent = mlflow_client.get_run(parent_run_id)
    children = mlflow_client.search_runs([parent.info.experiment_id],
                                         filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                         max_results=10000)
    key = f"best_val_{metric}"
    lines = [f"trial,run_id,status,{key},best_step"]
    best = None
    # Ties go to the smallest trial id, as in the sweep's summary table.
    for child in sorted(children, key=lambda r: r.data.tags.get("trial_id", "")):
        value = child.data.metrics.get(key)
        tags = child.data.tags
        lines.append(f"{tags.get('trial_id')},{child.info.run_id},{child.info.status},"
                     f"{'' if value is None else value},{tags.get('best_step', '')}")
        if value is None or math.isnan(value) or child.info.status != "FINISHED":
            continue
        if best is None or (value > best[1] if mode == "max" else value < best[1]):
            best = (child, value)
    mlflow_client.log_text(parent_run_id, "\n".join(lines) + "\n", "summary.csv")
    if best is None:
        return None
    child, value = best
    mlflow_client.set_tag(parent_run_id, "best_trial", child.data.tags.get("trial_id"))
    mlflow_client.set_tag(parent_run_id, "best_run_id", child.info.run_id)
    mlflow_client.log_metric(parent_run_id, key, value)
    return child.data.tags.get("trial_id"), value


class MlflowLogger:
    """Rank 0's metric sender: `log` appends to a buffer; a thread sends batches."""

    BATCH = 1000

    def __init__(self, uri: str, run_id: str, directory: Path, max_buffer: int = 50_000, interval_s: float = 5.0):
        self.uri, self.run_id, self.directory = uri, run_id, directory
        self.max_buffer, self.interval_s = max_buffer, interval_s
        # Last step the run already holds, per metric: a resumed job recomputes the steps after
        # its checkpoint, and those that reached MLflow before the interruption are not sent twice.
        self.last_steps: dict[str, Optional[int]] = {}
        self.buffer: deque = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.failing_since: Optional[float] = None
        self.sent = 0
        self.client = client(uri)
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
            for key in {p[0] for p in points} - self.last_steps.keys():
                self.last_steps[key] = last_logged_step(self.client, self.run_id, key)
            fresh = [(k, v, t, s) for k, v, t, s in points if self.last_steps[k] is None or s > self.last_steps[k]]
            if fresh:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in fresh])
        except Exception as err:  # any transport or server error: keep the points, retry later
            if self.failing_since is None:
                self.failing_since = time.time()
                print(f"qarac_dist: MLflow at {self.uri} did not take metrics ({type(err).__name__}); "
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
            points = [tuple(json.loads(line)) for line in spill.read_text().splitlines() if line.strip()]
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
            left = [tuple(json.loads(line)) for line in spill.read_text().splitlines() if line.strip()] + left
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
    for line in path.read_text().splitlines():
        item = json.loads(line) if line.strip() else None
        if isinstance(item, dict):
            batches.append((item, []))
        elif item is not None:
            batches[-1][1].append(tuple(item))
    sent = 0
    for header, points in batches:
        c = client(header["uri"])
        for start in range(0, len(points), MlflowLogger.BATCH):
            chunk = points[start:start + MlflowLogger.BATCH]
            c.log_batch(header["run_id"], metrics=[Metric(k, v, t, s) for k, v, t, s in chunk])
            sent += len(chunk)
    path.unlink()
    return sent


def last_logged_step(mlflow_client, run_id: str, key: str) -> Optional[int]:
    history = mlflow_client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=None)


PENDING_FINISH = "mlflow_pending_finish.json"


class TrialRun:
    """The MLflow side of one training job, held by global rank 0 only.

    Every call to the server here may fail (server down or slow): the job goes on, metrics are
    buffered by `MlflowLogger`, and an unfinished end-of-run (artifacts, status, parent) is left
    in mlflow_pending_finish.json for `python -m qarac_dist.status --sync`.
    """

    def __init__(self, tracking, name: str, flat_config: dict, directory: Path, run_tags: dict):
        self.uri = absolute_uri(tracking.uri)
        self.tracking, self.directory = tracking, directory
        self.client = client(self.uri)
        self.run_id = tracking.run_id
        if self.run_id is None:  # a standalone `python -m qarac_dist.train` with tracking.uri set
            exp = experiment_id(self.client, tracking.experiment or name)
            self.run_id = create_run(self.client, exp, name, dict(tracking.tags), safe_params(flat_config))
        tags = {**tracking.tags, **run_tags, "git_commit": git_commit()}
        try:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])
            self.client.update_run(self.run_id, status="RUNNING")
        except Exception as err:
            print(f"qarac_dist: could not tag MLflow run {self.run_id}: {type(err).__name__}; training goes on",
                  file=sys.stderr)

    def logger(self) -> MlflowLogger:
        return MlflowLogger(self.uri, self.run_id, self.directory)

    def log_dict(self, obj: dict, name: str) -> None:
        try:
            self.client.log_dict(self.run_id, obj, name)
        except Exception as err:
            print(f"qarac_dist: could not log {name} to MLflow: {type(err).__name__}", file=sys.stderr)

    def finish(self, status: str, best_dir: Optional[Path] = None, error: Optional[str] = None) -> None:
        pending = {"uri": self.uri, "run_id": self.run_id, "status": status, "error": error,
                   "best_dir": str(best_dir) if best_dir else None,
                   "parent_run_id": self.tracking.parent_run_id, "select_metric": self.tracking.select_metric,
                   "select_mode": self.tracking.select_mode, "register_model": self.tracking.register_model}
        try:
            complete_run(self.client, pending)
        except Exception as err:
            write_pending(self.directory / PENDING_FINISH, pending)
            print(f"qarac_dist: MLflow run {self.run_id} not finished ({type(err).__name__}: {err}); "
                  f"replay with python -m qarac_dist.status --sync", file=sys.stderr)


def write_pending(path: Path, pending: dict) -> None:
    path.write_text(json.dumps(pending, indent=2))


def complete_run(mlflow_client, pending: dict) -> None:
    """End a trial's run: best model and its metrics, status, the parent's best trial."""
    run_id = pending["run_id"]
    best_dir = Path(pending["best_dir"]) if pending.get("best_dir") else None
    info = json.loads((best_dir / "qarac_best.json").read_text()) if best_dir and (best_dir / "qarac_best.json").exists() else None
    if info is not None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        mlflow_client.log_batch(run_id, metrics=[Metric(f"best_val_{k}", float(v), now, info["step"])
                                                 for k, v in info["metrics"].items()],
                                tags=[RunTag("best_step", str(info["step"])), RunTag("best_metric", info["metric"])])
        mlflow_client.log_artifacts(run_id, str(best_dir), "best_model")
        if pending.get("register_model"):
            _register(mlflow_client, pending["register_model"], run_id, info)
    if pending.get("error"):
        mlflow_client.set_tag(run_id, "error", pending["error"][:5000])
    mlflow_client.set_terminated(run_id, status=pending["status"])
    if pending.get("parent_run_id"):
        metric = pending.get("select_metric") or (info or {}).get("metric") or "loss"
        update_parent(mlflow_client, pending["parent_run_id"], metric, pending.get("select_mode") or "max")


def _register(mlflow_client, name: str, run_id: str, info: dict) -> None:
    try:
        mlflow_client.create_registered_model(name)
    except Exception:
        pass  # it exists
    run = mlflow_client.get_run(run_id)
    mlflow_client.create_model_version(name, f"{run.info.artifact_uri}/best_model", run_id=run_id,
                                       tags={"metric": info["metric"], "value": str(info["metrics"][info["metric"]]),
                                             "step": str(info["step"])})


def sync(directory: Path) -> tuple[int, bool]:
    """Replay what a trial could not send: metric points, then its end-of-run. Returns the
    number of points sent and whether a pending finish was completed."""
    sent = replay_unsent(directory)
    path = directory / PENDING_FINISH
    finished = False
    if path.exists():
        pending = json.loads(path.read_text())
        complete_run(client(pending["uri"]), pending)
        path.unlink()
        finished = True
    return sent, finished
