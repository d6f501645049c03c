"""`python -m qarac_dist.train CONFIG.yaml [dotted.key=value ...]`: one trial, one explicit loop.

Runs as one process, or as one process per rank under torchrun, the deepspeed launcher, srun
or submitit. Reading order: `Trainer.__init__` builds everything, `Trainer.train` is the loop.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from . import checkpoint, data, models
from .config import TrainConfig, config_to_dict, deepspeed_config, load_config
from .manifest import read_json, update_json, write_json
from .metrics import BestTracker, classification_metrics, regression_metrics
from .ranks import Ranks, export_from_environment
from .schema import ConfigError, UserError
from .schema import flatten
from .tracking import MetricsFile, NullTracker, Tracker, Trackers, TrialRun, read_metrics

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
    return {"mem_rss_mb": rss_bytes() / 2**20,
            "mem_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssGrowth:
    """The peak growth of this process's RSS over a block, sampled from a thread:
    `with RssGrowth() as rss: ...`, then `rss.bytes`."""

    def __init__(self, interval_s: float = 0.001):
        import threading

        self.interval_s, self.stop = interval_s, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.before = self.peak = self.bytes = 0

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssGrowth:
        self.before = self.peak = rss_bytes()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.bytes = max(self.peak, rss_bytes()) - self.before


class Trainer:
    def __init__(self, cfg: TrainConfig, ranks: Ranks, trial_run: TrialRun | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.ranks, self.trial_run = cfg, ranks, trial_run
        self.out = Path(cfg.output.dir)
        self.checkpoints = self.out / "checkpoints"
        seed_everything(cfg.training.seed)
        # Flags (cache state, stop signals) travel on a CPU (gloo) group, so checking them never
        # syncs a GPU stream and works whatever the main backend is.
        self.control_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

        # On a cold cache rank 0 goes first: it generates data, trains the tokenizer and fills
        # the datasets cache; the others then read the cache instead of racing to write it.
        # Once every rank sees a completed preparation of this recipe, they all read at once.
        warm = torch.tensor([int(data.prepared_marker(cfg).exists())])
        if ranks.world_size > 1:
            dist.all_reduce(warm, op=dist.ReduceOp.MIN, group=self.control_group)
        if not warm and not ranks.is_main:
            dist.barrier()
        self.splits = data.prepare(cfg)
        if not warm and ranks.is_main:
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
        self.resume_tag = self.resume_checkpoint_tag()
        if self.resume_tag is not None and self.resume_tag.endswith("_universal"):
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
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

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        self.start()
        steps = self.batches.iterate(start_step=self.step)
        stopped_early = False
        started = time.perf_counter()
        while self.step < self.cfg.training.max_steps and not stopped_early:
            stopped_early = self.advance(next(steps))
        if self.cfg.output.export_last:
            self.export(self.out / "last", {}, "qarac_last.json")
        result = {"steps": self.step, "stopped_early": stopped_early,
                  "train_seconds": time.perf_counter() - started, "metric": self.best.metric,
                  "best_value": self.best.best, "best_step": self.best.best_step,
                  "best_dir": str(self.out / "best") if self.cfg.output.export_best else None}
        if self.ranks.is_main:
            (self.out / "result.json").write_text(json.dumps(result, indent=2))
        self.tracker.close()
        return result

    def start(self) -> None:
        """Resume from the newest complete checkpoint, if any; open the trackers (rank 0)."""
        self.resume()
        if self.ranks.is_main:
            # Rows after the resumed step are recomputed, so the file keeps only those before.
            trackers: list[Tracker] = [MetricsFile(self.out / "metrics.jsonl", keep_through_step=self.step)]
            if self.trial_run is not None:
                logger = self.trial_run.logger()
                # metrics.jsonl is the durable record: what an interrupted job had not yet sent
                # goes now (the logger drops the steps MLflow already holds).
                for row in read_metrics(self.out / "metrics.jsonl"):
                    logger.log(row.pop("step"), row)
                trackers.append(logger)
                self.trial_run.log_dict(self.ds_config, "deepspeed_config.json")
            self.tracker = Trackers(*trackers)
        self.window = _Window(self.device)
        self.nonfinite = _NonFinite(self.cfg.training.max_nonfinite_steps)

    def advance(self, micro_batches: list[np.ndarray]) -> bool:
        """One optimizer step, then what falls due after it: log, validate (keep the best),
        checkpoint, honour a stop signal. Returns True when early stopping says stop."""
        cfg, t = self.cfg, self.cfg.training
        step_started = time.perf_counter()
        loss, tokens = self.train_step(micro_batches)
        self.window.add(loss, tokens, time.perf_counter() - step_started)
        self.step += 1
        self.nonfinite.check(self.step, float(loss))
        if self.step % t.log_every == 0 or self.step == t.max_steps:
            self.tracker.log(self.step, self.window.flush(self.engine, self.scheduler))
        stop_early = False
        if self.step % cfg.evaluation.every_steps == 0 or self.step == t.max_steps:
            stop_early = self.validate_and_keep_best()
        # After validation, so a resumed job knows this step's best metric.
        checkpointed = bool(cfg.checkpointing.every_steps) and self.step % cfg.checkpointing.every_steps == 0
        if checkpointed:
            self.save_checkpoint()
        if self.stop_requested():
            # SLURM's warning signal (preemption or time limit) or SIGTERM: every rank has
            # finished this step; save, then let the caller requeue or exit.
            if not checkpointed:
                self.save_checkpoint()
            self.tracker.close()
            raise Preempted(STOP.signum, self.step)
        return stop_early

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
    def stop_requested(self) -> bool:
        """Whether any rank got a stop signal; all ranks agree, so all of them save."""
        if self.ranks.world_size == 1:
            return STOP.signum is not None
        flag = torch.tensor([int(STOP.signum is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(flag.item())

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

    def export(self, target: Path, metrics: dict[str, float], info_file: str = "qarac_best.json") -> None:
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
        (tmp / info_file).write_text(json.dumps({"step": self.step, "metric": self.best.metric,
                                                  "metrics": metrics}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "best": vars(self.best).copy(), "world_size": self.ranks.world_size,
                 "mlflow_run_id": self.trial_run.run_id if self.trial_run else None}
        keep = checkpoint.tag_for(self.best.best_step) if self.best.best_step is not None else None
        checkpoint.save(self.engine, self.checkpoints, self.step, state, self.ranks.rank,
                        self.cfg.checkpointing.keep_last, keep=keep)
        if self.ranks.is_main:
            update_json(self.out / "state.json", last_checkpoint=self.step)

    def resume_checkpoint_tag(self) -> str | None:
        """The checkpoint to resume from: the newest complete one, converted to a universal
        checkpoint when it was saved on another number of ranks. A trial that saved a
        checkpoint before but finds none now fails: it never starts over silently."""
        if not self.cfg.checkpointing.resume:
            return None
        tags = checkpoint.complete_tags(self.checkpoints)
        if not tags:
            expected = (read_json(self.out / "state.json") or {}).get("last_checkpoint")
            if expected is not None:
                raise UserError(f"checkpointing: this trial saved a checkpoint at step {expected}, but "
                                f"{self.checkpoints} holds no complete checkpoint; it will not start over. "
                                f"Restore the checkpoints, or remove {self.out / 'state.json'} to start from scratch")
            return None
        tag = tags[-1]
        saved = checkpoint.saved_world_size(self.checkpoints, tag)
        if saved in (None, self.ranks.world_size) or self.cfg.deepspeed.zero_stage == 0:
            return tag  # ZeRO-0 keeps whole optimizer states: it loads on any number of ranks
        outcome: list = [None]
        if self.ranks.is_main:
            try:
                outcome[0] = checkpoint.universal(self.checkpoints, tag)
            except UserError as err:
                outcome[0] = err
        dist.broadcast_object_list(outcome, src=0)  # every rank waits for the conversion
        if isinstance(outcome[0], UserError):
            raise outcome[0]
        return outcome[0]

    def resume(self) -> None:
        if self.resume_tag is None:
            return
        state = checkpoint.load(self.engine, self.checkpoints, self.resume_tag, self.ranks.rank)
        self.step = state["step"]
        for key, value in state["best"].items():
            setattr(self.best, key, value)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the job is to be requeued."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.signum, self.step = signum, step


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or inf for too many consecutive steps."""


class _StopRequest:
    """Set by a signal handler at any moment; read by the loop at step boundaries only."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def handler(self, signum, frame) -> None:
        self.signum = signum

    def install(self, signums) -> None:
        self.signum = None
        for signum in signums:
            self.previous[signum] = signal.signal(signum, self.handler)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous.clear()


STOP = _StopRequest()
# SLURM's warning signal before a time limit or preemption (submitit's default, USR2; never
# USR1, which NCCL may take), and SIGTERM, which comes without warning at the end.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class _NonFinite:
    """Counts consecutive non-finite losses; raises after `limit` of them."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0
        self.last_finite: tuple[int, float] | None = None

    def check(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.count, self.last_finite = 0, (step, loss)
            return
        self.count += 1
        if self.count >= self.limit:
            last = (f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
                    if self.last_finite else "no finite loss before")
            raise NonFiniteLoss(f"loss is {loss} at step {step}, {self.count} consecutive non-finite steps; {last}")


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
    if not sys.stderr.isatty():  # progress bars only clutter job logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(cfg.output.dir)
    state_file = out / "state.json"
    trial_run, info, finished = None, {}, False
    STOP.install(STOP_SIGNALS)
    try:
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            previous = read_json(state_file) or {}
            starts = previous.get("starts", 0) + 1
            info = {"pid": os.getpid(), "host": socket.gethostname(), "world_size": ranks.world_size,
                    "started": time.time(), "starts": starts, "job_id": os.environ.get("SLURM_JOB_ID"),
                    "nodes": os.environ.get("SLURM_JOB_NODELIST"), "last_checkpoint": previous.get("last_checkpoint")}
            write_json(state_file, {"state": "RUNNING", **info})
            if cfg.tracking.uri is not None:
                trial_run = TrialRun(cfg.tracking, cfg.name, flatten(config_to_dict(cfg)), out, run_tags={
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                    "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
                    "restarts": starts - 1, "nodes": info["nodes"] or info["host"], "world_size": ranks.world_size})
        result = Trainer(cfg, ranks, trial_run).train()
        finished = True
        if ranks.is_main:
            write_json(state_file, {**(read_json(state_file) or {}), "state": "COMPLETED", **result})
            if trial_run is not None:
                trial_run.finish("FINISHED", out / "best" if cfg.output.export_best else None)
        return result
    except Preempted as stop:
        if ranks.is_main:  # the run stays RUNNING: the requeued job continues it
            write_json(state_file, {**(read_json(state_file) or info), "state": "PREEMPTED", "step": stop.step})
        raise
    except BaseException as err:
        if ranks.is_main:
            line = (str(err).strip().splitlines() or [""])[-1]
            error = f"{type(err).__name__}: {line}"
            killed = isinstance(err, KeyboardInterrupt)
            write_json(state_file, {**(read_json(state_file) or info), "state": "CANCELLED" if killed else "FAILED",
                                    "error": error})
            if trial_run is not None:
                best = out / "best"
                trial_run.finish("KILLED" if killed else "FAILED", best if best.exists() else None, error)
        raise
    finally:
        STOP.restore()
        if finished and ranks.world_size > 1:
            # No rank tears down its process groups while a peer may still be in a collective
            # (after a failure the peers may be gone: then no barrier).
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print it and its DeepSpeed JSON; download and write nothing")
    parser.add_argument("--world-size", type=int, default=1, help="ranks for --dry-run's DeepSpeed JSON")
    args = parser.parse_intermixed_args(argv)
    # A rank killed by a C++ abort (SIGABRT, SIGSEGV) prints every thread's Python stack first.
    faulthandler.enable(all_threads=True)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.world_size < 1:
            raise UserError(f"--world-size: expected at least 1, got {args.world_size}")
        if args.dry_run:
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            print(f"# DeepSpeed config on {args.world_size} rank(s):")
            print(json.dumps(deepspeed_config(cfg, args.world_size), indent=2))
            return 0
        run(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except UserError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"qarac_dist: {stop}; run the same command again to resume", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
