"""One look at the test set (`final:`, issue 36): the test split is no part of a trial, is
generated apart, is read only when asked for, and its metrics are summed up per choice."""

from __future__ import annotations

import math

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.base.files import write_json
from qarac_dist.config import ConfigError, config_from_dict, config_to_dict
from qarac_dist.config.schema import apply_overrides
from qarac_dist.config.sweep import load_sweep
from qarac_dist.plan.expand import plan, trial_id
from qarac_dist.submit import final
from qarac_dist.submit.report import _final_line
from support import tiny_config, write_config


def _ids(tmp_path, name: str, **fields) -> list[str]:
    path = tmp_path / f"{name}.yaml"
    write_config(path, {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"),
                        "grid": {"optimizer.lr": [1e-3, 2e-3]}, "repeats": 2, **fields})
    spec, base = load_sweep(path)
    trials = plan(spec, base, str(path))
    for t in trials:  # the fast planner's ids are the definition's
        assert trial_id(config_to_dict(config_from_dict(apply_overrides(base, list(t.overrides.items())), "x"))) == t.id
    return [t.id for t in trials]


def test_a_test_split_changes_no_trial_id(tmp_path):
    """The test split is no part of a trial (no trial reads it): giving one, or another, plans
    the same trials, so adding `final:` to a sweep that ran re-runs nothing."""
    plain = _ids(tmp_path, "plain")
    assert _ids(tmp_path, "generated", set={"data.synthetic.num_test": 50}, final={"split": "test"}) == plain
    assert _ids(tmp_path, "more", set={"data.synthetic": {"num_test": 70}}) == plain
    assert _ids(tmp_path, "other", set={"data.synthetic.num_train": 97}) != plain  # what is a trial still counts
    for name in ("a.csv", "b.csv", "t.csv"):
        (tmp_path / name).write_text("text,label\na,0\nb,1\n")
    files = {"data.synthetic": None, "data.train_files": [str(tmp_path / "a.csv")],
             "data.validation_files": [str(tmp_path / "b.csv")]}
    plain = _ids(tmp_path, "files", set=files)
    assert _ids(tmp_path, "tested", set={**files, "data.test_files": [str(tmp_path / "t.csv")]}) == plain
    with pytest.raises(ConfigError, match="grid.data.test_files: the test split is no part of a trial"):
        _ids(tmp_path, "varied", set=files, grid={"data.test_files": [[str(tmp_path / "t.csv")]]})


def test_the_generated_test_split_is_drawn_after_validation_in_a_folder_of_its_own(tmp_path):
    from qarac_dist.config.sections import SyntheticConfig
    from qarac_dist.train.synthetic import generate_similarity, generate_synthetic

    for generate in (generate_synthetic, generate_similarity):
        spec = SyntheticConfig(num_train=20, num_validation=10, min_tokens=8, max_tokens=16, evidence_after=2)
        with_test = SyntheticConfig(**{**vars(spec), "num_test": 15})
        generate(spec, tmp_path / "a")
        generate(with_test, tmp_path / "b")
        generate(with_test, tmp_path / "t", ("test",))
        generate(with_test, tmp_path / "t2", ("test",))
        for split in ("train", "validation"):  # the trials' files are the same bytes with or without
            assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        assert not (tmp_path / "b" / "test.jsonl").exists() and [p.name for p in (tmp_path / "t").iterdir()] == \
            ["test.jsonl"]
        test = (tmp_path / "t" / "test.jsonl").read_text().splitlines()
        assert len(test) == 15 and (tmp_path / "t2" / "test.jsonl").read_text().splitlines() == test
        assert not set(test) & set((tmp_path / "a" / "train.jsonl").read_text().splitlines())


def test_a_trial_prepares_no_test_split_and_the_final_evaluation_does(tmp_path):
    from qarac_dist.train import data

    cfg = config_from_dict(tiny_config(tmp_path / "cache", tmp_path / "out", data={"synthetic": {
        "num_train": 24, "num_validation": 8, "min_tokens": 40, "max_tokens": 60, "evidence_after": 8, "num_classes": 2,
        "num_test": 12}}), "t")
    splits = data.prepare(cfg)
    assert splits.test is None and not data.synthetic_test_dir(cfg.data).exists()
    assert data.synthetic_dir(cfg.data).name == "synthetic-" + data._fingerprint(
        {k: v for k, v in vars(cfg.data.synthetic).items() if k != "num_test"})
    tested = data.prepare(cfg, test="test")
    assert len(tested.test) == 12 and data.synthetic_test_dir(cfg.data).is_dir()
    assert tested.tokenizer.get_vocab() == splits.tokenizer.get_vocab()  # the trials' own tokenizer


def test_the_final_evaluation_as_a_slurm_job_is_refused_in_one_line(tmp_path, monkeypatch):
    from qarac_dist.submit import cluster
    from qarac_dist.submit.executors import resolve_kind

    monkeypatch.setattr(cluster, "available", lambda: True)
    path = tmp_path / "s.yaml"
    write_config(path, {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "executor": "auto",
                        "set": {"data.synthetic.num_test": 10}, "final": {"split": "test"}})
    spec, _ = load_sweep(path)
    with pytest.raises(ConfigError, match="final: the test evaluation as a SLURM job .* is not built yet"):
        resolve_kind(spec, str(path))
    spec.final = None
    assert resolve_kind(spec, str(path)) == "slurm"


def test_the_mean_and_std_over_seeds_and_the_summary_line(tmp_path):
    one = final.summarize({"a": {"accuracy": 0.5, "loss": 1.0}})
    assert one == {"mean": {"accuracy": 0.5, "loss": 1.0}, "std": {"accuracy": None, "loss": None}}
    three = final.summarize({"a": {"accuracy": 0.5}, "b": {"accuracy": 0.7}, "c": {"accuracy": 0.6}})
    assert math.isclose(three["mean"]["accuracy"], 0.6) and math.isclose(three["std"]["accuracy"], 0.1)
    layout = SweepLayout(tmp_path)
    chosen = {"configuration": "c0ffee", "seeds": {"a": 10, "b": 20, "c": 10}, "split": "test", "data": {}}
    write_json(layout.final, {"choice": chosen, "digest": final.digest(chosen), "rows": 40,
                              "seeds": {"a": {}, "b": {}, "c": {}}, **three})

    class Best:
        id, configuration = "a", "c0ffee"

    line = _final_line(layout, "accuracy", Best())
    assert line == ("test (split 'test', 40 rows, looked at once for this choice): accuracy 0.6000 ± 0.1000 over 3 "
                    "seed(s) of configuration c0ffee")
    Best.configuration = "other"
    assert _final_line(layout, "accuracy", Best()).endswith("(an earlier choice: the current one was not evaluated)")
    assert _final_line(layout, "macro_f1", None).endswith("macro_f1 - over 3 seed(s) of configuration c0ffee (an "
                                                          "earlier choice: the current one was not evaluated)")
    for damaged in ("{", "[]", '{"choice": 3}', ""):
        layout.final.write_text(damaged)
        assert _final_line(layout, "accuracy", Best()) is None
    assert final.digest(chosen) == final.digest(dict(reversed(list(chosen.items()))))
