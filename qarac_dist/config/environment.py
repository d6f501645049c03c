"""The sweep file's `environment:` section: what every job of the sweep runs in. Validated here;
turned into what a job runs by submit/environment.py."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional


@dataclass
class Container:
    """The image every process of every trial runs in (submit/environment.py says how)."""

    runtime: Literal["apptainer", "pyxis", "charliecloud"]
    """apptainer (`apptainer exec --nv`), pyxis (`srun --container-image`, SLURM only), or
    charliecloud (`ch-run` on a directory image)."""
    image: str
    """An Apptainer image (a .sif file, or a URI such as docker://...), a pyxis/enroot image
    (nvcr.io#nvidia/pytorch:24.05-py3, or a .sqsh file), or a Charliecloud image directory."""
    mounts: list[str] = field(default_factory=list)
    """`host:container` (or one path, the same in both) mounted besides the sweep's own: the
    working directory, the sweep directory, the data caches and a sqlite store are mounted
    without being listed (their top-level directories)."""
    python: str = "python"
    """The interpreter inside the image, with qarac_dist and its dependencies installed."""


@dataclass
class Environment:
    """What every job of the sweep runs in (submit/environment.py)."""

    setup: list[str] = field(default_factory=list)
    """Shell lines run at the start of every job, before its first srun (module load, conda
    activate, export), and locally before each trial; a failing line stops the job, named."""
    variables: dict = field(default_factory=dict)
    """Name -> value, set for every process of every trial (HF_HOME, NCCL_*, ...)."""
    container: Optional[Container] = None
    """The image every trial's processes run in; absent: the sweep's own interpreter."""
    hub_offline: bool = False
    """Compute nodes without internet: trials run with the hub offline (HUB_OFFLINE), and the
    sweep refuses to submit until every model, tokenizer and data set they load is in the caches
    they use (`python -m qarac_dist.prefetch SWEEP.yaml` fills them)."""

    def exported(self) -> dict:
        """What every process of every trial gets set: `variables`; offline, the hub's switches and
        the hub cache the sweep checked (this process's: a job may inherit no HF_HOME)."""
        if not self.hub_offline:
            return dict(self.variables)
        return {**self.variables, **HUB_OFFLINE, "HF_HUB_CACHE": str(self.hub_cache(os.environ))}

    def hub_cache(self, shell: Mapping[str, str]) -> Path:
        """Where the trials' models and tokenizers are cached, absolute, as huggingface_hub finds
        it: from the variables, else from `shell` (what a job inherits), else ~/.cache."""
        own = {k: str(v) for k, v in self.variables.items()}
        for seen in (own, shell):
            cache = seen.get("HF_HUB_CACHE") or seen.get("HUGGINGFACE_HUB_CACHE") or (
                os.path.join(seen["HF_HOME"], "hub") if seen.get("HF_HOME") else None)
            if cache:
                return Path(os.path.abspath(os.path.expanduser(cache)))
        home = os.path.join(own.get("XDG_CACHE_HOME") or shell.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        return Path(os.path.abspath(os.path.expanduser(os.path.join(home, "hub"))))


HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""What environment.hub_offline sets: huggingface_hub, datasets and transformers load from their
caches and never try the network."""


VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EXIT = re.compile(r"(?:^|[;&|({]\s*)exit\b")
HEREDOC = re.compile(r"(?<!<)<<(?!<)")


def _shell_problem(line: str) -> str | None:
    """What bash says of `line` as the job's script holds it (within braces), or None."""
    if HEREDOC.search(line):
        return "a here-document"
    try:
        proc = subprocess.run(["bash", "-n", "-c", f"{{ {line}\n}}"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no bash to ask here: the job's shell will say
    return proc.stderr.strip().splitlines()[-1][:120] if proc.returncode or proc.stderr.strip() else None
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
        elif isinstance(line, str) and EXIT.search(line):
            errors.append(f"environment.setup[{i}]: `exit` would end the job before its trials start; remove it")
        elif isinstance(line, str) and (problem := _shell_problem(line)):
            errors.append(f"environment.setup[{i}]: not a whole shell line ({problem}); each item is one command, "
                          f"with its quotes, braces and here-documents closed on it")
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
        elif env.hub_offline and name in HUB_OFFLINE and str(value) != HUB_OFFLINE[name]:
            errors.append(f"{key}: {value!r} contradicts environment.hub_offline: true, which sets it to "
                          f"{HUB_OFFLINE[name]}; remove one of them")
    if env.container is not None:
        _check_container(env.container, errors)


def _check_container(c: Container, errors: list[str]) -> None:
    if not c.image.strip():
        errors.append("environment.container.image: expected an image")
    elif c.runtime == "charliecloud" and not Path(c.image).is_dir():
        errors.append(f"environment.container.image: {c.image} is not a directory (charliecloud runs a directory "
                      f"image: ch-convert IMAGE DIR makes one)")
    elif c.runtime == "pyxis" and c.image.endswith((".sqsh", ".squashfs")) and not c.image.startswith("/"):
        errors.append(f"environment.container.image: {c.image}: give an image file by its absolute path (pyxis "
                      f"takes anything else for a registry's image name)")
    elif c.runtime == "apptainer" and "://" not in c.image and not Path(c.image).exists():
        errors.append(f"environment.container.image: {c.image} does not exist (an Apptainer image file, or a URI "
                      f"such as docker://...)")
    for i, mount in enumerate(c.mounts):
        host, _, guest = mount.partition(":")
        guest = guest or host
        if not host.startswith("/") or not guest.startswith("/") or guest.count(":") or "," in mount:
            errors.append(f"environment.container.mounts[{i}]: expected host:container with absolute paths and no "
                          f"comma, got {mount!r}")
    if not c.python.strip() or "\n" in c.python:
        errors.append(f"environment.container.python: expected the interpreter's name or path, got {c.python!r}")
