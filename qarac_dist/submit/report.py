"""What the sweep and status commands print about trials: the live progress table, and the
summary with the best trial marked (chosen in the same order as on the MLflow parent run) and
what the sweep used (track/usage.py)."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from ..base.layout import SweepLayout
from ..base.files import DamagedFile, read_json
from ..track.best import BY_CONFIGURATION, TIE_ORDER, Candidate, Configuration, best_configuration, choose, \
    configurations
from ..track.trial_dir import TrialDir
from ..track.usage import Used, summary_line, used
from . import cluster
from .sweep_dir import DONE, RUNNING_STATES, Manifest, TrialRecord


@dataclass
class Row:
    record: TrialRecord
    rung: Optional[int]
    """PRUNED: the rung the trial stopped at."""
    restarts: int
    last_step: Optional[int]
    value: Optional[float]
    """The select metric at the trial's best validation."""
    loss: Optional[float]
    best_step: Optional[int]
    stopped_at: Optional[int] = None
    """PREEMPTED: the step it stopped and saved at."""
    resumed_from: Optional[int] = None
    """The step the current job resumed from."""
    rollbacks: int = 0
    """Loss-spike rollbacks the trial made (training.spikes)."""

    def cells(self, metric_digits: int = 4) -> list[str]:
        r = self.record
        history = "; ".join(f"attempt {a.attempt}: {a.state}" + (f" ({a.error})" if a.error else "")
                            for a in r.history if a.state not in DONE)
        error = " | ".join(filter(None, [r.error or "", f"earlier {history}" if history else ""]))
        state = r.state
        if r.state == "PRUNED" and self.rung is not None:
            state = f"PRUNED at rung {self.rung}"
        elif r.state == "PREEMPTED" and self.stopped_at is not None:
            state = f"interrupted at step {self.stopped_at}"  # it saved there; a re-run resumes it
        elif r.state in ("RUNNING", "PENDING") and self.resumed_from is not None:
            state = f"{r.state} (resumed at step {self.resumed_from})"
        if self.rollbacks:
            state += f" [{self.rollbacks} rollback{'s' if self.rollbacks > 1 else ''}]"
        return [r.id, r.label, state, r.step or r.job_id or "-", str(r.attempt), str(self.restarts),
                str(self.last_step) if self.last_step is not None else "-",
                f"{self.value:.{metric_digits}f}" if self.value is not None else "-", error]


COLUMNS = ("trial", "config", "state", "job", "attempt", "restarts", "last step")
"""`job`: the SLURM job (`<array>_<task>`, or a local pid), or in a packed job the step that
runs the trial (`<array>_<task>.<step>`, as squeue -s shows it)."""


def rows(manifest: Manifest) -> tuple[list[Row], Optional[str]]:
    """One row per trial, by trial id (those no longer in the sweep file last), and the best
    trial's id (never one of those)."""
    out = []
    for r in sorted(manifest.trials.values(), key=lambda r: (r.retired, r.id)):
        status = r.trial_dir.status_of(r.attempt)
        info = r.trial_dir.best_info() or {}
        metrics = info.get("metrics", {})
        out.append(Row(r, status.rung if status else None, max(0, status.starts - 1) if status else 0,
                       r.trial_dir.last_step(),
                       metrics.get(manifest.select_metric), metrics.get("loss"), info.get("step"),
                       status.step if status else None, status.resumed_from if status else None,
                       _rollbacks(r.trial_dir)))
    best = choose(_candidates(out), manifest.select_mode, manifest.seeds())
    return out, best.trial_id if best else None


def _candidates(table_rows: list[Row]) -> list[Candidate]:
    return [Candidate(row.record.id, row.value, row.loss, row.best_step, row.record.configuration)
            for row in table_rows if row.record.state in DONE and not row.record.retired]


def _rollbacks(trial: TrialDir) -> int:
    try:
        return len(trial.rollbacks())
    except DamagedFile:  # the trial's job fails on it, and says so in its error
        return 0


def progress_table(manifest: Manifest):
    from rich.table import Table
    from rich.text import Text

    table_rows, _ = rows(manifest)
    done = sum(row.record.state in DONE for row in table_rows)
    table = Table(title=Text(f"sweep {manifest.sweep}: {done}/{len(table_rows)} ended"))
    for col in (*COLUMNS, f"best {manifest.select_metric}"):
        table.add_column(col)
    for row in _apart(table, table_rows):
        table.add_row(*map(Text, row.cells()[:8]))  # as text: error lines hold brackets, not markup
    return table


def _apart(table, rows: list[Row]):
    """The rows, with a line above the first trial no longer in the sweep file."""
    apart = False
    for row in rows:
        if row.record.retired and not apart:
            table.add_section()
            apart = True
        yield row


def print_summary(manifest: Manifest, layout: SweepLayout) -> Optional[str]:
    """The summary table; returns the best trial's id."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table_rows, best_id = rows(manifest)
    table = Table(title=Text(f"sweep {manifest.sweep} ({manifest.executor}); * marks the best trial"))
    for col in ("", *COLUMNS, f"best {manifest.select_metric}", "error"):
        table.add_column(col)
    for row in _apart(table, table_rows):
        best = row.record.id == best_id
        table.add_row("*" if best else "", *map(Text, row.cells()), style="bold green" if best else None)
    console = Console(width=200)
    console.print(table)
    seeds = manifest.seeds()
    if seeds:
        console.print(_configuration_table(manifest, table_rows, seeds))
    if best_id:
        best = next(row for row in table_rows if row.record.id == best_id)
        console.print(f"best trial: {best_id} [{best.record.label}] {manifest.select_metric}={best.value:.4f} "
                      f"(at step {best.best_step})  model: {best.record.trial_dir.best}", markup=False,
                      highlight=False, soft_wrap=True)
        order = BY_CONFIGURATION if seeds else TIE_ORDER
        console.print(f"best = {manifest.select_mode} {manifest.select_metric}; {order}", markup=False,
                      highlight=False, soft_wrap=True)
    final_line = _final_line(layout, manifest.select_metric, manifest)
    if final_line:
        console.print(final_line, markup=False, highlight=False, soft_wrap=True)
    retired = sum(row.record.retired for row in table_rows)
    if retired:
        console.print(f"{retired} trial(s) below the line are no longer in the sweep file: shown, never chosen best "
                      f"(back in the file, back in the running)", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{summary_line(usage_of(manifest, layout), manifest.requested)}", markup=False, highlight=False,
                  soft_wrap=True)
    if layout.asha.is_dir():
        pruned = sum(row.record.state == "PRUNED" for row in table_rows)
        console.print(f"successive halving: {pruned} trial(s) stopped at a rung; rung table {layout.asha_table}, "
                      f"plot {layout.asha_curves}", markup=False, highlight=False, soft_wrap=True)
    return best_id


def chosen_seeds(manifest: Manifest) -> tuple[Optional[str], dict[str, Optional[int]]]:
    """The chosen configuration and its seeds that finished with a score (trial id -> the step
    of its best model): what a final evaluation tests (submit/final.py)."""
    table_rows, best_id = rows(manifest)
    if best_id is None:
        return None, {}
    configuration = manifest.trials[best_id].configuration or best_id
    return configuration, {row.record.id: row.best_step for row in _scored(table_rows)
                           if (row.record.configuration or row.record.id) == configuration}


def _scored(table_rows: list[Row]) -> list[Row]:
    return [row for row in table_rows if row.record.state in DONE and not row.record.retired and
            row.value is not None and math.isfinite(row.value)]


def digest(value: dict) -> str:
    """A short name of a choice (the parent run's tag `final_choice`), or of a test split."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def split_digest(chosen: dict) -> str:
    """A short name of how a choice is tested: the split's name and its data as the sweep file
    gave them, and whether its seeds are trained again first (final.retrain)."""
    return digest({"split": chosen["split"], "data": chosen.get("data"), **({"retrain": True} if chosen.get("retrain")
                                                                           else {})})


def of_choice(results: list[dict], manifest: Manifest) -> list[dict]:
    """The final evaluations of the sweep's choice: its configuration and seeds as the trials stand
    now, tested as the sweep file last said (Manifest.final_split: the split, its data, retrain)."""
    configuration, seeds = chosen_seeds(manifest)
    return [r for r in results if r["choice"]["configuration"] == configuration and r["choice"].get("seeds") == seeds
            and manifest.final_split in (None, split_digest(r["choice"]))]


def final_results(layout: SweepLayout) -> list[dict]:
    """The results final.json holds (submit/final.py), none without one; DamagedFile when it is
    damaged or not ours."""
    try:
        results = (read_json(layout.final) or {}).get("results", [])
    except OSError as err:  # a directory, unreadable
        raise DamagedFile(f"{layout.final}: {err.strerror}") from None
    if not isinstance(results, list) or not all(_final_result(r) for r in results):
        raise DamagedFile(f"{layout.final}: not a record of final evaluations")
    return results


def _final_result(r) -> bool:
    """Whether `r` is a final evaluation's result as submit/final.py writes it."""
    numbers = (int, float, type(None))
    return isinstance(r, dict) and isinstance(r.get("choice"), dict) and isinstance(r.get("digest"), str) and \
        isinstance(r.get("rows"), int) and isinstance(r.get("seeds"), dict) and \
        isinstance(r["choice"].get("configuration"), str) and isinstance(r["choice"].get("split"), str) and \
        all(isinstance(r.get(k), dict) and all(isinstance(v, numbers) and not isinstance(v, bool)
                                               for v in r[k].values()) for k in ("mean", "std"))


def _final_line(layout: SweepLayout, metric: str, manifest: Manifest) -> Optional[str]:
    """`test (split 'test', 40 rows, looked at once for this choice): accuracy 0.7125 ± 0.0150
    over 3 seed(s) of configuration c0ffee` from final.json (submit/final.py): the result of the
    current choice, else the latest one, marked as an earlier choice's; None without one."""
    try:
        results = final_results(layout)
    except DamagedFile:  # the sweep's run says so, and evaluates again
        return None
    if not results:
        return None
    current = of_choice(results, manifest)
    result = (current or results)[-1]
    chosen, mean, std = result["choice"], result["mean"].get(metric), result["std"].get(metric)
    value = "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
    line = (f"test (split {chosen['split']!r}, {result['rows']} rows, looked at once for this choice): {metric} "
            f"{value} over {len(result['seeds'])} seed(s) of configuration {chosen['configuration']}"
            + (", each trained again on train + validation" if chosen.get("retrain") else ""))
    if current:
        return line
    configuration, seeds = chosen_seeds(manifest)
    if (chosen["configuration"], chosen.get("seeds")) == (configuration, seeds):  # the split, its data or retrain
        return line + " (this choice tested otherwise than the sweep file now says, which was not evaluated)"
    return line + " (an earlier choice: the current one was not evaluated)"


def _configuration_table(manifest: Manifest, table_rows: list[Row], seeds: dict[str, int]):
    """One row per configuration: the mean ± std of the select metric over its seeds that
    finished (n of K), and the chosen one marked."""
    from rich.table import Table
    from rich.text import Text

    scored = configurations(_candidates(table_rows), seeds)
    chosen = best_configuration(scored, manifest.select_mode)
    states: dict[str, Counter] = {}
    for row in table_rows:
        if row.record.configuration in seeds and not row.record.retired:
            states.setdefault(row.record.configuration, Counter())[row.record.state] += 1
    table = Table(title=Text(f"configurations: {manifest.select_metric}, mean ± std over the seeds that finished "
                             f"(of K); * marks the chosen one"))
    for col in ("", "configuration", "config", f"{manifest.select_metric} mean ± std (n/K)", "seeds"):
        table.add_column(col)
    for c in scored:
        mark = chosen is not None and c.id == chosen.id
        table.add_row("*" if mark else "", c.id, Text(manifest.trials[c.id].label.rsplit(" seed ", 1)[0]),
                      score_text(c), ", ".join(f"{n} {state}" for state, n in sorted(states.get(c.id, {}).items())),
                      style="bold green" if mark else None)
    return table


def score_text(c: Configuration, digits: int = 4) -> str:
    """`0.8123 ± 0.0101 (3/3)`; the std is `-` below two seeds, the mean `-` with none."""
    if not c.finished:
        return f"- ({0}/{c.seeds})"
    std = f"{c.std:.{digits}f}" if c.std is not None else "-"
    return f"{c.mean:.{digits}f} ± {std} ({len(c.finished)}/{c.seeds})"


def usage_of(manifest: Manifest, layout: SweepLayout) -> Used:
    """What the sweep used: sacct's charge where SLURM keeps accounting (with the trials' clocks
    beside it, and their split by state), else the trials', retrainings' and packed jobs' clocks."""
    clocks = used([*[(r.trial_dir.usage_file, {**{a.attempt: group_of(a.state) for a in r.history},
                                                r.attempt: group_of(r.state)}, group_of(r.state))
                     for r in manifest.trials.values()],
                   *[(TrialDir(folder).usage_file, {}, "retraining") for folder in layout.retrainings()]],
                  sorted(layout.usage.glob("*.json")))
    jobs = [j for r in manifest.trials.values() for j in {*r.job_ids, *r.pack_jobs}] + manifest.retrain_jobs()
    charged = cluster.accounted(jobs) if manifest.executor == "slurm" else None
    if charged is None:
        return clocks
    split = []
    for total, seconds in zip(charged, (clocks.gpu_s, clocks.cpu_s)):
        seen = sum(seconds.values())
        if total is None:  # sacct keeps no GPUs here: the clocks' figure
            split.append(seconds)
        elif seen > total:  # the clocks' beats overshoot by at most a few seconds: sacct's total stands
            split.append(Counter({g: s * total / seen for g, s in seconds.items()}))
        else:
            split.append(Counter({**seconds, "outside": total - seen}))
    source = "sacct" if charged[0] is not None else "sacct for CPUs, the trials' clocks for GPUs (sacct keeps none)"
    return Used(split[0], split[1], source, clocks)


def group_of(state: Optional[str]) -> str:
    """Which of track/usage.py's GROUPS a trial attempt's hours go to."""
    if state in ("COMPLETED", "PRUNED"):
        return state.lower()
    if state == "PREEMPTED":  # saved and stopped; a re-run or a requeue resumes it
        return "stopped"
    return "running" if state in RUNNING_STATES else "failed"
