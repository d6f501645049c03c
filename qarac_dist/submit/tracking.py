"""The driver's side of MLflow: the sweep's parent run and each trial's child run, made before
anything is submitted (their ids go to the manifest and, through the job's context, to the
jobs), the preflight report on the parent, and the parent's verdict once every trial ended."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

from ..base.layout import SweepLayout
from ..base.lock import LockHeld
from ..base.secrets import redact_text
from ..track.code_record import CodeRecord
from ..track.outbox import is_local_store
from ..track.store_import import one_writer
from .sweep_dir import DONE, Manifest, TrialRecord


def ensure_runs(manifest: Manifest, records: list[TrialRecord], varied: list[str],
                code: Optional[CodeRecord] = None) -> None:
    """Create the sweep's parent run and each trial's child run, once: their ids are kept in
    the manifest, so requeued and re-run jobs log to the same runs. A parent that ended is
    running again while trials are submitted anew. `code` (the user's code, read now) goes on
    the parent and the runs of the trials submitted now, and to their jobs (manifest.code)."""
    if code is not None and records:
        manifest.code = code.tags
    with one_writer(manifest.tracking_uri):
        _ensure_runs(manifest, records, varied)
        if code is not None and records:
            from ..track import sweep_runs

            sweep_runs.set_tags(manifest.tracking_uri, manifest.mlflow_parent_run_id, code.tags)
            for name, diff in code.diffs.items():
                sweep_runs.log_text(manifest.tracking_uri, manifest.mlflow_parent_run_id, diff, name)


def _ensure_runs(manifest: Manifest, records: list[TrialRecord], varied: list[str]) -> None:
    from ..track import sweep_runs

    uri, exp = manifest.tracking_uri, manifest.experiment
    if manifest.mlflow_parent_run_id is None:
        manifest.mlflow_parent_run_id = sweep_runs.create_parent(
            uri, exp, manifest.sweep, manifest.executor, {"varied": ", ".join(varied)},
            {"num_trials": str(len(manifest.trials)), "select.metric": manifest.select_metric,
             "select.mode": manifest.select_mode, "varied": ", ".join(varied) or "-"})
    elif records:
        for run_id in {manifest.mlflow_parent_run_id, *(manifest.configurations[r.configuration] for r in records
                                                       if r.configuration in manifest.configurations)}:
            sweep_runs.reopen(uri, run_id)  # running again until the trials submitted now end
    seeds = manifest.seeds()
    for r in records:
        # A search trial's run is made when a job asks its values; in a sqlite store, which no job
        # opens, and with repeats (its configuration's run is its parent), it is made here, and the
        # job records the values asked (submit/search.py).
        if r.mlflow_run_id is not None or (r.slot is not None and r.configuration is None and not is_local_store(uri)):
            continue
        shared = {"sweep": manifest.sweep, "executor": r.executor, "varied": ", ".join(varied), **manifest.code}
        tags, parent = {**shared, "trial_id": r.id, "label": r.label}, manifest.mlflow_parent_run_id
        if r.configuration is not None:  # a seed's run sits under its configuration's run
            if r.configuration not in manifest.configurations:
                first = manifest.trials[r.configuration]
                manifest.configurations[r.configuration] = sweep_runs.create_configuration(
                    uri, exp, parent, r.configuration, first.label.rsplit(" seed ", 1)[0], seeds[r.configuration],
                    shared, sweep_runs.trial_params(first.config) if first.slot is None else {})
            tags = {**tags, sweep_runs.CONFIGURATION: r.configuration, sweep_runs.SWEEP_RUN: parent}
            parent = manifest.configurations[r.configuration]
        r.mlflow_run_id = sweep_runs.create_child(uri, exp, parent, f"{r.id} {r.label}", tags,
                                                  sweep_runs.trial_params(r.config) if r.slot is None else {})


def import_records(manifest: Manifest, layout: SweepLayout, wait: bool = False, again: bool = False):
    """Copy what the trials recorded in their directories into a sqlite store (the one writer:
    track/store_import.py); with `wait` False, nothing when another process is at it; `again`:
    all of it, not only what is new. Returns what was imported (None: nothing was tried, or it
    failed, said in one line)."""
    if not is_local_store(manifest.tracking_uri):
        return None
    from ..track.store_import import Entry, import_outboxes

    entries = [Entry(r.id, Path(r.output_dir), r.mlflow_run_id) for r in manifest.trials.values()]
    try:
        imported = import_outboxes(manifest.tracking_uri, layout.imported, entries, wait, again)
        if imported.events and manifest.configurations and layout.search.exists():  # a seed of a search started
            with one_writer(manifest.tracking_uri):
                label_configurations(manifest, layout)
        return imported
    except LockHeld:
        return None
    except Exception as err:  # noqa: BLE001 - the trials keep their records; the next import goes on
        print(f"qarac_dist: could not import the trials' records into MLflow: {type(err).__name__}: "
              f"{redact_text(str(err))[:300]}", file=sys.stderr)
        return None


def label_configurations(manifest: Manifest, layout: SweepLayout) -> None:
    """A search with repeats in a sqlite store: each configuration's run, made here before its
    values were asked, is given them once asked (in a tracking server the job that asks does:
    submit/search.py). The caller holds the store's writer lock."""
    from ..plan.resolve import Resolver
    from ..track import search_record, sweep_runs
    from ..track.mlflow_client import client
    from .search import label

    c = client(manifest.tracking_uri)
    parent = c.get_run(manifest.mlflow_parent_run_id)
    unlabelled = {r.data.tags.get(sweep_runs.CONFIGURATION): r.info.run_id
                  for r in sweep_runs.trial_runs(c, parent)[1] if sweep_runs.SEARCH_SLOT not in r.data.tags}
    for a in search_record.read(layout).asks:
        seed = manifest.trials.get(a.trial)  # the seed that asked
        if seed is not None and seed.configuration in unlabelled:
            resolved, _ = Resolver(seed.config, set(a.params)).resolve(a.params)
            sweep_runs.label_configuration(manifest.tracking_uri, unlabelled[seed.configuration], seed.configuration,
                                           label(a.slot, a.params), a.slot, sweep_runs.trial_params(resolved))


def log_preflight(manifest: Manifest, text: str) -> None:
    from ..track.sweep_runs import log_text

    try:
        with one_writer(manifest.tracking_uri):
            log_text(manifest.tracking_uri, manifest.mlflow_parent_run_id, text, "preflight.txt")
    except Exception as err:  # noqa: BLE001 - the report was printed; MLflow may lag
        print(f"qarac_dist: could not log the preflight report to MLflow: {type(err).__name__}", file=sys.stderr)


def close_parent(manifest: Manifest, layout: SweepLayout) -> None:
    """When every trial's latest attempt has ended: name the best trial on the parent run, log
    what the sweep used (GPU-hours, CPU-hours, and the plots) and end it, FINISHED when all of
    them completed (or were pruned); then register the champion (tracking.register_model) and
    plot which parameters mattered."""
    if manifest.mlflow_parent_run_id is None or not manifest.all_ended():
        return
    import_records(manifest, layout, wait=True)  # the trials' ends, before the verdict
    from ..track import sweep_runs
    from .report import usage_of

    from ..track.usage import settle

    settle(sorted(layout.usage.glob("*.json")))  # packed jobs' runners end a moment after their last trial
    used = {**usage_of(manifest, layout).metrics(), **{f"requested_{k}": v for k, v in manifest.requested.items()}}
    try:
        with one_writer(manifest.tracking_uri):
            _end_open_runs(manifest)
            sweep_runs.close_parent(manifest.tracking_uri, manifest.mlflow_parent_run_id, manifest.select_metric,
                                    manifest.select_mode,
                                    all(r.state in DONE for r in manifest.trials.values() if not r.retired), layout,
                                    used, {r.id: name for r in manifest.trials.values()
                                           if (name := (r.config.get("tracking") or {}).get("register_model"))},
                                    manifest.alias)
    except Exception as err:  # noqa: BLE001 - the sweep's own outcome stands; say why MLflow lags
        print(f"qarac_dist: could not update the sweep's MLflow run: {type(err).__name__}: {redact_text(str(err))}",
              file=sys.stderr)


def log_final(manifest: Manifest, result: Optional[dict]) -> None:
    """The test metrics on the parent run (submit/final.py): `test_<metric>` the mean over the
    chosen configuration's seeds, `test_<metric>_std` beside it (two seeds or more), `test_seeds`,
    and tags naming the split, the configuration, the choice (`final_choice`) and what was tested
    (`final_models`): once a choice."""
    if manifest.mlflow_parent_run_id is None or result is None:
        return
    import time

    from mlflow.entities import Metric, RunTag

    from ..track.mlflow_client import client

    now = int(time.time() * 1000)
    metrics = [Metric(f"test_{k}", v, now, 0) for k, v in result["mean"].items()]
    metrics += [Metric(f"test_{k}_std", v, now, 0) for k, v in result["std"].items() if v is not None]
    metrics.append(Metric("test_seeds", len(result["seeds"]), now, 0))
    tags = [RunTag("final_split", result["choice"]["split"]),
            RunTag("final_configuration", result["choice"]["configuration"]), RunTag("final_choice", result["digest"]),
            RunTag("final_models", "trained again on train + validation" if result["choice"].get("retrain")
                   else "the seeds' best models")]
    try:
        with one_writer(manifest.tracking_uri):
            c = client(manifest.tracking_uri)
            if c.get_run(manifest.mlflow_parent_run_id).data.tags.get("final_choice") != result["digest"]:
                c.log_batch(manifest.mlflow_parent_run_id, metrics=metrics, tags=tags)
    except Exception as err:  # noqa: BLE001 - final.json holds them; say why MLflow lags
        print(f"qarac_dist: could not log the test metrics to MLflow: {type(err).__name__}: {redact_text(str(err))}",
              file=sys.stderr)


def _end_open_runs(manifest: Manifest) -> None:
    """A trial whose job ended without a word (LOST, killed, preempted and not requeued) left its
    run RUNNING for a requeue that, the sweep having ended, will not come: FAILED (KILLED where
    it was stopped and saved). A re-run's start opens it again."""
    from ..track.mlflow_client import client

    c = client(manifest.tracking_uri)
    for r in manifest.trials.values():
        if r.state not in DONE and r.mlflow_run_id is not None and c.get_run(r.mlflow_run_id).info.status == "RUNNING":
            c.set_terminated(r.mlflow_run_id, status="KILLED" if r.state == "PREEMPTED" else "FAILED")


def mark_retired(manifest: Manifest, changed: list[TrialRecord], layout: SweepLayout) -> None:
    """Tag the runs of trials that left the sweep file (or came back), and choose the parent's
    best again: a trial no longer in the file is never the sweep's best."""
    runs = [r for r in changed if r.mlflow_run_id is not None]
    if manifest.mlflow_parent_run_id is None or not runs:
        return
    from ..track import sweep_runs
    from ..track.mlflow_client import client

    try:
        with one_writer(manifest.tracking_uri):
            c = client(manifest.tracking_uri)
            for r in runs:
                c.set_tag(r.mlflow_run_id, sweep_runs.RETIRED, str(r.retired).lower())
            for configuration in {r.configuration for r in runs if r.configuration in manifest.configurations}:
                retired = all(t.retired for t in manifest.trials.values() if t.configuration == configuration)
                c.set_tag(manifest.configurations[configuration], sweep_runs.RETIRED, str(retired).lower())
            sweep_runs.update_parent(c, manifest.mlflow_parent_run_id, manifest.select_metric, manifest.select_mode,
                                     layout)
    except Exception as err:  # noqa: BLE001 - the manifest says it; say why MLflow lags
        print(f"qarac_dist: could not mark the runs of trials no longer in the sweep file: {type(err).__name__}: "
              f"{redact_text(str(err))}", file=sys.stderr)


def end_runs(manifest: Manifest, records: list[TrialRecord], status: str) -> None:
    """End the trials' runs as the driver saw them end (KILLED: the user cancelled them; a job
    stopped by a signal leaves its run open, for the requeued job)."""
    from ..track.mlflow_client import client

    try:
        with one_writer(manifest.tracking_uri):
            c = client(manifest.tracking_uri)
            for r in records:
                if r.mlflow_run_id is not None:
                    c.set_terminated(r.mlflow_run_id, status=status)
    except Exception as err:  # noqa: BLE001 - the trials' state stands; say why MLflow lags
        print(f"qarac_dist: could not end the trials' MLflow runs: {type(err).__name__}: {redact_text(str(err))}",
              file=sys.stderr)


def ui_command(uri: str, layout: SweepLayout) -> str:
    if is_local_store(uri):
        return f"python -m qarac_dist.ui {shlex.quote(str(layout.root))}  (imports the trials' records while open)"
    return f"open {redact_text(uri)} (the experiment's Runs)"
