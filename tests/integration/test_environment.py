"""The sweep file's `environment:` on real jobs: setup lines and variables reach every trial's own
process (a model factory records what it sees), on the local SLURM cluster with `--export=NONE`
(the site default under which every trial ended LOST) and with the local executor; a failing
setup line stops its job at once and `status` names it with its exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qarac_dist.submit.sweep_dir import Manifest
from support import HELPERS, run_status, run_sweep, tiny_config, write_config

NAMES = ["FROM_SETUP", "FROM_VARIABLES", "SUBMITIT_EXECUTOR", "CH_RUNNING"]


def _sweep(tmp_path, data_cache, name, executor, setup, **resources):
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 4}, evaluation={"every_steps": 4})
    base["model"] = {"factory": "faults:environment_seen",
                     "factory_kwargs": {"names": NAMES, "into": str(tmp_path / "seen" / name)}}
    sweep = {"name": name, "base": base, "runs_dir": str(tmp_path / "runs"), "executor": executor,
             "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "grid": {"training.seed": [0]},
             "resources": {"time_min": 10, "max_parallel": 2, **resources},
             # The helpers' folder reaches the jobs through the section, not the submitting shell.
             "environment": {"setup": setup, "variables": {"PYTHONPATH": HELPERS, "FROM_VARIABLES": "a value"}}}
    path = tmp_path / f"{name}.yaml"
    write_config(path, sweep)
    return path


def _seen(tmp_path, name) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "seen" / name).glob("*.json"))]


@pytest.mark.parametrize("executor, resources", [
    pytest.param("slurm", {"extra_sbatch": {"export": "NONE"}}, id="slurm-arrays-export-none"),
    pytest.param("local", {}, id="local"),  # packed with export NONE: in the container test below
])
def test_setup_lines_and_variables_reach_every_trial(request, tmp_path, data_cache, executor, resources):
    if executor == "slurm":
        request.getfixturevalue("cluster")
    # With --export=NONE the job starts with the system's PATH: the venv activated, as a user would
    # (its ninja is not the system's: DeepSpeed would rebuild its op for each in turn).
    path = _sweep(tmp_path, data_cache, "env", executor, [f"export PATH={Path(sys.executable).parent}:$PATH",
                                                          "export FROM_SETUP=made-by-setup"], **resources)
    proc = run_sweep(path, "--no-preflight", "--wait", env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    manifest = Manifest.load(tmp_path / "runs" / "env")
    assert {r.state for r in manifest.trials.values()} == {"COMPLETED"}
    seen = _seen(tmp_path, "env")
    assert len(seen) == 1 and all(s["FROM_SETUP"] == "made-by-setup" and s["FROM_VARIABLES"] == "a value"
                                  for s in seen), seen


@pytest.mark.parametrize("executor, resources", [
    pytest.param("slurm", {"pack": 2}, id="slurm-packed"),  # an array job runs the same lines in the same place
    pytest.param("local", {}, id="local"),
])
def test_a_failing_setup_line_stops_the_job_and_status_names_it(request, tmp_path, data_cache, executor, resources):
    if executor == "slurm":
        request.getfixturevalue("cluster")
    path = _sweep(tmp_path, data_cache, "broken", executor, ["export FROM_SETUP=1", "module-that-is-not-here load x"],
                  **resources)
    run_sweep(path, "--no-preflight", "--wait")
    assert _seen(tmp_path, "broken") == []  # no trial began
    status = run_status(tmp_path / "runs" / "broken")
    said = "environment.setup[1] failed with exit code 127: module-that-is-not-here load x"
    assert said in status.stdout and "Traceback" not in status.stdout, status.stdout + status.stderr


def test_a_build_lock_a_killed_build_left_does_not_hang_the_next_trial(tmp_path, data_cache):
    """DeepSpeed builds its shm op behind torch's lock file; a build killed mid-way left it, and
    every later trial waited on it forever. The op's build directory is copied as built (or
    left to build), and the lock planted an hour old, as a SIGKILL leaves it."""
    import os
    import shutil
    import time

    from support import run_train

    built = next(Path.home().glob(".cache/torch_extensions/*/deepspeed_shm_comm"), None)
    extensions = tmp_path / "extensions"
    op = extensions / "deepspeed_shm_comm"
    if built is not None:
        shutil.copytree(built, op, ignore=shutil.ignore_patterns("lock"))
    op.mkdir(parents=True, exist_ok=True)
    (op / "lock").write_text("")
    hour_ago = time.time() - 3600
    for path in op.iterdir():
        os.utime(path, (hour_ago, hour_ago))
    config = write_config(tmp_path / "t.yaml", tiny_config(data_cache, tmp_path / "out", training={"max_steps": 2}))
    proc = run_train(config, timeout=900, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert f"removed a torch-extension build lock that no build holds: {op / 'lock'} (left 36" in proc.stderr
    assert (tmp_path / "out" / "result.json").exists()


SLURM_COMMANDS = ("srun", "sbatch", "scontrol", "squeue", "sacct", "scancel", "salloc", "sinfo", "sstat", "sattach")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A Charliecloud directory image: this machine's /usr, hard-linked (seconds, no space),
    without SLURM's commands, and the directories ch-run binds over. The interpreter comes in
    through the container's mounts (the venv and the Python it was made from)."""
    import os
    import shutil
    import subprocess

    if shutil.which("ch-run") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install charliecloud-runtime (tests/setup.sh)")
        pytest.skip("no ch-run; tests/setup.sh installs charliecloud-runtime")
    root = tmp_path_factory.mktemp("image")
    # ch-run binds onto directories the image has: the system's own, and the tops of where this
    # checkout, its venv and the Python it was made from are (/work here, /check in CI).
    tops = ({m.lstrip("/") for m in _python_mounts()} | {Path.cwd().resolve().parts[1]}) - {"usr", "bin", "lib", "sbin"}
    for name in {"dev", "proc", "sys", "tmp", "home", "root", "run", "var", "mnt", "etc"} | tops:
        (root / name).mkdir(exist_ok=True)
    for name in ("passwd", "group", "hosts", "resolv.conf"):
        (root / "etc" / name).write_text("")
    # /usr/bin/c++ and friends point through /etc/alternatives (DeepSpeed compiles its ops in there)
    subprocess.run(["cp", "-a", "/etc/alternatives", str(root / "etc")], check=True)
    for name in ("bin", "lib", "lib64", "sbin"):
        (root / name).symlink_to(f"usr/{name}")
    subprocess.run(["cp", "-al", "/usr", str(root / "usr")], check=True)
    for command in SLURM_COMMANDS:
        (root / "usr" / "bin" / command).unlink(missing_ok=True)
    return root


def _python_mounts() -> list[str]:
    """The venv and the Python it was made from, where they are on the host."""
    import sys

    venv, base = Path(sys.prefix), Path(sys.base_prefix)
    return sorted({f"/{p.resolve().parts[1]}" for p in (venv, base)})


def test_a_packed_sweep_runs_every_trial_inside_a_charliecloud_container(cluster, tmp_path, data_cache, image):
    """Each trial's own process records what it sees: ch-run's CH_RUNNING, a variable from
    `environment.variables` and one a setup line exported, and no scontrol; with --export=NONE."""
    import sys

    # With --export=NONE the job starts with the system's PATH: activate the venv, as a user would
    # (its ninja, which DeepSpeed's op build uses, is not the system's).
    path = _sweep(tmp_path, data_cache, "boxed", "slurm", [f"export PATH={Path(sys.executable).parent}:$PATH",
                                                           "export FROM_SETUP=made-by-setup"], pack=2,
                  extra_sbatch={"export": "NONE"})
    spec = __import__("yaml").safe_load(path.read_text())
    spec["environment"]["container"] = {"runtime": "charliecloud", "image": str(image),
                                        "mounts": _python_mounts(), "python": sys.executable}
    write_config(path, spec)
    proc = run_sweep(path, "--no-preflight", "--wait", env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    manifest = Manifest.load(tmp_path / "runs" / "boxed")
    assert {r.state for r in manifest.trials.values()} == {"COMPLETED"}
    seen = _seen(tmp_path, "boxed")
    assert len(seen) == 1 and all(s["CH_RUNNING"] and s["FROM_SETUP"] == "made-by-setup" and s["scontrol"] is None
                                  for s in seen), seen


def test_a_trial_in_a_container_requeues_from_outside_it_and_resumes(cluster, no_requeue_delay, tmp_path, data_cache,
                                                                     image):
    """An array job's trial in the image, warned by SLURM: it saves and exits, and the job's
    script (outside the image, where scontrol is) requeues it; it resumes from its checkpoint,
    each step logged once. Before, submitit requeued from inside the step: no scontrol there."""
    import subprocess
    import sys

    from qarac_dist.track.mlflow_client import client
    from qarac_dist.track.trial_dir import read_metrics
    from support import wait_for

    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 30}, evaluation={"every_steps": 10},
                       checkpointing={"every_steps": 5})
    base["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 0.3}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "warned.yaml"
    write_config(path, {"name": "warned", "base": base, "runs_dir": str(tmp_path / "runs"), "executor": "slurm",
                        "tracking": {"uri": uri}, "resources": {"time_min": 10},
                        "environment": {"variables": {"PYTHONPATH": HELPERS}, "container": {
                            "runtime": "charliecloud", "image": str(image), "mounts": _python_mounts(),
                            "python": sys.executable}}})
    assert run_sweep(path, "--no-preflight", env={"PYTHONPATH": ""}).returncode == 0
    (record,) = Manifest.load(tmp_path / "runs" / "warned").trials.values()
    metrics = record.trial_dir.metrics_file
    wait_for(lambda: metrics.exists() and any(r.get("step", 0) >= 12 for r in read_metrics(metrics)),
             what="step 12 in the container")
    subprocess.run(["scancel", "--signal=USR2", record.job_id], check=True)  # to the job's steps, as SLURM warns
    proc = run_sweep(path, "--wait", env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (record,) = Manifest.load(tmp_path / "runs" / "warned").trials.values()
    state = json.loads(record.trial_dir.state_file.read_text())
    assert state["state"] == "COMPLETED" and state["starts"] == 2, state  # requeued once, resumed
    c = client(uri)
    assert sorted(m.step for m in c.get_metric_history(record.mlflow_run_id, "loss")) == list(range(1, 31))
