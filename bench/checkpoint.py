"""Checkpoint figures for the demo model (configs/longformer_synthetic.yaml), 1 and 2 ranks:
time to save a checkpoint (all ranks, COMPLETE marker included), time to resume from it (a new
engine loading it), and the checkpoint's size on disk against the model-state size DeepSpeed's
ZeRO-2 estimator predicts (summed over ranks, no offload). Also what verifying a checkpoint on
resume costs for a 1 GiB one: checking the recorded sizes (what qarac_dist does) against reading
it all for a checksum (crc32, blake2b), each on a file just written and, for the reads, with the
page cache dropped where this process may (root).

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
    from qarac_dist.train.loop import Trainer
    from qarac_dist.train.ranks import export_from_environment

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


def verification_cost(repeats: int, size: int = 2**30) -> dict:
    """Seconds to verify a 1 GiB checkpoint file by size (a stat) and by checksum (a full read)."""
    import hashlib
    import zlib

    def drop_cache(path: Path) -> None:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1")
        except OSError:
            pass  # not root: the reads may come from the page cache (a lower bound)

    def read_all(path: Path, update) -> None:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(16 * 2**20):
                update(chunk)

    timings: dict[str, list[float]] = {"size": [], "crc32": [], "blake2b": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.pt"
        with open(path, "wb") as f:
            block = os.urandom(16 * 2**20)
            for _ in range(size // len(block)):
                f.write(block)
        for _ in range(repeats):
            started = time.perf_counter()
            assert path.stat().st_size == size
            timings["size"].append(time.perf_counter() - started)
            for name in ("crc32", "blake2b"):
                drop_cache(path)
                state = [0] if name == "crc32" else hashlib.blake2b()
                update = (lambda c: state.__setitem__(0, zlib.crc32(c, state[0]))) if name == "crc32" else state.update
                started = time.perf_counter()
                read_all(path, update)
                timings[name].append(time.perf_counter() - started)
    return {f"{k}_s": statistics.median(v) for k, v in timings.items()} | {"bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    results = {"command": "python " + " ".join(sys.argv), "runs": [measure(n, args.repeats) for n in (1, 2)],
               "verify_1gib": verification_cost(args.repeats)}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "checkpoint.json").write_text(json.dumps(results, indent=2))
    print("| ranks | save | resume | checkpoint on disk | ZeRO-2 estimator, model states (all ranks) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['ranks']} | {r['save_s']:.2f} s | {r['resume_s']:.2f} s | {r['checkpoint_bytes'] / 2**20:.1f} MiB | "
              f"{r['estimated_model_states_bytes'] / 2**20:.1f} MiB | "
              f"{r['checkpoint_bytes'] / r['estimated_model_states_bytes']:.2f} |")
    v = results["verify_1gib"]
    print(f"\nverifying a 1 GiB checkpoint: sizes {v['size_s'] * 1e6:.0f} us, crc32 {v['crc32_s']:.2f} s, "
          f"blake2b {v['blake2b_s']:.2f} s")


if __name__ == "__main__":
    main()
