"""The sweep directory's layout, `<runs_dir>/<sweep>/`: the one place its paths are spelled.
Pure: it names paths, it reads and writes nothing.

    path                   written by                               read by
    .lock                  the driver working on the sweep          the next driver (who holds it)
                           (submit/submission.py, base/lock.py)
    .parent.lock           whoever updates the sweep's MLflow       -
                           parent run (track/sweep_runs.py)
    sweep.json             the driver: resolved spec, base config,  status --repair (submit/repair.py)
                           trial ids and labels
    manifest.json          the driver: one record per trial         status, cancel, re-runs
                           (submit/sweep_dir.py)
    cancelled.json         --cancel: trial id -> the attempt it     the driver, status (a cancel made
                           cancelled                                while a driver held the sweep)
    claims.json            a packed job's runner, when it starts    the runners (the next trial to
                           or ends a trial; the driver, when it     start), the driver, status
                           submits one again (submit/claims.py)
    .claims.lock           whoever reads-and-writes claims.json     -
                           or bad_nodes.json
    bad_nodes.json         a packed job's runner whose steps could  the driver: --exclude on the
                           not start there (submit/claims.py)       next submission, --dry-run
    .lock_probe,           the driver, checking once that its locks the next driver (asks no more
    lock_check.json        are seen on a compute node               once seen)
                           (submit/lock_check.py)
    mlflow_imported.json   the importer of a sqlite store: how far  the next import (an aid: the
                           it read each trial's outbox              store's own steps decide)
                           (track/store_import.py)
    search.jsonl           a packed job's runner: a line per ask    the next ask, the runner, the
                           and per result (track/search_record.py)  driver, status, the parent run
    search_history.png     the parent run update (the last trial    the user, MLflow (parent run)
                           to end, the driver)
    trials/<id>/           the trial's job (track/trial_dir.py      the driver, status, the summary,
                           owns the files inside)                   the rung report
    submitit/              submitit: the sweep's job pickles, logs, submitit, requeued jobs, the
                           sbatch scripts                           trial's environment.json
    submitit-batch-size/   submitit: the micro-batch search's jobs  preflight --find-batch-size
    micro_batch.json       preflight --find-batch-size              the planner (via the sweep command)
    asha/rung<k>.jsonl     a trial's rank 0 at rung k               trials at the rung, status, the
                           (track/rungs.py)                         rung report
    asha/asha.csv,         the last trial to end, through the       the user, MLflow (parent run)
    asha/curves.png        parent run update (track/rung_report.py)
    usage/<job>.json       a packed job's runner: its allocation's  status, the summary, the parent
                           clock (track/usage.py)                   run (idle slot time)
    usage.png, load.png    the parent run update (track/usage.py)   the user, MLflow (parent run)
    importance.png,        the parent run's close, from six         the user, MLflow (parent run)
    parallel.png           configurations (track/importance.py)
    packages/<sha256>.txt  the first trial whose interpreter has     the parent run update (an
                           that set of packages (train/runtime.py)  artifact, once per set)
    final.json             the final evaluation (submit/final.py):  the next final (evaluates again
                           the choice it tested, the test metrics   only for another choice), the
                           of each seed                             parent run, the summary
    retrain/<id>-<steps>/  a retraining of the chosen configuration the final evaluation, a re-run
                           (final.retrain, submit/retrain.py; a     (trained once)
                           trial directory, track/trial_dir.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SweepLayout:
    root: Path

    @classmethod
    def of(cls, runs_dir: str | Path, sweep: str) -> "SweepLayout":
        return cls(Path(runs_dir) / sweep)

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def parent_run_lock(self) -> Path:
        return self.root / ".parent.lock"

    @property
    def sweep_file(self) -> Path:
        return self.root / "sweep.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def cancels(self) -> Path:
        return self.root / "cancelled.json"

    @property
    def claims(self) -> Path:
        return self.root / "claims.json"

    @property
    def claims_lock(self) -> Path:
        return self.root / ".claims.lock"

    @property
    def bad_nodes(self) -> Path:
        return self.root / "bad_nodes.json"

    @property
    def lock_probe(self) -> Path:
        return self.root / ".lock_probe"

    @property
    def lock_check(self) -> Path:
        return self.root / "lock_check.json"

    @property
    def imported(self) -> Path:
        return self.root / "mlflow_imported.json"

    @property
    def search(self) -> Path:
        return self.root / "search.jsonl"

    @property
    def search_history(self) -> Path:
        return self.root / "search_history.png"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, trial_id: str) -> Path:
        return self.trials / trial_id

    @property
    def submitit(self) -> Path:
        return self.root / "submitit"

    def submission_script(self, job_id: str) -> Path:
        """The sbatch script submitit wrote for a job (an array's, for all its tasks)."""
        return self.submitit / job_id / f"{job_id}_submission.sh"

    def job_logs(self, job_id: str) -> list[Path]:
        """Where submitit may have put a job's stderr: SLURM's folder per job (`%j`), the local
        executor's one folder."""
        return [self.submitit / job_id / f"{job_id}_0_log.err", self.submitit / f"{job_id}_0_log.err"]

    @property
    def batch_size_submitit(self) -> Path:
        return self.root / "submitit-batch-size"

    @property
    def micro_batches(self) -> Path:
        return self.root / "micro_batch.json"

    @property
    def asha(self) -> Path:
        return self.root / "asha"

    def rung(self, k: int) -> Path:
        return self.asha / f"rung{k}.jsonl"

    @property
    def asha_table(self) -> Path:
        return self.asha / "asha.csv"

    @property
    def asha_curves(self) -> Path:
        return self.asha / "curves.png"

    @property
    def usage(self) -> Path:
        return self.root / "usage"

    def job_usage(self, job_id: str) -> Path:
        return self.usage / f"{job_id}.json"

    @property
    def packages(self) -> Path:
        return self.root / "packages"

    @property
    def usage_plot(self) -> Path:
        return self.root / "usage.png"

    @property
    def load_plot(self) -> Path:
        return self.root / "load.png"

    @property
    def importance_plot(self) -> Path:
        return self.root / "importance.png"

    @property
    def parallel_plot(self) -> Path:
        return self.root / "parallel.png"

    @property
    def final(self) -> Path:
        return self.root / "final.json"

    def retrained(self, trial_id: str, steps: int) -> Path:
        return self.root / "retrain" / f"{trial_id}-{steps}"

    def retrainings(self) -> list[Path]:
        """Every retraining's folder (`retrained`), of any choice."""
        return sorted(p for p in (self.root / "retrain").glob("*") if p.is_dir())
