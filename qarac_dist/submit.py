"""Submission with submitit: SLURM job arrays, or submitit's local executor, one code path.

Every task of a trial's job runs `TrialJob.__call__`, which sets up torch.distributed from
submitit's environment (qarac_dist/ranks.py) and runs the training job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol

import submitit

from . import slurm
from .manifest import TrialRecord
from .plan import Resources


class TrialJob(submitit.helpers.Checkpointable):
    """One trial. Checkpointable: on SLURM's warning signal submitit calls `checkpoint()` and
    requeues this same object; the training job resumes from its newest complete checkpoint."""

    def __init__(self, config: dict, cpus_per_task: int):
        self.config = config
        self.cpus_per_task = cpus_per_task

    def __call__(self) -> dict:
        # Threads per rank follow the CPUs the scheduler gave the task, so ranks and trials
        # sharing a node do not oversubscribe it.
        os.environ["OMP_NUM_THREADS"] = str(self.cpus_per_task)
        import torch

        torch.set_num_threads(self.cpus_per_task)
        from .config import config_from_dict
        from .train import run

        return run(config_from_dict(self.config, f"trial {self.config.get('name')}"))


class Executor(Protocol):
    kind: str

    def submit(self, records: list[TrialRecord]) -> dict[str, str]:
        """Submit trials; returns trial id -> job id."""


class SlurmArrays:
    """Trials as SLURM job arrays with %parallelism, split at the cluster's MaxArraySize."""

    kind = "slurm"

    def __init__(self, folder: Path, resources: Resources, job_name: str, max_requeues: int):
        self.folder, self.resources, self.job_name = folder, resources, job_name
        self.max_requeues = max_requeues

    def submit(self, records: list[TrialRecord]) -> dict[str, str]:
        executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=self.max_requeues)
        executor.update_parameters(**slurm.executor_parameters(self.resources, self.job_name))
        size = slurm.max_array_size()
        job_ids = {}
        for start in range(0, len(records), size):
            chunk = records[start:start + size]
            with executor.batch():
                jobs = [executor.submit(TrialJob(r.config, self.resources.cpus_per_task)) for r in chunk]
            job_ids.update({r.id: job.job_id for r, job in zip(chunk, jobs)})
        return job_ids


class LocalProcesses:
    """Trials on this machine through submitit's local executor; `tasks_per_node` ranks each."""

    kind = "local"

    def __init__(self, folder: Path, resources: Resources):
        self.folder, self.resources = folder, resources
        self.jobs: dict[str, submitit.local.local.LocalJob] = {}

    def submit(self, records: list[TrialRecord]) -> dict[str, str]:
        executor = submitit.LocalExecutor(folder=self.folder / "%j")
        executor.update_parameters(timeout_min=self.resources.time_min, tasks_per_node=self.resources.tasks_per_node,
                                   gpus_per_node=self.resources.gpus_per_node)
        job_ids = {}
        for record in records:
            job = executor.submit(TrialJob(record.config, self.resources.cpus_per_task))
            self.jobs[record.id] = job
            job_ids[record.id] = job.job_id
        return job_ids


def pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def python_executable() -> str:
    return sys.executable
