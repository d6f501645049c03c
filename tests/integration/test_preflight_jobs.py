"""Preflight as the sweep runs it: before submitting (a real local sweep), and the micro-batch
search by real steps in a submitit job."""

from __future__ import annotations

import json
import subprocess
import sys


from support import roberta_dual, run_sweep, tiny_config, write_config


def test_sweep_refuses_to_submit_the_story_and_runs_once_allowed(tmp_path):
    """The sweep runs preflight before submitting: the replaced pooler stops it (nothing
    submitted, no directory); with allow_no_grad the same sweep runs to the end."""
    cfg = roberta_dual(tmp_path, pooler=True)
    from qarac_dist.config import config_to_dict

    base = config_to_dict(cfg)
    base["training"].update(max_steps=4, micro_batch_size=4)
    base["evaluation"]["every_steps"] = 4
    sweep = {"name": "story", "base": base, "executor": "local", "grid": {"optimizer.lr": [1e-3, 2e-3]},
             "resources": {"time_min": 10, "max_parallel": 2}, "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}}
    path = tmp_path / "story.yaml"
    write_config(path, sweep)
    proc = run_sweep(path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("no gradient: encoder_a.pooler.dense.{weight, bias}") == 1  # one architecture, one audit
    assert "preflight failed; nothing submitted" in proc.stderr
    assert not (tmp_path / "runs").exists()
    proc = run_sweep(path, "set.preflight.allow_no_grad=['*pooler*']")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight story-" in proc.stdout and ": ok" in proc.stdout
    from qarac_dist.track.mlflow_client import client

    c = client(f"sqlite:///{tmp_path / 'm.db'}")
    from qarac_dist.submit.sweep_dir import Manifest

    parent = Manifest.load(tmp_path / "runs" / "story").mlflow_parent_run_id
    assert [a.path for a in c.list_artifacts(parent) if a.path == "preflight.txt"] == ["preflight.txt"]


def test_find_batch_size_measures_real_steps_and_the_sweep_plans_with_it(tmp_path):
    """On CPU the measure is the RSS growth of two real steps on the longest examples; the
    budget leaves room for a few 2048-token documents of the 2-layer Longformer, not for 16."""

    base = tiny_config(tmp_path / "cache", tmp_path / "out",
                       model={"config": {**tiny_config(tmp_path, tmp_path)["model"]["config"], "hidden_size": 64,
                                         "intermediate_size": 128, "attention_window": 64}},
                       data={"synthetic": {"num_train": 32, "num_validation": 8, "min_tokens": 2048, "max_tokens": 2048,
                                           "evidence_after": 128, "num_classes": 2, "seed": 0}, "max_length": 2048},
                       training={"micro_batch_size": 1, "max_steps": 2}, evaluation={"every_steps": 2})
    sweep = {"name": "bs", "base": base, "executor": "local", "grid": {"optimizer.lr": [1e-3, 2e-3]},
             "resources": {"gpu_memory_gb": 0.4, "time_min": 10}}
    path = tmp_path / "sweep.yaml"
    write_config(path, sweep)
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.preflight", str(path), "--find-batch-size"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads((tmp_path / "runs" / "bs" / "micro_batch.json").read_text())
    assert len(found) == 1  # two learning rates, one memory shape: one search
    (result,) = found.values()
    tried = {int(k): v for k, v in result["tried"].items()}
    best, budget = result["micro_batch_size"], result["budget_bytes"]
    assert 1 < best < 16 and tried[best] <= budget  # fits
    assert tried[best + 1] > budget  # the next one up was measured and does not
    assert tried[1] < tried[2] < tried[4]  # more examples, more memory

    dry = run_sweep(path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(f"found micro batch {best}") == 2


def test_find_batch_size_stops_at_the_training_set_size(tmp_path):
    """A set smaller than what fits: the search tries no step the set cannot fill (6 examples:
    1, 2, 4, then 5 and 6 by bisection), says it was capped, and the sweep then plans with it
    (a micro batch of 8 would have refused to start)."""
    base = tiny_config(tmp_path / "cache", tmp_path / "out",
                       data={"synthetic": {"num_train": 6, "num_validation": 4, "min_tokens": 160, "max_tokens": 320,
                                           "evidence_after": 128, "num_classes": 2, "seed": 0}},
                       training={"micro_batch_size": 1, "max_steps": 2}, evaluation={"every_steps": 2})
    sweep = {"name": "small", "base": base, "executor": "local", "resources": {"gpu_memory_gb": 64, "time_min": 10}}
    path = tmp_path / "sweep.yaml"
    write_config(path, sweep)
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.preflight", str(path), "--find-batch-size"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "capped at the training set's 6 examples" in proc.stdout
    (result,) = json.loads((tmp_path / "runs" / "small" / "micro_batch.json").read_text()).values()
    assert result["micro_batch_size"] == 6 and result["capped_by_training_set"]
    assert sorted(map(int, result["tried"])) == [1, 2, 4, 5, 6]
    dry = run_sweep(path, "--dry-run")
    assert dry.returncode == 0 and "found micro batch 6" in dry.stdout, dry.stdout + dry.stderr
