"""Numbers a paper can publish: every reported validation metric recomputed with sklearn and
scipy from the exported best model's own predictions (kept in the suite so it guards the
numbers from now on), on real files and real training processes, 2 ranks where ranks matter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qarac_dist.config.sections import SyntheticConfig
from qarac_dist.track.trial_dir import read_metrics
from qarac_dist.train.synthetic import generate_synthetic
from support import run_train, tiny_config, write_config

UNLABELLED_IN_VALIDATION = 7


def _documents(tmp_path, evidence_after=128, evidence_rate=0.05):
    """Generated documents of 160-320 words, 3 classes, as rows."""
    spec = SyntheticConfig(num_train=96, num_validation=40, min_tokens=160, max_tokens=320, num_classes=3, seed=3,
                           evidence_after=evidence_after, evidence_rate=evidence_rate)
    generate_synthetic(spec, tmp_path / "generated")
    return {split: [json.loads(line) for line in (tmp_path / "generated" / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "validation")}


def _predictions(best_dir, texts, max_length, batch_size, world_size=1):
    """The exported model's outputs (no DeepSpeed), in the batches validation made: longest
    first, dealt to the ranks in turn, so each batch is padded as it was."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qarac_dist.train.batches import Collator

    model = AutoModelForSequenceClassification.from_pretrained(best_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(best_dir)
    collate = Collator(tokenizer.pad_token_id, 32, True)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort(-np.array([len(x) for x in ids]), kind="stable")
    outputs = [None] * len(texts)
    for rank in range(world_size):
        mine = order[rank::world_size]
        for start in range(0, len(mine), batch_size):
            rows = mine[start:start + batch_size]
            batch = collate({"input_ids": [ids[i] for i in rows], "labels": [0] * len(rows)})
            batch.pop("labels")
            with torch.no_grad():
                logits = model(**batch).logits.numpy()
            for i, row in enumerate(rows):
                outputs[row] = logits[i]
    return np.stack(outputs)


def _validation_row(out, step):
    return next(r for r in read_metrics(out / "metrics.jsonl") if r["step"] == step and "val_loss" in r)


def test_classification_metrics_recomputed_by_sklearn_with_unlabelled_rows_left_out(tmp_path, data_cache):
    """A parquet set with a `ClassLabel` written by `datasets`, 7 of the validation rows marked
    unlabelled (-1), on 2 ranks with uneven shards (33 rows): accuracy, macro F1 and loss of the
    best checkpoint equal sklearn's over the labelled rows of the exported model, in
    qarac_best.json, metrics.jsonl and result.json alike; MLflow has the data report."""
    import datasets
    from mlflow.tracking import MlflowClient
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    docs = _documents(tmp_path)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["red", "green", "blue"])})
    validation = [dict(d, label=-1 if i % 5 == 0 and i < 35 else d["label"]) for i, d in enumerate(docs["validation"])]
    assert sum(d["label"] == -1 for d in validation) == UNLABELLED_IN_VALIDATION
    for split, rows in (("train", docs["train"]), ("validation", validation)):
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    out = tmp_path / "out"
    cfg = tiny_config(data_cache, out, training={"max_steps": 12, "micro_batch_size": 5},
                      evaluation={"every_steps": 6, "batch_size": 4},
                      tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "numbers"})
    cfg["data"] = {"train_files": [str(tmp_path / "train.parquet")],
                   "validation_files": [str(tmp_path / "val.parquet")], "max_length": 320, "cache_dir": str(data_cache)}
    (tmp_path / "validation.parquet").rename(tmp_path / "val.parquet")
    proc = run_train(write_config(tmp_path / "c.yaml", cfg), num_processes=2)
    assert "data: 7 of the 40 rows read for the validation split are unlabelled (label -1) and left out" in proc.stderr
    # 96 rows, 10 a step (5 x 2 ranks): each epoch leaves 6 out, and says so.
    assert "each epoch leaves out 6 of 96 training rows" in proc.stderr

    best = json.loads((out / "best" / "qarac_best.json").read_text())
    result = json.loads((out / "result.json").read_text())
    labelled = [d for d in validation if d["label"] != -1]
    labels = np.array([d["label"] for d in labelled])
    logits = _predictions(out / "best", [d["text"] for d in labelled], 320, batch_size=4, world_size=2)
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    recomputed = {"accuracy": accuracy_score(labels, logits.argmax(1)),
                  "macro_f1": f1_score(labels, logits.argmax(1), average="macro"),
                  "loss": log_loss(labels, probabilities, labels=[0, 1, 2])}
    logged = _validation_row(out, best["step"])
    for name, value in recomputed.items():
        assert best["metrics"][name] == pytest.approx(value, abs=1e-5), name
        assert logged[f"val_{name}"] == pytest.approx(value, abs=1e-5), name
    assert result["best_value"] == best["metrics"]["accuracy"] and result["best_step"] == best["step"]
    validated = result["data"]["validation"]
    assert (validated["rows"], validated["rows_read"], validated["unlabelled_rows"]) == (33, 40, 7)
    assert validated["tokens"] == sum(len(d["text"].split()) + 2 for d in labelled)
    assert result["data"]["dropped_per_epoch"] == 6 and result["data"]["examples_per_step"] == 10

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("numbers").experiment_id])
    params = run.data.params
    assert params["data_report.validation.unlabelled_rows"] == "7" and params["data_report.dropped_per_epoch"] == "6"
    assert params["data_report.train.truncated_documents"] == str(result["data"]["train"]["truncated_documents"])
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(recomputed["accuracy"])


def test_regression_metrics_recomputed_by_scipy_and_truncation_reported(tmp_path, data_cache):
    """Scores in CSV (the class plus noise) at max_length 64, so every document is cut (the
    evidence starts early enough to learn from): Spearman and the loss of the best checkpoint
    equal scipy's and sklearn's; the cut is counted."""
    import pandas as pd
    from scipy.stats import spearmanr
    from sklearn.metrics import mean_squared_error

    docs = _documents(tmp_path, evidence_after=8, evidence_rate=0.5)
    rng = np.random.default_rng(0)
    for split, rows in docs.items():
        pd.DataFrame({"text": [d["text"] for d in rows],
                      "label": [d["label"] + rng.normal(0, 0.3) for d in rows]}).to_csv(tmp_path / f"{split}.csv",
                                                                                          index=False)
    out = tmp_path / "out"
    cfg = tiny_config(data_cache, out, training={"max_steps": 10}, evaluation={"every_steps": 5, "metric": "spearman"},
                      optimizer={"lr": 1.0e-2})
    cfg["model"]["task"] = "regression"
    cfg["data"] = {"train_files": [str(tmp_path / "train.csv")], "validation_files": [str(tmp_path / "validation.csv")],
                   "max_length": 64, "cache_dir": str(data_cache)}
    proc = run_train(write_config(tmp_path / "c.yaml", cfg))
    result = json.loads((out / "result.json").read_text())
    cut = result["data"]["validation"]
    assert cut["truncated_documents"] == cut["rows"] == 40
    assert cut["tokens"] == sum(len(d["text"].split()) + 2 for d in docs["validation"])
    assert cut["truncated_tokens"] == cut["tokens"] - 40 * 64
    assert f"data.max_length: 40 of 40 validation documents cut at 64 tokens ({cut['truncated_tokens']:,} of" \
           in proc.stderr

    best = json.loads((out / "best" / "qarac_best.json").read_text())
    frame = pd.read_csv(tmp_path / "validation.csv")
    scores = _predictions(out / "best", list(frame["text"]), 64, batch_size=8).reshape(-1)
    labels = frame["label"].to_numpy()
    logged = _validation_row(out, best["step"])
    assert best["metrics"]["spearman"] == pytest.approx(spearmanr(scores, labels).statistic, abs=1e-6)
    assert best["metrics"]["loss"] == pytest.approx(mean_squared_error(labels, scores), rel=1e-4)
    assert logged["val_spearman"] == best["metrics"]["spearman"] == result["best_value"]
    assert best["metrics"]["spearman"] > 0.5 and scores.std() > 1e-3  # it learned: the ranks are not noise


def test_a_bad_label_stops_before_training_in_one_line(tmp_path, data_cache):
    """num_labels 2 with a label 2 in validation was an IndexError at the first validation, after
    training: now one line before any step, exit 2, on 2 ranks as on one (rank 1, waiting for
    rank 0's preparation, learns of it and leaves no traceback)."""
    rows = _documents(tmp_path)
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": d["text"], "label": min(d["label"], 1 if split == "train" else 2)}) + "\n"
            for d in rows[split]))
    out = tmp_path / "out"
    cfg = tiny_config(data_cache, out, model={"num_labels": 2})
    cfg["data"] = {"train_files": [str(tmp_path / "train.jsonl")],
                   "validation_files": [str(tmp_path / "validation.jsonl")], "max_length": 320,
                   "cache_dir": str(data_cache)}
    proc = run_train(write_config(tmp_path / "c.yaml", cfg), num_processes=2, check=False)
    first_two = next(i for i, d in enumerate(rows["validation"]) if d["label"] == 2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'c.yaml'}: data.validation_files ({tmp_path / 'validation.jsonl'}): validation split, row "
        f"{first_two + 1}, column 'label': 2, expected a class below model.num_labels (2); it is class 2")
    assert "Traceback" not in proc.stderr and not (out / "metrics.jsonl").exists()


def test_a_signal_on_one_rank_stops_both_and_another_world_size_must_keep_the_step(tmp_path, data_cache):
    """SLURM's warning reaching rank 1 only made rank 0 raise `ValueError: None is not a valid
    Signals` (exit 1): both now save and stop with it (exit 3). The checkpoint then resumes on 1
    rank only if a step still takes 8 examples: at micro 4 x 1 rank the epoch's order would see
    some examples twice, and the refusal comes before anything is loaded."""
    out = tmp_path / "out"

    def config(ranks, accumulation):
        return write_config(tmp_path / f"c{ranks}.yaml", tiny_config(
            data_cache, out, evaluation={"every_steps": 4},
            training={"max_steps": 8, "micro_batch_size": 4, "gradient_accumulation_steps": accumulation}))

    stopped = run_train(config(2, 1), num_processes=2, fault="usr2:3:1", check=False)
    assert stopped.returncode == 3, stopped.stderr[-3000:]  # launch/run_local.sh exits as its ranks did
    assert stopped.stderr.count("stopped by signal SIGUSR2 after step 3; checkpoint saved") == 2, stopped.stderr[-3000:]
    assert "ValueError" not in stopped.stderr
    state = json.loads((out / "state.json").read_text())
    assert state["state"] == "PREEMPTED" and state["step"] == 3
    assert (out / "checkpoints" / "step00000003" / "COMPLETE").exists()

    refused = run_train(config(1, 1), check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "step00000003 was saved on 2 ranks taking 8 examples a step; this job has 1 ranks taking 4, so the rest of "
        "the epoch would see some examples twice and others never. Make training.micro_batch_size x "
        "gradient_accumulation_steps x 1 ranks equal 8 to resume here (training.global_batch_size: 8 holds every "
        "job of the trial to it)")
    assert not (out / "checkpoints" / "step00000003_universal").exists()  # refused before any conversion
