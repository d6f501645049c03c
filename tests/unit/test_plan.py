"""The planner: a table of sweep files and the trials they expand to."""

from __future__ import annotations

import json

import pytest
import yaml

from qarac_dist.config import ConfigError
from qarac_dist.config.sweep import load_sweep
from qarac_dist.plan import plan
from support import ROOT, tiny_config, write_config


def _sweep(tmp_path, **fields) -> dict:
    return {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), **fields}


def _plan(tmp_path, sweep: dict, overrides=()):
    path = tmp_path / "sweep.yaml"
    write_config(path, sweep)
    spec, base = load_sweep(path, list(overrides))
    return plan(spec, base, str(path))


VARIANTS = [{"name": "best", "set": {"model.config.hidden_dropout_prob": 0.5, "optimizer.weight_decay": 0.1}},
            {"name": "no hidden", "set": {"model.config.hidden_dropout_prob": 0.0, "optimizer.weight_decay": 0.1}},
            {"name": "no smoothing", "set": {"model.config.hidden_dropout_prob": 0.5, "optimizer.weight_decay": 0.0}}]


@pytest.mark.parametrize("fields, overrides, expected_count, check", [
    pytest.param({}, (), 1, lambda ts: ts[0].overrides == {}, id="no-grid"),
    pytest.param({"grid": {"optimizer.lr": [1e-3, 1e-4], "training.seed": [0, 1, 2]}}, (), 6,
                 lambda ts: {(t.config["optimizer"]["lr"], t.config["training"]["seed"]) for t in ts}
                 == {(lr, s) for lr in (1e-3, 1e-4) for s in (0, 1, 2)}, id="grid-product"),
    pytest.param({"grid": {"optimizer": {"lr": [1e-3, 1e-4]}}}, (), 2,
                 lambda ts: {t.config["optimizer"]["lr"] for t in ts} == {1e-3, 1e-4}, id="nested-grid-keys"),
    pytest.param({"variants": VARIANTS, "grid": {"optimizer.lr": [1e-3, 1e-4]}}, (), 6,
                 lambda ts: sorted(t.label for t in ts)[0] == "best optimizer.lr=0.0001", id="variants-x-grid"),
    pytest.param({"random": {"num_samples": 5, "seed": 3, "params": {
                     "optimizer.lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-2},
                     "training.micro_batch_size": {"distribution": "choice", "values": [2, 4]},
                     "optimizer.weight_decay": {"distribution": "uniform", "low": 0.0, "high": 0.1}}}}, (), 5,
                 lambda ts: all(1e-5 <= t.config["optimizer"]["lr"] <= 1e-2 and t.config["training"]["micro_batch_size"] in (2, 4)
                                for t in ts), id="random"),
    pytest.param({"grid": {"training.seed": [0, 1]}, "variants": VARIANTS[:2],
                  "random": {"num_samples": 3, "params": {"optimizer.lr": {"distribution": "uniform", "low": 1e-4, "high": 1e-3}}}},
                 (), 12, lambda ts: len({t.config["optimizer"]["lr"] for t in ts}) == 3, id="grid-x-variants-x-random"),
    pytest.param({"grid": {"optimizer.lr": [1e-3]}}, ("grid.optimizer.lr=[1e-3,2e-3,3e-3]", "set.training.max_steps=7"), 3,
                 lambda ts: all(t.config["training"]["max_steps"] == 7 for t in ts), id="cli-overrides"),
])
def test_plan_table(tmp_path, fields, overrides, expected_count, check):
    trials = _plan(tmp_path, _sweep(tmp_path, **fields), overrides)
    assert len(trials) == expected_count
    assert len({t.id for t in trials}) == expected_count
    assert check(trials)
    for t in trials:
        assert t.config["output"]["dir"] == f"runs/s/trials/{t.id}"


def test_replanning_gives_the_same_ids_and_values(tmp_path):
    sweep = _sweep(tmp_path, grid={"optimizer.lr": [1e-3, 1e-4]},
                   random={"num_samples": 2, "seed": 1, "params": {"optimizer.eps": {"distribution": "loguniform", "low": 1e-9, "high": 1e-6}}})
    first, second = _plan(tmp_path, sweep), _plan(tmp_path, sweep)
    assert [t.id for t in first] == [t.id for t in second]
    assert [t.config for t in first] == [t.config for t in second]
    other_seed = _plan(tmp_path, {**sweep, "random": {**sweep["random"], "seed": 2}})
    assert {t.id for t in other_seed}.isdisjoint({t.id for t in first})


def test_trial_id_ignores_the_sweep_name_and_output_dir(tmp_path):
    a = _plan(tmp_path, _sweep(tmp_path))
    b = _plan(tmp_path, {**_sweep(tmp_path), "name": "other"})
    assert a[0].id == b[0].id and a[0].config["output"]["dir"] != b[0].config["output"]["dir"]


@pytest.mark.parametrize("fields, expected", [
    pytest.param({"grid": {"optimizer.lr": []}}, "grid.optimizer.lr: empty list", id="empty-grid-list"),
    pytest.param({"grid": {"optimizer.lrate": [1]}}, "grid.optimizer.lrate: not a key of the training config "
                 "(optimizer.lrate: valid keys of optimizer: betas, eps, lr, weight_decay)", id="grid-key-not-in-config"),
    pytest.param({"grid": {"optimizer.lr": ["fast"]}}, "trial [optimizer.lr=fast]: optimizer.lr: expected a number, got 'fast'",
                 id="grid-value-wrong-type"),
    pytest.param({"random": {"params": {"optimizer.lr": {"distribution": "loguniform", "low": 1e-2, "high": 1e-4}}}},
                 "random.params.optimizer.lr: low (0.01) must be below high (0.0001)", id="bad-bounds"),
    pytest.param({"random": {"params": {"optimizer.lr": {"distribution": "loguniform", "low": 0, "high": 1e-4}}}},
                 "random.params.optimizer.lr.low: loguniform needs low > 0", id="loguniform-zero"),
    pytest.param({"grid": {"training.seed": list(range(40))}, "max_trials": 30},
                 "max_trials: the plan has 40 trials, over the cap of 30", id="over-cap"),
    pytest.param({"resourcez": {}}, "resourcez: unknown key; valid keys: asha, base, environment, executor, final, grid,", id="unknown-key"),
    pytest.param({"resources": {"gpus": 1}}, "resources.gpus: unknown key; valid keys of resources: account,", id="unknown-resource"),
    pytest.param({"grid": {"training.seed": [1, 2]}, "variants": [{"name": "v", "set": {"training.seed": 3}}]},
                 "training.seed: set by both variant v and grid", id="conflicting-keys"),
])
def test_bad_sweep_files(tmp_path, fields, expected):
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, _sweep(tmp_path, **fields))
    assert any(expected in e for e in info.value.errors), info.value.errors
    assert all(e.startswith(str(tmp_path / "sweep.yaml") + ": ") for e in info.value.errors)


def test_ten_thousand_trials_each_get_their_own_id_and_directory(tmp_path):
    """How fast is bench/sweep.py's business; here, what the fast path must still get right."""
    sweep = _sweep(tmp_path, grid={"optimizer.lr": [i * 1e-5 for i in range(1, 101)], "training.seed": list(range(100))},
                   max_trials=10_000)
    trials = _plan(tmp_path, sweep)
    assert len(trials) == 10_000 and len({t.id for t in trials}) == 10_000
    assert all(t.config["output"]["dir"].endswith("/trials/" + t.id) for t in trials)
    assert trials[-1].config["optimizer"]["lr"] == 100 * 1e-5 and trials[-1].config["training"]["seed"] == 99


def test_shipped_sweeps_keep_their_trial_ids():
    """The ids planned before the job's context moved out of the trial's config (golden file)."""
    expected = json.loads((ROOT / "tests" / "golden" / "trial_ids.json").read_text())
    for name, ids in expected.items():
        spec, base = load_sweep(ROOT / name)
        assert [t.id for t in plan(spec, base, name)] == ids, name


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.yaml") if "base" in yaml.safe_load(p.read_text())),
                         ids=lambda p: p.name)
def test_every_shipped_sweep_file_plans(path):
    spec, base = load_sweep(path)
    trials = plan(spec, base, str(path))
    assert trials and len({t.id for t in trials}) == len(trials)


@pytest.mark.parametrize("global_batch, expected", [
    pytest.param(None, (6, 1), id="no-global-batch: accumulation kept"),
    pytest.param(32, (4, 4), id="global-batch-32-on-2-ranks: largest divisor of 16 up to 6"),
])
def test_a_found_micro_batch_is_planned_into_matching_trials_only(tmp_path, global_batch, expected):
    from qarac_dist.plan.micro_batch import memory_key

    base = tiny_config(tmp_path / "cache", tmp_path / "out", training={"global_batch_size": global_batch,
                                                                       "micro_batch_size": 2,
                                                                       "gradient_accumulation_steps": 8 if global_batch else 1})
    sweep = {"name": "s", "base": base, "grid": {"optimizer.lr": [1e-3, 2e-3], "data.max_length": [256, 320]},
             "resources": {"tasks_per_node": 2}}
    path = tmp_path / "sweep.yaml"
    write_config(path, sweep)
    spec, base_cfg = load_sweep(path)
    before = plan(spec, base_cfg, str(path))
    long_shape = next(t for t in before if t.config["data"]["max_length"] == 320)
    found = {memory_key(long_shape.config): {"micro_batch_size": 6}}
    after = plan(spec, base_cfg, str(path), found)
    for old, new in zip(before, after):
        training = new.config["training"]
        if old.config["data"]["max_length"] == 320:
            assert (training["micro_batch_size"], training["gradient_accumulation_steps"]) == expected
            assert new.id != old.id and "found micro batch" in new.label
        else:
            assert new.id == old.id and new.config == old.config


EQUIVALENCE_CASES = [
    pytest.param(dict(grid={"optimizer.lr": [1e-3, 2e-3], "model.config.num_hidden_layers": [1, 2]},
                      variants=VARIANTS[:2], set={"training.max_steps": 7},
                      random={"num_samples": 2, "params": {"optimizer.eps": {"distribution": "loguniform", "low": 1e-9,
                                                                              "high": 1e-7}}}), 16,
                 id="variants-x-grid-x-random"),
    # Values the section fast path renders on its own: -0.0 is not 0.0 in the id, an int given
    # for a float field, a float set as text, a nested list, a key hidden from the id.
    pytest.param(dict(grid={"optimizer.weight_decay": [0.0, -0.0, 1, "2.5e-1"], "optimizer.betas": [[0.9, 0.99], [0.8, 0.9]],
                            "output.dir": ["x"]}), 8, id="scalars-lists-and-a-hidden-key"),
    pytest.param(dict(grid={"training.seed": [0, 2**32 - 1], "scheduler.warmup_steps": [0, 5]},
                      set={"data.train_split": "tr\u00e9in\u2028\"x", "tracking.experiment": "e"}), 4,
                 id="large-int-unicode-text-and-tracking"),
    pytest.param(dict(grid={"model.config": [{"model_type": "longformer", "num_hidden_layers": 1}]},
                      set={"optimizer.lr": 1e-3, "optimizer": {"lr": 2e-3}}), 1, id="whole-section-after-a-field"),
    # A field added later (training.spikes) is in the id when set, and not while null (off).
    pytest.param(dict(grid={"training.spikes": [None, {"z": 4.0}, {"window": 16}], "training.seed": [0, 1]},
                      set={"checkpointing.every_steps": 5}), 6, id="a-field-added-later-set-and-off"),
]


@pytest.mark.parametrize("fields, count", EQUIVALENCE_CASES)
def test_the_fast_planner_gives_what_validating_each_trial_in_full_gives(tmp_path, fields, count):
    """Sections typed once per distinct override, fields rendered on their own and rules checked
    by key: the same configs and ids as building every trial's whole config (`config_from_dict`)
    and hashing it."""
    from qarac_dist.config import config_from_dict, config_to_dict
    from qarac_dist.config.schema import apply_overrides
    from qarac_dist.plan.expand import trial_id

    path = tmp_path / "sweep.yaml"
    write_config(path, _sweep(tmp_path, **fields))
    spec, base = load_sweep(path)
    trials = plan(spec, base, str(path))
    assert len(trials) == count
    for t in trials:
        full = config_to_dict(config_from_dict(apply_overrides(base, list(t.overrides.items())), "x"))
        assert trial_id(full) == t.id
        full.update(name=f"s-{t.id}", output={**full["output"], "dir": f"runs/s/trials/{t.id}"})
        assert full == t.config


@pytest.mark.parametrize("override, expected", [
    pytest.param({"training.global_batch_size": [6, 8]}, "training.global_batch_size: 6 is not a multiple", id="rule"),
    pytest.param({"optimizer.lr": [1e-3, -1.0]}, "optimizer.lr: expected more than 0", id="range"),
])
def test_a_problem_of_some_trials_only_is_found_by_the_fast_planner(tmp_path, override, expected):
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, _sweep(tmp_path, grid=override))
    (line,) = info.value.errors
    assert expected in line and "trial [" in line and " more:" not in line


@pytest.mark.parametrize("select, expected", [({}, ("accuracy", "max")), ({"metric": "loss"}, ("loss", "min")),
                                              ({"metric": "macro_f1"}, ("macro_f1", "max"))],
                         ids=["the-trials-own", "loss-is-minimised", "macro-f1-is-maximised"])
def test_select_defaults_to_the_direction_its_metric_is_better_in(tmp_path, select, expected):
    """select.metric: loss without a mode took the trials' evaluation.mode (max), and so picked
    the trial of the worst loss."""
    from qarac_dist.plan import select_defaults

    spec_file = write_config(tmp_path / "s.yaml", {"name": "s", "base": tiny_config(tmp_path, tmp_path / "o"),
                                                   "select": select})
    spec, base = load_sweep(spec_file)
    assert select_defaults(spec, plan(spec, base)) == expected


def test_repeats_give_each_configuration_its_seeds_the_first_its_own(tmp_path):
    """Seed derivation: K distinct seeds per configuration, the first the configuration's own
    (its trial keeps the id a sweep without repeats gives it), stable across re-plans, and the
    same K seeds for every configuration (compared on the same inits and data orders)."""
    sweep = _sweep(tmp_path, grid={"optimizer.lr": [1e-3, 1e-4]}, set={"training.seed": 7}, repeats=3)
    trials = _plan(tmp_path, sweep)
    assert len(trials) == 6 and len({t.id for t in trials}) == 6
    single = {t.config["optimizer"]["lr"]: t.id for t in _plan(tmp_path, {**sweep, "repeats": 1})}
    by_configuration: dict = {}
    for t in trials:
        by_configuration.setdefault(t.configuration, []).append(t)
    assert set(by_configuration) == set(single.values())
    seeds = set()
    for configuration, seeded in by_configuration.items():
        assert [t.config["training"]["seed"] for t in seeded][0] == 7
        assert seeded[0].id == configuration == single[seeded[0].config["optimizer"]["lr"]]
        assert {t.config["optimizer"]["lr"] for t in seeded} == {seeded[0].config["optimizer"]["lr"]}
        assert all(t.label.endswith(f" seed {t.config['training']['seed']}") for t in seeded)
        seeds.add(tuple(t.config["training"]["seed"] for t in seeded))
    assert len(seeds) == 1 and len(set(next(iter(seeds)))) == 3
    assert [(t.id, t.configuration) for t in _plan(tmp_path, sweep)] == [(t.id, t.configuration) for t in trials]
    assert all(t.configuration is None for t in _plan(tmp_path, {**sweep, "repeats": 1}))


def test_seeds_of_a_grid_of_whole_sections_never_write_into_the_grid(tmp_path):
    """Each seed's training.seed is set below the section a grid gives whole: into the seed's
    own copy, so the next configuration starts from the grid's own values."""
    grid = [{"max_steps": 4, "micro_batch_size": 2}, {"max_steps": 6, "micro_batch_size": 2}]
    trials = _plan(tmp_path, _sweep(tmp_path, grid={"training": grid}, repeats=2))
    assert [t.overrides["training"] for t in trials] == [grid[0], grid[0], grid[1], grid[1]]
    by_configuration: dict = {}
    for t in trials:
        by_configuration.setdefault(t.configuration, []).append(t.config["training"]["seed"])
    assert len(by_configuration) == 2 and len({tuple(s) for s in by_configuration.values()}) == 1, by_configuration
    assert [t.config["training"]["max_steps"] for t in trials] == [4, 4, 6, 6]


def test_derived_seeds_are_distinct_stable_and_within_the_seed_range():
    from qarac_dist.plan.seeds import SEED_LIMIT, repeat_seeds

    assert repeat_seeds(0, 1) == [0]
    assert repeat_seeds(0, 3) == [0, 3815432832, 1046468146]  # what every plan, anywhere, derives
    for seed in (0, 1, 2**32 - 1):
        seeds = repeat_seeds(seed, 100)
        assert seeds[0] == seed and len(set(seeds)) == 100 and all(0 <= s < SEED_LIMIT for s in seeds)
        assert repeat_seeds(seed, 5) == seeds[:5]


@pytest.mark.parametrize("fields, overrides, expected", [
    pytest.param({"repeats": 0}, (), "repeats: expected at least 1, got 0", id="zero"),
    pytest.param({"repeats": 101}, (), "repeats: expected at most 100, got 101", id="past-the-bound"),
    pytest.param({"repeats": "three"}, (), "repeats: expected an integer, got 'three'", id="text"),
    pytest.param({"repeats": True}, (), "repeats: expected an integer, got True", id="bool"),
    pytest.param({"repeats": 2.5}, (), "repeats: expected an integer, got 2.5", id="float"),
    pytest.param({"repeats": 3, "grid": {"training.seed": [1, 2]}}, (),
                 "grid.training.seed: repeats (3) derives each configuration's seeds", id="seed-in-the-grid"),
    pytest.param({"repeats": 2, "variants": [{"name": "v", "set": {"training.seed": 3}}]}, (),
                 "variants[0].set.training.seed: repeats (2) derives", id="seed-in-a-variant"),
    pytest.param({"repeats": 2, "random": {"params": {"training.seed": {"distribution": "randint", "low": 0,
                                                                          "high": 9}}}}, (),
                 "random.params.training.seed: repeats (2) derives", id="seed-drawn"),
    pytest.param({"repeats": 3, "grid": {"training": [{"seed": 1, "max_steps": 4}, {"seed": 2, "max_steps": 4}]}}, (),
                 "grid.training: repeats (3) derives each configuration's seeds", id="seed-in-a-grid-of-sections"),
    pytest.param({"repeats": 2, "random": {"params": {"training": {"distribution": "choice", "values": [
        {"max_steps": 4}, {"seed": 5, "max_steps": 4}]}}}}, (),
                 "random.params.training: repeats (2) derives", id="seed-in-a-chosen-section"),
    pytest.param({"repeats": 2, "search": {"trials": 3, "params": {
        "training.seed": {"distribution": "randint", "low": 0, "high": 9}}}}, (),
                 "search.params.training.seed: repeats (2) derives", id="seed-searched"),
    pytest.param({"repeats": 3, "search": {"trials": 2, "params": {
        "optimizer.lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-2}}}}, ("max_trials=5",),
                 "max_trials: the plan has 6 trials, over the cap of 5", id="search-seeds-count-against-the-cap"),
    pytest.param({"repeats": 3, "grid": {"optimizer.lr": [1e-3, 1e-4]}}, ("max_trials=5",),
                 "max_trials: the plan has 6 trials, over the cap of 5", id="seeds-count-against-the-cap"),
    pytest.param({"repeats": 100, "grid": {"optimizer.lr": [i * 1e-5 for i in range(1, 101)]}}, (),
                 "max_trials: the plan has 10,000 trials, over the cap of 1,000", id="seeds-times-a-large-grid"),
])
def test_bad_repeats(tmp_path, fields, overrides, expected):
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, _sweep(tmp_path, **fields), overrides)
    assert any(expected in e for e in info.value.errors), info.value.errors

