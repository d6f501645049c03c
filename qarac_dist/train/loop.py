"""The training loop. Reading order: `Trainer.__init__` builds everything, `Trainer.train` is
the loop: resume -> for each step (forward, backward, step, log) -> validate -> keep the best
-> checkpoint -> honour a stop signal -> stop early.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import TrainConfig, UserError, config_to_dict, deepspeed_config
from ..plan.asha import keeps_going
from ..track import rungs
from ..track.mlflow_runs import TrialRun
from ..track.secrets import redact
from ..track.trackers import NullTracker, Tracker, Trackers
from ..track.trial_dir import BEST_INFO, MetricsFile, TrialDir
from . import checkpoint, data, models
from .build import build_parts, optimizer_for
from .memory import memory_metrics
from .metrics import BestTracker, classification_metrics, regression_metrics
from .ranks import Ranks
from .stop import STOP, Preempted

# DeepSpeed picks its accelerator when first imported; without CUDA, say CPU before it looks.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(kind: str, warmup_steps: int, max_steps: int):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""

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


class Trainer:
    def __init__(self, cfg: TrainConfig, ranks: Ranks, trial_run: TrialRun | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.ranks, self.trial_run = cfg, ranks, trial_run
        self.dir = TrialDir(cfg.output.dir)
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
        parts = build_parts(cfg)
        if not warm and ranks.is_main:
            dist.barrier()
        self.splits, self.collate = parts.splits, parts.collate

        schedule = lr_lambda(cfg.scheduler.kind, cfg.scheduler.warmup_steps, cfg.training.max_steps)
        self.ds_config = deepspeed_config(cfg, ranks.world_size)
        self.resume_tag = self.resume_checkpoint_tag()
        if self.resume_tag is not None and self.resume_tag.endswith("_universal"):
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=parts.model, optimizer=optimizer_for(cfg, parts.model), config=self.ds_config,
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
        self.pruned: dict | None = None
        self.tracker: Tracker = NullTracker()
        if ranks.is_main:
            self.dir.write_config(redact(config_to_dict(cfg)), redact(self.ds_config))

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        self.start()
        steps = self.batches.iterate(start_step=self.step)
        stopped_early = False
        started = time.perf_counter()
        while self.step < self.cfg.training.max_steps and not stopped_early:
            stopped_early = self.advance(next(steps))
        if self.cfg.output.export_last:
            self.export(self.dir.last, {}, "qarac_last.json")
        result = {"steps": self.step, "stopped_early": stopped_early, "pruned": self.pruned,
                  "train_seconds": time.perf_counter() - started, "metric": self.best.metric,
                  "best_value": self.best.best, "best_step": self.best.best_step,
                  "best_dir": str(self.dir.best) if self.cfg.output.export_best else None}
        if self.ranks.is_main:
            self.dir.write_result(result)
        self.tracker.close()
        return result

    def start(self) -> None:
        """Resume from the newest complete checkpoint, if any; open the trackers (rank 0)."""
        self.resume()
        self.resumed_step = self.step
        if self.ranks.is_main:
            # Rows after the resumed step are recomputed, so the file keeps only those before.
            metrics = MetricsFile(self.dir.metrics_file, keep_through_step=self.step)
            trackers: list[Tracker] = [metrics]
            if self.trial_run is not None:
                logger = self.trial_run.logger()
                # metrics.jsonl is the durable record: what an interrupted job had not yet sent
                # goes now (the logger drops the steps MLflow already holds).
                for row in self.dir.metrics():
                    logger.log(row.pop("step"), row)
                trackers.append(logger)
                self.trial_run.log_dict(self.ds_config, "deepspeed_config.json")
            self.tracker = Trackers(*trackers)
        self.window = _Window(self.device)
        self.nonfinite = _NonFinite(self.cfg.training.max_nonfinite_steps)
        if self.stop_requested():  # the warning came while starting up: nothing new to save
            self.tracker.close()
            raise Preempted(STOP.signum, self.step, saved=False)

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
            raise Preempted(STOP.signum, self.step, saved=True)
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
        """Validate; export the model if it is the best so far; at a successive-halving rung,
        record the metric and learn whether to go on. True if training should stop."""
        metrics = self.evaluate()
        self.tracker.log(self.step, {f"val_{k}": v for k, v in metrics.items()})
        if self.best.update(self.step, metrics[self.cfg.evaluation.metric]) and self.cfg.output.export_best:
            self.export(self.dir.best, metrics)
        asha = self.cfg.asha
        if asha is not None and self.step in asha.rungs and not self.at_rung(asha.rungs.index(self.step), metrics):
            self.pruned = {"rung": asha.rungs.index(self.step), "step": self.step}
            return True
        return self.best.should_stop(self.cfg.early_stopping.patience)

    def at_rung(self, rung: int, metrics: dict[str, float]) -> bool:
        """Rank 0 records this trial's metric at the rung (or finds the decision it recorded
        before a requeue) and decides; every rank follows it."""
        asha = self.cfg.asha
        going = torch.tensor([1])
        if self.ranks.is_main:
            score = (float(metrics[asha.metric]), float(metrics.get("loss", math.nan)))
            arrival = rungs.arrive(Path(asha.record_dir), rung, self.dir.path.name, score, self.step,
                                   lambda mine, before: keeps_going(mine, before, asha.reduction_factor, asha.mode))
            going[0] = int(arrival.keeps_going)
        if self.ranks.world_size > 1:
            dist.broadcast(going, src=0, group=self.control_group)
        return bool(going.item())

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

    def export(self, target: Path, metrics: dict[str, float], info_file: str = BEST_INFO) -> None:
        """Write a consolidated save_pretrained directory (safetensors) and the tokenizer,
        under a temporary name, then rename it into place. Collective under ZeRO-3."""
        import json

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
            # The model's config is the user's, but a secret-shaped string in it must not
            # reach the artifacts we write (track/secrets.py).
            config_file = tmp / "config.json"
            config_file.write_text(json.dumps(redact(json.loads(config_file.read_text())), indent=2))
        else:
            from safetensors.torch import save_file

            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        self.splits.tokenizer.save_pretrained(str(tmp))
        (tmp / info_file).write_text(json.dumps({"step": self.step, "metric": self.best.metric,
                                                  "metrics": metrics}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)

    def best_module(self):
        """The exported best model as a CPU module, for MLflow's pytorch flavour; None when it
        is a transformers model (MLflow takes those from the exported folder)."""
        from transformers import PreTrainedModel

        if isinstance(self.engine.module, PreTrainedModel):
            return None
        from safetensors.torch import load_file

        module = models.build_model(self.cfg, self.splits.num_labels, self.splits.tokenizer)
        module.load_state_dict(load_file(str(self.dir.best / "model.safetensors")))
        return module.eval()

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "best": vars(self.best).copy(), "world_size": self.ranks.world_size,
                 "mlflow_run_id": self.trial_run.run_id if self.trial_run else None}
        keep = checkpoint.tag_for(self.best.best_step) if self.best.best_step is not None else None
        checkpoint.save(self.engine, self.dir.checkpoints, self.step, state, self.ranks.rank,
                        self.cfg.checkpointing.keep_last, keep=keep)
        if self.ranks.is_main:
            self.dir.update(last_checkpoint=self.step)

    def resume_checkpoint_tag(self) -> str | None:
        """The checkpoint to resume from: the newest complete and intact one, converted to a
        universal checkpoint when it was saved on another number of ranks. Rank 0 decides and
        every rank follows. A trial that saved a checkpoint before but finds none it can load
        fails: it never starts over silently."""
        if not self.cfg.checkpointing.resume:
            return None
        outcome: list = [None]
        if self.ranks.is_main:
            try:
                outcome[0] = self._choose_checkpoint()
            except UserError as err:
                outcome[0] = err
        if self.ranks.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)  # every rank waits for rank 0's choice
        if isinstance(outcome[0], UserError):
            raise outcome[0]
        return outcome[0]

    def _choose_checkpoint(self) -> str | None:
        checkpoints = self.dir.checkpoints
        tag, damaged = checkpoint.newest_intact(checkpoints)
        status = self.dir.status()
        expected = status.last_checkpoint if status is not None else None
        if tag is None and (damaged or expected is not None):
            what = (f"no checkpoint of it can be loaded: {'; '.join(damaged)}" if damaged else
                    f"this trial saved a checkpoint at step {expected}, but {checkpoints} holds no complete checkpoint")
            raise UserError(f"checkpointing: {what}; it will not start over. Restore the checkpoints, or remove "
                            f"{self.dir.state_file} to start from scratch")
        if damaged:
            print(f"qarac_dist: {'; '.join(damaged)}; resuming from {tag}", file=sys.stderr, flush=True)
        if tag is None:
            return None
        saved = checkpoint.saved_world_size(checkpoints, tag)
        if saved in (None, self.ranks.world_size) or self.cfg.deepspeed.zero_stage == 0:
            return tag  # ZeRO-0 keeps whole optimizer states: it loads on any number of ranks
        return checkpoint.universal(checkpoints, tag)

    def resume(self) -> None:
        if self.resume_tag is None:
            return
        state = checkpoint.load(self.engine, self.dir.checkpoints, self.resume_tag, self.ranks.rank)
        self.step = state["step"]
        for key, value in state["best"].items():
            setattr(self.best, key, value)


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or inf for too many consecutive steps."""


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
