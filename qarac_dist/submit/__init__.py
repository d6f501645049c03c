"""How a trial reaches the cluster: sbatch text and executor parameters (sbatch.py, pure),
cluster queries (cluster.py), submitit executors (executors.py), the sweep directory and its
states (sweep_dir.py), the driver that keeps them in step (driver.py), and rebuilding a
manifest (repair.py).

Imports config, plan and track; the training side only inside a job (executors.TrialJob).
"""
