"""One trial as a step of a packed job: `python -m qarac_dist.submit.step`, started by the job's
runner (submit/pack.py) under `srun` on SLURM, or as plain processes by the local runner, with
what the trial needs in the environment variable `QARAC_TRIAL` (JSON: config, context,
max_requeues, cpus_per_task, and the step id where the runner names it).

Ranks come from the step's own SLURM variables (or those the local runner set), not from
submitit's view of the whole job: each step is its own torch.distributed world.
"""

from __future__ import annotations

import json
import os
import sys

TRIAL_ENV = "QARAC_TRIAL"


def main() -> int:
    payload = json.loads(os.environ.pop(TRIAL_ENV))
    # The job's script exports SUBMITIT_EXECUTOR; its view (the whole allocation's nodes and
    # tasks) is not this step's.
    os.environ.pop("SUBMITIT_EXECUTOR", None)
    cpus = payload["cpus_per_task"]
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    import torch

    torch.set_num_threads(cpus)
    from ..config import config_from_dict
    from ..track.job_context import JobContext
    from ..train.run import run, slurm_job_id
    from ..train.stop import Preempted

    step = payload.get("step") or f"{slurm_job_id()}.{os.environ.get('SLURM_STEP_ID', '0')}"
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    context = {**payload["context"], "step": step}
    context["tags"] = {**context.get("tags", {}), "slurm_step": step, "cuda_visible_devices": gpus}
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"qarac_dist: trial {context['tags'].get('trial_id')} runs as step {step} on {os.uname().nodename}, "
              f"CUDA_VISIBLE_DEVICES={gpus}", flush=True)
    try:
        run(config_from_dict(payload["config"], f"trial {payload['config'].get('name')}"), JobContext(**context),
            payload["max_requeues"])
    except Preempted:  # saved; the runner reads the verdict from the trial's state.json
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
