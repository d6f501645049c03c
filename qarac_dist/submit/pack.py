"""A packed job (`resources.pack` K > 1): one allocation that runs K trials at once, each as its
own job step, and starts the next waiting trial whenever one ends.

Every job of the packed array runs `PackJob.__call__`, the runner, directly in the job's script
(not under srun, so its steps are free to take the allocation's resources):
- a trial is claimed in the sweep directory (submit/claims.py) and started as a step: on SLURM
  `srun --exact` with the trial's nodes, tasks, CPUs and GPUs (SLURM places the step and binds
  its GPUs, CUDA_VISIBLE_DEVICES per step); locally, the trial's ranks as plain processes;
- refill: when a step ends, the next trial is claimed if the time left before the warning that
  precedes the time limit is at least what a trial needs to save anything (claims.time_needed:
  the median time to a first checkpoint, or of a whole trial where none checkpoints); a trial
  started later would be cut off with nothing saved, its allocation time lost. The trials left
  wait for another job, or for a re-run of the sweep;
- SLURM's warning signal reaches the steps (sbatch --signal without B:); each trial saves and
  leaves the verdict PREEMPTED; the runner starts nothing more, waits for its steps, keeps
  their claims, and requeues its job, which then resumes its own trials first;
- SIGTERM (scancel, the driver stopping local trials): passed to the steps, which save; the job
  is not requeued;
- a job killed without warning leaves its claims open: once the scheduler no longer knows the
  job, the next runner to look, or a re-run of the sweep, resumes those trials.
The runner exits when its steps have ended and nothing is left to start.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit

from ..base.layout import SweepLayout
from ..base.ports import free_port
from ..config import ConfigError
from ..config.sweep import Resources, Search
from ..track import search_record
from ..track.trial_dir import TrialDir, TrialState
from ..track.usage import Clock
from . import claims, environment, sbatch, search
from .cluster import ACTIVE, Patience, all_may_run
from .executors import make_executor, stop_with_parent
from .step import TRIAL_ENV
from .sweep_dir import last_error, resolve_state

POLL_S = 1.0
NODE_TROUBLE = re.compile(r"Requested node configuration is not available|Node failure|not responding")
"""srun's words for a step that could not start because of its node, not of its request (a bad
gres or memory request fails the same way on every node, and excluding nodes would not help)."""
LIVE_REMEMBER_S = 30.0
"""How long a runner keeps the scheduler's answer to which other jobs still run: a dead job's
trials are taken over that much later at most, and a sweep's tail asks squeue twice a minute,
not every second, per job."""
MAX_FAILED_STARTS = 3
"""Steps in a row that end before their trial begins, after which a job takes no more trials:
one bad node would otherwise fail every waiting trial within seconds. Three, not one: a step can
fail to start for a passing reason (a node still cleaning up the previous step)."""


@dataclass
class Entry:
    """A trial a packed job may run: its id, attempt, config and context (as TrialJob takes them)."""

    id: str
    attempt: int
    config: dict
    context: dict
    slot: Optional[int] = None
    """A model-based search's slot: its values are asked for when it starts (submit/search.py)."""

    @property
    def trial_dir(self) -> TrialDir:
        return TrialDir(self.config["output"]["dir"])


@dataclass
class Step:
    entry: Entry
    slot: int
    """Which of the job's K shares (the local runner's GPUs)."""
    processes: list
    started: float
    checkpoint_before: Optional[int]
    starts_before: int
    """The trial's job starts before this step: a verdict counts only if the step started it."""
    saved_one: bool = False


@dataclass
class PackJob:
    """The runner of one packed job; the same object for every job of the array (submitit
    pickles it once per job)."""

    sweep_dir: str
    kind: str
    resources: Resources
    entries: list[Entry]
    max_requeues: int
    search: Optional[Search] = None
    launch: environment.Launch = environment.Launch()
    """How each step's Python starts (in the sweep's container, if any)."""

    def __call__(self) -> dict:
        if self.kind == "local":  # SLURM ends a job's steps with it; here the kernel must
            environment.fail_early()
            stop_with_parent()
        return _Runner(self).run()


class _Runner:
    def __init__(self, job: PackJob):
        self.job, self.layout, self.r = job, SweepLayout(Path(job.sweep_dir)), job.resources
        self.job_id = submitit.JobEnvironment().job_id  # `<array>_<task>` in an array; the local pid
        self.deadline = time.time() + self.r.time_min * 60 - sbatch.signal_delay_s(self.r.time_min)
        self.steps: dict[str, Step] = {}
        self.signum: Optional[int] = None
        self.preempted = False
        self.out_of_time = False
        # A job the scheduler cannot tell about is not taken for dead: its trials are not taken over.
        self.live = Patience(make_executor(job.kind, self.layout.submitit, Resources(),
                                           sbatch.job_name(self.layout.root.name), 0).live, unknown=all_may_run,
                             remember_s=LIVE_REMEMBER_S)
        self.ended: list[str] = []
        self.num_started = 0
        self.failed_starts = 0
        """Steps in a row that ended before their trial began (a bad node: srun's "Requested node
        configuration is not available"); at MAX_FAILED_STARTS the job takes no more trials."""

    def run(self) -> dict:
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGUSR2, signal.SIGTERM)}
        # The allocation's clock: its slots' idle time is what its steps' clocks do not cover (track/usage.py).
        clock = Clock(self.layout.job_usage(self.job_id), self.job_id, *sbatch.held(sbatch.job_resources(self.r)))
        clock.start()
        try:
            while True:
                self.reap()
                broken = self.failed_starts >= MAX_FAILED_STARTS
                if self.signum is None and not self.preempted and not self.out_of_time and not broken:
                    self.fill()
                if not self.steps and not self.live.waiting():  # a job it cannot see may be gone: ask again
                    break
                time.sleep(POLL_S)
        except Exception as err:
            self.stop_steps(err)
            raise
        finally:
            clock.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.preempted and self.signum != signal.SIGTERM and self.job.kind == "slurm":
            print(f"qarac_dist: job {self.job_id} preempted; its trials saved; requeued", flush=True)
            subprocess.run(["scontrol", "requeue", self.job_id], check=False, timeout=60)
        if self.failed_starts >= MAX_FAILED_STARTS:
            error = last_error(self.layout, self.job_id) or "see its log"
            nodes = os.environ.get("SLURM_JOB_NODELIST")
            if nodes and NODE_TROUBLE.search(error):  # the sweep's next submission keeps away from them
                claims.note_bad_nodes(self.layout, nodes, self.job_id, error)
            raise RuntimeError(f"job {self.job_id} took no more trials: {self.failed_starts} steps in a row could not "
                               f"start ({error}); they went back to the queue for another job or a re-run of the "
                               f"sweep" + (f", which excludes {nodes}" if nodes else ""))
        return {"job": self.job_id, "ended": self.ended, "preempted": self.preempted}

    def on_signal(self, signum, _frame) -> None:
        """Pass the signal on to every step (srun forwards it to the step's tasks)."""
        self.signum = signum
        for step in self.steps.values():
            for process in step.processes:
                if process.poll() is None:
                    process.send_signal(signum)

    def stop_steps(self, err: Exception) -> None:
        """The runner cannot go on (a damaged record, a full disk, an outage): its trials save
        as on SLURM's warning, their claims stay open, and the job exits with the reason. Once
        the scheduler no longer knows the job, the next runner or a re-run of the sweep resumes
        them from what they saved."""
        print(f"qarac_dist: job {self.job_id} stops: {type(err).__name__}: {err}; its running trials save and "
              f"are resumed by another job or a re-run of the sweep", file=sys.stderr, flush=True)
        self.on_signal(signal.SIGUSR2, None)
        for step in self.steps.values():
            for process in step.processes:
                process.wait()

    def fill(self) -> None:
        while len(self.steps) < self.r.pack and self.signum is None:
            needed = claims.time_needed(claims.read(self.layout))
            left = self.deadline - time.time()
            if needed is not None and left < needed:
                print(f"qarac_dist: job {self.job_id} starts no more trials: {left:.0f} s to the warning before its "
                      f"time limit, and a trial needs {needed:.0f} s to save anything", flush=True)
                self.out_of_time = True
                return
            taken = claims.take(self.layout, self.job_id, [(e.id, e.attempt) for e in self.job.entries],
                                set(self.steps), self.live)
            if taken is None:
                return
            entry = next(e for e in self.job.entries if (e.id, e.attempt) == taken)
            self.start(entry)

    def start(self, entry: Entry) -> None:
        slot = min(set(range(self.r.pack)) - {s.slot for s in self.steps.values()})
        self.num_started += 1
        config, context = entry.config, entry.context
        status, latest = entry.trial_dir.status_of(entry.attempt), entry.trial_dir.status()
        if entry.slot is not None:
            try:
                config, context = search.start(self.layout, self.job.search, entry.slot, entry.id, config, context)
            except ConfigError as err:
                error = search.refused(entry.trial_dir, entry.attempt, err)
                self.end(entry, "FAILED", TrialState.FAILED)
                print(f"qarac_dist: job {self.job_id}: trial {entry.id} failed: {error}", flush=True)
                return
            if self.signum is not None:  # the job is being stopped while it asked: its claim stays
                return
        payload = {"config": config, "context": context, "max_requeues": self.job.max_requeues,
                   "cpus_per_task": self.r.cpus_per_task}
        if self.job.kind == "slurm":
            processes = [subprocess.Popen(srun_command(self.r, self.job.launch),
                                          env={**os.environ, TRIAL_ENV: json.dumps(payload)})]
        else:
            payload["step"] = f"{self.job_id}.{self.num_started - 1}"
            processes = _local_ranks(self.r, slot, payload, self.job.launch)
        print(f"qarac_dist: job {self.job_id} starts trial {entry.id} (attempt {entry.attempt})", flush=True)
        self.steps[entry.id] = Step(entry, slot, processes, time.time(), latest.last_checkpoint if latest else None,
                                    status.starts if status else 0)

    def reap(self) -> None:
        for tid, step in list(self.steps.items()):
            codes = [p.poll() for p in step.processes]
            if not step.saved_one:
                self.note_checkpoint(step)
            if any(c is None for c in codes):
                if any(c for c in codes if c is not None):  # a rank failed: its peers would wait forever
                    for p in step.processes:
                        if p.poll() is None:
                            p.terminate()
                continue
            del self.steps[tid]
            status = step.entry.trial_dir.status_of(step.entry.attempt)
            # A step that died before its trial began leaves the previous step's verdict behind.
            verdict = status.state if status is not None and status.starts > step.starts_before else None
            if verdict == TrialState.PREEMPTED:
                self.preempted = True  # the claim stays this job's: it resumes the trial when requeued
                print(f"qarac_dist: job {self.job_id}: trial {tid} saved at step {status.step}", flush=True)
                continue
            ended = verdict in (TrialState.COMPLETED, TrialState.PRUNED, TrialState.FAILED, TrialState.CANCELLED)
            if not ended and self.signum is not None:  # stopped with the job, before it could save
                print(f"qarac_dist: job {self.job_id}: trial {tid} stopped with the job; it resumes from its newest "
                      f"checkpoint when the job is requeued, or in another job", flush=True)
                continue
            self.failed_starts = self.failed_starts + 1 if verdict is None and max(codes) != 0 else 0
            if self.failed_starts:  # its trial never began: nothing of it to count or tell
                claims.release(self.layout, self.job_id, tid, step.entry.attempt)
                print(f"qarac_dist: job {self.job_id}: the step of trial {tid} could not start (exit {max(codes)}); "
                      f"the trial goes back to the queue", flush=True)
                continue
            outcome = verdict.value if ended else f"exit {max(codes)}"
            self.end(step.entry, outcome, verdict)
            print(f"qarac_dist: job {self.job_id}: trial {tid} ended: {outcome}", flush=True)

    def end(self, entry: Entry, outcome: str, verdict: Optional[TrialState]) -> None:
        """The trial's step is over: its result told to the search first (the next ask sees it),
        then its claim ended."""
        if entry.slot is not None:
            search.tell(self.layout, entry.slot, entry.id, entry.trial_dir, verdict, entry.context["select_metric"],
                        entry.context["select_mode"], entry.attempt)
        claims.end(self.layout, self.job_id, entry.id, entry.attempt, outcome)
        self.ended.append(entry.id)

    def note_checkpoint(self, step: Step) -> None:
        status = step.entry.trial_dir.status()
        if status is not None and status.last_checkpoint is not None and status.last_checkpoint != step.checkpoint_before:
            step.saved_one = True
            claims.note_first_checkpoint(self.layout, self.job_id, step.entry.id, step.entry.attempt,
                                         time.time() - step.started)


def srun_command(r: Resources, run: environment.Launch = environment.Launch()) -> list[str]:
    """The step of one trial: its share of the allocation, no more (`--exact`), its Python
    started as `run` says (in the sweep's container, if any)."""
    command = ["srun", "--exact", "--kill-on-bad-exit=1", f"--nodes={r.nodes}", f"--ntasks={r.world_size}",
               f"--ntasks-per-node={r.tasks_per_node}", f"--cpus-per-task={r.cpus_per_task}"]
    if r.gpus_per_node:
        command.append(f"--gpus-per-node={r.gpus_per_node}")
    if r.mem_gb is not None:  # else a step may take all of the job's memory on its node
        command.append(f"--mem={int(r.mem_gb * 1024)}M")
    return command + [*run.srun, *run.python, "-u", "-m", "qarac_dist.submit.step"]


def _local_ranks(r: Resources, slot: int, payload: dict, run: environment.Launch) -> list[subprocess.Popen]:
    """A trial's ranks on this machine, as the local executor's "step"; slot k's GPUs are the
    k-th share of this machine's."""
    port = free_port()
    env = {**os.environ, TRIAL_ENV: json.dumps(payload), "WORLD_SIZE": str(r.tasks_per_node),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.pop("SUBMITIT_EXECUTOR", None)
    if r.gpus_per_node:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * r.gpus_per_node + i) for i in range(r.gpus_per_node))
    return [subprocess.Popen([*run.python, "-u", "-m", "qarac_dist.submit.step"],
                             env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, preexec_fn=stop_with_parent)
            for rank in range(r.tasks_per_node)]


def packed_jobs(layout: SweepLayout, executor_kind: str, resources: Resources, max_requeues: int,
                entries: list[Entry], search_spec: Optional[Search],
                run: environment.Launch = environment.Launch()) -> list[PackJob]:
    """The runners of one submission: ceil(max_parallel / pack) jobs (fewer for fewer trials),
    each with every entry in the order to start them."""
    job = PackJob(str(layout.root.resolve()), executor_kind, resources, entries, max_requeues, search_spec, run)
    return [job] * sbatch.num_jobs(resources, len(entries), steps=True)


def follow_claims(records: list, layout: SweepLayout) -> set[str]:
    """For each packed record, the job and step that run its attempt, from its claim; returns the
    ids of those whose step has ended (their job may go on with other trials)."""
    packed = [r for r in records if r.pack_jobs]
    if not packed:
        return set()
    found = claims.read(layout)
    if any(r.slot is not None for r in packed):  # a search's slots: what each was given when it started
        asked = {a.slot: a for a in search_record.read(layout).asks}
        for r in packed:
            if r.slot in asked:  # with repeats the driver made its run (and its configuration's)
                seed = r.config["training"]["seed"] if r.configuration is not None else None
                r.label = search.label(r.slot, asked[r.slot].params, seed)
                r.mlflow_run_id = r.mlflow_run_id if r.configuration is not None else asked[r.slot].run_id
                r.overrides = {**r.overrides, **asked[r.slot].params}
    ended = set()
    for r in packed:
        claim = found.get(r.id)
        if claim is None or claim.attempt != r.attempt or claim.job is None:
            r.job_id = r.step = None
            continue
        r.job_id = claim.job
        if not r.job_ids or r.job_ids[-1] != claim.job:
            r.job_ids.append(claim.job)
        status = r.trial_dir.status_of(r.attempt)
        r.step = status.job_id if status is not None and str(status.job_id).startswith(f"{claim.job}.") else None
        if claim.ended is not None:
            ended.add(r.id)
    return ended


def state_of(record, ended: set[str], scheduler: dict[str, str]) -> str:
    """A trial run as a step: as its job and its own files say (resolve_state), except that a
    trial no job has started, or whose job is gone without ending it, is PENDING while one of
    the jobs submitted with it may still start it or take it over; else LOST (submitted again by
    the next run of the sweep). A trial whose step ended has no job left, whatever its job does
    next."""
    if record.job_id is None and record.state == "CANCELLED":
        return "CANCELLED"
    state = resolve_state(record, None if record.id in ended or record.job_id is None else scheduler.get(record.job_id))
    if state in ("QUEUED", "LOST", "PREEMPTED") and record.id not in ended and \
            any(scheduler.get(job) in ACTIVE for job in record.pack_jobs):
        return "PENDING"
    return "LOST" if state == "QUEUED" else state
