"""Repeats (issue 36): the shipped seeds demo, run as a user runs it (local executor), where the
learning rate with the best single seed is not the one with the best mean; then its one look at
the test split. On the local SLURM cluster: that look as a job after the sweep's jobs, and the
champion moved by a re-run whose choice changed."""

from __future__ import annotations

import datetime
import json
import re
import statistics
import subprocess
import textwrap

from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.mlflow_client import client
from support import ROOT, run_status, run_sweep, table_rows, tiny_config, write_config


# Every process of the sweep (driver, trials, the final evaluation) logs each file it opens whose
# path is in the generated set's test folder: the audit hook sees Python's open() wherever called.
SPY = textwrap.dedent("""
    import json, os, sys
    def _spy(event, args):
        if event == "open" and isinstance(args[0], str) and "synthetic-test-" in args[0]:
            with open(os.environ["TEST_SPLIT_OPENS"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[:1], "path": args[0]}) + "\\n")
    sys.addaudithook(_spy)
""")


def test_the_seeds_demo_picks_the_configuration_with_the_best_mean_not_the_best_seed(tmp_path, data_cache):
    args = (ROOT / "configs" / "seeds_demo.yaml", f"runs_dir={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"set.data.cache_dir={data_cache}")
    plan = run_sweep(*args, "--dry-run", cwd=tmp_path)
    assert "sweep seeds_demo: 9 trials (3 configurations x 3 seeds, chosen by the mean)" in plan.stdout, plan.stdout
    assert "evaluated once on the split 'test', which no trial reads" in plan.stdout
    (tmp_path / "spy").mkdir()
    (tmp_path / "spy" / "sitecustomize.py").write_text(SPY)
    opens = tmp_path / "opens.jsonl"
    spied = {"PYTHONPATH": f"{tmp_path / 'spy'}:{ROOT}", "TEST_SPLIT_OPENS": str(opens)}
    out = run_sweep(*args, cwd=tmp_path, env=spied)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sweep seeds_demo: 9 trials, 9 to run" in out.stdout, out.stdout
    manifest = Manifest.load(tmp_path / "runs" / "seeds_demo")
    values: dict[str, dict[str, float]] = {}
    for r in manifest.trials.values():
        assert r.state == "COMPLETED"
        values.setdefault(r.configuration, {})[r.id] = r.trial_dir.best_info()["metrics"]["accuracy"]
    lucky = max(values, key=lambda c: max(values[c].values()))
    steady = max(values, key=lambda c: statistics.fmean(values[c].values()))
    assert lucky != steady, values  # what the demo is tuned to show
    assert manifest.trials[lucky].label.startswith("optimizer.lr=0.0025")
    assert manifest.trials[steady].label.startswith("optimizer.lr=0.0015")
    # The summary, status and the MLflow parent all choose by the mean.
    status = run_status(tmp_path / "runs" / "seeds_demo")
    for text in (out.stdout, status.stdout):
        shown = {row["configuration"]: row for row in table_rows(text, table=1)}
        assert [c for c, row in shown.items() if row[""] == "*"] == [steady], text
        mean, std = statistics.fmean(values[steady].values()), statistics.stdev(values[steady].values())
        assert shown[steady]["accuracy mean ± std (n/K)"] == f"{mean:.4f} ± {std:.4f} (3/3)"
    best_seed = max(values[steady], key=values[steady].get)
    assert f"best trial: {best_seed} " in out.stdout
    c = client(manifest.tracking_uri)
    parent = c.get_run(manifest.mlflow_parent_run_id).data
    assert parent.tags["best_configuration"] == steady and parent.tags["best_trial"] == best_seed
    assert abs(parent.metrics["best_val_accuracy"] - statistics.fmean(values[steady].values())) < 1e-9
    configuration = c.get_run(manifest.configurations[steady])
    assert configuration.data.metrics["seeds_finished"] == 3
    assert len(c.get_metric_history(configuration.info.run_id, "val_accuracy")) == 15  # the mean curve
    # One look at the test split: by the final evaluation alone, of the chosen configuration's
    # three best models, on the parent run and in the summary; a re-run does not look again.
    readers = [json.loads(line) for line in opens.read_text().splitlines()]
    assert readers and all(r["argv"][0].endswith("qarac_dist/train/final.py") for r in readers), readers
    assert len({r["pid"] for r in readers}) == 1
    record = json.loads((tmp_path / "runs" / "seeds_demo" / "final.json").read_text())
    assert len(record["results"]) == 1
    final = record["results"][0]
    assert final["choice"]["configuration"] == steady and sorted(final["seeds"]) == sorted(values[steady])
    assert final["rows"] == 400
    test = [m["accuracy"] for m in final["seeds"].values()]
    assert parent.metrics["test_accuracy"] == statistics.fmean(test) and parent.metrics["test_seeds"] == 3
    assert parent.metrics["test_accuracy_std"] == statistics.stdev(test)
    assert parent.tags["final_configuration"] == steady and parent.tags["final_split"] == "test"
    assert f"accuracy {statistics.fmean(test):.4f} ± {statistics.stdev(test):.4f} over 3 seed(s) of configuration " \
           f"{steady}" in out.stdout
    opens.unlink()
    again = run_sweep(*args, cwd=tmp_path, env=spied)
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr
    assert not opens.exists() and json.loads((tmp_path / "runs" / "seeds_demo" / "final.json").read_text()) == record
    assert len(c.get_metric_history(manifest.mlflow_parent_run_id, "test_accuracy")) == 1
    # final.retrain: the chosen configuration's seeds trained again on train + validation, for
    # their best models' steps, never validated; those models are what the test split sees, and
    # still nothing but the evaluation opens it.
    retrained = run_sweep(*args, "final.retrain=true", cwd=tmp_path, env=spied)
    assert retrained.returncode == 0, retrained.stdout + retrained.stderr
    assert retrained.stdout.count("final: training the chosen configuration again on train + validation") == 2
    # (datasets' cache may now serve the test split: no process need open its folder)
    readers = [json.loads(line) for line in opens.read_text().splitlines()] if opens.exists() else []
    assert all(r["argv"][0].endswith("qarac_dist/train/final.py") for r in readers), readers
    record = json.loads((tmp_path / "runs" / "seeds_demo" / "final.json").read_text())["results"]
    assert len(record) == 2 and record[1]["choice"] == {**final["choice"], "retrain": True}
    for tid, steps in record[1]["choice"]["seeds"].items():
        folder = tmp_path / "runs" / "seeds_demo" / "retrain" / f"{tid}-{steps}"
        result = json.loads((folder / "result.json").read_text())
        assert result["steps"] == steps and result["data"]["train"]["rows"] == 240 + 160
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert rows and not any("val_accuracy" in row for row in rows)
    assert "each trained again on train + validation" in retrained.stdout
    assert re.search(r"used \d+\.\d+ CPU-hours[^(]*\(.*trained again for the test split 0\.\d+", retrained.stdout), \
        retrained.stdout  # the retrainings' hours are the sweep's
    parent = c.get_run(manifest.mlflow_parent_run_id).data
    assert parent.tags["final_models"] == "trained again on train + validation"
    assert parent.metrics["test_accuracy"] == statistics.fmean(m["accuracy"] for m in record[1]["seeds"].values())


def _job(job: str) -> dict[str, str]:
    """scontrol's fields of a job (the controller keeps ended jobs for MinJobAge, 300 s here)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in text.split() if "=" in f)


def _final_sweep(tmp_path, data_cache, rates, retrain=False) -> object:
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 4}, evaluation={"every_steps": 2},
                       tracking={"log_model": True, "register_model": "final_slurm"})
    sweep = {"name": "final_slurm", "base": base, "runs_dir": str(tmp_path / "runs"), "executor": "slurm",
             "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "set": {"data.synthetic.num_test": 40},
             "grid": {"optimizer.lr": rates}, "select": {"metric": "accuracy", "mode": "max"},
             "final": {"split": "test", "retrain": retrain}, "resources": {"time_min": 10, "max_parallel": 2}}
    return write_config(tmp_path / "final_slurm.yaml", sweep)


def test_on_slurm_the_test_split_is_a_job_after_the_sweeps_jobs_and_a_new_choice_trained_again_moves_the_champion(
        cluster, tmp_path, data_cache):
    path = _final_sweep(tmp_path, data_cache, [1e-3, 3e-3])
    out = run_sweep(path)
    assert out.returncode == 0, out.stdout + out.stderr
    line = re.search(r"submitted: SLURM job (\d+), the evaluation on the split 'test' after job\(s\) (.*) \(afterany\)",
                     out.stdout)
    assert line is not None, out.stdout
    evaluation, trials = line[1], line[2].split(", ")
    manifest = Manifest.load(tmp_path / "runs" / "final_slurm")
    assert sorted(trials) == sorted(r.job_id for r in manifest.trials.values())
    assert all(f"afterany:{job}" in _job(evaluation)["Dependency"] for job in trials), _job(evaluation)
    # Followed to its end: the job kept, not submitted again; the test metrics on the parent.
    followed = run_sweep(path, "--wait")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "the evaluation on the split" not in followed.stdout
    ended = max(datetime.datetime.fromisoformat(_job(job)["EndTime"]) for job in trials)
    assert _job(evaluation)["JobState"] == "COMPLETED"
    assert datetime.datetime.fromisoformat(_job(evaluation)["StartTime"]) >= ended
    record = json.loads((tmp_path / "runs" / "final_slurm" / "final.json").read_text())["results"]
    manifest = Manifest.load(tmp_path / "runs" / "final_slurm")
    c = client(manifest.tracking_uri)
    parent = c.get_run(manifest.mlflow_parent_run_id).data
    best = parent.tags["best_trial"]
    assert len(record) == 1 and list(record[0]["seeds"]) == [best] and record[0]["rows"] == 40
    assert parent.metrics["test_accuracy"] == record[0]["seeds"][best]["accuracy"]
    assert parent.tags["final_configuration"] == best and "test (split 'test', 40 rows" in followed.stdout
    champion = c.get_model_version_by_alias("final_slurm", "champion")
    assert champion.tags["trial_id"] == best and str(champion.version) == "1"
    # The chosen trial leaves the sweep file, and the chosen configuration is to be trained
    # again (final.retrain): with no trial to wait for, a job retrains it on train + validation
    # for its best model's steps, the evaluation waits for that job, and the champion moves.
    other = next(r for r in manifest.trials.values() if r.id != best)
    narrowed = run_sweep(_final_sweep(tmp_path, data_cache, [other.config["optimizer"]["lr"]], retrain=True), "--wait")
    assert narrowed.returncode == 0, narrowed.stdout + narrowed.stderr
    line = re.search(r"submitted: SLURM job\(s\) (\d+) train the chosen configuration again; SLURM job (\d+), the "
                     r"evaluation on the split 'test' after them\n", narrowed.stdout)
    assert line is not None, narrowed.stdout
    assert _job(line[1])["JobState"] == _job(line[2])["JobState"] == "COMPLETED"
    assert datetime.datetime.fromisoformat(_job(line[2])["StartTime"]) >= \
        datetime.datetime.fromisoformat(_job(line[1])["EndTime"])
    record = json.loads((tmp_path / "runs" / "final_slurm" / "final.json").read_text())["results"]
    assert [list(r["seeds"]) for r in record] == [[best], [other.id]] and record[1]["choice"]["retrain"]
    steps = record[1]["choice"]["seeds"][other.id]
    retrained = tmp_path / "runs" / "final_slurm" / "retrain" / f"{other.id}-{steps}"
    assert json.loads((retrained / "state.json").read_text())["state"] == "COMPLETED"
    assert json.loads((retrained / "last" / "qarac_last.json").read_text())["step"] == steps
    parent = c.get_run(manifest.mlflow_parent_run_id).data
    assert parent.tags["final_configuration"] == other.id and parent.tags["best_trial"] == other.id
    assert parent.metrics["test_accuracy"] == record[1]["seeds"][other.id]["accuracy"]
    champion = c.get_model_version_by_alias("final_slurm", "champion")
    assert champion.tags["trial_id"] == other.id and str(champion.version) == "2"
