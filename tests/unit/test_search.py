"""Model-based search: the values asked through our record (real files, the lock, the replayed
study) are those Optuna's own `study.optimize` asks for, one trial at a time; a slot is asked
once; slots and their ids are planned from the sweep file."""

from __future__ import annotations

import math
import multiprocessing
import time
from pathlib import Path

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.config.sweep import Distribution, Search
from qarac_dist.plan.search import choose, new_sampler
from qarac_dist.submit.search import history, previous_state
from qarac_dist.track import search_record
from support import kill_while_holding_lock

SPACE = {"optimizer.lr": Distribution("loguniform", 1e-4, 1e-2), "model.config.num_hidden_layers": Distribution(
    "randint", 1, 4), "training.seed": Distribution("choice", values=[0, 1, 2])}


def objective(params: dict) -> float:
    """A smooth made-up score: best near lr 1e-3 and 2 layers."""
    return -(math.log10(params["optimizer.lr"]) + 3) ** 2 - 0.1 * (params["model.config.num_hidden_layers"] - 2) ** 2 \
        + 0.01 * params["training.seed"]


def _ask_through_the_record(layout: SweepLayout, search: Search, slot: int) -> dict:
    def pick(record):
        c = choose(search, "max", history(record), previous_state(record))
        return c.params, c.state, None

    return search_record.ask(layout, slot, f"t{slot}", pick).params


def _optuna_reference(search: Search, n: int) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=new_sampler(search))
    asked = []

    def trial_objective(trial):
        params = {"optimizer.lr": trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True),
                  "model.config.num_hidden_layers": trial.suggest_int("model.config.num_hidden_layers", 1, 4),
                  "training.seed": trial.suggest_categorical("training.seed", [0, 1, 2])}
        asked.append(params)
        return objective(params)

    def forget_cache(study, _trial):  # GP's fitted kernel is a starting guess the record does not keep
        study.sampler._gprs_cache_list = None

    study.optimize(trial_objective, n_trials=n, callbacks=[forget_cache] if search.sampler == "gp" else [])
    return asked


@pytest.mark.parametrize("sampler, n, startup", [("random", 12, None), ("tpe", 16, None), ("tpe", 10, 3),
                                                  ("gp", 13, None), ("qmc", 12, None)])
def test_one_trial_at_a_time_the_sweep_asks_what_optuna_asks(tmp_path, sampler, n, startup):
    search = Search(trials=n, sampler=sampler, seed=7, params=SPACE, startup_trials=startup)
    layout = SweepLayout(tmp_path)
    ours = []
    for slot in range(n):
        params = _ask_through_the_record(layout, search, slot)
        search_record.tell(layout, slot, "COMPLETE", objective(params), {})
        ours.append(params)
    assert ours == _optuna_reference(search, n)
    assert len(set(map(str, ours))) == n


def test_the_record_holds_data_of_one_size_per_ask_and_a_pickle_in_it_is_never_run(tmp_path):
    """Each ask line kept a whole pickled sampler (GP's grew with the trials) that every ask
    unpickled: code in a text record. Now a line is numbers and strings of one size whatever
    came before, and a line of the old kind is refused, its pickle never loaded."""
    import base64
    import json
    import pickle

    from qarac_dist.plan.search import RecordMismatch

    layout, search = SweepLayout(tmp_path / "a"), Search(trials=30, sampler="gp", seed=0, params=SPACE)
    for slot in range(30):
        search_record.tell(layout, slot, "COMPLETE", objective(_ask_through_the_record(layout, search, slot)), {})
    asks = [line for line in layout.search.read_text().splitlines() if '"ask"' in line]

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return all(map(plain, value)) if isinstance(value, list) else isinstance(value, (str, int, float, type(None)))

    assert all(plain(json.loads(line)) for line in asks) and max(map(len, asks)) - min(map(len, asks)) < 100

    poisoned = SweepLayout(tmp_path / "b")
    poisoned.root.mkdir()
    marker = tmp_path / "ran"
    payload = base64.b64encode(pickle.dumps(_Opens(marker))).decode()
    poisoned.search.write_text(json.dumps({"ask": 0, "trial": "t0", "params": {"optimizer.lr": 1e-3}, "told_before": 0,
                                           "time": 0.0, "sampler": payload, "study_attrs": {}}) + "\n")
    with pytest.raises(RecordMismatch, match="kept the sampler as a pickle, which is no longer read"):
        _ask_through_the_record(poisoned, search, 1)
    assert not marker.exists() and len(search_record.read(poisoned).asks) == 1


class _Opens:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_slot_asked_again_replays_its_values_and_a_second_result_is_ignored(tmp_path):
    layout, search = SweepLayout(tmp_path), Search(trials=3, sampler="tpe", seed=0, params=SPACE)
    first = _ask_through_the_record(layout, search, 0)
    assert _ask_through_the_record(layout, search, 0) == first
    search_record.tell(layout, 0, "COMPLETE", 1.0, {"10": 0.5})
    search_record.tell(layout, 0, "FAIL", None, {})
    record = search_record.read(layout)
    assert len(record.asks) == 1 and [(t.state, t.value, t.intermediate) for t in record.tells] == \
        [("COMPLETE", 1.0, {"10": 0.5})]


def test_the_latest_attempts_result_counts(tmp_path):
    """A trial that failed (a full disk, a refused requeue) and completed on the re-run the
    product asks for stayed FAIL to the sampler: the first result won."""
    layout, search = SweepLayout(tmp_path), Search(trials=3, sampler="tpe", seed=0, params=SPACE)
    _ask_through_the_record(layout, search, 0)
    search_record.tell(layout, 0, "FAIL", None, {}, attempt=1)
    search_record.tell(layout, 0, "COMPLETE", 0.7, {"10": 0.7}, attempt=2)
    search_record.tell(layout, 0, "FAIL", None, {}, attempt=2)  # the same attempt twice: ignored
    search_record.tell(layout, 0, "FAIL", None, {}, attempt=1)  # an older one's, late: ignored
    record = search_record.read(layout)
    assert [(t.state, t.attempt) for t in record.tells] == [("FAIL", 1), ("COMPLETE", 2)]
    assert [(t.state, t.value) for t in history(record)] == [("COMPLETE", 0.7)]


def test_a_result_the_runner_never_told_is_told_by_the_next_to_see_it(tmp_path):
    """A runner SIGKILLed between a step's end and its bookkeeping: state.json says COMPLETED,
    the record nothing. A re-run (the driver) tells it from the trial's own files."""
    from qarac_dist.submit.search import tell_ended
    from qarac_dist.submit.sweep_dir import TrialRecord
    from qarac_dist.track.trial_dir import TrialDir, TrialState

    layout, search = SweepLayout(tmp_path / "sweep"), Search(trials=3, sampler="tpe", seed=0, params=SPACE)
    _ask_through_the_record(layout, search, 0)
    _ask_through_the_record(layout, search, 1)
    records = []
    for slot, state in ((0, TrialState.COMPLETED), (1, TrialState.RUNNING)):
        trial = TrialDir(tmp_path / f"t{slot}")
        trial.begin(1)
        trial.update(state=state)
        trial.metrics_file.write_text('{"step": 4, "val_accuracy": 0.75}\n')
        records.append(TrialRecord(f"t{slot}", "x", {}, {}, str(trial.path), "local", attempt=1, slot=slot))
    tell_ended(layout, records, "accuracy", "max")
    tell_ended(layout, records, "accuracy", "max")  # once
    assert [(t.slot, t.state, t.value, t.attempt) for t in search_record.read(layout).tells] == \
        [(0, "COMPLETE", 0.75, 1)]  # the one still running is not told


def test_a_completed_trial_is_told_as_the_parent_ranks_it_the_score_of_its_best_model(tmp_path):
    """The record was told the best of the curve while best/ (and the parent's choice) held
    another model's score: after a rollback that undid best/, the model validated again is the
    best, and its score is what the sampler learns."""
    import json

    from qarac_dist.submit.search import tell
    from qarac_dist.track.trial_dir import BEST_INFO, TrialDir, TrialState

    layout, search = SweepLayout(tmp_path / "sweep"), Search(trials=3, sampler="tpe", seed=0, params=SPACE)
    _ask_through_the_record(layout, search, 0)
    _ask_through_the_record(layout, search, 1)
    trial = TrialDir(tmp_path / "t0")
    trial.begin(1)
    trial.metrics_file.write_text('{"step": 5, "val_accuracy": 0.9}\n{"step": 10, "val_accuracy": 0.7}\n')
    tell(layout, 0, "t0", trial, TrialState.COMPLETED, "accuracy", "max", 1)
    trial.best.mkdir()
    (trial.best / BEST_INFO).write_text(json.dumps({"step": 10, "metric": "accuracy", "metrics": {"accuracy": 0.7}}))
    tell(layout, 1, "t1", trial, TrialState.COMPLETED, "accuracy", "max", 1)
    assert [(t.slot, t.value) for t in search_record.read(layout).tells] == [(0, 0.9), (1, 0.7)]


def test_trials_still_running_are_asked_around_and_pruned_ones_are_learned_from(tmp_path):
    """Two slots asked before any result: TPE's constant liar keeps them apart; a pruned trial
    (its values at the rungs it reached) is replayed into the study as PRUNED."""
    layout, search = SweepLayout(tmp_path), Search(trials=4, sampler="random", seed=0, params=SPACE)
    a, b = _ask_through_the_record(layout, search, 0), _ask_through_the_record(layout, search, 1)
    assert a != b
    search_record.tell(layout, 1, "PRUNED", None, {"30": 0.25})
    told = history(search_record.read(layout))
    assert [t.state for t in told] == ["RUNNING", "PRUNED"] and told[1].intermediate == {"30": 0.25}


CHOICES = {"optimizer.lr": Distribution("choice", values=[1e-3, 3e-3]),
           "training.micro_batch_size": Distribution("choice", values=[4, 8, 16])}


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_configuration_already_tried_or_running_is_not_asked_again_until_the_space_is_used_up(tmp_path, sampler):
    """Six configurations: the first six asks are six different ones, whether the earlier ones
    finished, were pruned or still run (every third left running); the seventh repeats one,
    since none is left (the sampler is not asked forever)."""
    search = Search(trials=7, sampler=sampler, seed=3, params=CHOICES, startup_trials=2)
    layout = SweepLayout(tmp_path)
    asked = []
    for slot in range(7):
        asked.append(_ask_through_the_record(layout, search, slot))
        if slot % 3 == 1:
            search_record.tell(layout, slot, "PRUNED", None, {"10": 0.5})
        elif slot % 3 == 0:
            value = asked[-1]["optimizer.lr"] * asked[-1]["training.micro_batch_size"]
            search_record.tell(layout, slot, "COMPLETE", value, {})
    assert len({str(a) for a in asked[:6]}) == 6
    assert str(asked[6]) in {str(a) for a in asked[:6]}


def _ask_and_tell(root: str, slot: int, start_at: float) -> None:
    layout = SweepLayout(Path(root))
    search = Search(trials=32, sampler="tpe", seed=0, params=SPACE)
    while time.time() < start_at:
        pass
    params = _ask_through_the_record(layout, search, slot % 32)
    search_record.tell(layout, slot % 32, "COMPLETE", objective(params), {})


def test_64_processes_asking_and_telling_at_once_lose_nothing_and_ask_nothing_twice(tmp_path):
    """Two processes per slot, all at the same moment: one ask line per slot (the second
    replays it), one result per slot, and each ask was chosen from every result before it."""
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 2
    procs = [ctx.Process(target=_ask_and_tell, args=(str(tmp_path), k, start_at)) for k in range(64)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 64
    layout = SweepLayout(tmp_path)
    record = search_record.read(layout)
    assert sorted(a.slot for a in record.asks) == list(range(32))
    assert sorted(t.slot for t in record.tells) == list(range(32))
    lines = layout.search.read_text().splitlines()
    tells_before = 0
    for line in lines:  # told_before: the results recorded above its line, all of them
        if '"ask"' in line:
            assert f'"told_before": {tells_before},' in line
        else:
            tells_before += 1


def test_a_process_killed_while_it_holds_the_record_does_not_block_the_next_ask(tmp_path):
    layout = SweepLayout(tmp_path)
    kill_while_holding_lock(layout.search)
    assert _ask_through_the_record(layout, Search(trials=1, sampler="random", params=SPACE), 0)


def test_a_line_cut_short_by_a_killed_writer_is_dropped_and_a_damaged_one_is_named(tmp_path):
    layout, search = SweepLayout(tmp_path), Search(trials=2, sampler="random", params=SPACE)
    _ask_through_the_record(layout, search, 0)
    with open(layout.search, "a") as f:
        f.write('{"tell": 0, "state": "COMP')
    assert len(search_record.read(layout).tells) == 0
    search_record.tell(layout, 0, "COMPLETE", 0.5, {})
    assert [t.value for t in search_record.read(layout).tells] == [0.5]
    layout.search.write_text("not json\n")
    record = search_record.read(layout)  # named and skipped (test_hostile_inputs has more)
    assert record.damaged == [f"{layout.search}: line 1 is not a search record, skipped: 'not json'"]


def _spec(tmp_path, **search):
    import yaml

    from qarac_dist.config.sweep import load_sweep
    from support import tiny_config

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"),
                                    "runs_dir": str(tmp_path / "runs"), "executor": "local", "search": {
                                        "trials": 3, "params": {"optimizer.lr": {"distribution": "loguniform",
                                                                                 "low": 1e-4, "high": 1e-2}}, **search}}))
    return load_sweep(path)


def test_a_search_plans_one_trial_per_slot_with_ids_that_follow_the_space(tmp_path):
    from qarac_dist.plan import plan

    spec, base = _spec(tmp_path)
    slots = plan(spec, base)
    assert [t.slot for t in slots] == [0, 1, 2] and len({t.id for t in slots}) == 3
    assert [t.id for t in plan(*_spec(tmp_path))] == [t.id for t in slots]  # planned again: the same
    assert not {t.id for t in plan(*_spec(tmp_path, seed=1))} & {t.id for t in slots}  # another search
    assert all(t.config["output"]["dir"].endswith(f"/trials/{t.id}") for t in slots)


def test_warm_start_tells_the_finished_trials_of_another_sweep_within_this_space(tmp_path):
    """What fits is told, and how many were dropped is said; another space, metric or mode is
    refused in one line each (an earlier sweep's accuracy was told as this sweep's loss)."""
    import dataclasses

    from qarac_dist.config import ConfigError
    from qarac_dist.config.schema import to_dict
    from qarac_dist.submit.search import warm_start
    from qarac_dist.submit.sweep_dir import Manifest, write_sweep_file

    old = SweepLayout(tmp_path / "old")
    search = Search(trials=3, sampler="random", params=SPACE)
    for slot, value in ((0, 1.0), (1, None), (2, 2.0)):
        _ask_through_the_record(old, search, slot)
        if value is not None:
            search_record.tell(old, slot, "COMPLETE", value, {})
    Manifest("old", "local", "loss", "min").save(old.root)
    write_sweep_file(old.root, {"search": to_dict(search)}, {}, "old.yaml", [])
    told, line = warm_start(Search(trials=3, sampler="tpe", params=SPACE, warm_start=str(old.root)), "loss", "min")
    assert sorted(t.value for t in told) == [1.0, 2.0]  # the running one is left out
    assert line == f"told first: 2 of the 2 finished trials of {old.root}"
    lowest = min(told, key=lambda t: t.params["optimizer.lr"])
    narrower = Search(trials=3, sampler="tpe", warm_start=str(old.root), params={
        **SPACE, "optimizer.lr": Distribution("loguniform", 1e-4, lowest.params["optimizer.lr"] * 1.0001)})
    told, line = warm_start(narrower, "loss", "min")
    assert [t.value for t in told] == [lowest.value]  # the other lies outside
    assert line.endswith("told first: 1 of the 2 finished trials of " + str(old.root) + "; 1 dropped, outside this "
                         "sweep's ranges")
    refusals = {
        "select": (Search(trials=3, params=SPACE, warm_start=str(old.root)), "accuracy", "max",
                   "that sweep selected min loss, this one max accuracy: its values would be told as this sweep's"),
        "keys": (Search(trials=3, params={"optimizer.lr": SPACE["optimizer.lr"]}, warm_start=str(old.root)), "loss",
                 "min", f"that sweep searched {', '.join(sorted(SPACE))}, this one optimizer.lr"),
        "distribution": (Search(trials=3, warm_start=str(old.root), params={
            **SPACE, "optimizer.lr": dataclasses.replace(SPACE["optimizer.lr"], distribution="uniform")}),
            "loss", "min",
            "search.params.optimizer.lr was loguniform there, uniform here")}
    for name, (searched, metric, mode, expected) in refusals.items():
        with pytest.raises(ConfigError) as err:
            warm_start(searched, metric, mode)
        assert expected in str(err.value) and str(err.value).startswith(f"{old.root}: search.warm_start: "), name
