"""Repeats (issue 36): the shipped seeds demo, run as a user runs it (local executor), where the
learning rate with the best single seed is not the one with the best mean; then its one look at
the test split."""

from __future__ import annotations

import json
import statistics
import textwrap

from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.mlflow_client import client
from support import ROOT, run_status, run_sweep, table_rows


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
