"""Shared fixtures: a tiny Longformer config on a small generated set, and a runner for
`python -m qarac_dist.train` on 1 or 2 real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(cache_dir: Path, output_dir: Path, **sections) -> dict:
    """A 2-layer Longformer on short generated documents: seconds per run on CPU."""
    cfg = {
        "name": "tiny",
        "model": {"config": {"model_type": "longformer", "num_hidden_layers": 2, "hidden_size": 32,
                             "num_attention_heads": 2, "intermediate_size": 64, "attention_window": 32,
                             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        "data": {"synthetic": {"num_train": 96, "num_validation": 32, "min_tokens": 160, "max_tokens": 320,
                               "evidence_after": 128, "num_classes": 2, "seed": 0},
                 "max_length": 320, "cache_dir": str(cache_dir)},
        "tokenizer": {"vocab_size": 2100},
        "optimizer": {"lr": 1.0e-3},
        "scheduler": {"kind": "linear", "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "training": {"micro_batch_size": 4, "max_steps": 10, "log_every": 1, "seed": 0},
        "evaluation": {"every_steps": 5, "batch_size": 8},
        "output": {"dir": str(output_dir)},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, *overrides: str, num_processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the training CLI as real processes (torchrun for 2 ranks)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if num_processes == 1:
        cmd = [sys.executable, "-m", "qarac_dist.train", str(config), *overrides]
    else:
        cmd = ["bash", str(ROOT / "launch" / "run_local.sh"), str(num_processes), str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; can be stopped and restarted
    on the same port and store."""

    def __init__(self, root: Path):
        import socket

        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120) -> None:
        import time
        import urllib.request

        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not answer in time")

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def run_sweep(path: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), *args], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cluster():
    try:
        ok = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
        states = ok.stdout.split() if ok.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        states = []
    if sum(s in ("idle", "mixed", "allocated") for s in states) < 2:
        if os.environ.get("CI"):
            pytest.fail("CI must start the local SLURM cluster (slurm/start.sh)")
        pytest.skip("no local SLURM cluster; run slurm/install.sh and slurm/start.sh")
