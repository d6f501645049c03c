"""One look at the test set (`final:`, issue 36): the test split is no part of a trial, is
generated apart, is read only when asked for, and its metrics are summed up per choice."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.base.files import write_json
from qarac_dist.config import ConfigError, config_from_dict, config_to_dict
from qarac_dist.config.schema import apply_overrides
from qarac_dist.config.sweep import Resources, load_sweep
from qarac_dist.plan.expand import plan, trial_id
from qarac_dist.submit import final
from qarac_dist.config.choice import Final
from qarac_dist.submit.report import _final_line
from support import tiny_config, write_config


def _ids(tmp_path, name: str, **fields) -> list[str]:
    path = tmp_path / f"{name}.yaml"
    write_config(path, {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"),
                        "grid": {"optimizer.lr": [1e-3, 2e-3]}, "repeats": 2, **fields})
    spec, base = load_sweep(path)
    trials = plan(spec, base, str(path))
    for t in trials:  # the fast planner's ids are the definition's
        assert trial_id(config_to_dict(config_from_dict(apply_overrides(base, list(t.overrides.items())), "x"))) == t.id
    return [t.id for t in trials]


def test_a_test_split_changes_no_trial_id(tmp_path):
    """The test split is no part of a trial (no trial reads it): giving one, or another, plans
    the same trials, so adding `final:` to a sweep that ran re-runs nothing."""
    plain = _ids(tmp_path, "plain")
    assert _ids(tmp_path, "generated", set={"data.synthetic.num_test": 50}, final={"split": "test"}) == plain
    assert _ids(tmp_path, "more", set={"data.synthetic": {"num_test": 70}}) == plain
    assert _ids(tmp_path, "other", set={"data.synthetic.num_train": 97}) != plain  # what is a trial still counts
    for name in ("a.csv", "b.csv", "t.csv"):
        (tmp_path / name).write_text("text,label\na,0\nb,1\n")
    files = {"data.synthetic": None, "data.train_files": [str(tmp_path / "a.csv")],
             "data.validation_files": [str(tmp_path / "b.csv")]}
    plain = _ids(tmp_path, "files", set=files)
    assert _ids(tmp_path, "tested", set={**files, "data.test_files": [str(tmp_path / "t.csv")]}) == plain
    with pytest.raises(ConfigError, match="grid.data.test_files: the test split is no part of a trial"):
        _ids(tmp_path, "varied", set=files, grid={"data.test_files": [[str(tmp_path / "t.csv")]]})


def test_the_generated_test_split_is_drawn_after_validation_in_a_folder_of_its_own(tmp_path):
    from qarac_dist.config.sections import SyntheticConfig
    from qarac_dist.train.synthetic import generate_similarity, generate_synthetic

    for generate in (generate_synthetic, generate_similarity):
        spec = SyntheticConfig(num_train=20, num_validation=10, min_tokens=8, max_tokens=16, evidence_after=2)
        with_test = SyntheticConfig(**{**vars(spec), "num_test": 15})
        generate(spec, tmp_path / "a")
        generate(with_test, tmp_path / "b")
        generate(with_test, tmp_path / "t", ("test",))
        generate(with_test, tmp_path / "t2", ("test",))
        for split in ("train", "validation"):  # the trials' files are the same bytes with or without
            assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        assert not (tmp_path / "b" / "test.jsonl").exists() and [p.name for p in (tmp_path / "t").iterdir()] == \
            ["test.jsonl"]
        test = (tmp_path / "t" / "test.jsonl").read_text().splitlines()
        assert len(test) == 15 and (tmp_path / "t2" / "test.jsonl").read_text().splitlines() == test
        assert not set(test) & set((tmp_path / "a" / "train.jsonl").read_text().splitlines())


def test_a_trial_prepares_no_test_split_and_the_final_evaluation_does(tmp_path):
    from qarac_dist.train import data

    cfg = config_from_dict(tiny_config(tmp_path / "cache", tmp_path / "out", data={"synthetic": {
        "num_train": 24, "num_validation": 8, "min_tokens": 40, "max_tokens": 60, "evidence_after": 8, "num_classes": 2,
        "num_test": 12}}), "t")
    splits = data.prepare(cfg)
    assert splits.test is None and not data.synthetic_test_dir(cfg.data).exists()
    assert data.synthetic_dir(cfg.data).name == "synthetic-" + data._fingerprint(
        {k: v for k, v in vars(cfg.data.synthetic).items() if k != "num_test"})
    tested = data.prepare(cfg, test="test")
    assert len(tested.test) == 12 and data.synthetic_test_dir(cfg.data).is_dir()
    assert tested.tokenizer.get_vocab() == splits.tokenizer.get_vocab()  # the trials' own tokenizer


class _Cluster:
    """What final.schedule asks of SLURM: which jobs may still run, cancels, submissions."""

    def __init__(self, live=()):
        self.live_jobs, self.cancelled, self.submitted = set(live), [], []

    def live(self, jobs):
        return self.live_jobs & set(jobs)

    def alive(self, job):
        return job in self.live_jobs

    def cancel(self, jobs, at_once=False):
        self.cancelled += jobs
        self.live_jobs -= set(jobs)

    def submit_after(self, call, after):
        job = str(900 + len(self.submitted))
        self.submitted.append((call, after))
        self.live_jobs.add(job)
        return job

    # The retrainings (final.retrain): an array of trials' jobs.
    kind, resources, max_requeues = "slurm", Resources(), 0

    def one_trial_a_job(self):
        return self

    def submit(self, calls, after=()):
        array = 800 + len(self.submitted)
        self.submitted.append((calls, list(after)))
        jobs = [type("Job", (), {"job_id": f"{array}_{k}"})() for k in range(len(calls))]
        self.live_jobs |= {j.job_id for j in jobs}
        return jobs


def test_the_final_job_waits_for_every_job_that_may_run_and_is_replaced_only_when_it_must(tmp_path, monkeypatch):
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir()
    manifest = Manifest("s", "slurm", "accuracy", "max")
    for tid, job in (("a", "7_0"), ("b", "7_1"), ("c", "6_0")):
        manifest.trials[tid] = TrialRecord(tid, tid, {}, {}, str(tmp_path / tid), "slurm", job_id=job)
    configs = {"a": {"data": {"synthetic": {"num_test": 40}}}}
    chosen = {"configuration": "a", "seeds": {"a": 4}, "split": "test", "data": {}}
    monkeypatch.setattr(final, "choice", lambda *_: chosen)
    slurm = _Cluster(live={"7_0", "7_1"})
    line = final.schedule(slurm, manifest, layout, Final(), configs, submitted=True)
    (job, after), = slurm.submitted
    assert after == ["7_0", "7_1"] and line.endswith("after job(s) 7_0, 7_1 (afterany)")
    assert isinstance(job, final.FinalJob) and job.root == str(layout.root.resolve())
    assert Manifest.load(layout.root).final_job["id"] == "900"
    # Followed again (nothing submitted): the job that waits is kept; new trials replace it.
    assert final.schedule(slurm, manifest, layout, Final(), configs, submitted=False) is None
    assert final.schedule(slurm, manifest, layout, Final(), configs, submitted=True) is not None
    assert slurm.cancelled == ["900"] and manifest.final_job["id"] == "901"
    # A test split edited since: the job would evaluate the old one.
    edited = {"a": {"data": {"synthetic": {"num_test": 80}}}}
    assert final.schedule(slurm, manifest, layout, Final(), edited, submitted=False) is not None
    assert slurm.cancelled == ["900", "901"] and slurm.submitted[-1][1] == ["7_0", "7_1"]
    assert "job 902, which would have evaluated before it or another split, is cancelled" in \
        final.schedule(slurm, manifest, layout, Final(), configs, submitted=True)
    # The sweep has ended: a choice evaluated before submits nothing; one never evaluated, a job
    # with nothing to wait for.
    slurm = _Cluster()
    write_json(layout.final, {"results": [{"choice": chosen, "digest": "d", "rows": 40, "seeds": {},
                                           "mean": {}, "std": {}}]})
    assert final.schedule(slurm, manifest, layout, Final(), configs, submitted=False) is None and not slurm.submitted
    slurm.live_jobs.add("903")  # pending for a split edited since, now edited back: it goes, none comes
    manifest.final_job = {"id": "903", "given": "another split"}
    assert final.schedule(slurm, manifest, layout, Final(), configs, submitted=False).startswith(
        "cancelled: SLURM job 903; final.json holds") and slurm.cancelled == ["903"] and not slurm.submitted
    chosen = {**chosen, "seeds": {"a": 6}}
    assert final.schedule(slurm, manifest, layout, Final(), configs, submitted=False).endswith("on the split 'test'")
    assert slurm.submitted[0][1] == []


def test_with_retrain_the_final_job_waits_for_an_array_of_retrainings_that_waits_for_the_trials(tmp_path,
                                                                                               monkeypatch):
    from qarac_dist.submit import retrain
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir()
    manifest = Manifest("s", "slurm", "accuracy", "max")
    for tid, job in (("a", "7_0"), ("b", "7_1")):
        manifest.trials[tid] = TrialRecord(tid, tid, {}, {}, str(tmp_path / tid), "slurm", job_id=job)
    configs = {"a": {"data": {"synthetic": {"num_test": 40}}}}
    monkeypatch.setattr(final, "choice", lambda *_: {"configuration": "a", "seeds": {"a": 4, "b": 6}})
    slurm = _Cluster(live={"7_0", "7_1"})
    line = final.schedule(slurm, manifest, layout, Final(retrain=True), configs, submitted=True, repeats=2)
    (retrainings, after), (job, waits_for) = slurm.submitted
    assert [type(r) for r in retrainings] == [retrain.RetrainJob] * 2 and [r.index for r in retrainings] == [0, 1]
    assert after == ["7_0", "7_1"] and isinstance(job, final.FinalJob) and waits_for == ["800_0", "800_1"]
    assert line == ("submitted: SLURM job(s) 800_0, 800_1 train the chosen configuration again after job(s) 7_0, 7_1 "
                    "(afterany); SLURM job 901, the evaluation on the split 'test' after them")
    assert Manifest.load(layout.root).final_job["retrain"] == ["800_0", "800_1"]
    # New trials: the evaluation and its retrainings, which would train before them, are cancelled.
    final.schedule(slurm, manifest, layout, Final(retrain=True), configs, submitted=True, repeats=2)
    assert slurm.cancelled == ["901", "800_0", "800_1"]
    waiting = final.jobs(manifest)  # final.retrain turned off while they wait: a plain evaluation replaces them
    assert final.schedule(slurm, manifest, layout, Final(), configs, submitted=False) is not None
    assert slurm.cancelled[-3:] == waiting and "retrain" not in manifest.final_job
    manifest.final_job = {"id": "9", "retrain": "800_0"}  # a hand-edited manifest: only job ids are cancelled
    assert final.jobs(manifest) == ["9"]


def test_a_retraining_trains_its_seed_in_a_folder_of_its_own_untracked_and_only_once(tmp_path, monkeypatch):
    from qarac_dist.submit import retrain
    from qarac_dist.submit.executors import TrialJob
    from qarac_dist.track.trial_dir import TrialDir, TrialState

    layout = SweepLayout(tmp_path / "sweep")
    configs = {tid: {"name": f"s-{tid}", "asha": {"rungs": [2]}, "output": {"dir": f"/trials/{tid}", "export_best": True},
                     "tracking": {"uri": "sqlite:///x.db", "log_model": True}} for tid in ("a", "b")}
    monkeypatch.setattr(retrain, "seeds", lambda *_: (None, [("a", 4), ("b", 6)]))  # the choice its files give
    trained = []
    monkeypatch.setattr(TrialJob, "__call__", lambda job: trained.append((job.config, job.context)) or {})
    slurm = type("Slurm", (), {"kind": "slurm", "max_requeues": 0,
                               "resources": Resources(nodes=2, tasks_per_node=2, gpus_per_node=2, cpus_per_task=3)})()
    assert retrain.RetrainJob(str(layout.root), configs, 2, slurm)() is None and not trained  # a seed that failed
    retrain.RetrainJob(str(layout.root), configs, 1, slurm)()
    (config, context), = trained
    assert context == {"retrain_steps": 6, "tags": {"trial_id": "b", "executor": "slurm"}, "sweep_dir": str(layout.root),
                       "gpus": 4, "cpus": 12}  # what it holds, for its clock (the sweep's hours)
    assert config["output"] == {"dir": str(layout.retrained("b", 6)), "export_best": False, "export_last": True}
    assert config["tracking"] == {"uri": None, "log_model": True} and config["asha"] is None
    assert retrain.failure(layout, "b", 6) == "the retraining of trial b (6 steps) never started"
    folder = TrialDir(layout.retrained("b", 6))
    folder.begin(None)
    folder.update(state=TrialState.FAILED, error="DiskFull: no space")
    assert retrain.failure(layout, "b", 6) == "the retraining of trial b (6 steps) ended FAILED: DiskFull: no space"
    folder.update(state=TrialState.COMPLETED)
    assert not retrain.trained(layout, "b", 6)  # no model exported: trained again
    write_json(folder.last / "qarac_last.json", {"step": 6, "metrics": {}})
    assert retrain.trained(layout, "b", 6)
    retrain.RetrainJob(str(layout.root), configs, 1, slurm)()
    assert len(trained) == 1


def test_a_final_job_that_cannot_keep_its_result_fails_and_leaves_the_metrics_in_its_log(tmp_path, monkeypatch,
                                                                                          capsys):
    from qarac_dist.submit.sweep_dir import Manifest

    layout = SweepLayout(tmp_path)
    Manifest("s", "slurm", "accuracy", "max").save(layout.root)
    layout.final.mkdir()  # final.json a directory: write_json cannot replace it
    result = {"choice": {"configuration": "a", "seeds": {"a": 4}, "split": "test", "data": {}}, "digest": "d",
              "rows": 40, "seeds": {"a": {"accuracy": 0.625}}, "mean": {"accuracy": 0.625}, "std": {"accuracy": None}}
    monkeypatch.setattr(final, "evaluate", lambda *_: result)
    with pytest.raises(SystemExit) as ended:
        final.FinalJob(str(tmp_path), Final(), {"a": {}})()
    assert ended.value.code == 1
    assert 'looked at, but not kept: test {"accuracy": 0.625} over 1 seed(s) of configuration a' in \
        capsys.readouterr().err
    layout.final.rmdir()  # kept: the job ends well, a NaN metric (never equal to itself) or not
    nan = {**result, "mean": {"accuracy": math.nan}, "seeds": {"a": {"accuracy": math.nan}}}
    monkeypatch.setattr(final, "evaluate", lambda *_: final._keep(layout, [nan]) or nan)
    assert final.FinalJob(str(tmp_path), Final(), {"a": {}})() == "d"


def test_waiting_for_the_final_job_outlasts_a_scheduler_that_does_not_answer(monkeypatch, capsys):
    from qarac_dist.submit import cluster
    from qarac_dist.submit.sweep_dir import Manifest

    answers = iter([cluster.SchedulerUnavailable("squeue failed (timeout)"), True, False])

    def alive(_job):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    import functools

    clock = iter(range(0, 10_000, 60))  # a minute passes between asks: the scheduler is asked again
    monkeypatch.setattr(final, "Patience", functools.partial(cluster.Patience, clock=lambda: next(clock)))
    manifest = Manifest("s", "slurm", "accuracy", "max", final_job={"id": "814"})
    final.wait_for_job(type("Slurm", (), {"alive": staticmethod(alive)})(), manifest, SweepLayout(Path("/s")),
                      poll_s=0)
    assert next(answers, None) is None  # asked until it said the job ended
    assert "squeue failed" in capsys.readouterr().err


def test_status_sync_takes_the_latest_result_only_when_it_is_of_the_choice_as_the_trials_stand(tmp_path, monkeypatch):
    from qarac_dist.submit.sweep_dir import Manifest

    layout = SweepLayout(tmp_path)
    manifest = Manifest("s", "slurm", "accuracy", "max")
    assert final.latest(manifest, layout) is None  # no final.json: no final job ran
    kept = [{"choice": {"configuration": c, "seeds": {c: 4}, "split": "test", "data": {}}, "digest": c, "rows": 4,
             "seeds": {}, "mean": {}, "std": {}} for c in ("a", "b")]
    write_json(layout.final, {"results": kept})
    from qarac_dist.submit import report

    monkeypatch.setattr(report, "chosen_seeds", lambda _: ("b", {"b": 4}))
    assert final.latest(manifest, layout)["digest"] == "b"
    manifest.final_split = report.split_digest({"split": "test", "data": {"num_test": 80}})  # edited since
    assert final.latest(manifest, layout) is None
    manifest.final_split = report.split_digest({**kept[1]["choice"], "retrain": True})  # final.retrain turned on
    assert final.latest(manifest, layout) is None
    manifest.final_split = report.split_digest(kept[1]["choice"])
    assert final.latest(manifest, layout)["digest"] == "b"
    monkeypatch.setattr(report, "chosen_seeds", lambda _: ("a", {"a": 4}))  # chosen again: evaluated before
    assert final.latest(manifest, layout)["digest"] == "a"
    monkeypatch.setattr(report, "chosen_seeds", lambda _: ("b", {"b": 6}))  # a later best step
    assert final.latest(manifest, layout) is None


def test_ctrl_c_during_the_evaluation_writes_nothing_and_reaches_the_command(tmp_path, monkeypatch, capsys):
    """The evaluation gets the terminal's SIGINT with the driver: nothing is kept, and the
    interrupt goes on to the sweep command, which exits 130 (sweep.py)."""
    import sys

    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    layout = SweepLayout(tmp_path)
    manifest = Manifest("s", "local", "accuracy", "max")
    manifest.trials["a"] = TrialRecord("a", "a", {}, {}, str(tmp_path / "a"), "local", state="COMPLETED")
    monkeypatch.setattr(final, "choice", lambda *_: {"configuration": "a", "seeds": {"a": 4}, "split": "test",
                                                     "data": {}})
    ctrl_c = (sys.executable, "-c", "import os, signal, time; os.kill(os.getppid(), signal.SIGINT); time.sleep(60)")
    with pytest.raises(KeyboardInterrupt):
        final.evaluate(Final(), manifest, layout, {"a": {}}, python=ctrl_c)
    assert "interrupted; the test split was not evaluated" in capsys.readouterr().err
    assert not layout.final.exists()


def test_the_mean_and_std_over_seeds_and_the_summary_line(tmp_path, monkeypatch, capsys):
    from qarac_dist.submit import report
    from qarac_dist.submit.sweep_dir import Manifest

    plain = Manifest("s", "local", "accuracy", "max")

    one = final.summarize({"a": {"accuracy": 0.5, "loss": 1.0}})
    assert one == {"mean": {"accuracy": 0.5, "loss": 1.0}, "std": {"accuracy": None, "loss": None}}
    three = final.summarize({"a": {"accuracy": 0.5}, "b": {"accuracy": 0.7}, "c": {"accuracy": 0.6}})
    assert math.isclose(three["mean"]["accuracy"], 0.6) and math.isclose(three["std"]["accuracy"], 0.1)
    nan = final.summarize({"a": {"accuracy": math.nan}, "b": {"accuracy": 0.7}})
    assert math.isnan(nan["mean"]["accuracy"]) and nan["std"]["accuracy"] is None
    layout = SweepLayout(tmp_path)
    seeds = {"a": 10, "b": 20, "c": 10}
    monkeypatch.setattr(report, "chosen_seeds", lambda manifest: ("c0ffee", seeds))
    monkeypatch.setattr(final, "chosen_seeds", lambda manifest: ("c0ffee", seeds))

    class Trials(dict):
        def __missing__(self, tid):
            raise AssertionError(tid)

    manifest = type("M", (), {"trials": Trials()})()
    configs = {tid: {"data": {}} for tid in seeds}
    chosen = final.choice(manifest, Final(), configs)
    assert (chosen["configuration"], chosen["seeds"], chosen["split"]) == ("c0ffee", seeds, "test")
    result = {"choice": chosen, "digest": final.digest(chosen), "rows": 40, "seeds": {"a": {}, "b": {}, "c": {}},
              **three}
    write_json(layout.final, {"results": [result]})
    assert _final_line(layout, "accuracy", plain) == (
        "test (split 'test', 40 rows, looked at once for this choice): accuracy 0.6000 ± 0.1000 over 3 seed(s) of "
        "configuration c0ffee")
    assert _final_line(layout, "macro_f1", plain).startswith("test (split 'test', 40 rows, looked at once for this "
                                                            "choice): macro_f1 - over 3 seed(s)")
    # The choice it evaluated is found again: nothing runs (the evaluator here would fail), and
    # it becomes the latest, the one the summary shows.
    assert final.evaluate(Final(), manifest, layout, configs, python=("false",)) == result
    earlier = {**result, "digest": "0" * 16, "choice": {**chosen, "split": "old"}}
    write_json(layout.final, {"results": [result, earlier]})
    assert final.evaluate(Final(), manifest, layout, configs, python=("false",)) == result
    assert [r["digest"] for r in final.final_results(layout)] == ["0" * 16, result["digest"]]
    for later in ({"a": 10, "b": 30, "c": 10}, {"a": 10, "b": 20}):  # another best step, a seed less
        monkeypatch.setattr(report, "chosen_seeds", lambda manifest, later=later: ("c0ffee", later))
        assert _final_line(layout, "accuracy", plain).endswith("(an earlier choice: the current one was not evaluated)")
    # A test split the sweep file changed since, or final.retrain turned on: the same choice, tested otherwise.
    monkeypatch.setattr(report, "chosen_seeds", lambda manifest: ("c0ffee", seeds))
    for edited in ({**chosen, "data": {"num_test": 80}}, {**chosen, "retrain": True}):
        plain.final_split = report.split_digest(edited)
        assert _final_line(layout, "accuracy", plain).endswith(
            "(this choice tested otherwise than the sweep file now says, which was not evaluated)")
    plain.final_split = report.split_digest(chosen)
    assert "(an earlier choice" not in _final_line(layout, "accuracy", plain)
    # A test split the sweep file changes since is another choice.
    other = {tid: {"data": {"synthetic": {"num_test": 80}}} for tid in seeds}
    assert final.choice(manifest, Final(), other) != chosen
    assert final.choice(manifest, Final(), configs) == chosen
    # Damaged or not ours: said in one line, evaluated again; the summary leaves the line out.
    for damaged in ("{", "[]", '{"results": 3}', '{"results": [{"choice": 3}]}', "",
                    '{"results": [{"choice": {}, "digest": "x", "rows": 1, "seeds": {}, "mean": [1], "std": {}}]}',
                    '{"results": [{"choice": {"configuration": "c", "split": "t"}, "digest": "x", "rows": 1, '
                    '"seeds": {}, "mean": {"accuracy": "x"}, "std": {}}]}'):
        layout.final.write_text(damaged)
        assert _final_line(layout, "accuracy", plain) is None
        assert final._stored(layout) == []
        assert capsys.readouterr().err.count("\n") == 1
    layout.final.unlink()
    layout.final.mkdir()
    assert _final_line(layout, "accuracy", plain) is None and final._stored(layout) == []
    assert final.digest(chosen) == final.digest(dict(reversed(list(chosen.items()))))


@pytest.mark.parametrize("test, refused", [("./train.csv", True), ("link.csv", True), ("../x/valid.csv", True),
                                           ("test.csv", False)])
def test_test_files_that_are_training_files_by_another_path_are_refused(tmp_path, monkeypatch, test, refused):
    from qarac_dist.config.choice import final_problem

    folder = tmp_path / "x"
    folder.mkdir()
    monkeypatch.chdir(folder)
    for name in ("train.csv", "valid.csv", "test.csv"):
        (folder / name).write_text("text,label\na,0\n")
    (folder / "link.csv").symlink_to(folder / "train.csv")
    resolved = {"output": {"export_best": True}, "data": {"train_files": ["train.csv"],
                                                          "validation_files": ["valid.csv"], "test_files": [test]}}
    problem = final_problem(Final(), resolved)
    assert (problem is not None and "is also a training or validation file" in problem) == refused, problem


@pytest.mark.parametrize("split, refused", [("train[:50%]", True), ("train+test", True), ("test + validation", True),
                                            ("validation[10:20]", True), ("test", False), ("test[:50%]", False),
                                            ("trainer", False)])
def test_a_hub_split_that_reads_the_trials_splits_is_refused(split, refused):
    from qarac_dist.config.choice import final_problem

    resolved = {"output": {"export_best": True}, "data": {"dataset": "org/set", "train_split": "train",
                                                          "validation_split": "validation"}}
    assert (final_problem(Final(split=split), resolved) is not None) == refused


def test_a_whole_section_that_varies_the_test_split_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    sections = [{"num_train": 64, "num_test": 10}, {"num_train": 48, "num_test": 20}]
    for grid in ({"data.synthetic": sections}, {"data": [{"synthetic": s} for s in sections]},
                 {"data": [{"test_files": ["a.csv"]}]}):
        write_config(path, {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "grid": grid})
        with pytest.raises(ConfigError, match="the test split is no part of a trial"):
            load_sweep(path)
    write_config(path, {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"),
                        "grid": {"data.synthetic": [{**sections[0], "num_test": None}, sections[1]]}})
    with pytest.raises(ConfigError, match="the test split is no part of a trial"):
        load_sweep(path)  # a null is a value too
    write_config(path, {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"),
                        "grid": {"data.synthetic": [{"num_train": 64}, {"num_train": 48}]}})
    load_sweep(path)  # varying the generated set itself is a sweep's business


def test_the_test_split_waits_for_trials_stopped_from_outside_but_not_for_failed_ones(tmp_path, monkeypatch, capsys):
    """A trial LOST, CANCELLED or PREEMPTED resumes on the next run, which may choose another
    configuration: looking now would look twice. A trial that failed on its own is a failed seed."""
    import sys

    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    layout = SweepLayout(tmp_path)
    manifest = Manifest("s", "local", "accuracy", "max")
    for tid, state in (("a", "COMPLETED"), ("b", "LOST"), ("c", "FAILED")):
        manifest.trials[tid] = TrialRecord(tid, tid, {}, {}, str(tmp_path / tid), "local", state=state)
    manifest.trials["d"] = TrialRecord("d", "d", {}, {}, str(tmp_path / "d"), "local", state="CANCELLED", retired=True)
    monkeypatch.setattr(final, "choice", lambda *_: {"configuration": "a", "seeds": {"a": 4}, "split": "test",
                                                     "data": {}})
    evaluation = (sys.executable, "-c", "import json, sys; json.load(sys.stdin); "
                                        "print(json.dumps({'rows': 4, 'metrics': {'a': {'accuracy': 0.5}}}))")
    for state in ("LOST", "CANCELLED", "PREEMPTED", "PENDING"):
        manifest.trials["b"].state = state
        assert final.evaluate(Final(), manifest, layout, {}, python=evaluation) is None
        assert f"not read while trials stopped before they ended ({state}: 1)" in capsys.readouterr().err
        assert not layout.final.exists()
    manifest.trials["b"].state = "FAILED"  # the retired trial's CANCELLED counts for nothing
    assert final.evaluate(Final(), manifest, layout, {}, python=evaluation)["mean"] == {"accuracy": 0.5}
    assert layout.final.exists()


def test_the_cancelled_final_jobs_sit_beside_the_trials_cancels_and_a_misshapen_entry_cancels_none(tmp_path):
    from qarac_dist.submit.states import refresh
    from qarac_dist.submit.sweep_dir import FINAL_CANCELS, Manifest, TrialRecord, cancelled_final, record_cancels

    layout = SweepLayout(tmp_path)
    record_cancels(tmp_path, {"0123456789": 1})
    record_cancels(tmp_path, {FINAL_CANCELS: ["4242"]})
    assert cancelled_final(tmp_path) == ["4242"]
    manifest = Manifest("s", "local", "accuracy", "max")
    manifest.trials["0123456789"] = TrialRecord("0123456789", "x", {}, {}, str(tmp_path / "t"), "local", attempt=1,
                                                job_id="1", state="RUNNING")
    refresh(manifest, lambda _jobs: {}, layout)
    assert manifest.trials["0123456789"].state == "CANCELLED"  # the trials' cancels read as before
    for misshapen in ("4242", 4242, {"4242": 1}, None):
        write_json(layout.cancels, {FINAL_CANCELS: misshapen})
        assert cancelled_final(tmp_path) == []


def test_status_names_the_evaluations_jobs_that_may_still_run():
    from qarac_dist.submit.sweep_dir import Manifest

    class Scheduler:
        def __init__(self, known):
            self.known, self.asked = known, []

        def states(self, jobs):
            self.asked.append(list(jobs))
            return {j: s for j, s in self.known.items() if j in jobs}

    manifest = Manifest("s", "slurm", "accuracy", "max")
    quiet = Scheduler({})
    assert final.waiting(manifest, quiet) is None and quiet.asked == []  # no final job: nobody is asked
    manifest.final_job = {"id": "816", "retrain": ["815_0", "815_1"]}
    scheduler = Scheduler({"816": "PENDING", "815_0": "COMPLETED", "815_1": "RUNNING"})
    assert final.waiting(manifest, scheduler) == "final: the test split's evaluation: job 815_1 RUNNING, job 816 PENDING"
    assert final.waiting(manifest, Scheduler({"816": "COMPLETED"})) is None


def test_a_local_job_id_is_alive_only_while_it_runs_this_sweeps_submitit_controller(tmp_path):
    """Process ids wrap (32768 on many machines): a job id a manifest kept (a killed driver's
    trial, a retraining) may name another sweep's job later, which --cancel or a re-run's wait
    would then stop or wait on."""
    import subprocess
    import sys

    from qarac_dist.config.sweep import Resources
    from qarac_dist.submit.executors import LocalProcesses

    folder = tmp_path / "runs" / "s" / "submitit"
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "submitit.local._local",
                            str(folder)])
    try:
        assert LocalProcesses(folder, Resources(), 0).alive(str(job.pid))
        for other in (tmp_path / "runs" / "t" / "submitit", tmp_path / "s" / "submitit", tmp_path / "runs"):
            assert not LocalProcesses(other, Resources(), 0).alive(str(job.pid)), other  # another sweep's job
        assert not LocalProcesses(folder, Resources(), 0).alive(str(os.getpid()))  # not submitit's at all
    finally:
        job.kill()
        job.wait()
    assert not LocalProcesses(folder, Resources(), 0).alive(str(job.pid))


class _Here:
    """The local executor as a retraining sees it: job ids, which run, what was cancelled."""

    kind, max_requeues, resources = "local", 0, Resources()

    def __init__(self, on_submit=lambda here, jobs: None, running=()):
        self.running, self.cancelled, self.submitted, self.on_submit = set(running), [], [], on_submit
        self.ended_after: dict[str, int] = {}  # job -> how many more times it is seen alive
        self.fail_at = None  # the submission that cannot start its job

    def submit(self, calls):
        if len(self.submitted) == self.fail_at:
            raise OSError(28, "No space left on device")
        jobs = [str(101 + len(self.submitted) + k) for k in range(len(calls))]
        self.submitted.append(jobs)
        self.running |= set(jobs)
        self.on_submit(self, jobs)
        return [type("Job", (), {"job_id": j})() for j in jobs]

    def alive(self, job):
        if job in self.ended_after:
            self.ended_after[job] -= 1
            if self.ended_after[job] < 0:
                self.running.discard(job)
        return job in self.running

    def cancel(self, jobs, at_once=False):
        self.cancelled.append((list(jobs), at_once))
        self.running -= set(jobs)

    def live(self, jobs):
        return {job for job in jobs if self.alive(job)}


def _retraining(tmp_path):
    from qarac_dist.submit.sweep_dir import Manifest

    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir()
    manifest = Manifest("s", "local", "accuracy", "max")
    manifest.save(layout.root)
    return layout, manifest


def test_a_stop_as_the_retraining_starts_stops_it_once_it_is_named(tmp_path):
    """SIGTERM between the job's start and its name in the manifest left it running unseen,
    and the next run started it again beside it."""
    import signal

    from qarac_dist.submit import retrain, stopping
    from qarac_dist.submit.sweep_dir import Manifest

    layout, manifest = _retraining(tmp_path)
    here = _Here(on_submit=lambda _here, _jobs: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(stopping.Stopped), stopping.signals():
        retrain.run_here(here, manifest, layout, {}, [("a", 4), ("b", 6)], at_once=1)
    assert here.submitted == [["101"]] and here.cancelled == [(["101"], False)] and not here.running
    assert Manifest.load(layout.root).final_job == {}  # ended: named no more (its id may be another's later)


def test_a_run_waits_for_the_retraining_a_killed_driver_left_and_a_cancel_counts_once(tmp_path):
    from qarac_dist.submit import retrain
    from qarac_dist.submit.sweep_dir import FINAL_CANCELS, Manifest, cancelled_final, record_cancels

    layout, manifest = _retraining(tmp_path)
    manifest.final_job = {"retrain": ["7", 8, "9"]}  # 9: ended since; 8: not a job id
    record_cancels(layout.root, {FINAL_CANCELS: ["101"]})  # an earlier cancel's: the id the next job gets

    def cancelled_from_another_terminal(here, jobs):
        assert cancelled_final(layout.root) == []  # cleared before anything started
        record_cancels(layout.root, {FINAL_CANCELS: jobs})
        here.cancel(jobs)

    here = _Here(on_submit=cancelled_from_another_terminal, running={"7"})
    here.ended_after["7"] = 2
    assert retrain.run_here(here, manifest, layout, {}, [("a", 4)], at_once=1) == "the retraining was cancelled (--cancel)"
    assert here.submitted == [["101"]] and "7" not in here.running
    assert cancelled_final(layout.root) == [] and Manifest.load(layout.root).final_job == {}
    # Without the cancel the same run trains and names nothing once done.
    here = _Here()
    here.ended_after["101"] = 1
    assert retrain.run_here(here, manifest, layout, {}, [("a", 4)], at_once=1) is None
    assert here.submitted == [["101"]] and Manifest.load(layout.root).final_job == {}


def test_a_run_that_trains_nothing_again_stops_a_retraining_left_running(tmp_path, capsys):
    from qarac_dist.submit import retrain
    from qarac_dist.submit.sweep_dir import Manifest

    layout, manifest = _retraining(tmp_path)
    retrain.stop_leftover(_Here(), manifest, layout)
    assert capsys.readouterr().err == ""
    manifest.final_job = {"retrain": ["7"]}
    here = _Here(running={"7"})
    retrain.stop_leftover(here, manifest, layout)
    assert here.cancelled == [(["7"], False)] and Manifest.load(layout.root).final_job == {}
    assert "final: stopping the retraining job(s) 7 that an earlier run started" in capsys.readouterr().err


def test_a_retraining_that_cannot_start_stops_those_started_beside_it(tmp_path):
    """The second of two seeds could not start (a full disk as submitit pickles it): the first
    ran on, named nowhere, and the driver ended in a traceback."""
    from qarac_dist.submit import retrain
    from qarac_dist.submit.sweep_dir import Manifest

    layout, manifest = _retraining(tmp_path)
    here = _Here()
    here.fail_at = 1
    assert retrain.run_here(here, manifest, layout, {}, [("a", 4), ("b", 6)], at_once=2) == \
        "the retraining could not start: OSError: [Errno 28] No space left on device"
    assert here.submitted == [["101"]] and here.cancelled == [(["101"], False)] and not here.running
    assert Manifest.load(layout.root).final_job == {}
