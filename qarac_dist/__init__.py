"""qarac_dist: DeepSpeed training jobs, sweeps on SLURM, tracked in MLflow.

The folders are the stages a trial goes through; imports go one way, down this list, never
back (tests/unit/test_architecture.py checks it, imports inside functions included):

    sweep, status, summary   the command lines (`python -m qarac_dist.sweep | status`)
    preflight/               what is checked before anything is spent   (uses train, submit)
    submit/                  how a trial reaches the cluster            (uses track, plan)
    train/                   what a trial runs                          (uses track)
    track/                   where its results land                     (uses config)
    plan/                    where trials come from, pure               (uses config)
    config/                  what the user writes, typed and validated

The submit side runs the training side only inside a job (submit/executors.TrialJob).
config, plan, submit, summary and the sweep and status commands import no torch, deepspeed,
transformers or mlflow at module level.
"""

__version__ = "0.2.0"
