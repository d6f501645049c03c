"""What a trial runs: the training loop (loop.py) and one job's lifecycle (run.py), the data,
the models (Longformer attention, dual encoder, sentence classifier), checkpoints, ranks,
metrics and memory sampling.

`python -m qarac_dist.train CONFIG` runs one trial (__main__.py). Imports config and track.
"""
