"""What a trial runs: the training loop (loop.py) and one job's lifecycle (run.py), the
checkpointer (checkpoint.py), the export of the best model (export.py), the data, the models
(Longformer attention, dual encoder, sentence classifier), ranks, validation, metrics and
memory sampling; loss spikes and their rollbacks (spikes.py), and the test hooks that inject
faults into real jobs (faults.py).

`python -m qarac_dist.train CONFIG` runs one trial (__main__.py). Imports config, track and base.
"""
