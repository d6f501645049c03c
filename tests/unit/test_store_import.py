"""The one writer of a sqlite store: trials keep their MLflow record in their own directory
(track/outbox.py) and one importer copies it in (track/store_import.py), each point once, what
MLflow's client shows being what a run written directly would show."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from qarac_dist.config.sections import TrackingConfig
from qarac_dist.track import store_import
from qarac_dist.track.job_context import JobContext
from qarac_dist.track.mlflow_client import client, create_run, experiment_id
from qarac_dist.track.outbox import OUTBOX, Outbox, OutboxRun
from qarac_dist.track.store_import import Entry, import_outboxes
from support import wait_for


def _store(tmp_path, runs=1):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    exp = experiment_id(c, "e")
    parent = create_run(c, exp, "sweep", {})
    return uri, c, parent, [create_run(c, exp, f"t{i}", {}, parent_run_id=parent) for i in range(runs)]


def _trial(tmp_path, uri, parent, run_id, name="t0"):
    directory = tmp_path / "trials" / name
    directory.mkdir(parents=True, exist_ok=True)
    context = JobContext(attempt=1, tracking_uri=uri, run_id=run_id, parent_run_id=parent,
                         sweep_dir=str(tmp_path), select_metric="accuracy", select_mode="max",
                         tags={"trial_id": name})
    return directory, OutboxRun(TrackingConfig(log_model=False), context, {"optimizer.lr": 0.001}, directory,
                                {"attempt": 1}, "abc")


def _import(tmp_path, uri, entries):
    return import_outboxes(uri, tmp_path / "imported.json", entries)


def _history(c, run_id, key):
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_trial_record_shows_in_mlflow_as_a_run_written_directly(tmp_path):
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    assert run.run_id == run_id  # what a job asks of its run, either kind (a checkpoint keeps the id)
    logger = run.logger()
    for step in range(1, 7):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1})
    logger.log(3, {"val_accuracy": 0.5})
    run.log_dict({"zero_optimization": {"stage": 2}}, "deepspeed_config.json")
    run.set_tags({"resumed_from_step": 3})
    assert c.get_run(run_id).data.metrics == {}  # nothing reached the store: the trial never opened it
    done = _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert (done.points, done.trials) == (13, 1)
    assert [s for s, _ in _history(c, run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    got = c.get_run(run_id)
    assert got.info.status == "RUNNING" and got.data.params["optimizer.lr"] == "0.001"
    assert (got.data.tags["trial_id"], got.data.tags["git_commit"], got.data.tags["resumed_from_step"]) == \
        ("t0", "abc", "3")
    assert got.data.metrics["loss"] == pytest.approx(1 / 6)
    assert [a.path for a in c.list_artifacts(run_id)] == ["deepspeed_config.json"]
    run.finish("FINISHED")
    assert _import(tmp_path, uri, [Entry("t0", directory, run_id)]).points == 0
    assert c.get_run(run_id).info.status == "FINISHED"


def test_a_resumed_jobs_replayed_steps_keep_the_first_value_and_a_second_import_adds_nothing(tmp_path):
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    logger = run.logger()
    for step in range(1, 11):
        logger.log(step, {"loss": float(step)})
    entries = [Entry("t0", directory, run_id)]
    _import(tmp_path, uri, entries)
    # A requeued job resumes from its step-5 checkpoint and logs steps 6..12 again.
    _, again = _trial(tmp_path, uri, parent, run_id)
    for step in range(6, 13):
        again.logger().log(step, {"loss": 100.0 + step})
    assert _import(tmp_path, uri, entries).points == 2
    assert _import(tmp_path, uri, entries).points == 0
    assert _history(c, run_id, "loss") == [(s, float(s)) for s in range(1, 11)] + [(11, 111.0), (12, 112.0)]
    inode = (directory / OUTBOX).stat().st_ino
    for aid in (None, b'{"t0": {"inode": 1, "off', b'{"t0": {"inode": "x", "offset": -5}}', b"[]",
                f'{{"t0": {{"inode": {inode}, "offset": 10000000}}}}'.encode(),
                f'{{"t0": {{"inode": {inode}, "offset": 7}}}}'.encode(),
                f'{{"t0": {{"inode": {inode}, "offset": "7"}}}}'.encode(), b'{"t0": 3}'):
        # the aid lost, cut short or misshapen: everything is read again, nothing doubled
        if aid is None:
            (tmp_path / "imported.json").unlink()
        else:
            (tmp_path / "imported.json").write_bytes(aid)
        assert _import(tmp_path, uri, entries).points == 0
        assert len(c.get_metric_history(run_id, "loss")) == 12


def test_values_mlflow_stores_specially_read_back_as_mlflow_writes_them(tmp_path):
    uri, c, parent, (run_id, direct) = _store(tmp_path, runs=2)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    values = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "big": 1e300, "neg": -0.0}
    run.logger().log(1, values)
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    c.log_batch(direct, metrics=[__import__("mlflow").entities.Metric(k, v, 0, 1) for k, v in values.items()])
    ours, theirs = c.get_run(run_id).data.metrics, c.get_run(direct).data.metrics
    assert math.isnan(ours.pop("nan")) and math.isnan(theirs.pop("nan"))
    assert ours == theirs
    for key in values:
        assert [(m.step, str(m.value)) for m in c.get_metric_history(run_id, key)] == \
            [(m.step, str(m.value)) for m in c.get_metric_history(direct, key)]


def test_a_line_being_written_waits_and_a_damaged_one_is_passed_over_with_a_word(tmp_path, capsys):
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    run.logger().log(1, {"loss": 1.0})
    entries = [Entry("t0", directory, run_id)]
    with open(directory / OUTBOX, "a") as f:
        f.write('["loss", 2.0, 5, 2]\n{"nothing": 1}\n["loss", "x", 5, 3]\n[1, 2]\n["loss", 4.0, 5')
    _import(tmp_path, uri, entries)
    assert [s for s, _ in _history(c, run_id, "loss")] == [1, 2]
    assert capsys.readouterr().err.count("is no MLflow record; passed over") == 3
    with open(directory / OUTBOX, "a") as f:  # the line ends: the rest of it is read next time
        f.write(', 4]\n')
    _import(tmp_path, uri, entries)
    assert [s for s, _ in _history(c, run_id, "loss")] == [1, 2, 4]
    with open(directory / OUTBOX, "a") as f:  # a job killed mid-line: the next job ends the line first
        f.write('["loss", 5.0, 5, 5')
    Outbox(directory).write(["loss", 6.0, 5, 6])
    _import(tmp_path, uri, entries)
    assert [s for s, _ in _history(c, run_id, "loss")] == [1, 2, 4, 6]


def test_a_second_importer_is_refused_while_one_holds_the_store(tmp_path):
    from qarac_dist.base.lock import LockHeld

    uri, _, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    run.logger().log(1, {"loss": 1.0})
    entries = [Entry("t0", directory, run_id)]
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from qarac_dist.track.store_import import writer_lock
        held = writer_lock({uri!r})
        print("held", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld):
            import_outboxes(uri, tmp_path / "imported.json", entries, wait=False)
        assert import_outboxes(uri, tmp_path / "imported.json", [], wait=False).points == 0  # nothing new: no lock
    finally:
        holder.communicate("")
    assert import_outboxes(uri, tmp_path / "imported.json", entries, wait=False).points == 1


def test_an_importer_killed_mid_way_leaves_each_point_once_after_another_takes_over(tmp_path):
    """SIGKILL once the first chunk is in the store, before how far the outboxes were read is
    saved: the next importer reads them all again and goes on from what the store holds."""
    uri, c, parent, runs = _store(tmp_path, runs=30)
    entries, expected = [], 0
    for i, run_id in enumerate(runs):
        directory, run = _trial(tmp_path, uri, parent, run_id, name=f"t{i}")
        logger = run.logger()
        for step in range(1, 201):
            logger.log(step, {"loss": 1.0 / step, "lr": 1e-3, "grad_norm": float(i)})
        expected += 600
        entries.append(Entry(f"t{i}", directory, run_id))
    script = textwrap.dedent(f"""
        import signal
        from pathlib import Path
        from qarac_dist.track import store_import, store_sql
        from qarac_dist.track.store_import import Entry, import_outboxes
        store_import._CHUNK = 900
        flush = store_sql.StoreWriter.flush

        def flush_once(self):
            flush(self)
            Path({str(tmp_path / 'one chunk in')!r}).touch()
            signal.pause()  # killed here

        store_sql.StoreWriter.flush = flush_once
        entries = [Entry(t, Path(d), r) for t, d, r in {[(e.trial_id, str(e.directory), e.run_id) for e in entries]!r}]
        import_outboxes({uri!r}, Path({str(tmp_path / 'imported.json')!r}), entries)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    db = sqlite3.connect(tmp_path / "mlflow.db", timeout=60)

    def points():
        return db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]

    wait_for(lambda: (tmp_path / "one chunk in").exists() or proc.poll() is not None, 120, "a first chunk")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "imported.json").exists()
    assert 0 < points() < expected, "killed before or after the whole import: the test proves nothing"
    _import(tmp_path, uri, entries)
    assert points() == expected
    assert db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT run_uuid, key, step FROM metrics)").fetchone()[0] == \
        expected
    assert all(c.get_run(r).info.status == "RUNNING" for r in runs)


def test_what_mlflow_refuses_or_sqlite_cannot_hold_is_passed_over_and_never_holds_up_the_rest(tmp_path, capsys):
    """Hostile outboxes (a review found each): a tag MLflow refuses used to stop the trial's
    record for good; a step past SQLite's integers, or a directory in place of one trial's
    outbox, stopped every trial's import."""
    uri, c, parent, runs = _store(tmp_path, runs=3)
    entries = []
    for i, run_id in enumerate(runs):
        directory, run = _trial(tmp_path, uri, parent, run_id, name=f"t{i}")
        entries.append(Entry(f"t{i}", directory, run_id))
        run.logger().log(1, {"loss": 1.0})
        if i == 0:
            run.set_tags({"owner@lab": "x"})
            with open(directory / OUTBOX, "a") as f:
                f.write('["loss", 2.0, 5, 99999999999999999999999]\n["loss", 2.0, 99999999999999999999999, 2]\n'
                        '["../../etc", 2.0, 5, 2]\n["bad key!", 2.0, 5, 2]\n{"tags": [1, 2]}\n{"params": "x"}\n'
                        '{"dict": {}, "name": "../up.json"}\n{"inputs": "x"}\n{"inputs": [{"name": 1}]}\n')
            run.logger().log(3, {"loss": 3.0})
            run.finish("FINISHED")
        if i == 1:
            (directory / OUTBOX).unlink()
            (directory / OUTBOX).mkdir()
    _import(tmp_path, uri, entries)
    err = capsys.readouterr().err
    assert [s for s, _ in _history(c, runs[0], "loss")] == [1, 3] and c.get_run(runs[0]).info.status == "FINISHED"
    assert [s for s, _ in _history(c, runs[2], "loss")] == [1]
    assert err.count("is no MLflow record; passed over") == 7 and err.count("event was not taken") == 3, err
    assert "Is a directory; its records are not imported" in err
    assert [a.path for a in c.list_artifacts(runs[0])] == []


def test_a_step_validated_again_after_a_rollback_is_added_and_a_replayed_one_is_not(tmp_path):
    """A loss spike at step 13 rolls back to step 10 and validates there again: val_loss at 12,
    then 10, then 12 and 20. Each (metric, step) once, the first value, step 10 included."""
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    logger = run.logger()
    logger.log(12, {"val_loss": 0.71})
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    for step, value in ((10, 0.70), (12, 0.9), (20, 0.69)):
        logger.log(step, {"val_loss": value})
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert _history(c, run_id, "val_loss") == [(10, 0.70), (12, 0.71), (20, 0.69)]
    assert c.get_run(run_id).data.metrics["val_loss"] == 0.69


def test_a_cancelled_run_stays_ended_when_an_older_start_is_imported_after(tmp_path):
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, _ = _trial(tmp_path, uri, parent, run_id)  # its start, not imported yet (SLURM, nobody following)
    c.set_terminated(run_id, status="KILLED")  # --cancel writes the store at once
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert c.get_run(run_id).info.status == "KILLED"
    _, again = _trial(tmp_path, uri, parent, run_id)  # a later start (a re-run) opens it again
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert c.get_run(run_id).info.status == "RUNNING"


def test_a_last_line_never_ended_is_read_once_and_then_costs_nothing(tmp_path):
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    with open(directory / OUTBOX, "a") as f:
        f.write('["loss", 0.123')  # a job killed mid-line, never run again
    entries = [Entry("t0", directory, run_id)]
    _import(tmp_path, uri, entries)
    offsets = store_import._read_offsets(tmp_path / "imported.json")
    assert not store_import._grown(entries[0], offsets["t0"])  # status answers without MLflow from now on


def test_the_sql_writes_leave_each_run_as_mlflows_client_leaves_it(tmp_path, monkeypatch):
    """Tags, params, a start and an end without a model are written with SQL (track/store_sql.py);
    a store whose tables differ from those that code knows gets all of it through MLflow's
    client. Both stores end up showing the same runs, the parent's verdict included."""
    shown, through = [], {"sql": [], "client": []}
    event = store_import._event
    monkeypatch.setattr(store_import, "_event", lambda c, entry, item, *rest: (
        through[kind].append(next(iter(item))), event(c, entry, item, *rest)))
    for kind in ("sql", "client"):
        home = tmp_path / kind
        home.mkdir()
        uri, c, parent, runs = _store(home, runs=2)
        if kind == "client":
            with sqlite3.connect(home / "mlflow.db") as db:
                db.execute("ALTER TABLE tags ADD COLUMN note TEXT")  # not the table store_sql.py knows
        entries = []
        for i, run_id in enumerate(runs):
            directory, run = _trial(home, uri, parent, run_id, name=f"t{i}")
            entries.append(Entry(f"t{i}", directory, run_id))
            run.logger().log(1, {"loss": 1.0, "best_val_accuracy": 0.5 + i / 10})
            run.log_params({"data.num_rows": 10, "optimizer.lr": 0.5})  # a param keeps its first value
            run.set_tags({"stage": "a"})
            run.log_dict({"zero": 2}, "deepspeed_config.json")  # an artifact holds up no SQL event after it
            run.log_inputs([{"name": "train", "source": {"uri": "g"}, "source_type": "local", "digest": "d1", "rows": 4,
                            "context": "train"}])
            run.set_tags({"stage": "b"})  # a tag takes the last
            if i == 0:
                run.finish("FAILED", error="CUDA out of memory")
        _import(home, uri, entries)
        _trial(home, uri, parent, runs[0], name="t0")[1].finish("FINISHED")  # a retry that ends
        _import(home, uri, entries)
        shown.append([(r.data.params, {k: v for k, v in r.data.tags.items() if k != "mlflow.parentRunId"},
                       r.data.metrics, r.info.status, bool(r.info.end_time),
                       [a.path for a in c.list_artifacts(r.info.run_id)])
                      for r in (c.get_run(run_id) for run_id in runs)])
        shown[-1].append({k: v for k, v in c.get_run(parent).data.tags.items() if k in ("best_trial", "best_order")})
    sql, through_client = shown
    assert sql == through_client
    (params, tags, metrics, status, ended, artifacts), second, verdict = sql
    assert (params["optimizer.lr"], params["data.num_rows"], tags["stage"], tags["error"]) == \
        ("0.001", "10", "b", "CUDA out of memory")
    assert (status, ended, metrics["best_val_accuracy"], second[3], second[4]) == ("FINISHED", True, 0.5, "RUNNING", False)
    assert verdict["best_trial"] == "t0"  # the only trial that finished
    assert artifacts == ["deepspeed_config.json"]
    assert [i.dataset.digest for i in c.get_run(runs[0]).inputs.dataset_inputs] == ["d1"]
    # Artifacts and data inputs hold up no SQL event after them.
    assert (through["sql"], sorted(set(through["client"]))) == (["dict", "inputs", "dict", "inputs"],
                                                                ["dict", "finish", "inputs", "params", "status", "tags"])


@pytest.mark.parametrize("kind", ["sql", "client"])
def test_a_second_reviews_outboxes_stop_no_import_on_either_path(tmp_path, capsys, monkeypatch, kind):
    """Each of these made every import of the sweep raise, or held up one trial for good: a
    step of -2**63, a lone surrogate (a valid JSON escape, no UTF-8), a parent run deleted in
    the UI, a deleted run on the client's path, a line longer than a read. Also: a point MLflow
    refuses (a negative time, a string value) is passed over, a name with `:` kept, and a retry's
    start after the failed attempt's end, read in one import, shows the run RUNNING."""
    monkeypatch.setattr(store_import, "_READ", 4096)
    uri, c, parent, runs = _store(tmp_path, runs=4)
    if kind == "client":
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            db.execute("ALTER TABLE tags ADD COLUMN note TEXT")
    entries = []
    for i, run_id in enumerate(runs):
        directory, run = _trial(tmp_path, uri, parent, run_id, name=f"t{i}")
        entries.append(Entry(f"t{i}", directory, run_id))
        run.logger().log(1, {"loss": 1.0})
        lines = {0: ['["loss", 2.0, 5, -9223372036854775808]', '["loss", 2.0, -1, 4]', '["loss", "2.0", 5, 5]',
                     '["eval:loss", 2.0, 5, 1]', '{"tags": {"note": "\\ud800"}}', '{"params": {"p": "\\udfff"}}',
                     '{"finish": {"status": "FAILED", "error": "\\ud800 boom", "parent_run_id": "%s"}}' % parent],
                 1: ['{"tags": {"big": "%s"}}' % ("x" * 10_000), '["loss", 2.0, 5, 2]', '["best_val_accuracy", 0.9, 5, 2]',
                     '{"finish": {"status": "FINISHED", "parent_run_id": "%s", "select_metric": "accuracy"}}' % parent],
                 2: ['{"finish": {"status": "FAILED", "end_time": 1000, "parent_run_id": "%s"}}' % parent,
                     '{"status": "RUNNING", "time": 2000}', '["loss", 2.0, 3000, 2]']}
        with open(directory / OUTBOX, "a") as f:
            f.write("".join(line + "\n" for line in lines.get(i, [])))
    c.delete_run(parent)
    c.delete_run(runs[3])
    _import(tmp_path, uri, entries)
    err = capsys.readouterr().err
    assert (tmp_path / "imported.json").exists()
    zero, one, two = (c.get_run(r) for r in runs[:3])
    assert [s for s, _ in _history(c, runs[0], "loss")] == [-2 ** 63, 1]
    assert _history(c, runs[0], "eval:loss") == [(1, 2.0)]
    assert (zero.info.status, zero.data.tags["error"], zero.data.tags["note"], zero.data.params["p"]) == \
        ("FAILED", "? boom", "?", "?")
    assert "big" not in one.data.tags and [s for s, _ in _history(c, runs[1], "loss")] == [1, 2]
    assert one.info.status == "FINISHED" and "is over 4,096 bytes: no MLflow record; passed over" in err
    assert two.info.status == "RUNNING" and [s for s, _ in _history(c, runs[2], "loss")] == [1, 2]
    assert err.count("is no MLflow record; passed over") == 2, err  # the negative time, the string value
    assert err.count("its best trial was not updated") == 1, err
    assert c.get_metric_history(runs[3], "loss") == []


def test_a_line_an_nfs_client_shows_as_zeros_is_waited_on_and_then_passed_over(tmp_path, monkeypatch, capsys):
    """Another host's appended range may read as NUL bytes until that host's NFS client writes
    it back; the range and the line it runs into used to be passed over for good."""
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    entry = Entry("t0", directory, run_id)
    run.logger().log(1, {"loss": 1.0})
    outbox = directory / OUTBOX
    size = outbox.stat().st_size
    late, after = b'["loss", 2.0, 5, 2]\n', b'["loss", 3.0, 5, 3]\n'
    with open(outbox, "ab") as f:
        f.write(b"\0" * len(late) + after)
    _import(tmp_path, uri, [entry])
    assert [s for s, _ in _history(c, run_id, "loss")] == [1]  # waits, and nothing is passed over
    with open(outbox, "r+b") as f:  # the range arrives: the same size, the same inode
        f.seek(size)
        f.write(late)
    _import(tmp_path, uri, [entry])
    assert [s for s, _ in _history(c, run_id, "loss")] == [1, 2, 3]
    with open(outbox, "ab") as f:
        f.write(b"\0" * 7 + b'["loss", 4.0, 5, 4]\n' + b'["loss", 5.0, 5, 5]\n')
    _import(tmp_path, uri, [entry])
    monkeypatch.setattr(store_import, "_NUL_WAIT_S", 0)  # zeros that stay (a host that died mid-write)
    _import(tmp_path, uri, [entry])
    assert [s for s, _ in _history(c, run_id, "loss")] == [1, 2, 3, 5]
    err = capsys.readouterr().err
    assert err.count("has held NUL bytes") == 1 and err.count("is no MLflow record; passed over") == 1, err


def test_a_replayed_end_logs_the_best_model_once_though_a_kill_took_the_runs_tag(tmp_path):
    """An importer killed after the model was logged but before the run's `best_model_step` tag
    (a review found it) logged it again: the run showed two. A model cut short (PENDING) is
    deleted; the one of this best step (READY, tagged with it) is kept and named."""
    import json

    import torch

    from qarac_dist.track.mlflow_runs import complete_run
    from qarac_dist.track.trial_dir import BEST_INFO

    uri, c, parent, (run_id,) = _store(tmp_path)
    best = tmp_path / "best"
    best.mkdir()
    (best / BEST_INFO).write_text(json.dumps({"step": 4, "metrics": {"accuracy": 0.75}, "metric": "accuracy"}))
    end = {"run_id": run_id, "uri": uri, "best_dir": str(best), "status": "FINISHED"}
    complete_run(c, end, module=torch.nn.Linear(2, 2), parent=False)
    first = c.get_run(run_id).data.tags["best_model_id"]
    c.delete_tag(run_id, "best_model_step")  # killed before the tag
    cut_short = c.create_logged_model(c.get_run(run_id).info.experiment_id, source_run_id=run_id).model_id
    complete_run(c, end, module=torch.nn.Linear(2, 2), parent=False)
    models = c.search_logged_models([c.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.model_id for m in models] == [first] and cut_short != first
    assert c.get_run(run_id).data.tags["best_model_step"] == "4"


def test_an_event_a_passing_error_kept_out_is_set_by_the_next_import(tmp_path, monkeypatch, capsys):
    """A reader holding the store (a notebook, a backup) made MLflow answer "database is locked"
    to a trial's artifact: it was passed over for good, as if MLflow had refused it (a review
    found it). Now the trial's events are set again by the next import."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    run.logger().log(1, {"loss": 1.0})
    run.log_dict({"zero": 2}, "deepspeed_config.json")
    run.finish("FINISHED")
    log_dict, calls = MlflowClient.log_dict, []

    def locked_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return log_dict(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_dict", locked_once)
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert "the next import tries again" in capsys.readouterr().err
    assert c.list_artifacts(run_id) == [] and c.get_run(run_id).info.status == "FINISHED"
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert [a.path for a in c.list_artifacts(run_id)] == ["deepspeed_config.json"]
    assert _history(c, run_id, "loss") == [(1, 1.0)]


def test_a_run_deleted_then_restored_gets_its_record_with_an_import_again(tmp_path, capsys):
    """status --sync imports every trial's record again: what a run deleted in the UI missed
    (a review found the points and the end of such a run lost for good once it was restored)."""
    uri, c, parent, (run_id,) = _store(tmp_path)
    directory, run = _trial(tmp_path, uri, parent, run_id)
    run.logger().log(1, {"loss": 1.0})
    run.finish("FINISHED")
    c.delete_run(run_id)
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert "restored, it gets it with python -m qarac_dist.status --sync" in capsys.readouterr().err
    c.restore_run(run_id)
    _import(tmp_path, uri, [Entry("t0", directory, run_id)])
    assert _history(c, run_id, "loss") == []  # read already: an ordinary import goes on from there
    import_outboxes(uri, tmp_path / "imported.json", [Entry("t0", directory, run_id)], again=True)
    assert _history(c, run_id, "loss") == [(1, 1.0)] and c.get_run(run_id).info.status == "FINISHED"


def test_the_parents_verdict_is_whole_after_a_kill_left_part_of_it(tmp_path):
    """A kill between the parent's best_trial tag and its best_run_id left it without the
    others for good (a review found it): the three tags are set together, and made whole."""
    from qarac_dist.track.sweep_runs import update_parent

    uri, c, parent, (run_id,) = _store(tmp_path)
    c.log_metric(run_id, "best_val_accuracy", 0.5)
    c.set_tag(run_id, "trial_id", "t0")
    c.set_terminated(run_id, "FINISHED")
    c.set_tag(parent, "best_trial", "t0")  # what the kill left
    update_parent(c, parent, "accuracy", "max")
    tags = c.get_run(parent).data.tags
    assert (tags["best_trial"], tags["best_run_id"], tags["best_order"].split(";")[0]) == ("t0", run_id, "max accuracy")
