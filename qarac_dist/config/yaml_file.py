"""Reading YAML that anyone may have written: bounded before anything is built from it.

- Only plain data: the safe loader (libyaml's where PyYAML has it), so tags such as
  `!!python/object` are never run.
- A file over `MAX_BYTES`, bytes that are not UTF-8, a key written twice in one mapping, a
  recursive alias, nesting deeper than `MAX_DEPTH`, and aliases that would expand past
  `MAX_NODES` values (the "billion laughs") are refused with one line each, before the data is
  built or walked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..base.errors import ConfigError

MAX_BYTES = 16 * 2**20
"""A config or sweep file larger than this is refused unread."""
MAX_NODES = 5_000_000
"""Values in the document once every alias is expanded."""
MAX_DEPTH = 64
"""Mappings and lists nested deeper than this are refused (configs need a handful)."""

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(_Base):  # type: ignore[misc, valid-type]
    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _Problem(f"line {key_node.start_mark.line + 1}: the key {key!r} is set twice "
                                   f"(first on line {seen[key] + 1})")
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the constructor below says so
                pass
        return super().construct_mapping(node, deep=deep)


class _Problem(Exception):
    """A refusal worded for the user, raised inside the loader."""


def _expanded_size(root) -> int:
    """Values in the document with every alias expanded, counted on the node graph (shared
    nodes are counted once per use, computed once each), refusing cycles and deep nesting.
    Scalars count one each and are not visited on their own (a long list is most of a sweep file)."""
    if isinstance(root, yaml.ScalarNode):
        return 1
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False, 1)]
    while stack:
        node, children_done, depth = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in _children(node))  # scalars are not in sizes
            if sizes[key] > MAX_NODES:
                raise _Problem(f"its aliases expand to more than {MAX_NODES:,} values")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _Problem(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it")
        if depth > MAX_DEPTH:
            raise _Problem(f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        children = _children(node)
        if children and depth == MAX_DEPTH:
            raise _Problem(f"line {children[0].start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        on_path.add(key)
        stack.append((node, True, depth))
        stack.extend((c, False, depth + 1) for c in children
                     if not isinstance(c, yaml.ScalarNode) and id(c) not in sizes)
    return sizes[id(root)]


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_text(text: str) -> Any:
    """Parse one YAML document under the limits above; raises _Problem or yaml.YAMLError."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except RecursionError:
        raise _Problem("nested too deeply") from None
    finally:
        loader.dispose()


_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _too_deep(text: str) -> _Problem | None:
    """After the parser refused a document: whether it nests past MAX_DEPTH before the point
    of refusal. libyaml refuses past its own nesting limit (1000 levels, in PyYAML 6.0.4's wheels)
    before our check sees the document; our limit, and our message, then still hold."""
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):  # pure Python: no limit of its own
            depth += isinstance(token, _OPEN) - isinstance(token, _CLOSE)
            if depth > MAX_DEPTH + 1:  # the top-level mapping is a level of its own here
                return _Problem(f"line {token.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
    except yaml.YAMLError:
        pass
    return None


def load_value(text: str) -> Any:
    """A command-line override's value: YAML if it parses as such, else the text itself. A value
    with a line break is taken as it is: YAML would fold the break into a space."""
    if "\n" in text or "\r" in text:
        return text
    try:
        return load_text(text)
    except (yaml.YAMLError, _Problem):
        return text


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from a file; every refusal is one line naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a YAML file"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_BYTES // 2**20} MiB; not a config file"])
    text = _decode(path, raw)
    try:
        data = load_text(text)
    except _Problem as problem:
        raise ConfigError([f"{path}: {problem}"]) from None
    except yaml.YAMLError as err:
        too_deep = _too_deep(text)
        if too_deep is not None:
            raise ConfigError([f"{path}: {too_deep}"]) from None
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}: {where}invalid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError([f"{path}: UTF-16 text; save it as UTF-8"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError([f"{path}: line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save it as UTF-8"]) \
            from None
