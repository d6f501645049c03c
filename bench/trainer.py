"""Figures for the training job, each a ratio of A over B measured in this one run.

1. Trainer overhead: step time of qarac_dist's loop (`Trainer.advance`: step, per-step
   metrics to metrics.jsonl, checks) over a minimal hand-written DeepSpeed loop
   (bench/minimal_loop.py), same config, data order and initial weights, in one process, one
   step of each in turn, the order swapped every step; the median of the per-step ratios. The
   losses must be equal.
2. Activation checkpointing: bytes of activations saved for backward, with over without
   checkpointing, for an 8-layer Longformer at 4096 tokens, and the forward+backward time ratio
   (interleaved, median).
3. Length scaling: saved activation bytes at 4096 tokens over 2048 tokens.

    python bench/trainer.py [--rounds 3] [--steps 30]

Writes bench/results/trainer.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "longformer_synthetic.yaml"


def trainer_overhead(steps: int, warmup: int) -> dict:
    """Both loops in this process, one step of each in turn, on the same data order and the
    same initial weights (dropout off: the two loops would otherwise draw from one RNG)."""
    import deepspeed
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import minimal_loop

    from qarac_dist.config import load_config
    from qarac_dist.train.loop import Trainer
    from qarac_dist.train.ranks import export_from_environment

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(CONFIG, [f"training.max_steps={steps}", "training.log_every=1",
                                   f"evaluation.every_steps={10**6}", "output.export_best=false", f"output.dir={out}",
                                   "model.config.hidden_dropout_prob=0.0", "model.config.attention_probs_dropout_prob=0.0"])
        ranks = export_from_environment()
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        trainer = Trainer(cfg, ranks)
        trainer.start()
        engine, splits, collate, minimal_batches = minimal_loop.build(cfg, ranks)
        ours, minimal, ours_losses, minimal_losses = [], [], [], []
        def ours_step():
            started = time.perf_counter()
            trainer.advance()
            ours.append(time.perf_counter() - started)

        def minimal_step():
            started = time.perf_counter()
            minimal_losses.append(minimal_loop.step(engine, splits, collate, next(minimal_batches)))
            minimal.append(time.perf_counter() - started)

        for i in range(steps - 1):  # the last step would validate
            # ABBA order: neither loop always goes first.
            for run_step in ((ours_step, minimal_step) if i % 2 == 0 else (minimal_step, ours_step)):
                run_step()
        trainer.tracker.close()
        from qarac_dist.track.trial_dir import read_metrics

        ours_losses = [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")]
        torch.distributed.destroy_process_group()
    ratios = [a / b for a, b in zip(ours[warmup:], minimal[warmup:])]
    return {"ours_step_s": statistics.median(ours[warmup:]), "minimal_step_s": statistics.median(minimal[warmup:]),
            "ratio": statistics.median(ratios), "steps": steps, "warmup": warmup,
            "max_loss_difference": max(abs(a - b) for a, b in zip(ours_losses, minimal_losses))}


def longformer(layers: int, checkpointing: bool):
    import torch
    from transformers import LongformerConfig, LongformerForSequenceClassification

    torch.manual_seed(0)
    config = LongformerConfig(num_hidden_layers=layers, hidden_size=256, num_attention_heads=4,
                              intermediate_size=1024, attention_window=256, vocab_size=4000,
                              max_position_embeddings=4098 + 2, num_labels=4,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = LongformerForSequenceClassification(config)
    if checkpointing:
        from qarac_dist.train.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    return model.train()


def saved_activation_bytes(model, tokens: int) -> tuple[int, float]:
    """Saved activation bytes of one forward (preflight's count: distinct saved storages plus
    what checkpointed layers keep for recomputation) and the seconds of forward + backward."""
    import torch

    from qarac_dist.preflight.memory import saved_activation_bytes as count

    ids = torch.randint(5, 4000, (1, tokens))
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "global_attention_mask": glob,
             "labels": torch.tensor([1])}
    started = time.perf_counter()
    saved = count(model, batch)
    return saved, time.perf_counter() - started


def checkpointing_memory(repeats: int) -> dict:
    plain, ckpt = longformer(8, False), longformer(8, True)
    ckpt.load_state_dict(plain.state_dict())
    saved, times = {}, {"plain": [], "ckpt": []}
    for _ in range(repeats):  # interleaved
        for name, model in (("plain", plain), ("ckpt", ckpt)):
            saved[name], seconds = saved_activation_bytes(model, 4096)
            times[name].append(seconds)
    short, _ = saved_activation_bytes(plain, 2048)
    short_ckpt, _ = saved_activation_bytes(ckpt, 2048)
    return {
        "saved_bytes_plain_4096": saved["plain"], "saved_bytes_ckpt_4096": saved["ckpt"],
        "memory_ratio": saved["ckpt"] / saved["plain"],
        "step_s_plain": statistics.median(times["plain"]), "step_s_ckpt": statistics.median(times["ckpt"]),
        "time_ratio": statistics.median(times["ckpt"]) / statistics.median(times["plain"]),
        "saved_bytes_plain_2048": short, "length_ratio": saved["plain"] / short,
        "length_ratio_ckpt": saved["ckpt"] / short_ckpt, "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of each loop, interleaved")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the step time")
    parser.add_argument("--repeats", type=int, default=5, help="forward+backward repeats per model")
    parser.add_argument("--only", choices=["overhead", "memory"], help="measure one part only (no JSON written)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.only == "overhead":
        print(json.dumps(trainer_overhead(args.steps, args.warmup), indent=2))
        return

    memory = checkpointing_memory(args.repeats)
    overhead = trainer_overhead(args.steps, args.warmup)
    results = {"command": "python " + " ".join(sys.argv), "overhead": overhead, "checkpointing": memory,
               "cpus": os.cpu_count()}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "trainer.json").write_text(json.dumps(results, indent=2))
    mib = 2**20
    print("| figure | A | B | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| trainer overhead (step time, ours / minimal loop) | {overhead['ours_step_s']:.3f} s | "
          f"{overhead['minimal_step_s']:.3f} s | {overhead['ratio']:.3f} | <= 1.03 "
          f"(max loss difference {overhead['max_loss_difference']:.1e}) |")
    print(f"| checkpointing memory (saved activations, 8 layers, 4096 tokens) | {memory['saved_bytes_ckpt_4096'] / mib:.1f} MiB | "
          f"{memory['saved_bytes_plain_4096'] / mib:.1f} MiB | {memory['memory_ratio']:.3f} | <= 0.25 |")
    print(f"| checkpointing time (forward+backward) | {memory['step_s_ckpt']:.2f} s | {memory['step_s_plain']:.2f} s | "
          f"{memory['time_ratio']:.2f} | <= 1.4 |")
    print(f"| length scaling (saved activations, 4096 / 2048 tokens) | {memory['saved_bytes_plain_4096'] / mib:.1f} MiB | "
          f"{memory['saved_bytes_plain_2048'] / mib:.1f} MiB | {memory['length_ratio']:.2f} | 1.8 to 2.2 |")


if __name__ == "__main__":
    main()
