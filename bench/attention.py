"""qarac_dist's blocked Longformer attention against Hugging Face's, at three shapes, in one run.

For each shape: forward + backward of one self-attention module (global attention on the first
token), and a whole model's training step (forward, backward, AdamW step; the model as many
layers as the shape says), blocked vs HF, interleaved (AB, BA, ...), median of `--repeats`; and the peak
of live tensor bytes over a forward and backward of each (preflight's measure,
`preflight.memory.peak_activation_bytes`). Same weights and inputs for both.

    python bench/attention.py [--repeats 5] [--threads 2]

Writes bench/results/attention.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, heads, window, layers, batch, tokens
    "demo (hidden 64, 2 heads, window 64, 2 layers, 8 x 2048)": (64, 2, 64, 2, 8, 2048),
    "hidden 256, 4 heads, window 256, 2 layers, 1 x 4096": (256, 4, 256, 2, 1, 4096),
    "longformer-base layer (hidden 768, 12 heads, window 512), 2 layers, 1 x 4096": (768, 12, 512, 2, 1, 4096),
}


def models(hidden, heads, window, layers, tokens):
    from transformers import LongformerConfig, LongformerForSequenceClassification

    from qarac_dist.train.longformer_attention import install

    torch.manual_seed(0)
    cfg = LongformerConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                           intermediate_size=4 * hidden, attention_window=window, vocab_size=4000,
                           max_position_embeddings=tokens + 2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, num_labels=4)
    hf = LongformerForSequenceClassification(cfg)
    blocked = copy.deepcopy(hf)
    install(blocked)
    return {"hf": hf, "blocked": blocked}


def batch(batch_size, tokens):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 4000, (batch_size, tokens), generator=g)
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "global_attention_mask": glob,
            "labels": torch.randint(0, 4, (batch_size,), generator=g)}


class ModuleLoss(torch.nn.Module):
    """One self-attention module with HF's mask arguments, its output summed: what the module's
    forward and backward cost."""

    def __init__(self, attention, hidden, tokens, batch_size):
        super().__init__()
        self.attention = attention
        mask = torch.zeros(batch_size, tokens)
        mask[:, 0] = 10000.0  # the first token global, as LongformerModel passes it
        self.mask = mask

    def forward(self, hidden_states):
        out = self.attention(hidden_states, attention_mask=self.mask, is_index_masked=self.mask < 0,
                             is_index_global_attn=self.mask > 0, is_global_attn=True)[0]
        return {"loss": out.float().pow(2).mean()}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(name, shape, repeats: int) -> dict:
    from qarac_dist.preflight.memory import peak_activation_bytes

    hidden, heads, window, layers, batch_size, tokens = shape
    pair = models(hidden, heads, window, layers, tokens)
    inputs = batch(batch_size, tokens)
    hidden_states = torch.randn(batch_size, tokens, hidden, generator=torch.Generator().manual_seed(2))
    modules = {k: ModuleLoss(m.longformer.encoder.layer[0].attention.self, hidden, tokens, batch_size)
               for k, m in pair.items()}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in pair.items()}

    def module_step(kind):
        x = hidden_states.clone().requires_grad_(True)
        modules[kind](x)["loss"].backward()

    def model_step(kind):
        optimizers[kind].zero_grad(set_to_none=True)
        pair[kind](**inputs).loss.backward()
        optimizers[kind].step()

    times = {(what, kind): [] for what in ("module", "model") for kind in ("hf", "blocked")}
    for what, step in (("module", module_step), ("model", model_step)):
        step("hf"), step("blocked")  # warm-up: allocator, kernels
        for r in range(repeats):
            for kind in (("hf", "blocked") if r % 2 == 0 else ("blocked", "hf")):  # AB, BA, AB, ...
                times[(what, kind)].append(timed(lambda: step(kind)))
    peak = {}
    for kind in ("hf", "blocked"):
        x = hidden_states.clone().requires_grad_(True)
        peak[("module", kind)] = peak_activation_bytes(modules[kind], {"hidden_states": x})
        peak[("model", kind)] = peak_activation_bytes(pair[kind], inputs)
    out = {"shape": name}
    for what in ("module", "model"):
        hf, ours = statistics.median(times[(what, "hf")]), statistics.median(times[(what, "blocked")])
        ratios = [b / h for h, b in zip(times[(what, "hf")], times[(what, "blocked")])]
        out[what] = {"hf_s": hf, "blocked_s": ours, "ratio": statistics.median(ratios),
                     "hf_peak_bytes": peak[(what, "hf")], "blocked_peak_bytes": peak[(what, "blocked")]}
    print(f"{name}: module {out['module']['ratio']:.3f}, model step {out['model']['ratio']:.3f}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"command": "python " + " ".join(sys.argv), "threads": args.threads, "torch": torch.__version__,
               "shapes": [measure(name, shape, args.repeats) for name, shape in SHAPES.items()]}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "attention.json").write_text(json.dumps(results, indent=2))
    print("| shape | what | HF | blocked | blocked / HF (median of per-repeat ratios) | peak activation bytes, HF | blocked |")
    print("|---|---|---|---|---|---|---|")
    for r in results["shapes"]:
        for what, label in (("module", "attention module, forward + backward"), ("model", "model step")):
            m = r[what]
            print(f"| {r['shape']} | {label} | {m['hf_s']:.3f} s | {m['blocked_s']:.3f} s | {m['ratio']:.3f} | "
                  f"{m['hf_peak_bytes'] / 2**20:.0f} MiB | {m['blocked_peak_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
