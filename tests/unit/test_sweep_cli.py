"""The sweep and status commands as a user runs them: exit codes, one-line errors, no side effects."""

from __future__ import annotations

import subprocess
import sys


from qarac_dist import status
from support import tiny_config, write_config


def _write(tmp_path, **fields):
    spec = {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "executor": "local", **fields}
    path = tmp_path / "sweep.yaml"
    write_config(path, spec)
    return path


def test_dry_run_prints_the_plan_without_importing_torch(tmp_path):
    """The process is the point here: what a fresh interpreter imports for --dry-run."""
    path = _write(tmp_path, grid={"optimizer.lr": [1e-3, 1e-4]},
                  resources={"gpus_per_node": 4, "nodes": 2, "time_min": 90, "partition": "gpu", "account": "lab"})
    code = ("import runpy, sys; sys.argv = ['x', %r, '--dry-run', 'executor=auto'];"
            "\ntry: runpy.run_module('qarac_dist.sweep', run_name='__main__')\nexcept SystemExit: pass\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'deepspeed', 'mlflow', 'transformers') if m in sys.modules))"
            ) % str(path)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    assert "2 trials" in proc.stdout
    assert "requested GPU-hours: 24.0" in proc.stdout  # 2 trials x 2 nodes x 4 GPUs x 1.5 h
    assert "#SBATCH --array=0-1%" in proc.stdout and "#SBATCH --partition=gpu" in proc.stdout
    assert "#SBATCH --gpus-per-node=4" in proc.stdout and "#SBATCH --account=lab" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_piped_into_a_reader_that_stops_early_prints_no_traceback(tmp_path):
    # A MiB of output, far past what a pipe holds, so the writes go on after `head` has left.
    path = _write(tmp_path, grid={"training.seed": [1, 2]},
                  set={"data.train_split": "s" * 2**20})
    proc = subprocess.run(f"{sys.executable} -m qarac_dist.sweep {path} --dry-run | head -1", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("sweep s: 2 trials") and proc.stdout.count("\n") == 1
    assert proc.stderr == "", proc.stderr


def test_status_of_a_missing_sweep_is_a_clear_error(tmp_path, capsys):
    assert status.main([str(tmp_path / "runs" / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and len(err.strip().splitlines()) == 1
