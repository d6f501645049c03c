"""The sweep file's `environment:` section: what every job of the sweep runs in. Validated here;
turned into what a job runs by submit/environment.py."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Environment:
    """What every job of the sweep runs in (submit/environment.py)."""

    setup: list[str] = field(default_factory=list)
    """Shell lines run at the start of every job, before its first srun (module load, conda
    activate, export), and locally before each trial; a failing line stops the job, named."""
    variables: dict = field(default_factory=dict)
    """Name -> value, set for every process of every trial (HF_HOME, NCCL_*, ...)."""


VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
OWN_VARIABLES = ("SLURM_", "SUBMITIT_", "QARAC_")
"""Prefixes of the variables the scheduler, submitit and qarac_dist set for a job themselves."""


def check_environment(env: Environment, errors: list[str]) -> None:
    for i, line in enumerate(env.setup):
        if isinstance(line, str) and ("\n" in line or "\r" in line or "\0" in line):
            errors.append(f"environment.setup[{i}]: expected one line (give more lines as more items), got {line!r}")
        elif isinstance(line, str) and not line.strip():
            errors.append(f"environment.setup[{i}]: an empty line; remove it")
        elif isinstance(line, str) and line.rstrip().endswith("\\"):
            errors.append(f"environment.setup[{i}]: ends in a backslash (a line continued on the next); give the "
                          f"whole command in one line")
    for name, value in env.variables.items():
        key = f"environment.variables.{name}"
        if not isinstance(name, str) or not VARIABLE.fullmatch(name):
            errors.append(f"{key}: expected a variable name (letters, digits, _; not starting with a digit)")
        elif name.startswith(OWN_VARIABLES):
            errors.append(f"{key}: {name.split('_')[0]}_* variables are set by the scheduler, submitit or "
                          f"qarac_dist for each job; set another")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errors.append(f"{key}: expected a string or a number, got {value!r}")
        elif "\0" in str(value):
            errors.append(f"{key}: expected a value without a NUL character")
