"""Where a trial's results land: its directory's files (trial_dir.py, the one owner of them),
MLflow (a parent run per sweep, a child run per trial, batched metrics, best models), the
successive-halving record and the rule it applies (rungs.py), a search's record of asks and
results (search_record.py), and what the sweep hands a job
beside its config (job_context.py).

Imports config and base; MLflow itself is imported inside the functions that talk to it, so the
sweep's planning side can read a trial's directory without it.
"""
