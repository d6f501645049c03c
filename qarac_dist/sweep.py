"""`python -m qarac_dist.sweep SWEEP.yaml [dotted.key=value ...]`: plan a sweep, submit its
trials (SLURM job arrays, or local processes when there is no SLURM), and follow them.

    --dry-run   print the plan: trials, resources, sbatch text, GPU-hours (imports no torch)
    --wait      follow the trials until they end (the default with the local executor)
    --cancel    cancel the sweep's jobs

Running the same command again submits nothing for trials that are pending, running or
completed; it submits failed, cancelled, timed-out and lost trials again, which resume from
their newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import slurm
from .manifest import DONE, FAILED, RESUBMIT, Manifest, TrialRecord, read_json, write_json
from .plan import SweepSpec, Trial, load_sweep, plan, select_defaults
from .schema import ConfigError, UserError, to_dict


def resolve_executor(spec: SweepSpec, source: str) -> str:
    if spec.executor == "auto":
        return "slurm" if slurm.available() else "local"
    if spec.executor == "slurm" and not slurm.available():
        raise ConfigError([f"{source}: executor: slurm, but sbatch is not on PATH"])
    if spec.executor == "local" and spec.resources.nodes > 1:
        raise ConfigError([f"{source}: resources.nodes: the local executor runs one node, got {spec.resources.nodes}"])
    return spec.executor


def sweep_dir(spec: SweepSpec) -> Path:
    return Path(spec.runs_dir) / spec.name


def gpu_hours(spec: SweepSpec, num_trials: int) -> float:
    r = spec.resources
    return num_trials * r.nodes * r.gpus_per_node * r.time_min / 60


def print_plan(spec: SweepSpec, trials: list[Trial], executor: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"sweep {spec.name}: {len(trials)} trials, executor {executor}")
    table.add_column("trial")
    table.add_column("overrides")
    shown = 50
    for trial in trials[:shown]:
        table.add_row(trial.id, trial.label)
    console.print(table)
    if len(trials) > shown:
        console.print(f"... and {len(trials) - shown} more trials")
    if spec.set:
        console.print("every trial also sets: " + " ".join(f"{k}={v}" for k, v in spec.set.items()), markup=False)
    r = spec.resources
    console.print(f"resources per trial: {r.nodes} node(s) x {r.tasks_per_node} task(s), {r.gpus_per_node} GPU(s)/node, "
                  f"{r.cpus_per_task} CPU(s)/task, mem {r.mem_gb or 'default'} GB, {r.time_min} min; "
                  f"at most {r.max_parallel} at once")
    console.print(f"requested GPU-hours: {gpu_hours(spec, len(trials)):.1f}")
    if executor == "slurm" or spec.executor != "local":
        folder = sweep_dir(spec).resolve() / "submitit" / "%j"
        size = slurm.max_array_size() if slurm.available() else 1001
        for start in range(0, len(trials), size):
            count = min(size, len(trials) - start)
            console.print(f"\n# sbatch script of the array with trials {start}..{start + count - 1}", markup=False)
            console.print(slurm.sbatch_text(r, f"qarac-{spec.name}", folder, sys.executable, count), markup=False,
                          highlight=False)


def records_for(spec: SweepSpec, trials: list[Trial], executor: str, manifest: Manifest | None) -> dict[str, TrialRecord]:
    records = dict(manifest.trials) if manifest else {}
    for trial in trials:
        if trial.id not in records:
            records[trial.id] = TrialRecord(trial.id, trial.label, trial.overrides, trial.config,
                                            trial.config["output"]["dir"], executor)
    return records


def refresh(manifest: Manifest, local_jobs: dict | None = None) -> None:
    """Update every record's state from the scheduler and the trials' files."""
    from .manifest import resolve_state
    from .submit import pid_alive

    records = list(manifest.trials.values())
    sched = slurm.job_states([r.job_id for r in records if r.job_id and r.executor == "slurm"])
    for r in records:
        if r.executor == "slurm":
            r.state = resolve_state(r, sched.get(r.job_id))
        else:
            job = (local_jobs or {}).get(r.id)
            alive = (not job.done()) if job is not None else (pid_alive(r.job_id) if r.job_id else False)
            r.state = resolve_state(r, None, alive)
        if r.state in FAILED:
            from .manifest import read_json

            r.error = (read_json(Path(r.output_dir) / "state.json") or {}).get("error") or r.error


def summary_rows(manifest: Manifest) -> tuple[list[list[str]], str | None]:
    """Table rows (trial, label, state, restarts, last step, best metric) and the best trial id."""
    from .manifest import trial_files

    rows, best_id, best_value = [], None, None
    # Ties go to the smallest trial id, as on the MLflow parent run.
    for r in sorted(manifest.trials.values(), key=lambda r: r.id):
        files = trial_files(r)
        value = (files["best"] or {}).get("metrics", {}).get(manifest.select_metric)
        if value is not None and r.state in DONE and (
                best_value is None or (value > best_value if manifest.select_mode == "max" else value < best_value)):
            best_id, best_value = r.id, value
        restarts = max(0, int(files["state"].get("starts", 1)) - 1)
        rows.append([r.id, r.label, r.state, str(restarts), str(files["last_step"] or "-"),
                     f"{value:.4f}" if value is not None else "-", r.error or ""])
    return rows, best_id


def print_summary(manifest: Manifest) -> str | None:
    from rich.console import Console
    from rich.table import Table

    rows, best_id = summary_rows(manifest)
    table = Table(title=f"sweep {manifest.sweep} ({manifest.executor}); * marks the best trial")
    for col in ("", "trial", "config", "state", "restarts", "last step", f"best {manifest.select_metric}", "error"):
        table.add_column(col)
    for row in rows:
        best = row[0] == best_id
        table.add_row("*" if best else "", *row, style="bold green" if best else None)
    console = Console(width=200)
    console.print(table)
    if best_id:
        best = manifest.trials[best_id]
        console.print(f"best trial: {best_id} [{best.label}] {manifest.select_metric}="
                      f"{rows[[r[0] for r in rows].index(best_id)][5]}  model: {Path(best.output_dir) / 'best'}",
                      markup=False)
    return best_id


def wait(manifest: Manifest, directory: Path, executor, pending: list[TrialRecord], max_parallel: int,
         poll_s: float = 2.0) -> None:
    """Follow the trials until none is pending or running; with the local executor, start
    queued trials as slots free up (at most `max_parallel` at once)."""
    from rich.console import Console
    from rich.live import Live

    console = Console(width=200)
    local_jobs = getattr(executor, "jobs", None)
    queue = list(pending)
    last_states: dict[str, str] = {}
    with Live(console=console, auto_refresh=False, transient=True) as live:
        while True:
            refresh(manifest, local_jobs)
            if queue:
                running = sum(r.state in ("PENDING", "RUNNING") for r in manifest.trials.values())
                start = queue[: max(0, max_parallel - running)]
                queue = queue[len(start):]
                if start:
                    submit_records(manifest, directory, executor, start)
                    continue
            manifest.save(directory)
            states = {r.id: r.state for r in manifest.trials.values()}
            if console.is_terminal:
                live.update(_progress_table(manifest), refresh=True)
            else:
                for tid, state in states.items():
                    if last_states.get(tid) != state:
                        console.print(f"trial {tid} [{manifest.trials[tid].label}]: {state}", markup=False)
            last_states = states
            if not queue and all(s not in ("PENDING", "RUNNING", "QUEUED") and s not in slurm.ACTIVE
                                 for s in states.values()):
                return
            time.sleep(poll_s)


def _progress_table(manifest: Manifest):
    from rich.table import Table

    rows, _ = summary_rows(manifest)
    table = Table(title=f"sweep {manifest.sweep}: {sum(r[2] == 'COMPLETED' for r in rows)}/{len(rows)} completed")
    for col in ("trial", "config", "state", "restarts", "step", f"best {manifest.select_metric}"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row[:6])
    return table


def ensure_runs(manifest: Manifest, records: list[TrialRecord]) -> None:
    """Create the sweep's parent run and each trial's child run, once: their ids are kept in
    the manifest, so requeued and re-run jobs log to the same runs."""
    from . import tracking
    from .schema import flatten

    c = tracking.client(manifest.tracking_uri)
    exp = tracking.experiment_id(c, manifest.experiment)
    if manifest.mlflow_parent_run_id is None:
        manifest.mlflow_parent_run_id = tracking.create_run(
            c, exp, manifest.sweep, {"sweep": manifest.sweep, "executor": manifest.executor, "qarac.kind": "sweep"},
            {"num_trials": str(len(manifest.trials)), "select.metric": manifest.select_metric,
             "select.mode": manifest.select_mode})
    for r in records:
        if r.mlflow_run_id is None:
            r.mlflow_run_id = tracking.create_run(
                c, exp, f"{r.id} {r.label}", {"sweep": manifest.sweep, "trial_id": r.id, "executor": r.executor},
                tracking.safe_params(flatten(r.config)), parent_run_id=manifest.mlflow_parent_run_id)


def run_preflight(spec: SweepSpec, records: list[TrialRecord], source: str) -> tuple[str, bool]:
    """Audit each distinct architecture among the trials to submit; print and return the report."""
    import io

    from . import preflight
    from .config import config_from_dict

    configs = [config_from_dict(r.config, source) for r in records]
    results = preflight.run_many(configs, spec.resources.nodes * spec.resources.tasks_per_node, spec.resources)
    out = io.StringIO()
    for result in results:
        preflight.print_result(result, out)
    print(out.getvalue(), end="")
    return out.getvalue(), all(r.ok for r in results)


def log_preflight(manifest: Manifest, text: str) -> None:
    from . import tracking

    try:
        tracking.client(manifest.tracking_uri).log_text(manifest.mlflow_parent_run_id, text, "preflight.txt")
    except Exception as err:
        print(f"qarac_dist: could not log the preflight report to MLflow: {type(err).__name__}", file=sys.stderr)


def close_parent(manifest: Manifest) -> None:
    """When every trial has ended: name the best trial on the parent run and end it."""
    if manifest.mlflow_parent_run_id is None or any(
            r.state in ("PENDING", "RUNNING", "QUEUED") or r.state in slurm.ACTIVE for r in manifest.trials.values()):
        return
    from . import tracking

    try:
        c = tracking.client(manifest.tracking_uri)
        tracking.update_parent(c, manifest.mlflow_parent_run_id, manifest.select_metric, manifest.select_mode)
        ok = all(r.state in DONE for r in manifest.trials.values())
        c.set_terminated(manifest.mlflow_parent_run_id, status="FINISHED" if ok else "FAILED")
    except Exception as err:
        print(f"qarac_dist: could not update the sweep's MLflow run: {type(err).__name__}: {err}", file=sys.stderr)


def job_config(manifest: Manifest, record: TrialRecord) -> dict:
    """The training config a trial's job runs: the planned config plus where to track it."""
    return {**record.config, "tracking": {
        "uri": manifest.tracking_uri, "experiment": manifest.experiment, "run_id": record.mlflow_run_id,
        "parent_run_id": manifest.mlflow_parent_run_id, "select_metric": manifest.select_metric,
        "select_mode": manifest.select_mode,
        "tags": {"sweep": manifest.sweep, "trial_id": record.id, "executor": record.executor}}}


def submit_records(manifest: Manifest, directory: Path, executor, records: list[TrialRecord]) -> None:
    ensure_runs(manifest, records)
    for r in records:
        r.state, r.error = "PENDING", None
    manifest.save(directory)
    job_ids = executor.submit({r.id: job_config(manifest, r) for r in records})
    for r in records:
        r.job_id = job_ids[r.id]
        r.job_ids.append(r.job_id)
        r.submissions += 1
    manifest.save(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.sweep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override sweep-file values")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    parser.add_argument("--wait", action="store_true", help="follow the trials until they end")
    parser.add_argument("--cancel", action="store_true", help="cancel the sweep's jobs")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the gradient-flow and consistency checks before submitting")
    args = parser.parse_intermixed_args(argv)
    source = args.sweep
    try:
        spec, base = load_sweep(source, args.overrides)
        trials = plan(spec, base, source, read_json(sweep_dir(spec) / "micro_batch.json"))
        executor_kind = resolve_executor(spec, source)
    except UserError as err:
        print(err, file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(spec, trials, executor_kind)
        return 0
    directory = sweep_dir(spec)
    manifest = Manifest.load(directory)
    if args.cancel:
        return cancel(manifest, directory)
    metric, mode = select_defaults(spec, trials)
    if manifest is None:
        from .tracking import absolute_uri

        manifest = Manifest(spec.name, executor_kind, metric, mode, tracking_uri=absolute_uri(spec.tracking.uri),
                            experiment=spec.tracking.experiment or spec.name)
    elif manifest.executor != executor_kind:
        print(f"{source}: executor: {directory} was submitted with {manifest.executor}, now {executor_kind}; "
              f"use another sweep name", file=sys.stderr)
        return 2
    manifest.trials = records_for(spec, trials, executor_kind, manifest)
    refresh(manifest)
    todo = [r for r in manifest.trials.values() if r.id in {t.id for t in trials} and r.state in RESUBMIT]

    if executor_kind == "slurm" and todo:
        refusal = slurm.test_submission(slurm.sbatch_text(spec.resources, f"qarac-{spec.name}",
                                                          directory.resolve() / "submitit" / "%j",
                                                          sys.executable, len(todo)))
        if refusal:
            print(f"{source}: resources: sbatch refused the job: {refusal}", file=sys.stderr)
            return 2
    preflight_text = None
    if todo and not args.no_preflight:
        try:
            preflight_text, passed = run_preflight(spec, todo, source)
        except UserError as err:
            print(f"{source}: preflight: {err}", file=sys.stderr)
            return 2
        if not passed:
            print(f"{source}: preflight failed; nothing submitted (see above; --no-preflight skips it)",
                  file=sys.stderr)
            return 1
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "sweep.json", {"spec": to_dict(spec), "base": base, "source": str(source),
                                              "trials": [t.id for t in trials]})
        manifest.save(directory)
        from .submit import LocalProcesses, SlurmArrays

        folder = directory.resolve() / "submitit"
        if executor_kind == "slurm":
            executor = SlurmArrays(folder, spec.resources, f"qarac-{spec.name}", spec.max_requeues)
            if todo:
                submit_records(manifest, directory, executor, todo)
        else:
            executor = LocalProcesses(folder, spec.resources)
            if todo:  # runs now, so the parent exists for the preflight report
                ensure_runs(manifest, todo)
                manifest.save(directory)
        if preflight_text is not None:
            log_preflight(manifest, preflight_text)
    except Exception:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    print(f"sweep {spec.name}: {len(trials)} trials, {len(todo)} to run, "
          f"{len(trials) - len(todo)} already pending, running or completed; directory {directory}")
    if executor_kind == "local" or args.wait:
        wait(manifest, directory, executor, todo if executor_kind == "local" else [], spec.resources.max_parallel)
        close_parent(manifest)
        best = print_summary(manifest)
        failed = [r for r in manifest.trials.values() if r.state not in DONE]
        return 1 if failed or best is None else 0
    return 0


def cancel(manifest: Manifest | None, directory: Path) -> int:
    if manifest is None:
        print(f"{directory}: no sweep here", file=sys.stderr)
        return 2
    refresh(manifest)
    active = [r for r in manifest.trials.values() if r.state in ("PENDING", "RUNNING") or r.state in slurm.ACTIVE]
    if manifest.executor == "slurm":
        slurm.cancel([r.job_id for r in active])
    else:
        import os
        import signal

        for r in active:
            try:
                os.kill(int(r.job_id), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    for r in active:
        r.state = "CANCELLED"
    manifest.save(directory)
    print(f"cancelled {len(active)} trial(s) of {manifest.sweep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
