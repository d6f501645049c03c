"""Trial configs from one base config and each trial's overrides, at thousands of trials a second.

Validating every trial's whole typed config costs about half a millisecond a trial. Most of a
sweep's trials differ in a few keys, so here a section (model, optimizer, ...) is typed and
checked once per distinct set of overrides that touch it, and shared by the trials that have
the same. Where a trial sets fields of a section directly (`optimizer.lr`), only those values
are typed, and only their JSON is rendered into the section's canonical JSON; the typed section
itself is built only when a rule reads one of the keys the sweep varies. The rules between
fields are checked in full once, and then per trial only those that read a varied key. The
trial id is hashed from the sections' canonical JSON. The result is the same as
`config_from_dict` on each trial's mapping (tests/unit/test_plan.py compares them).

Trials share the sections they do not change: treat a resolved config as read-only, and copy
a section before changing it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Callable

from ..config import ConfigError, rules
from ..config.schema import apply_overrides, build_field, field_defaults, field_types, to_dict
from ..config.sections import TrainConfig

# What a trial is, not where it writes or is tracked: left out of its id.
NOT_IDENTITY = {"output": ("dir",)}
# Fields that moved from the trial's config into the job's context (track/job_context.py). Ids
# were hashed with them as null, and still are, so the trials of a sweep planned before keep
# their ids.
MOVED_OUT = {"output": ("attempt",), "asha": ("record_dir",)}
# Fields added since sweeps were first planned: while null (off) they are not in the id, so the
# trials of a sweep planned before keep their ids.
ADDED_OFF = {"training": ("spikes",), "data": ("split_seed",)}
# The test split (config/choice.py) is no part of a trial, which never reads it: never in its id.
TEST_SPLIT = ("data", "test_files")
_IDENTITY_JSON = json.JSONEncoder(sort_keys=True, default=str)  # json.dumps(..., sort_keys=True, default=str), built once


def in_id(section: str, key: str, value: Any) -> Any:
    """A field's value as a trial's id sees it: the generated set less its test documents."""
    if section == "data" and key == "synthetic" and isinstance(value, dict) and "num_test" in value:
        return {k: v for k, v in value.items() if k != "num_test"}
    return value


def _json(value: Any) -> str:
    """`_IDENTITY_JSON.encode(value)`, with the common scalars rendered directly."""
    kind = type(value)
    if kind is float and math.isfinite(value) or kind is int:
        return kind.__repr__(value)  # what json writes for them
    return _IDENTITY_JSON.encode(value)


class _Section:
    """One section of a trial's config, typed and rendered once for every trial that shares it."""

    __slots__ = ("_value", "_build", "plain", "identity", "fields", "errors")

    def __init__(self, value: Any, plain: Any, identity: str, fields: dict[str, str] | None,
                 errors: tuple[str, ...], build: Callable[[], Any] | None = None):
        self._value, self._build = value, build
        self.plain = plain
        """The section as plain data."""
        self.identity = identity
        """Canonical JSON of the part of it that is the trial's identity."""
        self.fields = fields
        """Field -> its `"name": JSON` text in that identity, in sorted order (sections that are mappings)."""
        self.errors = errors

    @property
    def value(self) -> Any:
        """The typed section (a dataclass, or a plain value for `name`), built on first use."""
        if self._build is not None:
            self._value, self._build = self._build(), None
        return self._value


def _text(value: Any) -> str:
    """A value as a cache key: repr for plain scalars (exact for floats), JSON for the rest."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return f"{type(value).__name__}:{value!r}"
    return json.dumps(value, sort_keys=True, default=str)


class Resolver:
    def __init__(self, base: dict, variable: set[str]):
        self.base, self.variable = base, variable
        self.fields = field_types(TrainConfig)
        self.base_errors = [f"{key}: unknown key; valid keys: {', '.join(sorted(self.fields))}"
                            for key in base if key not in self.fields]
        self.sections: dict = {}
        self.order = sorted(self.fields)
        self.keys = {name: json.dumps(name) + ": " for name in self.order}
        self.position = {name: i for i, name in enumerate(self.order)}
        self.unchanged: dict[str, _Section] = {}
        self.unchanged_plain: dict[str, Any] = {}
        self.unchanged_parts: list[str] = []
        self.unchanged_errors = False
        self.constant_problems: list[str] | None = None
        self.rules: dict[tuple, list] = {}

    def resolve(self, overrides: dict) -> tuple[dict, str]:
        """The trial's config as plain data, and its id; ConfigError (without the source) if it
        does not validate."""
        if not self.unchanged:
            self.unchanged = {name: self._section(name, {}) for name in self.order}
            self.unchanged_plain = {name: s.plain for name, s in self.unchanged.items()}
            self.unchanged_parts = [self.keys[name] + s.identity for name, s in self.unchanged.items()]
            self.unchanged_errors = any(s.errors for s in self.unchanged.values())
        by_section: dict[str, dict] = {}
        for key, value in overrides.items():
            by_section.setdefault(key.partition(".")[0], {})[key] = value
        changed = {name: self._section(name, own) for name, own in by_section.items()}
        if self.base_errors or self.unchanged_errors or any(s.errors for s in changed.values()):
            sections = {**self.unchanged, **changed}
            raise ConfigError([*self.base_errors, *(e for s in sections.values() for e in s.errors)])
        names = tuple(overrides)
        chosen = self.rules.get(names)
        if chosen is None:  # trials set the same keys, so this is worked out a few times per sweep
            chosen = self.rules[names] = rules.reading(frozenset(k for k in names if k in self.variable))
        if chosen or self.constant_problems is None:
            sections = {**self.unchanged, **changed}
            cfg = TrainConfig(**{name: s.value for name, s in sections.items()})
            if self.constant_problems is None:  # rules no varying key can break: one verdict for all
                self.constant_problems = [p for r in rules.RULES if not r.touched_by(self.variable) for p in r.check(cfg)]
            problems = self.constant_problems + [p for r in chosen for p in r.check(cfg)]
        else:
            problems = self.constant_problems
        if problems:
            raise ConfigError(problems)
        plain = dict(self.unchanged_plain)
        parts = list(self.unchanged_parts)
        for name, section in changed.items():
            plain[name] = section.plain
            parts[self.position[name]] = self.keys[name] + section.identity
        tid = hashlib.sha256(("{" + ", ".join(parts) + "}").encode()).hexdigest()[:10]
        return plain, tid

    def _section(self, name: str, own: dict) -> _Section:
        if not own:
            key: Any = name
        elif len(own) == 1:
            ((k, v),) = own.items()
            key = (name, k, _text(v))
        else:
            key = (name, tuple(sorted((k, _text(v)) for k, v in own.items())))
        cached = self.sections.get(key)
        if cached is None:
            cached = self.sections[key] = self._typed(name, own)
        return cached

    def _typed(self, name: str, own: dict) -> _Section:
        hidden = NOT_IDENTITY.get(name, ())
        if own:
            base = self._section(name, {})
            changes = {k.partition(".")[2]: v for k, v in own.items()}
            if base.fields is not None and not base.errors and all(f in base.fields for f in changes):
                return self._fields_set(name, base, changes, hidden)
        errors: list[str] = []
        if own:
            raw = apply_overrides({name: self.base.get(name)}, list(own.items()))[name]
            value = build_field(TrainConfig, name, raw, errors)
        elif name in self.base:
            value = build_field(TrainConfig, name, self.base[name], errors)
        else:
            value = field_defaults(TrainConfig)[name]
        plain = to_dict(value)
        fields = None
        if isinstance(plain, dict) and dataclasses.is_dataclass(value):
            fields = {f: json.dumps(f) + ": " + ("null" if f in hidden or f not in plain else
                                                 _json(in_id(name, f, plain[f])))
                      for f in sorted([*plain, *MOVED_OUT.get(name, ())])
                      if not (f in ADDED_OFF.get(name, ()) and plain.get(f) is None) and (name, f) != TEST_SPLIT}
        if name == "tracking":
            identity = "null"
        elif fields is not None:
            identity = "{" + ", ".join(fields.values()) + "}"
        else:
            identity = _IDENTITY_JSON.encode(plain)
        return _Section(value, plain, identity, fields, tuple(errors))

    def _fields_set(self, name: str, base: _Section, changes: dict, hidden: tuple) -> _Section:
        """Fields of a section set directly (optimizer.lr): only those are typed and rendered anew."""
        errors: list[str] = []
        cls = type(base.value)
        typed = {f: build_field(cls, f, v, errors) for f, v in changes.items()}
        if errors:
            return _Section(base.value, base.plain, base.identity, None, tuple(f"{name}.{e}" for e in errors))
        plain = {**base.plain, **{f: to_dict(v) for f, v in typed.items()}}  # = to_dict(the new section), cheaper
        fields = dict(base.fields)
        for f in typed:
            if f in ADDED_OFF.get(name, ()) and plain[f] is None or (name, f) == TEST_SPLIT:
                fields.pop(f, None)
            elif f not in hidden:
                fields[f] = json.dumps(f) + ": " + _json(in_id(name, f, plain[f]))
        identity = "null" if name == "tracking" else "{" + ", ".join(fields.values()) + "}"
        return _Section(None, plain, identity, fields, (), build=lambda: dataclasses.replace(base.value, **typed))
