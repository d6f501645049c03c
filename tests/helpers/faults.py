"""Test hooks for failure cases, importable by jobs (the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import torch
from torch import nn


class NanAfter(nn.Module):
    """A Longformer classifier whose training loss turns NaN after `steps` forward passes."""

    def __init__(self, inner: nn.Module, steps: int):
        super().__init__()
        self.inner, self.steps, self.calls = inner, steps, 0
        self.config = inner.config

    def forward(self, **batch):
        out = self.inner(**batch)
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                out["loss"] = out["loss"] * torch.tensor(float("nan"))
        return out


def nan_after(num_labels, tokenizer, steps=3):
    from transformers import LongformerConfig, LongformerForSequenceClassification

    config = LongformerConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              attention_window=32, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              max_position_embeddings=330, num_labels=num_labels)
    return NanAfter(LongformerForSequenceClassification(config), steps)


def _tiny_longformer(num_labels, tokenizer, **fields):
    from transformers import LongformerConfig, LongformerForSequenceClassification

    config = LongformerConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              attention_window=32, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              max_position_embeddings=330, num_labels=num_labels, **fields)
    return LongformerForSequenceClassification(config)


class SlowSteps(nn.Module):
    """A classifier whose every training forward also sleeps: steps that take wall time
    whatever the machine's speed, so training outlasts an allocation by construction. With
    `until`, a file's path, the sleeping stops once the test has made that file: what runs after
    the interruption a test is about (the resumed run) goes at the machine's speed."""

    def __init__(self, inner: nn.Module, seconds: float, until: str | None = None):
        super().__init__()
        self.inner, self.seconds, self.until = inner, seconds, until
        self.config = inner.config

    def forward(self, **batch):
        import os
        import time

        if self.training and not (self.until and os.path.exists(self.until)):
            time.sleep(self.seconds)
        return self.inner(**batch)


def slow_steps(num_labels, tokenizer, seconds=0.1, until=None):
    return SlowSteps(_tiny_longformer(num_labels, tokenizer), seconds, until)


def start_until_warned(num_labels, tokenizer):
    """Start-up that lasts until SLURM's warning signal arrives: the allocation is used up before
    the first step, every time."""
    import time

    from qarac_dist.train.stop import STOP

    while STOP.signum is None:
        time.sleep(0.1)
    return _tiny_longformer(num_labels, tokenizer)


def fail_unless(num_labels, tokenizer, marker: str):
    """A model that cannot be built until `marker` exists: a failure the user fixes by hand."""
    from pathlib import Path

    if not Path(marker).exists():
        raise RuntimeError(f"the fix is not in place yet ({marker} is missing)")
    return _tiny_longformer(num_labels, tokenizer)


def environment_seen(num_labels, tokenizer, names, into):
    """A tiny Longformer, after this process writes what it sees of the variables `names` into
    a file of its own under `into` (environment.setup and environment.variables reach it)."""
    import json
    import os
    from pathlib import Path

    import shutil

    Path(into).mkdir(parents=True, exist_ok=True)
    seen = {n: os.environ.get(n) for n in names}
    seen["scontrol"] = shutil.which("scontrol")  # no SLURM command inside a container's image
    (Path(into) / f"{os.getpid()}.json").write_text(json.dumps(seen))
    return _tiny_longformer(num_labels, tokenizer)
