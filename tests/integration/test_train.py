"""Real training runs: DeepSpeed ZeRO on 1 and 2 CPU ranks, the exported model, equivalences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qarac_dist.track.trial_dir import read_metrics
from support import logged_losses, run_train, tiny_config, write_config



def test_one_rank_run_logs_every_metric_and_exports_a_reloadable_best_model(tmp_path, data_cache):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qarac_dist.train.batches import Collator
    from qarac_dist.train.metrics import classification_metrics

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_config(data_cache, out, training={"max_steps": 12}))
    run_train(config)
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_rss_mb"):
        assert all(r[key] is not None and r[key] >= 0 for r in steps), key
    assert steps[0]["lr"] < steps[2]["lr"]  # warmup
    validations = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in validations] == [5, 10, 12]
    result = json.loads((out / "result.json").read_text())
    best = json.loads((out / "best" / "qarac_best.json").read_text())
    assert best["step"] == result["best_step"]
    assert best["metrics"]["accuracy"] == result["best_value"] == max(r["val_accuracy"] for r in validations)

    # The export needs no DeepSpeed: reload it and reproduce the logged validation metrics.
    import datasets

    model = AutoModelForSequenceClassification.from_pretrained(out / "best").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    from qarac_dist.config import load_config
    from qarac_dist.train.data import synthetic_dir

    # The validation set this trial's own config names (the cache is shared by the whole run).
    val_file = synthetic_dir(load_config(config).data) / "validation.jsonl"
    val = datasets.load_dataset("json", data_files=str(val_file))["train"].to_dict()
    enc = tokenizer(val["text"], truncation=True, max_length=320)
    collate = Collator(tokenizer.pad_token_id, 32, True)
    logits, labels = [], []
    for i in range(0, len(val["label"]), 8):  # the evaluation batches of tiny_config, so the same padding
        batch = collate({"input_ids": enc["input_ids"][i:i + 8], "labels": val["label"][i:i + 8]})
        labels.append(batch.pop("labels").numpy())
        with torch.no_grad():
            logits.append(model(**batch).logits.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    metrics = classification_metrics(logits, labels)
    assert metrics["loss"] == pytest.approx(best["metrics"]["loss"], abs=1e-5)
    assert metrics["accuracy"] == best["metrics"]["accuracy"]


@pytest.mark.parametrize("stage", [1, 3])  # 0 and 2: the next test
def test_zero_stages_run_on_two_ranks(tmp_path, data_cache, stage):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_config(data_cache, out, deepspeed={"zero_stage": stage},
                                                           training={"max_steps": 20}, evaluation={"every_steps": 20}))
    run_train(config, num_processes=2)
    (out / f"stage{stage}.json").write_text(json.dumps(logged_losses(out)))
    losses = logged_losses(out)
    assert len(losses) == 20 and all(l == l for l in losses)
    assert (out / "best" / "model.safetensors").exists()
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 8


def test_zero0_and_zero2_give_the_same_losses(tmp_path, data_cache):
    losses = {}
    for stage in (0, 2):
        out = tmp_path / f"stage{stage}"
        config = write_config(tmp_path / f"c{stage}.yaml", tiny_config(
            data_cache, out, deepspeed={"zero_stage": stage}, training={"max_steps": 20}, evaluation={"every_steps": 20}))
        run_train(config, num_processes=2)
        losses[stage] = logged_losses(out)
        assert (out / "best" / "model.safetensors").exists()
        assert json.loads((out / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage
    assert len(losses[0]) == 20
    assert losses[0] == pytest.approx(losses[2], abs=1e-5)
    assert losses[0][-1] != losses[0][0]


def test_gradient_accumulation_matches_a_big_micro_batch(tmp_path, data_cache):
    losses = {}
    for micro, accumulation in ((8, 1), (2, 4)):
        out = tmp_path / f"m{micro}"
        config = write_config(tmp_path / f"c{micro}.yaml", tiny_config(
            data_cache, out, training={"micro_batch_size": micro, "gradient_accumulation_steps": accumulation,
                                       "max_steps": 10}, evaluation={"every_steps": 10}))
        run_train(config)
        losses[micro] = logged_losses(out)
    assert len(losses[8]) == 10
    assert losses[8] == pytest.approx(losses[2], abs=1e-4)


def test_bf16_with_activation_checkpointing_runs(tmp_path, data_cache):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data_cache, out, precision={"dtype": "bf16"}, model={"activation_checkpointing": True},
        training={"max_steps": 6}, evaluation={"every_steps": 6}))
    run_train(config)
    losses = logged_losses(out)
    assert len(losses) == 6 and all(0 < l < 10 for l in losses)
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
