"""training.spikes on real training jobs with real injected faults (train/faults.py): a NaN loss
on one rank, a 100x loss, a job killed or requeued between a rollback and its next checkpoint,
and a trial whose rollbacks are spent. (Unit tests of the rules: tests/unit/test_spike_guard.py.)

The task: 400 generated documents whose class words start at once, so a 1-layer model learns
within 60 steps and its final validation loss is a fair yardstick. The fault hits data
position 22 (step 23, three steps after the checkpoint of step 20); with `margin: 2` a rollback
skips positions 20-24. The reference runs with detection off and position 22 removed from the
data (`drop`): the same data up to step 22, so the two runs' losses must be equal there, bit for
bit (detection on and no spike changes nothing).
"""

from __future__ import annotations

import json
import signal

import pytest

from qarac_dist.track.mlflow_client import client
from qarac_dist.track.trial_dir import TrialDir, read_metrics
from support import logged_losses, run_train, tiny_config, write_config

FAULT_AT = 22  # a data position: the batch of step 23
BEFORE = 20  # the steps both runs log alike: the rollback rewinds metrics.jsonl to step 20


def _config(tmp_path, data_cache, name, spikes=None, **sections):
    cfg = tiny_config(data_cache, tmp_path / name, training={"max_steps": 60, "micro_batch_size": 8},
                      checkpointing={"every_steps": 10}, evaluation={"every_steps": 10}, optimizer={"lr": 2.0e-3},
                      **sections)
    cfg["model"]["config"]["attention_window"] = 16
    cfg["data"]["synthetic"].update(num_train=400, evidence_rate=0.5, evidence_after=0, min_tokens=32, max_tokens=64)
    cfg["data"]["max_length"] = 64
    if spikes is not None:
        cfg["training"]["spikes"] = {"window": 16, "margin": 2, "grad_norm": False, **spikes}
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _final_val_loss(out) -> float:
    return [row["val_loss"] for row in read_metrics(out / "metrics.jsonl") if "val_loss" in row][-1]


def _spike_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "loss spike" in line and "rolled back to" in line]


def test_a_nan_on_one_rank_rolls_every_rank_back_and_ends_near_the_run_without_that_batch(tmp_path, data_cache):
    """Rank 1's loss is NaN; rank 0's is finite. Both roll back at the same step: had rank 0
    gone on alone, the ranks' collectives would no longer pair up and the job would hang or
    fail, not end at step 60 with a complete checkpoint."""
    faulty = _config(tmp_path, data_cache, "faulty", spikes={})
    reference = _config(tmp_path, data_cache, "reference")
    proc = run_train(faulty, num_processes=2, fault=f"loss-nan:{FAULT_AT}:1")
    run_train(reference, num_processes=2, fault=f"drop:{FAULT_AT}:*")

    out = tmp_path / "faulty"
    (rollback,) = TrialDir(out).rollbacks()
    assert {k: rollback[k] for k in ("rollback", "step", "to_step", "rank", "what", "value", "position", "skipped")} \
        == {"rollback": 1, "step": 23, "to_step": 20, "rank": 1, "what": "loss", "value": "nan", "position": 22,
            "skipped": 5}
    (line,) = _spike_lines(proc)  # printed by rank 0, whose own loss was finite
    assert "loss spike at step 23 (loss nan on rank 1): rolled back to step 20, skipping 5 batches (data positions " \
           "20-24); rollback 1 of 3" in line
    assert json.loads((out / "result.json").read_text())["steps"] == 60
    assert (out / "checkpoints" / "step00000060" / "COMPLETE").exists()
    assert logged_losses(out)[:BEFORE] == logged_losses(tmp_path / "reference")[:BEFORE]
    assert _final_val_loss(out) == pytest.approx(_final_val_loss(tmp_path / "reference"), rel=0.02)


def test_a_100x_loss_rolls_back_says_so_and_a_job_stopped_in_the_skip_window_resumes_past_the_same_data(
        tmp_path, data_cache):
    """One rank. The 100x loss at step 23 rolls back to step 20; the log line, the metrics row and
    MLflow say so; the run ends near the one without that batch. Then the same run stopped at
    step 25, after the rollback and before the next checkpoint: killed (SIGKILL: it resumes from
    step 20, and only rollbacks.json says what to skip), and the resumed job requeued there
    (SLURM's warning: it saves at step 25, and the next resumes from it). The stopped run logs
    the uninterrupted run's losses, bit for bit, and makes no second rollback."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = {"tracking": {"uri": uri, "experiment": "spikes"}}
    faulty = _config(tmp_path, data_cache, "faulty", spikes={}, **tracked)
    reference = _config(tmp_path, data_cache, "reference")
    proc = run_train(faulty, fault=f"loss-x100:{FAULT_AT}:0")
    run_train(reference, fault=f"drop:{FAULT_AT}:*")

    out = tmp_path / "faulty"
    (line,) = _spike_lines(proc)
    assert ", z " in line and "on rank 0): rolled back to step 20, skipping 5 batches" in line
    (row,) = [r for r in read_metrics(out / "metrics.jsonl") if "spike_rollback" in r]
    assert (row["step"], row["spike_rollback"], row["spike_rolled_back_to"], row["spike_batches_skipped"]) == \
        (23, 1, 20, 5)
    assert row["spike_value"] > 10 and row["spike_z"] > 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, 61))
    assert logged_losses(out)[:BEFORE] == logged_losses(tmp_path / "reference")[:BEFORE]
    assert _final_val_loss(out) == pytest.approx(_final_val_loss(tmp_path / "reference"), rel=0.02)
    c = client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("spikes").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["spike_rollbacks"] == "1" and "rolled back to step 20" in run.data.tags["spike_last"]
    (point,) = c.get_metric_history(run.info.run_id, "spike_batches_skipped")
    assert (point.step, point.value) == (23, 5)

    # Killed at step 25, then (the resumed job) warned at step 25: each fault fires once.
    stopped = _config(tmp_path, data_cache, "stopped", spikes={})
    fault = f"loss-x100:{FAULT_AT}:0,kill:25:0,usr2:25:0"
    killed = run_train(stopped, fault=fault, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(_spike_lines(killed)) == 1
    for resumed_at, code in ((20, 3), (25, 0)):
        resumed = run_train(stopped, fault=fault, check=False)
        assert resumed.returncode == code, resumed.stderr[-3000:]
        assert f"resumed from checkpoint step{resumed_at:08d}" in resumed.stderr
        assert _spike_lines(resumed) == []
    timeless = [[{k: v for k, v in r.items() if k != "load_seconds"} for r in TrialDir(d).rollbacks()]
                for d in (tmp_path / "stopped", out)]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 1
    assert logged_losses(tmp_path / "stopped") == logged_losses(out)


@pytest.mark.parametrize("asha", [False, True], ids=["alone", "successive-halving"])
def test_a_spike_after_the_last_rollback_fails_the_trial_or_prunes_it(tmp_path, data_cache, asha):
    extra = {"asha": {"rungs": [20], "reduction_factor": 2, "metric": "loss", "mode": "min"}} if asha else {}
    config = _config(tmp_path, data_cache, "spent", spikes={"max_rollbacks": 1, "lr_factor": 0.5, "lr_steps": 3},
                     **extra)
    proc = run_train(config, "training.max_steps=20", fault="loss-x100:12:0,loss-x100:16:0", check=False)
    state = json.loads((tmp_path / "spent" / "state.json").read_text())
    assert len(_spike_lines(proc)) == 1  # the first spike's rollback; the second one ends the trial
    # The rollback from step 13 to 10 moves position 16 to step 12, where it spikes again.
    reason = ("loss spike at step 12 (loss ", "after 1 rollback(s), training.spikes.max_rollbacks; lower optimizer.lr, "
              "or raise training.spikes.z or training.spikes.max_rollbacks")
    assert state["error"].split("(loss ")[0] + "(loss " == ("" if asha else "SpikesExhausted: ") + reason[0]
    assert state["error"].endswith(reason[1])
    # The learning-rate cut after the rollback to step 10: step 11 logged it; step 12 spiked.
    assert [r["step"] for r in read_metrics(tmp_path / "spent" / "metrics.jsonl") if r.get("lr_factor") == 0.5] == [11]
    if asha:
        assert proc.returncode == 0 and state["state"] == "PRUNED" and state["step"] == 12
    else:
        assert proc.returncode == 1 and state["state"] == "FAILED"


def test_a_rollback_past_a_validation_and_a_rung_undoes_what_they_recorded(tmp_path, data_cache):
    """The validation of step 12 exports best/ and records the trial at the rung of step 12; the
    spike at step 13 rolls back to step 10. Before, best/ kept step 12's model and score (the
    result said step 10's) and the rung kept the undone score, against which later trials were
    compared. Now the rung's arrival is withdrawn, and the model restored is validated again and
    is best/. Here the trial's second spike (at step 12, after the rollback) prunes it before
    anything could overwrite either."""
    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.track import rungs

    sweep = SweepLayout(tmp_path / "sweep")
    config = _config(tmp_path, data_cache, "undone", spikes={"max_rollbacks": 1},
                     asha={"rungs": [12], "reduction_factor": 2, "metric": "loss", "mode": "min"})
    script = ("import sys; from qarac_dist.config import load_config; from qarac_dist.train.run import run; "
              "from qarac_dist.track.job_context import JobContext; "
              "run(load_config(sys.argv[1], sys.argv[2:]), JobContext(sweep_dir=sys.argv[1] + '.sweep'))")
    import os
    import subprocess
    import sys

    (tmp_path / "undone.yaml.sweep").symlink_to(sweep.root, target_is_directory=True)
    sweep.root.mkdir()
    proc = subprocess.run([sys.executable, "-c", script, str(config), "training.max_steps=20",
                           "evaluation.every_steps=12"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "QARAC_FAULT": "loss-x100:12:0,loss-x100:16:0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best/ held step 12, which the rollback undid: the model of step 10 is validated again" in proc.stderr
    out = TrialDir(tmp_path / "undone")
    assert (out.status().state.value, out.status().step) == ("PRUNED", 12)
    lines = [json.loads(line) for line in sweep.rung(0).read_text().splitlines()]
    assert [("withdrawn" in line, line.get("step")) for line in lines] == [(False, 12), (True, 10)]
    assert rungs.read(sweep, 0) == []
    best = out.best_info()
    assert best["step"] == 10 and json.loads(out.result_file.read_text())["best_step"] == 10
    (row,) = [r for r in read_metrics(out.metrics_file) if r["step"] == 10 and "val_loss" in r]
    assert row["val_loss"] == best["metrics"]["loss"]
    assert not [r for r in read_metrics(out.metrics_file) if r["step"] > 10 and "val_loss" in r]
