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
import heapq
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "asha_demo.yaml"


def demo_spec(name: str, executor: str, tmp: Path) -> dict:
    """configs/asha_demo.yaml as a sweep named `name` under `tmp`, with its own MLflow store."""
    import yaml

    spec = yaml.safe_load(SWEEP.read_text())
    spec["base"] = str(ROOT / "configs" / spec["base"])
    spec.update(name=name, executor=executor, runs_dir=str(tmp / "runs"),
                tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    return spec


def run(kind: str, tmp: Path, round_: int) -> dict:
    import yaml

    spec = demo_spec(f"{kind}{round_}", "local", tmp)
    # data.cache_dir stays the base's relative default, which lands in `tmp` (the working
    # directory): it is part of a trial's id, and the ids give the order trials start in, so the
    # asha sweep here starts its trials in the order `configs/asha_demo.yaml` does.
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
    result = summarize(tmp / "runs" / spec["name"], kind, wall)
    plot = tmp / "runs" / spec["name"] / "asha" / "curves.png"
    if plot.exists():
        shutil.copy(plot, ROOT / "bench" / "results" / "asha_curves.png")
    print(f"{kind} (round {round_}): {result['steps']} steps, {wall:.0f} s, best [{result['best_label']}] "
          f"{result['best_value']:.4f}, {result['pruned']} pruned", file=sys.stderr)
    return result


def summarize(sweep_dir: Path, kind: str, wall: float) -> dict:
    """A finished sweep's steps, best trial, and every trial's validations in the order they started."""
    from qarac_dist.submit.sweep_dir import Manifest
    from qarac_dist.submit.report import rows

    manifest = Manifest.load(sweep_dir)
    table, best_id = rows(manifest)
    trials = {row.record.label: {"state": row.record.state, "last_step": row.last_step, "value": row.value,
                                 "loss": row.loss, "best_step": row.best_step} for row in table}
    metric, mode = manifest.select_metric, manifest.select_mode
    curves = {}
    for record in manifest.trials.values():  # in the order the trials started
        rows_ = record.trial_dir.metrics()
        curves[record.label] = {
            "validations": [[r["step"], r[f"val_{metric}"], r.get("val_loss", float("nan"))]
                            for r in rows_ if f"val_{metric}" in r],
            "seconds_per_step": statistics.median([r["step_seconds"] for r in rows_ if "step_seconds" in r] or [0.0])}
    best = manifest.trials[best_id]
    result = {"kind": kind, "wall_s": wall, "steps": sum(t["last_step"] or 0 for t in trials.values()),
              "best_label": best.label, "best_value": trials[best.label]["value"], "trials": trials,
              "pruned": sum(t["state"] == "PRUNED" for t in trials.values()), "started": list(curves),
              "curves": curves, "select": [metric, mode]}
    return result


def replay(full: dict, order: list[str], grace: int, factor: int, max_steps: int, slots: int) -> tuple[int, float]:
    """Training steps the asha sweep would spend, and the best metric of the trials it runs to the
    end, had its trials started in `order`: replayed from the full sweep's own validations, each
    trial's rung arrivals timed by its measured seconds per step (start-up left out), `slots`
    trials at a time, decided by the rule the trials use (qarac_dist.track.rungs.keeps_going)."""
    from qarac_dist.plan.asha import rung_steps
    from qarac_dist.track.rungs import keeps_going

    metric, mode = full["select"]
    rungs = rung_steps(grace, factor, max_steps)
    scores = {label: {step: (value, loss) for step, value, loss in c["validations"]} for label, c in full["curves"].items()}
    recorded: dict[int, list] = {r: [] for r in rungs}
    events: list = []
    queue, spent, stopped = list(order), {}, set()

    def start(label: str, t0: float) -> None:
        per_step = full["curves"][label]["seconds_per_step"]
        for k, r in enumerate(rungs):
            heapq.heappush(events, (t0 + r * per_step, label, k))
        heapq.heappush(events, (t0 + max_steps * per_step, label, len(rungs)))

    for _ in range(slots):
        if queue:
            start(queue.pop(0), 0.0)
    while events:
        t, label, k = heapq.heappop(events)
        if label in stopped:
            continue
        if k < len(rungs):
            score = scores[label][rungs[k]]
            going = keeps_going(score, recorded[rungs[k]], factor, mode)
            recorded[rungs[k]].append(score)
            if going:
                continue
            stopped.add(label)
        spent[label] = rungs[k] if k < len(rungs) else max_steps
        if queue:
            start(queue.pop(0), t)
    finished = [v for label in spent if label not in stopped for _, v, _ in full["curves"][label]["validations"]]
    return sum(spent.values()), (max(finished) if mode == "max" else min(finished))


def replays(full: dict, asha_started: list[str], orders: int = 400) -> dict:
    """The replay in the file's order, in the order the asha sweep started its trials (its ids),
    and over `orders` random orders."""
    import yaml

    spec = yaml.safe_load(SWEEP.read_text())
    args = (spec["asha"]["grace_steps"], spec["asha"].get("reduction_factor", 3), spec["set"]["training.max_steps"],
            spec["resources"]["max_parallel"])
    listed = [label for label in full["started"]]  # the full sweep has no asha: it starts them as listed
    out = {}
    for name, order in (("listed", listed), ("ids", asha_started)):
        steps, best = replay(full, order, *args)
        out[name] = {"steps": steps, "ratio": steps / full["steps"], "best_value": best}
    ratios, bests = [], []
    for seed in range(orders):
        order = list(listed)
        random.Random(seed).shuffle(order)
        steps, best = replay(full, order, *args)
        ratios.append(steps / full["steps"])
        bests.append(best)
    ratios.sort()
    sign = 1 if full["select"][1] == "max" else -1
    out["random"] = {"orders": orders, "median": statistics.median(ratios), "p10": ratios[orders // 10],
                     "p90": ratios[orders * 9 // 10], "worst": ratios[-1],
                     "share_at_most_0.40": sum(r <= 0.40 for r in ratios) / orders,
                     "share_best_within_0.01": sum(sign * (full["best_value"] - b) <= 0.01 for b in bests) / orders}
    return out


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
    results = {"command": "python " + " ".join(sys.argv), "sweep": str(SWEEP.relative_to(ROOT)), "pairs": pairs,
               "replay": replays(pairs[0]["full"], pairs[0]["asha"]["started"])}
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
    rp = results["replay"]
    print(f"\nreplayed from round 0's full sweep: started as listed {rp['listed']['ratio']:.3f} of the steps, "
          f"by id (as the asha sweep did) {rp['ids']['ratio']:.3f}; over {rp['random']['orders']} random orders: median "
          f"{rp['random']['median']:.3f} (10th-90th percentile {rp['random']['p10']:.3f}-{rp['random']['p90']:.3f}, "
          f"worst {rp['random']['worst']:.3f}), at most 0.40 in {rp['random']['share_at_most_0.40']:.0%}, best within "
          f"0.01 of the full sweep's in {rp['random']['share_best_within_0.01']:.0%}")


if __name__ == "__main__":
    main()
