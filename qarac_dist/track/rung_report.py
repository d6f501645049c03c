"""What successive halving did, for people: the rung table (`asha.csv`) and a plot of every
trial's validation metric over steps, pruned curves ending at their rung, the best trial marked
(`curves.png`). Both are written beside the rung records (atomically; base/layout.py) and attached to
the MLflow parent run, each time a trial ends.
"""

from __future__ import annotations

from pathlib import Path

from ..base.files import replace_with
from ..base.layout import SweepLayout
from . import rungs
from .best import Candidate, best_of
from .trial_dir import TrialDir


def table(sweep: SweepLayout) -> str:
    """A row per arrival; with repeats, a seed's row gives its configuration's decision (`waiting`
    until taken), and each configuration's decision has a row of its own: its mean, the seeds it
    is the mean of, and those that ended before the rung (`without`)."""
    rows, repeats, k = [], False, 0
    while sweep.rung(k).exists():
        record = rungs.read_record(sweep, k)
        for a in map(record.resolved, record.arrivals):
            repeats = repeats or a.configuration is not None
            decision = "waiting" if a.pending else "continue" if a.keeps_going else "stop"
            rows.append([k, a.step, a.trial, a.value, a.loss, decision, a.seen, a.configuration or "", "", ""])
        for d in record.decisions.values():
            rows.append([k, d.step, "", d.value, d.loss, "continue" if d.keeps_going else "stop", d.seen,
                         d.configuration, " ".join(d.seeds), " ".join(d.without)])
        k += 1
    columns = 10 if repeats else 7  # a sweep without repeats: the table as before
    header = ["rung", "step", "trial", "value", "loss", "decision", "recorded_before", "configuration", "mean_of",
              "without"]
    return "".join(",".join(map(str, row[:columns])) + "\n" for row in [header, *rows])


def curves(sweep: SweepLayout, metric: str) -> dict[str, list[tuple[int, float]]]:
    """Trial id -> (step, validation metric) points, from each trial's metrics.jsonl."""
    out = {}
    for trial in sorted(sweep.trials.glob("*")):
        points = [(row["step"], row[f"val_{metric}"]) for row in TrialDir(trial).metrics() if f"val_{metric}" in row]
        if points:
            out[trial.name] = points
    return out


def best_trial(sweep: SweepLayout, metric: str, mode: str) -> str | None:
    candidates = []
    for trial in sweep.trials.glob("*"):
        info = TrialDir(trial).best_info() or {}
        values = info.get("metrics", {})
        candidates.append(Candidate(trial.name, values.get(metric), values.get("loss"), info.get("step")))
    best = best_of(candidates, mode)
    return best.trial_id if best else None


def write(sweep: SweepLayout, metric: str, mode: str) -> tuple[Path, Path]:
    """The rung table and the plot; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv = sweep.asha_table
    replace_with(csv, lambda tmp: tmp.write_text(table(sweep)))
    stopped = {}
    k = 0
    while sweep.rung(k).exists():
        stopped.update({a.trial: (k, a.step) for a in rungs.read(sweep, k) if not a.keeps_going})
        k += 1
    best = best_trial(sweep, metric, mode)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for trial, points in curves(sweep, metric).items():
        steps, values = zip(*points)
        if trial == best:
            ax.plot(steps, values, color="tab:green", linewidth=2.8, marker="o", label=f"best: {trial}", zorder=3)
        elif trial in stopped:
            ax.plot(steps, values, color="tab:red", alpha=0.55, linewidth=1.2, marker="x")
        else:
            ax.plot(steps, values, color="tab:blue", alpha=0.7, linewidth=1.4, marker=".")
    rung_steps = sorted({step for _, step in stopped.values()} | {a.step for a in rungs.read(sweep, 0)})
    for step in rung_steps:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    ax.plot([], [], color="tab:red", marker="x", label="stopped at a rung")
    ax.plot([], [], color="tab:blue", marker=".", label="went on")
    ax.set_xlabel("training step (dashed: rungs)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"successive halving, sweep {sweep.root.name}: {len(stopped)} trial(s) stopped at a rung")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    png = sweep.asha_curves
    replace_with(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return csv, png
