"""Preflight: the gradient-flow audit on a table of broken models, the story it was born from,
and the consistency checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from qarac_dist.preflight import CUT, NEVER_CALLED, NO_GRAD, UNUSED, audit_gradients
from conftest import ROOT, tiny_config


class Broken(nn.Module):
    """Two linear branches summed into the loss, with one way to break the second."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.extra = nn.Parameter(torch.ones(4))  # used only by "unused-parameter"
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        y = self.a(x) + self.frozen(x)
        if self.how == "detach":
            z = self.b(x).detach()
        elif self.how == "numpy":
            z = torch.from_numpy(np.asarray(self.b(x).detach().numpy()))
        elif self.how == "no_grad":
            with torch.no_grad():
                z = self.b(x)
        elif self.how == "argmax":
            z = self.b(x).argmax(-1, keepdim=True).float()
        elif self.how == "unused-output":
            self.b(x)
            z = torch.zeros_like(y)
        elif self.how == "never-called":
            z = torch.zeros_like(y)
        else:
            z = self.b(x)
        loss = (y + z).pow(2).mean()
        if self.how == "healthy":
            loss = loss + self.extra.sum()
        return {"loss": loss}


@pytest.mark.parametrize("how, cause", [
    ("detach", CUT), ("numpy", CUT), ("no_grad", NO_GRAD), ("argmax", CUT), ("unused-output", CUT),
    ("never-called", NEVER_CALLED),
])
def test_broken_branches_are_named_with_their_cause(how, cause):
    report = audit_gradients(Broken(how), {"x": torch.randn(3, 4)})
    assert sorted(report.missing) == ["b.bias", "b.weight", "extra"]
    assert report.causes["b"] == cause
    assert report.causes[""] == UNUSED  # the root module ran, but never used `extra`
    assert report.frozen == ["frozen.weight", "frozen.bias"]
    assert not report.ok


def test_a_healthy_model_reports_nothing_and_allow_no_grad_accepts_known_parameters():
    report = audit_gradients(Broken("healthy"), {"x": torch.randn(3, 4)})
    assert report.ok and report.missing == [] and report.nonfinite == [] and report.zero == []
    allowed = audit_gradients(Broken("detach"), {"x": torch.randn(3, 4)}, allow_no_grad=["b.*", "extra"])
    assert allowed.ok and sorted(allowed.allowed) == ["b.bias", "b.weight", "extra"]


def test_zero_and_nonfinite_gradients_and_a_loss_function():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.zeroed = nn.Linear(2, 2)
            self.bad = nn.Linear(2, 2)

        def forward(self, x):
            return self.zeroed(x) * 0 + self.bad(x) * torch.tensor(float("nan"))

    report = audit_gradients(Odd(), {"x": torch.ones(1, 2)}, loss_fn=lambda out: out.sum())
    assert report.zero == ["zeroed.weight", "zeroed.bias"]
    assert report.nonfinite == ["bad.weight", "bad.bias"]


def _cfg(tmp_path, **model):
    from qarac_dist.config import config_from_dict

    data = tiny_config(tmp_path / "cache", tmp_path / "out")
    data["model"] = {**data["model"], **model}
    return config_from_dict(data, "t.yaml")


def _roberta_dual(tmp_path, pooler: bool, allow=()):
    from qarac_dist.config import config_from_dict

    data = tiny_config(tmp_path / "cache", tmp_path / "out")
    data["model"] = {"kind": "dual_encoder", "task": "regression",
                     "dual_encoder": {"shared": False, "pooling": "attention", "pooler": pooler},
                     "config": {"model_type": "roberta", "num_hidden_layers": 1, "hidden_size": 32,
                                "num_attention_heads": 2, "intermediate_size": 64}}
    data["data"]["synthetic"] = {"task": "similarity", "num_train": 32, "num_validation": 8, "min_tokens": 8,
                                 "max_tokens": 24}
    data["data"]["max_length"] = 32
    data["evaluation"] = {"metric": "spearman", "every_steps": 5}
    data["preflight"] = {"allow_no_grad": list(allow)}
    return config_from_dict(data, "t.yaml")


def test_the_story_a_replaced_pooler_is_named_exactly(tmp_path):
    from qarac_dist import preflight

    result = preflight.run(_roberta_dual(tmp_path, pooler=True))
    assert sorted(result.report.missing) == [
        "encoder_a.pooler.dense.bias", "encoder_a.pooler.dense.weight",
        "encoder_b.pooler.dense.bias", "encoder_b.pooler.dense.weight"]
    assert result.report.causes["encoder_a.pooler.dense"] == NEVER_CALLED or result.report.causes[
        "encoder_a.pooler.dense"] == CUT
    assert not result.ok
    assert preflight.run(_roberta_dual(tmp_path, pooler=True, allow=["*pooler*"])).ok
    assert preflight.run(_roberta_dual(tmp_path, pooler=False)).ok


@pytest.mark.parametrize("build", ["longformer", "encoder_decoder"])
def test_healthy_transformers_report_nothing(tmp_path, build):
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    if build == "longformer":
        from qarac_dist import preflight

        result = preflight.run(_cfg(tmp_path))
        assert result.ok and result.report.missing == [], result.report.lines()
        return
    enc = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    dec = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     is_decoder=True, add_cross_attention=True)
    model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    ids = torch.randint(2, 50, (2, 6))
    report = audit_gradients(model, {"input_ids": ids, "labels": ids})
    # BERT's pooler is the one part an encoder-decoder never uses.
    assert [n for n in report.missing if "pooler" not in n] == []


def test_consistency_checks_name_the_keys(tmp_path):
    from qarac_dist.preflight import check_config

    class Tok:
        def __len__(self):
            return 600

    cfg = _cfg(tmp_path)
    cfg.training.global_batch_size = 64

    class Model:
        config = type("C", (), {"vocab_size": 500, "max_position_embeddings": 258, "model_type": "longformer",
                                "attention_window": 32})()

    problems = check_config(cfg, Tok(), Model(), world_size=2)
    assert any(p.startswith("training.global_batch_size: 64 != ") and "4 x 1 x 2 = 8" in p for p in problems)
    assert any(p.startswith("tokenizer: 600 tokens, more than the model's embeddings") for p in problems)
    assert any(p.startswith("data.max_length: 320 tokens, beyond the model's 256 positions") for p in problems)


def test_cli_fails_on_the_story_and_passes_once_allowed(tmp_path):
    config = tmp_path / "dual.yaml"
    cfg = yaml.safe_load((ROOT / "configs" / "dual_encoder_sts.yaml").read_text())
    cfg["model"]["dual_encoder"]["pooler"] = True
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.preflight", str(config)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no gradient: encoder_a.pooler.dense.{weight, bias}" in proc.stdout
    ok = subprocess.run([sys.executable, "-m", "qarac_dist.preflight", str(config), "preflight.allow_no_grad=['*pooler*']"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.integration
def test_sweep_refuses_to_submit_the_story_and_runs_once_allowed(tmp_path):
    """The sweep runs preflight before submitting: the replaced pooler stops it (nothing
    submitted, no directory); with allow_no_grad the same sweep runs to the end."""
    from conftest import run_sweep

    cfg = _roberta_dual(tmp_path, pooler=True)
    from qarac_dist.config import config_to_dict

    base = config_to_dict(cfg)
    base["training"].update(max_steps=4, micro_batch_size=4)
    base["evaluation"]["every_steps"] = 4
    sweep = {"name": "story", "base": base, "executor": "local", "grid": {"optimizer.lr": [1e-3, 2e-3]},
             "resources": {"time_min": 10, "max_parallel": 2}, "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}}
    path = tmp_path / "story.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = run_sweep(path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("no gradient: encoder_a.pooler.dense.{weight, bias}") == 1  # one architecture, one audit
    assert "preflight failed; nothing submitted" in proc.stderr
    assert not (tmp_path / "runs").exists()
    proc = run_sweep(path, "set.preflight.allow_no_grad=['*pooler*']")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight story-" in proc.stdout and ": ok" in proc.stdout
    from qarac_dist import tracking

    c = tracking.client(f"sqlite:///{tmp_path / 'm.db'}")
    from qarac_dist.manifest import Manifest

    parent = Manifest.load(tmp_path / "runs" / "story").mlflow_parent_run_id
    assert [a.path for a in c.list_artifacts(parent) if a.path == "preflight.txt"] == ["preflight.txt"]


@pytest.mark.parametrize("batch", [64, 128])
def test_peak_activation_bytes_is_exact_on_a_model_small_enough_to_count_by_hand(batch):
    from qarac_dist.preflight import peak_activation_bytes

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(256, 256, bias=False)

        def forward(self, x):
            return {"loss": torch.relu(self.lin(x)).sum()}

    # Forward: the linear's output and relu's output are alive together (2 x batch x 256
    # floats); backward: relu's saved output and the gradient of the linear's output, the same
    # again. The weight's 256 x 256 gradient belongs to the model states, not to this figure.
    peak = peak_activation_bytes(Probe(), {"x": torch.randn(batch, 256)})
    assert peak == 2 * batch * 256 * 4 + 8  # + the scalar loss


def test_memory_plan_says_by_how_much_and_which_switch_makes_it_fit(tmp_path):
    from qarac_dist import preflight
    from qarac_dist.plan import Resources

    cfg = _cfg(tmp_path)
    fits = preflight.run(cfg, resources=Resources(gpus_per_node=1, gpu_memory_gb=8.0))
    assert fits.ok and fits.memory is not None and 0 < fits.memory.total < 8 * 2**30
    assert fits.memory.activations > fits.memory.model_states > 0
    budget_gb = fits.memory.total * 0.6 / 2**30  # too small for micro batch 4, enough for micro batch 1
    tight = preflight.run(cfg, resources=Resources(gpus_per_node=1, gpu_memory_gb=budget_gb))
    assert not tight.ok
    (needs, fix) = [p for p in tight.problems if "gpu_memory_gb" in p or "would fit" in p]
    assert needs.startswith("resources.gpu_memory_gb: the trial needs about") and "GiB more than" in needs
    assert "training.micro_batch_size=1" in fix


@pytest.mark.integration
def test_find_batch_size_measures_real_steps_and_the_sweep_plans_with_it(tmp_path):
    """On CPU the measure is the RSS growth of two real steps on the longest examples; the
    budget leaves room for a few 2048-token documents of the 2-layer Longformer, not for 16."""
    import json

    from conftest import run_sweep

    base = tiny_config(tmp_path / "cache", tmp_path / "out",
                       model={"config": {**tiny_config(tmp_path, tmp_path)["model"]["config"], "hidden_size": 64,
                                         "intermediate_size": 128, "attention_window": 64}},
                       data={"synthetic": {"num_train": 32, "num_validation": 8, "min_tokens": 2048, "max_tokens": 2048,
                                           "evidence_after": 128, "num_classes": 2, "seed": 0}, "max_length": 2048},
                       training={"micro_batch_size": 1, "max_steps": 2}, evaluation={"every_steps": 2})
    sweep = {"name": "bs", "base": base, "executor": "local", "grid": {"optimizer.lr": [1e-3, 2e-3]},
             "resources": {"gpu_memory_gb": 0.4, "time_min": 10}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.preflight", str(path), "--find-batch-size"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads((tmp_path / "runs" / "bs" / "micro_batch.json").read_text())
    assert len(found) == 1  # two learning rates, one memory shape: one search
    (result,) = found.values()
    tried = {int(k): v for k, v in result["tried"].items()}
    best, budget = result["micro_batch_size"], result["budget_bytes"]
    assert 1 < best < 16 and tried[best] <= budget  # fits
    assert tried[best + 1] > budget  # the next one up was measured and does not
    assert tried[1] < tried[2] < tried[4]  # more examples, more memory

    dry = run_sweep(path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(f"found micro batch {best}") == 2
