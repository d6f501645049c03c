"""A disk that fills during training, on a real small filesystem (a tmpfs, mounted as root as CI
runs), then the same command after space is freed. QARAC_DISK_FULL_ROUNDS repeats the round
(bench/RESULTS.md: how many held in a row, and how long they took)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.trial_dir import TrialDir, read_metrics
from support import HELPERS, tiny_config, wait_for, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (as root, as CI runs)")

MAX_STEPS = 80


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [HELPERS, os.environ.get("PYTHONPATH")]))}


def _sweep(tmp_path: Path, disk: Path, data_cache: Path, name: str) -> Path:
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": MAX_STEPS, "log_every": 1},
                       evaluation={"every_steps": 40}, checkpointing={"every_steps": 10, "keep_last": 2})
    base["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 0.05}}
    sweep = {"name": name, "base": base, "runs_dir": str(disk / "runs"), "executor": "local",
             "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
             "resources": {"time_min": 10, "max_parallel": 1}}
    return write_config(tmp_path / f"{name}.yaml", sweep)


def _mount(disk: Path, size: str, remount: bool = False) -> None:
    options = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], check=True, capture_output=True)


def _one_round(tmp_path: Path, disk: Path, data_cache: Path, name: str) -> None:
    path = _sweep(tmp_path, disk, data_cache, name)
    command = [sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"]
    driver = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    layout = SweepLayout(disk / "runs" / name)
    manifest = wait_for(lambda: layout.manifest.exists() and Manifest.load(layout.root), 300, "the manifest")
    (record,) = manifest.trials.values()
    trial = TrialDir(record.output_dir)
    wait_for(lambda: (trial.status() and trial.status().last_checkpoint or 0) >= 20, 300, "two checkpoints")
    # The disk fills: what it holds now, and a page more.
    _mount(disk, str(shutil.disk_usage(disk).used + 4096), remount=True)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode not in (0, None), out
    assert "Traceback" not in out, out
    # The reason, named: printed by the driver, or recorded by the trial (the summary's error
    # column shows it, wrapped as the table's width allows).
    assert "No space left on device" in out or "No space left on device" in (trial.status().error or ""), out

    before = layout.manifest.read_bytes()
    shown = subprocess.run([sys.executable, "-m", "qarac_dist.status", str(layout.root)], capture_output=True,
                           text=True, timeout=120, env=_env())
    assert "Traceback" not in shown.stderr and shown.returncode in (0, 1), shown.stdout + shown.stderr
    assert layout.manifest.read_bytes() == before  # status writes nothing

    _mount(disk, "256m", remount=True)  # space freed
    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    (record,) = Manifest.load(layout.root).trials.values()
    status = trial.status()
    assert (record.state, status.state.value) == ("COMPLETED", "COMPLETED"), again.stdout
    assert status.resumed_from is not None and status.resumed_from >= 10  # from an intact checkpoint
    assert [r["step"] for r in read_metrics(trial.metrics_file) if "loss" in r] == list(range(1, MAX_STEPS + 1))
    shutil.rmtree(layout.root)


def test_a_disk_that_fills_during_training_is_a_reason_and_the_rerun_resumes(tmp_path, data_cache):
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount(disk, "256m")
    try:
        rounds = int(os.environ.get("QARAC_DISK_FULL_ROUNDS", "1"))
        started = time.monotonic()
        for k in range(rounds):
            _one_round(tmp_path, disk, data_cache, f"full{k}")
        if rounds > 1:
            print(f"{rounds} rounds held in a row in {time.monotonic() - started:.0f} s")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
