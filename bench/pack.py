"""Packed jobs against one job per trial on the local SLURM cluster: configs/asha_demo.yaml
(successive halving on) with `resources.pack: 1` and `pack: 2`, the same `max_parallel: 2`, in
one run (`--rounds` pairs alternate the order).

For each: the jobs submitted, the wall time of `sweep --wait`, and the slot occupancy: the
seconds trials ran, summed, over the seconds the allocations held their trial slots, both as the
scheduler shows them (squeue, polled every 0.5 s): a trial runs while its job step runs (with
pack 1, submitit's srun step; packed, the runner's), and a job holds its slots while it is
RUNNING. Also the trials pruned and the best trial, to compare the two.

    python bench/pack.py [--rounds 1]

Needs the local cluster (slurm/start.sh). Writes bench/results/pack.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def running(name: str) -> list[str]:
    """The running jobs of that name, and their trial steps (not the batch or extern steps)."""
    jobs = subprocess.run(["squeue", "-h", "-r", "-n", name, "-t", "R", "-o", "%i"], capture_output=True,
                          text=True).stdout.split()
    if not jobs:
        return []
    steps = subprocess.run(["squeue", "-h", "-s", "-j", ",".join(sorted({j.split("_")[0] for j in jobs})), "-o", "%i"],
                           capture_output=True, text=True).stdout.split()
    return jobs + [s for s in steps if s.rpartition(".")[2].isdigit()]


def run(pack: int, tmp: Path, round_: int) -> dict:
    import yaml

    from asha import demo_spec  # bench/, on the path when run as `python bench/pack.py`

    spec = demo_spec(f"pack{pack}r{round_}", "slurm", tmp)
    spec["resources"].update(pack=pack, max_parallel=2)
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    held: dict[str, list[float]] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            now = time.time()
            for job in running(f"qarac-{spec['name']}"):
                held.setdefault(job, [now, now])[1] = now
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight", "--wait"],
                              cwd=tmp, capture_output=True, text=True)
    finally:
        done.set()
        watcher.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"pack {pack} sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = summarize(tmp / "runs" / spec["name"], pack, wall, held)
    print(f"pack {pack} (round {round_}): {result['jobs']} jobs, {wall:.0f} s, occupancy {result['occupancy']:.3f}, "
          f"best [{result['best_label']}], pruned {len(result['pruned'])}", file=sys.stderr)
    return result


def summarize(sweep_dir: Path, pack: int, wall: float, held: dict[str, list[float]]) -> dict:
    sys.path.insert(0, str(ROOT))
    from qarac_dist.submit.report import rows
    from qarac_dist.submit.sweep_dir import Manifest

    manifest = Manifest.load(sweep_dir)
    ran = sum(end - start for job, (start, end) in held.items() if "." in job)
    jobs = sorted({j for r in manifest.trials.values() for j in r.job_ids})
    slot_seconds = sum(end - start for job, (start, end) in held.items() if "." not in job) * pack
    table, best = rows(manifest)
    return {"pack": pack, "jobs": len(jobs), "wall_s": round(wall, 1), "trial_seconds": round(ran, 1),
            "slot_seconds": round(slot_seconds, 1), "occupancy": round(ran / slot_seconds, 3),
            "pruned": sorted(r.label for r in manifest.trials.values() if r.state == "PRUNED"),
            "best_label": manifest.trials[best].label if best else None,
            "best_value": next((row.value for row in table if row.record.id == best), None),
            "states": sorted(r.state for r in manifest.trials.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for pack in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                results.append(run(pack, Path(tmp), round_))
    out = ROOT / "bench" / "results" / "pack.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| pack | jobs submitted | wall time | occupancy | trials pruned | best trial | best accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['pack']} | {r['jobs']} | {r['wall_s'] / 60:.1f} min | {r['occupancy']:.3f} "
              f"({r['trial_seconds']:.0f} s of {r['slot_seconds']:.0f} slot-s) | {len(r['pruned'])} | "
              f"{r['best_label']} | {r['best_value']:.4f} |")
    ones, twos = ([r for r in results if r["pack"] == k] for k in (1, 2))
    for a, b in zip(ones, twos):
        print(f"\nsame trials pruned: {a['pruned'] == b['pruned']}; same best: {a['best_label'] == b['best_label']}")
        for label in sorted(set(a["pruned"]) ^ set(b["pruned"])):
            print(f"  pruned in {'pack 1' if label in a['pruned'] else 'pack 2'} only: {label}")


if __name__ == "__main__":
    main()
