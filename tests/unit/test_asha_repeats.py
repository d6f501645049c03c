"""Successive halving with repeats: a rung decides a configuration on its seeds' mean, taken by
the arrival that completes it (or, when the rest ended before the rung, by the next seed that
looks), replayed and withdrawn like a trial's decision, rebuilt and shown in the rung table."""

from __future__ import annotations

import json
import statistics

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.track import rung_report, rungs
from qarac_dist.track.rungs import Seeds, keeps_going
from qarac_dist.track.trial_dir import TrialDir, TrialState

C1, C2, C3 = Seeds("c1", ("a1", "a2")), Seeds("c2", ("b1", "b2")), Seeds("c3", ("d1", "d2"))


def rule(mine, before):
    return keeps_going(mine, before, 2, "max")


def _arrive(layout, seeds, trial, value, rung=0, step=5):
    return rungs.arrive(layout, rung, trial, (value, 1 - value), step, rule, seeds)


def _ended(layout, trial, state=TrialState.FAILED):
    TrialDir(layout.trial(trial)).begin(1)
    TrialDir(layout.trial(trial)).update(state=state)


def test_a_rung_decides_on_the_mean_of_the_seeds_which_are_stopped_together(tmp_path):
    """c2's best seed beats every seed of c1, but its mean does not: c2 stops, both seeds. The
    first seed went on when it arrived and learns at its next look that it was stopped."""
    layout = SweepLayout(tmp_path)
    assert _arrive(layout, C1, "a1", 0.8).keeps_going
    assert _arrive(layout, C1, "a2", 0.6).keeps_going  # completes c1: the first mean decided goes on
    first = _arrive(layout, C2, "b1", 0.95)  # better than any seed of c1 ...
    assert first.keeps_going and first.pending
    last = _arrive(layout, C2, "b2", 0.3)  # ... but the mean, 0.625, is below c1's 0.7
    assert not last.keeps_going and not last.pending
    record = rungs.read_record(layout, 0)
    c1, c2 = record.decisions["c1"], record.decisions["c2"]
    assert (c1.value, c1.seeds, c1.keeps_going, c1.seen) == (pytest.approx(0.7), ("a1", "a2"), True, 0)
    assert (c2.value, c2.seeds, c2.keeps_going, c2.seen, c2.without) == (pytest.approx(0.625), ("b1", "b2"), False,
                                                                        1, ())
    assert c2.loss == pytest.approx(statistics.fmean([0.05, 0.7]))
    assert {a.trial: a.keeps_going for a in rungs.read(layout, 0)} == {"a1": True, "a2": True, "b1": False,
                                                                       "b2": False}
    assert rungs.stopped_at(layout, "b1", [5, 10], 9, C2, rule) == {"rung": 0, "step": 5}
    assert rungs.stopped_at(layout, "a1", [5, 10], 9, C1, rule) is None
    lines = layout.rung(0).read_text()
    assert _arrive(layout, C2, "b2", 0.99).keeps_going is False  # a requeued job replays: nothing decided again
    assert rungs.stopped_at(layout, "b1", [5, 10], 9, C2, rule) == {"rung": 0, "step": 5}
    assert layout.rung(0).read_text() == lines


def test_seeds_arriving_in_any_order_are_decided_once_each_configuration_by_the_rule_on_means(tmp_path):
    import random

    layout = SweepLayout(tmp_path)
    configurations = [Seeds(f"c{i}", (f"c{i}s0", f"c{i}s1", f"c{i}s2")) for i in range(6)]
    values = {t: random.Random(t).random() for c in configurations for t in c.trials}
    order = [(c, t) for c in configurations for t in c.trials]
    random.Random(7).shuffle(order)
    for c, t in order:
        _arrive(layout, c, t, values[t])
    decisions = list(rungs.read_record(layout, 0).decisions.values())
    assert sorted(d.configuration for d in decisions) == [c.configuration for c in configurations]
    for i, d in enumerate(decisions):
        assert d.value == pytest.approx(statistics.fmean(values[t] for t in d.seeds)) and d.seen == i
        assert d.keeps_going == keeps_going(d.score, [e.score for e in decisions[:i]], 2, "max")
    assert sum(not d.keeps_going for d in decisions) > 0


def test_a_seed_that_failed_before_the_rung_is_left_out_and_named(tmp_path):
    """d2 failed before reaching the rung: d1 arriving decides c3 on its own score, saying
    without which seed; c1's a2 failed after a1 arrived: a1 decides at its next look."""
    layout = SweepLayout(tmp_path)
    _arrive(layout, C2, "b1", 0.9), _arrive(layout, C2, "b2", 0.9)
    _ended(layout, "d2")
    alone = _arrive(layout, C3, "d1", 0.2)
    d = rungs.read_record(layout, 0).decisions["c3"]
    assert (d.seeds, d.without, d.value, d.keeps_going) == (("d1",), ("d2",), 0.2, False) and not alone.keeps_going
    TrialDir(layout.trial("a2")).begin(1)  # running: a1 arrives and goes on, its configuration waiting
    assert _arrive(layout, C1, "a1", 0.95).pending
    assert rungs.stopped_at(layout, "a1", [5, 10], 9, C1, rule) is None
    assert "c1" not in rungs.read_record(layout, 0).decisions
    _ended(layout, "a2")
    assert rungs.stopped_at(layout, "a1", [5, 10], 9, C1, rule) is None  # decided now: 0.95 is the best, it goes on
    d = rungs.read_record(layout, 0).decisions["c1"]
    assert (d.seeds, d.without, d.keeps_going, d.seen) == (("a1",), ("a2",), True, 2)
    late = _arrive(layout, C3, "d2", 0.99)  # d2 ran again and reaches the rung: it follows c3's decision
    assert not late.keeps_going and len(rungs.read_record(layout, 0).decisions) == 3


def test_a_seed_submitted_again_is_waited_for_though_its_last_attempt_failed(tmp_path):
    """A re-run resubmitted both seeds (attempt 2 each); a2's state.json still says attempt 1
    FAILED until its new job starts: a1 arriving waits for it, and the mean is of both."""
    layout = SweepLayout(tmp_path)
    again = Seeds("c1", ("a1", "a2"), (2, 2))
    _ended(layout, "a2")
    assert _arrive(layout, again, "a1", 0.5).pending
    TrialDir(layout.trial("a2")).begin(2)
    assert not _arrive(layout, again, "a2", 0.7).pending
    assert rungs.read_record(layout, 0).decisions["c1"].seeds == ("a1", "a2")
    _ended_in(layout, "b2", 3)  # a later attempt than the job knew of ended: it cannot report either
    assert not _arrive(layout, Seeds("c2", ("b1", "b2"), (1, 1)), "b1", 0.5).pending


def _ended_in(layout, trial, attempt):
    TrialDir(layout.trial(trial)).begin(attempt)
    TrialDir(layout.trial(trial)).update(state=TrialState.FAILED)


@pytest.mark.parametrize("state", [TrialState.CANCELLED, TrialState.COMPLETED, TrialState.PRUNED])
def test_any_seed_that_ended_without_reaching_the_rung_cannot_report(tmp_path, state):
    layout = SweepLayout(tmp_path)
    _ended(layout, "a2", state)
    assert not _arrive(layout, C1, "a1", 0.5).pending


def test_a_withdrawn_seed_takes_back_a_continue_but_not_a_stop(tmp_path):
    """A rollback undid a seed's steps to the rung: a configuration told to go on is decided
    again when that seed arrives again; one told to stop stays stopped (its seeds may be PRUNED)."""
    layout = SweepLayout(tmp_path)
    _arrive(layout, C1, "a1", 0.9), _arrive(layout, C1, "a2", 0.9)
    _arrive(layout, C2, "b1", 0.1), _arrive(layout, C2, "b2", 0.1)
    assert rungs.withdraw(layout, 0, "a2", 3) and rungs.withdraw(layout, 0, "b2", 3)
    record = rungs.read_record(layout, 0)
    assert list(record.decisions) == ["c2"]
    assert [(a.trial, a.pending) for a in map(record.resolved, record.arrivals)] == [("a1", True), ("b1", False)]
    again = _arrive(layout, C1, "a2", 0.0)  # its new score: mean 0.45 against c2's 0.1, still best
    d = rungs.read_record(layout, 0).decisions["c1"]
    assert again.keeps_going and d.value == pytest.approx(0.45) and d.seen == 1
    assert not _arrive(layout, C2, "b2", 0.99).keeps_going  # c2's stop stands


def test_a_damaged_record_with_repeats_is_rebuilt_with_its_decisions(tmp_path):
    layout = SweepLayout(tmp_path / "s")
    _arrive(layout, C1, "a1", 0.9)
    with open(layout.rung(0), "ab") as f:
        f.write(b"damaged\n")
    trials, configurations = [], {}
    for name, value, state in (("a2", 0.7, TrialState.COMPLETED), ("b1", 0.2, TrialState.PRUNED),
                               ("b2", 0.4, TrialState.RUNNING), ("d1", 0.5, TrialState.RUNNING)):
        trial = TrialDir(tmp_path / name)
        trial.begin(1)
        trial.update(state=state, rung=0 if state == TrialState.PRUNED else None)
        trial.metrics_file.write_text(json.dumps({"step": 5, "val_accuracy": value, "val_loss": 1 - value}) + "\n")
        trials.append((name, trial, 5))
        configurations[name] = {"a": "c1", "b": "c2", "d": "c3"}[name[0]]
    configurations.update(a1="c1", d2="c3")
    assert rungs.rebuild(layout, 0, "accuracy", trials, configurations) is not None
    record = rungs.read_record(layout, 0)
    assert {c: (d.seeds, d.keeps_going) for c, d in record.decisions.items()} == {
        "c1": (("a1", "a2"), True), "c2": (("b1", "b2"), False)}  # c3: d2 not recorded, left to its seeds
    assert record.decisions["c2"].value == pytest.approx(0.3)
    assert [a.configuration for a in record.arrivals] == ["c1", "c1", "c2", "c2", "c3"]


def test_a_lost_stop_is_rebuilt_from_the_seeds_pruned_at_the_rung(tmp_path):
    """Both seeds' lines are whole (each said continue: its configuration was not decided yet)
    but the decision that stopped them is damaged: their PRUNED states say it was a stop."""
    layout = SweepLayout(tmp_path / "s")
    _arrive(layout, C1, "a1", 0.9), _arrive(layout, C1, "a2", 0.9)
    _arrive(layout, C2, "b1", 0.1), _arrive(layout, C2, "b2", 0.1)
    lines = layout.rung(0).read_text().splitlines()
    assert json.loads(lines[-1])["configuration"] == "c2" and json.loads(lines[-1])["continue"] is False
    layout.rung(0).write_text("\n".join(lines[:-1] + ['{"configuration": "c2", "seeds": GARBAGE']) + "\n")
    trials = []
    for name in ("b1", "b2"):
        trial = TrialDir(layout.trial(name))
        trial.begin(1)
        trial.update(state=TrialState.PRUNED, rung=0)
        trials.append((name, trial, 5))
    assert rungs.rebuild(layout, 0, "accuracy", trials, {"a1": "c1", "a2": "c1", "b1": "c2", "b2": "c2"})
    assert not rungs.read_record(layout, 0).decisions["c2"].keeps_going


def test_the_rung_table_shows_seeds_and_decisions(tmp_path):
    layout = SweepLayout(tmp_path)
    _arrive(layout, C1, "a1", 0.5), _arrive(layout, C1, "a2", 0.7), _arrive(layout, C2, "b1", 0.25)
    _ended(layout, "b2", TrialState.FAILED)
    rungs.stopped_at(layout, "b1", [5], 5, C2, rule)
    _arrive(layout, C3, "d1", 0.1)
    rows = [line.split(",") for line in rung_report.table(layout).splitlines()]
    assert rows[0] == ["rung", "step", "trial", "value", "loss", "decision", "recorded_before", "configuration",
                       "mean_of", "without"]
    seeds = {r[2]: (r[5], r[7]) for r in rows[1:] if r[2]}
    assert seeds == {"a1": ("continue", "c1"), "a2": ("continue", "c1"), "b1": ("stop", "c2"),
                     "d1": ("waiting", "c3")}
    decisions = {r[7]: (float(r[3]), r[5], r[8], r[9]) for r in rows[1:] if not r[2]}
    assert decisions == {"c1": (pytest.approx(0.6), "continue", "a1 a2", ""), "c2": (0.25, "stop", "b1", "b2")}


def test_a_plan_with_repeats_and_successive_halving_gives_each_seed_its_rungs_and_siblings(tmp_path, monkeypatch,
                                                                                         capsys):
    from qarac_dist import sweep
    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.plan import plan
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord
    from support import tiny_config, write_config

    base = tiny_config(tmp_path / "cache", tmp_path / "out", training={"max_steps": 40}, evaluation={"every_steps": 10})
    path = tmp_path / "s.yaml"
    write_config(path, {"name": "s", "base": base, "grid": {"optimizer.lr": [1e-3, 2e-3]}, "repeats": 3,
                        "asha": {"grace_steps": 10, "reduction_factor": 2}, "runs_dir": str(tmp_path / "runs")})
    spec, base = load_sweep(path)
    trials = plan(spec, base, str(path))
    assert len(trials) == 6 and len({t.configuration for t in trials}) == 2
    assert all(t.config["asha"]["rungs"] == [10, 20] for t in trials)
    manifest = Manifest("s", "local", "loss", "min")
    for t in trials:
        manifest.trials[t.id] = TrialRecord(t.id, t.label, t.overrides, t.config, t.config["output"]["dir"], "local",
                                            configuration=t.configuration)
    for t in trials:
        siblings = manifest.seeds_of(manifest.trials[t.id])
        assert t.id in siblings and {manifest.trials[s].configuration for s in siblings} == {t.configuration}
        assert len(siblings) == 3
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out  # 2 configurations halve to 1 at each rung, with their 3 seeds: 3 x (2x10 + 10 + 20)
    assert ("training steps: at most 240 (no trial stopped); about 150 if each rung passes 1/2 of the configurations "
            "(3 seeds each, decided on their mean) reaching it") in out, out
