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

import math
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
    to_id: Optional[dict]
    """String label -> class id, for string labels; None where the ids are in the data."""


def kind(feature) -> str:
    """classes (a ClassLabel), string (`string` or CSV's `large_string`) or number."""
    if hasattr(feature, "names"):
        return "classes"
    return "string" if getattr(feature, "dtype", None) in ("string", "large_string") else "number"


def _bad(split: Split, column: str, row: int, value, expected: str) -> UserError:
    # Rows count from 1, in the order the data was read (files in the order given, header not counted).
    shown = "no value" if value is None else repr(value)
    return UserError(f"{split.source}: {split.name} split, row {row + 1}, column {column!r}: {shown}, "
                     f"expected {expected}")


def check(cfg: TrainConfig, splits: list[Split]) -> tuple[Labels, dict[str, np.ndarray]]:
    """The task's labels over `splits` (train first), and for each split the rows to keep (the
    labelled ones). Raises UserError at the first bad row."""
    column = cfg.data.label_column
    if cfg.model.task == "regression":
        for split in splits:
            _scores(split, column)
        return Labels(1, None, None), {}
    train = splits[0]
    features = [kind(s.rows.features[column]) for s in splits]
    names: Optional[list[str]] = None
    to_id = None
    if features[0] == "classes":
        names = list(train.rows.features[column].names)
        for split in splits[1:]:
            theirs = list(getattr(split.rows.features[column], "names", names))
            if theirs != names:
                raise UserError(f"{split.source}: {split.name} split: column {column!r} has the classes "
                                f"{_listed(theirs)}, the train split {_listed(names)}")
        ids = {s.name: _class_ids(s, column, len(names)) for s in splits}
    elif features[0] == "string":
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
    for split in splits:
        beyond = np.flatnonzero(ids[split.name] >= num_labels)
        if len(beyond):
            row = int(beyond[0])
            raise _bad(split, column, row, split.rows[row][column], f"a class below model.num_labels ({num_labels}); "
                                                                    f"it is class {int(ids[split.name][row])}")
    keep = {}
    for split in splits:
        unlabelled = ids[split.name] == UNLABELLED
        if len(unlabelled) and unlabelled.all():
            raise UserError(f"{split.source}: {split.name} split: all {len(unlabelled)} rows are unlabelled "
                            f"({column!r} is {UNLABELLED}); choose a split that has labels")
        if unlabelled.any():
            keep[split.name] = np.flatnonzero(~unlabelled)
    return Labels(num_labels, names, to_id), keep


def _listed(names: list) -> str:
    return ", ".join(map(str, names[:10])) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")


def _scores(split: Split, column: str) -> None:
    values = split.rows[column][:]  # a list: iterating a datasets Column reads row by row, 1000x slower
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(split, column, row, value, "a finite number (model.task: regression)")


def _class_ids(split: Split, column: str, num_classes: int) -> np.ndarray:
    ids = np.asarray(split.rows[column][:], dtype=np.int64)
    wrong = np.flatnonzero((ids < UNLABELLED) | (ids >= num_classes))
    if len(wrong):
        row = int(wrong[0])
        raise _bad(split, column, row, int(ids[row]), f"one of the column's {num_classes} classes (0 to "
                                                      f"{num_classes - 1}), or {UNLABELLED} (unlabelled)")
    return ids


def _string_ids(split: Split, column: str, to_id: dict) -> np.ndarray:
    values = split.rows[column][:]
    if kind(split.rows.features[column]) != "string":
        raise _bad(split, column, 0, values[0], "a string, as the train split's labels are")
    ids = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        if value not in to_id:
            raise _bad(split, column, row, value, f"a label of the train split ({_listed(list(to_id))})")
        ids[row] = to_id[value]
    return ids


def _number_ids(split: Split, column: str) -> np.ndarray:
    values = split.rows[column][:]
    if kind(split.rows.features[column]) == "string":
        raise _bad(split, column, 0, values[0], "a number, as the train split's labels are")
    as_float = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    wrong = np.flatnonzero(~np.isfinite(as_float) | (as_float < 0) | (as_float != np.round(as_float)))
    if len(wrong):
        row = int(wrong[0])
        raise _bad(split, column, row, values[row], "a class id (a whole number from 0) or a string")
    return as_float.astype(np.int64)
