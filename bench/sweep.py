"""Figures for sweeps, each measured in this one run.

1. Planning with `--dry-run`: wall time of the whole command for 10,000 trials against 1 trial
   of the same file shape (a one-list grid, and a 100 x 100 grid), interleaved, median of 5.
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


def sweep_file(directory: Path, num_trials: int, name: str, one_list: bool = False) -> Path:
    if one_list:
        grid = {"optimizer.lr": [round(1e-7 * (i + 1), 10) for i in range(num_trials)]}
    else:
        side = max(d for d in range(1, int(num_trials ** 0.5) + 1) if num_trials % d == 0)
        grid = {"optimizer.lr": [round(1e-5 * (i + 1), 8) for i in range(side)],
                "training.seed": list(range(num_trials // side))}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": str(ROOT / "configs" / "longformer_synthetic.yaml"),
                                    "grid": grid, "max_trials": num_trials, "runs_dir": str(directory / "runs"),
                                    "resources": {"time_min": 5, "max_parallel": 4}}))
    return path


def dry_run_once(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), "--dry-run"], check=True,
                   capture_output=True, cwd=path.parent)
    return time.perf_counter() - started


def planning_cost(directory: Path, repeats: int) -> dict:
    """10,000 trials against 1 of the same shape, both shapes, runs interleaved."""
    files = {(shape, n): sweep_file(directory, n, f"{shape}{n}", one_list=shape == "one_list")
             for shape in ("one_list", "grid_100x100") for n in (1, 10_000)}
    times: dict = {key: [] for key in files}
    for _ in range(repeats):
        for key, path in files.items():
            times[key].append(dry_run_once(path))
    out = {}
    for shape in ("one_list", "grid_100x100"):
        one, many = statistics.median(times[shape, 1]), statistics.median(times[shape, 10_000])
        out[shape] = {"trials_1_s": one, "trials_10000_s": many, "extra_s": many - one,
                      "per_trial_ms": (many - one) / 9_999 * 1e3}
    return out


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
                    jobs = [executor.submit(TrialJob(t.config, {}, 1, 0)) for t in trials]
            else:
                jobs = [executor.submit(TrialJob(t.config, {}, 1, 0)) for t in trials]
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
        results = {"command": "python " + " ".join(sys.argv), "planning": planning_cost(tmp, 5),
                   **import_profile(big)}
        results["submission"] = submission_seconds(args.trials, args.repeats, tmp)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "sweep.json").write_text(json.dumps(results, indent=2))
    s = results["submission"]
    print("| figure | value | target |")
    print("|---|---|---|")
    for shape, p in results["planning"].items():
        print(f"| `--dry-run`, {shape}: 10,000 trials vs 1 | {p['trials_10000_s']:.2f} s vs {p['trials_1_s']:.2f} s "
              f"= +{p['extra_s']:.2f} s ({p['per_trial_ms']:.3f} ms a trial) | +<= 0.5 s, < 2 s |")
    print(f"| imports of the `--dry-run` CLI | {results['import_seconds']:.2f} s; torch/deepspeed/mlflow imported: "
          f"{results['heavy_modules_imported'] or 'none'} | no torch |")
    print(f"| submit {s['trials']} trials: arrays vs one sbatch each | {s['array_s']:.2f} s vs {s['single_s']:.2f} s "
          f"= {s['speedup']:.0f}x | >= 20x, < 5 s |")


if __name__ == "__main__":
    main()
