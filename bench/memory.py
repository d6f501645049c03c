"""Preflight's memory estimate against what a real training step uses, on CPU.

For the demo Longformer (configs/longformer_synthetic.yaml, documents of exactly 2048 tokens so
every micro batch of 8 has the planned shape), with and without activation checkpointing, each
in a fresh process: preflight's estimate of a step's extra memory (the peak of live tensor
bytes over one forward and backward at batch size 1, scaled to the micro batch, plus
gradients and Adam's states: 16 bytes per parameter) against the growth of the process's RSS
over its first training step (sampled every millisecond). Also shown: the older estimate from
saved-for-backward bytes alone.

RSS counts memory the C allocator keeps after a tensor is freed; it is measured twice: with
glibc's defaults, and with MALLOC_MMAP_THRESHOLD_=65536, which returns every large block to the
system when it is freed, so RSS follows live memory (as a GPU allocator's allocated bytes do).

    python bench/memory.py

Writes bench/results/memory.json and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["data.synthetic.num_train=64", "data.synthetic.num_validation=16", "data.synthetic.min_tokens=2048",
             "data.synthetic.max_tokens=2048", "data.max_length=2048", "training.micro_batch_size=8",
             f"evaluation.every_steps={10**6}", "training.max_steps=2"]


def worker(checkpointing: bool, out: str) -> None:
    import deepspeed
    import torch

    from qarac_dist.config import load_config
    from qarac_dist.preflight import memory as preflight
    from qarac_dist.train import models
    from qarac_dist.train.loop import Trainer
    from qarac_dist.train.memory import RssGrowth
    from qarac_dist.train.ranks import export_from_environment

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
    states = 16 * num_params  # gradients, Adam's two moments, ZeRO's fp32 partition
    saved = preflight.saved_activation_bytes(model, one) * cfg.training.micro_batch_size + states
    estimate = preflight.peak_activation_bytes(model, one) * cfg.training.micro_batch_size + states
    del model
    with RssGrowth(interval_s=0.001) as rss:
        trainer.train_step([batch_indices])
    growth = rss.bytes
    print(json.dumps({"checkpointing": checkpointing, "estimate_bytes": estimate, "rss_growth_bytes": growth,
                      "ratio": estimate / growth, "saved_only_estimate_bytes": saved,
                      "saved_only_ratio": saved / growth}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2] == "1", sys.argv[3])
        return
    runs = []
    allocators = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    for _ in range(3):
        for allocator, env in allocators.items():
            for checkpointing in (False, True):
                with tempfile.TemporaryDirectory() as out:
                    proc = subprocess.run([sys.executable, __file__, "--worker", "1" if checkpointing else "0", out],
                                          cwd=ROOT, capture_output=True, text=True, check=False,
                                          env={**os.environ, "DS_ACCELERATOR": "cpu", **env})
                    if proc.returncode:
                        sys.exit(proc.stderr[-3000:])
                    runs.append({"allocator": allocator, **json.loads(proc.stdout.strip().splitlines()[-1])})
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "memory.json").write_text(json.dumps(
        {"command": "python " + " ".join(sys.argv), "runs": runs}, indent=2))
    print("| allocator | activation checkpointing | preflight estimate | RSS growth over the first step (median of 3) "
          "| estimate / measured | saved-tensors-only estimate / measured | target |")
    print("|---|---|---|---|---|---|---|")
    for allocator in allocators:
        for checkpointing in (False, True):
            mine = [r for r in runs if r["allocator"] == allocator and r["checkpointing"] == checkpointing]
            growth = statistics.median(r["rss_growth_bytes"] for r in mine)
            estimate = mine[0]["estimate_bytes"]
            print(f"| {allocator} | {'on' if checkpointing else 'off'} | {estimate / 2**20:.0f} MiB | "
                  f"{growth / 2**20:.0f} MiB | {estimate / growth:.2f} | "
                  f"{mine[0]['saved_only_estimate_bytes'] / growth:.2f} | 0.75 to 1.25 |")


if __name__ == "__main__":
    main()
