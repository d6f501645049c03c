"""Checkpoint figures for the demo model (configs/longformer_synthetic.yaml), 1 and 2 ranks:
time to save a checkpoint (all ranks, COMPLETE marker included), time to resume from it (a new
engine loading it), and the checkpoint's size on disk against the model-state size DeepSpeed's
ZeRO-2 estimator predicts (summed over ranks, no offload).

    python bench/checkpoint.py [--repeats 3]

Writes bench/results/checkpoint.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(out: str, repeats: int) -> None:
    """Runs under torchrun: build, train 2 steps, save `repeats` times, then resume as often."""
    import deepspeed
    import torch.distributed as dist

    from qarac_dist.config import load_config
    from qarac_dist.ranks import export_from_environment
    from qarac_dist.train import Trainer

    ranks = export_from_environment()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    overrides = ["training.max_steps=1000", f"evaluation.every_steps={10**6}", f"output.dir={out}",
                 f"checkpointing.keep_last={repeats + 1}"]
    cfg = load_config(ROOT / "configs" / "longformer_synthetic.yaml", overrides)
    trainer = Trainer(cfg, ranks)
    trainer.start()
    batches = trainer.batches.iterate()
    save_s = []
    for _ in range(repeats):
        trainer.advance(next(batches))
        dist.barrier()
        started = time.perf_counter()
        trainer.save_checkpoint()
        save_s.append(time.perf_counter() - started)
    trainer.tracker.close()
    resume_s = []
    for _ in range(repeats):
        fresh = Trainer(cfg, ranks)
        dist.barrier()
        started = time.perf_counter()
        fresh.resume()
        dist.barrier()
        resume_s.append(time.perf_counter() - started)
        assert fresh.step == trainer.step
    num_params = sum(p.numel() for p in trainer.engine.module.parameters())
    if ranks.is_main:
        tag = Path(out) / "checkpoints" / f"step{trainer.step:08d}"
        size = sum(f.stat().st_size for f in tag.iterdir() if f.is_file())
        print(json.dumps({"save_s": statistics.median(save_s), "resume_s": statistics.median(resume_s),
                          "checkpoint_bytes": size, "num_params": num_params}))
    dist.destroy_process_group()


def measure(num_ranks: int, repeats: int) -> dict:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", str(num_ranks), __file__, "--worker", out,
                               "--repeats", str(repeats)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    _, per_device = estimate_zero2_model_states_mem_needs(result["num_params"], num_gpus_per_node=num_ranks,
                                                          cpu_offload=False)
    result["estimated_model_states_bytes"] = per_device * num_ranks
    result["ranks"] = num_ranks
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    results = {"command": "python " + " ".join(sys.argv), "runs": [measure(n, args.repeats) for n in (1, 2)]}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "checkpoint.json").write_text(json.dumps(results, indent=2))
    print("| ranks | save | resume | checkpoint on disk | ZeRO-2 estimator, model states (all ranks) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['ranks']} | {r['save_s']:.2f} s | {r['resume_s']:.2f} s | {r['checkpoint_bytes'] / 2**20:.1f} MiB | "
              f"{r['estimated_model_states_bytes'] / 2**20:.1f} MiB | "
              f"{r['checkpoint_bytes'] / r['estimated_model_states_bytes']:.2f} |")


if __name__ == "__main__":
    main()
