"""The options `resources.extra_sbatch` may pass to sbatch: its long options (SLURM 22.05's
`man sbatch`), less those the sweep sets itself from other keys and those that change how the
sbatch command behaves rather than the job. Keys may be written with `_` for `-`."""

from __future__ import annotations

from typing import Optional

ACCEPTED = frozenset("""
    acctg-freq batch bb bbf begin chdir cluster-constraint clusters comment container contiguous core-spec
    cores-per-socket cpu-freq cpus-per-gpu deadline delay-boot dependency distribution exclude exclusive export
    export-file extra-node-info get-user-env gid gpu-bind gpu-freq gpus gpus-per-socket gpus-per-task gres
    gres-flags hint hold ignore-pbs kill-on-invalid-dep licenses mail-type mail-user mcs-label mem-bind mem-per-cpu
    mem-per-gpu mincpus network nice no-kill no-requeue nodefile nodelist ntasks ntasks-per-core ntasks-per-gpu
    ntasks-per-socket overcommit oversubscribe power prefer priority profile propagate reboot requeue
    reservation sockets-per-node spread-job switches thread-spec threads-per-core time-min tmp uid use-min-nodes
    wait-all-nodes wckey
""".split())

SET_BY_THE_SWEEP = {
    "nodes": "resources.nodes", "ntasks-per-node": "resources.tasks_per_node",
    "gpus-per-node": "resources.gpus_per_node", "cpus-per-task": "resources.cpus_per_task",
    "mem": "resources.mem_gb", "time": "resources.time_min", "partition": "resources.partition",
    "account": "resources.account", "qos": "resources.qos", "constraint": "resources.constraint",
    "array": "resources.max_parallel", "job-name": "name", "output": "the sweep directory",
    "error": "the sweep directory", "open-mode": "submitit", "signal": "submitit (USR2 before the time limit)",
    "wrap": "submitit",
}


def problem(key: str) -> Optional[str]:
    """Why `key` cannot be an extra sbatch option, or None."""
    option = str(key).replace("_", "-")
    if option in ACCEPTED:
        return None
    if option in SET_BY_THE_SWEEP:
        return f"--{option} is set from {SET_BY_THE_SWEEP[option]}; set it there"
    return "not an sbatch option (SLURM 22.05 `man sbatch`); e.g. exclusive, reservation, gres, mail-type"
