"""A configuration's run (with repeats): what its seeds' runs say together.

Once every seed of a configuration has ended (or the sweep has: a lost job's seed, whose run is
left open for its requeue, then counts as not finished), its run gets, for each final metric of the seeds
(`best_val_*`), the mean over the seeds that finished under the same name (so the runs table
lines a configuration up with its seeds), the sample standard deviation as `<name>_std` (from
two seeds) and `seeds_finished`; and its history: the mean curve of the training loss and of
each validation metric, at each step the mean over the seeds that reported that step. It ends
FINISHED, or FAILED when none of its seeds finished. The figures are recorded again when the
set of finished seeds changes (a re-run of a failed seed, which reopens the run); the curves
once, from the seeds that finished first.
"""

from __future__ import annotations

import math
import statistics
import time

ENDED = {"FINISHED", "FAILED", "KILLED"}
RECORDED = "seeds_recorded"
"""Tag of a configuration's run: the trial ids of the seeds its figures are over."""
CURVES = "mean_curves"
"""Tag of a configuration's run: its curves were logged (of these seeds)."""
_BATCH = 1000  # MLflow's limit of metrics in one log_batch


def record(mlflow_client, runs: dict[str, object], seeds: dict[str, list], closing: bool = False) -> None:
    """Record each configuration (id -> its run) whose seeds (id -> their runs, those in the
    sweep file) have all ended, or with `closing` (the sweep has ended) all of them, over the
    seeds that finished, unless its figures are already over them."""
    from mlflow.entities import Metric, RunTag

    for configuration, run in runs.items():
        of = seeds.get(configuration, [])
        if not of or (not closing and any(s.info.status not in ENDED for s in of)):
            continue
        finished = sorted((s for s in of if s.info.status == "FINISHED"), key=lambda s: s.data.tags.get("trial_id", ""))
        names = ",".join(s.data.tags.get("trial_id", "") for s in finished)
        if run.data.tags.get(RECORDED) == names and run.info.status in ENDED:
            continue
        now = int(time.time() * 1000)
        metrics = [Metric("seeds_finished", len(finished), now, len(finished))]
        for name in sorted({k for s in finished for k in s.data.metrics if k.startswith("best_val_")}):
            values = [s.data.metrics[name] for s in finished if math.isfinite(s.data.metrics.get(name, math.nan))]
            if values:
                metrics.append(Metric(name, statistics.fmean(values), now, len(finished)))
            if len(values) > 1:
                metrics.append(Metric(f"{name}_std", statistics.stdev(values), now, len(finished)))
        tags = [RunTag(RECORDED, names)]
        if finished and CURVES not in run.data.tags:
            metrics += _mean_curves(mlflow_client, finished, now)
            tags.append(RunTag(CURVES, names))
        for start in range(0, len(metrics), _BATCH):
            mlflow_client.log_batch(run.info.run_id, metrics=metrics[start:start + _BATCH])
        mlflow_client.log_batch(run.info.run_id, tags=tags)
        mlflow_client.set_terminated(run.info.run_id, status="FINISHED" if finished else "FAILED")


def _mean_curves(mlflow_client, finished: list, now: int) -> list:
    from mlflow.entities import Metric

    out = []
    for name in sorted({k for s in finished for k in s.data.metrics if k == "loss" or k.startswith("val_")}):
        steps: dict[int, list[float]] = {}
        for s in finished:
            for point in mlflow_client.get_metric_history(s.info.run_id, name):
                steps.setdefault(point.step, []).append(point.value)
        out += [Metric(name, statistics.fmean(values), now, step) for step, values in sorted(steps.items())]
    return out
