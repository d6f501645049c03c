"""Figures for sweeps, each measured in this one run.

1. Planning a 10,000-trial grid with `--dry-run`: wall time of the whole command (median of 3).
2. The CLI's import time with `--dry-run` (python -X importtime), and proof that torch,
   deepspeed and mlflow are not imported.
3. Submitting 1,000 trials to the local SLURM cluster as job arrays vs one `sbatch` per trial
   (submitit in both cases), interleaved; jobs are submitted held and cancelled at once.

    python bench/sweep.py [--trials 1000] [--repeats 3]

Writes bench/results/sweep.json and prints a markdown table.
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

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(directory: Path, num_trials: int, name: str) -> Path:
    side = max(d for d in range(1, int(num_trials ** 0.5) + 1) if num_trials % d == 0)
    grid = {"optimizer.lr": [round(1e-5 * (i + 1), 8) for i in range(side)], "training.seed": list(range(num_trials // side))}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": str(ROOT / "configs" / "longformer_synthetic.yaml"),
                                    "grid": grid, "max_trials": num_trials, "runs_dir": str(directory / "runs"),
                                    "resources": {"time_min": 5, "max_parallel": 4}}))
    return path


def dry_run_seconds(path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), "--dry-run"], check=True,
                       capture_output=True, cwd=path.parent)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def import_profile(path: Path) -> dict:
    code = ("import sys, runpy; sys.argv = ['sweep', %r, '--dry-run'];\n"
            "try: runpy.run_module('qarac_dist.sweep', run_name='__main__')\nexcept SystemExit: pass\n"
            "print('HEAVY', [m for m in ('torch', 'deepspeed', 'mlflow', 'transformers') if m in sys.modules],"
            " file=sys.stderr)") % str(path)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          cwd=path.parent, check=True)
    total_us = sum(int(line.split("|")[1]) for line in proc.stderr.splitlines()
                   if line.startswith("import time:") and line.split("|")[1].strip().isdigit()
                   and not line.split("|")[2].startswith("  "))
    heavy = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY")][0]
    return {"import_seconds": total_us / 1e6, "heavy_modules_imported": eval(heavy.split(" ", 1)[1])}


def submission_seconds(num_trials: int, repeats: int, directory: Path) -> dict:
    import submitit

    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.plan import plan
    from qarac_dist.submit.executors import TrialJob
    from qarac_dist.submit.sbatch import executor_parameters

    spec, base = load_sweep(sweep_file(directory, num_trials, "submitbench"))
    trials = plan(spec, base)
    params = {**executor_parameters(spec.resources, "qarac-bench"), "additional_parameters": {"hold": True}}
    arrays, singles = [], []
    for round_ in range(repeats):
        for mode in ("array", "single"):
            executor = submitit.SlurmExecutor(folder=directory / f"submitit-{mode}-{round_}" / "%j")
            executor.update_parameters(**params)
            started = time.perf_counter()
            if mode == "array":
                with executor.batch():
                    jobs = [executor.submit(TrialJob(t.config, 1)) for t in trials]
            else:
                jobs = [executor.submit(TrialJob(t.config, 1)) for t in trials]
            elapsed = time.perf_counter() - started
            (arrays if mode == "array" else singles).append(elapsed)
            subprocess.run(["scancel", "--name", "qarac-bench"], check=True)
            assert len({j.job_id for j in jobs}) == num_trials
    return {"array_s": statistics.median(arrays), "single_s": statistics.median(singles),
            "speedup": statistics.median(singles) / statistics.median(arrays), "trials": num_trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000, help="trials submitted per mode")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = sweep_file(tmp, 10_000, "plan10k")
        results = {"command": "python " + " ".join(sys.argv), "dry_run_10k_s": dry_run_seconds(big, args.repeats),
                   **import_profile(big)}
        results["submission"] = submission_seconds(args.trials, args.repeats, tmp)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "sweep.json").write_text(json.dumps(results, indent=2))
    s = results["submission"]
    print("| figure | value | target |")
    print("|---|---|---|")
    print(f"| `--dry-run` of a 10,000-trial grid, wall time | {results['dry_run_10k_s']:.2f} s | < 2 s |")
    print(f"| imports of the `--dry-run` CLI | {results['import_seconds']:.2f} s; torch/deepspeed/mlflow imported: "
          f"{results['heavy_modules_imported'] or 'none'} | no torch |")
    print(f"| submit {s['trials']} trials: arrays vs one sbatch each | {s['array_s']:.2f} s vs {s['single_s']:.2f} s "
          f"= {s['speedup']:.0f}x | >= 20x, < 5 s |")


if __name__ == "__main__":
    main()
