"""A trial's MLflow run, held by global rank 0 of its job only.

The run was made when the sweep submitted (track/sweep_runs.py); its id travels in the job's
context (track/job_context.py), so a job, a requeued job and a re-run all log to it. Every call to the server
here may fail (server down or slow): the job goes on, metrics are buffered by `MlflowLogger`,
and an unfinished end of run (artifacts, status, the parent's verdict) is left in
`mlflow_pending_finish.json` for `python -m qarac_dist.status --sync`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from ..base.files import read_json, write_json
from .mlflow_client import absolute_uri, client, create_run, dataset_inputs, experiment_id, git_commit, shown
from .mlflow_logger import MlflowLogger, replay_unsent
from .outbox import OutboxRun, is_local_store, pending_finish
from .system_metrics import sampled
from ..base.layout import SweepLayout
from ..base.secrets import redact, redact_text, screen
from .job_context import JobContext
from .sweep_runs import update_parent
from .trial_dir import BEST_INFO, TrialDir

PENDING_FINISH = "mlflow_pending_finish.json"


def open_run(tracking, context: JobContext, name: str, params: dict, directory: Path, run_tags: dict):
    """A sweep trial whose store is a sqlite file keeps its record in its own directory, for the
    one importer (track/outbox.py); otherwise rank 0 writes the run itself."""
    if context.sweep_dir and context.run_id and is_local_store(context.tracking_uri):
        return OutboxRun(tracking, context, params, directory, run_tags, git_commit())
    return TrialRun(tracking, context, name, params, directory, run_tags)


class TrialRun:
    def __init__(self, tracking, context: JobContext, name: str, params: dict, directory: Path, run_tags: dict):
        self.uri = absolute_uri(context.tracking_uri or tracking.uri)
        self.tracking, self.context, self.directory = tracking, context, directory
        self.client = client(self.uri)
        self.run_id = context.run_id
        if self.run_id is None:  # a standalone `python -m qarac_dist.train` with tracking.uri set
            exp = experiment_id(self.client, context.experiment or tracking.experiment or name)
            self.run_id = create_run(self.client, exp, name, dict(tracking.tags), params)
        tags = screen({**tracking.tags, **context.tags, **run_tags, "git_commit": git_commit()})
        try:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(self.run_id, status="RUNNING")
        except Exception as err:  # noqa: BLE001 - any transport or server error
            print(f"qarac_dist: could not tag MLflow run {self.run_id}: {type(err).__name__}; training goes on",
                  file=sys.stderr)

    def logger(self):
        return sampled(MlflowLogger(self.uri, self.run_id, self.directory), self.tracking.system_metrics_every_s)

    def log_dict(self, obj: dict, name: str) -> None:
        try:
            self.client.log_dict(self.run_id, redact(obj), name)
        except Exception as err:  # noqa: BLE001
            print(f"qarac_dist: could not log {name} to MLflow: {type(err).__name__}", file=sys.stderr)

    def log_params(self, params: dict) -> None:
        """Params a job learns while it runs (what its data holds); a requeued job sends the same values."""
        try:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in screen(params).items()])
        except Exception as err:  # noqa: BLE001
            print(f"qarac_dist: could not log params to MLflow run {self.run_id}: {type(err).__name__}",
                  file=sys.stderr)

    def log_inputs(self, inputs: list) -> None:
        try:
            self.client.log_inputs(self.run_id, datasets=dataset_inputs(inputs))
        except Exception as err:  # noqa: BLE001
            print(f"qarac_dist: could not log the data to MLflow run {self.run_id}: {type(err).__name__}",
                  file=sys.stderr)

    def set_tags(self, tags: dict) -> None:
        try:
            for key, value in screen(tags).items():
                self.client.set_tag(self.run_id, key, value)
        except Exception as err:  # noqa: BLE001
            print(f"qarac_dist: could not tag MLflow run {self.run_id}: {type(err).__name__}", file=sys.stderr)

    def finish(self, status: str, best_dir: Optional[Path] = None, error: Optional[str] = None, module=None) -> None:
        """End the run: the best model (as an MLflow model: `module` for one that is not a
        transformers model), the best metrics, the status, the parent's verdict."""
        pending = pending_finish(self.tracking, self.context, self.uri, self.run_id, status, best_dir, error)
        try:
            complete_run(self.client, pending, module)
        except Exception as err:  # noqa: BLE001
            write_json(self.directory / PENDING_FINISH, pending)
            print(f"qarac_dist: MLflow run {self.run_id} at {shown(self.uri)} not finished ({type(err).__name__}: "
                  f"{redact_text(str(err))}); replay with python -m qarac_dist.status --sync", file=sys.stderr)


def complete_run(mlflow_client, pending: dict, module=None, parent: bool = True) -> None:
    """End a trial's run: best model and its metrics, status, and (`parent`) the parent's best
    trial, which an importer of many ends updates once after them (update_parents)."""
    run_id = pending["run_id"]
    best_dir = Path(pending["best_dir"]) if pending.get("best_dir") else None
    info = read_json(best_dir / BEST_INFO) if best_dir is not None else None
    if info is not None:
        from mlflow.entities import Metric, RunTag

        # Done once per best step: an end replayed (an importer killed mid-way, --sync) adds nothing.
        now, run = int(time.time() * 1000), mlflow_client.get_run(run_id)
        first = next(iter(info["metrics"]), None)
        if first is None or info["step"] not in {m.step for m in mlflow_client.get_metric_history(
                run_id, f"best_val_{first}")}:
            mlflow_client.log_batch(run_id, metrics=[Metric(f"best_val_{k}", float(v), now, info["step"])
                                                     for k, v in info["metrics"].items()],
                                    tags=[RunTag("best_step", str(info["step"])),
                                          RunTag("best_metric", info["metric"])])
        if run.data.tags.get("best_model_step") != str(info["step"]):
            logged = _model_of_step(mlflow_client, run, info["step"])
            if logged is None:
                _log_model(mlflow_client, pending, best_dir, _module(pending, module), info["step"])
            else:  # logged before a kill took the run's tag: not logged twice
                mlflow_client.set_tag(run_id, "best_model_id", logged)
            mlflow_client.set_tag(run_id, "best_model_step", str(info["step"]))
    if pending.get("error"):
        mlflow_client.set_tag(run_id, "error", str(pending["error"])[:5000])
    mlflow_client.set_terminated(run_id, status=pending["status"], end_time=pending.get("end_time"))
    if parent:
        update_parents(mlflow_client, [pending])


def update_parents(mlflow_client, ends: list[dict]) -> None:
    """The best trial of each sweep parent that these ends of runs name, chosen again once each."""
    seen = set()
    for pending in ends:
        parent = pending.get("parent_run_id")
        if not isinstance(parent, str) or not parent or parent in seen:
            continue
        seen.add(parent)
        try:
            info = read_json(Path(pending["best_dir"]) / BEST_INFO) if pending.get("best_dir") else None
            metric = pending.get("select_metric") or (info or {}).get("metric") or "loss"
            sweep = SweepLayout(Path(pending["sweep_dir"])) if pending.get("sweep_dir") else None
            update_parent(mlflow_client, parent, metric, pending.get("select_mode") or "max", sweep)
        except Exception as err:  # noqa: BLE001 - a parent deleted in the UI: the trials' records still go in
            print(f"qarac_dist: the sweep's MLflow run {parent}: its best trial was not updated ({type(err).__name__}: "
                  f"{redact_text(str(err))[:300]})", file=sys.stderr)


def _model_of_step(mlflow_client, run, step: int) -> Optional[str]:
    """The run's model of this best step, logged whole before a replayed end (an importer or
    --sync killed after logging it); a model whose logging was cut short stays PENDING and is
    deleted, so the run shows one model."""
    from mlflow.entities import LoggedModelStatus

    found = None
    for model in mlflow_client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"):
        if model.status == LoggedModelStatus.PENDING:
            mlflow_client.delete_logged_model(model.model_id)
        elif model.status == LoggedModelStatus.READY and (model.tags or {}).get("best_step") == str(step):
            found = model.model_id
    return found


def _module(pending: dict, module):
    """The best model's module: the job's own, or the one it pickled for the importer (outbox.MODULE)."""
    if module is not None or not pending.get("module") or not Path(pending["module"]).exists():
        return module
    import torch

    return torch.load(pending["module"], weights_only=False)


def _log_model(mlflow_client, pending: dict, best_dir: Path, module, step: int) -> None:
    """The best model as an MLflow model; if MLflow cannot take this model as one, its files as a
    plain `best_model/` artifact, with a warning."""
    from . import logged_model

    run_id = pending["run_id"]
    if not pending.get("log_model", True):
        mlflow_client.log_artifacts(run_id, str(best_dir), "best_model")
        return
    try:
        model_id = logged_model.log(pending["uri"], run_id, best_dir, step, module, pending.get("register_model"))
    except Exception as err:  # noqa: BLE001 - a flavour that does not fit this model: keep its files
        print(f"qarac_dist: the best model could not be logged as an MLflow model ({type(err).__name__}: "
              f"{redact_text(str(err))[:300]}); its files are the run's best_model/ artifact", file=sys.stderr)
        model_id = None
    if model_id is None:
        mlflow_client.log_artifacts(run_id, str(best_dir), "best_model")
    else:
        mlflow_client.set_tag(run_id, "best_model_id", model_id)


def sync(directory: Path) -> tuple[int, bool]:
    """Replay what a trial could not send: metric points, then its end of run. Returns the
    number of points sent and whether a pending finish was completed. Not while a job trains the
    trial (WriterHeld): that job sends what it has, and may be appending to the same files."""
    if not directory.is_dir():  # never started: nothing to send
        return 0, False
    writer = TrialDir(directory).hold_writer(f"status --sync, pid {os.getpid()}")
    try:
        sent = replay_unsent(directory)
        path = directory / PENDING_FINISH
        pending = read_json(path)
        if pending is None:
            return sent, False
        complete_run(client(pending["uri"]), pending)
        path.unlink()
        return sent, True
    finally:
        writer.close()
