"""The sweep's records under faults, with real processes: two drivers at once, a re-run after a
fix, a damaged manifest rebuilt, a damaged checkpoint, secrets scanned for in a real MLflow
store. Local executor (submitit's), real DeepSpeed ranks, real MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.mlflow_client import client
from qarac_dist.track.trial_dir import TrialDir, read_metrics
from support import HELPERS, logged_losses, run_status, run_sweep, run_train, tiny_config, wait_for, write_config


def _sweep(tmp_path, data_cache, uri: str, name: str = "rec", base: dict | None = None, **fields) -> Path:
    base = base or tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 6}, evaluation={"every_steps": 3})
    spec = {"name": name, "base": base, "executor": "local", "runs_dir": str(tmp_path / "runs"),
            "tracking": {"uri": uri}, "resources": {"max_parallel": 2, "time_min": 10}, **fields}
    path = tmp_path / f"{name}.yaml"
    write_config(path, spec)
    return path


def _runs(uri: str, experiment: str):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


def test_two_drivers_started_at_the_same_instant(tmp_path, data_cache):
    """Both open a new sqlite store and the same sweep at once: one submits, the other says who
    holds the sweep; the trial trains once; one parent run; the store opens afterwards."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    path = _sweep(tmp_path, data_cache, uri, grid={"optimizer.lr": [1e-3]})
    go = tmp_path / "go"
    starter = ("import os, sys, time\n"
               "from qarac_dist.sweep import main\n"
               f"open(os.path.join({str(tmp_path)!r}, f'ready-{{os.getpid()}}'), 'w').close()\n"
               f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
               f"sys.exit(main([{str(path)!r}]))\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    drivers = [subprocess.Popen([sys.executable, "-c", starter], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 2, 300, "both drivers to be ready")
    go.touch()
    outcomes = [(d.wait(timeout=900), *d.communicate()) for d in drivers]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, _, err in outcomes if code == 2)
    assert "another driver is working on this sweep (host" in refused and len(refused.strip().splitlines()) == 1
    (record,) = Manifest.load(tmp_path / "runs" / "rec").trials.values()
    status = record.trial_dir.status()
    assert status.state.value == "COMPLETED" and status.starts == 1 and record.attempt == 1
    assert [r["step"] for r in read_metrics(record.trial_dir.metrics_file) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    parents, children = _runs(uri, "rec")
    assert len(parents) == 1 and len(children) == 1 and parents[0].info.status == "FINISHED"


def test_a_rerun_after_a_fix_reports_the_new_attempt(tmp_path, data_cache):
    """Attempt 1 fails; the cause is fixed; the re-run's driver reports attempt 2's outcome
    (not attempt 1's FAILED state.json), the parent ends FINISHED, status keeps the old error."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    marker = tmp_path / "fixed"
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 4}, evaluation={"every_steps": 2})
    base["model"] = {"factory": "faults:fail_unless", "factory_kwargs": {"marker": str(marker)}}
    path = _sweep(tmp_path, data_cache, uri, base=base)
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = run_sweep(path, "--no-preflight", env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    (record,) = Manifest.load(tmp_path / "runs" / "rec").trials.values()
    assert record.state == "FAILED" and "the fix is not in place yet" in record.error
    marker.touch()
    second = run_sweep(path, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 to run" in second.stdout
    (record,) = Manifest.load(tmp_path / "runs" / "rec").trials.values()
    assert record.state == "COMPLETED" and record.attempt == 2
    assert [(a.attempt, a.state) for a in record.history] == [(1, "FAILED")]
    assert record.trial_dir.status().attempt == 2
    parents, (child,) = _runs(uri, "rec")
    assert parents[0].info.status == "FINISHED" and child.info.status == "FINISHED"
    shown = run_status(tmp_path / "runs" / "rec")
    assert shown.returncode == 0 and "earlier attempt 1: FAILED" in shown.stdout, shown.stdout


def test_a_damaged_manifest_is_rebuilt_and_nothing_completed_runs_again(tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    path = _sweep(tmp_path, data_cache, uri, grid={"optimizer.lr": [1e-3, 2e-3]})
    assert run_sweep(path).returncode == 0
    directory = tmp_path / "runs" / "rec"
    before = Manifest.load(directory)
    metrics = {tid: r.trial_dir.metrics_file.read_text() for tid, r in before.trials.items()}
    text = (directory / "manifest.json").read_text()
    (directory / "manifest.json").write_text(text[: len(text) // 2])  # a disk that lost the end of the file
    refused = run_sweep(path)
    assert refused.returncode == 2 and "--repair" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    repaired = run_status(directory, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "rebuilt" in repaired.stdout and "2 with an MLflow run" in repaired.stdout
    assert list(directory.glob("manifest.json.before-repair-*"))  # the damaged one is kept
    after = Manifest.load(directory)
    assert {t: (r.state, r.mlflow_run_id) for t, r in after.trials.items()} == \
           {t: ("COMPLETED", r.mlflow_run_id) for t, r in before.trials.items()}
    assert after.mlflow_parent_run_id == before.mlflow_parent_run_id
    rerun = run_sweep(path)
    assert rerun.returncode == 0 and "0 to run" in rerun.stdout, rerun.stdout + rerun.stderr
    assert {tid: r.trial_dir.metrics_file.read_text() for tid, r in after.trials.items()} == metrics  # not retrained
    parents, children = _runs(uri, "rec")
    assert len(parents) == 1 and len(children) == 2



def test_a_damaged_newest_checkpoint_resumes_from_the_intact_one(tmp_path, data_cache):
    def config(name, steps):
        return write_config(tmp_path / f"{name}-{steps}.yaml", tiny_config(
            data_cache, tmp_path / name, training={"max_steps": steps}, evaluation={"every_steps": 10},
            checkpointing={"every_steps": 10, "keep_last": 3}, scheduler={"kind": "constant"}))

    run_train(config("reference", 30))
    run_train(config("damaged", 20))
    checkpoints = TrialDir(tmp_path / "damaged").checkpoints
    marker = json.loads((checkpoints / "step00000020" / "COMPLETE").read_text())
    shard = max(marker["files"], key=marker["files"].get)
    with open(checkpoints / "step00000020" / shard, "r+b") as f:  # a quota cut it short
        f.truncate(marker["files"][shard] // 2)
    proc = run_train(config("damaged", 30))
    lines = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and "step00000020 is damaged" in lines[0] and "resuming from step00000010" in lines[0]
    assert logged_losses(tmp_path / "damaged") == logged_losses(tmp_path / "reference")  # steps 11-30 recomputed exactly

    for tag in ("step00000010", "step00000020", "step00000030"):
        (checkpoints / tag / "rng_rank0.pt").unlink()
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.train", str(config("damaged", 40))], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if "no checkpoint of it can be loaded" in line]
    assert "rng_rank0.pt is missing" in line and "it will not start over" in line and "Traceback" not in proc.stderr


SECRETS = {"hf": "hf_" + "Ab3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF3", "aws": "AKIA" + "ABCDEFGHIJKLMNOP",
           "openai": "sk-" + "proj-Zq8Xw7Vu6Ts5Rq4Po3Nm", "password": "pw-" + "correct-horse-battery",
           "github": "ghp_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Jh1Gf0EdCbA9", "hf2": "hf_" + "Qw2Er4Ty6Ui8Op0As2Df4Gh6Jk8Lz0Xc"}


def test_secrets_never_reach_the_mlflow_store(tmp_path, data_cache, shared_mlflow_server):
    """Secret-shaped values under innocent keys, in tracking tags, and a password in the
    tracking URI: after the sweep, none of them is in the server's store or artifacts, nor in
    the files and output we write for people."""
    host = shared_mlflow_server.uri.removeprefix("http://")
    uri = f"http://alice:{SECRETS['password']}@{host}"
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 4}, evaluation={"every_steps": 2})
    base["model"]["config"]["comment"] = f"token {SECRETS['hf']}"
    base["tracking"] = {"tags": {"owner": SECRETS["aws"], "team": "nlp"}}
    base["deepspeed"] = {"config": {"wandb": {"enabled": False, "project": SECRETS["openai"]}}}
    # The environment's secrets reach the trials (the job needs them) and nothing else.
    environment = {"setup": [f"export MY_TOKEN={SECRETS['github']}"], "variables": {"HF_TOKEN": SECRETS["hf2"]}}
    path = _sweep(tmp_path, data_cache, uri, name="secrets", base=base, environment=environment)
    proc = run_sweep(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (child,) = _runs(shared_mlflow_server.uri, "secrets")[1]
    assert child.data.tags["team"] == "nlp" and "owner" not in child.data.tags  # screened, not lost wholesale
    assert "model.config.comment" not in child.data.params and child.data.params["training.max_steps"] == "4"
    root = shared_mlflow_server.root  # the store of every test this process ran against it
    stores = [root / "mlflow.db", *(p for p in (root / "artifacts").rglob("*") if p.is_file())]
    (record,) = Manifest.load(tmp_path / "runs" / "secrets").trials.values()
    ours = [record.trial_dir.path / name for name in ("config.json", "deepspeed_config.json", "state.json",
                                                       "result.json", "metrics.jsonl")]
    for secret in (SECRETS["github"], SECRETS["hf2"]):  # the sweep's own records keep the environment masked
        for name in ("sweep.json", "manifest.json"):
            assert secret.encode() not in (tmp_path / "runs" / "secrets" / name).read_bytes(), name
    for secret in SECRETS.values():
        for path_ in stores + ours:
            assert secret.encode() not in path_.read_bytes(), f"{secret[:6]}... found in {path_}"
        assert secret not in proc.stdout + proc.stderr
