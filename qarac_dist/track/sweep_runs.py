"""The sweep's side of MLflow: one parent run per sweep, one child run per trial, made when the
sweep submits (so a job, a requeued job and a re-run reattach to the same runs instead of
opening new ones: mlflow#11782, Lightning#6205), and the parent's verdict on the best trial.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Optional

from ..base.layout import SweepLayout
from ..base.lock import locked

from .best import BY_CONFIGURATION, TIE_ORDER, Candidate, best_configuration, choose, configurations
from .mlflow_client import client, create_run, experiment_id, log_screened_params
from ..base.secrets import redact_text


def create_parent(uri: str, experiment: str, sweep: str, executor: str, tags: dict, params: dict) -> str:
    c = client(uri)
    return create_run(c, experiment_id(c, experiment), sweep,
                      {"sweep": sweep, "executor": executor, "qarac.kind": "sweep", **tags}, params)


def create_child(uri: str, experiment: str, parent_run_id: str, name: str, tags: dict, params: dict) -> str:
    c = client(uri)
    return create_run(c, experiment_id(c, experiment), name, tags, params, parent_run_id=parent_run_id)


CONFIGURATION = "configuration"
"""Tag of a seed's run (with repeats): the configuration it is a seed of, whose run is its parent."""
SWEEP_RUN = "sweep_run_id"
"""Tag of a seed's run: the sweep's run, its parent's parent."""


def create_configuration(uri: str, experiment: str, parent_run_id: str, configuration: str, label: str, seeds: int,
                         tags: dict, params: dict) -> str:
    """A configuration's run (with repeats): its seeds' runs nest under it, and it gets their
    mean, standard deviation and count when they end (track/configurations.py)."""
    params = {k: v for k, v in params.items() if k != "training.seed"}
    c = client(uri)
    return create_run(c, experiment_id(c, experiment), f"{configuration} {label}",
                      {**tags, "qarac.kind": "configuration", CONFIGURATION: configuration, "label": label,
                       "repeats": str(seeds)}, {**params, "repeats": str(seeds)}, parent_run_id=parent_run_id)


SEARCH_SLOT = "search.slot"
"""Tag of a search's trial run (with repeats, also of its configuration's run): its slot."""


def label_configuration(uri: str, run_id: str, configuration: str, label: str, slot: int, params: dict) -> None:
    """A search's configuration run (with repeats), made before its values were asked, given
    them: its label, name and params (the seed left out, each seed's run has its own)."""
    from mlflow.entities import RunTag

    c = client(uri)
    log_screened_params(c, run_id, {k: v for k, v in params.items() if k != "training.seed"})
    c.log_batch(run_id, tags=[RunTag("label", label), RunTag(SEARCH_SLOT, str(slot)),
                              RunTag("mlflow.runName", redact_text(f"{configuration} {label}"))])


def log_params(uri: str, run_id: str, params: dict) -> None:
    """Params of a run made before they were known (a search's seed, with repeats)."""
    log_screened_params(client(uri), run_id, params)


def trial_runs(mlflow_client, parent) -> tuple[list, list]:
    """The sweep's trial runs, and its configurations' runs (with repeats, where the seeds' runs
    nest)."""
    children = mlflow_client.search_runs([parent.info.experiment_id],
                                         filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                         max_results=10000)
    configurations = [r for r in children if r.data.tags.get("qarac.kind") == "configuration"]
    trials = [r for r in children if r.data.tags.get("qarac.kind") != "configuration"]
    if configurations:
        trials += mlflow_client.search_runs([parent.info.experiment_id],
                                            filter_string=f"tags.{SWEEP_RUN} = '{parent.info.run_id}'",
                                            max_results=10000)
    return trials, configurations


def reopen(uri: str, run_id: str) -> None:
    """A re-run submits trials again: the parent (and a configuration of theirs) is running again
    until they end."""
    client(uri).update_run(run_id, status="RUNNING")


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value)[:5000])


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, redact_text(text), name)


@contextlib.contextmanager
def _one_at_a_time(sweep: Optional[SweepLayout]):
    """Trials that end at once update the parent in turn (a lock in the sweep's directory), so
    the best is logged once per change."""
    if sweep is None or not sweep.root.is_dir():
        yield
        return
    with locked(sweep.parent_run_lock, "a"):
        yield


RETIRED = "qarac.retired"
"""Tag of a child run whose trial is no longer in the sweep file: never the best."""


def update_parent(mlflow_client, parent_run_id: str, metric: str, mode: str,
                  sweep: Optional[SweepLayout] = None, closing: bool = False) -> Optional[tuple[str, float]]:
    """Name the best finished child on the parent (tags best_trial, best_run_id; metric
    best_val_<metric>, logged when the best changes, at a step counting the finished trials)
    and attach summary.csv of all children, and the rung report where successive halving ran.
    Recomputed from every child. `closing`: every trial has ended as the driver sees it, so a
    configuration's seed whose run is still open (a lost job's, left for its requeue) counts
    as not finished."""
    with _one_at_a_time(sweep):
        return _update_parent(mlflow_client, parent_run_id, metric, mode, sweep, closing)


def _update_parent(mlflow_client, parent_run_id: str, metric: str, mode: str,
                   sweep: Optional[SweepLayout], closing: bool) -> Optional[tuple[str, float]]:
    parent = mlflow_client.get_run(parent_run_id)
    children, configuration_runs = trial_runs(mlflow_client, parent)
    key = f"best_val_{metric}"
    lines = [f"trial,run_id,status,{key},best_val_loss,best_step,stopped,in_sweep_file,configuration"]
    candidates, runs = [], {}
    for child in sorted(children, key=lambda r: r.data.tags.get("trial_id", "")):
        tags, metrics = child.data.tags, child.data.metrics
        trial = tags.get("trial_id", child.info.run_id)
        value = metrics.get(key)
        lines.append(",".join(str(x) for x in (
            trial, child.info.run_id, child.info.status, "" if value is None else value,
            metrics.get("best_val_loss", ""), tags.get("best_step", ""), tags.get("asha.stopped_at_step", ""),
            "no" if tags.get(RETIRED) == "true" else "yes", tags.get(CONFIGURATION, ""))))
        if child.info.status == "FINISHED" and value is not None and not math.isnan(value) and \
                tags.get(RETIRED) != "true":
            step = tags.get("best_step")
            candidates.append(Candidate(trial, value, metrics.get("best_val_loss"), int(step) if step else None,
                                        tags.get(CONFIGURATION)))
            runs[trial] = child.info.run_id
    mlflow_client.log_text(parent_run_id, redact_text("\n".join(lines) + "\n"), "summary.csv")
    if sweep is not None and sweep.asha.is_dir():
        from .rung_report import write

        for path in write(sweep, metric, mode):
            mlflow_client.log_artifact(parent_run_id, str(path))
    if sweep is not None and sweep.search.exists():
        from .search_record import write_history

        mlflow_client.log_artifact(parent_run_id, str(write_history(sweep, mode, metric)))
    seed_runs: dict[str, list] = {}
    for child in children:
        if CONFIGURATION in child.data.tags and child.data.tags.get(RETIRED) != "true":
            seed_runs.setdefault(child.data.tags[CONFIGURATION], []).append(child)
    seeds = {c: len(of) for c, of in seed_runs.items()}
    run_of = {r.data.tags.get(CONFIGURATION): r for r in configuration_runs}
    if configuration_runs:
        from .configurations import record

        record(mlflow_client, run_of, seed_runs, closing)
    best = choose(candidates, mode, seeds)
    if best is None:
        return None
    verdict = {"best_trial": best.trial_id, "best_run_id": runs[best.trial_id],
               "best_order": f"{mode} {metric}; {TIE_ORDER}"}
    value, figures = best.value, {}
    if seeds:  # the sweep's result is the chosen configuration's mean
        chosen = best_configuration(configurations(candidates, seeds), mode)
        run = run_of.get(chosen.id)
        verdict = {**verdict, "best_configuration": chosen.id,
                   "best_configuration_run_id": run.info.run_id if run else "",
                   "best_order": f"{mode} {metric}; {BY_CONFIGURATION}"}
        std = math.nan if chosen.std is None else chosen.std  # one seed: none, not an earlier choice's
        value, figures = chosen.mean, {f"{key}_std": std, f"{key}_seeds": len(chosen.finished)}
    if any(parent.data.tags.get(k) != v for k, v in verdict.items()):  # in one batch: a kill leaves all or none
        from mlflow.entities import RunTag

        mlflow_client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in verdict.items()])
    figures = {key: value, **figures}
    if any(not _same(parent.data.metrics.get(name), figure) for name, figure in figures.items()):  # a point per change
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        mlflow_client.log_batch(parent_run_id, metrics=[Metric(name, figure, now, len(candidates))
                                                        for name, figure in figures.items()])
    return best.trial_id, value


def _same(logged: Optional[float], figure: float) -> bool:
    return logged == figure or (logged is not None and math.isnan(logged) and math.isnan(figure))


def close_parent(uri: str, parent_run_id: str, metric: str, mode: str, ok: bool, sweep: SweepLayout,
                 used: dict[str, float], names: dict[str, str], alias: str) -> None:
    """Every trial's latest attempt has ended: the verdict, what the sweep used (`used`: the
    metrics gpu_hours, cpu_hours, ..., track/usage.py) with its plots, FINISHED (or FAILED),
    then its champion (`names`: trial id -> its tracking.register_model; `alias`, track/champion.py) and
    which parameters mattered (track/importance.py)."""
    from mlflow.entities import Metric

    from .champion import crown
    from .importance import importance, plots
    from .usage_plots import hours_plot, load_plot

    c = client(uri)
    update_parent(c, parent_run_id, metric, mode, sweep, closing=True)
    now = int(time.time() * 1000)
    c.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in used.items()])
    c.log_artifact(parent_run_id, str(hours_plot(used, sweep.usage_plot, sweep.root.name)))
    for packages in sorted(sweep.packages.glob("*.txt")):  # each set the trials ran with, once (train/runtime.py)
        c.log_artifact(parent_run_id, str(packages), "packages")
    parent = c.get_run(parent_run_id)
    children, configuration_runs = trial_runs(c, parent)
    load = load_plot(c, children, sweep.load_plot, sweep.root.name)
    if load is not None:
        c.log_artifact(parent_run_id, str(load))
    c.set_terminated(parent_run_id, status="FINISHED" if ok else "FAILED")
    if ok:  # after the end: a name the registry refuses leaves the record whole
        crown(uri, c, parent_run_id, names, alias)
    varied = [k for k in parent.data.tags.get("varied", "").split(", ") if k]
    found = importance(_configuration_points(children, configuration_runs, f"best_val_{metric}"), varied, mode)
    if found is not None:
        study, importances = found
        plots(study, importances, f"{metric} mean" if configuration_runs else metric, sweep.root.name,
              sweep.importance_plot, sweep.parallel_plot)
        for path in (sweep.importance_plot, sweep.parallel_plot):
            c.log_artifact(parent_run_id, str(path))
        c.set_tag(parent_run_id, "param_importance", ", ".join(f"{k}={v:.2f}" for k, v in importances.items()))


def _configuration_points(children: list, configuration_runs: list, key: str) -> list[tuple[dict, float]]:
    """Each configuration with a trial that finished with `key`, not retired: its params and its
    value (with repeats, its run's params and the mean over its seeds that finished)."""
    run_of = {r.data.tags.get(CONFIGURATION): r for r in configuration_runs}
    values: dict[str, list[float]] = {}
    params: dict[str, dict] = {}
    for run in children:
        tags, value = run.data.tags, run.data.metrics.get(key)
        if run.info.status != "FINISHED" or value is None or not math.isfinite(value) or tags.get(RETIRED) == "true":
            continue
        configuration = tags.get(CONFIGURATION) or run.info.run_id
        values.setdefault(configuration, []).append(value)
        params[configuration] = run_of.get(configuration, run).data.params
    return [(params[c], sum(v) / len(v)) for c, v in sorted(values.items())]


_NOT_WHAT_IT_IS = ("name", "tracking", "output", "preflight")
_FP16_ONLY = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")


def trial_params(config: dict) -> dict:
    """What MLflow shows as a trial's params: its resolved config, flattened, without what is
    not what the trial is (its name, where it writes and is tracked) and without the sections
    its model and data do not use. Secrets are screened when the run is made."""
    from ..config.schema import flatten

    config = {k: v for k, v in config.items() if k not in _NOT_WHAT_IT_IS}
    model = dict(config.get("model", {}))
    if model.get("kind") != "dual_encoder":
        model.pop("dual_encoder", None)
    if model.get("factory") is None:
        model.pop("factory_kwargs", None)
    config["model"] = model
    data = dict(config.get("data", {}))
    if data.get("synthetic") is not None:
        for key in ("dataset", "dataset_config", "train_files", "validation_files", "train_split", "validation_split",
                    "text_column", "text_pair_column", "label_column"):
            data.pop(key, None)
    data.pop("cache_dir", None)
    config["data"] = data
    precision = dict(config.get("precision", {}))
    if precision.get("dtype") != "fp16":
        for key in _FP16_ONLY:
            precision.pop(key, None)
    config["precision"] = precision
    return {k: v for k, v in flatten(config).items() if v is not None and v != {} and v != []}
