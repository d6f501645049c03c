"""A configuration's seeds when the sweep repeats it (`repeats: K`).

The first seed is the configuration's own `training.seed`, so its first trial is the trial a
sweep without repeats plans (the same id), and the others are derived from it by a hash: stable
across plans, machines and Python versions, and the same for every configuration with the same
`training.seed`, so configurations are compared on the same K model inits and data orders.
"""

from __future__ import annotations

import hashlib

SEED_LIMIT = 2**32
"""training.seed is below this (config/sections.py), and so is every derived seed."""


def repeat_seeds(seed: int, repeats: int) -> list[int]:
    """`repeats` distinct seeds, `seed` first."""
    seeds = [seed]
    k = 1
    while len(seeds) < repeats:
        derived = int.from_bytes(hashlib.sha256(f"qarac_dist seed {seed} repeat {k}".encode()).digest()[:4], "big")
        if derived not in seeds:
            seeds.append(derived)
        k += 1
    return seeds
