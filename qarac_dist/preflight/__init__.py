"""What is checked before anything is spent: the gradient-flow audit (gradients.py), the
consistency checks (checks.py), the memory plan (memory.py), all run on a trial's real model
and data on CPU (audit.py), and the micro-batch search by real steps (batch_size.py).

`python -m qarac_dist.preflight CONFIG_OR_SWEEP.yaml` (__main__.py). Uses train and submit.
"""
