"""One run of the sweep command past planning, in the order its steps happen: take the sweep's
lock, read the manifest, decide what to run, check it (sbatch --test-only, preflight), write
the sweep's files, make the MLflow runs, submit, report, follow until the trials end, close the
parent run. Also the other way in: `attach` (the status command; cancel.py).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..base.files import DiskFull, first_missing
from ..base.layout import SweepLayout
from ..config import UserError
from ..config.choice import Final
from ..config.schema import to_dict
from ..config.sweep import Resources, Search, SweepSpec
from ..plan import Trial, select_defaults, varied_keys
from ..track.code_record import of_sweep
from ..track.job_context import JobContext
from . import claims, cluster, environment, final, lock_check, pack, retrain, sbatch, stopping, tracking
from .states import refresh
from .executors import Executor, TrialJob, make_executor
from .report import print_summary
from .search import check_record, tell_ended, warm_start
from .sweep_dir import DONE, FAILED, RESUBMIT, Attempt, Manifest, SweepLock, TrialRecord, layout_for, same_record, \
    write_sweep_file

Preflight = Callable[[list[TrialRecord]], tuple[str, bool]]
"""Audits the trials about to be submitted: (the printed report, passed?)."""


class Submission:
    def __init__(self, spec: SweepSpec, base: dict, trials: list[Trial], kind: str, source: str,
                 command: list[str], wait: bool = False, preflight: Optional[Preflight] = None):
        self.spec, self.base, self.trials, self.source = spec, base, trials, source
        self.command, self.wait, self.preflight = command, wait, preflight
        self.layout = layout_for(spec)
        self.bad_nodes = claims.bad_nodes(self.layout) if kind == "slurm" else {}
        self.resources = sbatch.excluding(spec.resources, self.bad_nodes)
        """What each job asks for: the sweep file's resources, keeping away from nodes where this
        sweep's steps could not start."""
        self.executor = make_executor(kind, self.layout.submitit, self.resources, sbatch.job_name(spec.name),
                                      spec.max_requeues, steps=spec.trials_as_steps(), env=spec.environment,
                                      run=environment.launch(spec.environment, environment.trial_paths(
                                          self.layout.root, trials, spec.tracking.uri), source=source))
        self.lock = SweepLock(self.layout.root)
        self.submitted = False
        self.preflight_text = None
        self.retiring: list[TrialRecord] = []
        self.final_job: Optional[str] = None
        """The line that says which job evaluates the test split (SLURM and final), if one was submitted."""
        """Trials that left the sweep file (or came back) since the manifest was saved."""

    @property
    def local(self) -> bool:
        """Jobs run here (else the scheduler queues them)."""
        return self.executor.kind == "local"

    @property
    def started_here(self) -> bool:
        """This process starts the trials as slots free up (local, one trial per job); else they are
        submitted at once, and the scheduler, or a packed job's runner, starts them."""
        return self.local and not self.executor.steps

    def run(self) -> int:
        created = first_missing(self.layout.root)
        self.lock.acquire()
        try:
            manifest = self.manifest()
            todo = self.to_run(manifest)
            code = self.check(todo)
            if code:
                self.discard(created)
                return code
            self.submit(manifest, todo)
        except BaseException:
            self.discard(created)
            raise
        try:
            self.report(manifest, todo)
            if not (self.local or self.wait):
                return 0
            if self.local and (self.spec.final is None or not self.spec.final.retrain):
                retrain.stop_leftover(self.executor, manifest, self.layout)
            try:
                with stopping.signals():
                    follow(manifest, self.layout, self.executor, todo if self.started_here else [],
                           self.spec.resources.max_parallel)
                    if self.spec.final is not None and not self.local:
                        final.wait_for_job(self.executor, manifest, self.layout)
            except stopping.Stopped:
                return self.stop(manifest)
            except DiskFull as full:  # the manifest could not be saved: say why, show where it stands
                print(f"qarac_dist: {full}", file=sys.stderr)
                if self.local:
                    self.halt(manifest, [r for r in manifest.trials.values() if r.active], save=False)
                for r in manifest.trials.values():  # shown, not saved: a re-run finds them lost
                    if r.state == "LOST":
                        r.state, r.error = "FAILED", f"DiskFull: {full}"
                print_summary(manifest, self.layout)
                return 1
            tracking.close_parent(manifest, self.layout)
            try:
                with stopping.signals():
                    tested = self.tested(manifest)
            except stopping.Stopped:  # the retraining saved (retrain.py); nothing of the test split was kept
                print(f"\nstopped before the test split was read.\nresume:    "
                      f"{' '.join(shlex.quote(a) for a in self.command)}", file=sys.stderr)
                return 130
            tracking.log_final(manifest, tested)
            best = print_summary(manifest, self.layout)
            unfinished = [r for r in manifest.trials.values() if r.state not in DONE and not r.retired]
            return 1 if unfinished or best is None or self.spec.final and tested is None else 0
        finally:
            self.lock.release()

    def tested(self, manifest: Manifest) -> Optional[dict]:
        """The test metrics of the sweep's choice (the sweep file's final): evaluated here, or
        kept by the SLURM final job; None without final or a result."""
        if self.spec.final is None:
            return None
        configs = {t.id: t.config for t in self.trials}
        if self.local:
            return final.evaluate(self.spec.final, manifest, self.layout, configs, self.executor)
        return final.recorded(self.spec.final, manifest, self.layout, configs)

    def stop(self, manifest: Manifest) -> int:
        """Ctrl-C (or SIGTERM, SIGHUP) while following. SLURM's jobs go on without us; local
        trials are asked to save as on SLURM's warning signal, and waited for (a second Ctrl-C,
        or stopping.SAVE_WAIT_S, stops them at once). Exit code 130, as for any interrupted command."""
        again = " ".join(shlex.quote(a) for a in self.command)
        if not self.local:
            print(f"\nstopped following; the SLURM jobs go on.\nfollow:    {again} --wait\n"
                  f"status:    python -m qarac_dist.status {shlex.quote(str(self.layout.root))}\n"
                  f"cancel:    {again} --cancel", file=sys.stderr)
            return 130
        active = [r for r in manifest.trials.values() if r.active]
        print(f"\nstopping: {len(active)} running trial(s) save at the end of their step "
              f"(Ctrl-C again stops them at once)", file=sys.stderr, flush=True)
        self.halt(manifest, active)
        for r in active:
            status = r.trial_dir.status_of(r.attempt)
            if r.state == "PREEMPTED" and status is not None:
                print(f"trial {r.id} [{r.label}]: saved at step {status.step}", file=sys.stderr)
            else:
                last = status.last_checkpoint if status is not None else None
                print(f"trial {r.id} [{r.label}]: stopped without saving; it resumes from "
                      f"{f'step {last}' if last else 'the start'}", file=sys.stderr)
        tracking.import_records(manifest, self.layout, wait=True)  # what they logged, up to where they stopped
        print(f"resume:    {again}", file=sys.stderr)
        return 130

    def halt(self, manifest: Manifest, active: list[TrialRecord], save: bool = True) -> None:
        """Ask the local trials to save and stop (stopping.halt), and record where each ended."""
        stopping.halt(self.executor, sorted({job for r in active for job in r.jobs}))
        refresh(manifest, self.executor.states, self.layout)
        if save:
            try:
                manifest.save(self.layout.root)
            except DiskFull as full:  # the trials' own files say where they are; a re-run reads them
                print(f"qarac_dist: {full}", file=sys.stderr)

    def discard(self, created: Path | None) -> None:
        """Nothing was submitted: release the sweep, and leave no directory behind that this
        run created."""
        self.lock.release()
        if created is None or self.submitted:
            return
        shutil.rmtree(self.layout.root, ignore_errors=True)
        for folder in self.layout.root.parents:  # the folders made for it, while empty (another
            if not folder.is_relative_to(created):  # sweep may be starting beside it)
                break
            try:
                folder.rmdir()
            except OSError:
                break

    def manifest(self) -> Manifest:
        manifest = Manifest.load(self.layout.root)
        kind = self.executor.kind
        if manifest is None:
            if self.layout.sweep_file.exists():
                raise UserError(f"{self.layout.root}: {self.layout.sweep_file.name} is here but "
                                f"{self.layout.manifest.name} is not; rebuild it with "
                                f"python -m qarac_dist.status --repair {shlex.quote(str(self.layout.root))}")
            from ..track.mlflow_client import absolute_uri

            metric, mode = select_defaults(self.spec, self.trials)
            return Manifest(self.spec.name, kind, metric, mode, tracking_uri=absolute_uri(self.spec.tracking.uri),
                            experiment=self.spec.tracking.experiment or self.spec.name)
        if manifest.executor != kind:
            raise UserError(f"{self.source}: executor: {self.layout.root} was submitted with {manifest.executor}, now "
                            f"{kind}; use another sweep name")
        same_record(manifest, self.layout, self.spec, select_defaults(self.spec, self.trials), self.source)
        if self.spec.search is not None:
            check_record(self.layout, self.spec.search)
        return manifest

    def to_run(self, manifest: Manifest) -> list[TrialRecord]:
        manifest.alias = self.spec.final.alias if self.spec.final is not None else Final.alias
        manifest.final_split = final.given(self.spec.final, {t.id: t.config for t in self.trials}) \
            if self.spec.final is not None and self.trials else None
        for trial in self.trials:
            if trial.id not in manifest.trials:
                manifest.trials[trial.id] = TrialRecord(trial.id, trial.label, trial.overrides, trial.config,
                                                        trial.config["output"]["dir"], self.executor.kind,
                                                        slot=trial.slot, configuration=trial.configuration)
        refresh(manifest, self.executor.states, self.layout)
        if self.spec.search is not None:
            tell_ended(self.layout, list(manifest.trials.values()), manifest.select_metric,
                       manifest.select_mode)
        planned = {t.id for t in self.trials}
        self.retiring = [r for r in manifest.trials.values() if r.retired != (r.id not in planned)]
        for r in self.retiring:
            r.retired = r.id not in planned
        return [r for r in manifest.trials.values() if r.id in planned and r.state in RESUBMIT]

    def check(self, todo: list[TrialRecord]) -> int:
        """sbatch --test-only, locks that hold across nodes, a warm start that fits, preflight: 0
        when the trials may be submitted."""
        if self.spec.search is not None and self.spec.search.warm_start:
            print(warm_start(self.spec.search, *select_defaults(self.spec, self.trials))[1])
        if self.executor.kind == "slurm" and todo:
            refusal = cluster.test_submission(self.executor.script(sbatch.num_jobs(self.spec.resources, len(todo),
                                                                                   self.executor.steps)))
            if refusal:
                excluded = f" (with {', '.join(self.bad_nodes)} excluded by {self.layout.bad_nodes}; delete it to " \
                           f"allow them again)" if self.bad_nodes else ""
                raise UserError(f"{self.source}: resources: sbatch refused the job: {refusal}{excluded}")
            job = sbatch.job_resources(self.resources)
            if self.executor.steps and (job.nodes > 1 or sbatch.num_jobs(self.resources, len(todo), True) > 1):
                lock_check.check(self.layout, self.resources)  # runners on several nodes share the sweep's locks
        if todo and self.preflight is not None:
            self.preflight_text, passed = self.preflight(todo)
            if not passed:
                print(f"{self.source}: preflight failed; nothing submitted (see above; --no-preflight skips it)",
                      file=sys.stderr)
                return 1
        return 0

    def submit(self, manifest: Manifest, todo: list[TrialRecord]) -> None:
        """Write the sweep's files, make the MLflow runs, and submit `todo` (the local executor
        starts its trials later, as slots free up)."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        write_sweep_file(self.layout.root, to_dict(self.spec), self.base, str(self.source), self.trials)
        manifest.save(self.layout.root)
        tracking.ensure_runs(manifest, todo, varied_keys(self.spec), of_sweep(self.source, self.spec.base, self.trials))
        manifest.save(self.layout.root)
        tracking.mark_retired(manifest, self.retiring, self.layout)
        if self.preflight_text is not None:
            tracking.log_preflight(manifest, self.preflight_text)
        if todo and not self.started_here:
            self.submitted = True
            submit_records(manifest, self.layout, self.executor, todo, self.spec.search)
        if self.spec.final is not None and not self.local:
            self.final_job = final.schedule(self.executor, manifest, self.layout, self.spec.final,
                                            {t.id: t.config for t in self.trials}, bool(todo), self.spec.repeats)

    def report(self, manifest: Manifest, todo: list[TrialRecord]) -> None:
        print(f"sweep {self.spec.name}: {len(self.trials)} trials, {len(todo)} to run, "
              f"{len(self.trials) - len(todo)} already pending, running or completed; directory {self.layout.root}")
        if retired := sum(r.retired and r.active for r in manifest.trials.values()):
            print(f"{retired} trial(s) no longer in the sweep file still run: they end as they would, shown apart and "
                  f"never chosen best")
        if self.executor.kind != "slurm" or not todo and not self.final_job:
            return
        for nodes, why in self.bad_nodes.items():
            print(f"excluded: {nodes} ({why}); delete {self.layout.bad_nodes} to allow them again")
        arrays: dict[str, int] = {}
        for job in sorted({job for r in todo for job in r.jobs}):
            arrays[job.split("_")[0]] = arrays.get(job.split("_")[0], 0) + 1
        what = f"job(s) of {self.spec.resources.pack} trial(s) at once" if self.executor.steps else "trial(s)"
        for job, count in arrays.items():
            print(f"submitted: SLURM job {job}, an array of {count} {what}" if count > 1 else
                  f"submitted: SLURM job {job}")
        if self.final_job:
            print(self.final_job)
        if not self.wait:
            again = " ".join(shlex.quote(a) for a in self.command)
            print(f"follow:    {again} --wait\n"
                  f"status:    python -m qarac_dist.status {shlex.quote(str(self.layout.root))}\n"
                  f"cancel:    {again} --cancel\n"
                  f"results:   {tracking.ui_command(manifest.tracking_uri, self.layout)}")


def attach(kind: str, layout: SweepLayout) -> Executor:
    """An executor to ask about and cancel a sweep's jobs (not to submit new ones)."""
    return make_executor(kind, layout.submitit, Resources(), sbatch.job_name(layout.root.name), 0)


def submit_records(manifest: Manifest, layout: SweepLayout, executor: Executor, records: list[TrialRecord],
                   search: Optional[Search] = None) -> None:
    """A new attempt for each record: the old one's outcome goes to its history. Packed: the new
    attempts are reserved in the claims first, so no runner of an older submission starts them."""
    resources = executor.resources
    if executor.steps:  # a trial another job took over meanwhile is left to it
        kept = set(claims.reserve(layout, {r.id: (r.attempt, r.attempt + 1) for r in records}, executor.live))
        records = [r for r in records if r.id in kept]
    for r in records:
        if r.attempt:
            r.history.append(Attempt(r.attempt, list(r.job_ids[-1:]), r.state, r.error))
        r.attempt += 1
        r.state, r.error, r.job_id, r.step, r.pack_jobs = "PENDING", None, None, None, []
    manifest.save(layout.root)
    if executor.steps:
        entries = [pack.Entry(r.id, r.attempt, r.config, job_context(manifest, layout, r, resources).to_dict(), r.slot)
                   for r in records]
        jobs = executor.submit(pack.packed_jobs(layout, executor.kind, resources, executor.max_requeues, entries,
                                                search, executor.launch))
        for r in records:
            r.pack_jobs = [job.job_id for job in jobs]
    else:
        jobs = executor.submit([TrialJob(r.config, job_context(manifest, layout, r, resources).to_dict(),
                                         resources.cpus_per_task, executor.max_requeues) for r in records])
        for r, job in zip(records, jobs):
            r.job_id = job.job_id
            r.job_ids.append(r.job_id)
    bound = sbatch.requested_hours(resources, len(records), executor.steps)  # what was submitted, at most
    manifest.requested = {k: manifest.requested.get(k, 0.0) + v for k, v in bound.items()}
    manifest.save(layout.root)


def job_context(manifest: Manifest, layout: SweepLayout, record: TrialRecord, resources: Resources) -> JobContext:
    """What the sweep hands a trial's job beside its config."""
    gpus, cpus = sbatch.held(resources)
    return JobContext(attempt=record.attempt, tracking_uri=manifest.tracking_uri, experiment=manifest.experiment,
                      run_id=record.mlflow_run_id, parent_run_id=manifest.mlflow_parent_run_id,
                      sweep_dir=str(layout.root.resolve()), select_metric=manifest.select_metric,
                      select_mode=manifest.select_mode, tags={"sweep": manifest.sweep, "trial_id": record.id,
                                                              "executor": record.executor, **manifest.code},
                      gpus=gpus, cpus=cpus, configuration=record.configuration, seeds=manifest.seeds_of(record),
                      configuration_run_id=manifest.configurations.get(record.configuration))


def follow(manifest: Manifest, layout: SweepLayout, executor: Executor, queued: list[TrialRecord], max_parallel: int,
           poll_s: float = 2.0) -> None:
    """Follow the trials until none is pending or running; with the local executor, start
    queued trials as slots free up (at most `max_parallel` at once)."""
    from rich.console import Console
    from rich.live import Live

    from .report import progress_table

    console = Console(width=200)
    queue = list(queued)
    last_states: dict[str, str] = {}
    refreshed = cluster.Patience(lambda: refresh(manifest, executor.states, layout) or True, unknown=lambda: False)
    with Live(console=console, auto_refresh=False, transient=True) as live:
        while True:
            if not refreshed():  # the scheduler did not answer: nothing is decided on it
                time.sleep(poll_s)
                continue
            tracking.import_records(manifest, layout)
            if queue:
                running = sum(r.active for r in manifest.trials.values())
                start = queue[: max(0, max_parallel - running)]
                queue = queue[len(start):]
                if start:
                    submit_records(manifest, layout, executor, start)
                    continue
            states = {r.id: r.state for r in manifest.trials.values()}
            if states != last_states:  # written on a change only: a full disk fails fewer writes
                manifest.save(layout.root)
            if console.is_terminal:
                live.update(progress_table(manifest), refresh=True)
            else:
                for tid, state in states.items():
                    if last_states.get(tid) != state:
                        print(f"trial {tid} [{manifest.trials[tid].label}]: {state}", flush=True)
            last_states = states
            if not queue and manifest.all_ended():
                return
            time.sleep(poll_s)
