"""Typed YAML: build dataclasses from plain dicts, collecting every error with its dotted key.

Shared by the training config and the sweep file. Types come from the annotations; every
number's range from `bounded(...)` on its field; floats must be finite. Nothing here imports
torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, Optional, Union

from ..base.errors import ConfigError
from .yaml_file import load_value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `dotted.key=value` arguments; values are YAML scalars or flow collections."""
    parsed, errors = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            errors.append(f"command line: {item!r}: not UTF-8 text")
            continue
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"command line: {item!r}: expected dotted.key=value")
            continue
        parsed.append((key, load_value(raw) if raw != "" else ""))
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
            node[parts[-1]] = plain_copy(value)  # a later key below it must not write into the given value
    if errors:
        raise ConfigError(errors)
    return data


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number: `ge`/`gt` below, `le`/`lt` above (None: unbounded)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def problem(self, value: Any) -> Optional[str]:
        """`expected ...` naming the bound `value` breaks; None when it is in range (or not a number)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if self.ge is not None and value < self.ge:
            return f"expected at least {_num(self.ge)}, got {value!r}"
        if self.gt is not None and value <= self.gt:
            return f"expected more than {_num(self.gt)}, got {value!r}"
        if self.le is not None and value > self.le:
            return f"expected at most {_num(self.le)}, got {value!r}"
        if self.lt is not None and value >= self.lt:
            return f"expected less than {_num(self.lt)}, got {value!r}"
        return None


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) and abs(x) >= 10_000 else f"{x:g}"


def bounded(default: Any, *, ge=None, gt=None, le=None, lt=None) -> Any:
    """A dataclass field whose number must lie in the range (checked by `build`)."""
    return dataclasses.field(default=default, metadata={"range": Range(ge, gt, le, lt)})


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
    if tp is float or tp is int or tp is str or tp is bool:  # most fields, and what sweeps vary
        return _scalar(value, tp, key, errors)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:  # Optional[X]: X's own errors, with their keys
            return _convert(value, inner[0], key, errors)
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
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def _scalar(value: Any, tp: type, key: str, errors: list[str]) -> Any:
    """`_convert` for bool, int, float and str."""
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
                value = float(value)  # then the same checks as a number: `nan`, `inf` are refused
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{key}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            errors.append(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):  # tp is str
        errors.append(f"{key}: expected a string, got {value!r}")
    return value


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
        before = len(errors)
        kwargs[key] = _convert(value, hints[key], dotted, errors)
        bounds = fields[key].metadata.get("range")
        if bounds is not None and len(errors) == before and (problem := bounds.problem(kwargs[key])):
            errors.append(f"{dotted}: {problem}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix + '.' if prefix else ''}{name}: required")
    try:
        return cls(**kwargs)
    except TypeError:  # a required field is missing: already reported above
        return None


def build_field(cls: type, name: str, value: Any, errors: list[str]) -> Any:
    """One field of dataclass `cls` from plain data: its type and range checked like `build`
    does, problems appended to `errors` under the field's name."""
    hints, fields = _schema(cls)
    before = len(errors)
    converted = _convert(value, hints[name], name, errors)
    bounds = fields[name].metadata.get("range")
    if bounds is not None and len(errors) == before and (problem := bounds.problem(converted)):
        errors.append(f"{name}: {problem}")
    return converted


def field_defaults(cls: type) -> dict[str, Any]:
    """Field name -> its default value (a fresh one for default factories) of dataclass `cls`."""
    return {name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for name, f in _schema(cls)[1].items()}


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
