"""Where trials come from: pure functions from a sweep spec to trials (expand.py; a search's
slots), rungs and budgets (asha.py), and a search's next values from Optuna's sampler and the
results recorded so far (search.py).

No I/O, no clock, no randomness but seeded generators; imports only `config` and `base`.
"""

from .expand import Trial, plan, sample, select_defaults, trial_id, varied_keys

__all__ = ["Trial", "plan", "sample", "select_defaults", "trial_id", "varied_keys"]
