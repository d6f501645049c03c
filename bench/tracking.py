"""Figures for MLflow tracking, measured in this one run against a real `mlflow server` on
127.0.0.1 (sqlite backend).

1. Training step time with tracking over step time without: two trainers of the same config in
   one process, one logging every step to the server, one with no MLflow; one step of each in
   turn, the order swapped every step; the median of the per-step ratios.
2. Cost per metric point: synchronous `log_metric` calls against the batched background logger
   (points appended, then flushed), as a ratio.
3. With `--sampler`: step time with the node's load sampled with every logged row
   (track/system_metrics.py, its worst case: tracking.system_metrics_every_s near 0) over step
   time with no sampling, both tracking every step to the server, as in 1.

    python bench/tracking.py [--steps 60] [--points 300] [--sampler]

Writes bench/results/tracking.json (tracking_sampler.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def step_time_ratio(uri: str, steps: int, warmup: int, sampler: bool = False) -> dict:
    """"tracked" against "untracked"; with `sampler`, both tracked, "tracked" sampling the load."""
    import deepspeed
    import torch

    from qarac_dist.config import load_config
    from qarac_dist.config import config_to_dict
    from qarac_dist.track.job_context import JobContext
    from qarac_dist.track.mlflow_runs import TrialRun
    from qarac_dist.track.sweep_runs import trial_params
    from qarac_dist.train.loop import Trainer
    from qarac_dist.train.ranks import export_from_environment

    ranks = export_from_environment()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tracked", "untracked"):
            overrides = [f"training.max_steps={steps + 1}", "training.log_every=1", f"evaluation.every_steps={10**6}",
                         "output.export_best=false", f"output.dir={tmp}/{name}"]
            tracked = name == "tracked" or sampler
            if tracked:
                overrides += [f"tracking.uri={uri}", "tracking.experiment=bench",
                              f"tracking.system_metrics_every_s={0.001 if name == 'tracked' else 0}"]
            cfg = load_config(ROOT / "configs" / "longformer_synthetic.yaml", overrides)
            run = None
            if tracked:
                Path(cfg.output.dir).mkdir(parents=True)
                run = TrialRun(cfg.tracking, JobContext(), "bench", trial_params(config_to_dict(cfg)),
                               Path(cfg.output.dir), {})
            trainers[name] = Trainer(cfg, ranks, run)
            trainers[name].start()
        seconds: dict[str, list[float]] = {"tracked": [], "untracked": []}
        for i in range(steps):
            # ABBA order: neither trainer always goes first (caches, allocator, the logger thread).
            order = list(trainers.items()) if i % 2 == 0 else list(trainers.items())[::-1]
            for name, trainer in order:
                started = time.perf_counter()
                trainer.advance()
                seconds[name].append(time.perf_counter() - started)
        for trainer in trainers.values():
            trainer.tracker.close()
        torch.distributed.destroy_process_group()
    ratios = [a / b for a, b in zip(seconds["tracked"][warmup:], seconds["untracked"][warmup:])]
    return {"tracked_step_s": statistics.median(seconds["tracked"][warmup:]),
            "untracked_step_s": statistics.median(seconds["untracked"][warmup:]),
            "ratio": statistics.median(ratios), "steps": steps,
            "ratio_of_medians": statistics.median(seconds["tracked"][warmup:]) / statistics.median(seconds["untracked"][warmup:])}


def per_point_ratio(uri: str, points: int) -> dict:
    from qarac_dist.track.mlflow_client import client, create_run, experiment_id
    from qarac_dist.track.mlflow_logger import MlflowLogger

    c = client(uri)
    exp = experiment_id(c, "bench-points")
    sync_run = create_run(c, exp, "sync", {})
    started = time.perf_counter()
    for step in range(points):
        c.log_metric(sync_run, "loss", 1.0 / (step + 1), step=step)
    sync_s = time.perf_counter() - started
    batched_run = create_run(c, exp, "batched", {})
    with tempfile.TemporaryDirectory() as tmp:
        logger = MlflowLogger(uri, batched_run, Path(tmp))
        started = time.perf_counter()
        for step in range(points):
            logger.log(step, {"loss": 1.0 / (step + 1)})
        assert logger.close() == 0
        batched_s = time.perf_counter() - started
    assert len(c.get_metric_history(batched_run, "loss")) == points
    return {"points": points, "sync_s": sync_s, "batched_s": batched_s,
            "sync_per_point_ms": 1000 * sync_s / points, "batched_per_point_ms": 1000 * batched_s / points,
            "ratio": sync_s / batched_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--sampler", action="store_true", help="the load sampler's cost instead (figure 3)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from conftest import MlflowServer

    with tempfile.TemporaryDirectory() as root:
        server = MlflowServer(Path(root))
        server.start()
        try:
            points = None if args.sampler else per_point_ratio(server.uri, args.points)
            steps = step_time_ratio(server.uri, args.steps, args.warmup, args.sampler)
        finally:
            server.stop()
    if args.sampler:
        (ROOT / "bench" / "results" / "tracking_sampler.json").write_text(json.dumps(
            {"command": "python " + " ".join(sys.argv), "step_time": steps}, indent=2))
        print(f"| step time, the load sampled with every row / not sampled (both tracking) | "
              f"{steps['tracked_step_s']:.3f} s | {steps['untracked_step_s']:.3f} s | {steps['ratio']:.3f} (ratio of "
              f"the medians: {steps['ratio_of_medians']:.3f}) | <= 1.01 |")
        return
    results = {"command": "python " + " ".join(sys.argv), "step_time": steps, "per_point": points}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "tracking.json").write_text(json.dumps(results, indent=2))
    print("| figure | A | B | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| step time, tracking to a loopback server / no tracking | {steps['tracked_step_s']:.3f} s | "
          f"{steps['untracked_step_s']:.3f} s | {steps['ratio']:.3f} (ratio of the medians: "
          f"{steps['ratio_of_medians']:.3f}) | <= 1.01 |")
    print(f"| per metric point, synchronous log_metric / batched background logger ({points['points']} points) | "
          f"{points['sync_per_point_ms']:.2f} ms | {points['batched_per_point_ms']:.3f} ms | {points['ratio']:.0f}x | |")


if __name__ == "__main__":
    main()
