"""Submission with submitit: SLURM job arrays, or submitit's local executor, one code path.

Every task of a trial's job runs `TrialJob.__call__`, which imports the training side (only
there, inside the job: the sweep's own process never imports torch) and runs the trial.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import submitit

from ..config import ConfigError
from ..config.sweep import Resources, SweepSpec
from . import cluster, sbatch


class TrialJob(submitit.helpers.Checkpointable):
    """One trial. Checkpointable: on SLURM's warning signal submitit calls `checkpoint()` and
    requeues this same object; the training job resumes from its newest complete checkpoint."""

    def __init__(self, config: dict, cpus_per_task: int, max_requeues: int = 3):
        self.config = config
        self.cpus_per_task = cpus_per_task
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        # Threads per rank follow the CPUs the scheduler gave the task, so ranks and trials
        # sharing a node do not oversubscribe it.
        os.environ["OMP_NUM_THREADS"] = str(self.cpus_per_task)
        import torch

        torch.set_num_threads(self.cpus_per_task)
        from ..config import config_from_dict
        from ..train.run import run
        from ..train.stop import Preempted

        try:
            return run(config_from_dict(self.config, f"trial {self.config.get('name')}"), self.max_requeues)
        except Preempted as stop:
            # The checkpoint is saved on every rank, and run() has checked the requeue budget.
            # On USR2, global rank 0 hands over to submitit's own handler, which pickles this
            # job and requeues it (and exits).
            if stop.signum != signal.SIGUSR2 or submitit.JobEnvironment().global_rank != 0:
                raise
            handler = signal.getsignal(signal.SIGUSR2)
            if not callable(handler):
                raise
            handler(signal.SIGUSR2, None)
            raise


class SlurmArrays:
    """Trials as SLURM job arrays with %parallelism, split at the cluster's MaxArraySize."""

    kind = "slurm"

    def __init__(self, sweep_dir: Path, resources: Resources, sweep: str, max_requeues: int):
        self.folder, self.resources, self.name = sbatch.submitit_folder(sweep_dir), resources, sbatch.job_name(sweep)
        self.max_requeues = max_requeues

    def submit(self, configs: dict[str, dict]) -> dict[str, str]:
        # Our own requeue budget (train/run.py) binds first and fails the trial with a reason;
        # submitit's count of timed-out interruptions is set one higher so it never does.
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.max_requeues + 1)
        executor.update_parameters(**sbatch.executor_parameters(self.resources, self.name))
        items = list(configs.items())
        job_ids = {}
        for chunk in sbatch.arrays(len(items), cluster.max_array_size()):
            batch = items[chunk.start:chunk.stop]
            with executor.batch():
                jobs = [executor.submit(TrialJob(config, self.resources.cpus_per_task, self.max_requeues))
                        for _, config in batch]
            job_ids.update({tid: job.job_id for (tid, _), job in zip(batch, jobs)})
        return job_ids


class LocalProcesses:
    """Trials on this machine through submitit's local executor; `tasks_per_node` ranks each."""

    kind = "local"

    def __init__(self, sweep_dir: Path, resources: Resources):
        self.folder, self.resources = Path(sweep_dir).resolve() / "submitit", resources
        self.jobs: dict[str, submitit.local.local.LocalJob] = {}

    def submit(self, configs: dict[str, dict]) -> dict[str, str]:
        executor = submitit.LocalExecutor(folder=self.folder)
        executor.update_parameters(timeout_min=self.resources.time_min, tasks_per_node=self.resources.tasks_per_node,
                                   gpus_per_node=self.resources.gpus_per_node)
        job_ids = {}
        for trial_id, config in configs.items():
            job = executor.submit(TrialJob(config, self.resources.cpus_per_task))
            self.jobs[trial_id] = job
            job_ids[trial_id] = job.job_id
        return job_ids

    def alive(self, trial_id: str, job_id: str) -> bool:
        job = self.jobs.get(trial_id)
        return (not job.done()) if job is not None else pid_alive(job_id)


def resolve_executor(spec: SweepSpec, source: str) -> str:
    """slurm or local, as the sweep file asks and this machine allows."""
    if spec.executor == "auto":
        return "slurm" if cluster.available() else "local"
    if spec.executor == "slurm" and not cluster.available():
        raise ConfigError([f"{source}: executor: slurm, but sbatch is not on PATH"])
    if spec.executor == "local" and spec.resources.nodes > 1:
        raise ConfigError([f"{source}: resources.nodes: the local executor runs one node, got {spec.resources.nodes}"])
    return spec.executor


def pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
