"""The sweep's champion (track/champion.py) in a real sqlite store and registry: one version per
sweep and choice, the alias moved when the choice changes, the parent naming the version."""

from __future__ import annotations

from qarac_dist.track.champion import ALIAS, crown
from qarac_dist.track.mlflow_client import client


def _trial(c, uri, parent: str, trial: str, log_model: bool = True) -> str:
    from qarac_dist.track import sweep_runs

    run_id = sweep_runs.create_child(uri, "e", parent, trial, {"trial_id": trial}, {})
    if log_model:
        model = c.create_logged_model(c.get_run(run_id).info.experiment_id, name="model", source_run_id=run_id)
        c.set_tag(run_id, "best_model_id", model.model_id)
    return run_id


def test_the_champion_is_registered_once_per_choice_and_its_alias_follows_the_choice(tmp_path, capsys):
    from qarac_dist.track import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    parent = sweep_runs.create_parent(uri, "e", "s", "local", {}, {})
    runs = {t: _trial(c, uri, parent, t) for t in ("a", "b")}
    runs["c"] = _trial(c, uri, parent, "c", log_model=False)
    names = {t: "lm" for t in runs}

    assert crown(uri, c, parent, names) is None  # no verdict yet
    assert c.search_registered_models() == []
    c.set_tag(parent, "best_run_id", runs["a"])
    assert crown(uri, c, parent, names) == "1"
    assert crown(uri, c, parent, names) == "1"  # closed again on the same choice: nothing new
    assert len(c.search_model_versions("name = 'lm'")) == 1
    champion = c.get_model_version_by_alias("lm", ALIAS)
    assert (str(champion.version), champion.run_id, champion.tags["trial_id"]) == ("1", runs["a"], "a")
    assert champion.source == f"models:/{c.get_run(runs['a']).data.tags['best_model_id']}"

    c.set_tag(parent, "best_run_id", runs["b"])  # a re-run changed the choice
    assert crown(uri, c, parent, names) == "2"
    assert c.get_model_version_by_alias("lm", ALIAS).tags["trial_id"] == "b"
    tags = c.get_run(parent).data.tags
    assert (tags["champion"], tags["champion_version"]) == (f"models:/lm@{ALIAS}", "models:/lm/2")
    c.set_tag(parent, "best_run_id", runs["a"])  # and back: a's version again, not a third
    assert crown(uri, c, parent, names) == "1" and len(c.search_model_versions("name = 'lm'")) == 2

    other = sweep_runs.create_parent(uri, "e", "s2", "local", {}, {})  # a later sweep of the same name takes it
    c.set_tag(other, "best_run_id", _trial(c, uri, other, "d"))
    assert crown(uri, c, other, {"d": "lm"}) == "3"
    assert crown(uri, c, parent, names) == "1"  # the first sweep closed again, its choice as before
    assert c.get_model_version_by_alias("lm", ALIAS).tags["trial_id"] == "d"  # the alias stays with the later

    c.set_tag(parent, "best_run_id", runs["c"])  # the best logged no model: said, the alias stays
    assert crown(uri, c, parent, names) is None
    assert "trial c is the sweep's best but logged no MLflow model" in capsys.readouterr().err
    assert str(c.get_model_version_by_alias("lm", ALIAS).version) == "3"
    c.set_tag(parent, "best_run_id", runs["b"])
    assert crown(uri, c, parent, {}) is None  # no register_model: nothing registered
    assert len(c.search_model_versions("name = 'lm'")) == 3


def test_the_alias_is_the_one_final_names(tmp_path):
    from qarac_dist.track import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    parent = sweep_runs.create_parent(uri, "e", "s", "local", {}, {})
    c.set_tag(parent, "best_run_id", _trial(c, uri, parent, "a"))
    assert crown(uri, c, parent, {"a": "lm"}, "prod") == "1"
    assert c.get_model_version_by_alias("lm", "prod").tags["trial_id"] == "a"
    assert ALIAS not in c.get_registered_model("lm").aliases
    assert c.get_run(parent).data.tags["champion"] == "models:/lm@prod"
    assert crown(uri, c, parent, {"a": "lm"}, "gold") == "1"  # the same choice under a new alias: it gets it
    assert str(c.get_model_version_by_alias("lm", "gold").version) == "1"
    assert c.get_run(parent).data.tags["champion"] == "models:/lm@gold"
    assert len(c.search_model_versions("name = 'lm'")) == 1
