"""Successive halving against the full sweep: configs/asha_demo.yaml run with and without its
`asha` section, local executor, in one run (full sweep first, then with asha; `--rounds` more
pairs alternate the order).

Reports, for each: training steps spent (the sum of every trial's last step), wall time, the
best trial and its metric, and the steps ratio (asha / full).

    python bench/asha.py [--rounds 1]

Writes bench/results/asha.json (and the asha run's plot to bench/results/asha_curves.png) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "asha_demo.yaml"


def run(kind: str, tmp: Path, round_: int) -> dict:
    import yaml

    spec = yaml.safe_load(SWEEP.read_text())
    spec["base"] = str(ROOT / "configs" / spec["base"])
    spec["name"] = f"{kind}{round_}"
    spec["executor"] = "local"
    spec["runs_dir"] = str(tmp / "runs")
    spec["tracking"] = {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    spec["set"]["data.cache_dir"] = str(tmp / "data_cache")
    if kind == "full":
        del spec["asha"]
    path = tmp / f"{kind}{round_}.yaml"
    path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"], cwd=tmp,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{kind} sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from qarac_dist.submit.sweep_dir import Manifest
    from qarac_dist.summary import rows

    manifest = Manifest.load(tmp / "runs" / spec["name"])
    table, best_id = rows(manifest)
    trials = {row.record.label: {"state": row.record.state, "last_step": row.last_step, "value": row.value,
                                 "loss": row.loss, "best_step": row.best_step} for row in table}
    best = manifest.trials[best_id]
    result = {"kind": kind, "wall_s": wall, "steps": sum(t["last_step"] or 0 for t in trials.values()),
              "best_label": best.label, "best_value": trials[best.label]["value"], "trials": trials,
              "pruned": sum(t["state"] == "PRUNED" for t in trials.values())}
    plot = tmp / "runs" / spec["name"] / "asha" / "curves.png"
    if plot.exists():
        shutil.copy(plot, ROOT / "bench" / "results" / "asha_curves.png")
    print(f"{kind} (round {round_}): {result['steps']} steps, {wall:.0f} s, best [{best.label}] "
          f"{result['best_value']:.4f}, {result['pruned']} pruned", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="pairs of sweeps; the order alternates")
    args = parser.parse_args()
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("full", "asha") if r % 2 == 0 else ("asha", "full")
            pair = {kind: run(kind, Path(tmp), r) for kind in order}
            pairs.append(pair)
    results = {"command": "python " + " ".join(sys.argv), "sweep": str(SWEEP.relative_to(ROOT)), "pairs": pairs}
    (ROOT / "bench" / "results" / "asha.json").write_text(json.dumps(results, indent=2))
    print("| round | sweep | training steps | wall time | best trial | best accuracy | trials stopped at a rung |")
    print("|---|---|---|---|---|---|---|")
    for r, pair in enumerate(pairs):
        for kind in ("full", "asha"):
            x = pair[kind]
            print(f"| {r} | {kind} | {x['steps']} | {x['wall_s'] / 60:.1f} min | {x['best_label']} | "
                  f"{x['best_value']:.4f} | {x['pruned']} |")
        full, asha = pair["full"], pair["asha"]
        print(f"\nround {r}: asha / full: steps {asha['steps'] / full['steps']:.3f}, wall time "
              f"{asha['wall_s'] / full['wall_s']:.3f}; best metric difference "
              f"{asha['best_value'] - full['best_value']:+.4f}; same best trial: {asha['best_label'] == full['best_label']}")


if __name__ == "__main__":
    main()
