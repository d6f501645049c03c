"""Helpers the tests share: a tiny Longformer config on a small generated set, the commands as
a user runs them (as real processes where the process is the point), and a real MLflow server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HELPERS = str(Path(__file__).resolve().parent / "helpers")


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
        # Logging the best model as an MLflow model costs seconds a trial; the tests of it ask for it.
        "tracking": {"log_model": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def roberta_dual(tmp_path, pooler: bool, allow=()):
    """A dual encoder of two RoBERTa encoders with attention pooling, on generated text pairs:
    with `pooler` the encoders keep a pooler that nothing uses (the story preflight exists for)."""
    from qarac_dist.config import config_from_dict

    data = tiny_config(tmp_path / "cache", tmp_path / "out")
    data["model"] = {"kind": "dual_encoder", "task": "regression",
                     "dual_encoder": {"shared": False, "pooling": "attention", "pooler": pooler},
                     "config": {"model_type": "roberta", "num_hidden_layers": 1, "hidden_size": 32,
                                "num_attention_heads": 2, "intermediate_size": 64}}
    data["data"]["synthetic"] = {"task": "similarity", "num_train": 32, "num_validation": 8, "min_tokens": 8,
                                 "max_tokens": 24}
    data["data"]["max_length"] = 32
    data["evaluation"] = {"metric": "spearman", "every_steps": 5}
    data["preflight"] = {"allow_no_grad": list(allow)}
    return config_from_dict(data, "t.yaml")


def write_config(path: Path, cfg: dict) -> Path:
    """A training config or a sweep file, as YAML: the one writer every test uses."""
    path.write_text(yaml.safe_dump(cfg))
    return path


def logged_losses(out_dir: Path) -> list[float]:
    """The training losses a trial logged, by step."""
    from qarac_dist.track.trial_dir import read_metrics

    return [row["loss"] for row in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in row]


def run_train(config: Path, *overrides: str, num_processes: int = 1, timeout: int = 600, fault: str = "",
              check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the training CLI as real processes (launch/run_local.sh for 2 ranks); `fault`: QARAC_FAULT, the
    faults to inject (train/faults.py); `env`: variables to set besides."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "QARAC_FAULT": fault, **(env or {})}
    if num_processes == 1:
        cmd = [sys.executable, "-m", "qarac_dist.train", str(config), *overrides]
    else:
        cmd = ["bash", str(ROOT / "launch" / "run_local.sh"), str(num_processes), str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def fake_commands(bin_dir: Path, **bodies: str) -> str:
    """Shell scripts named after SLURM commands (`squeue="exit 1"`) in `bin_dir`; returns a PATH
    that finds them before the real ones."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def run_sweep(path: Path, *args: str, timeout: int = 900, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m qarac_dist.sweep` as a user runs it, from the sweep file's folder."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), *args], cwd=cwd or path.parent,
                          env=env, capture_output=True, text=True, timeout=timeout)


def run_status(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qarac_dist.status", str(directory), *args], capture_output=True,
                          text=True, timeout=300)


def wait_for(predicate, timeout: float = 300, what: str = "condition", interval: float = 0.2):
    """Poll until `predicate()` is truthy (returns it); a loaded machine only makes this slower."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; can be stopped and restarted
    on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120) -> None:
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # Tracking only: without this, MLflow 3 also starts its job runner (GenAI jobs): a
            # Huey consumer per kind of job, each a Python process that imports MLflow and polls.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return True
            except OSError:
                return False

        wait_for(up, timeout, "the mlflow server to answer", interval=0.5)

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # an outage all the same: a loaded machine is slow to stop it
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None


def table_rows(text: str, table: int = 0) -> list[dict]:
    """The rows of a table the commands print (rich's box characters), keyed by column title:
    the first table, or the `table`-th (the summary's configurations are its second). Long cells
    that wrap over several lines are joined."""
    header, rows, seen = None, [], -1
    for line in text.splitlines():
        if line.startswith("┏"):
            seen += 1
        elif seen != table:
            continue
        elif line.startswith("┃") and header is None:
            header = [c.strip() for c in line.strip("┃").split("┃")]
            key = header.index("trial" if "trial" in header else "configuration")
        elif line.startswith("│") and header is not None:
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[key]:
                rows.append(dict(zip(header, cells)))
            elif rows:  # a wrapped continuation line
                for name, cell in zip(header, cells):
                    if cell:
                        rows[-1][name] = f"{rows[-1][name]} {cell}".strip()
    return rows


def _hold_lock(path: str, ready) -> None:
    from qarac_dist.base.lock import lock

    lock(Path(path))
    ready.set()
    time.sleep(600)


def kill_while_holding_lock(path: Path) -> None:
    """A real process takes the fcntl lock on `path` and is killed (SIGKILL) while it holds it."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(path), ready))
    holder.start()
    assert ready.wait(60), "the lock holder did not start"
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)


OUTSIDE_S = 10.0
"""How much shorter than SLURM's time for a job (whole seconds) its trial's clock may be: what
runs before the trial's Python starts (the batch script's bash, srun, the interpreter) and after
it ends. A second or two on an idle machine, 3.3 s measured on one running two test suites; a
clock that lost its last beat would be short by up to track/usage.py's BEAT_S (30 s)."""


def slurm_seconds(job_ids) -> dict[str, float]:
    """SLURM's own view of how long each ended job held its allocation (EndTime - StartTime,
    whole seconds), from scontrol: the controller keeps ended jobs for MinJobAge (300 s here)."""
    import datetime

    out = {}
    for job in job_ids:
        text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
        fields = dict(f.split("=", 1) for f in text.split() if "=" in f)
        times = [datetime.datetime.fromisoformat(fields[k]) for k in ("StartTime", "EndTime")]
        out[job] = (times[1] - times[0]).total_seconds()
    return out
