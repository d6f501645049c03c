"""Loss-spike detection and rollback (`training.spikes`), measured.

1. Detection overhead: two trainers of one config in one process on 2 ranks (torchrun), one
   with training.spikes on (gradient norm watched too) and one off; one step of each in turn,
   the order swapped every step; the median of the per-step time ratios, on over off. No spike
   comes, so both must log the same losses, bit for bit. Also timed on their own, per step: the
   check with its gather of the ranks' verdicts (on), and the all-reduce of the stop flag that
   it takes the place of (off); their difference is what detection adds to a step.
2. Time lost per rollback, against the checkpoint interval: for checkpointing.every_steps 5, 10
   and 20, a run whose batch at step 2 x interval has a NaN loss (the worst place: the steps
   since the checkpoint at `interval` are trained again) against the same run without it, one
   rank; the difference of their training seconds (result.json), the runs interleaved, median
   of `--repeats`. The job's own account beside it: the checkpoint's load time (rollbacks.json)
   plus the undone steps at the median step time.

    python bench/spikes.py     # writes bench/results/spikes.json, prints the tables (~10 minutes on 2 cores)
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
CONFIG = ROOT / "configs" / "longformer_synthetic.yaml"
SMALL = ["data.synthetic.num_train=400", "data.synthetic.num_validation=32", "data.synthetic.min_tokens=256",
         "data.synthetic.max_tokens=512", "data.synthetic.evidence_after=128", "data.max_length=512",
         "training.micro_batch_size=4", "training.log_every=1", "early_stopping.patience=null",
         "output.export_best=false", "scheduler.warmup_steps=2"]
INTERVALS = (5, 10, 20)


def overhead_rank(steps: int, warmup: int, out: Path) -> None:
    """Run under torchrun: both trainers on this rank, interleaved; rank 0 writes `out`."""
    import deepspeed
    import torch.distributed as dist

    from qarac_dist.config import load_config
    from qarac_dist.track.trial_dir import read_metrics
    from qarac_dist.train.loop import Trainer
    from qarac_dist.train.ranks import export_from_environment

    ranks = export_from_environment()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    common = [*SMALL, f"training.max_steps={steps + 1}", f"evaluation.every_steps={10**6}",
              "checkpointing.every_steps=1000", "model.config.hidden_dropout_prob=0.0",
              "model.config.attention_probs_dropout_prob=0.0"]
    trainers, times, checks = {}, {"off": [], "on": []}, {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        box = [tmp]
        dist.broadcast_object_list(box, src=0)  # rank 0's folder for both
        for name, extra in (("off", []), ("on", ["training.spikes={grad_norm: true}"])):
            cfg = load_config(CONFIG, [*common, *extra, f"output.dir={box[0]}/{name}",
                                       f"data.cache_dir={box[0]}/cache"])
            trainers[name] = Trainer(cfg, ranks)
            trainers[name].start()
        def timed(name, fn):
            def call(*args):
                started = time.perf_counter()
                out = fn(*args)
                checks[name].append(time.perf_counter() - started)
                return out
            return call

        trainers["on"].spikes.check = timed("on", trainers["on"].spikes.check)
        trainers["off"].stop_requested = timed("off", trainers["off"].stop_requested)
        for i in range(steps):
            for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                started = time.perf_counter()
                trainers[name].advance()
                times[name].append(time.perf_counter() - started)
        for t in trainers.values():
            t.tracker.close()
        if ranks.is_main:
            losses = {name: [r["loss"] for r in read_metrics(Path(box[0]) / name / "metrics.jsonl")]
                      for name in trainers}
            ratios = [a / b for a, b in zip(times["on"][warmup:], times["off"][warmup:])]
            out.write_text(json.dumps({
                "ratio": statistics.median(ratios), "on_step_s": statistics.median(times["on"][warmup:]),
                "off_step_s": statistics.median(times["off"][warmup:]),
                "check_us": statistics.median(checks["on"][warmup:]) * 1e6,
                "stop_flag_us": statistics.median(checks["off"][warmup:]) * 1e6, "steps": steps, "warmup": warmup,
                "ranks": ranks.world_size, "losses_identical": losses["on"] == losses["off"]}))
        dist.barrier()
    dist.destroy_process_group()


def overhead(steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overhead.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--overhead-rank", str(out), "--steps", str(steps), "--warmup", str(warmup)],
                       env=env, check=True, capture_output=True)
        return json.loads(out.read_text())


def _run(tmp: Path, name: str, interval: int, fault: str) -> dict:
    out = tmp / name
    subprocess.run([sys.executable, "-m", "qarac_dist.train", str(CONFIG), *SMALL, f"training.max_steps={3 * interval}",
                    f"evaluation.every_steps={3 * interval}", f"checkpointing.every_steps={interval}",
                    "training.spikes={}", f"output.dir={out}", f"data.cache_dir={tmp / 'cache'}"],
                   env={**os.environ, "OMP_NUM_THREADS": "1", "QARAC_FAULT": fault}, check=True, capture_output=True)
    from qarac_dist.track.trial_dir import TrialDir

    trial = TrialDir(out)
    steps = [r["step_seconds"] for r in trial.metrics() if "step_seconds" in r]
    return {"train_seconds": json.loads(trial.result_file.read_text())["train_seconds"],
            "rollbacks": trial.rollbacks(), "step_s": statistics.median(steps)}


def rollback_cost(repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for interval in INTERVALS:
            lost, modelled = [], []
            for k in range(repeats):  # interleaved: the clean run first, then the faulty one, and the reverse
                runs = {}
                for kind in (("clean", "nan") if k % 2 == 0 else ("nan", "clean")):
                    fault = f"loss-nan:{2 * interval - 1}:0" if kind == "nan" else ""
                    runs[kind] = _run(Path(tmp), f"{interval}-{k}-{kind}", interval, fault)
                (rollback,) = runs["nan"]["rollbacks"]
                lost.append(runs["nan"]["train_seconds"] - runs["clean"]["train_seconds"])
                undone = rollback["step"] - rollback["to_step"]
                modelled.append(rollback["load_seconds"] + undone * runs["nan"]["step_s"])
            rows.append({"interval": interval, "undone_steps": undone, "lost_s": statistics.median(lost),
                         "modelled_s": statistics.median(modelled), "load_s": rollback["load_seconds"],
                         "step_s": runs["clean"]["step_s"], "repeats": repeats})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps of each trainer, interleaved")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--repeats", type=int, default=3, help="run pairs per checkpoint interval")
    parser.add_argument("--overhead-rank", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overhead_rank:
        overhead_rank(args.steps, args.warmup, args.overhead_rank)
        return
    sys.path.insert(0, str(ROOT))
    results = {"overhead": overhead(args.steps, args.warmup), "rollback": rollback_cost(args.repeats)}
    (ROOT / "bench" / "results" / "spikes.json").write_text(json.dumps(results, indent=1) + "\n")
    o = results["overhead"]
    added = (o["check_us"] - o["stop_flag_us"]) / (o["off_step_s"] * 1e6)
    print("| step time, detection on / off (median of per-step ratios) | check (on) | stop flag (off) | step (off) | "
          "added per step | losses identical |")
    print("|---|---|---|---|---|---|")
    print(f"| {o['ratio']:.4f} | {o['check_us']:.0f} us | {o['stop_flag_us']:.0f} us | {o['off_step_s'] * 1000:.0f} ms | "
          f"{added:.2%} | {o['losses_identical']} |\n")
    print("| checkpoint every | steps undone | time lost: measured (median) | job's account: load + undone steps |")
    print("|---|---|---|---|")
    for r in results["rollback"]:
        print(f"| {r['interval']} | {r['undone_steps']} | {r['lost_s']:.2f} s | {r['load_s']:.2f} s + "
              f"{r['undone_steps']} x {r['step_s'] * 1000:.0f} ms = {r['modelled_s']:.2f} s |")


if __name__ == "__main__":
    main()
