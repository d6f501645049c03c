"""Config loading: types, rules between fields, overrides, and the one-line CLI errors."""

from __future__ import annotations

import json

import pytest
import yaml

from qarac_dist.config import deepspeed_config, load_config
from qarac_dist.config import ConfigError
from support import ROOT, tiny_config, write_config

SHIPPED_TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "base" not in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("path", SHIPPED_TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path):
    cfg = load_config(path)
    assert cfg.name
    assert deepspeed_config(cfg, world_size=2)["train_batch_size"] == 2 * cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps


def _errors(tmp_path, data: dict, overrides=()) -> list[str]:
    path = write_config(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.errors


@pytest.mark.parametrize("section, value, expected", [
    pytest.param({"optimizer": {"lr": "fast"}}, None, "optimizer.lr: expected a number, got 'fast'", id="wrong-type"),
    pytest.param({"optimizer": {"learning_rate": 1e-3}}, None, "optimizer.learning_rate: unknown key; valid keys of optimizer: betas, eps, lr, weight_decay", id="unknown-key"),
    pytest.param({"training": {"micro_batch_size": 0}}, None, "training.micro_batch_size: expected at least 1, got 0", id="bad-bound"),
    pytest.param({"precision": {"dtype": "fp8"}}, None, "precision.dtype: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'", id="literal"),
    pytest.param({"deepspeed": {"zero_stage": 3, "config": {"train_micro_batch_size_per_gpu": 2}}}, None,
                 "deepspeed.config.train_micro_batch_size_per_gpu: 2 disagrees with training.micro_batch_size (4)", id="ds-disagrees"),
    pytest.param({"deepspeed": {"config": {"zero_optimization": {"stage": 3}}}}, None,
                 "deepspeed.config.zero_optimization.stage: 3 disagrees with deepspeed.zero_stage (2)", id="ds-stage"),
    pytest.param({"deepspeed": {"config": {"optimizer": {"type": "Adam"}}}}, None,
                 "deepspeed.config.optimizer.type: set by the optimizer: section", id="ds-optimizer"),
    pytest.param({"deepspeed": {"offload_param": True}}, None, "deepspeed.offload_param: needs deepspeed.zero_stage 3, got 2", id="offload-stage"),
    pytest.param({"evaluation": {"metric": "spearman"}}, None, "evaluation.metric: spearman is a regression metric", id="metric-task"),
    pytest.param({"data": {"train_files": ["nope.csv"], "validation_files": ["nope2.csv"], "synthetic": None}}, None,
                 "data.train_files[0]: file not found: nope.csv", id="missing-data-file"),
])
def test_config_errors_name_the_dotted_key(tmp_path, section, value, expected):
    cfg = tiny_config(tmp_path, tmp_path / "out")
    for key, values in section.items():
        cfg[key] = {**cfg.get(key, {}), **values}
    errors = _errors(tmp_path, cfg)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith(str(tmp_path / "c.yaml") + ": ") for e in errors)


def test_all_errors_are_reported_at_once(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "out", optimizer={"lr": "fast"}, training={"max_steps": "ten"})
    cfg["bogus"] = 1
    errors = _errors(tmp_path, cfg)
    assert len(errors) == 3
    assert {e.split(": ")[1] for e in errors} == {"optimizer.lr", "training.max_steps", "bogus"}


def test_overrides_set_dotted_keys_and_are_typed(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tmp_path / "out"))
    cfg = load_config(path, ["optimizer.lr=1e-4", "deepspeed.zero_stage=3", "model.activation_checkpointing=true"])
    assert cfg.optimizer.lr == 1e-4 and cfg.deepspeed.zero_stage == 3 and cfg.model.activation_checkpointing
    assert _errors(tmp_path, tiny_config(tmp_path, tmp_path / "out"), ["training.max_step=5"])[0].endswith(
        "training.max_step: unknown key; valid keys of training: global_batch_size, gradient_accumulation_steps, "
        "log_every, max_nonfinite_steps, max_steps, micro_batch_size, seed, spikes")


def test_raw_deepspeed_keys_pass_through_and_agreeing_duplicates_are_allowed(tmp_path):
    cfg_dict = tiny_config(tmp_path, tmp_path / "out", deepspeed={"config": {
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "gradient_accumulation_steps": 1}})
    cfg = load_config(write_config(tmp_path / "c.yaml", cfg_dict))
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["train_batch_size"] == 8


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_deepspeed_json_matches_golden(tmp_path, dtype):
    """The DeepSpeed JSON is a pure function of the config; fp16 carries dynamic loss scaling."""
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, tmp_path / "out", precision={"dtype": dtype, "initial_scale_power": 12},
        deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_param": True},
        training={"micro_batch_size": 2, "gradient_accumulation_steps": 4})))
    golden = ROOT / "tests" / "golden" / f"deepspeed_{dtype}.json"
    assert deepspeed_config(cfg, world_size=2) == json.loads(golden.read_text())


BAD_FILES = {
    "unknown-key": ("model:\n  config: {model_type: longformer}\ndata: {synthetic: {}}\ntraning: {}\n", "traning: unknown key"),
    "wrong-type": ("model:\n  config: {model_type: longformer}\ndata: {synthetic: {}}\noptimizer: {lr: fast}\n",
                   "optimizer.lr: expected a number, got 'fast'"),
    "python-tag": ("model: !!python/object/apply:os.system ['touch {marker}']\n", "invalid YAML"),
    "nan-as-text": ("model:\n  config: {model_type: longformer}\ndata: {synthetic: {}}\noptimizer: {lr: 'nan'}\n",
                    "optimizer.lr: expected a finite number, got nan"),
    "inf-as-text": ("model:\n  config: {model_type: longformer}\ndata: {synthetic: {}}\noptimizer: {lr: '-inf'}\n",
                    "optimizer.lr: expected a finite number, got -inf"),
}


@pytest.mark.parametrize("override, expected", [
    pytest.param("optimizer.lr=nan", "optimizer.lr: expected a finite number, got nan", id="nan"),
    pytest.param("optimizer.lr=inf", "optimizer.lr: expected a finite number, got inf", id="inf"),
    pytest.param("optimizer.lr=-1e-3", "optimizer.lr: expected more than 0, got -0.001", id="negative-as-text"),
])
def test_cli_numbers_given_as_text_get_the_checks_numbers_get(tmp_path, monkeypatch, capsys, override, expected):
    from qarac_dist.train.__main__ import main

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "cache", tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    assert main([str(path), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", [*BAD_FILES, "missing-file"])
def test_cli_bad_config_is_one_line_exit_2(tmp_path, case, monkeypatch, capsys):
    from qarac_dist.train.__main__ import main

    marker = tmp_path / "executed"
    path = tmp_path / "bad.yaml"
    if case != "missing-file":
        text, expected = BAD_FILES[case]
        path.write_text(text.replace("{marker}", str(marker)))
    else:
        expected = "file not found"
    monkeypatch.chdir(tmp_path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{path}: ") and expected in lines[0]
    assert not marker.exists(), "the !!python tag was executed"
    assert not (tmp_path / "runs").exists()
