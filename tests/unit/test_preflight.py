"""Preflight: the gradient-flow audit on a table of broken models, the story it was born from,
and the consistency checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from qarac_dist.preflight.gradients import CUT, NEVER_CALLED, NO_GRAD, UNUSED, audit_gradients
from support import ROOT, roberta_dual, tiny_config, write_config


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


def test_the_story_a_replaced_pooler_is_named_exactly(tmp_path):
    from qarac_dist.preflight import audit as preflight

    result = preflight.run(roberta_dual(tmp_path, pooler=True))
    assert sorted(result.report.missing) == [
        "encoder_a.pooler.dense.bias", "encoder_a.pooler.dense.weight",
        "encoder_b.pooler.dense.bias", "encoder_b.pooler.dense.weight"]
    assert result.report.causes["encoder_a.pooler.dense"] == NEVER_CALLED or result.report.causes[
        "encoder_a.pooler.dense"] == CUT
    assert not result.ok
    assert preflight.run(roberta_dual(tmp_path, pooler=True, allow=["*pooler*"])).ok
    assert preflight.run(roberta_dual(tmp_path, pooler=False)).ok


@pytest.mark.parametrize("build", ["longformer", "encoder_decoder"])
def test_healthy_transformers_report_nothing(tmp_path, build):
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    if build == "longformer":
        from qarac_dist.preflight import audit as preflight

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
    from qarac_dist.preflight.checks import check_config

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


def test_cli_fails_on_the_story_and_passes_once_allowed(tmp_path, monkeypatch, capsys):
    from qarac_dist.preflight.__main__ import main

    config = tmp_path / "dual.yaml"
    cfg = yaml.safe_load((ROOT / "configs" / "dual_encoder_sts.yaml").read_text())
    cfg["model"]["dual_encoder"]["pooler"] = True
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    write_config(config, cfg)
    monkeypatch.chdir(tmp_path)
    assert main([str(config)]) == 1
    assert "no gradient: encoder_a.pooler.dense.{weight, bias}" in capsys.readouterr().out
    assert main([str(config), "preflight.allow_no_grad=['*pooler*']"]) == 0


@pytest.mark.parametrize("batch", [64, 128])
def test_peak_activation_bytes_is_exact_on_a_model_small_enough_to_count_by_hand(batch):
    from qarac_dist.preflight.memory import peak_activation_bytes

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
    from qarac_dist.preflight import audit as preflight
    from qarac_dist.config.sweep import Resources

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




def test_findings_carry_a_level_and_an_ok_report_says_what_it_noted(tmp_path, capsys):
    from qarac_dist.preflight import audit

    result = audit.run(_cfg(tmp_path))  # the tiny Longformer classifier: the demo's true finding
    assert result.ok and [f.level for f in result.findings()] == ["note", "note"]
    audit.print_result(result)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "preflight tiny: ok; 2 note(s), expected and not failures"
    # Its longest documents (320 words and [CLS], [SEP]) lose a few tokens: under 1%, a note.
    assert out[2] == ("  note: data.max_length (2 of 64 train documents cut at 320 tokens (3 of 15,499 tokens cut), in "
                      "the rows preflight reads)")
    assert out[1].startswith("  note: all-zero gradient: longformer.encoder.layer.1.attention.self.{query, key, value}"
                             ".{weight, bias} (the classifier reads only the first token")
    assert out[1].endswith("; expected, not a failure)")


def test_unexplained_zero_gradients_warn_and_missing_ones_fail():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.zeroed = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return {"loss": (self.zeroed(x) * 0).sum() + x.sum() * 0 + 1}

    report = audit_gradients(Odd(), {"x": torch.ones(1, 2, requires_grad=True)})
    levels = {f.text: f.level for f in report.findings()}
    assert levels == {"no gradient: unused.{weight, bias}": "fail", "all-zero gradient: zeroed.{weight, bias}": "warn"}
