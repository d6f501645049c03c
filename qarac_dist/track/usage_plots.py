"""The parent run's view of what a sweep used: hours by the trials' states (usage.png), and each
trial's GPU utilisation against time from its system metrics (load.png; CPU utilisation where
no trial had a GPU)."""

from __future__ import annotations

import re
from pathlib import Path

from ..base.files import replace_with
from .usage import GROUPS

GPU_UTIL = re.compile(r"system/gpu_\d+_utilization_percentage")
CPU_UTIL = "system/cpu_utilization_percentage"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def hours_plot(metrics: dict[str, float], path: Path, sweep: str) -> Path:
    """GPU-hours and CPU-hours by group, from the parent's metrics (Used.metrics)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, kind in zip(axes, ("gpu", "cpu")):
        values = [metrics.get(f"{kind}_hours_{g}", 0.0) for g in GROUPS]
        bars = ax.bar(GROUPS, values, color=["tab:green", "tab:orange", "tab:red", "tab:blue", "grey", "tab:purple", "silver", "black"])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(f"{kind.upper()}-hours used: {metrics.get(f'{kind}_hours', 0.0):.3f}"
                     f" (at most {metrics.get(f'requested_{kind}_hours', 0.0):.3f} requested)")
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"sweep {sweep}: what its trials used, by their state")
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def load_plot(mlflow_client, children: list, path: Path, sweep: str) -> Path | None:
    """Per trial, its GPUs' mean utilisation against minutes since the sweep's first sample;
    None where no trial logged a sample."""
    keys = {c.info.run_id: sorted(k for k in c.data.metrics if GPU_UTIL.fullmatch(k)) for c in children}
    gpu = any(keys.values())
    curves = {}
    for child in children:
        names = keys[child.info.run_id] if gpu else [CPU_UTIL] if CPU_UTIL in child.data.metrics else []
        by_time: dict[int, list[float]] = {}
        for name in names:
            for m in mlflow_client.get_metric_history(child.info.run_id, name):
                by_time.setdefault(m.timestamp, []).append(m.value)
        if by_time:
            curves[child.data.tags.get("trial_id", child.info.run_id)] = sorted(
                (t, sum(v) / len(v)) for t, v in by_time.items())
    if not curves:
        return None
    first = min(points[0][0] for points in curves.values())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for trial, points in sorted(curves.items()):
        ax.plot([(t - first) / 60000 for t, _ in points], [v for _, v in points], linewidth=1.2, label=trial)
    ax.set_xlabel("minutes since the sweep's first sample")
    ax.set_ylabel("GPU utilisation, % (mean of the trial's GPUs)" if gpu else "CPU utilisation, % (no GPU)")
    ax.set_ylim(0, 105)
    ax.set_title(f"sweep {sweep}: {'GPU' if gpu else 'CPU'} load of each trial")
    if len(curves) <= 20:
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
