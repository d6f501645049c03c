"""Where jobs run: one `Executor` protocol, two executors (SLURM job arrays, local processes),
both through submitit, so a trial's job is the same code either way.

Every task of a trial's job runs `TrialJob.__call__`, which imports the training side (only
there, inside the job: the sweep's own process never imports torch) and runs the trial.
Nothing outside submit/ asks which executor it holds.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import submitit

from ..config import ConfigError
from ..config.environment import Environment
from ..config.sweep import Resources, SweepSpec
from . import cluster, environment, sbatch


class Executor(Protocol):
    kind: str
    """"slurm" or "local", as the manifest records it."""
    resources: Resources
    """What each job gets."""
    max_requeues: int
    """How often a trial's job may be requeued (the sweep's max_requeues)."""
    steps: bool
    """Jobs run trials as steps (submit/pack.py): packed, or a model-based search."""
    launch: environment.Launch
    """How a trial's Python starts (in the sweep's container, if any)."""

    def submit(self, calls: list[Callable[[], Any]]) -> list[submitit.Job]:
        """One job per call (SLURM: job arrays); the jobs in the calls' order."""

    def alive(self, job_id: str) -> bool:
        """Whether the job may still run (pending, running or requeued)."""

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """The scheduler's state of each job it still knows (SLURM's names)."""

    def live(self, job_ids: list[str]) -> set[str]:
        """Those of the jobs that may still run, in one query."""

    def one_trial_a_job(self) -> "Executor":
        """The same executor with each call a trial's job of its own (not packed, not steps)."""

    def cancel(self, job_ids: list[str], at_once: bool = False) -> None:
        """Stop the jobs: SIGTERM, on which each trial saves at the end of its step and exits;
        `at_once`: SIGKILL, nothing saved."""


class TrialJob(submitit.helpers.Checkpointable):
    """One trial. Checkpointable: on SLURM's warning signal submitit calls `checkpoint()` and
    requeues this same object; the training job resumes from its newest complete checkpoint."""

    def __init__(self, config: dict, context: dict, cpus_per_task: int, max_requeues: int):
        self.config = config
        """The user's training config, as planned."""
        self.context = context
        """What the sweep hands the job (track/job_context.JobContext, as a dict)."""
        self.cpus_per_task = cpus_per_task
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        # Threads per rank follow the CPUs the scheduler gave the task, so ranks and trials
        # sharing a node do not oversubscribe it.
        os.environ["OMP_NUM_THREADS"] = str(self.cpus_per_task)
        import torch

        torch.set_num_threads(self.cpus_per_task)
        from ..config import config_from_dict
        from ..track.job_context import JobContext
        from ..train.run import run
        from ..train.stop import Preempted

        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            environment.fail_early()
            stop_with_parent()
        try:
            return run(config_from_dict(self.config, f"trial {self.config.get('name')}"),
                       JobContext(**self.context), self.max_requeues)
        except Preempted as stop:
            # The checkpoint is saved on every rank, and run() has checked the requeue budget.
            # On USR2, global rank 0 hands over to submitit's own handler, which pickles this
            # job and requeues it (and exits). In a container (no scontrol there) every rank exits
            # PREEMPTED_EXIT and the job's script requeues (environment.job_parameters).
            if stop.signum == signal.SIGUSR2 and os.environ.get(environment.REQUEUE_OUTSIDE):
                sys.stderr.flush()
                os._exit(environment.PREEMPTED_EXIT)
            if stop.signum != signal.SIGUSR2 or submitit.JobEnvironment().global_rank != 0:
                raise
            handler = signal.getsignal(signal.SIGUSR2)
            if not callable(handler):
                raise
            handler(signal.SIGUSR2, None)
            raise


def stop_with_parent() -> None:
    """This process gets SIGTERM when its parent dies, however it dies (Linux's parent-death
    signal): a local job's tasks when submitit's controller (the job's pid) is killed, a trial's
    ranks when their runner is. So each saves and stops, as on SLURM's warning, and none goes on
    training unseen beside the next start (the trial directory's writer lock refuses that too).
    Also run in a rank between fork and exec (Popen's preexec_fn: the runner starts no threads)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


class SlurmArrays:
    """Jobs as SLURM job arrays with %parallelism, split at the cluster's MaxArraySize."""

    kind = "slurm"

    def __init__(self, folder: Path, resources: Resources, name: str, max_requeues: int, steps: bool = False,
                 env: Environment = Environment(), run: environment.Launch = environment.Launch()):
        self.folder = sbatch.job_folder(folder)
        self.resources, self.name, self.max_requeues, self.steps = resources, name, max_requeues, steps
        self.launch, self.env = run, env
        self.job = environment.job_parameters(env, resources.extra_sbatch, run, steps)
        # A packed job's script runs its runner here (it starts the steps in the container).
        self.python = shlex.quote(sys.executable) if steps else shlex.join(run.python)

    def script(self, num_jobs: int) -> str:
        """The sbatch script of an array of `num_jobs` jobs, as submit() would send it."""
        return sbatch.sbatch_text(self.resources, self.name, self.folder, self.python, num_jobs, self.steps, self.job)

    def submit(self, calls: list[Callable[[], Any]], after: Sequence[str] = ()) -> list[submitit.Job]:
        """`after`: jobs that must end first, however they end (afterany)."""
        # Our own requeue budget (train/run.py) binds first and fails the trial with a reason;
        # submitit's count of timed-out interruptions is set one higher so it never does.
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.max_requeues + 1, python=self.python)
        executor.update_parameters(**sbatch.executor_parameters(self.resources, self.name, self.steps, self.job),
                                   **_after(after))
        jobs: list[submitit.Job] = []
        for chunk in sbatch.arrays(len(calls), cluster.max_array_size()):
            with executor.batch():
                jobs += [executor.submit(call) for call in calls[chunk.start:chunk.stop]]
        return jobs

    def submit_after(self, call: Callable[[], Any], after: list[str]) -> str:
        """One job of one task on one node (a GPU where trials have any), in the trials'
        environment and container, that starts once the jobs `after` have ended (afterany)."""
        one = dataclasses.replace(self.resources, nodes=1, tasks_per_node=1, pack=1, max_parallel=1,
                                  gpus_per_node=min(1, self.resources.gpus_per_node))
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=0, python=shlex.join(self.launch.python))
        executor.update_parameters(**sbatch.executor_parameters(one, self.name, False, environment.job_parameters(
            self.env, one.extra_sbatch, self.launch)), **_after(after))
        return executor.submit(call).job_id

    def one_trial_a_job(self) -> "SlurmArrays":
        """This executor with each call a trial's job of its own, unpacked (submit/retrain.py)."""
        return SlurmArrays(self.folder.parent, dataclasses.replace(self.resources, pack=1), self.name,
                           self.max_requeues, False, self.env, self.launch)

    def alive(self, job_id: str) -> bool:
        return self.states([job_id]).get(job_id) in cluster.ACTIVE

    def states(self, job_ids: list[str]) -> dict[str, str]:
        return cluster.job_states(job_ids)

    def live(self, job_ids: list[str]) -> set[str]:
        return {j for j, state in cluster.job_states(job_ids, finished=False).items() if state in cluster.ACTIVE}

    def cancel(self, job_ids: list[str], at_once: bool = False) -> None:
        cluster.cancel(job_ids, "KILL" if at_once else None)


def _after(jobs: Sequence[str]) -> dict:
    return {"dependency": f"afterany:{':'.join(jobs)}"} if jobs else {}


class LocalProcesses:
    """Jobs on this machine through submitit's local executor; `tasks_per_node` ranks each. A
    job's id is its process id."""

    kind = "local"

    def __init__(self, folder: Path, resources: Resources, max_requeues: int, steps: bool = False,
                 env: Environment = Environment(), run: environment.Launch = environment.Launch()):
        self.folder, self.resources, self.max_requeues = Path(folder).resolve(), resources, max_requeues
        self.steps, self.env, self.launch = steps, env, run
        self.jobs: dict[str, submitit.local.local.LocalJob] = {}

    def submit(self, calls: list[Callable[[], Any]]) -> list[submitit.Job]:
        # A job of steps is one process, its runner, which starts each trial's ranks itself.
        packed = self.steps
        # The jobs ignore the terminal's SIGINT and SIGHUP (a disposition children inherit):
        # Ctrl-C reaches the driver alone, which asks each trial to save (submission.py). Left
        # to the terminal, submitit's controller would kill the tasks a second after SIGINT.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGHUP)}
        jobs = []
        try:
            for call in calls:  # the setup lines run before each job (a trial, a packed runner), as on SLURM
                executor = submitit.LocalExecutor(folder=self.folder, max_num_timeout=self.max_requeues + 1,
                                                  python=environment.local_python(self.env, self.python()))
                executor.update_parameters(timeout_min=self.resources.time_min,
                                           tasks_per_node=1 if packed else self.resources.tasks_per_node,
                                           gpus_per_node=0 if packed else self.resources.gpus_per_node)
                jobs.append(executor.submit(call))
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.jobs.update({job.job_id: job for job in jobs})
        return jobs

    def one_trial_a_job(self) -> "LocalProcesses":
        """This executor with each call a trial's job of its own, unpacked (submit/retrain.py)."""
        return LocalProcesses(self.folder, dataclasses.replace(self.resources, pack=1), self.max_requeues, False,
                              self.env, self.launch)

    def python(self) -> environment.Launch:
        """A packed job's runner runs here, outside the container (it starts each step in it)."""
        return environment.Launch() if self.steps else self.launch

    def alive(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is not None:  # this process started it: submitit knows whether it ended
            return not job.done()
        # Started by a driver that is gone: the process with that id, if it still runs submitit's
        # controller for this folder (not a zombie, not another program or another sweep's job that
        # was given the id since: ids wrap, at 32768 on many machines).
        proc = Path("/proc") / str(job_id)
        if not Path("/proc/self").exists():  # no /proc (macOS): whether a process has that id
            try:
                os.kill(int(job_id), 0)
            except (ValueError, ProcessLookupError):
                return False
            except PermissionError:
                pass
            return True
        try:
            stat = (proc / "stat").read_text().rpartition(")")[2].split()
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        last = cmdline.rstrip(b"\0").rpartition(b"\0")[2]  # the folder, or a shell's line that ends with it
        ours = {os.fsencode(str(self.folder)), os.fsencode(shlex.quote(str(self.folder)))}
        return stat[0] != "Z" and b"submitit.local._local" in cmdline and \
            any(last == f or last.endswith(b" " + f) for f in ours)

    def states(self, job_ids: list[str]) -> dict[str, str]:
        return {j: "RUNNING" for j in job_ids if self.alive(j)}

    def live(self, job_ids: list[str]) -> set[str]:
        return set(self.states(job_ids))

    def cancel(self, job_ids: list[str], at_once: bool = False) -> None:
        # submitit's controller (the job's pid) forwards SIGTERM to its tasks; SIGKILL it cannot
        # forward, so at once means every process of the job's tree.
        for job_id in job_ids:
            pids = _process_tree(int(job_id)) if at_once else [int(job_id)]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL if at_once else signal.SIGTERM)
                except ProcessLookupError:
                    pass


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, children first (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree[::-1]


def resolve_kind(spec: SweepSpec, source: str) -> str:
    """slurm or local, as the sweep file asks and this machine allows."""
    kind = ("slurm" if cluster.available() else "local") if spec.executor == "auto" else spec.executor
    if spec.executor == "slurm" and not cluster.available():
        raise ConfigError([f"{source}: executor: slurm, but sbatch is not on PATH"])
    container = spec.environment.container
    if kind == "local" and container is not None and container.runtime == "pyxis":
        raise ConfigError([f"{source}: environment.container.runtime: pyxis runs containers through SLURM's srun, and "
                           f"the local executor has none; use apptainer or charliecloud here, or "
                           f"environment.container=null"])
    if spec.executor == "local" and spec.resources.nodes > 1:
        raise ConfigError([f"{source}: resources.nodes: the local executor runs one node, got {spec.resources.nodes}"])
    return kind


def make_executor(kind: str, folder: Path, resources: Resources, name: str, max_requeues: int,
                  steps: bool = False, env: Environment = Environment(),
                  run: environment.Launch = environment.Launch()) -> Executor:
    """The executor of this kind, its jobs' files under `folder`; `steps`: its jobs run trials
    as steps (submit/pack.py); `env`: the sweep's environment section; `run`: how trials'
    Python starts (environment.launch)."""
    if kind == "slurm":
        return SlurmArrays(folder, resources, name, max_requeues, steps, env, run)
    return LocalProcesses(folder, resources, max_requeues, steps, env, run)
