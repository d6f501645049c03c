"""Asking the SLURM cluster: is it there, what does it allow, what state are the jobs in.

Small subprocess calls (sbatch --test-only, scontrol, sacct, squeue, scancel), no torch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

from ..base.errors import UserError

# Job states, normalized. SLURM's names are kept; these say what they mean to a sweep.
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
REQUEUED = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
SQUEUE_TIMEOUT_S = 60
"""Past this, a squeue that has not answered is a failure (the controller is overloaded or gone)."""


def available() -> bool:
    return shutil.which("sbatch") is not None


def max_array_size(default: int = 1001) -> int:
    """The cluster's MaxArraySize: array indices must stay below it."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return default
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(match.group(1)) if match else default


def test_submission(text: str) -> Optional[str]:
    """Ask sbatch whether it would accept the script (`--test-only`): None, or its refusal as one line."""
    proc = subprocess.run(["sbatch", "--test-only"], input=text, capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines or [f"exit code {proc.returncode}"]
    return errors[-1]


class SchedulerUnavailable(UserError):
    """squeue failed or timed out: the jobs' states are unknown, which is not the same as gone.
    A command stops on it in one line with EX_TEMPFAIL (75: try again later), having submitted
    and taken over nothing."""

    exit_code = 75


class Patience:
    """Who asks the scheduler again after it failed: not before a wait that doubles with each
    failure (5 s to 5 min), saying so once per failure; meanwhile the answer is `unknown`. An
    answer to the same question is kept `remember_s` (a runner at the end of a sweep would
    otherwise ask every second)."""

    def __init__(self, ask: Callable, unknown: Callable, clock: Callable[[], float] = time.monotonic,
                 remember_s: float = 0.0):
        """`unknown(*args)`: the answer while the scheduler cannot tell."""
        self.ask, self.unknown, self.clock, self.remember_s = ask, unknown, clock, remember_s
        self.wait_s, self.until = 0.0, 0.0
        self.last: Optional[tuple] = None
        """(question, answer, when) of the last answer."""

    def waiting(self) -> bool:
        """The scheduler failed and is not asked again yet."""
        return self.clock() < self.until

    def __call__(self, *args):
        if self.waiting():
            return self.unknown(*args)
        if self.last is not None and self.last[0] == args and self.clock() - self.last[2] < self.remember_s:
            return self.last[1]
        try:
            answer = self.ask(*args)
        except SchedulerUnavailable as err:
            self.wait_s = min(300.0, max(5.0, 2 * self.wait_s))
            self.until = self.clock() + self.wait_s
            print(f"qarac_dist: {err}; asking again in {self.wait_s:.0f} s", file=sys.stderr, flush=True)
            return self.unknown(*args)
        self.wait_s, self.last = 0.0, (args, answer, self.clock())
        return answer


def all_may_run(job_ids: list[str]) -> set[str]:
    """What a Patience over `live` answers while the scheduler cannot tell: every job may run."""
    return set(job_ids)


def job_states(job_ids: list[str], finished: bool = True) -> dict[str, str]:
    """State of each job ("123" or array task "123_4"): sacct where accounting runs, else squeue
    (which forgets finished jobs; those are left out; `finished=False`: squeue alone, whether
    jobs still run being all that is asked). SchedulerUnavailable when squeue fails, times out or
    prints what is no job state: a job it did not list is then unknown, never taken for gone."""
    if not job_ids:
        return {}
    base_ids = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, str] = {}
    if finished and shutil.which("sacct"):  # it only adds jobs squeue forgot: one that fails or hangs is passed over
        try:
            proc = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(base_ids)],
                                  capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            proc = subprocess.CompletedProcess([], 1)
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                job, _, state = line.partition("|")
                states.update({j: state.split()[0] for j in _expand(job) if state.split()})
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(base_ids)],
                              capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SchedulerUnavailable(f"squeue did not answer ({type(err).__name__}: {err}): the jobs' states are "
                                   f"unknown, so none was taken for gone") from None
    # One job id that SLURM has purged is an error of squeue's: "Invalid job id specified".
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        raise SchedulerUnavailable(f"squeue failed ({first}): the jobs' states are unknown, so none was taken for "
                                   f"gone")
    lines = proc.stdout.splitlines()
    odd = next((line for line in lines if not SQUEUE_LINE.fullmatch(line.strip())), None)
    if odd is not None:  # an answer we cannot read is no answer: nothing is taken for gone on it
        raise SchedulerUnavailable(f"squeue printed a line that is no job state ({odd[:80]!r}): the jobs' states are "
                                   f"unknown, so none was taken for gone")
    for line in lines:  # squeue is current for live jobs; it wins over sacct
        job, _, state = line.strip().partition("|")
        states.update({j: state for j in _expand(job)})
    return {j: states[j] for j in job_ids if j in states}


def accounted(job_ids: list[str]) -> Optional[tuple[Optional[float], float]]:
    """GPU-seconds and CPU-seconds SLURM's accounting charged for the jobs: each run's elapsed
    time (requeues included, `--duplicates`) times its allocation (AllocTRES). None where there
    is no accounting, or it does not know every job; GPU-seconds None where it keeps no GPUs
    (AccountingStorageTRES without gres/gpu: no job's TRES names one)."""
    wanted = set(job_ids)
    if not wanted or not shutil.which("sacct"):
        return None
    base_ids = sorted({j.split("_")[0] for j in wanted})
    try:
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,ElapsedRaw,AllocTRES", "-j",
                               ",".join(base_ids)], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return charged(proc.stdout, wanted) if proc.returncode == 0 else None


def charged(text: str, wanted: set[str]) -> Optional[tuple[Optional[float], float]]:
    """What `sacct -P -o JobID,ElapsedRaw,AllocTRES` printed, summed over the `wanted` jobs."""
    gpu = cpu = 0.0
    seen: set[str] = set()
    gpus_kept = False
    for line in text.splitlines():
        job, elapsed, tres = (line.split("|") + ["", ""])[:3]
        if job.strip() not in wanted or not elapsed.strip().isdigit():
            continue
        held = {k: int(v) for k, v in (part.partition("=")[::2] for part in tres.split(",")) if v.isdigit()}
        gpus = held.get("gres/gpu", sum(v for k, v in held.items() if k.startswith("gres/gpu:")))  # typed only
        gpus_kept = gpus_kept or any(k == "gres/gpu" or k.startswith("gres/gpu:") for k in held)
        gpu += int(elapsed) * gpus
        cpu += int(elapsed) * held.get("cpu", 0)
        seen.add(job.strip())
    return (gpu if gpus_kept else None, cpu) if seen == wanted else None


SQUEUE_LINE = re.compile(r"\d+(?:_\d+|_\[[\d,%-]+\])?(?:\+\d+)?\|[A-Z_]+")
"""What `squeue -o %i|%T` prints per job: 123, 123_4, 123_[0-3%2] or a het job's 123+0, and a state."""


def _expand(job: str) -> list[str]:
    """`123_[0-3%2]` or `123_[1,4]` -> ids; anything else as it is (a range it cannot read too)."""
    match = re.fullmatch(r"(\d+)_\[([\d,%-]+)\]", job.strip())
    if not match:
        return [job.strip()]
    base, spec = match.groups()
    ids = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) - int(lo) > 1_000_000:
            return [job.strip()]
        ids += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def cancel(job_ids: list[str], signal: Optional[str] = None) -> None:
    """scancel the jobs (SLURM's SIGTERM, then SIGKILL after KillWait), or send them `signal`."""
    if job_ids:
        subprocess.run(["scancel", *([f"--signal={signal}", "--full"] if signal else []), *job_ids], check=False,
                       capture_output=True)
