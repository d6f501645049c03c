"""GPU-hours and CPU-hours a sweep used: the clocks its jobs keep, and their sums.

Every job that runs a trial (the trial's own job, or a step of a packed job) keeps a clock in
the trial's `usage.json` (track/trial_dir.py): one entry per job, with when its process began,
when it was last seen, and the GPUs and CPU cores the trial holds (the sweep's resources per
trial). Global rank 0 writes it when the job begins, every BEAT_S while it runs (a thread) and
when it ends; a job killed without a word counts to its last beat, at most BEAT_S short. A
packed job's runner keeps the same clock for its whole allocation (`usage/<job>.json` in the
sweep directory, base/layout.py): the time its slots stood empty is the allocation's GPU and
CPU seconds less its steps'.

Which figure is authoritative: where SLURM keeps accounting, `sacct` (submit/cluster.py). Its
elapsed time times what the job was allocated is what the site charges, from the allocation's
start to its end, so it holds what no trial's clock sees: setup lines and a container's start
before Python, a job that died before its trial began, the epilogue. The trials' clocks split
the total by the trials' states and find packing's idle slots, which sacct cannot; where there
is no accounting (the test cluster, a local sweep) they are the total.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..base.files import DamagedFile, read_json, write_json

BEAT_S = 30.0
GROUPS = ("completed", "pruned", "failed", "stopped", "running", "retraining", "idle", "outside")
"""How the hours are split: by the state of the attempt that used them (failed: failed, lost or
cancelled; stopped: saved and stopped, not resumed yet: Ctrl-C, scancel, a preemption; running:
pending or running); `retraining`: the chosen configuration trained again before the test
split (final.retrain, submit/retrain.py); `idle`: a packed job's empty slots; `outside`: what
sacct charged that no clock saw (set-up before Python, a job that died before its trial began)."""


def _process_start() -> float:
    """When this process began, by the wall clock, to a clock tick: its start tick in /proc
    against the uptime now. (psutil's create_time adds the tick to /proc/stat's boot time, in
    whole seconds, and reads up to a second early: a clock longer than SLURM's own allocation.)"""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            since_boot = float(uptime.read().split()[0])
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux
        import psutil

        return psutil.Process().create_time()


class Clock:
    """A job's entry in a usage file, kept current by a thread from `start` to `stop`. Its
    writes are best-effort: a full disk or a lost mount costs the record, never the job."""

    def __init__(self, path: Path, job: str, gpus: int, cpus: int, attempt: Optional[int] = None):
        self.path = Path(path)
        self.entry = {"job": job, "start": _process_start(), "seen": time.time(), "gpus": gpus, "cpus": cpus,
                      "attempt": attempt}
        self.others: list[dict] = []
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Clock":
        try:
            self.others = [e for e in _entries(read_json(self.path)) if e["start"] != self.entry["start"]]
        except DamagedFile:  # kept aside for a person to read; the clock starts a new file
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path.with_name(self.path.name + ".damaged"))
        except OSError:
            pass
        self._write()
        self._thread = threading.Thread(target=self._beat, name="qarac-usage-clock", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        self.entry["ended"] = True
        self._write()

    def _beat(self) -> None:
        while not self._stopped.wait(BEAT_S):
            self._write()

    def _write(self) -> None:
        self.entry["seen"] = time.time()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"jobs": [*self.others, dict(self.entry)]}, compact=True)
        except (OSError, DamagedFile):
            pass


_MAX_S = 10 * 365 * 86400
"""No job runs ten years: a longer entry is damage, not time."""
_MAX_HELD = 1 << 40
"""GPUs or cores of one entry at most: past any machine, and the sums stay finite."""


def _entries(data: Optional[dict]) -> list[dict]:
    """The well-formed entries of a usage file (a damaged or foreign one has none)."""
    jobs = data.get("jobs") if isinstance(data, dict) else None
    return [e for e in jobs if _valid(e)] if isinstance(jobs, list) else []


def _valid(e) -> bool:
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    return (isinstance(e, dict) and isinstance(e.get("job"), str) and number(e.get("start")) and number(e.get("seen"))
            and 0 <= e["seen"] - e["start"] <= _MAX_S and all(type(e.get(k)) is int and 0 <= e[k] <= _MAX_HELD
                                                              for k in ("gpus", "cpus"))
            and (e.get("attempt") is None or type(e["attempt"]) is int))


def entries(path: Path) -> list[dict]:
    """The jobs a usage file records; none where it is missing or damaged."""
    try:
        return _entries(read_json(path))
    except (DamagedFile, OSError):
        return []


def settle(paths: list[Path], timeout_s: float = 30.0) -> None:
    """Wait until each of these clocks that is still beating has ended (a packed job's runner
    stops its clock a moment after its last step), at most `timeout_s`; one that has not beaten
    for longer than a beat was killed without a word and is not waited on."""
    deadline = time.monotonic() + timeout_s

    def beating() -> bool:
        fresh = time.time() - BEAT_S - 5
        return any(not e.get("ended") and e["seen"] >= fresh for path in paths for e in entries(path))

    while beating() and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclass
class Used:
    """Seconds of GPUs and of CPU cores, by GROUPS."""

    gpu_s: Counter = field(default_factory=Counter)
    cpu_s: Counter = field(default_factory=Counter)
    source: str = "the trials' clocks"
    clocks: Optional["Used"] = None
    """Where `source` is sacct: what the trials' clocks say."""

    def hours(self, kind: str, group: Optional[str] = None) -> float:
        seconds = self.gpu_s if kind == "gpu" else self.cpu_s
        return (seconds[group] if group else sum(seconds.values())) / 3600

    def metrics(self) -> dict[str, float]:
        """The parent run's: gpu_hours, cpu_hours, and each by group."""
        out = {}
        for kind in ("gpu", "cpu"):
            out[f"{kind}_hours"] = self.hours(kind)
            out.update({f"{kind}_hours_{g}": self.hours(kind, g) for g in GROUPS})
            if self.clocks is not None:
                out[f"{kind}_hours_trial_clocks"] = self.clocks.hours(kind)
        return out


def used(trials: Iterable[tuple[Path, dict, str]], job_files: Iterable[Path]) -> Used:
    """Sum the clocks of the trials (usage file, the GROUPS name of each of its attempts, that of
    any other) and of the packed jobs' allocations: an attempt's hours go to its own group (a
    failed attempt's to failed, though a later one completed)."""
    out = Used()
    steps: dict[str, list[float]] = {}
    for path, groups, default in trials:
        for e in entries(path):
            group = groups.get(e.get("attempt"), default)
            seconds = e["seen"] - e["start"]
            out.gpu_s[group] += seconds * e["gpus"]
            out.cpu_s[group] += seconds * e["cpus"]
            job, dot, _ = e["job"].rpartition(".")
            if dot:  # a step of packed job `job`
                held = steps.setdefault(job, [0.0, 0.0])
                held[0] += seconds * e["gpus"]
                held[1] += seconds * e["cpus"]
    for path in job_files:
        allocated = [sum((e["seen"] - e["start"]) * e[k] for e in entries(path)) for k in ("gpus", "cpus")]
        held = steps.get(path.stem, [0.0, 0.0])
        out.gpu_s["idle"] += max(0.0, allocated[0] - held[0])
        out.cpu_s["idle"] += max(0.0, allocated[1] - held[1])
    return out


def summary_line(u: Used, requested: dict) -> str:
    """One line for people: what was used, split, against what was requested at most."""
    kind = "gpu" if u.hours("gpu") > 0 or requested.get("gpu_hours") else "cpu"
    name = "GPU" if kind == "gpu" else "CPU"
    names = {"stopped": "stopped, not resumed", "retraining": "trained again for the test split",
             "idle": "idle packed slots", "outside": "outside the trials' clocks"}
    split = ", ".join(f"{names.get(g, g)} {u.hours(kind, g):.3f}" for g in GROUPS if u.hours(kind, g) > 0) or "none"
    bound = f" of at most {requested[f'{kind}_hours']:.3f} requested" if requested.get(f"{kind}_hours") else ""
    other = "CPU" if kind == "gpu" else "GPU"
    clocks = f"; the trials' clocks say {u.clocks.hours(kind):.3f}" if u.clocks is not None else ""
    return (f"used {u.hours(kind):.3f} {name}-hours{bound} ({split}; by {u.source}{clocks}), "
            f"{u.hours('cpu' if kind == 'gpu' else 'gpu'):.3f} {other}-hours")
