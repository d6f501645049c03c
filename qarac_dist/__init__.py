"""qarac_dist: DeepSpeed training jobs, sweeps on SLURM, tracked in MLflow.

The folders are the stages a trial goes through; imports follow this graph, never back
(tests/unit/test_architecture.py checks it, imports inside functions included):

    sweep, status   the command lines                            (use everything)
    preflight/      what is checked before anything is spent     (uses train, submit, plan, track)
    submit/         how a trial reaches the cluster, is followed (uses plan, track; train only in a job)
    train/          what a trial runs                            (uses track)
    track/          where its results land                       (uses config)
    plan/           where trials come from, pure                 (uses config)
    config/         what the user writes, typed and validated
    base/           plumbing every stage uses: errors, atomic files, the lock, secrets, the
                    sweep directory's layout                      (uses nothing of ours)

Every stage may use config and base. The submit side runs the training side only inside a job
(submit/executors.TrialJob). base, config, plan, submit and the sweep and status commands import
no torch, deepspeed, transformers or mlflow at module level.
"""

__version__ = "0.2.0"
