"""qarac_dist's trainer against the HF Trainer and Lightning on one job, in one run (issue 7).

The job: the demo Longformer (configs/longformer_synthetic.yaml) on the generated long-document
set, ZeRO-2, 2 ranks, dropout off, a constant learning rate. All three systems get the same
initial weights (the model is built once per process with the same seed, by qarac_dist's own
builder), the same optimizer (AdamW, no decay on biases and norms) and the same micro batches
on each rank in the same order: qarac_dist's step plan is handed to the peers as their data,
and every system records the example ids it trained on, which must match. Each system runs as
its own `torchrun` job, one after another, the order rotated every round.

Per system it reports the median steady-state step time (wall time between optimizer steps on
rank 0, first `--warmup` steps left out), time from process start to the end of the first
optimizer step, peak RSS per rank, tokens/s (non-pad tokens over all ranks) and the loss after
the last step (mean over ranks and micro batches).

    pip install -e ".[bench]"
    python bench/peers.py [--rounds 3] [--steps 40]              # the demo job, 2 CPU ranks
    python bench/peers.py --job base --steps 6 --warmup 2        # Longformer-base-shaped, 2 layers, 4096 tokens
    python bench/peers.py --gpu [--dtype bf16|fp16]             # 1 GPU, Longformer-base size, 4096 tokens

qarac_dist runs with its own (blocked) Longformer attention, the default; the HF Trainer and
Lightning run Hugging Face's LongformerSelfAttention, as their users get it.

Writes bench/results/peers.json (peers_base.json, peers_gpu.json) and prints a markdown table.

Lightning's DeepSpeed strategy refuses any accelerator but CUDA (a check in
`DeepSpeedStrategy.setup_environment`); on CPU this script runs it through a subclass that skips
only that check.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "longformer_synthetic.yaml"
SYSTEMS = ("qarac_dist", "hf_trainer", "lightning")

# Longformer-base geometry for the GPU mode (randomly initialised: nothing is downloaded).
BASE_SIZE = ["model.config.num_hidden_layers=12", "model.config.hidden_size=768",
             "model.config.num_attention_heads=12", "model.config.intermediate_size=3072",
             "model.config.attention_window=512", "tokenizer.vocab_size=30000",
             "model.activation_checkpointing=true", "data.synthetic.min_tokens=4096",
             "data.synthetic.max_tokens=4096", "data.max_length=4096", "data.synthetic.num_train=512"]


# The Longformer-base layer on 2 CPU ranks: two layers of it, one 4096-token document per rank.
BASE_LAYERS = ["model.config.num_hidden_layers=2", "model.config.hidden_size=768",
               "model.config.num_attention_heads=12", "model.config.intermediate_size=3072",
               "model.config.attention_window=512", "data.synthetic.min_tokens=4096",
               "data.synthetic.max_tokens=4096", "data.max_length=4096", "data.synthetic.num_train=64",
               "data.synthetic.num_validation=8"]


def job_overrides(args) -> list[str]:
    """The one job all three systems run, as overrides of the demo config."""
    overrides = [
        f"training.micro_batch_size={args.micro_batch}", f"training.gradient_accumulation_steps={args.accumulation}",
        # One step more than is run: qarac_dist validates at max_steps, which no peer does here.
        f"training.max_steps={args.steps + 1}", "training.log_every=10", "training.seed=0",
        "evaluation.every_steps=1000000", "output.export_best=false", "checkpointing.every_steps=null",
        "scheduler.kind=constant", "scheduler.warmup_steps=0", "deepspeed.zero_stage=2",
        "model.config.hidden_dropout_prob=0.0", "model.config.attention_probs_dropout_prob=0.0",
    ]
    if args.gpu:
        overrides += BASE_SIZE + [f"precision.dtype={args.dtype}"]
    elif args.job == "base":
        overrides += BASE_LAYERS
    return overrides


# ---------------------------------------------------------------------------- one rank of one system
class Recorder:
    """Wall time at the end of each optimizer step, the loss of each micro batch, and the
    example ids each micro batch held."""

    def __init__(self):
        import psutil

        self.process_start = psutil.Process().create_time()
        self.step_ends: list[float] = []
        self.losses: list = []
        self.rows: list[list[int]] = []
        self.engine = None  # the DeepSpeed engine, once the system has made it
        self.grad_norms: list[float] = []

    def watch(self, model) -> None:
        """Keep the loss of every forward of `model` (detached: no device sync per step)."""
        model.register_forward_hook(lambda module, args, output: self.losses.append(output.loss.detach().clone()))

    def step_end(self) -> None:
        sync()
        self.step_ends.append(time.time())
        if self.engine is not None:  # the norm DeepSpeed computed for clipping (no extra work)
            norm = self.engine.get_global_grad_norm()
            self.grad_norms.append(float("nan") if norm is None else float(norm))

    def result(self, ranks, tokens_per_step: list[int]) -> dict:
        import torch

        peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {"rank": ranks.rank, "process_start": self.process_start, "step_ends": self.step_ends,
                "losses": [float(x) for x in self.losses], "grad_norms": self.grad_norms, "rows": self.rows,
                "tokens_per_step": tokens_per_step,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_gpu_bytes": peak_gpu}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(cfg, ranks):
    """Data, model and this rank's micro batches exactly as qarac_dist's trainer makes them."""
    import numpy as np

    from qarac_dist.train import batches as batching
    from qarac_dist.train.build import build_parts

    parts = build_parts(cfg)
    splits, model, collate = parts.splits, parts.model, parts.collate
    steps = cfg.training.max_steps - 1

    def plan(rank: int) -> list[list]:
        batches = batching.StepBatches(np.asarray(splits.train["length"][:]), cfg.training.micro_batch_size,
                                   cfg.training.gradient_accumulation_steps, ranks.world_size, rank,
                                   cfg.training.seed, cfg.data.length_grouping).iterate()
        return [next(batches) for _ in range(steps)]

    return splits, model, collate, plan


def run_qarac_dist(cfg, ranks, recorder: Recorder) -> list[int]:
    """The trainer's own loop (`Trainer.train` without the final export)."""
    from qarac_dist.train.loop import Trainer

    trainer = Trainer(cfg, ranks)
    recorder.watch(trainer.engine.module)
    recorder.engine = trainer.engine
    trainer.start()
    tokens = []
    lengths = trainer.splits.train["length"]
    for _ in range(cfg.training.max_steps - 1):
        position, micro_batches = trainer.next_batch()
        recorder.rows += [m.tolist() for m in micro_batches]
        tokens.append(sum(lengths[int(i)] for m in micro_batches for i in m))
        trainer.advance((position, micro_batches))
        recorder.step_end()
    trainer.tracker.close()
    return tokens


def run_hf_trainer(cfg, ranks, recorder: Recorder) -> list[int]:
    """transformers.Trainer with the same DeepSpeed JSON. Its sampler is sequential and the data
    is laid out so that accelerate's batch sharding (global batch k*world + rank goes to rank)
    deals every rank the micro batches qarac_dist's plan gives it."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qarac_dist.config import deepspeed_config
    from qarac_dist.train.build import optimizer_for

    splits, model, collate, plan = build(cfg, ranks)
    recorder.watch(model)
    plans = [plan(r) for r in range(ranks.world_size)]
    order = [int(i) for s in range(len(plans[0])) for a in range(cfg.training.gradient_accumulation_steps)
             for r in range(ranks.world_size) for i in plans[r][s][a]]
    train = splits.train.add_column("row", list(range(len(splits.train)))).select(order)

    def collate_rows(features: list[dict]) -> dict:
        recorder.rows.append([f["row"] for f in features])
        return collate({k: [f[k] for f in features] for k in ("input_ids", "labels")})

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorder.engine = trainer.model_wrapped
            recorder.step_end()

    t = cfg.training
    args = TrainingArguments(
        output_dir=cfg.output.dir, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=len(plans[0]),
        learning_rate=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, lr_scheduler_type="constant",
        max_grad_norm=cfg.deepspeed.gradient_clipping, logging_steps=t.log_every, save_strategy="no", eval_strategy="no",
        report_to=[], seed=t.seed, train_sampling_strategy="sequential", remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, deepspeed=deepspeed_config(cfg, ranks.world_size),
        bf16=cfg.precision.dtype == "bf16", fp16=cfg.precision.dtype == "fp16", use_cpu=not gpu_available())
    # Longformer's forward takes **kwargs, so the Trainer would assume it divides its loss by
    # `num_items_in_batch` (a count over the accumulated micro batches and the ranks), and it
    # would skip its own 1/accumulation and multiply by the world size: this classifier takes
    # the mean itself, so its gradients would be accumulation x world size too large. Tell the
    # Trainer the truth.
    model.accepts_loss_kwargs = False
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate_rows,
                      optimizers=(optimizer_for(cfg, model), None), callbacks=[Record()])
    trainer.train()
    lengths = splits.train["length"]
    return [sum(lengths[int(i)] for m in step for i in m) for step in plans[ranks.rank]]


def run_lightning(cfg, ranks, recorder: Recorder) -> list[int]:
    """Lightning's DeepSpeed strategy; each rank's loader yields its planned micro batches."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies.ddp import DDPStrategy

    from qarac_dist.config import deepspeed_config
    from qarac_dist.train.build import optimizer_for

    splits, model, collate, plan = build(cfg, ranks)
    recorder.watch(model)
    mine = [m for step in plan(ranks.rank) for m in step]

    class Planned(torch.utils.data.Dataset):
        def __len__(self):
            return len(mine)

        def __getitem__(self, k):
            recorder.rows.append(mine[k].tolist())
            return collate(splits.train[mine[k].tolist()])

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return optimizer_for(cfg, self.model)

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % cfg.training.gradient_accumulation_steps == 0:
                recorder.engine = trainer.strategy.model
                recorder.step_end()

    class Strategy(DeepSpeedStrategy):
        """On CPU, the strategy minus its check that the accelerator is CUDA."""

        def setup_environment(self) -> None:
            if gpu_available():
                super().setup_environment()
            else:
                DDPStrategy.setup_environment(self)

    ds = deepspeed_config(cfg, ranks.world_size)
    ds.pop("gradient_accumulation_steps")  # Lightning sets it from accumulate_grad_batches
    strategy = Strategy(config=ds)
    if not gpu_available():  # indexed CPU devices, as DeepSpeed wants a device rank
        strategy = Strategy(config=ds, parallel_devices=[torch.device("cpu", i) for i in range(ranks.world_size)])
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[cfg.precision.dtype]
    trainer = L.Trainer(
        accelerator="gpu" if gpu_available() else "cpu", devices=ranks.world_size if not gpu_available() else 1,
        num_nodes=1, strategy=strategy, precision=precision, max_steps=cfg.training.max_steps - 1,
        accumulate_grad_batches=cfg.training.gradient_accumulation_steps, use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Record()], default_root_dir=cfg.output.dir)
    trainer.fit(Module(), torch.utils.data.DataLoader(Planned(), batch_size=None, shuffle=False))
    lengths = splits.train["length"]
    return [sum(lengths[int(i)] for m in step for i in m) for step in plan(ranks.rank)]


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def worker(system: str, overrides: list[str], result_dir: Path) -> None:
    recorder = Recorder()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from qarac_dist.config import load_config
    from qarac_dist.train.ranks import export_from_environment

    attention = "blocked" if system == "qarac_dist" else "hf"  # the peers as their users get them
    cfg = load_config(CONFIG, overrides + [f"model.longformer_attention={attention}"])
    ranks = export_from_environment()
    if system != "lightning":  # Lightning sets up the process group itself
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if gpu_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    run = {"qarac_dist": run_qarac_dist, "hf_trainer": run_hf_trainer, "lightning": run_lightning}[system]
    tokens = run(cfg, ranks, recorder)
    (result_dir / f"{system}.rank{ranks.rank}.json").write_text(json.dumps(recorder.result(ranks, tokens)))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- the driver
def launch(system: str, args, result_dir: Path, out_dir: Path) -> None:
    procs = 1 if args.gpu else args.ranks
    overrides = job_overrides(args) + [f"output.dir={out_dir}"]
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={procs}", __file__, "--worker", system,
           "--result-dir", str(result_dir), "--", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // procs)))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{system} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def summarise(system: str, result_dir: Path, warmup: int) -> dict:
    """One run of one system: rank 0's step times, every rank's memory, the loss curve."""
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob(f"{system}.rank*.json"))]
    ends = ranks[0]["step_ends"]
    step_times = [b - a for a, b in itertools.pairwise(ends)][warmup:]
    steady_tokens = sum(sum(r["tokens_per_step"][i] for r in ranks) for i in range(warmup + 1, len(ends)))
    per_step = len(ranks[0]["losses"]) // len(ends)  # micro batches (forwards) per step
    loss_curve = [statistics.fmean(r["losses"][s * per_step + j] for r in ranks for j in range(per_step))
                  for s in range(len(ends))]
    return {
        "step_s": statistics.median(step_times),
        "first_step_s": max(r["step_ends"][0] - r["process_start"] for r in ranks),
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
        "peak_gpu_bytes": [r["peak_gpu_bytes"] for r in ranks],
        "tokens_per_s": steady_tokens / sum(step_times),
        "loss_curve": loss_curve,
        "grad_norms": ranks[0]["grad_norms"],
        "rows": [r["rows"] for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each system, order rotated per round")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="step times left out at the start")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (GPU mode: 1 GPU)")
    parser.add_argument("--micro-batch", type=int, help="default: 4 (demo), 1 (base)")
    parser.add_argument("--accumulation", type=int, help="default: 2 (demo), 1 (base)")
    parser.add_argument("--job", choices=["demo", "base"], default="demo",
                        help="demo: the demo Longformer; base: two Longformer-base layers at 4096 tokens")
    parser.add_argument("--gpu", action="store_true", help="Longformer-base size at 4096 tokens, on one GPU")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="GPU mode precision")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest loss difference to call equal")
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = args.job == "base"
    args.micro_batch = args.micro_batch or (1 if base else 4)
    args.accumulation = args.accumulation or (1 if base else 2)
    if args.worker:
        worker(args.worker, args.overrides, args.result_dir)
        return

    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for system in SYSTEMS[r % 3:] + SYSTEMS[:r % 3]:  # each system goes first once in 3 rounds
                result_dir = Path(tmp) / f"{system}.{r}"
                result_dir.mkdir()
                launch(system, args, result_dir, Path(tmp) / f"out.{system}.{r}")
                runs[system].append(summarise(system, result_dir, args.warmup))
                print(f"round {r}: {system} {runs[system][-1]['step_s']:.3f} s/step", file=sys.stderr)
    report(runs, args)


def report(runs: dict[str, list[dict]], args) -> None:
    ours = runs["qarac_dist"]
    same_rows = {s: all(run["rows"] == ours[0]["rows"] for run in runs[s]) for s in SYSTEMS}
    results = {"command": "python " + " ".join(sys.argv), "cpus": os.cpu_count(), "device": device_name(),
               "job": job_overrides(args), "ranks": 1 if args.gpu else args.ranks, "steps": args.steps, "accumulation": args.accumulation,
               "warmup": args.warmup, "rounds": args.rounds, "same_data_order": same_rows, "systems": {}}
    for system in SYSTEMS:
        mine = runs[system]
        curve = mine[0]["loss_curve"]
        results["systems"][system] = {
            "step_s": statistics.median(run["step_s"] for run in mine),
            "first_step_s": statistics.median(run["first_step_s"] for run in mine),
            "peak_rss_mib": max(max(run["peak_rss_bytes"]) for run in mine) / 2**20,
            "peak_gpu_mib": (max(max(run["peak_gpu_bytes"]) for run in mine) / 2**20) if args.gpu else None,
            "tokens_per_s": statistics.median(run["tokens_per_s"] for run in mine),
            "final_loss": curve[-1],
            "max_loss_difference_to_qarac_dist": max(abs(a - b) for a, b in zip(curve, ours[0]["loss_curve"])),
            "first_grad_norm_over_qarac_dist": mine[0]["grad_norms"][0] / ours[0]["grad_norms"][0],
            # per round, ours over this system: the ratio of the medians of runs next to each other
            "step_ratio_ours_over_this": statistics.median(o["step_s"] / m["step_s"] for o, m in zip(ours, mine)),
            "first_step_ratio_ours_over_this": statistics.median(
                o["first_step_s"] / m["first_step_s"] for o, m in zip(ours, mine)),
            "runs": [{k: v for k, v in run.items() if k != "rows"} for run in mine],
        }
    name = "peers_gpu.json" if args.gpu else ("peers_base.json" if args.job == "base" else "peers.json")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / name).write_text(json.dumps(results, indent=2))
    print(table(results, args.tolerance))


def table(results: dict, tolerance: float) -> str:
    memory = "peak GPU memory" if results["systems"]["qarac_dist"]["peak_gpu_mib"] else "peak RSS per rank"
    header = (f"| system | step time | time to first step | {memory} | tokens/s | loss after {results['steps']} steps "
              "| step time, qarac_dist / this | first step, qarac_dist / this |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for system, r in results["systems"].items():
        mem = r["peak_gpu_mib"] or r["peak_rss_mib"]
        same = "" if system == "qarac_dist" else (
            f" (differs by {r['max_loss_difference_to_qarac_dist']:.1e})")
        lines.append(f"| {system} | {r['step_s']:.3f} s | {r['first_step_s']:.2f} s | {mem:.0f} MiB | "
                     f"{r['tokens_per_s']:.0f} | {r['final_loss']:.4f}{same} | {r['step_ratio_ours_over_this']:.3f} | "
                     f"{r['first_step_ratio_ours_over_this']:.3f} |")
    for system, r in results["systems"].items():
        if not results["same_data_order"][system]:
            lines.append(f"\n{system} trained on other micro batches than qarac_dist: its losses are not comparable.")
        elif r["max_loss_difference_to_qarac_dist"] > tolerance:
            why = "with the same gradients at step 1: numerics"
            ratio = r["first_grad_norm_over_qarac_dist"]
            if abs(ratio - 1) > 0.01:
                why = f"its gradients at step 1 are {ratio:.3f}x qarac_dist's (gradient norm)"
                if abs(ratio * results["accumulation"] - 1) < 0.01:
                    why += (f": 1/{results['accumulation']}, the loss divided by the accumulation steps twice "
                            "(by the loop and by DeepSpeed's backward)")
            lines.append(f"\n{system}'s loss curve differs from qarac_dist's by up to "
                         f"{r['max_loss_difference_to_qarac_dist']:.1e} (> {tolerance}) on the same micro batches; {why}.")
    return "\n".join(lines)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
