"""Model-based search in a packed job's runner (submit/pack.py): a slot's values are asked for
when the runner starts it, from every result recorded before (plan/search.py chooses,
track/search_record.py keeps the record, under its lock), its MLflow child run is made then
with those values, and its result is told when its step ends. A requeued or re-run slot
replays what was recorded: it is never asked twice.

With repeats a slot is a configuration of K seed trials: the first seed to start asks, its
siblings replay the values (one ask per configuration: the sampler asks for configurations,
not seeds); each seed is told as it ends, and the sampler learns the configuration's result
once all its seeds have one (search_record.configuration_result), RUNNING until then. Their
MLflow runs were made by the driver, as for a grid: the configuration's run is given the values
when they are asked, each seed's run when it starts.
"""

from __future__ import annotations

import math
from typing import Optional

from ..base.layout import SweepLayout
from ..base.secrets import redact_text
from ..config import ConfigError
from ..config.sweep import GP_TRIALS, Search
from ..plan.resolve import Resolver
from ..plan.search import Told, check_history, choose, in_space, restored
from ..track import search_record
from ..track.outbox import is_local_store
from ..track.trial_dir import TrialDir, TrialState


def label(slot: int, params: dict, seed: Optional[int] = None) -> str:
    """`slot k: key=value ...`, and the seed with repeats."""
    return f"slot {slot}: " + " ".join(f"{k}={_short(v)}" for k, v in params.items()) + \
        ("" if seed is None else f" seed {seed}")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def start(layout: SweepLayout, search: Search, slot: int, trial: str, config: dict, context: dict) -> tuple[dict, dict]:
    """The slot's config and context: its values asked for (or replayed), its MLflow run made
    (with repeats, the driver made it: this seed's run and its configuration's are given the
    values). ConfigError when the values do not make a valid config."""
    mode = context["select_mode"]
    repeated = context.get("configuration") is not None

    def ask(record: search_record.Record) -> tuple[dict, dict, Optional[str]]:
        choice = choose(search, mode, history(record), previous_state(record),
                        warm_start(search, context["select_metric"], mode)[0], str(layout.search))
        run = _configuration_run(context, slot, config, choice.params) if repeated else \
            _child_run(context, trial, slot, config, choice.params)
        return choice.params, choice.state, run

    asked = search_record.ask(layout, slot, trial, ask, tuple(sorted(context.get("seeds") or ())))
    resolved, _ = Resolver(config, set(asked.params)).resolve(asked.params)
    resolved.update(name=config["name"], output=config["output"])
    if repeated or is_local_store(context.get("tracking_uri")):  # its run was made before its values were asked
        shown = label(slot, asked.params, config["training"]["seed"] if repeated else None)
        context = {**context, "tags": {**context.get("tags", {}), "label": shown, "search.slot": slot,
                                       "mlflow.runName": f"{trial} {shown}"}}
        if repeated and context.get("run_id") is not None and not is_local_store(context.get("tracking_uri")):
            from ..track import sweep_runs  # (in a sqlite store, the job's outbox carries its params)

            sweep_runs.log_params(context["tracking_uri"], context["run_id"], sweep_runs.trial_params(resolved))
        return resolved, context
    return resolved, {**context, "run_id": asked.run_id}


def previous_state(record: search_record.Record) -> Optional[dict]:
    """The sampler's state the latest ask left (None: nothing asked yet)."""
    return record.asks[-1].state if record.asks else None


def check_record(layout: SweepLayout, search: Search) -> None:
    """RecordMismatch, in one line, when the next ask could not go on from the sweep's search
    record (another Optuna wrote it, an older qarac_dist, a damaged state): said before anything
    is submitted, not by every job."""
    record = search_record.read(layout)
    restored(search, previous_state(record), str(layout.search))
    check_history(search, history(record), str(layout.search))


def history(record: search_record.Record) -> list[Told]:
    """The sweep's trials (with repeats, configurations) in the order they were asked, each
    with its result or still RUNNING."""
    told = record.results()
    return [Told(a.params, told[a.slot].state, told[a.slot].value, told[a.slot].intermediate) if a.slot in told
            else Told(a.params, "RUNNING") for a in record.asks]


def warm_start(search: Search, metric: str, mode: str) -> tuple[list[Told], str]:
    """What a warm start tells the sampler first, and the line that says so: the finished
    trials of the sweep `search.warm_start` names that lie in this space (a narrower range drops
    some, and the line counts them). ConfigError when that sweep is not comparable: another
    select metric or mode (its values would be told as this sweep's), other searched keys, or
    another distribution for a key."""
    if not search.warm_start:
        return [], ""
    from pathlib import Path

    from ..base.files import read_json
    from .sweep_dir import Manifest

    earlier = SweepLayout(Path(search.warm_start))
    manifest = Manifest.load(earlier.root)
    saved = ((read_json(earlier.sweep_file) or {}).get("spec") or {}).get("search") or {}
    theirs = {k: (d or {}).get("distribution") for k, d in (saved.get("params") or {}).items()}
    ours = {k: d.distribution for k, d in search.params.items()}
    where = f"{search.warm_start}: search.warm_start"
    problems = []
    if manifest is not None and (manifest.select_metric, manifest.select_mode) != (metric, mode):
        problems.append(f"{where}: that sweep selected {manifest.select_mode} {manifest.select_metric}, this one "
                        f"{mode} {metric}: its values would be told as this sweep's; warm-start from a sweep that "
                        f"selects the same")
    if saved and set(theirs) != set(ours):
        problems.append(f"{where}: that sweep searched {', '.join(sorted(theirs))}, this one {', '.join(sorted(ours))}")
    problems += [f"{where}: search.params.{k} was {theirs[k]} there, {ours[k]} here" for k in sorted(ours)
                 if saved and k in theirs and theirs[k] != ours[k]]
    if problems:
        raise ConfigError(problems)
    finished = [t for t in history(search_record.read(earlier)) if t.state != "RUNNING"]
    kept = [t for t in finished if in_space(t.params, search)]
    if search.sampler == "gp" and len(kept) + search.trials > GP_TRIALS:
        raise ConfigError([f"{where}: gp takes at most {GP_TRIALS} trials, told ones included: {len(kept)} told "
                           f"first and search.trials {search.trials}; use tpe, or fewer trials"])
    dropped = len(finished) - len(kept)
    return kept, (f"told first: {len(kept)} of the {len(finished)} finished trials of {search.warm_start}"
                  + (f"; {dropped} dropped, outside this sweep's ranges" if dropped else ""))


def _child_run(context: dict, trial: str, slot: int, config: dict, params: dict) -> Optional[str]:
    if context.get("tracking_uri") is None or context.get("parent_run_id") is None:
        return None
    if is_local_store(context["tracking_uri"]):  # made by the driver: a job never opens a sqlite store
        return context.get("run_id")
    from ..track import sweep_runs

    resolved, _ = Resolver(config, set(params)).resolve(params)
    tags = {**context.get("tags", {}), "label": label(slot, params), "search.slot": slot}
    return sweep_runs.create_child(context["tracking_uri"], context["experiment"], context["parent_run_id"],
                                   f"{trial} {label(slot, params)}", tags, sweep_runs.trial_params(resolved))


def _configuration_run(context: dict, slot: int, config: dict, params: dict) -> Optional[str]:
    """With repeats: the configuration's run, made by the driver, given the values asked (in a
    sqlite store, which no job opens, the driver gives them: tracking.label_configurations)."""
    run_id = context.get("configuration_run_id")
    if run_id is None or is_local_store(context.get("tracking_uri")):
        return run_id
    from ..track import sweep_runs

    resolved, _ = Resolver(config, set(params)).resolve(params)
    sweep_runs.label_configuration(context["tracking_uri"], run_id, context["configuration"], label(slot, params), slot,
                                   sweep_runs.trial_params(resolved))
    return run_id


def tell(layout: SweepLayout, slot: int, trial: str, trial_dir: TrialDir, verdict: Optional[TrialState], metric: str,
         mode: str, attempt: int) -> None:
    """Record how attempt `attempt` of the slot's trial `trial` ended: the select metric of its best
    model, as the parent run ranks it (best/'s validation; without one, its best over its
    validations) (COMPLETE), the values it reported before a rung stopped it (PRUNED), or FAIL.
    After a rollback that undid best/, the model validated again is the best: the record and the
    choice agree."""
    curve = {row["step"]: row[f"val_{metric}"] for row in trial_dir.metrics()
             if f"val_{metric}" in row and isinstance(row[f"val_{metric}"], (int, float))}
    finite = [v for v in curve.values() if math.isfinite(v)]
    kept = ((trial_dir.best_info() or {}).get("metrics") or {}).get(metric)
    if verdict == TrialState.COMPLETED and isinstance(kept, (int, float)) and math.isfinite(kept):
        search_record.tell(layout, slot, "COMPLETE", float(kept), curve, attempt, trial)
    elif verdict == TrialState.COMPLETED and finite:
        search_record.tell(layout, slot, "COMPLETE", max(finite) if mode == "max" else min(finite), curve, attempt,
                           trial)
    elif verdict == TrialState.PRUNED:
        search_record.tell(layout, slot, "PRUNED", None, curve, attempt, trial)
    else:
        search_record.tell(layout, slot, "FAIL", None, curve, attempt, trial)


def tell_ended(layout: SweepLayout, records: list, metric: str, mode: str) -> None:
    """Whoever first sees a slot's trial ended records its result: a runner killed between the
    step's end and its bookkeeping left the trial's own verdict (state.json), not the tell."""
    record = search_record.read(layout)
    for r in records:
        status = r.trial_dir.status_of(r.attempt) if r.slot is not None else None
        ended = status is not None and status.state in (TrialState.COMPLETED, TrialState.PRUNED, TrialState.FAILED)
        latest = record.told(r.slot, r.id) if ended else None
        if ended and (latest is None or (latest.attempt or 0) < r.attempt):
            tell(layout, r.slot, r.id, r.trial_dir, status.state, metric, mode, r.attempt)


def refused(trial_dir: TrialDir, attempt: int, err: ConfigError) -> str:
    """A slot whose values do not make a valid config fails with one line, as a trial would."""
    error = redact_text(f"ConfigError: {err.errors[0]}")
    trial_dir.begin(attempt)
    trial_dir.update(state=TrialState.FAILED, error=error)
    return error
