"""How a sweep chooses and what it shows of its choice: seeds per configuration (`repeats`)
and one look at the test set (`final:`).

`final:` names the split evaluated once the sweep has chosen, and what is evaluated on it.
The test split is part of the data's description (the training config's `data` section) but no
trial reads it: for local files `data.test_files`, for the generated set `data.synthetic.num_test`
documents, for a hub dataset the split `final.split` names. Neither key is part of a trial's id
(plan/resolve.py): a trial does not change when its test split does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")


@dataclass
class Final:
    split: str = "test"
    """The split evaluated once: for a hub dataset, the split of that name; for local files and
    the generated set, `test` (data.test_files, data.synthetic.num_test)."""
    retrain: bool = False
    """false: evaluate the chosen configuration's best model of each seed. true: train each seed
    again on train + validation, for the steps its best model had, and evaluate the model of
    its last step (submit/retrain.py)."""
    alias: str = "champion"
    """The MLflow registry alias the chosen model gets (with tracking.register_model)."""


def check_final(final: Final, errors: list[str]) -> None:
    """What the sweep file alone can tell; the data each trial would be tested on is checked per
    trial (`final_problem`)."""
    if not final.split.strip() or final.split != final.split.strip():
        errors.append(f"final.split: expected a split's name, got {final.split!r}")
    if not ALIAS.fullmatch(final.alias) or final.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", final.alias):
        errors.append(f"final.alias: {final.alias!r} is not an alias MLflow's registry takes (letters, digits, _ and "
                      f"-; not 'latest' or a version such as v3)")


TEST_SPLIT_KEYS = ("data.test_files", "data.synthetic.num_test")


def _gives_test_split(key: str, given) -> bool:
    """Whether a varied key sets the test split: itself, or whole sections that hold it."""
    if key in TEST_SPLIT_KEYS:
        return True
    inner = [k.partition(key + ".")[2] for k in TEST_SPLIT_KEYS if k.startswith(key + ".")]
    return any(_holds(v, path.split(".")) for v in _varied_values(given) for path in inner)


def _varied_values(given) -> list:
    """The values a varied key takes: a grid's list, a random choice's `values` (none for a range)."""
    values = given if isinstance(given, list) else \
        given.get("values") if isinstance(given, dict) else getattr(given, "values", None)
    return list(values or [])


def _holds(value, path: list[str]) -> bool:
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def check_not_varied(keyed: list[tuple[str, dict]], errors: list[str]) -> None:
    """The test split is no part of a trial: a sweep cannot vary it between trials."""
    for section, mapping in keyed:
        for key, given in mapping.items():
            if section != "set" and _gives_test_split(key, given):
                errors.append(f"{section}.{key}: the test split is no part of a trial (final: reads it once, after "
                              f"the sweep); set it under set, the same for every trial")


def final_problem(final: Final, resolved: dict) -> Optional[str]:
    """Why a trial (its resolved config) gives `final` nothing to evaluate: no best model kept,
    no test split it can read; or None."""
    if not resolved["output"]["export_best"]:
        return "final: evaluates each seed's best model; it needs output.export_best: true"
    data = resolved["data"]
    synthetic = data.get("synthetic")
    if synthetic is not None:
        if final.split != "test":
            return f"final.split: the generated set's test split is 'test', not {final.split!r}"
        if not synthetic.get("num_test"):
            return ("final.split: the generated set has no test split; set data.synthetic.num_test (documents no "
                    "trial reads)")
        return None
    if data.get("train_files") is not None:
        if final.split != "test":
            return f"final.split: local files' test split is 'test' (data.test_files), not {final.split!r}"
        tests = data.get("test_files")
        if not tests:
            return "final.split: set data.test_files, the files of the test split no trial reads"
        read = {os.path.realpath(f) for f in [*data["train_files"], *(data.get("validation_files") or [])]}
        shared = [f for f in tests if os.path.realpath(f) in read]
        if shared:
            return f"data.test_files: {shared[0]} is also a training or validation file; the test split must be apart"
        return None
    used = {data.get("train_split"), None if data.get("validation_fraction") else data.get("validation_split")}
    # A hub split may be an expression: "train[:50%]", "train+test" read the training split too.
    named = {re.sub(r"\[.*?\]", "", part).strip() for part in final.split.split("+")}
    if named & used:
        return f"final.split: {final.split!r} reads a split the trials train or validate on; name one they never read"
    return None


def sets_seed(key: str, given) -> bool:
    """Whether a varied key gives training.seed: itself, or whole training sections that hold it
    (a grid's values, a random choice's)."""
    in_sections = any(isinstance(v, dict) and "seed" in v for v in _varied_values(given))
    return key == "training.seed" or key == "training" and in_sections


def check_repeats(spec, keyed: list[tuple[str, dict]], errors: list[str]) -> None:
    """Seeds are what repeats vary: nothing else may set them (a grid, a variant, a random or a
    model-based search's key)."""
    for section, mapping in keyed:
        for key, given in mapping.items():
            if section != "set" and sets_seed(key, given):
                errors.append(f"{section}.{key}: repeats ({spec.repeats}) derives each configuration's seeds from its "
                              f"training.seed; set it under set (or in the base config), or use repeats: 1")
