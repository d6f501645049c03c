"""Which parameters mattered (track/importance.py): Optuna's fANOVA over a sweep's
configurations, and the parent's plots once it closes with six of them finished."""

from __future__ import annotations

import math

from qarac_dist.base.layout import SweepLayout
from qarac_dist.track.importance import importance
from qarac_dist.track.mlflow_client import client

LRS = ["0.0001", "0.0003", "0.001", "0.003"]


def _points(n_layers=(1, 2)) -> list[tuple[dict, float]]:
    """The learning rate decides the value; the layers and the optimizer's name barely do."""
    return [({"optimizer.lr": lr, "model.config.num_hidden_layers": str(layers), "optimizer.name": "adamw",
              "data.path": "a" if layers == 1 else "b"},
             0.5 + 0.1 * math.log10(float(lr) / 1e-4) + 0.001 * layers)
            for lr in LRS for layers in n_layers]


def test_the_key_that_decides_the_value_matters_most_and_keys_that_never_differ_are_left_out():
    study, found = importance(_points(), ["optimizer.lr", "model.config.num_hidden_layers", "optimizer.name",
                                          "data.path", "absent.key"], "max")
    assert set(found) == {"optimizer.lr", "model.config.num_hidden_layers", "data.path"}
    assert found["optimizer.lr"] > 0.9 and math.isclose(sum(found.values()), 1.0)
    lr = study.trials[0].distributions["optimizer.lr"]
    assert (lr.low, lr.high, lr.log) == (1e-4, 3e-3, True)  # a rate spanning decades: on a log scale
    assert study.trials[0].distributions["data.path"].choices == ("a", "b")
    assert importance(_points(), ["optimizer.lr"], "min")[1] == {"optimizer.lr": 1.0}


def test_a_whole_section_is_scored_by_its_fields_and_a_null_is_a_value():
    """A grid over `scheduler` keeps scheduler.kind, ... as params; a null value is no param."""
    points = [({"scheduler.kind": kind, "scheduler.warmup_steps": "2", **({} if patience is None else
               {"early_stopping.patience": str(patience)})}, (0.9 if kind == "cosine" else 0.5) + 0.001 * (patience or 0))
              for kind in ("linear", "cosine") for patience in (None, 1, 2)]
    study, found = importance(points, ["scheduler", "early_stopping.patience"], "max")
    assert set(found) == {"scheduler.kind", "early_stopping.patience"} and found["scheduler.kind"] > 0.9
    assert study.trials[0].distributions["early_stopping.patience"].choices == ("1", "2", "None")
    alike = [(params, 0.3125) for params, _ in points]  # every configuration scored alike: nothing mattered
    assert importance(alike, ["scheduler", "early_stopping.patience"], "max") is None


def test_below_six_configurations_or_with_nothing_that_differs_there_is_no_verdict():
    assert importance(_points()[:5], ["optimizer.lr"], "max") is None
    assert importance(_points(), ["optimizer.name"], "max") is None
    assert importance(_points(), [], "max") is None
    odd = [({"optimizer.lr": "nan" if k % 2 else "inf"}, 0.1 * k) for k in range(6)]  # not numbers: categories
    assert importance(odd, ["optimizer.lr"], "max")[0].trials[0].distributions["optimizer.lr"].choices == ("inf", "nan")


def test_a_sweep_that_closes_with_six_configurations_logs_its_importance_and_parallel_plots(tmp_path):
    from mlflow.entities import Metric

    from qarac_dist.track import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    varied = {"varied": "optimizer.lr, model.config.num_hidden_layers"}
    parent = sweep_runs.create_parent(uri, "e", "s", "local", varied, {})
    c = client(uri)
    points = _points(n_layers=(1, 2, 3))[:7]
    for k, (params, value) in enumerate(points):
        run_id = sweep_runs.create_child(uri, "e", parent, f"t{k}", {"trial_id": f"t{k}"}, params)
        c.log_batch(run_id, metrics=[Metric("best_val_accuracy", value, 0, 4)])
        c.set_terminated(run_id, "FAILED" if k == 6 else "FINISHED")  # six finished, one did not
    sweep = SweepLayout(tmp_path / "s")
    sweep.root.mkdir()
    sweep_runs.close_parent(uri, parent, "accuracy", "max", True, sweep, {}, {}, "champion")
    assert {"importance.png", "parallel.png"} <= {a.path for a in c.list_artifacts(parent)}
    assert c.get_run(parent).data.tags["param_importance"].startswith("optimizer.lr=")
    assert sweep.importance_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
