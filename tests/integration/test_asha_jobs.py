"""Successive halving on the real local SLURM cluster and with real processes: trials of one
job array stopped at rungs, decisions consistent with the rule whoever arrives when, a
preempted trial recorded once, a killed and re-run trial's decision replayed, a configuration's
seeds (repeats) pruned together on their mean."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys


from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track import rungs, usage
from qarac_dist.track.mlflow_client import client
from qarac_dist.track.trial_dir import read_metrics
from support import HELPERS, OUTSIDE_S, run_sweep, slurm_seconds, table_rows, tiny_config, wait_for, write_config


def _sweep(tmp_path, data_cache, name: str, lrs: list[float], executor: str = "slurm", base: dict | None = None,
           **fields):
    base = base or tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 16},
                               evaluation={"every_steps": 4}, checkpointing={"every_steps": 2})
    spec = {"name": name, "base": base, "executor": executor, "runs_dir": str(tmp_path / "runs"),
            "grid": {"optimizer.lr": lrs}, "select": {"metric": "loss", "mode": "min"},
            "asha": {"grace_steps": 4, "reduction_factor": 2}, "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"},
            "resources": {"time_min": 10, "max_parallel": 4}, **fields}
    path = tmp_path / f"{name}.yaml"
    write_config(path, spec)
    return path


def _consistent(sweep: SweepLayout, rung: int, factor: int = 2, mode: str = "min") -> list:
    arrivals = rungs.read(sweep, rung)
    assert len({a.trial for a in arrivals}) == len(arrivals), "a trial recorded twice"
    for i, a in enumerate(arrivals):
        assert a.seen == i and a.keeps_going == rungs.keeps_going(a.score, [b.score for b in arrivals[:i]], factor, mode)
        assert math.isfinite(a.loss)  # the validation loss is recorded beside the metric
    return arrivals


def test_an_array_with_successive_halving_stops_losing_trials(cluster, tmp_path, data_cache):
    """Four trials in one array, two at a time, started in the order listed. The two whose
    learning rate is too small to move the weights start first and reach rung 0 together (their
    loss stays at its start, ~ln 2); the next arrival, a trial that learns and whose loss has
    risen after 4 steps of warm-up, is not the best of three and stops. Every recorded decision
    follows the rule; stopped trials end PRUNED at their rung, their MLflow runs FINISHED with
    the rung and step; the parent holds the rung table and the plot."""
    path = _sweep(tmp_path, data_cache, "halving", [1e-9, 2e-9, 3e-3, 2e-3], resources={"time_min": 10,
                                                                                          "max_parallel": 2,
                                                                                          "gpus_per_node": 1},
                  asha={"grace_steps": 4, "reduction_factor": 2, "start": "listed"},
                  set={"tracking.system_metrics_every_s": 0.001})  # steps of milliseconds: a load sample a row
    proc = run_sweep(path, "--wait", "--no-preflight", timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    directory = tmp_path / "runs" / "halving"
    manifest = Manifest.load(directory)
    stopped = {}
    for rung in range(2):
        arrivals = _consistent(SweepLayout(directory), rung)
        stopped.update({a.trial: (rung, a.step) for a in arrivals if not a.keeps_going})
    first = rungs.read(SweepLayout(directory), 0)
    assert len(first) == 4 and not first[2].keeps_going  # the third arrival, a learning trial, stops
    by_lr = {r.config["optimizer"]["lr"]: r for r in manifest.trials.values()}
    assert {a.trial for a in first[:2]} == {by_lr[1e-9].id, by_lr[2e-9].id}
    pruned = {r.id: r for r in manifest.trials.values() if r.state == "PRUNED"}
    assert set(pruned) == set(stopped)
    for tid, record in manifest.trials.items():
        status = record.trial_dir.status()
        if tid in pruned:
            assert (status.rung, status.step) == stopped[tid]
        else:
            assert record.state == "COMPLETED" and status.step == 16
    rows = {row["trial"]: row for row in table_rows(proc.stdout)}
    for tid, (rung, step) in stopped.items():
        assert (rows[tid]["state"], rows[tid]["last step"]) == (f"PRUNED at rung {rung}", str(step))
    assert f"plot {directory / 'asha' / 'curves.png'}" in proc.stdout
    c = client(f"sqlite:///{tmp_path / 'm.db'}")
    for tid, (rung, step) in stopped.items():
        run = c.get_run(manifest.trials[tid].mlflow_run_id)
        assert run.info.status == "FINISHED"
        assert (run.data.tags["asha.stopped_at_step"], run.data.tags["asha.rung"]) == (str(step), str(rung))
    artifacts = {a.path for a in c.list_artifacts(manifest.mlflow_parent_run_id)}
    assert {"asha.csv", "curves.png", "summary.csv"} <= artifacts
    csv = SweepLayout(directory).asha_table.read_text().splitlines()
    recorded = sum(len(rungs.read(SweepLayout(directory), k)) for k in range(3))
    assert csv[0] == "rung,step,trial,value,loss,decision,recorded_before" and len(csv) == 1 + recorded
    assert SweepLayout(directory).asha_curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What the sweep used (issue 39): one GPU and one CPU core per trial, for the seconds each
    # trial's clock recorded (no accounting here: the clocks are the figure), pruned trials
    # under their state; the summary says it, beside the requested bound. Each clock is SLURM's
    # own time for the job but what ran outside the trial's process (support.OUTSIDE_S).
    held = slurm_seconds(r.job_id for r in manifest.trials.values())
    recorded = {r.id: sum(e["seen"] - e["start"] for e in usage.entries(r.trial_dir.usage_file))
                for r in manifest.trials.values()}
    for tid, r in manifest.trials.items():
        assert held[r.job_id] - OUTSIDE_S <= recorded[tid] <= held[r.job_id] + 1, (tid, recorded, held)
    parent = c.get_run(manifest.mlflow_parent_run_id).data.metrics
    for kind in ("gpu", "cpu"):
        assert math.isclose(parent[f"{kind}_hours"], sum(recorded.values()) / 3600, rel_tol=0.05), (parent, recorded)
        pruned_s = sum(recorded[tid] for tid in pruned)
        assert pruned_s > 0 and math.isclose(parent[f"{kind}_hours_pruned"], pruned_s / 3600, rel_tol=0.05)
        assert parent[f"requested_{kind}_hours"] == 4 * 10 / 60  # 4 jobs of 10 minutes, 1 GPU and 1 core each
    assert f"used {parent['gpu_hours']:.3f} GPU-hours of at most 0.667 requested" in proc.stdout
    assert {"usage.png", "load.png"} <= artifacts
    assert all((directory / name).read_bytes()[:4] == b"\x89PNG" for name in ("usage.png", "load.png"))


def test_a_preempted_trial_is_recorded_once(cluster, no_requeue_delay, tmp_path, data_cache):
    """USR2 once the trial has recorded rung 0: it saves, is requeued, resumes and goes on to
    rung 1; each rung holds it once."""
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 16}, evaluation={"every_steps": 4})
    base["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 0.5}}
    path = _sweep(tmp_path, data_cache, "preempted", [1e-3], base=base, max_requeues=3)
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    assert run_sweep(path, "--no-preflight", env=env).returncode == 0
    directory = tmp_path / "runs" / "preempted"
    (record,) = Manifest.load(directory).trials.values()
    wait_for(lambda: rungs.read(SweepLayout(directory), 0), 600, "rung 0 to be recorded")
    subprocess.run(["scancel", "--signal=USR2", record.job_id], check=True)
    proc = run_sweep(path, "--wait", "--no-preflight", env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = record.trial_dir.status()
    assert status.state.value == "COMPLETED" and status.starts == 2 and status.step == 16
    assert [a.trial for a in _consistent(SweepLayout(directory), 0)] == [record.id]
    assert [a.trial for a in _consistent(SweepLayout(directory), 1)] == [record.id]


def test_a_killed_trial_rerun_replays_its_decision(tmp_path, data_cache):
    """Killed after recording rung 0 but before its next checkpoint: the re-run resumes before
    the rung, validates there again, and replays the recorded decision instead of recording a
    second value. Local executor."""
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 8}, evaluation={"every_steps": 4},
                       checkpointing={"every_steps": 3})
    base["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 1.5}}
    path = _sweep(tmp_path, data_cache, "killed", [1e-3], executor="local", base=base)
    env = {**os.environ, "PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    driver = subprocess.Popen([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    directory = tmp_path / "runs" / "killed"
    arrivals = wait_for(lambda: rungs.read(SweepLayout(directory), 0), 600, "rung 0 to be recorded")
    (record,) = Manifest.load(directory).trials.values()
    os.kill(json.loads(record.trial_dir.state_file.read_text())["pid"], signal.SIGKILL)  # before step 6's checkpoint
    driver.communicate(timeout=300)
    assert sorted(p.name for p in record.trial_dir.checkpoints.glob("step*")) == ["step00000003"]
    proc = run_sweep(path, "--no-preflight", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rungs.read(SweepLayout(directory), 0) == arrivals  # the same single line: replayed, not taken again
    assert json.loads(record.trial_dir.state_file.read_text())["state"] == "COMPLETED"


def test_a_trial_told_to_stop_at_a_rung_never_trains_past_it(tmp_path, data_cache):
    """SLURM's warning at the rung step: validation records `continue: false`, the step's
    checkpoint is saved after, and the signal requeues the job. The resumed job used to go on
    from the next step, never meeting the rung again, and end COMPLETED. It ends PRUNED at the
    rung now, with nothing trained past it. (A better trial is in the record already, so this
    one is told to stop.) Local executor."""
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 8}, evaluation={"every_steps": 4},
                       checkpointing={"every_steps": 4})
    path = _sweep(tmp_path, data_cache, "told", [1e-3], executor="local", base=base)
    layout = SweepLayout(tmp_path / "runs" / "told")
    layout.rung(0).parent.mkdir(parents=True)
    layout.rung(0).write_text(rungs.Arrival("elsewhere", 0.0, 0.0, 4, True, 0, 0.0).to_json() + "\n")
    proc = run_sweep(path, "--no-preflight", env={"QARAC_FAULT": "usr2:4:0"})  # submitit requeues the job
    (record,) = Manifest.load(layout.root).trials.values()
    assert [(a.trial, a.keeps_going) for a in rungs.read(layout, 0)] == [("elsewhere", True), (record.id, False)]
    status = record.trial_dir.status()
    assert (status.state.value, status.rung, status.step, status.starts) == ("PRUNED", 0, 4, 2), proc.stdout
    assert status.resumed_from == 4
    assert max(r["step"] for r in read_metrics(record.trial_dir.metrics_file)) == 4


def test_repeats_with_successive_halving_prune_a_configurations_seeds_together(cluster, tmp_path, data_cache):
    """Two configurations x two seeds in one array, two at a time, listed: the seeds of the
    learning rate too small to move the weights run first and their configuration, decided
    first, goes on; the seeds of a learning rate large enough to wreck the loss run next, and
    their mean is worse: the seed that completes the configuration at rung 0 stops there, the
    other (arrived before the decision, training on) stops at its next validation, both PRUNED
    at rung 0. Steps sleep, so a seed is still training when its sibling decides: the two start
    as the two before them end, and a seed has 12 s of steps past the rung (0.9 s between the
    seeds' arrivals measured on an idle machine; a loaded one starts processes less evenly)."""
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 16}, evaluation={"every_steps": 4})
    base["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 1.0}}
    path = _sweep(tmp_path, data_cache, "seeds", [1e-9, 0.5], base=base, repeats=2,
                  resources={"time_min": 10, "max_parallel": 2},
                  asha={"grace_steps": 4, "reduction_factor": 2, "start": "listed"})
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = run_sweep(path, "--wait", "--no-preflight", env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layout = SweepLayout(tmp_path / "runs" / "seeds")
    manifest = Manifest.load(layout.root)
    seeds: dict[str, set] = {}
    for r in manifest.trials.values():
        seeds.setdefault(r.config["optimizer"]["lr"], set()).add(r.id)
    record = rungs.read_record(layout, 0)
    decisions = list(record.decisions.values())
    assert [set(d.seeds) for d in decisions] == [seeds[1e-9], seeds[0.5]], record
    for i, d in enumerate(decisions):  # on the mean of the seeds' scores, against the means decided before
        mine = [a for a in record.arrivals if a.trial in d.seeds]
        assert d.value == statistics.fmean(a.value for a in mine) and not d.without
        assert d.keeps_going == rungs.keeps_going(d.score, [e.score for e in decisions[:i]], 2, "min")
    assert [d.keeps_going for d in decisions] == [True, False]
    for tid in seeds[0.5]:  # pruned together
        status = manifest.trials[tid].trial_dir.status()
        assert (manifest.trials[tid].state, status.rung) == ("PRUNED", 0), proc.stdout
        run = client(manifest.tracking_uri).get_run(manifest.trials[tid].mlflow_run_id)
        assert (run.data.tags["asha.rung"], run.data.tags["asha.stopped_at_step"]) == ("0", "4")
    decided, earlier = sorted(manifest.trials[t].trial_dir.status().step for t in seeds[0.5])
    assert decided == 4 and earlier > 4  # the earlier seed trained on and stopped at its next validation
    for tid in seeds[1e-9]:  # went on, both
        assert manifest.trials[tid].state == "COMPLETED" and manifest.trials[tid].trial_dir.status().step == 16
    assert {d.configuration for d in rungs.read_record(layout, 1).decisions.values()} == {manifest.trials[
        next(iter(seeds[1e-9]))].configuration}
    csv = layout.asha_table.read_text().splitlines()
    assert csv[0].endswith(",configuration,mean_of,without") and len(csv) == 1 + 4 + 2 + 2 + 1
