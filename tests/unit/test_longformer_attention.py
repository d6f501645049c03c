"""The blocked Longformer attention against Hugging Face's module, with the same weights: outputs
and parameter gradients over a table of global-token, padding, window and length cases; bf16;
dropout; the fallback; and 20 training steps from the same seed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LongformerConfig, LongformerForSequenceClassification, LongformerModel

from qarac_dist.train.longformer_attention import install


def _pair(window, length, layers=2, hidden=64, heads=4, dropout=0.0, dtype=torch.float32, cls=LongformerModel):
    torch.manual_seed(0)
    cfg = LongformerConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                           intermediate_size=2 * hidden, attention_window=window, vocab_size=100,
                           max_position_embeddings=length + 600, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=dropout, num_labels=3)
    hf = cls(cfg).to(dtype)
    ours = copy.deepcopy(hf)
    assert install(ours) == layers
    return hf, ours


def _inputs(batch, length, globals_, pads, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    attention = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate(pads):
        if pad:
            attention[b, length - pad:] = 0
    glob = torch.zeros(batch, length, dtype=torch.long)
    for b, positions in enumerate(globals_):
        glob[b, positions] = 1
    glob *= attention
    return {"input_ids": ids, "attention_mask": attention, "global_attention_mask": glob}


def _run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs).last_hidden_state
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _relative_errors(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    out = float((out_a - out_b).abs().max() / out_a.abs().max())
    scale = max(float(g.abs().max()) for g in grads_a.values())
    grad = max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a) / scale
    assert grads_a.keys() == grads_b.keys()
    return out, grad


CASES = [
    # id, window (one per layer if a list), length, batch, global positions per row, padding per row
    ("no-global", 32, 200, 2, [[], []], [0, 40]),
    ("first-token", 32, 200, 2, [[0], [0]], [0, 0]),
    ("first-token-padded-rows", 32, 200, 3, [[0], [0], [0]], [0, 17, 130]),
    ("scattered", 32, 200, 2, [[0, 5, 63, 150], [7]], [0, 25]),
    ("uneven-global-counts", 16, 160, 3, [[0, 1, 2, 3], [], [80]], [10, 0, 0]),
    ("all-global", 32, 96, 2, [list(range(96)), list(range(96))], [0, 30]),
    ("one-window", 64, 64, 2, [[0], [0]], [0, 10]),
    ("shorter-than-a-window", 64, 40, 1, [[0]], [0]),
    ("many-windows", 8, 512, 1, [[0, 300]], [0]),
    ("per-layer-windows", [16, 64], 256, 2, [[0], [0, 100]], [0, 50]),
    ("small-window", 4, 40, 2, [[0], []], [0, 3]),
]


@pytest.mark.parametrize("window, length, batch, globals_, pads", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_outputs_and_gradients_equal_hf_in_fp32(window, length, batch, globals_, pads):
    hf, ours = _pair(window, length)
    inputs = _inputs(batch, length, globals_, pads)
    out, grad = _relative_errors(_run(hf, inputs), _run(ours, inputs))
    assert out <= 1e-5 and grad <= 1e-5, (out, grad)


def test_longformer_base_shaped_layer_equals_hf():
    hf, ours = _pair(512, 1100, layers=1, hidden=96, heads=12)  # head size 8, the base model's window
    inputs = _inputs(1, 1100, [[0, 600]], [0])
    out, grad = _relative_errors(_run(hf, inputs), _run(ours, inputs))
    assert out <= 1e-5 and grad <= 1e-5, (out, grad)


def test_bf16_within_bf16_tolerance():
    hf, ours = _pair(32, 256, dtype=torch.bfloat16)
    inputs = _inputs(2, 256, [[0], [0, 99]], [0, 31])
    out, grad = _relative_errors(_run(hf, inputs), _run(ours, inputs))
    assert out <= 2e-2 and grad <= 5e-2, (out, grad)  # bf16 keeps 8 bits of mantissa: ~4e-3 per rounding


def test_attention_dropout_applies_in_training_only():
    hf, ours = _pair(32, 128, dropout=0.5)
    inputs = _inputs(2, 128, [[0], [0]], [0, 20])
    ours.train()
    torch.manual_seed(3)
    a = ours(**inputs).last_hidden_state
    torch.manual_seed(4)
    b = ours(**inputs).last_hidden_state
    assert not torch.allclose(a, b)  # dropout is on
    ours.eval()
    hf.eval()
    assert torch.allclose(ours(**inputs).last_hidden_state, hf(**inputs).last_hidden_state, atol=1e-5)


def test_output_attentions_falls_back_to_hf_with_a_warning():
    hf, ours = _pair(32, 64, layers=1)
    inputs = _inputs(1, 64, [[0]], [0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ours(**inputs, output_attentions=True)
    assert any("falls back to Hugging Face" in str(w.message) for w in caught)
    reference = hf(**inputs, output_attentions=True)
    assert torch.allclose(out.attentions[0], reference.attentions[0])


def test_twenty_training_steps_give_the_same_losses():
    hf, ours = _pair(32, 128, layers=2, cls=LongformerForSequenceClassification)
    losses = {}
    for name, model in (("hf", hf), ("blocked", ours)):
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        losses[name] = []
        inputs = _inputs(4, 128, [[0]] * 4, [0, 13, 40, 0])
        labels = torch.tensor([1, 2, 0, 2])
        for _ in range(20):  # the same batch: the loss must fall as it is memorised
            loss = model(**inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["hf"] == pytest.approx(losses["blocked"], abs=1e-4)
    assert losses["hf"][-1] < losses["hf"][0]
