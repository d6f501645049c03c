"""The chosen configuration trained again before its one look at the test set (the sweep file's
`final: {retrain: true}`, config/choice.py). Each of its seeds that finished is trained anew
from its own seed on train + validation together, for as many steps as its best model had (on
the trial's learning-rate schedule, which still runs to training.max_steps), and the model of
that last step is what the test split evaluates (submit/final.py). Nothing is held out, so
nothing is validated: no early stopping, no rungs.

A retraining is a trial's job in all but its data and its end (`RetrainJob` is a TrialJob: the
trial's resources, ranks, environment, container and requeue on SLURM's warning), in a folder
of its own, `retrain/<trial id>-<steps>/` (base/layout.py): a re-run finds it complete and does
not train it again, a stopped one resumes from its checkpoint. It is not tracked in MLflow (its
losses are in its metrics.jsonl, its model in last/); the test metrics reach the parent run as
without it. Its clock's hours are in the sweep's used-hours line, as `retraining`.

Which seed a job trains is found in the job, from the trials' own files once they have all
ended: the chosen configuration's finished seeds in trial-id order, the job's index in them
(an index past them, a seed that failed, trains nothing). So with SLURM the jobs are submitted
with the trials, as an array held by `--dependency=afterany` on every job of the sweep, and the
final job waits for the array; locally the driver runs them after the last trial.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from ..base.files import DiskFull
from ..base.layout import SweepLayout
from ..base.secrets import redact_text
from ..track.trial_dir import TrialDir, TrialState
from . import sbatch, stopping
from .executors import Executor, TrialJob
from .report import chosen_seeds
from .states import refresh
from .sweep_dir import FINAL_CANCELS, Manifest, cancelled_final, record_cancels


def steps(manifest: Manifest, configs: dict[str, dict], chosen: dict[str, Optional[int]]) -> list[tuple[str, int]]:
    """The chosen seeds (trial id -> its best model's step) in trial-id order, each with the
    steps it is trained for: its best model's, max_steps where the trial did not record it."""
    return [(tid, step if step is not None else _config(manifest, configs, tid)["training"]["max_steps"])
            for tid, step in sorted(chosen.items())]


def seeds(layout: SweepLayout, configs: dict[str, dict]) -> tuple[Manifest, list[tuple[str, int]]]:
    """The manifest as its files say (every job of the sweep has ended), and `steps` of its choice."""
    manifest = Manifest.load(layout.root)
    refresh(manifest, lambda _jobs: {}, layout)
    return manifest, steps(manifest, configs, chosen_seeds(manifest)[1])


def _config(manifest: Manifest, configs: dict[str, dict], tid: str) -> dict:
    return configs.get(tid) or manifest.trials[tid].config


def folder(layout: SweepLayout, tid: str, steps: int) -> TrialDir:
    """The retraining of trial `tid` for `steps` steps: a trial directory of its own."""
    return TrialDir(layout.retrained(tid, steps))


def trained(layout: SweepLayout, tid: str, steps: int) -> bool:
    """Whether that retraining completed and exported its model."""
    trial = folder(layout, tid, steps)
    status = trial.status()
    return status is not None and status.state == TrialState.COMPLETED and trial.last_info() is not None


def failure(layout: SweepLayout, tid: str, steps: int) -> str:
    """Why that retraining left no model, in a line."""
    status = folder(layout, tid, steps).status()
    if status is None:
        why = "never started"
    elif status.state == TrialState.RUNNING:  # its job ended, and it never said how
        why = f"stopped without a word (killed outright: out of memory, a signal; its job's log is in {layout.submitit})"
    else:
        why = f"ended {status.state.value}" + (f": {status.error}" if status.error else "")
    return f"the retraining of trial {tid} ({steps} steps) {why}"


class RetrainJob(TrialJob):
    """The retraining of the chosen configuration's seed number `index` (trial-id order)."""

    def __init__(self, root: str, configs: dict[str, dict], index: int, executor: Executor):
        super().__init__({}, {}, executor.resources.cpus_per_task, executor.max_requeues)
        self.root, self.configs, self.index, self.kind = root, configs, index, executor.kind
        self.held = sbatch.held(executor.resources)
        """The GPUs and CPU cores it holds, for its clock (track/usage.py: the sweep's hours)."""

    def __call__(self) -> Optional[dict]:
        layout = SweepLayout(Path(self.root))
        manifest, found = seeds(layout, self.configs)
        if self.index >= len(found):
            return None  # fewer seeds finished than the configuration has
        tid, steps = found[self.index]
        if trained(layout, tid, steps):
            return None
        config = _config(manifest, self.configs, tid)
        self.config = {**config, "name": f"{config['name']}-retrain", "asha": None,
                       "output": {**config["output"], "dir": str(folder(layout, tid, steps).path),
                                  "export_best": False, "export_last": True},
                       "tracking": {**config["tracking"], "uri": None}}
        self.context = {"retrain_steps": steps, "tags": {"trial_id": tid, "executor": self.kind},
                        "sweep_dir": self.root, "gpus": self.held[0], "cpus": self.held[1]}
        return super().__call__()


def run_here(executor: Executor, manifest: Manifest, layout: SweepLayout, configs: dict[str, dict],
             chosen: list[tuple[str, int]], at_once: int) -> Optional[str]:
    """Locally, after the last trial: the retraining of each `chosen` seed (`steps`) not trained
    yet, `at_once` jobs at a time, waited for. The jobs are named in the manifest
    (`final_job["retrain"]`) from their start to their end: `--cancel` stops them, and a run after
    a driver that was killed waits for those still running before it starts any (never one
    twice). Stopped (stopping.Stopped, KeyboardInterrupt), even as they start, they are asked to
    save (a re-run resumes them) and the stop is raised again. Returns why they did not all
    end (`--cancel`, a job that could not start), in a line; None when they did."""
    earlier = _leftover(executor, manifest)
    if earlier:
        print(f"final: waiting for the retraining job(s) {', '.join(earlier)} that an earlier run started", flush=True)
        if not _wait(executor, manifest, layout, earlier):
            return CANCELLED
    if cancelled_final(layout.root):  # an earlier --cancel's: it names no job of this run
        record_cancels(layout.root, {FINAL_CANCELS: []})
    todo = [k for k, (tid, n) in enumerate(chosen) if not trained(layout, tid, n)]
    for start in range(0, len(todo), max(1, at_once)):
        calls = [RetrainJob(str(layout.root.resolve()), configs, k, executor) for k in todo[start:start + max(1, at_once)]]
        jobs: list[str] = []
        with stopping.held() as stops:  # a stop as they start stops them once they are named
            try:
                for call in calls:  # each named as it starts: a later one that cannot start leaves none unseen
                    jobs += [job.job_id for job in executor.submit([call])]
                    _name(manifest, layout, jobs)
            except Exception as err:  # noqa: BLE001 - a full disk, a setup line that fails: said in one line
                stopping.halt(executor, jobs)
                _name(manifest, layout, [])
                return f"the retraining could not start: {type(err).__name__}: {redact_text(str(err))[:300]}"
            print(f"final: training the chosen configuration again on train + validation: "
                  f"{len(jobs)} seed(s), job(s) {', '.join(jobs)}", flush=True)
        if not _wait(executor, manifest, layout, jobs, stopped=bool(stops)):
            return CANCELLED
    return None


CANCELLED = "the retraining was cancelled (--cancel)"


def stop_leftover(executor: Executor, manifest: Manifest, layout: SweepLayout) -> None:
    """Locally, in a run that trains nothing again (final.retrain off, or no final): retrainings
    a killed driver left running are stopped (saved), said in a line."""
    jobs = _leftover(executor, manifest)
    if jobs:
        print(f"final: stopping the retraining job(s) {', '.join(jobs)} that an earlier run started (this run trains "
              f"nothing again)", file=sys.stderr)
        stopping.halt(executor, jobs)
        _name(manifest, layout, [])


def _leftover(executor: Executor, manifest: Manifest) -> list[str]:
    named = manifest.retrain_jobs()
    live = executor.live(named) if named else set()
    return [job for job in named if job in live]


def _name(manifest: Manifest, layout: SweepLayout, jobs: list[str]) -> None:
    """The retraining jobs that run (none once they have ended), in the manifest."""
    manifest.final_job = {"retrain": jobs} if jobs else {}
    try:
        manifest.save(layout.root)
    except (OSError, DiskFull) as err:  # waited for all the same; only a killed driver's re-run would miss them
        print(f"final: could not name the retraining jobs in the manifest: {err}", file=sys.stderr)


def _wait(executor: Executor, manifest: Manifest, layout: SweepLayout, jobs: list[str], stopped: bool = False,
          poll_s: float = 1.0) -> bool:
    """Until `jobs` have ended (at once stopped, if `stopped`); False when `--cancel` stopped them."""
    try:
        if stopped:
            raise stopping.Stopped()
        while any(executor.alive(job) for job in jobs):
            time.sleep(poll_s)
    except BaseException:
        stopping.halt(executor, jobs)
        print("final: stopped; the retraining saved where it could, and the next run resumes it", file=sys.stderr)
        raise
    finally:
        if not any(executor.alive(job) for job in jobs):
            _name(manifest, layout, [])
    cancelled = set(jobs) & set(cancelled_final(layout.root))
    if cancelled:
        record_cancels(layout.root, {FINAL_CANCELS: []})  # seen: it must cancel nothing a later run starts
    return not cancelled
