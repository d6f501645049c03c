"""Typed YAML: build dataclasses from plain dicts, collecting every error with its dotted key.

Shared by the training config and the sweep file. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class UserError(ValueError):
    """A mistake the user can fix (a config value, a missing column): printed as one line, exit 2."""


class ConfigError(UserError):
    """One or more user mistakes in a config, each naming where it is: `file: dotted.key: what`."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with `yaml.safe_load`, so tags such as `!!python/object` are never run."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}: "
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}: {where}invalid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `dotted.key=value` arguments; values are YAML scalars or flow collections."""
    parsed, errors = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"command line: {item!r}: expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    if errors:
        raise ConfigError(errors)
    return parsed


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Return a copy of `data` with each dotted key set; intermediate mappings are created."""
    data = plain_copy(data)
    errors = []
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"command line: {key}: {'.'.join(parts[: i + 1])} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; append `key: message` to errors on mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            converted = _convert(value, arg, key, trial)
            if not trial:
                return converted
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return tp()
        return build(tp, value, key, errors)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return []
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept any string float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> tuple[dict, dict]:
    """Annotations and init fields of a dataclass (cached: planning validates thousands of trials)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls) if f.init}


def build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from `data`, appending every problem to `errors`."""
    hints, fields = _schema(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            errors.append(f"{dotted}: unknown key; valid keys{' of ' + prefix if prefix else ''}: "
                          + ", ".join(sorted(fields)))
            continue
        kwargs[key] = _convert(value, hints[key], dotted, errors)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix + '.' if prefix else ''}{name}: required")
    try:
        return cls(**kwargs)
    except TypeError:  # a required field is missing: already reported above
        return None


def field_types(tp: Any) -> Optional[dict[str, Any]]:
    """Field name -> annotation of a dataclass (also inside Optional[...]); None for other types."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    if dataclasses.is_dataclass(tp):
        return _schema(tp)[0]
    return None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts and lists (for YAML/JSON dumps and hashing)."""
    fields = getattr(type(obj), "__dataclass_fields__", None)
    if fields is not None:
        return {name: to_dict(getattr(obj, name)) for name in fields}
    return plain_copy(obj, to_dict)


def plain_copy(obj: Any, convert=None) -> Any:
    """Copy nested dicts and lists of plain values (faster than copy.deepcopy for config data)."""
    convert = convert or plain_copy
    if isinstance(obj, dict):
        return {k: convert(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [convert(v) for v in obj]
    return obj


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out
