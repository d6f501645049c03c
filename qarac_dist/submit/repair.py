"""Rebuild a sweep's manifest from what else holds it: sweep.json (the resolved sweep, so the
plan and every trial's config), each trial's own state.json (attempt, job id, last state) and
MLflow (the parent run and each trial's run, found by their tags). The damaged manifest, if
any, is kept beside the new one as `manifest.json.before-repair-<time>`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ..base.files import DamagedFile
from ..config import ConfigError, UserError
from ..config.schema import build
from ..config.sweep import SweepSpec
from ..plan import plan, select_defaults
from ..base.layout import SweepLayout
from . import claims
from .executors import resolve_kind
from .sweep_dir import Manifest, TrialRecord, read_micro_batches, read_sweep_file


def repair(directory: Path, check: Callable[[Manifest], None]) -> Manifest:
    """Repair what is damaged: the manifest (rebuilt only when it cannot be read; a readable one
    is kept, its attempts and jobs with it), then the rung records. `check(manifest)` runs first
    and may stop it (the scheduler cannot answer): nothing is written before."""
    layout = SweepLayout(directory)
    try:
        manifest = Manifest.load(directory)
    except DamagedFile:
        manifest = None
    if manifest is not None:
        check(manifest)
        _repair_rungs(layout, manifest)
        return manifest
    manifest = _rebuilt(layout)
    check(manifest)
    _keep_old(layout.manifest)
    manifest.save(directory)
    found = sum(r.mlflow_run_id is not None for r in manifest.trials.values())
    print(f"rebuilt {layout.manifest}: {len(manifest.trials)} trials, "
          f"{sum(r.job_id is not None for r in manifest.trials.values())} with a job, {found} with an MLflow run")
    _repair_rungs(layout, manifest)
    return manifest


def _rebuilt(layout: SweepLayout) -> Manifest:
    directory = layout.root
    saved = read_sweep_file(directory)
    if saved is None:
        raise UserError(f"{directory}: no {layout.sweep_file.name} here, so there is nothing to rebuild the manifest from")
    errors: list[str] = []
    spec = build(SweepSpec, saved.get("spec") or {}, "spec", errors)
    if errors or spec is None:
        raise UserError(f"{layout.sweep_file}: {errors[0] if errors else 'no spec'}")
    source = str(saved.get("source", layout.sweep_file))
    try:
        trials = plan(spec, saved.get("base") or {}, source, read_micro_batches(directory))
    except ConfigError as err:
        raise UserError(f"{layout.sweep_file}: the saved sweep no longer plans: {err.errors[0]}") from None
    from ..track.mlflow_client import absolute_uri

    metric, mode = select_defaults(spec, trials)
    manifest = Manifest(spec.name, resolve_kind(spec, source), metric, mode,
                        tracking_uri=absolute_uri(spec.tracking.uri), experiment=spec.tracking.experiment or spec.name)
    packed = claims.read(layout) if spec.trials_as_steps() else {}
    for trial in trials:
        record = TrialRecord(trial.id, trial.label, trial.overrides, trial.config, trial.config["output"]["dir"],
                             manifest.executor, slot=trial.slot, configuration=trial.configuration)
        status = record.trial_dir.status()
        claim = packed.get(trial.id)
        if claim is not None and claim.job is not None:  # a packed trial: the job that claimed it runs it
            record.attempt, record.pack_jobs, record.state = claim.attempt, [claim.job], "PENDING"
        elif status is not None:
            record.attempt = status.attempt or 1
            record.job_id = status.job_id if manifest.executor == "slurm" else str(status.pid)
            record.job_ids = [record.job_id] if record.job_id else []
            record.state = "PENDING"
        manifest.trials[trial.id] = record
    _find_runs(manifest)
    return manifest


def _repair_rungs(layout: SweepLayout, manifest: Manifest) -> None:
    """Rung records with a damaged line, rebuilt from the trials' own records (track/rungs.py)."""
    from ..track import rungs

    for k in range(len(list(layout.asha.glob("rung*.jsonl"))) if layout.asha.is_dir() else 0):
        trials = [(r.id, r.trial_dir, r.config["asha"]["rungs"][k]) for r in manifest.trials.values()
                  if (r.config.get("asha") or {}).get("rungs", [])[k:]]
        kept = rungs.rebuild(layout, k, manifest.select_metric, trials,
                             {r.id: r.configuration for r in manifest.trials.values() if r.configuration})
        if kept is not None:
            print(f"rebuilt {layout.rung(k)} from the trials' own records; the damaged one is {kept}")


def _find_runs(manifest: Manifest) -> None:
    """The sweep's parent run and the trials' runs, by their tags (created at submit time)."""
    from ..track.mlflow_client import client

    c = client(manifest.tracking_uri)
    exp = c.get_experiment_by_name(manifest.experiment)
    if exp is None:
        return
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{manifest.sweep}'", max_results=10000)
    parents = sorted((r for r in runs if r.data.tags.get("qarac.kind") == "sweep"), key=lambda r: r.info.start_time)
    if not parents:
        return
    parent = parents[-1]
    manifest.mlflow_parent_run_id = parent.info.run_id
    for run in runs:
        tags = run.data.tags
        if tags.get("qarac.kind") == "configuration" and tags.get("mlflow.parentRunId") == parent.info.run_id:
            manifest.configurations[tags.get("configuration")] = run.info.run_id
        elif parent.info.run_id in (tags.get("mlflow.parentRunId"), tags.get("sweep_run_id")) and \
                tags.get("trial_id") in manifest.trials:
            manifest.trials[tags["trial_id"]].mlflow_run_id = run.info.run_id


def _keep_old(path: Path) -> None:
    """The manifest being replaced, damaged or not, stays beside the new one."""
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.before-repair-{time.strftime('%Y%m%d-%H%M%S')}"))
