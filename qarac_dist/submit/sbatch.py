"""What a sweep hands to SLURM, as pure functions: the job name, a job's folder, the executor
parameters, the arrays a sweep is cut into, and the exact sbatch script of each.

The script is the one submitit writes for these parameters: its builder
(`submitit.slurm.slurm._make_sbatch_string`, private) renders it, which is why pyproject.toml
pins submitit to the range tested here; tests/golden/sbatch_*.txt hold the expected scripts.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path
from typing import Optional

from ..config.sweep import Resources

# The signal SLURM sends `signal_delay_s` before the time limit; submitit's default is USR2.
# Never USR1: NCCL may install its own handler for it.
SIGNAL_DELAY_S = 120


def job_name(sweep: str) -> str:
    return f"qarac-{sweep}"


def job_folder(folder: Path) -> Path:
    """Where submitit keeps each SLURM job's pickles and logs, under `folder` (`%j`: the job id,
    filled in by SLURM)."""
    return Path(folder).resolve() / "%j"


def signal_delay_s(time_min: int) -> int:
    """Seconds of warning before the time limit: 2 minutes, less for short limits (a fifth of
    the limit, at least 10 s), so a job always gets some time to run before the warning."""
    return min(SIGNAL_DELAY_S, max(10, time_min * 60 // 5))


def job_resources(resources: Resources) -> Resources:
    """What one job asks for: a trial's resources, or with `pack` K the resources of K trials.
    A one-node trial's tasks, GPUs and memory are multiplied on one node (K one-GPU trials fill
    a K-GPU node); a multi-node trial's nodes are multiplied."""
    k = resources.pack
    if k == 1:
        return resources
    if resources.nodes > 1:
        return dataclasses.replace(resources, nodes=resources.nodes * k)
    return dataclasses.replace(resources, tasks_per_node=resources.tasks_per_node * k,
                               gpus_per_node=resources.gpus_per_node * k,
                               mem_gb=resources.mem_gb * k if resources.mem_gb is not None else None)


def held(resources: Resources) -> tuple[int, int]:
    """GPUs and CPU cores of all the nodes and tasks of `resources` (a trial's, or a job's)."""
    r = resources
    return r.nodes * r.gpus_per_node, r.nodes * r.tasks_per_node * r.cpus_per_task


def requested_hours(resources: Resources, num_trials: int, steps: bool = False) -> dict[str, float]:
    """GPU-hours and CPU-hours at most: each job of a submission for its whole time limit."""
    gpus, cpus = held(job_resources(resources))
    jobs = num_jobs(resources, num_trials, steps)
    return {"gpu_hours": jobs * gpus * resources.time_min / 60, "cpu_hours": jobs * cpus * resources.time_min / 60}


def num_jobs(resources: Resources, num_trials: int, steps: bool = False) -> int:
    """Jobs a submission of `num_trials` trials makes: one per trial, or where trials run as
    steps (`pack` K > 1, or a model-based search: `steps`), ceil(max_parallel / K) jobs (fewer
    when there are fewer trials to fill them)."""
    if resources.pack == 1 and not steps:
        return num_trials
    return min(math.ceil(resources.max_parallel / resources.pack), math.ceil(num_trials / resources.pack))


def excluding(resources: Resources, bad_nodes: dict[str, str]) -> Resources:
    """`resources` with the sweep's bad nodes (submit/claims.py) added to sbatch's --exclude,
    beside any the sweep file gives."""
    if not bad_nodes:
        return resources
    extra = dict(resources.extra_sbatch or {})
    given = [str(extra["exclude"])] if extra.get("exclude") else []
    extra["exclude"] = ",".join(dict.fromkeys([*given, *bad_nodes]))
    return dataclasses.replace(resources, extra_sbatch=extra)


def executor_parameters(resources: Resources, name: str, steps: bool = False, job: Optional[dict] = None) -> dict:
    """submitit SlurmExecutor parameters for these resources. Where trials run as steps (packed,
    or `steps`), the job's script runs its runner (submit/pack.py) directly, not under srun.
    `job`: setup, teardown and srun_args of the sweep's environment (submit/environment.py)."""
    packed = resources.pack > 1 or steps
    resources = job_resources(resources)
    params = {
        "job_name": name,
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "cpus_per_task": resources.cpus_per_task,
        "time": resources.time_min,
        "array_parallelism": math.ceil(resources.max_parallel / resources.pack) if packed else resources.max_parallel,
        "signal_delay_s": signal_delay_s(resources.time_min),
    }
    if packed:
        params["use_srun"] = False
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb is not None:
        params["mem"] = (f"{int(resources.mem_gb)}GB" if resources.mem_gb == int(resources.mem_gb)
                         else f"{int(resources.mem_gb * 1024)}MB")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(resources, key) is not None:
            params[key] = getattr(resources, key)
    if resources.extra_sbatch:
        params["additional_parameters"] = dict(resources.extra_sbatch)
    params.update(job or {})
    return params


def arrays(num_trials: int, max_array_size: int) -> list[range]:
    """The trials of a submission cut into job arrays: array indices must stay below the
    cluster's MaxArraySize."""
    return [range(start, min(start + max_array_size, num_trials)) for start in range(0, num_trials, max_array_size)]


def sbatch_text(resources: Resources, name: str, folder: Path, python: str, num_array_tasks: int,
                steps: bool = False, job: Optional[dict] = None) -> str:
    """The sbatch script of one array of `num_array_tasks` jobs (a single job for one); `python`:
    the command that runs the job's Python; `job`: as executor_parameters takes it."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=num_array_tasks if num_array_tasks > 1 else None,
                               **executor_parameters(resources, name, steps, job))
