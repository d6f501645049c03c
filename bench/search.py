"""Model-based search against random search, as a tabular benchmark built from real training.

1. `--train`: each configuration of a task's grid (learning rate x depth x micro batch on the
   generated long-document task; TASKS below) trained once by a real local sweep, its
   validation loss recorded every 10 steps with the seconds per step, in
   bench/results/search_grid[_<task>].json. Configurations already in that file are not
   trained again (training is deterministic).
2. The replay (default): random search, TPE, and TPE with successive halving run over those
   recorded curves through the real code: each ask goes through the sweep directory's record
   (track/search_record.py, plan/search.py: real files, the lock, the rebuilt study), each rung
   arrival through the real rung record and rule (track/rungs.py), 4 trials at once, each
   trial's arrivals timed by its recorded seconds per step. 20 seeds each. Reported: trials
   asked and training steps spent until a trial ends within 0.01 of the grid's best validation
   loss (median, 10th-90th percentile).

    python bench/search.py --task graded-176 [--train] [--space continuous]
        # 176 configurations that all learn (the 44 at micro batch 32: 15.5 minutes on 2 cores):
        # bench/results/search_replay_graded-176_<space>.json; --task graded: the first 132 of them
    python bench/search.py [--train] [--space continuous]   # the first grid, 36 configurations
    python bench/search.py --task early [--train]  # the second, learning before the rung: *_early_*.json
    python bench/search.py --task made-up-176      # no training: a smooth made-up landscape (54, 96, 176)
    python bench/search.py --task faint-176 [--train] [--space continuous]
        # the same 176 on fainter documents, 2 near the best (training: 45 minutes on 2 cores)
    python bench/search.py --task graded-176 --startup 1 [--independent-tpe] [--seeds 100]
        # TPE with another search.startup_trials, or modelling each key on its own, or more
        # seeds than 20: *_startup1*.json, *_seeds100.json
    python bench/search.py --task graded-176 --sampler gp [--workers 1] [--seeds 100]
        # Optuna's GPSampler instead of TPE (no successive halving: it learns nothing from pruned
        # trials), or one trial at a time instead of 4: *_gp*.json, *_workers1*.json

    python bench/search.py --growth   # one ask and one tell at 100 and 1,000 trials, each sampler

Also measured (--growth): one ask and one tell with 100 and 1,000 finished trials in the record
for each sampler offered, and the record's bytes per trial.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LR4 = {"optimizer.lr": [3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2], "model.config.num_hidden_layers": [1, 2, 3],
       "training.micro_batch_size": [4, 8, 16]}


class Task(NamedTuple):
    set: Optional[dict]  # the grid's sweep sets these; None: made-up curves, nothing trained
    steps: int  # each configuration trains this many
    grid: dict
    grace: int  # successive halving's first rung (reduction factor 2)
    curves: Optional[str] = None  # the task whose curves file this one shares (same set and steps)


TASKS = {
    # 2 classes; the label's words start after word 64: what learns does so after step 40, 80 steps.
    "late": Task({"data.synthetic.min_tokens": 128, "data.synthetic.max_tokens": 256,
                  "data.synthetic.evidence_after": 64, "data.max_length": 256}, 80, LR4, 40),
    # 2 classes; the label's words from the first word on, fewer of them: learning starts before
    # the rung at step 40, 60 steps (at 80, six configurations end within 0.01 of the best).
    "early": Task({"data.synthetic.min_tokens": 64, "data.synthetic.max_tokens": 128,
                   "data.synthetic.evidence_after": 0, "data.synthetic.evidence_rate": 0.1, "data.max_length": 128},
                  60, LR4, 40),
    # 4 classes, half the words from the label's list: every configuration learns from the first
    # steps, at a speed set by its learning rate, depth and batch. 60 steps; 132 configurations,
    # the learning rate in steps of about sqrt(2).
    "graded": Task({"data.synthetic.min_tokens": 64, "data.synthetic.max_tokens": 128,
                    "data.synthetic.evidence_after": 0, "data.synthetic.evidence_rate": 0.5,
                    "data.synthetic.num_classes": 4, "data.max_length": 128}, 60,
                   {"optimizer.lr": [1.0e-3, 1.4e-3, 2.0e-3, 2.8e-3, 4.0e-3, 5.6e-3, 8.0e-3, 1.1e-2, 1.6e-2, 2.3e-2,
                                     3.2e-2],
                    "model.config.num_hidden_layers": [1, 2, 3, 4], "training.micro_batch_size": [4, 8, 16]}, 20),
}
# The graded grid with micro batch 32 too, the way its best configurations point: 176
# configurations, the 132 above among them (one curves file).
TASKS["graded-176"] = TASKS["graded"]._replace(
    grid={**TASKS["graded"].grid, "training.micro_batch_size": [4, 8, 16, 32]}, curves="graded")
# The same 176 configurations on fainter documents: a quarter of the words from the label's list.
# Fewer configurations fit the validation set within 60 steps, and at a higher loss 0.01 is a
# narrower window: fewer come within it of the best.
TASKS["faint-176"] = TASKS["graded-176"]._replace(
    set={**TASKS["graded"].set, "data.synthetic.evidence_rate": 0.25}, curves="faint")
# No training: made-up curves of a smooth landscape with one best configuration, to see how the
# figures move with the grid's size (made_up() below).
for _name, _lrs, _layers, _batches in (
        ("made-up-54", [1.0e-3 * 2 ** i for i in range(6)], [1, 2, 3], [4, 8, 16]),
        ("made-up-96", [2.0e-3 * 2 ** (i / 2) for i in range(8)], [1, 2, 3, 4], [4, 8, 16]),
        ("made-up-176", [1.0e-3 * 2 ** (i / 2) for i in range(11)], [1, 2, 3, 4], [4, 8, 16, 32])):
    TASKS[_name] = Task(None, 60, {"optimizer.lr": _lrs, "model.config.num_hidden_layers": _layers,
                               "training.micro_batch_size": _batches}, 20)
TASK = "late"  # --task


def grid_file() -> Path:
    name = TASKS[TASK].curves or TASK
    return ROOT / "bench" / "results" / ("search_grid.json" if name == "late" else f"search_grid_{name}.json")


def configurations() -> list[dict]:
    """Every configuration of this task's grid."""
    return [dict(zip(grid(), values)) for values in itertools.product(*grid().values())]


def recorded() -> list[dict]:
    """The curves file's configurations that belong to this task's grid."""
    keys = {_key(p) for p in configurations()}
    return [c for c in json.loads(grid_file().read_text()) if _key(c["params"]) in keys]


def grid() -> dict:
    return TASKS[TASK].grid


MAX_STEPS, EVERY, WORKERS, SEEDS, WITHIN = 80, 10, 4, 20, 0.01
SPACE = "grid"  # or "continuous" (--space): the learning rate searched on a log scale, run as the nearest grid value
CAP = 150  # trials asked at most per search; a search that has not found the best by then counts as CAP
STARTUP = 4  # search.startup_trials: random trials before TPE models the results (Optuna's default: 10)
INDEPENDENT = False  # --independent-tpe: TPE modelling each key on its own (Optuna 5's TPE is multivariate)
SAMPLER = "tpe"  # --sampler: the model-based search set against random search (search.sampler)


def train(tmp: Path) -> None:
    """Trains the grid's configurations that the grid file does not hold yet (training is
    deterministic: a configuration recorded once on this machine is not trained again)."""
    import yaml

    done = json.loads(grid_file().read_text()) if grid_file().exists() else []  # every task's that shares it
    have = {_key(c["params"]) for c in done}
    todo = [p for p in configurations() if _key(p) not in have]
    if not todo:
        return
    spec = {"name": "search_grid", "base": str(ROOT / "configs" / "longformer_synthetic.yaml"), "executor": "local",
            "runs_dir": str(tmp / "runs"), "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
            "set": {"data.synthetic.num_train": 400, "data.synthetic.num_validation": 96,
                    "data.synthetic.num_classes": 2, **TASKS[TASK].set,
                    "training.max_steps": MAX_STEPS,
                    "training.log_every": 1, "evaluation.every_steps": EVERY, "early_stopping.patience": None,
                    "scheduler.warmup_steps": 5, "output.export_best": False},
            "variants": [{"name": f"c{i}", "set": p} for i, p in enumerate(todo)],
            "select": {"metric": "loss", "mode": "min"},
            "resources": {"max_parallel": 2, "time_min": 60}, "max_trials": len(todo)}
    path = tmp / "search_grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    # Exit code 1 here only says that no best model was exported (export_best is off): the
    # trials' states are checked below.
    subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"], cwd=tmp,
                   capture_output=True)
    from qarac_dist.submit.sweep_dir import Manifest

    configs = done
    records = Manifest.load(tmp / "runs" / "search_grid").trials.values()
    if any(r.state != "COMPLETED" for r in records) or len(records) != len(todo):
        sys.exit(f"the grid did not complete: {sorted(r.state for r in records)}")
    for r in records:
        rows = r.trial_dir.metrics()
        curve = [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
        status = r.trial_dir.status_of(r.attempt)
        seconds = (r.trial_dir.state_file.stat().st_mtime - status.started) / MAX_STEPS
        configs.append({"params": {k: r.overrides[k] for k in grid()}, "curve": curve, "seconds_per_step": seconds})
    grid_file().write_text(json.dumps(configs, indent=1) + "\n")


def made_up() -> list[dict]:
    """The grid's curves without training: the final loss is 0.007 + 0.05 log2(lr / 8e-3)^2 +
    0.02 (layers - 2)^2 + 0.1 |log2(16 / micro batch)|, one best (lr 8e-3, 2 layers, 16), every
    curve falling from 1.3 along (1 - step/60)^2; 0.25 s a step."""
    configs = []
    for values in itertools.product(*grid().values()):
        lr, layers, batch = values
        end = 0.007 + 0.05 * math.log2(lr / 8e-3) ** 2 + 0.02 * (layers - 2) ** 2 + 0.1 * abs(math.log2(16 / batch))
        configs.append({"params": dict(zip(grid(), values)), "seconds_per_step": 0.25,
                        "curve": [(s, end + (1.3 - end) * (1 - s / 60) ** 2) for s in range(EVERY, 61, EVERY)]})
    return configs


def _nearest(params: dict) -> dict:
    """The grid's configuration nearest to asked values (the learning rate on a log scale)."""
    lr = min(grid()["optimizer.lr"], key=lambda v: abs(math.log(v) - math.log(params["optimizer.lr"])))
    return {**params, "optimizer.lr": lr}


def _key(params: dict) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)


def replay(configs: list[dict], method: str, seed: int, tmp: Path) -> dict:
    """One search over the recorded curves; trials and steps until one ends within WITHIN of
    the grid's best."""
    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.config.sweep import Distribution, Search
    from qarac_dist.plan.asha import rung_steps
    from qarac_dist.plan.search import choose
    from qarac_dist.submit.search import history, previous_state
    from qarac_dist.track import rungs, search_record

    by_key = {_key(c["params"]): c for c in configs}
    best = min(min(v for _, v in c["curve"]) for c in configs)
    layout = SweepLayout(tmp / f"{method}-{seed}")
    sampler = "random" if method == "random" else SAMPLER
    GRID = grid()
    if SPACE == "continuous":  # what a user would write: values between the grid's, each run as its nearest
        params = {"optimizer.lr": Distribution("loguniform", GRID["optimizer.lr"][0], GRID["optimizer.lr"][-1]),
                  "model.config.num_hidden_layers": Distribution("randint", min(GRID["model.config.num_hidden_layers"]),
                                                                 max(GRID["model.config.num_hidden_layers"])),
                  "training.micro_batch_size": Distribution("choice", values=GRID["training.micro_batch_size"])}
    else:
        params = {k: Distribution("choice", values=v) for k, v in GRID.items()}
    search = Search(trials=1000, sampler=sampler, seed=seed, startup_trials=STARTUP, params=params)
    asha = method.endswith("+asha")
    rung_at = rung_steps(TASKS[TASK].grace, 2, MAX_STEPS) if asha else []
    clock, events, slot, steps, asked = 0.0, [], itertools.count(), 0, 0

    def start(now: float) -> None:
        nonlocal asked
        k = next(slot)

        def pick(record):
            c = choose(search, "min", history(record), previous_state(record))
            return c.params, c.state, None

        params = _nearest(search_record.ask(layout, k, f"t{k}", pick).params)
        asked += 1
        config = by_key[_key(params)]
        curve = dict(config["curve"])
        stops = [s for s in rung_at if s in curve] + [MAX_STEPS]
        heapq.heappush(events, (now + stops[0] * config["seconds_per_step"], k, 0, params))

    for _ in range(WORKERS):
        start(clock)
    while events:
        clock, k, index, params = heapq.heappop(events)
        config = by_key[_key(params)]
        curve = dict(config["curve"])
        stops = [s for s in rung_at if s in curve] + [MAX_STEPS]
        step = stops[index]
        seen = {str(s): v for s, v in config["curve"] if s <= step}
        if step < MAX_STEPS:  # a rung: the real record and rule decide
            arrival = rungs.arrive(layout, index, f"t{k}", (curve[step], curve[step]), step,
                                   lambda score, recorded: rungs.keeps_going(score, recorded, 2, "min"))
            if arrival.keeps_going:
                heapq.heappush(events, (clock + (stops[index + 1] - step) * config["seconds_per_step"], k, index + 1,
                                        params))
                continue
            steps += step
            search_record.tell(layout, k, "PRUNED", None, seen)
        else:
            steps += MAX_STEPS
            value = min(seen.values())
            search_record.tell(layout, k, "COMPLETE", value, seen)
            if value <= best + WITHIN:
                return {"trials": asked, "steps": steps, "found": True}
        if asked < CAP:
            start(clock)
    return {"trials": asked, "steps": steps, "found": False}


GROWTH = {"tpe": (100, 1000), "random": (100, 1000), "qmc": (100, 1000), "gp": (50, 100, 200)}
"""Trials in the record at which each sampler offered is timed (gp: to past its bound, GP_TRIALS)."""


def growth(tmp: Path, sampler: str, n: int) -> dict:
    """One ask and one tell through the record with `n` finished trials in it, each line as a
    sweep writes it (median of 5), and the record's bytes per trial."""
    import random

    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.config.sweep import Distribution, Search
    from qarac_dist.plan.search import choose
    from qarac_dist.submit.search import history, previous_state
    from qarac_dist.track import search_record

    layout = SweepLayout(tmp / f"growth-{sampler}-{n}")
    search = Search(trials=n + 10, sampler=sampler, seed=0, params={
        "optimizer.lr": Distribution("loguniform", 1e-4, 1e-2), "model.config.num_hidden_layers": Distribution(
            "randint", 1, 4), "training.micro_batch_size": Distribution("choice", values=[2, 4, 8])})
    rng = random.Random(0)
    state = choose(search, "min", [], None).state
    lines = []
    for k in range(n):
        params = {"optimizer.lr": 10 ** rng.uniform(-4, -2), "model.config.num_hidden_layers": rng.randint(1, 4),
                  "training.micro_batch_size": rng.choice([2, 4, 8])}
        lines.append(json.dumps({"ask": k, "trial": f"t{k}", "params": params, "state": state, "told_before": k,
                                 "time": 0.0, "run_id": None}))
        lines.append(json.dumps({"tell": k, "state": "COMPLETE", "value": rng.random(), "intermediate": {},
                                 "time": 0.0, "attempt": 1}))
    layout.root.mkdir(parents=True)
    layout.search.write_text("\n".join(lines) + "\n")
    asks, tells = [], []

    def pick(record):
        c = choose(search, "min", history(record), previous_state(record))
        return c.params, c.state, None

    for k in range(n, n + 5):
        started = time.perf_counter()
        search_record.ask(layout, k, f"t{k}", pick)
        asks.append(time.perf_counter() - started)
        started = time.perf_counter()
        search_record.tell(layout, k, "COMPLETE", 0.5, {}, 1)
        tells.append(time.perf_counter() - started)
    return {"sampler": sampler, "trials": n, "ask_s": statistics.median(asks), "tell_s": statistics.median(tells),
            "bytes_per_trial": layout.search.stat().st_size / (n + 5)}


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=10)
    return f"{statistics.median(values):g} ({q[0]:.0f}-{q[-1]:.0f})"


def main() -> None:
    global SPACE, TASK, MAX_STEPS, STARTUP, INDEPENDENT, SAMPLER, WORKERS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the grid and record its curves")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--task", choices=sorted(TASKS), default="late",
                        help="late: learning starts after step 40; early: within the first rung; graded: from "
                        "the first steps (graded-176: with micro batch 32 too; faint-176: those on fainter "
                        "documents); made-up-N: no training, a smooth landscape of N configurations")
    parser.add_argument("--space", choices=("grid", "continuous"), default="grid",
                        help="grid: each key a choice of the grid's values; continuous: the learning rate loguniform")
    parser.add_argument("--startup", type=int, default=STARTUP, help="search.startup_trials of the TPE searches")
    parser.add_argument("--workers", type=int, default=WORKERS, help="trials at once")
    parser.add_argument("--sampler", choices=("tpe", "gp"), default=SAMPLER,
                        help="the model-based search set against random search (gp: Optuna's GPSampler)")
    parser.add_argument("--growth", action="store_true",
                        help="only time one ask and one tell with 100 and 1,000 trials in the record, for each "
                        "sampler offered (gp: 50, 100, its bound, and 200): bench/results/search_growth.json")
    parser.add_argument("--independent-tpe", action="store_true",
                        help="TPE modelling each key on its own (the sweep's TPE, Optuna's default, models "
                        "them jointly)")
    args = parser.parse_args()
    SPACE, TASK, STARTUP, INDEPENDENT, SAMPLER = args.space, args.task, args.startup, args.independent_tpe, args.sampler
    WORKERS = args.workers
    if WORKERS < 1 or args.seeds < 2:
        parser.error("--workers needs at least 1 and --seeds at least 2 (a median and a spread)")
    if INDEPENDENT and SAMPLER != "tpe":
        parser.error("--independent-tpe is a setting of TPE, not of --sampler gp")
    if args.growth:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [growth(Path(tmp), sampler, n) for sampler, sizes in GROWTH.items() for n in sizes]
        (ROOT / "bench" / "results" / "search_growth.json").write_text(json.dumps(rows, indent=1) + "\n")
        print("| sampler | trials in the record | one ask | one tell | record bytes per trial |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['sampler']} | {r['trials']:,} | {r['ask_s']:.3f} s | {r['tell_s']:.3f} s | "
                  f"{r['bytes_per_trial']:,.0f} |")
        return
    if INDEPENDENT:  # the sweep's TPE models the keys jointly; this one, each on its own
        import optuna

        from qarac_dist.plan import search as chosen

        joint = chosen.new_sampler
        chosen.new_sampler = lambda s: optuna.samplers.TPESampler(
            seed=s.seed, constant_liar=True, n_startup_trials=STARTUP, multivariate=False) if s.sampler == "tpe" \
            else joint(s)
    # Optuna's GPSampler learns from finished trials only, nothing from pruned ones: no successive halving with it.
    methods = ("random", "tpe", "tpe+asha") if SAMPLER == "tpe" else ("random", SAMPLER)
    MAX_STEPS = TASKS[TASK].steps
    with tempfile.TemporaryDirectory() as tmp:
        if args.train and TASKS[TASK].set is None:
            parser.error(f"{TASK} is made up: nothing to train")
        if args.train:
            train(Path(tmp))
        configs = made_up() if TASKS[TASK].set is None else recorded()
        values = sorted(min(v for _, v in c["curve"]) for c in configs)
        near = sum(v <= values[0] + WITHIN for v in values)
        results = {"grid": {"configs": len(configs), "best": values[0], "within": near,
                            "steps": len(configs) * MAX_STEPS}}
        for method in methods:
            runs = [replay(configs, method, seed, Path(tmp)) for seed in range(args.seeds)]
            results[method] = runs
            print(f"{method}: trials {_spread([r['trials'] for r in runs])}, steps "
                  f"{_spread([r['steps'] for r in runs])}, found in {sum(r['found'] for r in runs)} of {len(runs)}",
                  file=sys.stderr)
    name = f"search_replay_{SPACE}" if TASK == "late" else f"search_replay_{TASK}_{SPACE}"
    variant = (f"_{SAMPLER}" if SAMPLER != parser.get_default("sampler") else "") + \
        (f"_workers{WORKERS}" if WORKERS != parser.get_default("workers") else "") + \
        (f"_startup{STARTUP}" if STARTUP != parser.get_default("startup") else "") + \
        ("_independent" if INDEPENDENT else "") + \
        (f"_seeds{args.seeds}" if args.seeds != parser.get_default("seeds") else "")
    name = f"{name}{variant}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(results, indent=1) + "\n")
    grid = results["grid"]
    print(f"grid: {grid['configs']} configurations, best validation loss {grid['best']:.4f}, {grid['within']} within "
          f"{WITHIN} of it, {grid['steps']} training steps in all\n")
    print("| search | trials until within 0.01 of the best: median (10th-90th) | training steps: median (10th-90th) "
          f"| found within {CAP} trials |")
    print("|---|---|---|---|")
    for method in methods:
        runs = results[method]
        print(f"| {method} | {_spread([r['trials'] for r in runs])} | {_spread([r['steps'] for r in runs])} | "
              f"{sum(r['found'] for r in runs)} of {len(runs)} |")
    ratio = statistics.median(r["trials"] for r in results[SAMPLER]) / statistics.median(
        r["trials"] for r in results["random"])
    print(f"\n{SAMPLER} / random trials (medians): {ratio:.2f} (target <= 0.5)")
    if "tpe+asha" in results:
        steps = statistics.median(r["steps"] for r in results["tpe+asha"]) / grid["steps"]
        print(f"tpe+asha steps / grid steps: {steps:.2f} (target <= 0.25)")


if __name__ == "__main__":
    main()
