"""Model-based search with repeats: a slot is a configuration of K seed trials; the seeds share
one ask (whichever starts first asks, the others replay), and the sampler is told the
configuration's result once, when all its seeds have ended: the mean of those that completed."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import yaml

from qarac_dist.base.layout import SweepLayout
from qarac_dist.config.sweep import Distribution, Search, load_sweep
from qarac_dist.plan import plan
from qarac_dist.plan.search import choose
from qarac_dist.plan.seeds import repeat_seeds
from qarac_dist.submit.search import history, previous_state, start, tell, tell_ended
from qarac_dist.submit.sweep_dir import TrialRecord
from qarac_dist.track import search_record
from qarac_dist.track.trial_dir import TrialDir, TrialState
from support import tiny_config

SPACE = {"optimizer.lr": Distribution("loguniform", 1e-4, 1e-2)}


def _spec(tmp_path, repeats: int = 3, trials: int = 2):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "runs_dir": str(tmp_path / "runs"),
        "executor": "local", "repeats": repeats, "set": {"training.seed": 5},
        "search": {"trials": trials, "sampler": "tpe", "seed": 0, "params": {
            "optimizer.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}}}))
    return load_sweep(path)


def test_a_search_with_repeats_plans_trials_times_seeds_with_derived_seeds_and_stable_ids(tmp_path):
    """Each slot is a configuration of 3 seeds (training.seed 5 and two derived from it, as a
    grid's), its first seed keeps the id the slot has without repeats; planned again, the same."""
    trials = plan(*_spec(tmp_path))
    single = plan(*_spec(tmp_path, repeats=1))
    assert len(trials) == 6 and len({t.id for t in trials}) == 6
    assert [t.slot for t in trials] == [0, 0, 0, 1, 1, 1]
    for k, slot in enumerate(single):
        seeds = trials[3 * k:3 * k + 3]
        assert [t.config["training"]["seed"] for t in seeds] == repeat_seeds(5, 3)
        assert seeds[0].id == slot.id and {t.configuration for t in seeds} == {slot.id}
        assert [t.label for t in seeds] == [f"slot {k} seed {s}" for s in repeat_seeds(5, 3)]
        assert all(t.config["output"]["dir"].endswith(f"/trials/{t.id}") for t in seeds)
        assert {_apart_from_seed(t.config) for t in seeds} == {_apart_from_seed(slot.config)}
    assert [(t.id, t.configuration) for t in plan(*_spec(tmp_path))] == [(t.id, t.configuration) for t in trials]
    assert all(t.configuration is None for t in single)


def _apart_from_seed(config: dict) -> str:
    """A trial's config less its seed and where it writes: what its configuration is."""
    return json.dumps({**config, "training": {**config["training"], "seed": None}, "name": None, "output": None},
                      sort_keys=True)


def test_the_plan_text_counts_configurations_and_seeds(tmp_path, capsys):
    from qarac_dist.submit.plan_text import print_search

    spec, _ = _spec(tmp_path)
    print_search(spec, "")
    assert "tpe sampler (seed 0), 2 configurations x 3 seeds" in capsys.readouterr().out


def _context(trials: list, trial) -> dict:
    """What the driver hands a seed's job (job_context), less MLflow."""
    return {"select_metric": "accuracy", "select_mode": "max", "tracking_uri": None,
            "configuration": trial.configuration,
            "seeds": {t.id: 1 for t in trials if t.configuration == trial.configuration}}


def _start(root: str, search: Search, trial, context: dict, start_at: float) -> None:
    while time.time() < start_at:
        pass
    config, context = start(SweepLayout(Path(root)), search, trial.slot, trial.id, trial.config, context)
    Path(root, f"{trial.id}.json").write_text(json.dumps({"config": config, "tags": context["tags"]}))


def test_the_seeds_of_a_configuration_started_at_once_share_one_ask(tmp_path):
    """Six processes, the 3 seeds of 2 configurations, start at the same moment: one ask line
    per configuration, naming its seeds; every seed trains with its configuration's values and
    its own seed, and is labelled so."""
    spec, base = _spec(tmp_path)
    trials = plan(spec, base)
    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir()
    ctx = multiprocessing.get_context("fork")  # the arguments are the parent's, not pickled
    start_at = time.time() + 2
    procs = [ctx.Process(target=_start, args=(str(layout.root), spec.search, t, _context(trials, t), start_at))
             for t in trials]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 6
    record = search_record.read(layout)
    assert sorted(a.slot for a in record.asks) == [0, 1]
    for a in record.asks:
        seeds = [t for t in trials if t.slot == a.slot]
        assert a.seeds == tuple(sorted(t.id for t in seeds)) and a.trial in a.seeds
        for t in seeds:
            started = json.loads((layout.root / f"{t.id}.json").read_text())
            assert started["config"]["optimizer"]["lr"] == a.params["optimizer.lr"]
            assert started["config"]["training"]["seed"] == t.config["training"]["seed"]
            assert started["config"]["output"] == t.config["output"]
            assert started["tags"]["label"].endswith(f" seed {t.config['training']['seed']}")
    assert record.asks[0].params != record.asks[1].params


def _ask(layout: SweepLayout, search: Search, slot: int, seeds: tuple) -> dict:
    def pick(record):
        c = choose(search, "max", history(record), previous_state(record))
        return c.params, c.state, None

    return search_record.ask(layout, slot, seeds[0], pick, seeds).params


def test_the_sampler_is_told_a_configuration_once_all_its_seeds_ended_the_mean_of_those_that_completed(tmp_path):
    """Configuration 0: RUNNING while a seed has no result; then the mean of its two completed
    seeds (the failed one left out), its curve the mean at each step. Configuration 1: all
    failed, FAIL. Configuration 2: its seeds stopped at a rung, PRUNED with their mean curve.
    The sampler sees one trial per configuration and asks on from them."""
    layout, search = SweepLayout(tmp_path), Search(trials=4, sampler="tpe", seed=0, params=SPACE, startup_trials=2)
    seeds = {k: tuple(f"c{k}s{n}" for n in range(3)) for k in range(3)}
    for k in range(3):
        _ask(layout, search, k, seeds[k])
    search_record.tell(layout, 0, "COMPLETE", 0.5, {"2": 0.4, "4": 0.5}, 1, "c0s0")
    search_record.tell(layout, 0, "FAIL", None, {"2": 0.1}, 1, "c0s1")
    assert [t.state for t in history(search_record.read(layout))] == ["RUNNING"] * 3
    search_record.tell(layout, 0, "COMPLETE", 0.7, {"2": 0.6, "4": 0.7}, 1, "c0s2")
    for n in range(3):
        search_record.tell(layout, 1, "FAIL", None, {}, 1, f"c1s{n}")
        search_record.tell(layout, 2, "PRUNED", None, {"2": 0.1 * (n + 1)}, 1, f"c2s{n}")
    told = history(search_record.read(layout))
    assert [(t.state, t.value) for t in told] == [("COMPLETE", pytest.approx(0.6)), ("FAIL", None), ("PRUNED", None)]
    assert told[0].intermediate == {"2": pytest.approx((0.4 + 0.1 + 0.6) / 3), "4": pytest.approx(0.6)}
    assert told[2].intermediate == {"2": pytest.approx(0.2)}
    assert _ask(layout, search, 3, ("c3s0", "c3s1", "c3s2"))  # the sampler asks on from these three
    assert len(search_record.read(layout).asks) == 4


def _seed_dir(tmp_path, tid: str, attempt: int, state: TrialState, accuracy: float) -> TrialDir:
    trial = TrialDir(tmp_path / tid)
    trial.begin(attempt)
    trial.update(state=state)
    trial.metrics_file.write_text(json.dumps({"step": 4, "val_accuracy": accuracy}) + "\n")
    return trial


def test_a_seed_run_again_replays_its_configurations_values_and_its_latest_attempt_counts(tmp_path):
    """A seed that failed is re-run (attempt 2): it asks nothing new, trains with the values its
    configuration was given, and its result replaces the failed one in the mean; a late result of
    its first attempt is ignored. A result its runner never told is told by the next to see it."""
    trials = plan(*_spec(tmp_path))
    spec, _ = _spec(tmp_path)
    layout = SweepLayout(tmp_path / "sweep")
    seeds = [t for t in trials if t.slot == 0]
    first, _ = start(layout, spec.search, 0, seeds[0].id, seeds[0].config, _context(trials, seeds[0]))
    for n, (state, accuracy) in enumerate([(TrialState.COMPLETED, 0.6), (TrialState.FAILED, 0.0),
                                           (TrialState.COMPLETED, 0.8)]):
        tell(layout, 0, seeds[n].id, _seed_dir(tmp_path, seeds[n].id, 1, state, accuracy), state, "accuracy", "max", 1)
    assert history(search_record.read(layout))[0].value == pytest.approx(0.7)
    again, _ = start(layout, spec.search, 0, seeds[1].id, seeds[1].config, _context(trials, seeds[1]))
    assert again["optimizer"]["lr"] == first["optimizer"]["lr"] and len(search_record.read(layout).asks) == 1
    rerun = _seed_dir(tmp_path, seeds[1].id, 2, TrialState.COMPLETED, 0.9)
    records = [TrialRecord(t.id, t.label, {}, t.config, str(tmp_path / t.id), "local",
                           attempt=2 if t is seeds[1] else 1, slot=0, configuration=t.configuration) for t in seeds]
    tell_ended(layout, records, "accuracy", "max")  # its runner was killed before it told
    tell(layout, 0, seeds[1].id, rerun, TrialState.FAILED, "accuracy", "max", 1)  # the first attempt's, late
    record = search_record.read(layout)
    assert [(t.trial, t.attempt, t.state) for t in record.tells if t.trial == seeds[1].id] == \
        [(seeds[1].id, 1, "FAIL"), (seeds[1].id, 2, "COMPLETE")]
    assert history(record)[0].value == pytest.approx((0.6 + 0.9 + 0.8) / 3)


def test_mlflow_nests_each_seeds_run_under_its_configurations_run_which_gets_the_values_asked(tmp_path):
    """A sqlite store (a real one): the driver makes a run per configuration, its seeds' runs
    under it, before any value is asked; once the first seed has asked, the configuration's run
    is given the values (label, params without the seed), once."""
    from qarac_dist.base.layout import SweepLayout as Layout
    from qarac_dist.config.sweep import Resources
    from qarac_dist.submit import tracking
    from qarac_dist.submit.submission import job_context
    from qarac_dist.submit.sweep_dir import Manifest
    from qarac_dist.track.mlflow_client import client
    from qarac_dist.track.store_import import one_writer

    spec, base = _spec(tmp_path, repeats=2)
    trials = plan(spec, base)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = {t.id: TrialRecord(t.id, t.label, t.overrides, t.config, t.config["output"]["dir"], "local", attempt=1,
                                 slot=t.slot, configuration=t.configuration) for t in trials}
    manifest = Manifest("s", "local", "accuracy", "max", trials=records, tracking_uri=uri, experiment="e")
    tracking.ensure_runs(manifest, list(records.values()), ["optimizer.lr"])
    c = client(uri)
    assert sorted(manifest.configurations) == sorted({t.configuration for t in trials})
    for t in trials:
        assert c.get_run(records[t.id].mlflow_run_id).data.tags["mlflow.parentRunId"] == \
            manifest.configurations[t.configuration]
    layout = Layout(tmp_path / "sweep")
    first = trials[0]
    context = job_context(manifest, layout, records[first.id], Resources()).to_dict()
    assert context["configuration_run_id"] == manifest.configurations[first.id]
    config, seeded = start(layout, spec.search, 0, first.id, first.config, context)
    assert seeded["run_id"] == records[first.id].mlflow_run_id  # its own run, not its configuration's
    (asked,) = search_record.read(layout).asks
    assert asked.run_id == manifest.configurations[first.id]
    with one_writer(uri):
        tracking.label_configurations(manifest, layout)
    run = c.get_run(manifest.configurations[first.id]).data
    assert run.tags["label"].startswith("slot 0: optimizer.lr=") and run.tags["search.slot"] == "0"
    assert float(run.params["optimizer.lr"]) == config["optimizer"]["lr"] and "training.seed" not in run.params
    other = c.get_run(manifest.configurations[trials[2].id]).data  # not asked yet: no values
    assert "search.slot" not in other.tags and "optimizer.lr" not in other.params
