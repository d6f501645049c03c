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
