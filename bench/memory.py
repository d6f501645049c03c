"""Preflight's memory estimate against what a real training step uses, on CPU.

For the demo Longformer (configs/longformer_synthetic.yaml, documents of exactly 2048 tokens so
every micro batch of 8 has the planned shape), with and without activation checkpointing, each
in a fresh process: preflight's estimate of a step's extra memory (activations of one micro
batch, measured as saved-tensor bytes at batch size 1 and scaled, plus gradients and Adam's
states: 16 bytes per parameter) against the growth of the process's RSS over its first
training step (sampled every millisecond).

    python bench/memory.py

Writes bench/results/memory.json and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["data.synthetic.num_train=64", "data.synthetic.num_validation=16", "data.synthetic.min_tokens=2048",
             "data.synthetic.max_tokens=2048", "data.max_length=2048", "training.micro_batch_size=8",
             f"evaluation.every_steps={10**6}", "training.max_steps=2"]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(checkpointing: bool, out: str) -> None:
    import deepspeed
    import torch

    from qarac_dist import models, preflight
    from qarac_dist.config import load_config
    from qarac_dist.ranks import export_from_environment
    from qarac_dist.train import Trainer

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "longformer_synthetic.yaml",
                      OVERRIDES + [f"model.activation_checkpointing={str(checkpointing).lower()}", f"output.dir={out}"])
    ranks = export_from_environment()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    trainer = Trainer(cfg, ranks)
    trainer.start()
    (batch_indices,) = next(trainer.batches.iterate())
    one = trainer.collate(trainer.splits.train[[int(batch_indices[0])]])
    # Measured as preflight does, on a model of its own (the engine's carries ZeRO's hooks).
    model = models.build_model(cfg, trainer.splits.num_labels, trainer.splits.tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    estimate = preflight.saved_activation_bytes(model, one) * cfg.training.micro_batch_size + 16 * num_params
    del model
    before, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    trainer.train_step([batch_indices])
    stop.set()
    sampler.join()
    print(json.dumps({"checkpointing": checkpointing, "estimate_bytes": estimate, "rss_growth_bytes": peak[0] - before,
                      "ratio": estimate / (peak[0] - before)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2] == "1", sys.argv[3])
        return
    runs = []
    for checkpointing in (False, True):
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, __file__, "--worker", "1" if checkpointing else "0", out], cwd=ROOT,
                                  capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "memory.json").write_text(json.dumps(
        {"command": "python " + " ".join(sys.argv), "runs": runs}, indent=2))
    print("| activation checkpointing | preflight estimate | RSS growth over the first step | estimate / measured | target |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['estimate_bytes'] / 2**20:.0f} MiB | "
              f"{r['rss_growth_bytes'] / 2**20:.0f} MiB | {r['ratio']:.2f} | within 25% |")


if __name__ == "__main__":
    main()
