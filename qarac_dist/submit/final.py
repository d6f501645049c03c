"""One look at the test set (the sweep file's `final:`, config/choice.py): once the sweep has
ended with a choice, each best model of the chosen configuration (one per seed that finished)
is evaluated on the test split, in a process of its own (train/final.py), and the mean and
standard deviation over them go on the parent run and into the summary.

It looks once per choice: `final.json` in the sweep directory (base/layout.py) holds every
choice it evaluated (the configuration, its seeds and their best steps, the split and its data
as the sweep file gives it now, with the test files' sizes and times), and a re-run that
chooses as before evaluates nothing. The file is written whole (atomic rename): a killed
evaluation leaves the earlier one or none; one that is damaged or not ours is said in a line
and evaluated again.

It looks only when no trial of the sweep file stopped before it ended (LOST, CANCELLED,
PREEMPTED, ...: a re-run resumes them and may choose otherwise); trials that failed on their own
are failed seeds. Locally it runs after the last trial, on the driver's machine. With SLURM it is a job of its
own (`FinalJob`, one node, one task, a GPU where the trials had one, in the sweep's environment
and container), submitted with the trials and held by `--dependency=afterany` on every job of
the sweep that may still run: it starts once they have all ended, however they ended, with no
one at a terminal. It finds the choice from the trials' own files, writes final.json and
nothing else: the store has one writer (track/outbox.py), so the test metrics reach the parent
run when a driver follows the sweep to its end (`--wait`) or `status --sync` runs after it.
A re-run that submits trials replaces a final job that has not ended (it would start before
them); one that submits none keeps it, unless the test split it was given has changed since.
With final.retrain the models evaluated are the seeds trained again (submit/retrain.py): locally
before the evaluation, with SLURM by an array of jobs that the final job waits for.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from ..base.files import DamagedFile, DiskFull, write_json
from ..base.layout import SweepLayout
from ..base.secrets import redact_text
from ..config.choice import Final
from . import retrain
from .cluster import ACTIVE, Patience
from .executors import Executor, SlurmArrays, stop_with_parent
from .report import chosen_seeds, digest, final_results, of_choice, split_digest
from .states import refresh
from .sweep_dir import RUNNING_STATES, Manifest, last_error

PREFIX = "qarac_dist: final: "


def _test_data(config: dict) -> dict:
    """The test split of a trial's config, as the choice records it: a changed one is evaluated again."""
    data = config.get("data") or {}
    files = [[f, *([os.stat(f).st_size, os.stat(f).st_mtime_ns] if os.path.isfile(f) else [])]
             for f in data.get("test_files") or []]
    return {"dataset": data.get("dataset"), "dataset_config": data.get("dataset_config"), "test_files": files,
            "num_test": (data.get("synthetic") or {}).get("num_test")}


def choice(manifest: Manifest, final: Final, configs: dict[str, dict]) -> Optional[dict]:
    """What the final evaluation tests: the chosen configuration's seeds that finished (trial id
    -> the step of its best model), with the split and its data as `configs` (trial id -> its
    config as the sweep file plans it now) give them; None without a choice."""
    configuration, seeds = chosen_seeds(manifest)
    if not seeds:
        return None
    first = configs.get(min(seeds)) or manifest.trials[min(seeds)].config
    return {"configuration": configuration, "seeds": seeds, "split": final.split, "data": _test_data(first),
            **({"retrain": True} if final.retrain else {})}


def latest(manifest: Manifest, layout: SweepLayout) -> Optional[dict]:
    """The newest result in final.json of the sweep's choice as its trials stand now (status
    --sync, which has no sweep file to plan the split from: a final job wrote it)."""
    return next(reversed(of_choice(_stored(layout), manifest)), None)


def _stored(layout: SweepLayout) -> list[dict]:
    """The results final.json holds; none (said in a line) when it is damaged or not ours."""
    try:
        return final_results(layout)
    except DamagedFile as err:
        print(f"{PREFIX}{err}; evaluating again", file=sys.stderr)
        return []


def evaluate(final: Final, manifest: Manifest, layout: SweepLayout, configs: dict[str, dict],
             train_here: Optional[Executor] = None, python: tuple = (sys.executable,)) -> Optional[dict]:
    """The test metrics of the sweep's choice: evaluated now, or read from `final.json` when
    this choice was evaluated before; None when there is no choice or the evaluation failed
    (said in one line). With final.retrain the seeds are trained again first, by `train_here`
    (locally; a SLURM final job finds them trained by the jobs it waited for)."""
    chosen = choice(manifest, final, configs)
    if chosen is None:
        print(f"{PREFIX}the sweep chose no configuration; the test split was not read", file=sys.stderr)
        return None
    stored = _stored(layout)
    done = [r for r in stored if r["choice"] == chosen]
    if done:  # looked at before: nothing is read now
        if stored[-1] is not done[0]:  # the latest is the current choice's: the summary shows it
            _keep(layout, [r for r in stored if r is not done[0]] + done[:1])
        return done[0]
    if stopped := _stopped_early(manifest):
        print(f"{PREFIX}the test split is not read while trials stopped before they ended ({stopped}): a run of the "
              f"sweep that finishes them may choose another configuration; run the sweep again", file=sys.stderr)
        return None
    models = {tid: manifest.trials[tid].trial_dir.best for tid in chosen["seeds"]}
    if final.retrain:
        trains = retrain.steps(manifest, configs, chosen["seeds"])
        why = retrain.run_here(train_here.one_trial_a_job(), manifest, layout, configs, trains,
                               train_here.resources.max_parallel) if train_here is not None else None
        if why:
            print(f"{PREFIX}{why}; the test split was not read", file=sys.stderr)
            return None
        steps = dict(trains)
        missing = [retrain.failure(layout, tid, steps[tid]) for tid in sorted(steps)
                   if not retrain.trained(layout, tid, steps[tid])]
        if missing:
            print(f"{PREFIX}{missing[0]}; the test split was not read (the next run trains it again)", file=sys.stderr)
            return None
        models = {tid: retrain.folder(layout, tid, steps[tid]).last for tid in chosen["seeds"]}
    request = {"split": final.split, "trials": [{"id": tid, "config": configs.get(tid, manifest.trials[tid].config),
                                                 "best": str(models[tid])} for tid in sorted(chosen["seeds"])]}
    try:
        proc = subprocess.run([*python, "-m", "qarac_dist.train.final"], input=json.dumps(request),
                              capture_output=True, text=True, preexec_fn=stop_with_parent)
    except BaseException:  # stopped (Ctrl-C, SIGTERM, SIGHUP): subprocess.run killed the evaluation; nothing kept
        print(f"{PREFIX}interrupted; the test split was not evaluated (the next run evaluates it)", file=sys.stderr)
        raise  # the sweep command exits 130, as for any interrupted command
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)] or \
            proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        print(f"{PREFIX}the evaluation on {final.split!r} failed: {redact_text(lines[-1].removeprefix(PREFIX))}",
              file=sys.stderr)
        return None
    out = json.loads(proc.stdout)
    result = {"choice": chosen, "digest": digest(chosen), "rows": out["rows"], "seeds": out["metrics"],
              **summarize(out["metrics"])}
    _keep(layout, [*stored, result])
    return result


STOPPED_EARLY = {"PREEMPTED", "CANCELLED", "LOST", "NODE_FAIL", "BOOT_FAIL"}
"""Ends that came from outside a trial, which a re-run resumes (the trial's own failures,
FAILED, OUT_OF_MEMORY, TIMEOUT, are failed seeds: the choice is made without them)."""


def _stopped_early(manifest: Manifest) -> str:
    """`LOST: 2, CANCELLED: 1`: the sweep's trials that stopped before they ended, or still run."""
    counts = Counter(r.state for r in manifest.trials.values()
                     if not r.retired and (r.state in STOPPED_EARLY or r.state in RUNNING_STATES))
    return ", ".join(f"{state}: {n}" for state, n in sorted(counts.items()))


def _keep(layout: SweepLayout, results: list[dict]) -> None:
    try:
        write_json(layout.final, {"results": results})
    except (OSError, DiskFull) as err:  # shown and on the parent run; the next run evaluates again
        print(f"{PREFIX}could not keep the result in {layout.final}: {err}", file=sys.stderr)


def summarize(per_seed: dict[str, dict[str, float]]) -> dict:
    """Mean and sample standard deviation (None below two seeds) of each metric over the seeds."""
    names = sorted({k for metrics in per_seed.values() for k in metrics})
    values = {k: [m[k] for m in per_seed.values() if k in m] for k in names}
    return {"mean": {k: statistics.fmean(v) if all(math.isfinite(x) for x in v) else math.nan
                     for k, v in values.items()},
            "std": {k: statistics.stdev(v) if len(v) > 1 and all(math.isfinite(x) for x in v) else None
                    for k, v in values.items()}}


class FinalJob:
    """The final evaluation as a SLURM job. Every job it waited for has ended, so the trials'
    own files say all there is (a container has no SLURM commands to ask)."""

    def __init__(self, root: str, final: Final, configs: dict[str, dict]):
        self.root, self.final, self.configs = root, final, configs

    def __call__(self) -> str:
        layout = SweepLayout(Path(self.root))
        manifest = Manifest.load(layout.root)
        refresh(manifest, lambda _jobs: {}, layout)
        result = evaluate(self.final, manifest, layout, self.configs)
        if result is None:
            raise SystemExit(1)  # the line above says why
        if result["digest"] not in {r["digest"] for r in _stored(layout)}:  # all there was to keep it: the log
            print(f"{PREFIX}looked at, but not kept: test {json.dumps(result['mean'])} over {len(result['seeds'])} "
                  f"seed(s) of configuration {result['choice']['configuration']}", file=sys.stderr)
            raise SystemExit(1)
        return result["digest"]


def given(final: Final, configs: dict[str, dict]) -> str:
    """How the sweep file says to test its choice now (the split's name and data, retrain): what
    a final job is given that a re-run may change."""
    return split_digest({"split": final.split, "data": _test_data(configs[min(configs)]), "retrain": final.retrain})


def schedule(executor: SlurmArrays, manifest: Manifest, layout: SweepLayout, final: Final, configs: dict[str, dict],
             submitted: bool, repeats: int = 1) -> Optional[str]:
    """With SLURM: the final evaluation as a job after every job of the sweep that may still run
    (`submitted`: this run submitted trials); with final.retrain, after an array of `repeats`
    retrainings (submit/retrain.py) that waits for those jobs. None is submitted when the sweep
    has ended and final.json holds its choice, or while an earlier one may still run for the
    same split. Returns the line that names the jobs submitted."""
    live = sorted(executor.live(sorted({job for r in manifest.trials.values() for job in r.jobs})))
    earlier, now = manifest.final_job.get("id"), given(final, configs)
    replaced = ""
    if earlier and executor.alive(earlier):
        if not submitted and manifest.final_job.get("given") == now:
            return None
        executor.cancel(jobs(manifest), at_once=True)
        replaced = f"; job {earlier}, which would have evaluated before it or another split, is cancelled"
    if not live:
        chosen = choice(manifest, final, configs)
        if chosen is None or any(r["choice"] == chosen for r in _stored(layout)):
            return f"cancelled: SLURM job {earlier}; final.json holds this choice's result" if replaced else None
    root, trains = str(layout.root.resolve()), []
    if final.retrain:
        unpacked = executor.one_trial_a_job()
        trains = [j.job_id for j in unpacked.submit([
            retrain.RetrainJob(root, configs, k, unpacked) for k in range(repeats)], after=live)]
    job = executor.submit_after(FinalJob(root, final, configs), trains or live)
    manifest.final_job = {"id": job, "given": now, **({"retrain": trains} if trains else {})}
    manifest.save(layout.root)
    after = f" after job(s) {', '.join(live)} (afterany)" if live else ""
    training = f"SLURM job(s) {', '.join(trains)} train the chosen configuration again{after}; " if trains else ""
    return (f"submitted: {training}SLURM job {job}, the evaluation on the split {final.split!r}"
            f"{f' after them' if trains else after}{replaced}")


def jobs(manifest: Manifest) -> list[str]:
    """The final job and the retrainings it waits for (locally: the retrainings the driver runs),
    as the manifest names them."""
    job = manifest.final_job.get("id")
    return [*([job] if isinstance(job, str) and job else []), *manifest.retrain_jobs()]


def waiting(manifest: Manifest, executor: Executor) -> Optional[str]:
    """`final: the test split's evaluation: job 814 PENDING`, for status: the final evaluation's
    jobs (and retrainings) that may still run; None when none may."""
    named = jobs(manifest)
    states = {j: s for j, s in executor.states(named).items() if s in ACTIVE} if named else {}
    return "final: the test split's evaluation: " + ", ".join(f"job {j} {s}" for j, s in sorted(states.items())) \
        if states else None


def wait_for_job(executor: Executor, manifest: Manifest, layout: SweepLayout, poll_s: float = 2.0) -> None:
    """Until the final job has ended (the trials have); a scheduler that does not answer is asked
    again later, the job meanwhile taken to run."""
    job = manifest.final_job.get("id")
    alive = Patience(executor.alive, unknown=lambda _job: True)
    if job and alive(job):
        print(f"waiting for SLURM job {job}, the evaluation on the test split (Ctrl-C leaves it running; "
              f"python -m qarac_dist.status {shlex.quote(str(layout.root))} --sync records it)", flush=True)
    while job and alive(job):
        time.sleep(poll_s)


def recorded(final: Final, manifest: Manifest, layout: SweepLayout, configs: dict[str, dict]) -> Optional[dict]:
    """The result the final job kept for the sweep's choice; None (said in a line, with the
    job's last error line) when there is none."""
    chosen = choice(manifest, final, configs)
    if chosen is None:
        print(f"{PREFIX}the sweep chose no configuration; the test split was not read", file=sys.stderr)
        return None
    found = next((r for r in _stored(layout) if r["choice"] == chosen), None)
    if found is None:
        job = manifest.final_job.get("id")
        why = last_error(layout, job) if job else None
        print(f"{PREFIX}no evaluation of this choice on {final.split!r}"
              f"{f' (job {job}: {why})' if why else ''}; run the sweep again to evaluate it", file=sys.stderr)
    return found
