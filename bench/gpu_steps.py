"""Training steps on one GPU, and what preflight planned for them (run by bench/gpu.sh).

For the demo Longformer (configs/longformer_synthetic.yaml) and a longformer-base-shaped one
(12 layers, hidden 768, window 512) at 4096 tokens, both with activation checkpointing, in bf16
and in fp16 (dynamic loss scaling): the median tokens/s over the steps after the first few, the
peak GPU memory (torch.cuda.max_memory_allocated), and preflight's memory plan for the same
trial against that peak. `--find-batch-size` runs the micro-batch search on the base shape (its
64 documents cap the search at 64). Each run has its own time limit and the JSON is written
after each one, so a run that overruns loses only itself (its output's last lines are kept).

    python bench/gpu_steps.py --out bench/results/gpu_steps.json
    python bench/gpu_steps.py --find-batch-size --out bench/results/gpu_batch_size.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from peers import BASE_SIZE  # noqa: E402 - the same geometry as the peers' GPU mode

CONFIG = ROOT / "configs" / "longformer_synthetic.yaml"
STEPS, WARMUP = 12, 3
JOBS = {
    "base": [*BASE_SIZE, "training.micro_batch_size=1", "data.synthetic.num_train=64"],
    "demo": ["model.activation_checkpointing=true", "data.synthetic.num_train=256"],
}
RUNS = [("base", "bf16"), ("base", "fp16"), ("demo", "bf16"), ("demo", "fp16")]
RUN_LIMIT_S = 90


def common(out: Path, dtype: str) -> list[str]:
    return [f"precision.dtype={dtype}", f"training.max_steps={STEPS}", "training.log_every=1",
            "evaluation.every_steps=1000000", "output.export_best=false", "checkpointing.every_steps=null",
            "data.synthetic.num_validation=8", f"output.dir={out}", "early_stopping.patience=null"]


def train(job: str, dtype: str, work: Path) -> dict:
    out = work / f"{job}-{dtype}"
    overrides = [*JOBS[job], *common(out, dtype), f"data.cache_dir={work / job}"]
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "qarac_dist.train", str(CONFIG), *overrides], cwd=ROOT,
                              capture_output=True, text=True, timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired as late:
        return {"job": job, "dtype": dtype, "error": f"not done in {RUN_LIMIT_S} s",
                "output_tail": (late.stderr or b"")[-2000:].decode(errors="replace")}
    if proc.returncode != 0:
        return {"job": job, "dtype": dtype, "error": f"exit {proc.returncode}", "output_tail": proc.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    return {"job": job, "dtype": dtype, "steps": len(steps),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[WARMUP:]),
            "peak_gpu_mb": max((r.get("mem_peak_mb", 0) for r in steps), default=0),
            "skipped_steps": max((r.get("skipped_steps", 0) for r in steps), default=0),
            "wall_s": round(time.monotonic() - started, 1), "planned_mb": planned_mb(overrides)}


def planned_mb(overrides: list[str]) -> float:
    """Preflight's memory plan for the trial (model states and activations per GPU)."""
    from qarac_dist.config import load_config
    from qarac_dist.config.sweep import Resources
    from qarac_dist.preflight.audit import run

    cfg = load_config(CONFIG, overrides)
    result = run(cfg, 1, Resources(gpus_per_node=1, gpu_memory_gb=139))
    return result.memory.total / 2**20


def find_batch_size(work: Path) -> dict:
    sweep = {"name": "gpu-batch-size", "base": str(CONFIG), "runs_dir": str(work / "runs"), "executor": "local",
             "set": {**{key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in JOBS["base"])},
                     "precision.dtype": "bf16", "data.cache_dir": str(work / "base")},
             "resources": {"gpus_per_node": 1, "gpu_memory_gb": 139, "time_min": 10}}
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.preflight", str(path), "--find-batch-size"],
                          capture_output=True, text=True, cwd=ROOT)
    found = json.loads((work / "runs" / "gpu-batch-size" / "micro_batch.json").read_text()) \
        if proc.returncode == 0 else {}
    return {"returncode": proc.returncode, "printed": proc.stdout + proc.stderr[-2000:], "found": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--find-batch-size", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_steps.py: torch sees no GPU here")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.find_batch_size:
            result = find_batch_size(work)
        else:
            result = {"gpu": torch.cuda.get_device_name(), "steps": STEPS, "warmup": WARMUP, "runs": []}
            for job, dtype in RUNS:
                result["runs"].append(train(job, dtype, work))
                print(json.dumps(result["runs"][-1]), flush=True)
                args.out.write_text(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
