"""The real-workload configs (hub model and data, for clusters that reach the hub) validate and
dry-run here with no network; the sentence-classifier head their sweep varies behaves as named."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qarac_dist.config import deepspeed_config, load_config
from qarac_dist.config.sweep import load_sweep
from qarac_dist.plan import plan
from support import ROOT


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub unreachable, as on this machine; commands run from an empty directory."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.chdir(tmp_path)


def test_longformer_imdb_is_longformer_base_at_4096_tokens_bf16_checkpointed_zero2():
    cfg = load_config(ROOT / "configs" / "longformer_imdb.yaml")
    assert (cfg.model.name_or_path, cfg.data.dataset) == ("allenai/longformer-base-4096", "stanfordnlp/imdb")
    assert cfg.data.max_length == 4096 and cfg.model.activation_checkpointing
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 4 * cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps


def test_longformer_imdb_dry_run_prints_the_job_and_touches_nothing(tmp_path, offline, capsys):
    from qarac_dist.train.__main__ import main

    config = str(ROOT / "configs" / "longformer_imdb.yaml")
    assert main([config, "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "allenai/longformer-base-4096" in out and '"train_batch_size": 64' in out
    assert list(tmp_path.iterdir()) == []  # no output dir, no data cache, no downloads
    assert main([config, "--dry-run", "--world-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("--world-size: expected at least 1, got 0") and len(err.strip().splitlines()) == 1


def test_sbert_grid_dry_run_is_three_named_variants_by_three_learning_rates(tmp_path, offline, capsys):
    from qarac_dist.sweep import main

    path = ROOT / "configs" / "sbert_imdb_grid.yaml"
    assert main([str(path), "--dry-run", "executor=local", f"runs_dir={tmp_path / 'runs'}"]) == 0
    assert "9 trials" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()

    spec, base = load_sweep(path)
    heads = {}
    for trial in plan(spec, base, str(path)):
        kwargs = trial.config["model"]["factory_kwargs"]
        variant = trial.label.rsplit(" optimizer.lr=", 1)[0]
        heads.setdefault(variant, set()).add(
            (kwargs["hidden"], kwargs["label_smoothing"], kwargs["dropout"]))
        assert kwargs["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    variants = {v.name: v.set for v in spec.variants}
    assert set(variants) == {"best", "no hidden", "no label smoothing"}
    assert variants["best"] == {"model.factory_kwargs.hidden": 25, "model.factory_kwargs.label_smoothing": 0.1,
                                "model.factory_kwargs.dropout": 0.5}
    assert heads == {"best": {(25, 0.1, 0.5)}, "no hidden": {(0, 0.1, 0.0)}, "no label smoothing": {(25, 0.0, 0.5)}}
    rates = sorted({t.config["optimizer"]["lr"] for t in plan(spec, base, str(path))})
    assert rates == [2e-5, 5e-5, 1e-4]


TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}


class _Tok:
    pad_token_id = 0

    def __len__(self):
        return 100


@pytest.mark.parametrize("hidden", [0, 25])
def test_sentence_classifier_head_has_the_hidden_layer_asked_for_and_smooths_labels(hidden):
    from qarac_dist.preflight.gradients import audit_gradients
    from qarac_dist.train.heads import sentence_classifier

    torch.manual_seed(0)
    model = sentence_classifier(num_labels=2, tokenizer=_Tok(), encoder_config=TINY_BERT, hidden=hidden,
                                dropout=0.0, label_smoothing=0.1)
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [layer.out_features for layer in linears] == ([25, 2] if hidden else [2])
    assert not any("pooler" in name for name, _ in model.named_parameters())  # the head pools itself
    batch = {"input_ids": torch.randint(1, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    out = model(**batch)
    assert torch.allclose(out["loss"], F.cross_entropy(out["logits"], batch["labels"], label_smoothing=0.1))
    assert not torch.allclose(out["loss"], F.cross_entropy(out["logits"], batch["labels"]))
    report = audit_gradients(model, batch)
    assert report.ok and not report.missing and not report.zero, report


def test_the_gpu_bench_refuses_in_one_line_where_there_is_no_gpu():
    """bench/gpu.sh measures on a GPU only; here (no NVIDIA GPU) it says so and stops."""
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the refusal is for machines without a GPU")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi lists none); run it on a GPU machine"]
    assert not Path("/tmp/qarac-gpu-venv").exists()
