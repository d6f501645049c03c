"""Tracking pieces in process: the secret screen, the batched MLflow sender and the runs of a
configuration's seeds, against a real sqlite store."""

from __future__ import annotations

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.track.mlflow_client import client, create_run, experiment_id
from qarac_dist.track.mlflow_logger import MlflowLogger
from qarac_dist.base.secrets import screen


def _history(c, run_id, key):
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_params_never_hold_secrets(monkeypatch):
    monkeypatch.setenv("QARAC_TEST_TOKEN", "hf_supersecret_value")
    flat = {"optimizer.lr": 0.001, "model.factory_kwargs.api_key": "abc123", "model.factory_kwargs.hub_password": "pw",
            "model.factory_kwargs.note": "hf_supersecret_value", "deepspeed.config.aws_secret": "s",
            "model.factory_kwargs.auth_header": "Bearer hf_supersecret_value"}
    assert screen(flat) == {"optimizer.lr": "0.001"}


def test_assignments_to_secret_names_are_masked_in_text_and_prose_is_not():
    """`export HF_TOKEN=hunter2hunter2` in a setup line reached --dry-run and sweep.json: no
    shape of token, only a name."""
    from qarac_dist.base.secrets import redact_text

    cases = {"export HF_TOKEN=hunter2hunter2": "export HF_TOKEN=[redacted]",
             "--api-key='two words' --lr=3": "--api-key=[redacted] --lr=3",
             'export MY_SECRET="s 1" && run': "export MY_SECRET=[redacted] && run",
             "expected dotted.key=value": "expected dotted.key=value", "max_tokens=5 tokenizer=bert":
             "max_tokens=5 tokenizer=bert",
             # a user's diff (track/code_record.py): Python, YAML and JSON forms (a review found them)
             '+wandb_api_key = "0123456789abcdef0123456789abcdef01234567"': "+wandb_api_key = [redacted]",
             '+  db_password: "hunter2-prod"': "+  db_password: [redacted]",
             '{"api_key": "xyz", "lr": 1}': '{"api_key": [redacted], "lr": 1}',
             "KeyError: 'token'": "KeyError: 'token'", "url: https://host/x": "url: https://host/x",
             "max_tokens: 4096": "max_tokens: 4096"}
    assert {text: redact_text(text, {}) for text in cases} == cases


def test_batched_logger_sends_every_point_in_few_requests(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run_id = create_run(c, experiment_id(c, "e"), "r", {})
    logger = MlflowLogger(uri, run_id, tmp_path)
    calls = []
    send = logger._send
    logger._send = lambda points: calls.append(len(points)) or send(points)
    for step in range(1, 1201):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1})
    assert logger.close() == 0
    assert _history(c, run_id, "loss") == list(range(1, 1201))
    assert _history(c, run_id, "lr") == list(range(1, 1201))
    assert max(calls) <= 1000 and len(calls) <= 10


def test_every_point_reaches_the_run_once_whoever_sends_it(tmp_path):
    """After an outage and a requeue, the resumed job re-sent metrics.jsonl's rows and left
    mlflow_unsent.jsonl; `status --sync` then sent steps 1-4 again. A request that failed after
    reaching the server did the same on its retry."""
    import json

    from qarac_dist.track.mlflow_logger import UNSENT, replay_unsent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run_id = create_run(c, experiment_id(c, "e"), "r", {})
    requeued = MlflowLogger(uri, run_id, tmp_path)  # the resumed job: replays rows 1-4, then trains 5-6
    for step in range(1, 7):
        requeued.log(step, {"loss": 1.0 / step})
    assert requeued.close() == 0
    # What the interrupted job could not send: steps 1-4, and one it never sent at all (val at 4).
    (tmp_path / UNSENT).write_text("\n".join([json.dumps({"uri": uri, "run_id": run_id}),
                                              *(json.dumps(["loss", 1.0 / s, 0, s]) for s in range(1, 5)),
                                              json.dumps(["val_loss", 0.5, 0, 4])]) + "\n")
    assert replay_unsent(tmp_path) == 1 and not (tmp_path / UNSENT).exists()
    assert _history(c, run_id, "loss") == list(range(1, 7)) and _history(c, run_id, "val_loss") == [4]

    slow = MlflowLogger(uri, run_id, tmp_path)  # its request reached the server, its answer did not
    send = slow.client.log_batch

    def reached_then_failed(*args, **kwargs):
        send(*args, **kwargs)
        slow.client.log_batch = send
        raise TimeoutError("read timed out")

    slow.client.log_batch = reached_then_failed
    slow.log(7, {"loss": 1 / 7})
    assert slow.close() == 0
    assert _history(c, run_id, "loss") == list(range(1, 8))


def test_sync_skips_what_is_no_point_and_waits_for_a_live_writer(tmp_path, capsys):
    """A cut-short last line of mlflow_unsent.jsonl (appended, so a kill mid-write leaves one)
    crashed `status --sync`; and --sync replayed and removed a live job's file under it."""
    import json
    import subprocess
    import sys

    import pytest

    from qarac_dist.track.mlflow_logger import UNSENT
    from qarac_dist.track.mlflow_runs import sync
    from qarac_dist.track.trial_dir import WriterHeld

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run_id = create_run(c, experiment_id(c, "e"), "r", {})
    trial = tmp_path / "trial"
    trial.mkdir()
    (trial / UNSENT).write_text(json.dumps({"uri": uri, "run_id": run_id}) + "\n" + json.dumps(["loss", 0.5, 0, 1])
                                + "\n" + "not a point\n" + '["loss", 0.4, 2')
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from qarac_dist.track.trial_dir import TrialDir; "
                               f"f = TrialDir({str(trial)!r}).hold_writer('a training job'); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(WriterHeld, match="a training job"):
        sync(trial)
    holder.communicate("")  # the job ends: its lock goes with it
    assert sync(trial) == (1, False) and _history(c, run_id, "loss") == [1]
    err = capsys.readouterr().err
    assert "line 3 is not a metric point; passed over" in err and "its last line was cut short" in err


def test_a_configuration_run_records_its_seeds_mean_std_and_curve_a_failed_seed_left_out(tmp_path):
    """With repeats: seeds' runs under their configuration's run, which gets the mean, the sample
    std and the count of the seeds that finished, and their mean curve, once all its seeds
    ended; the parent names the configuration with the best mean, and its best seed."""
    from mlflow.entities import Metric

    from qarac_dist.track import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = sweep_runs.create_parent(uri, "e", "s", "local", {}, {})
    c = client(uri)
    seeds = {"steady": [0.70, 0.72, None], "lucky": [0.95, 0.40, 0.45]}  # None: that seed failed
    runs = {}
    for configuration, values in seeds.items():
        config_run = sweep_runs.create_configuration(uri, "e", parent, configuration, f"lr={configuration}", 3,
                                                     {"sweep": "s"}, {"optimizer.lr": "1", "training.seed": "0"})
        for k, value in enumerate(values):
            tid = f"{configuration}{k}"
            runs[tid] = sweep_runs.create_child(uri, "e", config_run, tid, {
                "trial_id": tid, sweep_runs.CONFIGURATION: configuration, sweep_runs.SWEEP_RUN: parent}, {})
            if value is None:
                c.log_batch(runs[tid], metrics=[Metric("val_accuracy", 0.1, 0, 10)])
                c.set_terminated(runs[tid], "FAILED")
                continue
            c.log_batch(runs[tid], metrics=[Metric("val_accuracy", value / 2, 0, 10),
                                            Metric("val_accuracy", value, 0, 20),
                                            Metric("best_val_accuracy", value, 0, 20),
                                            Metric("best_val_loss", 1 - value, 0, 20)])
            c.set_tag(runs[tid], "best_step", "20")
            if tid != "lucky2":
                c.set_terminated(runs[tid], "FINISHED")
    # Each lacks a finished seed (steady's failed, lucky's runs): the better mean, steady's 0.71.
    assert sweep_runs.update_parent(c, parent, "accuracy", "max") == ("steady1", pytest.approx(0.71))
    assert not [r for r in sweep_runs.trial_runs(c, c.get_run(parent))[1] if r.info.status == "FINISHED" and
                r.data.tags[sweep_runs.CONFIGURATION] == "lucky"]  # not recorded while a seed runs
    c.set_terminated(runs["lucky2"], "FINISHED")
    # A failed seed ranks steady after a configuration whose seeds all finished: lucky (0.6),
    # though lucky's best seed (0.95) is the best of all.
    assert sweep_runs.update_parent(c, parent, "accuracy", "max") == ("lucky0", pytest.approx(0.6))
    verdict = c.get_run(parent).data
    assert verdict.tags["best_configuration"] == "lucky" and verdict.tags["best_trial"] == "lucky0"
    trials, configuration_runs = sweep_runs.trial_runs(c, c.get_run(parent))
    assert len(trials) == 6 and len(configuration_runs) == 2
    steady = next(r for r in configuration_runs if r.data.tags[sweep_runs.CONFIGURATION] == "steady")
    assert steady.info.status == "FINISHED" and "training.seed" not in steady.data.params
    assert steady.data.metrics["best_val_accuracy"] == pytest.approx(0.71)
    assert steady.data.metrics["best_val_accuracy_std"] == pytest.approx(0.0141421356)
    assert steady.data.metrics["seeds_finished"] == 2
    curve = {m.step: m.value for m in c.get_metric_history(steady.info.run_id, "val_accuracy")}
    assert curve == {10: pytest.approx(0.355), 20: pytest.approx(0.71)}  # the failed seed's point left out
    assert verdict.metrics["best_val_accuracy"] == pytest.approx(0.6)
    assert verdict.metrics["best_val_accuracy_seeds"] == 3


def test_a_sweep_that_ends_with_seeds_lost_records_their_configurations_over_the_seeds_that_finished(tmp_path):
    """A lost job's run is left open for its requeue: while the sweep runs, its configuration
    waits; once the sweep has ended, the configuration is recorded over the seeds that finished
    (FAILED with none), and the parent's std is that choice's (none with one seed), not one an
    earlier choice left there."""
    import math

    from mlflow.entities import Metric

    from qarac_dist.track import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = sweep_runs.create_parent(uri, "e", "s", "local", {}, {})
    c = client(uri)
    c.log_metric(parent, "best_val_accuracy_std", 0.3)  # as an earlier choice left it
    configuration_runs = {}
    for configuration, values in {"a": [0.8, None], "b": [None, None]}.items():  # None: lost, its run left open
        configuration_runs[configuration] = sweep_runs.create_configuration(uri, "e", parent, configuration, "x", 2,
                                                                            {}, {})
        for k, value in enumerate(values):
            run_id = sweep_runs.create_child(uri, "e", configuration_runs[configuration], f"{configuration}{k}", {
                "trial_id": f"{configuration}{k}", sweep_runs.CONFIGURATION: configuration,
                sweep_runs.SWEEP_RUN: parent}, {})
            if value is not None:
                c.log_batch(run_id, metrics=[Metric("best_val_accuracy", value, 0, 4),
                                             Metric("val_accuracy", value, 0, 4)])
                c.set_terminated(run_id, "FINISHED")
    sweep_runs.update_parent(c, parent, "accuracy", "max")
    assert all(c.get_run(r).info.status == "RUNNING" and not c.get_run(r).data.metrics
               for r in configuration_runs.values())
    sweep_runs.update_parent(c, parent, "accuracy", "max", closing=True)
    a, b = (c.get_run(configuration_runs[x]) for x in "ab")
    assert (a.info.status, a.data.metrics["seeds_finished"]) == ("FINISHED", 1)
    assert a.data.metrics["best_val_accuracy"] == 0.8
    assert "best_val_accuracy_std" not in a.data.metrics
    assert (b.info.status, b.data.metrics) == ("FAILED", {"seeds_finished": 0})
    verdict = c.get_run(parent).data
    assert verdict.tags["best_configuration"] == "a" and verdict.metrics["best_val_accuracy_seeds"] == 1
    assert math.isnan(verdict.metrics["best_val_accuracy_std"])
    points = len(c.get_metric_history(parent, "best_val_accuracy_std"))
    sweep_runs.update_parent(c, parent, "accuracy", "max", closing=True)  # the same verdict: no new points
    assert len(c.get_metric_history(parent, "best_val_accuracy_std")) == points


def test_a_configuration_out_of_the_sweep_file_is_retired_and_one_rerun_is_running_again(tmp_path):
    """With repeats, the driver's side: a configuration whose seeds all left the sweep file is
    tagged retired like them (back in the file, no longer); a seed submitted again reopens its
    configuration's run, which its end records again."""
    from qarac_dist.submit import tracking
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord
    from qarac_dist.track import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = {tid: TrialRecord(tid, f"lr={tid[0]} seed {tid[1]}", {}, {}, str(tmp_path / tid), "local",
                                configuration=tid[0] + "0") for tid in ("a0", "a1", "b0", "b1")}
    manifest = Manifest("s", "local", "accuracy", "max", trials=records, tracking_uri=uri, experiment="e")
    tracking.ensure_runs(manifest, list(records.values()), ["optimizer.lr"])
    c = client(uri)
    a, b = manifest.configurations["a0"], manifest.configurations["b0"]
    for r in records.values():
        c.set_terminated(r.mlflow_run_id, "FAILED")
    sweep_runs.update_parent(c, manifest.mlflow_parent_run_id, "accuracy", "max", closing=True)
    assert c.get_run(a).info.status == c.get_run(b).info.status == "FAILED"  # none of their seeds finished

    records["a0"].retired = True
    tracking.mark_retired(manifest, [records["a0"]], SweepLayout(tmp_path))
    assert c.get_run(a).data.tags[sweep_runs.RETIRED] == "false"  # a1 is still in the file
    records["a1"].retired = True
    tracking.mark_retired(manifest, [records["a1"]], SweepLayout(tmp_path))
    assert c.get_run(a).data.tags[sweep_runs.RETIRED] == "true" and sweep_runs.RETIRED not in c.get_run(b).data.tags
    records["a1"].retired = False
    tracking.mark_retired(manifest, [records["a1"]], SweepLayout(tmp_path))
    assert c.get_run(a).data.tags[sweep_runs.RETIRED] == "false"

    tracking.ensure_runs(manifest, [records["b1"]], ["optimizer.lr"])  # b1 submitted again
    assert (c.get_run(b).info.status, c.get_run(a).info.status) == ("RUNNING", "FAILED")
    assert c.get_run(manifest.mlflow_parent_run_id).info.status == "RUNNING"
    c.update_run(records["b1"].mlflow_run_id, status="RUNNING")
    c.set_terminated(records["b1"].mlflow_run_id, "FINISHED")  # this time it finished
    sweep_runs.update_parent(c, manifest.mlflow_parent_run_id, "accuracy", "max", closing=True)
    assert (c.get_run(b).info.status, c.get_run(b).data.metrics["seeds_finished"]) == ("FINISHED", 1)


def test_a_sweep_that_ends_with_a_trial_lost_ends_its_run(tmp_path):
    """A lost job's run is left RUNNING for its requeue; once the sweep has ended (no requeue
    left) the close ends it FAILED, a preempted one that was not requeued KILLED; runs their
    own jobs ended keep their end."""
    from qarac_dist.submit import tracking
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    states = {"a": "COMPLETED", "b": "LOST", "c": "PREEMPTED", "d": "FAILED"}
    records = {tid: TrialRecord(tid, f"lr={tid}", {}, {}, str(tmp_path / tid), "local", state=state)
               for tid, state in states.items()}
    manifest = Manifest("s", "local", "accuracy", "max", trials=records, tracking_uri=uri, experiment="e")
    tracking.ensure_runs(manifest, list(records.values()), ["optimizer.lr"])
    c = client(uri)
    c.set_terminated(records["a"].mlflow_run_id, "FINISHED", end_time=1000)
    c.set_terminated(records["d"].mlflow_run_id, "FAILED", end_time=2000)  # as its own job ended it
    tracking.close_parent(manifest, SweepLayout(tmp_path))
    ended = {tid: c.get_run(r.mlflow_run_id).info for tid, r in records.items()}
    assert {tid: info.status for tid, info in ended.items()} == {"a": "FINISHED", "b": "FAILED", "c": "KILLED",
                                                                 "d": "FAILED"}
    assert (ended["a"].end_time, ended["d"].end_time) == (1000, 2000)
    assert c.get_run(manifest.mlflow_parent_run_id).info.status == "FAILED"
