"""Where a trial's results land: its directory's files (trial_dir.py, the one owner of them),
and MLflow (a parent run per sweep, a child run per trial, batched metrics, best models).

Imports only `config`; MLflow itself is imported inside the functions that talk to it, so the
sweep's planning side can read a trial's directory without it.
"""
