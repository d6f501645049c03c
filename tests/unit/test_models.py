"""Model building, the AdamW groups and activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qarac_dist.config import UserError, config_from_dict
from qarac_dist.train import models
from support import tiny_config


class _Tokenizer:
    pad_token_id = 0

    def __len__(self):
        return 500


def _cfg(tmp_path, **model):
    data = tiny_config(tmp_path, tmp_path / "out")
    data["model"] = {**data["model"], **model}
    if "factory" in model:
        data["model"].pop("config")
    return config_from_dict(data, "test.yaml")


def test_longformer_from_config_gets_window_padding_and_global_first_token(tmp_path):
    model = models.build_model(_cfg(tmp_path), num_labels=3, tokenizer=_Tokenizer())
    assert type(model).__name__ == "LongformerForSequenceClassification"
    assert model.config.vocab_size == 500 and model.config.num_labels == 3
    assert model.config.max_position_embeddings == 322
    spec = models.input_spec(model)
    assert spec.pad_multiple == 32 and spec.global_first_token


def test_regression_head_has_one_output(tmp_path):
    cfg = config_from_dict({**tiny_config(tmp_path, tmp_path / "out"), "evaluation": {"metric": "spearman", "mode": "max"},
                            "data": {"train_files": None, "dataset": "x/y"}}, "t.yaml", ["model.task=regression", "data.synthetic=null"])
    model = models.build_model(cfg, num_labels=1, tokenizer=_Tokenizer())
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_weight_decay_skips_biases_and_layernorms(tmp_path):
    model = models.build_model(_cfg(tmp_path), num_labels=2, tokenizer=_Tokenizer())
    decay, plain = models.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert not any(n.endswith(".bias") or "LayerNorm" in n for n in decay_names)
    assert any("LayerNorm.weight" in n for n in plain_names)
    assert "longformer.encoder.layer.0.attention.self.query.weight" in decay_names
    assert len(decay_names) + len(plain_names) == sum(1 for _ in model.parameters())


def test_activation_checkpointing_is_non_reentrant_and_gives_the_same_gradients(tmp_path):
    torch.manual_seed(0)
    plain = models.build_model(_cfg(tmp_path), num_labels=2, tokenizer=_Tokenizer())
    ckpt = models.build_model(_cfg(tmp_path, activation_checkpointing=True), num_labels=2, tokenizer=_Tokenizer())
    ckpt.load_state_dict(plain.state_dict())
    flag = "is_activation_checkpointing" if hasattr(plain, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(ckpt, flag) and not getattr(plain, flag)
    ids = torch.randint(5, 500, (2, 64))
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    for model in (plain, ckpt):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), global_attention_mask=glob,
              labels=torch.tensor([0, 1])).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


class TwoHeads(nn.Module):
    def __init__(self, num_labels, tokenizer, width=8):
        super().__init__()
        self.embed = nn.Embedding(len(tokenizer), width)
        self.head = nn.Linear(width, num_labels)


def make_two_heads(num_labels, tokenizer, width=8):
    return TwoHeads(num_labels, tokenizer, width)


def test_factory_builds_user_modules_and_reports_bad_ones(tmp_path):
    model = models.build_model(_cfg(tmp_path, factory="test_models:make_two_heads", factory_kwargs={"width": 4}),
                               num_labels=3, tokenizer=_Tokenizer())
    assert isinstance(model, TwoHeads) and model.head.in_features == 4
    with pytest.raises(UserError, match="model.factory: cannot import 'test_models:nope'"):
        models.build_model(_cfg(tmp_path, factory="test_models:nope"), num_labels=3, tokenizer=_Tokenizer())
    with pytest.raises(UserError, match="model.activation_checkpointing: the model contains no transformers model"):
        models.build_model(_cfg(tmp_path, factory="test_models:make_two_heads", activation_checkpointing=True),
                           num_labels=3, tokenizer=_Tokenizer())
