"""One look at the test set (the sweep file's `final:`, config/choice.py): once the sweep has
ended with a choice, each best model of the chosen configuration (one per seed that finished)
is evaluated on the test split, in a process of its own (train/final.py), and the mean and
standard deviation over them go on the parent run and into the summary.

It looks once per choice: `final.json` in the sweep directory (base/layout.py) holds every
choice it evaluated (the configuration, its seeds and their best steps, the split and its data
as the sweep file gives it now, with the test files' sizes and times), and a re-run that
chooses as before evaluates nothing. The file is written whole (atomic rename): a killed
evaluation leaves the earlier one or none; one that is damaged or not ours is said in a line
and evaluated again. Locally it runs after the last trial, on the driver's machine; with SLURM
(a job depending on the sweep's arrays) it is not built yet.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Optional

from ..base.files import DamagedFile, DiskFull, write_json
from ..base.layout import SweepLayout
from ..base.secrets import redact_text
from ..config.choice import Final
from .executors import stop_with_parent
from .report import chosen_seeds, final_results
from .sweep_dir import Manifest

PREFIX = "qarac_dist: final: "


def _test_data(config: dict) -> dict:
    """The test split of a trial's config, as the choice records it: a changed one is evaluated again."""
    data = config.get("data") or {}
    files = [[f, *([os.stat(f).st_size, os.stat(f).st_mtime_ns] if os.path.isfile(f) else [])]
             for f in data.get("test_files") or []]
    return {"dataset": data.get("dataset"), "dataset_config": data.get("dataset_config"), "test_files": files,
            "num_test": (data.get("synthetic") or {}).get("num_test")}


def choice(manifest: Manifest, final: Final, configs: dict[str, dict]) -> Optional[dict]:
    """What the final evaluation tests: the chosen configuration's seeds that finished (trial id
    -> the step of its best model), with the split and its data as `configs` (trial id -> its
    config as the sweep file plans it now) give them; None without a choice."""
    configuration, seeds = chosen_seeds(manifest)
    if not seeds:
        return None
    first = configs.get(min(seeds)) or manifest.trials[min(seeds)].config
    return {"configuration": configuration, "seeds": seeds, "split": final.split, "data": _test_data(first)}


def _stored(layout: SweepLayout) -> list[dict]:
    """The results final.json holds; none (said in a line) when it is damaged or not ours."""
    try:
        return final_results(layout)
    except DamagedFile as err:
        print(f"{PREFIX}{err}; evaluating again", file=sys.stderr)
        return []


def evaluate(final: Final, manifest: Manifest, layout: SweepLayout, configs: dict[str, dict],
             python: tuple = (sys.executable,)) -> Optional[dict]:
    """The test metrics of the sweep's choice: evaluated now, or read from `final.json` when
    this choice was evaluated before; None when there is no choice or the evaluation failed
    (said in one line)."""
    chosen = choice(manifest, final, configs)
    if chosen is None:
        print(f"{PREFIX}the sweep chose no configuration; the test split was not read", file=sys.stderr)
        return None
    stored = _stored(layout)
    done = [r for r in stored if r["choice"] == chosen]
    if done:
        if stored[-1] is not done[0]:  # the latest is the current choice's: the summary shows it
            _keep(layout, [r for r in stored if r is not done[0]] + done[:1])
        return done[0]
    request = {"split": final.split, "trials": [{"id": tid, "config": configs.get(tid, manifest.trials[tid].config),
                                                 "best": str(manifest.trials[tid].trial_dir.best)}
                                                for tid in sorted(chosen["seeds"])]}
    try:
        proc = subprocess.run([*python, "-m", "qarac_dist.train.final"], input=json.dumps(request),
                              capture_output=True, text=True, preexec_fn=stop_with_parent)
    except KeyboardInterrupt:  # the evaluation got the terminal's SIGINT too; nothing was written
        print(f"{PREFIX}interrupted; the test split was not evaluated (the next run evaluates it)", file=sys.stderr)
        return None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)] or \
            proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        print(f"{PREFIX}the evaluation on {final.split!r} failed: {redact_text(lines[-1].removeprefix(PREFIX))}",
              file=sys.stderr)
        return None
    out = json.loads(proc.stdout)
    result = {"choice": chosen, "digest": digest(chosen), "rows": out["rows"], "seeds": out["metrics"],
              **summarize(out["metrics"])}
    _keep(layout, [*stored, result])
    return result


def _keep(layout: SweepLayout, results: list[dict]) -> None:
    try:
        write_json(layout.final, {"results": results})
    except (OSError, DiskFull) as err:  # shown and on the parent run; the next run evaluates again
        print(f"{PREFIX}could not keep the result in {layout.final}: {err}", file=sys.stderr)


def digest(chosen: dict) -> str:
    """A short name of a choice: the parent run's tag `final_choice` once its metrics are logged."""
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def summarize(per_seed: dict[str, dict[str, float]]) -> dict:
    """Mean and sample standard deviation (None below two seeds) of each metric over the seeds."""
    names = sorted({k for metrics in per_seed.values() for k in metrics})
    values = {k: [m[k] for m in per_seed.values() if k in m] for k in names}
    return {"mean": {k: statistics.fmean(v) if all(math.isfinite(x) for x in v) else math.nan
                     for k, v in values.items()},
            "std": {k: statistics.stdev(v) if len(v) > 1 and all(math.isfinite(x) for x in v) else None
                    for k, v in values.items()}}
