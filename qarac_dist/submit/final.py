"""One look at the test set (the sweep file's `final:`, config/choice.py): once the sweep has
ended with a choice, each best model of the chosen configuration (one per seed that finished)
is evaluated on the test split, in a process of its own (train/final.py), and the mean and
standard deviation over them go on the parent run and into the summary.

It looks once per choice: `final.json` in the sweep directory (base/layout.py) holds the choice
it evaluated (the configuration, its seeds and their best steps, the split and its data), and a
re-run that chooses the same evaluates nothing. The file is written whole (atomic rename): a
killed evaluation leaves the earlier one or none. Locally it runs after the last trial, on the
driver's machine; with SLURM (a job depending on the sweep's arrays) it is not built yet.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import subprocess
import sys
from typing import Optional

from ..base.files import DamagedFile, read_json, write_json
from ..base.layout import SweepLayout
from ..config.choice import Final
from .report import rows
from .sweep_dir import DONE, Manifest


def choice(manifest: Manifest, final: Final) -> Optional[dict]:
    """What the final evaluation tests: the chosen configuration's seeds that finished (trial id
    -> the step of its best model), with the split and its data; None without a choice."""
    table_rows, best_id = rows(manifest)
    if best_id is None:
        return None
    configuration = manifest.trials[best_id].configuration or best_id
    seeds = {row.record.id: row.best_step for row in table_rows
             if (row.record.configuration or row.record.id) == configuration and row.record.state in DONE
             and not row.record.retired and row.value is not None and math.isfinite(row.value)}
    data = manifest.trials[best_id].config.get("data") or {}
    test_data = {k: data.get(k) for k in ("dataset", "dataset_config", "test_files")}
    test_data["num_test"] = (data.get("synthetic") or {}).get("num_test")
    return {"configuration": configuration, "seeds": seeds, "split": final.split, "data": test_data}


def evaluate(final: Final, manifest: Manifest, layout: SweepLayout,
             python: tuple = (sys.executable,)) -> Optional[dict]:
    """The test metrics of the sweep's choice: evaluated now, or read from `final.json` when
    this choice was evaluated before; None when there is no choice or the evaluation failed
    (said in one line)."""
    chosen = choice(manifest, final)
    if chosen is None:
        print("qarac_dist: final: the sweep chose no configuration; the test split was not read", file=sys.stderr)
        return None
    try:
        before = read_json(layout.final)
    except DamagedFile as err:
        print(f"qarac_dist: final: {err}; evaluating again", file=sys.stderr)
        before = None
    if isinstance(before, dict) and before.get("choice") == chosen:
        return before
    request = {"split": final.split, "trials": [{"id": tid, "config": manifest.trials[tid].config,
                                                 "best": str(manifest.trials[tid].trial_dir.best)}
                                                for tid in sorted(chosen["seeds"])]}
    try:
        proc = subprocess.run([*python, "-m", "qarac_dist.train.final"], input=json.dumps(request),
                              capture_output=True, text=True)
    except KeyboardInterrupt:  # the evaluation got the terminal's SIGINT too; nothing was written
        print("qarac_dist: final: interrupted; the test split was not evaluated (the next run evaluates it)",
              file=sys.stderr)
        return None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("qarac_dist:")] or \
            proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        print(f"qarac_dist: final: the evaluation on {final.split!r} failed: {lines[-1]}", file=sys.stderr)
        return None
    out = json.loads(proc.stdout)
    result = {"choice": chosen, "digest": digest(chosen), "rows": out["rows"], "seeds": out["metrics"],
              **summarize(out["metrics"])}
    write_json(layout.final, result)
    return result


def digest(chosen: dict) -> str:
    """A short name of a choice: the parent run's tag `final_choice` once its metrics are logged."""
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def summarize(per_seed: dict[str, dict[str, float]]) -> dict:
    """Mean and sample standard deviation (None below two seeds) of each metric over the seeds."""
    names = sorted({k for metrics in per_seed.values() for k in metrics})
    values = {k: [m[k] for m in per_seed.values() if k in m] for k in names}
    return {"mean": {k: statistics.fmean(v) for k, v in values.items()},
            "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in values.items()}}
