"""What the sweep file's `environment:` (config/environment.py) makes every job run, in one place
for the three ways a trial starts: the lines of a SLURM job's script before its command (array
jobs, packed jobs before their runner starts any step, the micro-batch search's jobs: submitit's
`setup`), and the environment of a local trial (the same lines run by bash before it starts).

- Each setup line runs as written, in the job's own shell (so `module load`, `conda activate`
  and `export` reach what follows). One that fails stops the job at once, its exit code kept,
  after a line in the job's log naming it (`status` and the summary show a job's last error
  line): `{ LINE` on one line, `} || qarac_setup_failed N $? 'LINE'` on the next, so a comment
  or a `;` in LINE cannot escape the check.
- The variables are exported after the setup lines, so they win over what a module sets.
- A job submitted with `--export` (extra_sbatch; NONE is a common site default) starts with
  almost no environment, and SLURM then sets SLURM_EXPORT_ENV for its steps too: srun's tasks
  lost even the variables the job's own script exports (submitit's SUBMITIT_EXECUTOR), and
  every trial died ("Could not figure out which environment the job is running in"). The script
  sets SLURM_EXPORT_ENV=ALL after its setup, so steps get what the script built.

Secrets: a value or line that looks secret (base/secrets.py) is written as given into the job's
script (the job needs it) but masked where people read: `--dry-run`, and the failure line.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from ..base.secrets import REDACTED, is_secret_name, redact_text
from ..config.environment import Environment

_FAIL_FUNCTION = ('qarac_setup_failed() { echo "qarac_dist: error: environment.setup[$1] failed with exit code $2: '
                  '$3" >&2; exit "$2"; }')


def job_lines(env: Environment, exports_none: bool = False, shown: bool = False) -> list[str]:
    """The lines a job's script runs before its command; `exports_none`: the job is submitted
    with `--export` (its steps would get nothing); `shown`: for people (secrets masked)."""
    lines = [_FAIL_FUNCTION] if env.setup else []
    for n, line in enumerate(env.setup):
        lines += [f"{{ {redact_text(line) if shown else line}",
                  f"}} || qarac_setup_failed {n} $? {shlex.quote(redact_text(line))}"]
    for name, value in env.variables.items():
        lines.append(f"export {name}={shlex.quote(_shown(name, str(value)) if shown else str(value))}")
    if exports_none:
        lines.append("export SLURM_EXPORT_ENV=ALL  # steps get this environment, whatever --export the job had")
    return lines


def _shown(name: str, value: str) -> str:
    return REDACTED if is_secret_name(name) else redact_text(value)


def sbatch_setup(env: Environment, extra_sbatch: dict, shown: bool = False) -> list[str]:
    """job_lines for a SLURM job of these sbatch options."""
    return job_lines(env, "export" in (extra_sbatch or {}), shown)


FAILED_BEFORE = "QARAC_SETUP_FAILED"
"""Set for a local job whose setup line failed: the job says that line and exits (fail_early)."""


def local_python(env: Environment, python: str) -> str:
    """The command that starts a local job's tasks: `python` under `env` with what the setup
    lines and the variables change (run now by bash, as a job's script would), or, when a line
    fails, with FAILED_BEFORE naming it."""
    if not env.setup and not env.variables:
        return shlex.quote(python)
    script = "\n".join([*job_lines(env), "env -0"])
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=600)
    if proc.returncode != 0:
        said = [line for line in proc.stderr.decode(errors="replace").splitlines() if "environment.setup[" in line]
        failed = said[-1] if said else f"qarac_dist: error: environment.setup failed with exit code {proc.returncode}"
        return shlex.join(["env", f"{FAILED_BEFORE}={failed}", python])
    pairs = (item.partition("=") for item in proc.stdout.decode(errors="replace").split("\0") if "=" in item)
    made = {name: value for name, _, value in pairs if name not in ("_", "SHLVL", "PWD", "OLDPWD")}
    gone = [f"--unset={name}" for name in os.environ if name not in made and name not in ("_", "SHLVL", "PWD")]
    changed = [f"{name}={value}" for name, value in made.items() if os.environ.get(name) != value]
    return shlex.join(["env", *gone, *changed, python])


def fail_early() -> None:
    """In a local job: its setup line failed. Say it (the job's last error line) and exit 1."""
    import sys

    failed = os.environ.get(FAILED_BEFORE)
    if failed:
        print(failed, file=sys.stderr, flush=True)
        os._exit(1)
