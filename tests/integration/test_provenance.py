"""What produced a sweep's runs: the user's code (track/code_record.py; a sweep run from a git
repository of its own, with an uncommitted change, a remote with a token in its URL, and a
factory module the user edits while the sweep runs) and the data each trial read (MLflow
dataset inputs)."""

from __future__ import annotations

import json
import subprocess

from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.mlflow_client import client
from support import run_sweep, tiny_config, write_config

FACTORY = '''
from mylayers import HIDDEN


def build(num_labels, tokenizer):
    from transformers import LongformerConfig, LongformerForSequenceClassification

    with open(__file__, "a") as f:  # the user edits this file while the sweep runs
        f.write("# edited while the sweep runs\\n")
    return LongformerForSequenceClassification(LongformerConfig(
        num_hidden_layers=1, hidden_size=HIDDEN, num_attention_heads=2, intermediate_size=64, attention_window=32,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=330,
        num_labels=num_labels))
'''
TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_every_run_names_the_users_commit_branch_remote_and_diff_and_a_later_trial_names_an_edit(tmp_path,
                                                                                                 data_cache):
    repo, uri = tmp_path / "project", f"sqlite:///{tmp_path / 'mlflow.db'}"
    repo.mkdir()
    (repo / "mymodels.py").write_text(FACTORY)
    (repo / "mylayers.py").write_text("HIDDEN = 32\n")  # a local module the factory imports
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 2}, evaluation={"every_steps": 2})
    base["model"] = {"factory": "mymodels:build"}
    write_config(repo / "base.yaml", base)
    write_config(repo / "sweep.yaml", {"name": "code", "base": "base.yaml", "executor": "local",
                                       "runs_dir": str(tmp_path / "runs"), "tracking": {"uri": uri},
                                       "grid": {"training.seed": [0, 1]}, "resources": {"max_parallel": 1}})
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.name=r", "-c", "user.email=r@lab", "commit", "-q", "--allow-empty", "-m", "empty")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=r", "-c", "user.email=r@lab", "commit", "-q", "-m", "the sweep")
    _git(repo, "remote", "add", "origin", f"https://{TOKEN}@github.com/lab/project.git")
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(repo / "mymodels.py", "a") as f:
        f.write("# an uncommitted change\n")
    (repo / "notes.txt").write_text("untracked")

    proc = run_sweep(repo / "sweep.yaml", "--no-preflight", cwd=repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    c = client(uri)
    manifest = Manifest.load(tmp_path / "runs" / "code")
    parent = c.get_run(manifest.mlflow_parent_run_id)
    children = [c.get_run(r.mlflow_run_id) for r in manifest.trials.values()]
    for run in [parent, *children]:
        tags = run.data.tags
        assert (tags["mlflow.source.git.commit"], tags["mlflow.source.git.branch"], tags["mlflow.source.git.repoURL"],
                tags["mlflow.source.git.dirty"]) == (commit, "main", "https://github.com/lab/project.git", "True")
        assert tags["code.sweep_file"] == f"{repo / 'sweep.yaml'} at {commit} (dirty)"
        assert tags["mlflow.source.name"] == str(repo / "sweep.yaml")  # the runs table's Source column
        assert tags["code.base_config"] == f"{repo / 'base.yaml'} at {commit} (dirty)"
        assert tags["code.factory.mymodels"] == f"{repo / 'mymodels.py'} at {commit} (dirty)"
        assert tags["code.module.mylayers.py"] == f"{repo / 'mylayers.py'} at {commit} (dirty)"
        assert not any(TOKEN in str(v) for v in tags.values())
    diff = c.download_artifacts(parent.info.run_id, "code/project.diff", str(tmp_path))
    text = open(diff).read()
    assert "+# an uncommitted change" in text and "untracked: notes.txt" in text and "edited while" not in text
    # The trial that started second built its model from a module the first had edited.
    started = sorted(manifest.trials.values(), key=lambda r: r.trial_dir.status().started)
    first, second = (c.get_run(r.mlflow_run_id).data.tags for r in started)
    assert "code.changed" not in first and second["code.changed"] == str(repo / "mymodels.py")


def _data_sweep(tmp_path, data_cache, name: str, rows: int) -> tuple[str, str]:
    """A one-trial sweep on CSV files; returns the store and the trial's run."""
    for split, n in (("train", rows), ("validation", 8)):
        if split == "train" or not (tmp_path / f"{split}.csv").exists():  # validation: written once
            (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"w{i} x{i % 3},{i % 2}\n" for i in range(n)))
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 2}, evaluation={"every_steps": 2},
                       tracking={"log_model": False, "system_metrics_every_s": 0.001})
    base["data"] = {"train_files": [str(tmp_path / "train.csv")], "validation_files": [str(tmp_path / "validation.csv")],
                    "max_length": 32, "cache_dir": str(data_cache)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_config(tmp_path / f"{name}.yaml", {"name": name, "base": base, "executor": "local", "tracking": {"uri": uri},
                                             "runs_dir": str(tmp_path / "runs")})
    proc = run_sweep(tmp_path / f"{name}.yaml", "--no-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = Manifest.load(tmp_path / "runs" / name).trials.values()
    return uri, record.mlflow_run_id


def test_each_trial_names_its_data_with_a_digest_that_follows_it_and_samples_its_nodes_load(tmp_path, data_cache):
    uri, first = _data_sweep(tmp_path, data_cache, "before", rows=32)
    _, second = _data_sweep(tmp_path, data_cache, "after", rows=40)  # the training file changed
    c = client(uri)
    seen = {}
    for run_id in (first, second):
        inputs = {i.tags[0].value: i.dataset for i in c.get_run(run_id).inputs.dataset_inputs}
        assert set(inputs) == {"train", "validation"} and inputs["train"].name == "train"
        assert json.loads(inputs["train"].source) == {"uri": str(tmp_path / "train.csv")}
        assert inputs["train"].source_type == "local" and inputs["validation"].name == "validation"
        seen[run_id] = {context: (d.digest, json.loads(d.profile)["num_rows"]) for context, d in inputs.items()}
    assert seen[first]["train"][1] == 32 and seen[second]["train"][1] == 40
    assert seen[first]["train"][0] != seen[second]["train"][0]
    assert seen[first]["validation"] == seen[second]["validation"]  # the same file, unchanged
    # On a node without GPUs the node's load is CPU and memory, sampled with the logged rows.
    system = {k for k in c.get_run(first).data.metrics if k.startswith("system/")}
    assert system == {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                      "system/system_memory_usage_percentage"}
    assert len(c.get_metric_history(first, "system/cpu_utilization_percentage")) >= 2
