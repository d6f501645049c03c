"""Reaching an MLflow store: the URI, the client, experiments and runs.

A new sqlite store is created (its schema migrated) by the first client that opens it. Two
processes doing that at the same moment race inside MLflow and can leave a half-migrated file
that no client opens again, so the first touch of a sqlite store happens under a lock on
`<file>.lock` beside it (base/lock.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

from ..base.lock import locked
from ..base.secrets import redact_text, screen

_opened: set[str] = set()


def default_uri() -> str:
    """sqlite:///mlflow.db in the working directory, made absolute so jobs find the same file."""
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def absolute_uri(uri: Optional[str]) -> str:
    if not uri:
        return default_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def shown(uri: str) -> str:
    """The URI as it may be printed: credentials redacted."""
    return redact_text(uri)


def client(uri: str):
    """An MlflowClient; the first one per sqlite file in this process opens it under a lock."""
    # Our own retry loop decides how long to wait; MLflow's default retries block for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow prints a run's URL when a run it started ends; the URI may hold credentials.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and uri not in _opened:
        db = Path(uri[len("sqlite:///"):])
        with locked(Path(f"{db}.lock"), "a"):
            # Constructing the client already creates and migrates the store: inside the lock.
            c = MlflowClient(tracking_uri=uri)
            c.search_experiments(max_results=1)
        _opened.add(uri)
        return c
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created by another process meanwhile
        return mlflow_client.get_experiment_by_name(name).experiment_id


def create_run(mlflow_client, exp_id: str, name: str, tags: dict, params: Optional[dict] = None,
               parent_run_id: Optional[str] = None) -> str:
    """A run with screened tags and params (secrets.screen); returns its id."""
    tags = screen(tags)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(exp_id, tags=tags, run_name=redact_text(name))
    log_screened_params(mlflow_client, run.info.run_id, params or {})
    return run.info.run_id


def log_screened_params(mlflow_client, run_id: str, params: dict) -> None:
    """Params with secrets screened (secrets.screen), in batches MLflow takes."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in screen(params).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


def dataset_inputs(inputs: list) -> list:
    """MLflow's dataset inputs of a run, from train/data.py's record of its splits."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(str(i["name"])[:500], str(i["digest"])[:36], str(i["source_type"])[:36],
                                 json.dumps(i["source"]), profile=json.dumps({"num_rows": i["rows"]})),
                         [InputTag("mlflow.data.context", str(i["context"]))]) for i in inputs]


def git_commit() -> Optional[str]:
    """The project's git commit, for the runs' tags (None outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
