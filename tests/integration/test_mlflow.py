"""MLflow tracking against real stores: a sqlite file and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track import mlflow_logger
from qarac_dist.track.mlflow_client import client, create_run, experiment_id
from qarac_dist.track.outbox import OUTBOX
from qarac_dist.track.trial_dir import TrialDir
from support import HELPERS, run_sweep, tiny_config, wait_for, write_config


def _history(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_unreachable_server_buffers_spills_and_leaves_points_to_replay(tmp_path, mlflow_server, capsys):
    c = client(mlflow_server.uri)
    run_id = create_run(c, experiment_id(c, "outage"), "r", {})
    mlflow_server.stop()
    logger = mlflow_logger.MlflowLogger(mlflow_server.uri, run_id, tmp_path, max_buffer=50, interval_s=0.2)
    for step in range(1, 101):
        logger.log(step, {"loss": float(step)})
    time.sleep(0.5)
    assert (tmp_path / mlflow_logger.SPILL).exists()  # over the bound: spilled, not dropped
    assert logger.close(timeout_s=1) == 100
    assert "100 metric points could not be sent" in capsys.readouterr().err
    mlflow_server.start()
    assert mlflow_logger.replay_unsent(tmp_path) == 100
    assert _history(c, run_id, "loss") == list(range(1, 101))
    assert not (tmp_path / mlflow_logger.UNSENT).exists()


def _sweep_file(tmp_path, data_cache, uri, log_model=False, register=None, **fields):
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 6}, evaluation={"every_steps": 3},
                       tracking={"log_model": log_model, "register_model": register})
    sweep = {"name": "tracked", "base": base, "executor": "local", "tracking": {"uri": uri},
             "resources": {"max_parallel": 2, "time_min": 10}, "select": {"metric": "accuracy", "mode": "max"}, **fields}
    path = tmp_path / "sweep.yaml"
    write_config(path, sweep)
    return path


def _runs(c, experiment):
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_two_trial_sweep_makes_one_parent_and_two_complete_children(tmp_path, data_cache):
    """One parent, two children with params, tags and metric histories; each child's best model
    is an MLflow model that MLflow's own API loads and runs on a sentence; the parent's best
    metric has one point per change of the best. On the default store, sqlite, which only the
    driver writes (importing what the trials kept in their directories); sweeps against a
    server: the tests below and test_ui."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    path = _sweep_file(tmp_path, data_cache, uri, log_model=True, register="tracked",
                       grid={"optimizer.lr": [1e-3, 3e-3], "training.seed": [1]})
    proc = run_sweep(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    c = client(uri)
    parents, children = _runs(c, "tracked")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    manifest = Manifest.load(tmp_path / "runs" / "tracked")
    assert parent.info.run_id == manifest.mlflow_parent_run_id and parent.info.status == "FINISHED"
    assert parent.data.tags["varied"] == "optimizer.lr, training.seed"
    by_trial = {r.data.tags["trial_id"]: r for r in children}
    assert set(by_trial) == set(manifest.trials)
    mlflow.set_tracking_uri(uri)
    for trial_id, run in by_trial.items():
        record = manifest.trials[trial_id]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_id == record.mlflow_run_id
        assert run.info.run_name == f"{trial_id} {record.label}"
        assert run.data.params["optimizer.lr"] == str(record.config["optimizer"]["lr"])
        assert run.data.params["training.max_steps"] == "6"
        assert not any(k == "name" or k.startswith(("model.dual_encoder.", "tracking.", "output."))
                       for k in run.data.params)
        assert run.data.tags["varied"] == "optimizer.lr, training.seed"
        assert _history(c, run.info.run_id, "loss") == [1, 2, 3, 4, 5, 6]
        assert _history(c, run.info.run_id, "val_accuracy") == [3, 6]
        for tag in ("git_commit", "world_size", "restarts", "nodes", "executor", "sweep", "attempt"):
            assert run.data.tags.get(tag), tag
        assert [a.path for a in c.list_artifacts(run.info.run_id)] == ["deepspeed_config.json", "environment.json"]
        environment = json.loads(open(c.download_artifacts(run.info.run_id, "environment.json", str(tmp_path))).read())
        assert environment["torch"] == torch.__version__ and environment["sbatch"] is None  # the local executor's
        assert environment["gpus"] == []
        # The packages once for the sweep (both trials ran in this interpreter), named by digest.
        digest = environment["packages"]["sha256"]
        packages = c.download_artifacts(parent.info.run_id, f"packages/{digest}.txt", str(tmp_path))
        assert f"torch=={torch.__version__}\n" in open(packages).read()
        assert [a.path for a in c.list_artifacts(parent.info.run_id, "packages")] == [f"packages/{digest}.txt"]
        (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                               filter_string=f"source_run_id = '{run.info.run_id}'")
        assert run.data.tags["best_model_id"] == model.model_id
        predicted = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(["a short document of words"])
        assert len(predicted) == 1 and predicted["label"][0].startswith("LABEL_")
    # The parent names the best trial, as the summary printed it.
    best_value = max(r.data.metrics["best_val_accuracy"] for r in children)
    assert by_trial[parent.data.tags["best_trial"]].data.metrics["best_val_accuracy"] == best_value
    assert parent.data.metrics["best_val_accuracy"] == best_value
    assert f"best trial: {parent.data.tags['best_trial']}" in proc.stdout
    history = c.get_metric_history(parent.info.run_id, "best_val_accuracy")
    steps, values = [m.step for m in history], [m.value for m in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and 1 <= steps[0] and steps[-1] <= 2
    assert all(a != b for a, b in zip(values, values[1:]))  # one point per change, none repeated
    summary = c.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))
    assert len(open(summary).read().splitlines()) == 3
    # The sweep registered its choice, not each trial, as the champion; it loads and predicts
    # where DeepSpeed cannot be imported.
    assert _champion(c, parent.info.run_id) == (parent.data.tags["best_trial"], "1", 1)
    load = ("import sys; sys.modules['deepspeed'] = None; import mlflow; "
            "print(mlflow.pyfunc.load_model('models:/tracked@champion').predict(['a short document'])['label'][0])")
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert loaded.returncode == 0 and loaded.stdout.startswith("LABEL_"), loaded.stdout + loaded.stderr

    # The best trial leaves the sweep file: a re-run shows it apart and never names it best, here
    # and on the parent; back in the file, it is back in the running.
    best, other = parent.data.tags["best_trial"], next(t for t in by_trial if t != parent.data.tags["best_trial"])
    narrowed = _sweep_file(tmp_path, data_cache, uri, log_model=True, register="tracked", grid={
        "optimizer.lr": [manifest.trials[other].config["optimizer"]["lr"]], "training.seed": [1]})
    proc = run_sweep(narrowed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"best trial: {other}" in proc.stdout and "1 trial(s) below the line are no longer in the sweep file" \
        in proc.stdout
    assert proc.stdout.index(f" {other} ") < proc.stdout.index(f" {best} ")
    assert Manifest.load(tmp_path / "runs" / "tracked").trials[best].retired
    parent = c.get_run(parent.info.run_id)
    assert _champion(c, parent.info.run_id) == (other, "2", 2)  # the choice changed: the alias moved
    assert parent.data.tags["best_trial"] == other and c.get_run(by_trial[best].info.run_id).data.tags[
        "qarac.retired"] == "true"
    (tmp_path / "again").mkdir()
    summary = c.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path / "again"))
    assert {row["trial"]: row["in_sweep_file"] for row in csv.DictReader(open(summary))} == {best: "no", other: "yes"}
    path = _sweep_file(tmp_path, data_cache, uri, log_model=True, register="tracked",
                       grid={"optimizer.lr": [1e-3, 3e-3], "training.seed": [1]})
    proc = run_sweep(path)
    assert proc.returncode == 0 and f"best trial: {best}" in proc.stdout, proc.stdout + proc.stderr
    assert c.get_run(parent.info.run_id).data.tags["best_trial"] == best
    assert _champion(c, parent.info.run_id) == (best, "1", 2)  # back to the first choice's version


def _champion(c, parent_run_id: str) -> tuple[str, str, int]:
    """The trial the alias `champion` of `tracked` names, its version (as the parent links it),
    and how many versions there are."""
    version = c.get_model_version_by_alias("tracked", "champion")
    assert c.get_run(parent_run_id).data.tags["champion_version"] == f"models:/tracked/{version.version}"
    assert version.tags["sweep_run_id"] == parent_run_id
    return version.tags["trial_id"], str(version.version), len(c.search_model_versions("name = 'tracked'"))


def test_two_rank_trial_makes_one_run_with_one_point_per_step(tmp_path, data_cache, shared_mlflow_server):
    path = _sweep_file(tmp_path, data_cache, shared_mlflow_server.uri, name="two_ranks",
                       resources={"tasks_per_node": 2, "time_min": 10})
    proc = run_sweep(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    c = client(shared_mlflow_server.uri)
    parents, children = _runs(c, "two_ranks")
    assert len(parents) == 1 and len(children) == 1
    assert children[0].data.tags["world_size"] == "2"
    assert [m.step for m in c.get_metric_history(children[0].info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    inputs = c.get_run(children[0].info.run_id).inputs.dataset_inputs  # its data, sent by the trial itself
    assert sorted((i.tags[0].value, i.dataset.name) for i in inputs) == [("train", "generated"),
                                                                          ("validation", "generated")]
    # A server is written by the trial itself: nothing is kept for an importer, none is asked.
    (record,) = Manifest.load(tmp_path / "runs" / "two_ranks").trials.values()
    trial = tmp_path / record.output_dir  # the sweep ran in tmp_path
    assert (trial / "metrics.jsonl").exists() and not (trial / OUTBOX).exists()
    assert not (tmp_path / "runs" / "two_ranks" / "mlflow_imported.json").exists()


def _wait_for_step(out_dir, step, timeout=300):
    """Read as the product reads a file its trial is appending to: a last line caught half
    written is skipped. (In a CI run on a loaded machine the server was never restarted while
    the trial went on to step 200: json.loads of a half-written line is the one way the old
    loop here could raise before step 120.)"""
    trial = TrialDir(out_dir)
    wait_for(lambda: any(r["step"] >= step and "loss" in r for r in trial.metrics()), timeout, f"step {step}")


def test_interrupted_trial_reattaches_to_its_run_without_duplicate_or_missing_steps(tmp_path, data_cache,
                                                                                    shared_mlflow_server):
    import subprocess
    import sys

    path = _sweep_file(tmp_path, data_cache, shared_mlflow_server.uri, name="reattached", set={
        "training.max_steps": 40, "checkpointing.every_steps": 10, "evaluation.every_steps": 20})
    sweep = subprocess.Popen([sys.executable, "-m", "qarac_dist.sweep", str(path)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = None
    deadline = time.time() + 300
    while out is None and time.time() < deadline:
        manifest = Manifest.load(tmp_path / "runs" / "reattached")
        if manifest and manifest.trials:
            out = tmp_path / "runs" / "reattached" / "trials" / next(iter(manifest.trials))
        time.sleep(0.2)
    _wait_for_step(out, 25)
    os.kill(json.loads((out / "state.json").read_text())["pid"], signal.SIGKILL)  # rank 0 dies mid-run
    first = sweep.communicate(timeout=300)
    assert sweep.returncode != 0, first
    proc = run_sweep(path, "--no-preflight")  # the re-run resumes from the step-20 checkpoint
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 to run" in proc.stdout
    c = client(shared_mlflow_server.uri)
    parents, children = _runs(c, "reattached")
    assert len(parents) == 1 and len(children) == 1
    run = children[0]
    assert _history(c, run.info.run_id, "loss") == list(range(1, 41))
    assert _history(c, run.info.run_id, "val_accuracy") == [20, 40]
    # The re-run is the trial's second attempt: one start of it, the same MLflow run.
    assert (run.data.tags["attempt"], run.data.tags["restarts"], run.info.status) == ("2", "0", "FINISHED")
    state = json.loads((out / "state.json").read_text())
    assert (state["attempt"], state["starts"], state["state"]) == (2, 1, "COMPLETED")


def test_server_outage_mid_trial_loses_no_metrics(tmp_path, data_cache, mlflow_server):
    import subprocess
    import sys

    path = _sweep_file(tmp_path, data_cache, mlflow_server.uri, set={"training.max_steps": 200,
                                                                     "evaluation.every_steps": 100})
    sweep = subprocess.Popen([sys.executable, "-m", "qarac_dist.sweep", str(path)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = None
    while out is None:
        manifest = Manifest.load(tmp_path / "runs" / "tracked")
        if manifest and manifest.trials:
            out = tmp_path / "runs" / "tracked" / "trials" / next(iter(manifest.trials))
        time.sleep(0.2)
    _wait_for_step(out, 20)
    mlflow_server.stop()
    _wait_for_step(out, 120)
    mlflow_server.start()
    stdout, stderr = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, stdout + stderr
    c = client(mlflow_server.uri)
    _, (run,) = _runs(c, "tracked")
    assert _history(c, run.info.run_id, "loss") == list(range(1, 201))
    assert run.info.status == "FINISHED"
    assert not (out / mlflow_logger.UNSENT).exists()


def test_a_dual_encoders_best_model_loads_through_mlflow_and_scores_a_pair(tmp_path, data_cache):
    """A composite model (two encoders, one loss) is no transformers model: it is logged in the
    pytorch flavour with its tokenizer, and MLflow's own API gives back a module that scores."""
    import mlflow
    import torch
    from transformers import AutoTokenizer

    from support import roberta_dual
    from qarac_dist.config import config_to_dict

    base = config_to_dict(roberta_dual(tmp_path, pooler=False))
    base["data"]["cache_dir"] = str(data_cache)
    base["training"].update(max_steps=4, micro_batch_size=4)
    base["evaluation"]["every_steps"] = 4
    base["tracking"] = {"log_model": True}
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    sweep = {"name": "dual", "base": base, "executor": "local", "tracking": {"uri": uri},
             "resources": {"time_min": 10}, "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / "dual.yaml"
    write_config(path, sweep)
    proc = run_sweep(path, "--no-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (child,) = _runs(client(uri), "dual")[1]
    model_id = child.data.tags["best_model_id"]
    mlflow.set_tracking_uri(uri)
    module = mlflow.pytorch.load_model(f"models:/{model_id}")
    assert type(module).__name__ == "DualEncoder"
    files = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "dl"))
    tokenizer = AutoTokenizer.from_pretrained(str(Path(files) / "extra_files"))
    a, b = tokenizer(["some words here"], return_tensors="pt"), tokenizer(["other words there"], return_tensors="pt")
    with torch.no_grad():
        score = module(input_ids=a["input_ids"], attention_mask=a["attention_mask"], input_ids_b=b["input_ids"],
                       attention_mask_b=b["attention_mask"])["logits"]
    assert score.shape == (1, 1) and torch.isfinite(score).all() and -1 <= float(score) <= 1


def test_a_factory_longformer_is_logged_as_a_module_with_hugging_faces_attention(tmp_path, data_cache):
    """A user's module around a Longformer trains with the blocked attention, whose forward is
    bound to each attention module and does not pickle: the logged module is built with Hugging
    Face's own attention (the same weights and outputs) and loads in a process of its own."""
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 2}, evaluation={"every_steps": 2},
                       tracking={"log_model": True})
    base["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 0}}
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    write_config(tmp_path / "wrapped.yaml", {"name": "wrapped", "base": base, "executor": "local",
                                             "tracking": {"uri": uri}, "runs_dir": str(tmp_path / "runs")})
    helpers = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = run_sweep(tmp_path / "wrapped.yaml", "--no-preflight", env=helpers)
    assert proc.returncode == 0 and "event was not" not in proc.stderr, proc.stdout + proc.stderr
    (child,) = _runs(client(uri), "wrapped")[1]
    load = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); m = mlflow.pytorch.load_model(sys.argv[2]); "
            "print(type(m).__name__, sorted({type(x).__name__ for x in m.modules() if 'SelfAttention' in "
            "type(x).__name__}), any('forward' in vars(x) for x in m.modules()))")
    shown = subprocess.run([sys.executable, "-c", load, uri, f"models:/{child.data.tags['best_model_id']}"],
                           capture_output=True, text=True, env={**os.environ, **helpers}, timeout=300)
    assert shown.stdout.split("\n")[0] == "SlowSteps ['LongformerSelfAttention'] False", shown.stdout + shown.stderr
