"""Which parameters mattered: once a sweep ends with at least six configurations finished, the
importance of each key it varied for its select metric, and a parallel-coordinates plot of the
configurations by that metric; PNGs on the parent run.

A configuration's value is its select metric, the mean over its seeds that finished with
repeats. The importances are Optuna's fANOVA (FanovaImportanceEvaluator): the share of the
metric's variance that each key explains, from a random forest fitted to the configurations and
marginalised over the other keys. It is Optuna's default, fits a grid's few points as well as a
search's many, and treats categorical keys as they are. PED-ANOVA compares the best 10% of
trials against the rest, which a sweep of six or twenty configurations does not have; the
forest's impurity decrease (MDI) favours keys with many distinct values. With few
configurations the figures are an estimate: the forest's seed is fixed, so the same sweep
draws the same plot.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional

from ..base.files import replace_with

MIN_CONFIGURATIONS = 6


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def importance(points: list[tuple[dict, float]], varied: list[str], mode: str) -> Optional[tuple[object, dict]]:
    """The in-memory Optuna study of `points` (each a configuration's params, as MLflow keeps
    them, and its value) over the params that differ among the `varied` keys (a key that varies
    a whole section: its fields), and each one's importance; None below MIN_CONFIGURATIONS, when
    no param differs, or when every configuration scored alike."""
    if len(points) < MIN_CONFIGURATIONS:
        return None
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    distributions, typed = {}, {}
    for key in sorted({k for params, _ in points for k in params if any(k == v or k.startswith(f"{v}.")
                                                                        for v in varied)}):
        given = [params.get(key, "None") for params, _ in points]  # MLflow keeps no param that is null
        if len(set(given)) < 2:
            continue
        numbers = [_number(g) for g in given]
        if None in numbers:
            distributions[key], typed[key] = CategoricalDistribution(sorted(set(given))), given
        else:
            low, high = min(numbers), max(numbers)
            distributions[key], typed[key] = FloatDistribution(low, high, log=low > 0 and high >= 10 * low), numbers
    if not distributions:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for k, (_, value) in enumerate(points):
        study.add_trial(optuna.trial.create_trial(params={key: typed[key][k] for key in distributions},
                                                  distributions=distributions, value=value))
    try:
        found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except RuntimeError:  # "zero total variance": every configuration scored alike, nothing mattered
        return None
    return study, {key: float(v) for key, v in found.items()}


def plots(study, importances: dict, target: str, sweep: str, importance_path: Path, parallel_path: Path) -> None:
    """importance.png (a bar per key) and parallel.png (Optuna's parallel coordinates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    keys = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.4 * len(keys)), dpi=110)
    bars = ax.barh(keys, [importances[k] for k in keys], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xlabel(f"share of the variance of {target} (fANOVA)")
    ax.set_title(f"sweep {sweep}: which parameters mattered, over {len(study.trials)} configurations")
    fig.tight_layout()
    replace_with(importance_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore")
        ax = plot_parallel_coordinate(study, target_name=target)
    ax.set_title(f"sweep {sweep}: configurations by {target}")
    replace_with(parallel_path, lambda tmp: ax.figure.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(ax.figure)
