"""Who am I: rank, local rank and world size from whatever launched this process.

Sources, first match wins:
- torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- submitit (SLURM or local executor): its JobEnvironment, exported as the variables above;
- plain `srun` (launch/train.sbatch, a packed job's steps): SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID and the first host of the step's nodes;
- nothing: one process on this machine.

Under SLURM the port is derived from the job and step ids (every rank must find it without
talking), and placed below the kernel's ephemeral range: a port there is never handed to some
process's outgoing connection, the collision that made submitit's own choice (random over
20000-60000) fail as EADDRINUSE when two jobs shared a node. Steps of one job get their own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..base.ports import free_port


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _ephemeral_floor(path="/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        return int(open(path).read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def slurm_port(job_id: str, step_id: str) -> str:
    """The rendezvous port of a SLURM job's step: in [20000, the ephemeral floor), the same on
    every rank; consecutive jobs get consecutive ports."""
    width = max(_ephemeral_floor() - 20000, 1000)
    step = int(step_id) if step_id.isdigit() else 0
    return str(20000 + (int(job_id) + 7919 * step) % width)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, as `scontrol show hostnames` would list it first
    ("gpu[07-09,12]-ib,cpu1" -> "gpu07-ib"), read here: a trial in a container's image has no
    scontrol."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,]*))?", nodelist.strip())
    prefix, ranges, suffix = match.group(1), match.group(2), match.group(3) or ""
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0] + suffix


def export_from_environment(env=os.environ) -> Ranks:
    """Make sure the torch.distributed env:// variables are set, and return this process's ranks."""
    if "RANK" in env and "WORLD_SIZE" in env:
        pass
    elif env.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment

        found = TorchDistributedEnvironment()  # reads os.environ, which env is here
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            found.master_port = int(slurm_port(env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", "0")))
        # One device per process is chosen by LOCAL_RANK; do not narrow CUDA_VISIBLE_DEVICES.
        found.export(set_cuda_visible_devices=False, overwrite=True)
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"), MASTER_ADDR=first_host(nodelist))
        env.setdefault("MASTER_PORT", slurm_port(env["SLURM_JOB_ID"], env["SLURM_STEP_ID"]))
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return Ranks(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))
