"""What a user writes: the training config and the sweep file, typed and validated at load time.

`load_config(path, overrides)` reads YAML (yaml_file.py), applies `dotted.key=value` overrides,
checks every field's type and range (schema.py, sections.py) and the rules between fields
(rules.py), and raises one `ConfigError` listing every problem as `file: dotted.key: what was
expected`. The DeepSpeed JSON is derived from it in deepspeed.py; the sweep file is sweep.py.

The bottom layer: imports nothing else of qarac_dist, and no torch.
"""

from __future__ import annotations

import os

from . import rules
from .deepspeed import deepspeed_config
from ..base.errors import ConfigError, UserError
from .schema import apply_overrides, build, parse_overrides, to_dict
from .sections import TrainConfig
from .yaml_file import read_yaml

__all__ = ["ConfigError", "TrainConfig", "UserError", "config_from_dict", "config_to_dict", "deepspeed_config",
           "load_config", "read_yaml"]


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a training config; raises ConfigError naming file and keys."""
    return config_from_dict(read_yaml(path), str(path), overrides)


def config_from_dict(data: dict, source: str, overrides: list[str] = ()) -> TrainConfig:
    if overrides:
        data = apply_overrides(data, parse_overrides(list(overrides)))
    errors: list[str] = []
    cfg = build(TrainConfig, data, "", errors)
    if not errors:
        errors = rules.check(cfg)
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return to_dict(cfg)
