"""Submission with submitit: SLURM job arrays, or submitit's local executor, one code path.

Every task of a trial's job runs `TrialJob.__call__`, which sets up torch.distributed from
submitit's environment (qarac_dist/ranks.py) and runs the training job.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Protocol

import submitit

from . import slurm
from .plan import Resources


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
        from .config import config_from_dict
        from .manifest import read_json
        from .train import Preempted, run

        try:
            return run(config_from_dict(self.config, f"trial {self.config.get('name')}"))
        except Preempted as stop:
            # The checkpoint is saved on every rank. On USR2, global rank 0 hands over to
            # submitit's own handler, which pickles this job and requeues it (and exits).
            starts = (read_json(Path(self.config["output"]["dir"]) / "state.json") or {}).get("starts", 1)
            if stop.signum != signal.SIGUSR2 or submitit.JobEnvironment().global_rank != 0:
                raise
            if starts > self.max_requeues:
                raise RuntimeError(f"requeue budget exhausted ({self.max_requeues} requeues); "
                                   f"re-run the sweep to resume from the checkpoint") from stop
            handler = signal.getsignal(signal.SIGUSR2)
            if not callable(handler):
                raise
            handler(signal.SIGUSR2, None)
            raise


class Executor(Protocol):
    kind: str

    def submit(self, configs: dict[str, dict]) -> dict[str, str]:
        """Submit trials (trial id -> training config); returns trial id -> job id."""


class SlurmArrays:
    """Trials as SLURM job arrays with %parallelism, split at the cluster's MaxArraySize."""

    kind = "slurm"

    def __init__(self, folder: Path, resources: Resources, job_name: str, max_requeues: int):
        self.folder, self.resources, self.job_name = folder, resources, job_name
        self.max_requeues = max_requeues

    def submit(self, configs: dict[str, dict]) -> dict[str, str]:
        executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=self.max_requeues)
        executor.update_parameters(**slurm.executor_parameters(self.resources, self.job_name))
        size = slurm.max_array_size()
        items = list(configs.items())
        job_ids = {}
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            with executor.batch():
                jobs = [executor.submit(TrialJob(config, self.resources.cpus_per_task, self.max_requeues))
                        for _, config in chunk]
            job_ids.update({tid: job.job_id for (tid, _), job in zip(chunk, jobs)})
        return job_ids


class LocalProcesses:
    """Trials on this machine through submitit's local executor; `tasks_per_node` ranks each."""

    kind = "local"

    def __init__(self, folder: Path, resources: Resources):
        self.folder, self.resources = folder, resources
        self.jobs: dict[str, submitit.local.local.LocalJob] = {}

    def submit(self, configs: dict[str, dict]) -> dict[str, str]:
        executor = submitit.LocalExecutor(folder=self.folder / "%j")
        executor.update_parameters(timeout_min=self.resources.time_min, tasks_per_node=self.resources.tasks_per_node,
                                   gpus_per_node=self.resources.gpus_per_node)
        job_ids = {}
        for trial_id, config in configs.items():
            job = executor.submit(TrialJob(config, self.resources.cpus_per_task))
            self.jobs[trial_id] = job
            job_ids[trial_id] = job.job_id
        return job_ids


def pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
