"""Who am I: rank, local rank and world size from whatever launched this process.

Sources, first match wins:
- torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- submitit (SLURM or local executor): its JobEnvironment, exported as the variables above;
- plain `srun` (launch/train.sbatch, a packed job's steps): SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID, the first host of the step's nodes and a port derived from the job and step
  ids (steps of one job on one node each get their own);
- nothing: one process on this machine.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

        # One device per process is chosen by LOCAL_RANK; do not narrow CUDA_VISIBLE_DEVICES.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"), MASTER_ADDR=first_host(nodelist))
        step = int(env["SLURM_STEP_ID"]) if env["SLURM_STEP_ID"].isdigit() else 0
        env.setdefault("MASTER_PORT", str(20000 + (int(env["SLURM_JOB_ID"]) + 7919 * step) % 40000))
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return Ranks(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))
