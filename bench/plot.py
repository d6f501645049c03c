"""PNG bar charts from the JSON that the bench scripts write in bench/results/.

    python bench/plot.py            # every chart whose JSON is there

- results/peers.json (bench/peers.py) -> results/peers.png: step time, time to first step and
  peak memory per system; bars are medians over rounds, whiskers the fastest and slowest round.
- results/peers_gpu.json (bench/peers.py --gpu) -> results/peers_gpu.png, the same on a GPU.
- results/trainer.json (bench/trainer.py) -> results/trainer.png: qarac_dist's step against a
  minimal DeepSpeed loop, and activation memory with and without checkpointing.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = {"qarac_dist": "#2a6f97", "hf_trainer": "#e09f3e", "lightning": "#9e2a2b"}


def bars(ax, labels: list[str], values: list[float], spans: list[tuple[float, float]] | None, title: str,
         unit: str) -> None:
    colours = [COLOURS.get(label, "#6c757d") for label in labels]
    errors = None
    if spans:
        errors = [[v - lo for v, (lo, _) in zip(values, spans)], [hi - v for v, (_, hi) in zip(values, spans)]]
    ax.bar(labels, values, color=colours, yerr=errors, capsize=4)
    for x, v in enumerate(values):
        top = spans[x][1] if spans else v  # above the whisker
        ax.annotate(f"{v:.0f}" if v >= 100 else f"{v:.3g}", (x, top), ha="center", va="bottom", xytext=(0, 3),
                    textcoords="offset points", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    ax.tick_params(axis="x", labelsize=8)
    ax.margins(y=0.15)


def peers(path: Path) -> Path:
    results = json.loads(path.read_text())
    systems = results["systems"]
    names = list(systems)
    gpu = systems[names[0]].get("peak_gpu_mib") is not None

    def spread(key: str) -> list[tuple[float, float]]:
        return [(min(r[key] for r in systems[n]["runs"]), max(r[key] for r in systems[n]["runs"])) for n in names]

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    bars(axes[0], names, [systems[n]["step_s"] for n in names], spread("step_s"), "steady-state step time", "s")
    bars(axes[1], names, [systems[n]["first_step_s"] for n in names], spread("first_step_s"),
         "process start to first step", "s")
    memory = [systems[n]["peak_gpu_mib"] if gpu else systems[n]["peak_rss_mib"] for n in names]
    bars(axes[2], names, memory, None, "peak GPU memory" if gpu else "peak RSS per rank (largest rank)", "MiB")
    where = results["device"] if gpu else f"{results['ranks']} CPU ranks"
    fig.suptitle(f"Same job three ways: demo Longformer, ZeRO-2, {where}, {results['rounds']} rounds of "
                 f"{results['steps']} steps", fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def trainer(path: Path) -> Path:
    results = json.loads(path.read_text())
    overhead, ckpt = results["overhead"], results["checkpointing"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    bars(axes[0], ["qarac_dist loop", "minimal loop"], [overhead["ours_step_s"], overhead["minimal_step_s"]], None,
         "step time (median)", "s")
    bars(axes[1], ["no checkpointing", "checkpointing"],
         [ckpt["saved_bytes_plain_4096"] / 2**20, ckpt["saved_bytes_ckpt_4096"] / 2**20], None,
         "activations saved for backward, 4096 tokens", "MiB")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    charts = {"peers.json": peers, "peers_gpu.json": peers, "trainer.json": trainer}
    for name, draw in charts.items():
        if (RESULTS / name).exists():
            print(draw(RESULTS / name).relative_to(RESULTS.parents[1]))


if __name__ == "__main__":
    main()
