"""How the sweep's records hold up as a sweep grows (issue 37): a sweep directory of N trials, each
with 200 logged steps, synthesized from one real trial's files (run here first, so every file has
exactly the shape a trial writes), for N = 100, 300, 1,000, interleaved, median of several:

1. `python -m qarac_dist.status DIR` (the whole command, as a user runs it);
2. a re-run's planning with nothing to submit: loading the sweep file, planning it, reading the
   manifest, refreshing every trial's state from its files, and finding none to run (in process);
3. one more trial's claim and its end, in a packed job's claims file of N trials, and the
   driver's save of the manifest after it (in process).

    python bench/scale.py [--sizes 100 300 1000] [--repeats 5]

4. the tracking import of all the trials' records (track/store_import.py: each trial's outbox,
   in the shape the template trial wrote it, with 200 steps of points) into a store that holds
   only the sweep's runs, as the driver made them at submit (in process; the points per second
   count the whole import, events and the parent's verdict included). `status` is timed after
   a first one, which imports the sweep (as a driver following it would have, live).

Writes bench/results/scale.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200
VALIDATE_EVERY = 20


def base_config(directory: Path) -> dict:
    return {"model": {"config": {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 16,
                                 "num_attention_heads": 2, "intermediate_size": 32}},
            "data": {"synthetic": {"num_train": 32, "num_validation": 8, "min_tokens": 16, "max_tokens": 32,
                                   "evidence_after": 8, "num_classes": 2}, "max_length": 32,
                     "cache_dir": str(directory / "data")},
            "tokenizer": {"vocab_size": 500},
            "training": {"micro_batch_size": 4, "max_steps": 4, "log_every": 1},
            "evaluation": {"every_steps": 2, "batch_size": 8},
            "tracking": {"log_model": False}}


def sweep_file(directory: Path, name: str, trials: int) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "base": base_config(directory), "executor": "local", "runs_dir": str(directory / "runs"),
        "tracking": {"uri": f"sqlite:///{directory / 'mlflow.db'}"}, "grid": {"training.seed": list(range(trials))},
        "resources": {"time_min": 5, "max_parallel": 1}}))
    return path


def template(directory: Path) -> tuple[Path, Path]:
    """One real trial, run by the sweep: its sweep directory and its trial directory."""
    path = sweep_file(directory, "template", 1)
    subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"], check=True,
                   cwd=directory, capture_output=True)
    from qarac_dist.submit.sweep_dir import Manifest

    sweep = directory / "runs" / "template"
    (record,) = Manifest.load(sweep).trials.values()
    return sweep, Path(record.output_dir)


def metrics_lines(trial: Path) -> list[str]:
    """200 steps in the shape of the template's lines: a training line each step, a validation
    line every VALIDATE_EVERY."""
    rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if "loss" in r and not any(k.startswith("val_") for k in r))
    validation = next(r for r in rows if any(k.startswith("val_") for k in r))
    out = []
    for step in range(1, STEPS + 1):
        out.append(json.dumps({**train, "step": step, "loss": 1.0 / step}))
        if step % VALIDATE_EVERY == 0:
            out.append(json.dumps({**validation, "step": step}))
    return out


def outbox_lines(trial: Path) -> str:
    """The template's outbox with 200 steps of points in its shape: its events, the points a
    training step and a validation log, and its end last (without a model to log: no best/)."""
    from qarac_dist.track.outbox import OUTBOX

    items = [json.loads(line) for line in (trial / OUTBOX).read_text().splitlines()]
    events = [i for i in items if isinstance(i, dict) and "finish" not in i]
    (finish,) = [i for i in items if isinstance(i, dict) and "finish" in i]
    rows = [json.loads(line) for line in metrics_lines(trial)]
    points = [[k, float(v) if isinstance(v, (int, float)) else 0.0, 1_700_000_000_000 + row["step"], row["step"]]
              for row in rows for k, v in row.items() if k != "step"]
    finish["finish"]["best_dir"] = None
    return "".join(json.dumps(i) + "\n" for i in [*events, *points, finish])


def synthesize(directory: Path, trials: int, sweep_template: Path, trial_template: Path) -> Path:
    """A sweep of `trials` completed trials, each with the template trial's files."""
    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.plan import plan
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    name = f"scale{trials}"
    path = sweep_file(directory, name, trials)
    spec, base = load_sweep(str(path), [])
    planned = plan(spec, base, str(path))
    sweep = directory / "runs" / name
    shutil.copytree(sweep_template, sweep, ignore=shutil.ignore_patterns("trials"))
    shutil.copy(path, sweep / "sweep.yaml") if (sweep_template / "sweep.yaml").exists() else None
    manifest = Manifest.load(sweep)
    (model,) = manifest.trials.values()
    manifest.name = name
    lines = "\n".join(metrics_lines(trial_template)) + "\n"
    outbox = outbox_lines(trial_template)
    state = json.loads((trial_template / "state.json").read_text())
    manifest.trials = {}
    for trial in planned:
        out = Path(trial.config["output"]["dir"])
        shutil.copytree(trial_template, out, ignore=shutil.ignore_patterns("checkpoints", "best", "last"))
        (out / "metrics.jsonl").write_text(lines)
        (out / "mlflow_outbox.jsonl").write_text(outbox)
        (out / "state.json").write_text(json.dumps({**state, "step": STEPS}))
        record = TrialRecord(trial.id, trial.label, trial.overrides, trial.config, str(out), "local",
                             state="COMPLETED", attempt=1, job_id=model.job_id, job_ids=list(model.job_ids),
                             mlflow_run_id=model.mlflow_run_id)
        manifest.trials[trial.id] = record
    manifest.save(sweep)
    return path


def runs_store(path: Path) -> Path:
    """A store holding the sweep's parent and a child run per trial, made as the driver makes
    them at submit (their ids into the manifest); copied afresh for each import measured."""
    from qarac_dist.submit import tracking
    from qarac_dist.submit.sweep_dir import Manifest

    sweep = path.parent / "runs" / path.stem
    manifest = Manifest.load(sweep)
    manifest.mlflow_parent_run_id = None
    for r in manifest.trials.values():
        r.mlflow_run_id = None
    tracking.ensure_runs(manifest, list(manifest.trials.values()), ["training.seed"])
    manifest.save(sweep)
    pristine = path.parent / f"{path.stem}.runs.db"
    shutil.copy(manifest.tracking_uri[len("sqlite:///"):], pristine)
    return pristine


def time_import(path: Path, store: Path) -> tuple[float, float, int]:
    """Import every trial's outbox into a copy of the runs' store: the time, the part of it
    spent on the points (reading the outboxes, writing the points), and the points."""
    from qarac_dist.submit.sweep_dir import Manifest
    from qarac_dist.track.store_import import Entry, import_outboxes

    sweep = path.parent / "runs" / path.stem
    manifest = Manifest.load(sweep)
    fresh = store.with_name(f"{path.stem}.import.db")
    shutil.copy(store, fresh)
    state = path.parent / f"{path.stem}.imported.json"  # not status's, which goes on where it was
    state.unlink(missing_ok=True)
    entries = [Entry(r.id, Path(r.output_dir), r.mlflow_run_id) for r in manifest.trials.values()]
    started = time.perf_counter()
    done = import_outboxes(f"sqlite:///{fresh}", state, entries)
    elapsed = time.perf_counter() - started
    assert done.trials == len(entries), done
    return elapsed, done.points_s, done.points


def time_status(sweep: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.status", str(sweep)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    return elapsed


def time_replan(path: Path) -> float:
    """Load, plan, read the manifest, refresh, find nothing to run: what a re-run does first."""
    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.plan import plan
    from qarac_dist.submit.executors import resolve_kind
    from qarac_dist.submit.submission import Submission
    from qarac_dist.submit.sweep_dir import layout_for, read_micro_batches

    started = time.perf_counter()
    spec, base = load_sweep(str(path), [])
    trials = plan(spec, base, str(path), read_micro_batches(layout_for(spec).root))
    submission = Submission(spec, base, trials, resolve_kind(spec, str(path)), str(path), [])
    todo = submission.to_run(submission.manifest())
    elapsed = time.perf_counter() - started
    assert todo == [], [r.id for r in todo]
    return elapsed


def time_claim(path: Path, trials: int) -> float:
    """Claims of `trials` ended trials, then one more claimed, ended, and the manifest saved."""
    from qarac_dist.submit import claims
    from qarac_dist.submit.sweep_dir import Manifest, SweepLayout

    sweep = path.parent / "runs" / path.stem
    layout = SweepLayout(sweep)
    manifest = Manifest.load(sweep)
    ids = list(manifest.trials)
    if not layout.claims.exists():
        claims._write(layout, {tid: claims.Claim(1, "9_0", 1.0, 2.0, "COMPLETED") for tid in ids[:-1]})
    last = ids[-1]
    started = time.perf_counter()
    taken = claims.take(layout, "9_1", [(last, 1)], set(), lambda jobs: set())
    claims.end(layout, "9_1", last, 1, "COMPLETED")
    manifest.save(sweep)
    elapsed = time.perf_counter() - started
    assert taken == (last, 1), taken
    claims.release(layout, "9_1", last, 1)
    data = claims.read(layout)
    data.pop(last, None)
    claims._write(layout, data)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        sweep_template, trial_template = template(directory)
        files = {n: synthesize(directory, n, sweep_template, trial_template) for n in args.sizes}
        stores = {n: runs_store(path) for n, path in files.items()}
        for path in files.values():  # the first status imports the whole sweep (the driver would have, live)
            time_status(path.parent / "runs" / path.stem)
        kinds = ("status", "replan", "claim", "import", "points")
        times: dict = {(what, n): [] for what in kinds for n in args.sizes}
        points = {}
        for _ in range(args.repeats):
            for n, path in files.items():
                times["status", n].append(time_status(path.parent / "runs" / path.stem))
                times["replan", n].append(time_replan(path))
                times["claim", n].append(time_claim(path, n))
                elapsed, points_s, points[n] = time_import(path, stores[n])
                times["import", n].append(elapsed)
                times["points", n].append(points_s)
    result = {f"{what}_{n}_s": statistics.median(v) for (what, n), v in times.items()}
    result.update({f"import_{n}_points": p for n, p in points.items()})
    result.update({f"import_{n}_points_per_s": p / result[f"import_{n}_s"] for n, p in points.items()})
    result.update({f"import_{n}_points_only_per_s": p / result[f"points_{n}_s"] for n, p in points.items()})
    out = ROOT / "bench" / "results" / "scale.json"
    out.write_text(json.dumps({"sizes": args.sizes, "repeats": args.repeats, "steps": STEPS, **result}, indent=2) + "\n")
    print("| trials | status (s) | re-run planning (s) | one more claim + manifest save (ms) | import (s) | "
          "points | points/s, whole import | points/s, reading and writing points |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        print(f"| {n} | {result[f'status_{n}_s']:.2f} | {result[f'replan_{n}_s']:.2f} | "
              f"{result[f'claim_{n}_s'] * 1e3:.1f} | {result[f'import_{n}_s']:.2f} | {points[n]:,} | "
              f"{result[f'import_{n}_points_per_s']:,.0f} | {result[f'import_{n}_points_only_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
