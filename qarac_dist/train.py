"""`python -m qarac_dist.train CONFIG.yaml [dotted.key=value ...]`: one trial, one explicit loop.

Runs as one process, or as one process per rank under torchrun, the deepspeed launcher, srun
or submitit. Reading order: `Trainer.__init__` builds everything, `Trainer.train` is the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, data, models
from .config import TrainConfig, config_to_dict, deepspeed_config, load_config
from .manifest import write_json
from .metrics import BestTracker, classification_metrics, regression_metrics
from .ranks import Ranks, export_from_environment
from .schema import ConfigError, UserError
from .tracking import MetricsFile, NullTracker, Tracker

# DeepSpeed picks its accelerator when first imported; without CUDA, say CPU before it looks.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(kind: str, warmup_steps: int, max_steps: int):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    import math

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
                "mem_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"mem_rss_mb": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
            "mem_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class Trainer:
    def __init__(self, cfg: TrainConfig, ranks: Ranks):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.ranks = cfg, ranks
        self.out = Path(cfg.output.dir)
        self.checkpoints = self.out / "checkpoints"
        seed_everything(cfg.training.seed)

        # Rank 0 first: it generates data, trains the tokenizer and fills the datasets cache;
        # the others then read the cache instead of racing to write it.
        if not ranks.is_main:
            dist.barrier()
        self.splits = data.prepare(cfg)
        if ranks.is_main:
            dist.barrier()

        torch.manual_seed(cfg.training.seed)
        model = models.build_model(cfg, self.splits.num_labels, self.splits.tokenizer)
        spec = models.input_spec(model)
        self.collate = data.Collator(self.splits.tokenizer.pad_token_id, spec.pad_multiple,
                                     spec.global_first_token, cfg.model.task == "regression")
        opt = cfg.optimizer
        groups = models.param_groups(model, opt.weight_decay)
        if cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
        schedule = lr_lambda(cfg.scheduler.kind, cfg.scheduler.warmup_steps, cfg.training.max_steps)
        self.ds_config = deepspeed_config(cfg, ranks.world_size)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
        self.device = torch.device(get_accelerator().device_name(self.engine.local_rank)) \
            if get_accelerator().device_name() != "cpu" else torch.device("cpu")

        self.batches = data.StepBatches(np.asarray(self.splits.train["length"]), cfg.training.micro_batch_size,
                                        cfg.training.gradient_accumulation_steps, ranks.world_size,
                                        ranks.rank, cfg.training.seed, cfg.data.length_grouping)
        lengths = np.asarray(self.splits.validation["length"])
        self.val_order = np.argsort(-lengths, kind="stable")
        self.best = BestTracker(cfg.evaluation.metric, cfg.evaluation.mode, cfg.early_stopping.min_delta)
        self.step = 0
        self.tracker: Tracker = NullTracker()
        if ranks.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
            (self.out / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
            self.tracker = MetricsFile(self.out / "metrics.jsonl")

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        self.resume()
        stopped_early = False
        steps = self.batches.iterate(start_step=self.step)
        window = _Window(self.device)
        started = time.perf_counter()
        while self.step < t.max_steps:
            step_started = time.perf_counter()
            loss, tokens = self.train_step(next(steps))
            window.add(loss, tokens, time.perf_counter() - step_started)
            self.step += 1
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.tracker.log(self.step, window.flush(self.engine, self.scheduler))
            if cfg.checkpointing.every_steps and self.step % cfg.checkpointing.every_steps == 0:
                self.save_checkpoint()
            if self.step % cfg.evaluation.every_steps == 0 or self.step == t.max_steps:
                if self.validate_and_keep_best():
                    stopped_early = True
                    break
        result = {"steps": self.step, "stopped_early": stopped_early,
                  "train_seconds": time.perf_counter() - started, "metric": self.best.metric,
                  "best_value": self.best.best, "best_step": self.best.best_step,
                  "best_dir": str(self.out / "best") if cfg.output.export_best else None}
        if self.ranks.is_main:
            (self.out / "result.json").write_text(json.dumps(result, indent=2))
        self.tracker.close()
        return result

    def train_step(self, micro_batches: list[np.ndarray]) -> tuple[torch.Tensor, int]:
        """Forward, backward and (at the accumulation boundary) optimizer step."""
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for indices in micro_batches:
            batch = self.to_device(self.collate(self.splits.train[indices.tolist()]))
            loss = models.output_value(self.engine(**batch), "loss")
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
            tokens += int(batch["attention_mask"].sum())
        return loss_sum / len(micro_batches), tokens

    def validate_and_keep_best(self) -> bool:
        """Validate; export the model if it is the best so far; True if training should stop."""
        metrics = self.evaluate()
        self.tracker.log(self.step, {f"val_{k}": v for k, v in metrics.items()})
        if self.best.update(self.step, metrics[self.cfg.evaluation.metric]) and self.cfg.output.export_best:
            self.export(self.out / "best", metrics)
        return self.best.should_stop(self.cfg.early_stopping.patience)

    # ------------------------------------------------------------------ pieces
    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Each rank runs the same number of forward passes (ZeRO-3 gathers parameters
        collectively); a rank whose shard ran out repeats an example and drops its output."""
        size = self.cfg.evaluation.batch_size
        mine = self.val_order[self.ranks.rank::self.ranks.world_size]
        num_batches = -(-(-(-len(self.val_order) // self.ranks.world_size)) // size)
        self.engine.eval()
        outputs, indices = [], []
        for b in range(num_batches):
            chunk = mine[b * size:(b + 1) * size]
            rows = chunk if len(chunk) else self.val_order[:1]
            batch = self.to_device(self.collate(self.splits.validation[rows.tolist()]))
            batch.pop("labels")
            logits = models.output_value(self.engine(**batch), "logits")
            outputs.append(logits[: len(chunk)].float().cpu().numpy())
            indices.append(chunk)
        self.engine.train()
        gathered = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, (np.concatenate(indices), np.concatenate(outputs)))
        order = np.concatenate([g[0] for g in gathered])
        logits = np.concatenate([g[1] for g in gathered])
        labels = np.asarray(self.splits.validation["labels"])[order]
        if self.cfg.model.task == "regression":
            return regression_metrics(logits.reshape(-1), labels)
        return classification_metrics(logits, labels)

    def export(self, target: Path, metrics: dict[str, float]) -> None:
        """Write a consolidated save_pretrained directory (safetensors) and the tokenizer,
        under a temporary name, then rename it into place. Collective under ZeRO-3."""
        from transformers import PreTrainedModel

        module = self.engine.module
        if self.cfg.deepspeed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = module.state_dict() if self.ranks.is_main else None
        if not self.ranks.is_main:
            return
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(module, PreTrainedModel):
            module.save_pretrained(str(tmp), state_dict=state)
        else:
            from safetensors.torch import save_file

            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        self.splits.tokenizer.save_pretrained(str(tmp))
        (tmp / "qarac_best.json").write_text(json.dumps({"step": self.step, "metric": self.best.metric,
                                                          "metrics": metrics}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "best": vars(self.best).copy()}
        checkpoint.save(self.engine, self.checkpoints, self.step, state, self.ranks.rank,
                        self.cfg.checkpointing.keep_last)

    def resume(self) -> None:
        if not self.cfg.checkpointing.resume:
            return
        tags = checkpoint.complete_tags(self.checkpoints)
        if not tags:
            return
        state = checkpoint.load(self.engine, self.checkpoints, tags[-1], self.ranks.rank)
        self.step = state["step"]
        for key, value in state["best"].items():
            setattr(self.best, key, value)


class _Window:
    """Loss, tokens and step time since the last log; reduced over ranks only when logged."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, loss: torch.Tensor, tokens: int, seconds: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def flush(self, engine, scheduler) -> dict[str, float]:
        if self.device.type == "cuda":
            waited = time.perf_counter()
            torch.cuda.synchronize(self.device)  # only here, so the step itself never waits
            self.seconds += time.perf_counter() - waited
        totals = torch.stack([self.loss_sum, torch.tensor(float(self.tokens), device=self.device)]).double()
        dist.all_reduce(totals)
        world = dist.get_world_size()
        elapsed = self.seconds
        metrics = {"loss": float(totals[0]) / (self.steps * world), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": float(totals[1]) / elapsed, "step_seconds": elapsed / self.steps}
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        if engine.fp16_enabled():
            metrics["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", getattr(engine.optimizer, "cur_scale", 0.0)))
            metrics["skipped_steps"] = float(engine.skipped_steps)
        metrics.update(memory_metrics(self.device))
        self._reset()
        return metrics


def run(cfg: TrainConfig) -> dict:
    """Set up torch.distributed from the environment, train, tear down. Returns the result.

    Rank 0 keeps `state.json` in the output directory: RUNNING, then COMPLETED or FAILED with
    the error's line; the sweep's status reads it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ranks = export_from_environment()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False, verbose=False)
    state_file = Path(cfg.output.dir) / "state.json"
    try:
        if ranks.is_main:
            write_json(state_file, {"state": "RUNNING", "pid": os.getpid(), "host": socket.gethostname(),
                                    "world_size": ranks.world_size, "started": time.time()})
        result = Trainer(cfg, ranks).train()
        if ranks.is_main:
            write_json(state_file, {"state": "COMPLETED", **result})
        return result
    except Exception as err:
        if ranks.is_main:
            line = (str(err).strip().splitlines() or [""])[-1]
            write_json(state_file, {"state": "FAILED", "error": f"{type(err).__name__}: {line}"})
        raise
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except UserError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
