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

import getpass
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..base.errors import UserError
from ..base.secrets import REDACTED, is_secret_name, redact_text
from ..config.environment import Container, Environment

REQUEUE_OUTSIDE = "QARAC_REQUEUE_OUTSIDE"
"""Set in a job whose trials run in a container: on SLURM's warning a trial saves and exits
PREEMPTED_EXIT, and the job's script requeues it (no SLURM command runs in the image)."""
PREEMPTED_EXIT = 3


@dataclass(frozen=True)
class Launch:
    """How a trial's Python starts: the argv before `-u -m ...` (the sweep's interpreter, or the
    container's through its runtime), and srun's own flags for it (pyxis)."""

    python: tuple[str, ...] = (sys.executable,)
    srun: tuple[str, ...] = ()
    container: bool = False


def launch(env: Environment, paths: Iterable[str], cwd: str | None = None, source: str = "") -> Launch:
    """The Launch of `env`; `paths`: what the trials read and write outside the image (with the
    working directory `cwd`, this process's: the sweep directory, data caches, a sqlite store;
    offline, the hub cache), mounted by their top-level directories, beside the container's own `mounts`. UserError,
    naming the file `source`, when the image cannot take them."""
    c = env.container
    if c is None:
        return Launch()
    cwd = cwd or os.getcwd()
    where = f"{source}: " if source else ""
    mounts = _mounts(c, [cwd, *paths, *([env.exported()["HF_HUB_CACHE"]] if env.hub_offline else [])], where)
    if c.runtime == "charliecloud":  # ch-run mounts onto directories the image has; it makes none
        missing = [m.partition(":")[2] for m in mounts
                   if not (Path(c.image) / m.partition(":")[2].lstrip("/")).is_dir()]
        if missing:
            raise UserError(f"{where}environment.container.image: {c.image} has no {missing[0]} to mount the trials' "
                            f"files onto; make that directory in the image, or move them (runs_dir, data.cache_dir, "
                            f"HF_HOME in environment.variables)")
    if c.runtime == "charliecloud":  # ch-run refuses to start without USER, which a job may not have
        return Launch(("env", f"USER={getpass.getuser()}", "ch-run", *(f"--bind={m}" for m in mounts), f"--cd={cwd}",
                       c.image, "--", c.python), container=True)
    if c.runtime == "apptainer":
        return Launch(("apptainer", "exec", "--nv", *(f"--bind={m}" for m in mounts), "--pwd", cwd, c.image,
                       c.python), container=True)
    return Launch((c.python,), (f"--container-image={c.image}", f"--container-mounts={','.join(mounts)}",
                                f"--container-workdir={cwd}"), container=True)


def trial_paths(root: Path, trials: list, tracking_uri: str | None) -> list[str]:
    """What the trials read and write outside a container's image: the sweep directory `root`,
    their data caches, a sqlite store."""
    paths = [str(root), *{str(t.config["data"]["cache_dir"]) for t in trials}]
    uri = tracking_uri or ""
    return paths + ([uri.removeprefix("sqlite:///")] if uri.startswith("sqlite:///") else [])


def _mounts(c: Container, paths: list[str], where: str) -> list[str]:
    """Each path's top-level directory (the path itself under one the image has of its own:
    /var/tmp/runs, not /var), the same inside, then the container's own mounts; UserError when
    one of those would hide a path the trials need."""
    needed = [Path(p).resolve() for p in paths]
    binds = {str(p) if "/" + p.parts[1] in SYSTEM else "/" + p.parts[1] for p in needed if len(p.parts) > 1}
    own = [m if ":" in m else f"{m}:{m}" for m in c.mounts]
    for mount in own:
        host, _, guest = mount.partition(":")
        hidden = next((p for p in needed if host != guest and (str(p) == guest or str(p).startswith(guest + "/"))),
                      None)
        if hidden is not None:
            raise UserError(f"{where}environment.container.mounts: {mount} would hide {hidden}, which the trials need "
                            f"inside; mount it elsewhere")
    guests = {m.partition(":")[2] for m in own}
    return [*(f"{b}:{b}" for b in sorted(binds) if b not in guests), *own]


SYSTEM = {"/usr", "/etc", "/bin", "/lib", "/lib64", "/sbin", "/proc", "/sys", "/dev", "/var", "/opt"}
"""Top-level directories the image has its own of: never mounted over."""

_FAIL_FUNCTION = ('qarac_setup_failed() { echo "qarac_dist: error: environment.setup[$1] failed with exit code $2: '
                  '$3" >&2; exit "$2"; }')


def job_lines(env: Environment, exports_none: bool = False, shown: bool = False) -> list[str]:
    """The lines a job's script runs before its command; `exports_none`: the job is submitted
    with `--export` (its steps would get nothing); `shown`: for people (secrets masked)."""
    lines = [_FAIL_FUNCTION] if env.setup else []
    for n, line in enumerate(env.setup):
        lines += [f"{{ {redact_text(line) if shown else line}",
                  f"}} || qarac_setup_failed {n} $? {shlex.quote(redact_text(line))}"]
    for name, value in env.exported().items():
        lines.append(f"export {name}={shlex.quote(_shown(name, str(value)) if shown else str(value))}")
    if exports_none:
        lines.append("export SLURM_EXPORT_ENV=ALL  # steps get this environment, whatever --export the job had")
    return lines


def _shown(name: str, value: str) -> str:
    return REDACTED if is_secret_name(name) else redact_text(value)


def job_parameters(env: Environment, extra_sbatch: dict, run: Launch, steps: bool = False,
                   shown: bool = False) -> dict:
    """submitit's job parameters for them: `setup` (job_lines), and where a job's trials run in
    a container under srun (not `steps`: a packed job's runner starts them and requeues itself),
    pyxis's `srun_args` and the `teardown` that requeues a trial saved on SLURM's warning (it
    exits PREEMPTED_EXIT; the image has no scontrol)."""
    setup = job_lines(env, "export" in (extra_sbatch or {}), shown)
    params: dict = {"setup": setup} if setup else {}
    if run.container and not steps:
        params["setup"] = [*setup, f"export {REQUEUE_OUTSIDE}=1"]
        params["teardown"] = [f'code=$?; if [ "$code" -eq {PREEMPTED_EXIT} ]; then scontrol requeue "$SLURM_JOB_ID"; '
                              f'fi; exit "$code"']
    if run.srun and not steps:
        params["srun_args"] = list(run.srun)
    return params


SETUP_TIMEOUT_S = 600
"""How long the setup lines may take before a local trial (a line that waits on a terminal)."""
FAILED_BEFORE = "QARAC_SETUP_FAILED"
"""Set for a local job whose setup line failed: the job says that line and exits (fail_early)."""


def _write(file, text: str) -> str:
    file.write(text)
    file.flush()
    return file.name


_SHELLS_OWN = ("_", "SHLVL", "PWD", "OLDPWD", "LINES", "COLUMNS")
"""What bash sets of its own: not a change the lines made."""


def local_python(env: Environment, run: Launch) -> str:
    """The command that starts a local job's tasks: `run.python` under `env` with what the
    setup lines and the variables change (run now by bash, as a job's script would), or, when a
    line fails, with FAILED_BEFORE naming it."""
    python = list(run.python)
    if not env.setup and not env.exported():
        return shlex.join(python)
    # What the lines print goes to stderr; the environment they leave, to the saved stdout (by
    # env's own path: a line may have unset PATH). A file, not -c: a line may be long.
    script = "\n".join(["exec 3>&1 1>&2", *job_lines(env), f"{shlex.quote(shutil.which('env') or 'env')} -0 >&3"])
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as file, \
            subprocess.Popen(["bash", _write(file, script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True) as bash:
        try:
            out, err = bash.communicate(timeout=SETUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # the lines' own children too, which hold the pipes
            os.killpg(bash.pid, signal.SIGKILL)
            bash.communicate()
            out, err = b"", b"qarac_dist: error: environment.setup did not finish within %d s" % SETUP_TIMEOUT_S
    if bash.returncode == 0 and not out:  # `exit 0` in a line: the shell ended before env could say anything
        bash.returncode, err = 1, b"qarac_dist: error: environment.setup ended the shell (exit) before the trial"
    if bash.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        said = [line for line in lines if "environment.setup" in line]
        failed = said[-1] if said else (f"qarac_dist: error: environment.setup failed with exit code "
                                        f"{bash.returncode}: {redact_text(lines[-1] if lines else '')[:200]}")
        return shlex.join(["env", f"{FAILED_BEFORE}={failed}", *python])
    pairs = (item.partition("=") for item in out.decode(errors="replace").split("\0") if "=" in item)
    made = {name: value for name, _, value in pairs if name not in _SHELLS_OWN}
    gone = [f"--unset={name}" for name in os.environ if name not in made and name not in _SHELLS_OWN]
    changed = [f"{name}={value}" for name, value in made.items() if os.environ.get(name) != value]
    return shlex.join(["env", *gone, *changed, *python])


def fail_early() -> None:
    """In a local job: its setup line failed. Say it (the job's last error line) and exit 1."""
    import sys

    failed = os.environ.get(FAILED_BEFORE)
    if failed:
        print(failed, file=sys.stderr, flush=True)
        os._exit(1)
