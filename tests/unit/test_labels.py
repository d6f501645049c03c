"""What reaches the metric: labels checked against the task before anything trains, unlabelled
rows left out and counted, the validation split fixed by the data, truncation measured. Real
files (CSV, JSON lines, parquet with a `ClassLabel` written by `datasets`), read by `prepare`
as a trial reads them.

The table of bad data files grows with every input the data path touches: each case is one
line naming the source, the split, the row, the column and the value.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qarac_dist.config import UserError, config_from_dict
from qarac_dist.train import data
from support import tiny_config

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _texts(n: int, offset: int = 0) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + (i + offset) % 5)) for i in range(n)]


def _jsonl(path, labels, text_offset=0):
    path.write_text("".join(json.dumps({"text": t, "label": v}) + "\n"
                            for t, v in zip(_texts(len(labels), text_offset), labels)))
    return path


def _csv(path, labels, text_offset=0):
    import pandas as pd

    pd.DataFrame({"text": _texts(len(labels), text_offset), "label": labels}).to_csv(path, index=False)
    return path


def _parquet(path, labels, names=("neg", "pos"), text_offset=0):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(names))})
    datasets.Dataset.from_dict({"text": _texts(len(labels), text_offset), "label": labels},
                               features=features).to_parquet(str(path))
    return path


def _cfg(tmp_path, train, validation=None, task="classification", **data_keys):
    cfg = tiny_config(tmp_path / "cache", tmp_path / "out")
    cfg["data"] = {"train_files": [str(train)], "max_length": 16, "cache_dir": str(tmp_path / "cache"),
                   **({"validation_files": [str(validation)]} if validation else {}), **data_keys}
    cfg["tokenizer"] = {"vocab_size": 32}
    cfg["model"]["task"] = task
    if task == "regression":
        cfg["evaluation"] = {"metric": "spearman"}
    return config_from_dict(cfg, "c.yaml")


def _labels(split) -> list:
    return split["labels"][:]


def test_classlabel_unlabelled_rows_are_left_out_and_counted(tmp_path):
    """GLUE's test splits and IMDB's `unsupervised` mark rows without a label -1: scored, they
    were a class (4 of 9 at -1 gave accuracy 0.333 where the 5 labelled give 0.6)."""
    train = _parquet(tmp_path / "train.parquet", [0, 1, 0, 1, -1, 0, 1, 0])
    validation = _parquet(tmp_path / "val.parquet", [0, -1, 1, -1, 0, -1, 1, -1, 0], text_offset=3)
    splits = data.prepare(_cfg(tmp_path, train, validation))
    assert splits.num_labels == 2 and splits.label_names == ["neg", "pos"]
    assert _labels(splits.validation) == [0, 1, 0, 1, 0] and _labels(splits.train) == [0, 1, 0, 1, 0, 1, 0]
    assert splits.report["validation"]["unlabelled_rows"] == 4 and splits.report["validation"]["rows"] == 5
    assert splits.report["train"]["unlabelled_rows"] == 1
    lines = [line for _, line in data.report_lines(splits.report, 16)]
    assert "data: 4 of the 9 rows read for the validation split are unlabelled (label -1) and left out" in lines


def test_string_labels_from_csv_work_as_from_json_lines(tmp_path):
    """`datasets` reads CSV strings as `large_string`, JSON lines' as `string`: the same classes."""
    labels = ["pos", "neg", "neg", "pos", "meh", "neg"]
    from_csv = data.prepare(_cfg(tmp_path / "a", _csv(_mk(tmp_path / "a") / "t.csv", labels),
                                 _csv(tmp_path / "a" / "v.csv", ["neg", "pos", "meh"])))
    from_json = data.prepare(_cfg(tmp_path / "b", _jsonl(_mk(tmp_path / "b") / "t.jsonl", labels),
                                  _jsonl(tmp_path / "b" / "v.jsonl", ["neg", "pos", "meh"])))
    for splits in (from_csv, from_json):
        assert splits.label_names == ["meh", "neg", "pos"] and splits.num_labels == 3
        assert _labels(splits.train) == [2, 1, 1, 2, 0, 1] and _labels(splits.validation) == [1, 2, 0]


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plain_parquet(path, labels, text_offset=0):
    import pandas as pd

    pd.DataFrame({"text": _texts(len(labels), text_offset), "label": labels}).to_parquet(path)
    return path


# (id, train file, validation file, config overrides, the line's expected fragment)
BAD_DATA = [
    # A ClassLabel's -1 marks its own rows only; other files' labels are plain class ids.
    ("classlabel-then-fractions", lambda t: _parquet(t / "t.parquet", [0, 1, 1]),
     lambda t: _plain_parquet(t / "v.parquet", [0.0, 1.0, 0.5]), {},
     "v.parquet): validation split, row 3, column 'label': 0.5, expected a class id"),
    ("classlabel-then-plain-minus-one", lambda t: _parquet(t / "t.parquet", [0, 1, 1]),
     lambda t: _plain_parquet(t / "v.parquet", [0, 1, -1]), {},
     "v.parquet): validation split, row 3, column 'label': -1, expected a class id"),
    ("int64-max-class-id", lambda t: _csv(t / "t.csv", [0, 1, 9223372036854775807]), lambda t: _csv(t / "v.csv", [0]),
     {}, "train split, row 3, column 'label': 9223372036854775807, expected a class id"),
    ("past-int64-class-id", lambda t: _jsonl(t / "t.jsonl", [0, 1, 10**19]), lambda t: _jsonl(t / "v.jsonl", [0]),
     {}, "train split, row 3, column 'label': 1e+19, expected a class id"),
    ("numbers-and-a-word", lambda t: _jsonl(t / "t.jsonl", [0, "cat", 1]), lambda t: _jsonl(t / "v.jsonl", [0]),
     {}, "train split, row 2, column 'label': 'cat', expected a class id"),
    ("list-labels", lambda t: _jsonl(t / "t.jsonl", [[0], [1, 0]]), lambda t: _jsonl(t / "v.jsonl", [[0]]),
     {}, "train split, row 1, column 'label': [0], expected a class id"),
    ("dict-labels", lambda t: _jsonl(t / "t.jsonl", [{"a": 0}, {"a": 1}]), lambda t: _jsonl(t / "v.jsonl", [{"a": 0}]),
     {}, "train split, row 1, column 'label': {'a': 0}, expected a class id"),
    ("numbers-then-a-word-in-csv", lambda t: _csv(t / "t.csv", [0, 1, 1]), lambda t: _csv(t / "v.csv", [0, 1, "x", 1]),
     {}, "validation split, row 3, column 'label': 'x', expected a class id"),
    ("score-past-float32", lambda t: _jsonl(t / "t.jsonl", [0.1, 0.5]), lambda t: _jsonl(t / "v.jsonl", [0.1, 1e39]),
     {"model.task": "regression"}, "validation split, row 2, column 'label': 1e+39, expected a finite number within"),
    ("scores-then-a-word-in-csv", lambda t: _csv(t / "t.csv", [0.1, 0.5]),
     lambda t: _csv(t / "v.csv", [0.1, 0.3, 0.5, "abc"]), {"model.task": "regression"},
     "validation split, row 4, column 'label': 'abc', expected a finite number"),
    ("empty-text-cell", lambda t: (t / "t.csv").write_text("text,label\na b,0\n,1\nc d,1\n") and t / "t.csv",
     lambda t: _csv(t / "v.csv", [0]), {}, "t.csv): train split, row 2, column 'text': no value, expected text"),
    ("numbers-as-text", lambda t: (t / "t.csv").write_text("text,label\n1,0\n2,1\n") and t / "t.csv",
     lambda t: _csv(t / "v.csv", [0]), {}, "t.csv): train split, row 1, column 'text': 1, expected text"),
    ("string-label-train-lacks", lambda t: _csv(t / "t.csv", ["a", "b", "a"]), lambda t: _csv(t / "v.csv", ["a", "c"]),
     {}, "v.csv): validation split, row 2, column 'label': 'c', expected a label of the train split (a, b)"),
    ("empty-string-label", lambda t: _csv(t / "t.csv", ["a", "", "b"]), lambda t: _csv(t / "v.csv", ["a"]),
     {}, "t.csv): train split, row 2, column 'label': no value, expected a label of the train split (a, b)"),
    ("class-beyond-num-labels", lambda t: _jsonl(t / "t.jsonl", [0, 1, 1]), lambda t: _jsonl(t / "v.jsonl", [1, 2]),
     {"model.num_labels": 2},
     "validation split, row 2, column 'label': 2, expected a class below model.num_labels (2); it is class 2"),
    ("string-classes-beyond-num-labels", lambda t: _jsonl(t / "t.jsonl", ["a", "b", "c"]),
     lambda t: _jsonl(t / "v.jsonl", ["a"]), {"model.num_labels": 2}, "train split, row 3, column 'label': 'c', "
                                                                       "expected a class below model.num_labels (2)"),
    ("negative-class-id", lambda t: _jsonl(t / "t.jsonl", [0, -1, 1]), lambda t: _jsonl(t / "v.jsonl", [0]),
     {}, "train split, row 2, column 'label': -1, expected a class id (a whole number from 0) or a string"),
    ("fractional-class-id", lambda t: _jsonl(t / "t.jsonl", [0, 1.5, 1]), lambda t: _jsonl(t / "v.jsonl", [0]),
     {}, "train split, row 2, column 'label': 1.5, expected a class id"),
    ("null-class-id", lambda t: _jsonl(t / "t.jsonl", [0, 1, None]), lambda t: _jsonl(t / "v.jsonl", [0]),
     {}, "train split, row 3, column 'label': no value, expected a class id"),
    ("stray-timestamp-class-id", lambda t: _jsonl(t / "t.jsonl", [0, 1, 1_700_000_000]),
     lambda t: _jsonl(t / "v.jsonl", [0]),
     {}, "t.jsonl): column 'label': class ids go up to 1700000000, so the model would have 1,700,000,001 outputs"),
    ("classlabel-out-of-range", lambda t: _parquet(t / "t.parquet", [0, 1]),
     lambda t: _parquet(t / "v.parquet", [0, 1, 2], names=("neg", "pos", "x")), {},
     "v.parquet): validation split: column 'label' has the classes neg, pos, x, the train split neg, pos"),
    ("all-unlabelled", lambda t: _parquet(t / "t.parquet", [0, 1, 1]), lambda t: _parquet(t / "v.parquet", [-1, -1]),
     {}, "v.parquet): validation split: all 2 rows are unlabelled ('label' is -1); choose a split that has labels"),
    ("strings-then-numbers", lambda t: _jsonl(t / "t.jsonl", ["a", "b"]), lambda t: _jsonl(t / "v.jsonl", [0, 1]),
     {}, "validation split, row 1, column 'label': 0, expected a label of the train split (a, b)"),
    ("numbers-then-strings", lambda t: _jsonl(t / "t.jsonl", [0, 1]), lambda t: _jsonl(t / "v.jsonl", ["a"]),
     {}, "validation split, row 1, column 'label': 'a', expected a class id (a whole number from 0) or a string"),
    ("nan-score-validation", lambda t: _jsonl(t / "t.jsonl", [0.1, 0.5, 0.9]),
     lambda t: _jsonl(t / "v.jsonl", [0.2, float("nan"), 0.4]), {"model.task": "regression"},
     "v.jsonl): validation split, row 2, column 'label': nan, expected a finite number within float32 "
     "(model.task: regression)"),
    ("nan-score-train", lambda t: _jsonl(t / "t.jsonl", [0.1, float("nan"), 0.9]),
     lambda t: _jsonl(t / "v.jsonl", [0.2]), {"model.task": "regression"},
     "t.jsonl): train split, row 2, column 'label': nan, expected a finite number"),
    ("empty-csv-score", lambda t: _csv(t / "t.csv", [0.1, None, 0.9]), lambda t: _csv(t / "v.csv", [0.2]),
     {"model.task": "regression"}, "t.csv): train split, row 2, column 'label': no value, expected a finite number"),
    ("nan-text-csv-score", lambda t: (t / "t.csv").write_text("text,label\na b,0.1\nb c,nan\n") and t / "t.csv",
     lambda t: _csv(t / "v.csv", [0.2]), {"model.task": "regression"}, "train split, row 2, column 'label': no value"),
    ("inf-score", lambda t: _jsonl(t / "t.jsonl", [0.1, float("inf")]), lambda t: _jsonl(t / "v.jsonl", [0.2]),
     {"model.task": "regression"}, "row 2, column 'label': inf, expected a finite number"),
    ("string-score", lambda t: _jsonl(t / "t.jsonl", [0.1, 0.3]), lambda t: _jsonl(t / "v.jsonl", ["high"]),
     {"model.task": "regression"}, "validation split, row 1, column 'label': 'high', expected a finite number"),
    ("bool-score", lambda t: _jsonl(t / "t.jsonl", [True, False]), lambda t: _jsonl(t / "v.jsonl", [0.2]),
     {"model.task": "regression"}, "train split, row 1, column 'label': True, expected a finite number"),
]


@pytest.mark.parametrize("make_train, make_validation, overrides, expected",
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_DATA])
def test_a_bad_label_is_one_line_naming_file_split_row_column_and_value(tmp_path, make_train, make_validation,
                                                                        overrides, expected):
    train, validation = make_train(tmp_path), make_validation(tmp_path)
    cfg = _cfg(tmp_path, train, validation, task=overrides.pop("model.task", "classification"))
    if "model.num_labels" in overrides:
        cfg.model.num_labels = overrides.pop("model.num_labels")
    with pytest.raises(UserError) as err:
        data.prepare(cfg)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("data.train_files (") or str(err.value).startswith("data.validation_files (")


def test_the_validation_rows_are_the_datas_not_the_seeds(tmp_path):
    """validation_fraction split with training.seed: seeds 0 and 1 held out different rows (1
    of 10 in common), so a sweep over seeds compared trials on different validation sets."""
    train = _jsonl(tmp_path / "t.jsonl", [i % 2 for i in range(100)])
    held = {}
    for seed in (0, 1, 7):
        cfg = _cfg(tmp_path, train, validation_fraction=0.1)
        cfg.training.seed = seed
        held[seed] = sorted(data.prepare(cfg).validation["input_ids"][:])
    assert held[0] == held[1] == held[7] and len(held[0]) == 10
    cfg = _cfg(tmp_path, train, validation_fraction=0.1, split_seed=5)
    assert sorted(data.prepare(cfg).validation["input_ids"][:]) != held[0]  # its own seed moves it


def test_truncation_is_measured_per_split(tmp_path):
    """max_length 8 on documents of 4-8 words plus [CLS] and [SEP]: each row's cut counted."""
    train = _jsonl(tmp_path / "t.jsonl", [i % 2 for i in range(20)])
    validation = _jsonl(tmp_path / "v.jsonl", [0, 1, 0, 1, 0], text_offset=2)
    splits = data.prepare(_cfg(tmp_path, train, validation, max_length=8))
    whole = [len(t.split()) + 2 for t in _texts(20)]
    report = splits.report["train"]
    assert report["tokens"] == sum(whole)
    assert report["truncated_tokens"] == sum(max(0, n - 8) for n in whole)
    assert report["truncated_documents"] == sum(n > 8 for n in whole) > 0
    assert max(splits.train["length"][:]) == 8
    assert "tokens_cut" not in splits.train.column_names  # counted, then dropped from what trains
    levels = dict((line.split(" documents")[0], level) for level, line in data.report_lines(splits.report, 8))
    assert levels[f"data.max_length: {report['truncated_documents']} of 20 train"] == "warn"  # over 1% of tokens


def test_a_retraining_reports_train_and_validation_as_one_split(tmp_path):
    """final.retrain trains on both: the report counts their rows, tokens and cuts together, and
    says nothing of a validation split that no longer exists (its cuts were said twice, as apart)."""
    train = _jsonl(tmp_path / "t.jsonl", [i % 2 for i in range(20)])
    validation = _jsonl(tmp_path / "v.jsonl", [0, 1, 0, 1, 0], text_offset=2)
    splits = data.prepare(_cfg(tmp_path, train, validation, max_length=8))
    held, apart = splits.report["train"], splits.report["validation"]
    joined = data.with_validation(splits)
    report = joined.report["train"]
    assert len(joined.train) == report["rows"] == 25 and report["validation_rows_added"] == 5
    assert [report[k] for k in ("tokens", "truncated_tokens", "truncated_documents", "unlabelled_rows")] == \
        [held[k] + apart[k] for k in ("tokens", "truncated_tokens", "truncated_documents", "unlabelled_rows")]
    assert "validation" not in joined.report and apart["truncated_documents"] > 0
    lines = [line for _, line in data.report_lines(joined.report, 8)]
    assert lines and not any("validation" in line for line in lines)
    assert any(f"{report['truncated_documents']} of 25 train documents" in line for line in lines)


def test_spearman_with_a_nan_is_nan_not_a_rank():
    """NaN sorted as the largest value gave -0.4833 where scipy gives NaN."""
    from scipy.stats import spearmanr

    from qarac_dist.train.metrics import BestTracker, spearman

    scores = np.array([0.1, 0.4, np.nan, 0.3, 0.9, 0.2])
    labels = np.array([0.2, 0.1, 0.5, 0.3, 0.6, 0.8])
    assert math.isnan(spearman(scores, labels)) and math.isnan(spearmanr(scores, labels).statistic)
    assert math.isnan(spearman(labels, scores))
    keep = ~np.isnan(scores)
    assert spearman(scores[keep], labels[keep]) == pytest.approx(spearmanr(scores[keep], labels[keep]).statistic)
    best = BestTracker("spearman", "max")
    best.update(5, 0.1)
    assert not best.update(10, spearman(scores, labels)) and best.best == 0.1  # never chosen as best


def test_numbers_in_one_csv_are_the_labels_another_wrote_as_text(tmp_path):
    """CSV infers types per file: "1", "2", "x" in train are strings, "1", "2" alone are ints."""
    splits = data.prepare(_cfg(tmp_path, _csv(tmp_path / "t.csv", ["1", "2", "x", "2"]),
                               _csv(tmp_path / "v.csv", [1, 2, 2])))
    assert splits.label_names == ["1", "2", "x"] and _labels(splits.validation) == [0, 1, 1]


def test_nan_logits_score_nan_never_a_best():
    from qarac_dist.train.metrics import classification_metrics

    logits = np.full((5, 2), np.nan)
    assert all(math.isnan(v) for v in classification_metrics(logits, np.array([0, 0, 0, 0, 1])).values())
