"""Trial configs from one base config and each trial's overrides, at thousands of trials a second.

Validating every trial's whole typed config costs about half a millisecond a trial. Most of a
sweep's trials differ in a few keys, so here a section (model, optimizer, ...) is typed and
checked once per distinct set of overrides that touch it, and shared by the trials that have
the same; the rules between fields are checked in full once, and then per trial only those
that read a key the sweep varies. The trial id is hashed from the sections' canonical JSON,
each rendered once. The result is the same as `config_from_dict` on each trial's mapping
(tests/unit/test_plan.py compares them).

Trials share the sections they do not change: treat a resolved config as read-only, and copy
a section before changing it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, rules
from ..config.schema import apply_overrides, build_field, field_defaults, field_types, to_dict
from ..config.sections import TrainConfig

# What a trial is, not where it writes or is tracked: left out of its id.
NOT_IDENTITY = {"output": ("dir", "attempt"), "asha": ("record_dir",)}
_IDENTITY_JSON = json.JSONEncoder(sort_keys=True, default=str)  # json.dumps(..., sort_keys=True, default=str), built once


@dataclass(frozen=True)
class _Section:
    value: Any
    """The typed section (a dataclass, or a plain value for `name`)."""
    plain: Any
    """The same as plain data."""
    identity: str
    """Canonical JSON of the part of it that is the trial's identity."""
    errors: tuple[str, ...]


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
        self.constant_problems: list[str] | None = None
        self.order = sorted(self.fields)
        self.keys = {name: json.dumps(name) + ": " for name in self.order}
        self.unchanged: dict | None = None
        self.unchanged_parts: list[str] | None = None
        self.position = {name: i for i, name in enumerate(self.order)}

    def resolve(self, overrides: dict) -> tuple[TrainConfig, dict, str]:
        """The typed config, its plain form and its id; ConfigError (without the source) if
        it does not validate."""
        by_section: dict[str, dict] = {}
        for key, value in overrides.items():
            by_section.setdefault(key.split(".", 1)[0], {})[key] = value
        if self.unchanged is None:
            self.unchanged = {name: self._section(name, {}) for name in self.order}
        sections = dict(self.unchanged)
        for name, own in by_section.items():
            sections[name] = self._section(name, own)
        errors = [*self.base_errors, *(e for s in sections.values() if s.errors for e in s.errors)]
        if errors:
            raise ConfigError(errors)
        cfg = TrainConfig(**{name: s.value for name, s in sections.items()})
        if self.constant_problems is None:  # rules no varying key can break: their verdict is the same for all
            self.constant_problems = [p for r in rules.RULES if not r.touched_by(self.variable) for p in r.check(cfg)]
        problems = self.constant_problems + rules.check(cfg, touched=[k for k in overrides if k in self.variable])
        if problems:
            raise ConfigError(problems)
        if self.unchanged_parts is None:
            self.unchanged_parts = [self.keys[name] + self.unchanged[name].identity for name in self.order]
        parts = list(self.unchanged_parts)
        for name in by_section:
            parts[self.position[name]] = self.keys[name] + sections[name].identity
        identity = "{" + ", ".join(parts) + "}"
        tid = hashlib.sha256(identity.encode()).hexdigest()[:10]
        return cfg, {name: s.plain for name, s in sections.items()}, tid

    def _section(self, name: str, own: dict) -> _Section:
        key = (name, tuple(sorted((k, _text(v)) for k, v in own.items()))) if own else name
        cached = self.sections.get(key)
        if cached is not None:
            return cached
        errors: list[str] = []
        plain = None
        base = self._section(name, {}) if own else None
        fields = field_types(self.fields[name]) if own else None
        if fields and not base.errors and all(k.count(".") == 1 and k.split(".")[1] in fields for k in own):
            # Fields of a section set directly (optimizer.lr): only those are typed anew.
            changes = {k.split(".")[1]: v for k, v in own.items()}
            cls = type(base.value)
            typed = {f: build_field(cls, f, v, errors) for f, v in changes.items()}
            errors = [f"{name}.{e}" for e in errors]
            value = dataclasses.replace(base.value, **typed) if not errors else base.value
            plain = {**base.plain, **{f: to_dict(getattr(value, f)) for f in typed}}  # = to_dict(value), cheaper
        elif name in self.base or own:
            raw = apply_overrides({name: self.base.get(name)}, list(own.items()))[name] if own else self.base[name]
            value = build_field(TrainConfig, name, raw, errors)
        else:
            value = field_defaults(TrainConfig)[name]
        if plain is None:
            plain = to_dict(value)
        hidden = NOT_IDENTITY.get(name)
        shown = {**plain, **{k: None for k in hidden}} if hidden and isinstance(plain, dict) else plain
        if name == "tracking":
            shown = None
        section = _Section(value, plain, _IDENTITY_JSON.encode(shown), tuple(errors))
        self.sections[key] = section
        return section
