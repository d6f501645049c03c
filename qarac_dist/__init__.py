"""qarac_dist: DeepSpeed training jobs, sweeps on SLURM, tracked in MLflow."""

__version__ = "0.1.0"
