"""The sweep's driver: keeps the manifest in step with the plan, the scheduler and the trials,
submits what is to run, makes the MLflow runs first, and closes the parent at the end.

Called by `python -m qarac_dist.sweep` and `status` while they hold the sweep's lock.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ..plan import Trial
from ..track import sweep_runs
from ..track.secrets import redact_text
from ..track.trial_dir import TrialState
from . import cluster
from .sweep_dir import DONE, FAILED, Attempt, Manifest, TrialRecord, own_error, resolve_state


def records_for(trials: list[Trial], executor: str, manifest: Manifest) -> dict[str, TrialRecord]:
    """The manifest's records, plus a QUEUED record for each planned trial it lacks."""
    records = dict(manifest.trials)
    for trial in trials:
        if trial.id not in records:
            records[trial.id] = TrialRecord(trial.id, trial.label, trial.overrides, trial.config,
                                            trial.config["output"]["dir"], executor)
    return records


def refresh(manifest: Manifest, local=None) -> None:
    """Update every record's state from the scheduler and the current attempt's own files."""
    records = list(manifest.trials.values())
    sched = cluster.job_states([r.job_id for r in records if r.job_id and r.executor == "slurm"])
    for r in records:
        if r.executor == "slurm":
            r.state = resolve_state(r, sched.get(r.job_id))
        else:
            from .executors import pid_alive

            alive = local.alive(r.id, r.job_id) if local is not None and r.job_id else (
                pid_alive(r.job_id) if r.job_id else False)
            r.state = resolve_state(r, None, alive)
        if r.state in FAILED:
            r.error = own_error(r) or r.error


def job_config(manifest: Manifest, record: TrialRecord) -> dict:
    """The training config a trial's job runs: the planned config, its attempt, where to track it."""
    config = {**record.config, "output": {**record.config["output"], "attempt": record.attempt}}
    config["tracking"] = {
        **record.config.get("tracking", {}),
        "uri": manifest.tracking_uri, "experiment": manifest.experiment, "run_id": record.mlflow_run_id,
        "parent_run_id": manifest.mlflow_parent_run_id, "sweep_dir": str(Path(record.output_dir).parent.parent),
        "select_metric": manifest.select_metric,
        "select_mode": manifest.select_mode,
        "tags": {**record.config.get("tracking", {}).get("tags", {}),
                 "sweep": manifest.sweep, "trial_id": record.id, "executor": record.executor}}
    return config


def ensure_runs(manifest: Manifest, records: list[TrialRecord], params: dict[str, dict], varied: list[str]) -> None:
    """Create the sweep's parent run and each trial's child run, once: their ids are kept in
    the manifest, so requeued and re-run jobs log to the same runs. A parent that ended is
    running again while trials are submitted anew."""
    uri, exp = manifest.tracking_uri, manifest.experiment
    if manifest.mlflow_parent_run_id is None:
        manifest.mlflow_parent_run_id = sweep_runs.create_parent(
            uri, exp, manifest.sweep, manifest.executor, {"varied": ", ".join(varied)},
            {"num_trials": str(len(manifest.trials)), "select.metric": manifest.select_metric,
             "select.mode": manifest.select_mode, "varied": ", ".join(varied) or "-"})
    elif records:
        sweep_runs.reopen(uri, manifest.mlflow_parent_run_id)
    for r in records:
        if r.mlflow_run_id is None:
            r.mlflow_run_id = sweep_runs.create_child(
                uri, exp, manifest.mlflow_parent_run_id, f"{r.id} {r.label}",
                {"sweep": manifest.sweep, "trial_id": r.id, "executor": r.executor, "varied": ", ".join(varied),
                 "label": r.label}, params.get(r.id, {}))


def submit_records(manifest: Manifest, directory: Path, executor, records: list[TrialRecord]) -> None:
    """A new attempt for each record: the old one's outcome goes to its history."""
    for r in records:
        if r.attempt:
            r.history.append(Attempt(r.attempt, list(r.job_ids[-1:]), r.state, r.error))
        r.attempt += 1
        r.state, r.error, r.job_id = "PENDING", None, None
    manifest.save(directory)
    job_ids = executor.submit({r.id: job_config(manifest, r) for r in records})
    for r in records:
        r.job_id = job_ids[r.id]
        r.job_ids.append(r.job_id)
    manifest.save(directory)


def close_parent(manifest: Manifest) -> None:
    """When every trial's latest attempt has ended: name the best trial on the parent run and
    end it, FINISHED when all of them completed (or were pruned)."""
    if manifest.mlflow_parent_run_id is None or not manifest.all_ended():
        return
    try:
        asha = next((r.config["asha"]["record_dir"] for r in manifest.trials.values() if r.config.get("asha")), None)
        sweep_dir = str(Path(next(iter(manifest.trials.values())).output_dir).parent.parent)
        sweep_runs.close_parent(manifest.tracking_uri, manifest.mlflow_parent_run_id, manifest.select_metric,
                                manifest.select_mode, all(r.state in DONE for r in manifest.trials.values()), asha,
                                sweep_dir)
    except Exception as err:  # noqa: BLE001 - the sweep's own outcome stands; say why MLflow lags
        print(f"qarac_dist: could not update the sweep's MLflow run: {type(err).__name__}: {redact_text(str(err))}",
              file=sys.stderr)


def cancel(manifest: Manifest, local_pids: Optional[list[str]] = None) -> list[TrialRecord]:
    """Cancel the active trials' jobs; returns the records cancelled."""
    active = [r for r in manifest.trials.values() if r.active]
    if manifest.executor == "slurm":
        cluster.cancel([r.job_id for r in active])
    else:
        import os
        import signal

        for r in active:
            try:
                os.kill(int(r.job_id), signal.SIGTERM)
            except (ProcessLookupError, ValueError, TypeError):
                pass
    for r in active:
        r.state = TrialState.CANCELLED.value
    return active
