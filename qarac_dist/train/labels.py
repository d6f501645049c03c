"""Labels, checked against the task before anything trains: every split's labels must be classes
(classification) or finite scores (regression), or the run stops at the first bad row with one
line naming the source, the split, the row, the column and the value.

Rows a data set marks unlabelled by its own convention, -1 under a `datasets.ClassLabel` (GLUE's
test splits, IMDB's `unsupervised`), are left out of their split and counted: scored, they
would count as a class. Any other value is a mistake to fix in the data, never skipped: a
silently dropped row changes the metric without a word.

Class ids: a `ClassLabel`'s own; strings (JSON lines or CSV alike) sorted, as the training split
holds them; whole numbers from 0 as they are. `model.num_labels`, when set, bounds them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import TrainConfig, UserError

UNLABELLED = -1
"""A `ClassLabel`'s mark for a row without a label."""
MAX_DERIVED_CLASSES = 100_000
"""Past this many classes read off the data (the largest id + 1), model.num_labels must say so:
one stray id (a year, a row number) would otherwise build a head of that many outputs."""


@dataclass(frozen=True)
class Split:
    """One split as loaded, with where it came from (for the messages)."""

    name: str
    """train or validation."""
    rows: object
    """The `datasets.Dataset`."""
    source: str
    """The config key and what it named, e.g. `data.train_files (train.csv)`."""


@dataclass(frozen=True)
class Labels:
    num_labels: int
    """Outputs of the model: classes (1 for regression)."""
    names: Optional[list[str]]
    """Class names, where the data has them (a `ClassLabel`, or string labels)."""
    values: dict[str, np.ndarray]
    """Per split, each row's checked label: its class id (int64; -1 unlabelled, where a
    ClassLabel says so) or its score (float64). What trains and validates is this, never the
    raw column again."""
    keep: dict[str, np.ndarray]
    """Per split with unlabelled rows, the rows to keep."""


def kind(feature) -> str:
    """classes (a ClassLabel), string (`string` or CSV's `large_string`), number (ints, floats,
    bools), or mixed (a JSON column of several types: datasets' `Json`)."""
    if hasattr(feature, "names"):
        return "classes"
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "string"
    return "number" if isinstance(dtype, str) and dtype.startswith(("int", "uint", "float", "bool")) else "mixed"


def bad_row(split: Split, column: str, row: int, value, expected: str) -> UserError:
    # Rows count from 1, in the order the data was read (files in the order given, header not counted).
    shown = "no value" if value is None else repr(value)
    return UserError(f"{split.source}: {split.name} split, row {row + 1}, column {column!r}: {shown}, "
                     f"expected {expected}")


def check(cfg: TrainConfig, splits: list[Split]) -> Labels:
    """The task's labels over `splits` (train first). Raises UserError at the first bad row."""
    column = cfg.data.label_column
    if cfg.model.task == "regression":
        return Labels(1, None, {s.name: _scores(s, column) for s in splits}, {})
    train = splits[0]
    names: Optional[list[str]] = None
    if kind(train.rows.features[column]) == "classes":
        names = list(train.rows.features[column].names)
        ids = {s.name: _class_ids(s, column, names) for s in splits}
    elif kind(train.rows.features[column]) == "string":
        names = sorted({v for v in train.rows[column][:] if v is not None})
        to_id = {name: i for i, name in enumerate(names)}
        ids = {s.name: _string_ids(s, column, to_id) for s in splits}
    else:
        ids = {s.name: _number_ids(s, column) for s in splits}
    largest = max((int(v.max()) for v in ids.values() if len(v)), default=0)
    num_labels = cfg.model.num_labels or (len(names) if names is not None else largest + 1)
    if num_labels > MAX_DERIVED_CLASSES and not cfg.model.num_labels:
        raise UserError(f"{train.source}: column {column!r}: class ids go up to {largest}, so the model would have "
                        f"{num_labels:,} outputs; set model.num_labels if it really has that many classes")
    keep = {}
    for split in splits:
        beyond = np.flatnonzero(ids[split.name] >= num_labels)
        if len(beyond):
            row = int(beyond[0])
            raise bad_row(split, column, row, split.rows[row][column],
                          f"a class below model.num_labels ({num_labels}); it is class {int(ids[split.name][row])}")
        unlabelled = ids[split.name] == UNLABELLED
        if len(unlabelled) and unlabelled.all():
            raise UserError(f"{split.source}: {split.name} split: all {len(unlabelled)} rows are unlabelled "
                            f"({column!r} is {UNLABELLED}); choose a split that has labels")
        if unlabelled.any():
            keep[split.name] = np.flatnonzero(~unlabelled)
    return Labels(num_labels, names, ids, keep)


def _listed(names: list) -> str:
    return ", ".join(map(str, names[:10])) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")


FLOAT32_MAX = float(np.finfo(np.float32).max)
LARGEST_ID = 2**53
"""Class ids above this are not whole numbers a float holds exactly (nor a model's head)."""


def _number(value) -> Optional[float]:
    """A label as a number: ints, floats, bools, and numbers written as text (CSV infers a column
    of one split as text when one cell is); None for anything else."""
    if isinstance(value, (bool, int, float, np.number)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _numbers(split: Split, column: str, ok, expected: str) -> np.ndarray:
    """The column as float64, each value `ok`; else the first row that is not, in one line."""
    values = split.rows[column][:]  # a list: iterating a datasets Column reads row by row, 1000x slower
    if kind(split.rows.features[column]) == "number":
        out = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    else:
        out = np.asarray([np.nan if (x := _number(v)) is None else x for v in values], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        wrong = np.flatnonzero(~ok(out))
    if len(wrong):
        row = int(wrong[0])
        raise bad_row(split, column, row, values[row], expected)
    return out


def _scores(split: Split, column: str) -> np.ndarray:
    expected = "a finite number within float32 (model.task: regression)"
    if getattr(split.rows.features[column], "dtype", None) == "bool" or kind(split.rows.features[column]) == "mixed":
        values = split.rows[column][:]
        flags = [row for row, v in enumerate(values) if isinstance(v, bool)]  # true/false: no score
        if flags:
            raise bad_row(split, column, flags[0], values[flags[0]], expected)
    # float32: what the collator hands the model; a larger score is an inf loss from step 1.
    return _numbers(split, column, lambda x: np.isfinite(x) & (np.abs(x) <= FLOAT32_MAX), expected)


def _number_ids(split: Split, column: str) -> np.ndarray:
    whole = _numbers(split, column, lambda x: np.isfinite(x) & (x >= 0) & (x == np.round(x)) & (x <= LARGEST_ID),
                     "a class id (a whole number from 0) or a string")
    return whole.astype(np.int64)


def _class_ids(split: Split, column: str, names: list[str]) -> np.ndarray:
    """A ClassLabel's ids (-1: unlabelled). A split without the ClassLabel (another file's plain
    numbers) has plain class ids: its -1 is no mark of the data set's, and a mistake."""
    feature = split.rows.features[column]
    if not hasattr(feature, "names"):
        return _number_ids(split, column)
    if list(feature.names) != names:
        raise UserError(f"{split.source}: {split.name} split: column {column!r} has the classes "
                        f"{_listed(list(feature.names))}, the train split {_listed(names)}")
    ids = np.asarray(split.rows[column][:], dtype=np.int64)
    wrong = np.flatnonzero((ids < UNLABELLED) | (ids >= len(names)))
    if len(wrong):
        row = int(wrong[0])
        raise bad_row(split, column, row, int(ids[row]), f"one of the column's {len(names)} classes (0 to "
                                                      f"{len(names) - 1}), or {UNLABELLED} (unlabelled)")
    return ids


def _string_ids(split: Split, column: str, to_id: dict) -> np.ndarray:
    """String labels. Another split's numbers (CSV reads "1", "2" as ints in a file without text)
    are compared as the text they were written as."""
    values = split.rows[column][:]
    ids = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        label = value if isinstance(value, str) or value is None else _as_text(value)
        if label not in to_id:
            raise bad_row(split, column, row, value, f"a label of the train split ({_listed(list(to_id))})")
        ids[row] = to_id[label]
    return ids


def _as_text(value) -> Optional[str]:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return str(value) if isinstance(value, float) else None
