"""Successive halving's rule, against Optuna's SuccessiveHalvingPruner on random arrivals, and
its record: a rung file that many processes append to at once, decisions replayed."""

from __future__ import annotations

import random

import pytest
import yaml

from qarac_dist.base.layout import SweepLayout
from qarac_dist.plan.asha import budget, rung_steps
from qarac_dist.track.rungs import keeps_going
from support import write_config


@pytest.mark.parametrize("grace, factor, max_steps, expected", [
    (25, 3, 225, [25, 75]), (25, 3, 226, [25, 75, 225]), (10, 2, 10, []), (1, 4, 100, [1, 4, 16, 64]),
])
def test_rungs(grace, factor, max_steps, expected):
    assert rung_steps(grace, factor, max_steps) == expected


NAN = float("nan")


def _scores(values, loss=1.0):
    return [(v, loss) for v in values]


@pytest.mark.parametrize("recorded, score, mode, expected", [
    pytest.param([], (0.1, 1.0), "max", True, id="first-arrival"),
    pytest.param(_scores([0.9]), (0.1, 1.0), "max", True, id="second-arrival-below-factor"),
    pytest.param(_scores([0.9, 0.8]), (0.1, 1.0), "max", False, id="third-not-top-third"),
    pytest.param(_scores([0.9, 0.8]), (0.95, 1.0), "max", True, id="third-best"),
    pytest.param(_scores([0.9, 0.8]), (0.9, 1.0), "max", True, id="tie-on-metric-and-loss-continues"),
    pytest.param(_scores([0.9, 0.8]), (0.9, 0.5), "max", True, id="tie-on-metric-lower-loss-continues"),
    pytest.param(_scores([0.9, 0.8]), (0.9, 1.5), "max", False, id="tie-on-metric-higher-loss-stops"),
    pytest.param([(0.25, 1.38), (0.25, 1.37)], (0.25, 1.36), "max", True, id="chance-level-ties-ranked-by-loss"),
    pytest.param([(0.25, 1.38), (0.25, 1.36)], (0.25, 1.37), "max", False, id="chance-level-tie-not-lowest-loss"),
    pytest.param(_scores([0.9, 0.8]), (0.9, NAN), "max", False, id="tie-with-nan-loss-ranks-last"),
    pytest.param(_scores([0.2, 0.3]), (0.1, 1.0), "min", True, id="min-mode"),
    pytest.param(_scores([0.2, 0.3]), (0.25, 1.0), "min", False, id="min-mode-not-top"),
    pytest.param(_scores([0.1, 0.2, 0.3, 0.4, 0.5]), (0.45, 1.0), "max", True, id="top-two-of-six"),
    pytest.param(_scores([0.1, 0.2, 0.3, 0.4, 0.5]), (0.35, 1.0), "max", False, id="third-of-six"),
    pytest.param([], (NAN, 1.0), "max", False, id="nan-stops"),
    pytest.param(_scores([NAN, NAN]), (0.0, 1.0), "max", True, id="anything-beats-nan"),
    pytest.param([(NAN, 0.1), (NAN, 0.2)], (0.0, NAN), "max", True, id="a-finite-metric-beats-nan-whatever-the-loss"),
])
def test_keeps_going_table(recorded, score, mode, expected):
    assert keeps_going(score, recorded, 3, mode) is expected


def test_budget_counts_the_halving():
    b = budget(9, 90, [10, 30], 3)
    assert b.most == 810 and b.halving == 9 * 10 + 3 * 20 + 1 * 60


def _optuna_world(seed: int):
    """Random trials arriving at random times at two rungs, decided by Optuna's pruner; yields
    (score, scores recorded at that rung before it, Optuna's decision, factor, mode) per arrival.
    Optuna sees the metric only; the loss is drawn at random beside it."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    factor, mode = rng.choice([2, 3, 4]), rng.choice(["maximize", "minimize"])
    grace, num_trials = 5, rng.randint(3, 25)
    study = optuna.create_study(direction=mode, pruner=optuna.pruners.SuccessiveHalvingPruner(
        min_resource=grace, reduction_factor=factor, min_early_stopping_rate=0))
    trials = [study.ask() for _ in range(num_trials)]
    # Values with deliberate ties (few distinct values), some trials' values improving by rung.
    scores = {t.number: [(round(rng.random(), 1), rng.random()) for _ in range(2)] for t in trials}
    waiting = [(t, 0) for t in trials]
    recorded: dict[int, list] = {0: [], 1: []}
    while waiting:
        trial, rung = waiting.pop(rng.randrange(len(waiting)))  # any trial may arrive next
        score = scores[trial.number][rung]
        trial.report(score[0], step=grace * factor ** rung)
        pruned = trial.should_prune()
        yield score, list(recorded[rung]), not pruned, factor, "max" if mode == "maximize" else "min"
        recorded[rung].append(score)
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif rung == 0:
            waiting.append((trial, 1))
        else:
            study.tell(trial, score[0])


def _optuna_threshold(before: list, value: float, factor: int, mode: str) -> float:
    """The metric value Optuna compares with (its `_is_trial_promotable_to_next_rung`)."""
    values = sorted([v for v, _ in before] + [value], reverse=mode == "max")
    return values[max(len(values) // factor, 1) - 1]


@pytest.mark.parametrize("seed", range(200))
def test_the_rule_decides_as_optuna_does_except_for_first_arrivals_and_ties(seed):
    for score, before, optuna_continues, factor, mode in _optuna_world(seed):
        ours = keeps_going(score, before, factor, mode)
        value, loss = score
        if len(before) + 1 < factor:  # a first arrival continues here; in Optuna only if best so far
            best = value >= max(v for v, _ in before + [score]) if mode == "max" else value <= min(v for v, _ in before + [score])
            assert ours and optuna_continues == best
        elif value != _optuna_threshold(before, value, factor, mode):
            assert ours == optuna_continues, (score, before, factor, mode)
        else:  # a tie on the metric at Optuna's threshold, which continues there: here the loss decides
            top = (len(before) + 1) // factor
            level = [l for v, l in before + [score] if v == value]
            better = sum(v > value if mode == "max" else v < value for v, _ in before)
            assert optuna_continues and ours == (better + sorted(level).index(loss) < top), (score, before)


def test_the_differential_test_sees_both_rules_at_work():
    """Across the random worlds, both decisions occur in the compared region, ties at the
    threshold are decided both ways by the loss, and first arrivals that Optuna stops do occur
    (so the comparison above is not vacuous)."""
    compared = {True: 0, False: 0}
    tie = {True: 0, False: 0}
    first_stopped = 0
    for seed in range(200):
        for score, before, optuna_continues, factor, mode in _optuna_world(seed):
            if len(before) + 1 < factor:
                first_stopped += not optuna_continues
            elif score[0] != _optuna_threshold(before, score[0], factor, mode):
                compared[optuna_continues] += 1
            else:
                tie[keeps_going(score, before, factor, mode)] += 1
    assert compared[True] > 100 and compared[False] > 100 and first_stopped > 10
    assert tie[True] > 20 and tie[False] > 20


def _arrive(args):
    """In a separate process: wait for the start file, then arrive at rung 0."""
    import os
    import time
    from pathlib import Path

    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.track import rungs

    sweep_dir, trial, value, go = args
    while not os.path.exists(go):
        time.sleep(0.0005)
    arrival = rungs.arrive(SweepLayout(Path(sweep_dir)), 0, trial, (value, 1.0 - value), 10,
                           lambda mine, before: rungs.keeps_going(mine, before, 3, "max"))
    return trial, arrival.keeps_going, arrival.seen


def test_trials_arriving_at_once_are_put_in_one_order_and_each_follows_the_rule(tmp_path):
    """Twelve real processes released together: each gets a decision, the record holds each once,
    and every recorded decision is the rule applied to the values recorded before it."""
    import multiprocessing

    from qarac_dist.track import rungs

    go = tmp_path / "go"
    values = [0.5, 0.9, 0.1, 0.7, 0.7, 0.3, 0.95, 0.2, 0.6, 0.8, 0.4, 0.05]
    jobs = [(str(tmp_path), f"t{i}", v, str(go)) for i, v in enumerate(values)]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        pending = pool.map_async(_arrive, jobs)
        go.touch()
        results = pending.get(timeout=120)
    recorded = rungs.read(SweepLayout(tmp_path), 0)
    assert sorted(a.trial for a in recorded) == sorted(f"t{i}" for i in range(12))
    for i, a in enumerate(recorded):
        assert a.seen == i
        assert a.keeps_going == keeps_going(a.score, [b.score for b in recorded[:i]], 3, "max")
    assert {t: (going, seen) for t, going, seen in results} == {a.trial: (a.keeps_going, a.seen) for a in recorded}


def test_a_decision_once_recorded_is_replayed_and_a_cut_line_is_dropped(tmp_path):
    from qarac_dist.track import rungs

    def rule(mine, before):
        return keeps_going(mine, before, 2, "max")

    assert rungs.arrive(SweepLayout(tmp_path), 0, "a", (0.9, 0.3), 5, rule).keeps_going
    assert not rungs.arrive(SweepLayout(tmp_path), 0, "b", (0.1, 0.7), 5, rule).keeps_going
    replay = rungs.arrive(SweepLayout(tmp_path), 0, "b", (0.99, 0.1), 5, rule)  # a requeued job: another score, same decision
    assert not replay.keeps_going and replay.score == (0.1, 0.7)
    with open(SweepLayout(tmp_path).rung(0), "a") as f:
        f.write('{"trial": "c", "value": 0.')  # a writer killed mid-line
    assert [a.trial for a in rungs.read(SweepLayout(tmp_path), 0)] == ["a", "b"]
    assert rungs.arrive(SweepLayout(tmp_path), 0, "c", (0.95, 0.2), 5, rule).keeps_going
    assert [a.trial for a in rungs.read(SweepLayout(tmp_path), 0)] == ["a", "b", "c"]
    assert SweepLayout(tmp_path).rung(0).read_text().count("\n") == 3


def test_an_arrival_a_rollback_undid_is_withdrawn_and_decided_again(tmp_path):
    """The rung kept the score of steps a rollback undid: later trials were compared against a
    state that no longer existed. A withdrawal line takes it back, in the rule, the replay and a
    repair alike; the trial arrives again when it reaches the rung."""
    from qarac_dist.track import rungs
    from qarac_dist.track.trial_dir import TrialDir

    layout = SweepLayout(tmp_path)

    def rule(mine, before):
        return keeps_going(mine, before, 2, "max")

    assert not rungs.withdraw(layout, 0, "a", 3)  # nothing recorded: nothing written
    assert not layout.rung(0).exists()
    rungs.arrive(layout, 0, "a", (0.99, 0.1), 5, rule)  # the undone score
    assert not rungs.arrive(layout, 0, "b", (0.5, 0.5), 5, rule).keeps_going  # below the undone one
    assert rungs.withdraw(layout, 0, "a", 3) and not rungs.withdraw(layout, 0, "a", 3)
    assert [a.trial for a in rungs.read(layout, 0)] == ["b"]
    again = rungs.arrive(layout, 0, "a", (0.2, 0.9), 5, rule)  # decided anew, on its new score
    assert not again.keeps_going and again.score == (0.2, 0.9)
    assert rungs.arrive(layout, 0, "c", (0.6, 0.4), 5, rule).keeps_going  # compared with what stands
    with open(layout.rung(0), "ab") as f:
        f.write(b"damaged\n")
    assert rungs.rebuild(layout, 0, "accuracy", [("a", TrialDir(tmp_path / "a"), 5)]) is not None
    assert [(a.trial, a.value) for a in rungs.read(layout, 0)] == [("b", 0.5), ("a", 0.2), ("c", 0.6)]


def _asha_sweep(tmp_path, asha: dict, **training):

    from support import tiny_config

    base = tiny_config(tmp_path / "cache", tmp_path / "out", training={"max_steps": 90, **training},
                       evaluation={"every_steps": 10})
    spec = {"name": "halving", "base": base, "executor": "local", "grid": {"optimizer.lr": [1e-3, 2e-3, 3e-3]},
            "select": {"metric": "accuracy", "mode": "max"}, "asha": asha, "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / "halving.yaml"
    write_config(path, spec)
    return path


def test_the_plan_gives_each_trial_its_rungs_and_the_dry_run_shows_them(tmp_path, monkeypatch, capsys):
    from qarac_dist import sweep
    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.plan import plan

    path = _asha_sweep(tmp_path, {"grace_steps": 10, "reduction_factor": 3})
    spec, base = load_sweep(path)
    trials = plan(spec, base, str(path))
    for trial in trials:
        assert trial.config["asha"] == {"rungs": [10, 30], "reduction_factor": 3, "metric": "accuracy", "mode": "max"}
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "successive halving on max accuracy: rungs at steps 10, 30, reduction factor 3" in out
    assert "training steps: at most 270 (no trial stopped); about 110 if each rung passes 1/3" in out
    assert "trials start in the order of their ids, a reproducible shuffle (asha.start: shuffled)" in out


@pytest.mark.parametrize("start, expected", [
    pytest.param(None, "ids", id="default-shuffled"),
    pytest.param("shuffled", "ids", id="shuffled"),
    pytest.param("listed", "listed", id="listed"),
])
def test_trials_start_in_the_order_of_their_ids_unless_listed(tmp_path, start, expected):
    """A grid is written in sorted order; with successive halving its first trials pass the
    first rungs unopposed, so they start shuffled, by id, unless the file asks otherwise."""
    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.plan import plan

    asha = {"grace_steps": 10, "reduction_factor": 3, **({"start": start} if start else {})}
    path = _asha_sweep(tmp_path, asha)
    fixed = yaml.safe_load(path.read_text())
    fixed["base"]["data"]["cache_dir"] = "data_cache"  # part of the ids: no tmp path in it, so they are known
    write_config(path, fixed)
    spec, base = load_sweep(path)
    trials = plan(spec, base, str(path))
    lrs = [t.config["optimizer"]["lr"] for t in trials]
    ids = [t.id for t in trials]
    if expected == "ids":
        assert ids == sorted(ids) and lrs == [3e-3, 1e-3, 2e-3]
    else:
        assert lrs == [1e-3, 2e-3, 3e-3] and ids != sorted(ids)
    no_asha = yaml.safe_load(path.read_text())
    del no_asha["asha"]
    write_config(path, no_asha)
    spec, base = load_sweep(path)
    assert [t.config["optimizer"]["lr"] for t in plan(spec, base, str(path))] == [1e-3, 2e-3, 3e-3]


def test_a_record_written_before_losses_were_kept_reads_with_a_nan_loss(tmp_path):
    import math

    from qarac_dist.track import rungs

    SweepLayout(tmp_path).asha.mkdir()
    SweepLayout(tmp_path).rung(0).write_text('{"trial": "a", "value": 0.5, "step": 5, "continue": true, "seen": 0, '
                                            '"time": 1.0}\n')
    (a,) = rungs.read(SweepLayout(tmp_path), 0)
    assert a.value == 0.5 and math.isnan(a.loss) and a.keeps_going


@pytest.mark.parametrize("asha, expected", [
    pytest.param({"grace_steps": 15, "reduction_factor": 3},
                 "asha.grace_steps: a rung falls at step 15, but the trials validate every 10 steps", id="off-rung"),
    pytest.param({"reduction_factor": 3}, "asha.grace_steps: required", id="no-grace"),
    pytest.param({"grace_steps": 10, "reduction_factor": 1}, "asha.reduction_factor: expected at least 2", id="factor-1"),
    pytest.param({"grace_steps": 10, "reduction_factors": 3}, "asha.reduction_factors: unknown key", id="typo"),
    pytest.param({"grace_steps": 10, "start": "random"}, "asha.start: expected one of 'shuffled', 'listed'",
                 id="start-unknown"),
])
def test_a_plan_whose_trials_miss_a_rung_is_refused(tmp_path, monkeypatch, capsys, asha, expected):
    from qarac_dist import sweep

    path = _asha_sweep(tmp_path, asha)
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
