"""How a trial reaches the cluster and is followed: the Submission, in the order its steps
happen (submission.py), one Executor protocol with SLURM arrays and local processes
(executors.py), jobs that run trials as steps (pack.py: the runner; step.py: a trial's step;
claims.py: who runs what; search.py: a search slot's ask and tell), the sbatch text (sbatch.py, pure), cluster queries (cluster.py), the manifest
and its states (sweep_dir.py), the MLflow runs the driver makes (tracking.py), what --dry-run
and the summary print (plan_text.py, report.py), and rebuilding a manifest (repair.py).

Imports plan, track, config and base; the training side only inside a job (executors.TrialJob,
step.py).
"""
