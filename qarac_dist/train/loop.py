"""The training loop. Reading order: `Trainer.__init__` builds everything, `Trainer.train` is
the loop: resume -> for each step (forward, backward, step, spike check, log) -> validate ->
keep the best -> checkpoint -> honour a stop signal -> stop early. A loss spike rolls back to
the newest checkpoint instead (`roll_back`, train/spikes.py).
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from ..base.secrets import redact
from ..config import TrainConfig, config_to_dict, deepspeed_config
from ..config.schema import flatten
from ..track.job_context import JobContext
from ..track.mlflow_runs import TrialRun
from ..track.trackers import NullTracker, Tracker, Trackers
from ..track.trial_dir import BEST_INFO, LAST_INFO, MetricsFile, TrialDir
from . import batches, data, faults, models, rung_gate
from .build import build_on_ranks, lr_lambda, optimizer_for, seed_everything
from .checkpoint import Checkpointer
from .export import export, reload_module
from .metrics import BestTracker
from .ranks import Ranks
from .spikes import Spike, SpikeGuard, SpikesExhausted, announce, grad_norm
from .stop import STOP, Preempted
from .validation import evaluate
from .window import NonFinite, Window

# DeepSpeed picks its accelerator when first imported; without CUDA, say CPU before it looks.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


class Trainer:
    def __init__(self, cfg: TrainConfig, ranks: Ranks, trial_run: TrialRun | None = None,
                 context: JobContext = JobContext()):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.ranks, self.trial_run, self.context = cfg, ranks, trial_run, context
        self.dir = TrialDir(cfg.output.dir)
        self.checkpointer = Checkpointer(cfg.checkpointing, cfg.deepspeed.zero_stage, self.dir, ranks.rank,
                                         ranks.world_size, cfg.training)
        seed_everything(cfg.training.seed)
        # Flags (cache state, stop signals) travel on a CPU (gloo) group, so checking them never
        # syncs a GPU stream and works whatever the main backend is.
        self.control_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

        parts = build_on_ranks(cfg, ranks, self.control_group, with_validation=context.retrain_steps is not None)
        self.splits, self.collate = parts.splits, parts.collate
        self.last_step = context.retrain_steps or cfg.training.max_steps  # a retraining's end: on the same schedule

        schedule = lr_lambda(cfg.scheduler.kind, cfg.scheduler.warmup_steps, cfg.training.max_steps)
        self.ds_config = deepspeed_config(cfg, ranks.world_size)
        self.resume_tag = self.checkpointer.choose()
        if self.resume_tag is not None and self.resume_tag.endswith("_universal"):
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=parts.model, optimizer=optimizer_for(cfg, parts.model), config=self.ds_config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
        self.device = torch.device(get_accelerator().device_name(self.engine.local_rank)) \
            if get_accelerator().device_name() != "cpu" else torch.device("cpu")

        self.batches = batches.StepBatches(np.asarray(self.splits.train["length"][:]), cfg.training.micro_batch_size,
                                        cfg.training.gradient_accumulation_steps, ranks.world_size,
                                        ranks.rank, cfg.training.seed, cfg.data.length_grouping)
        self.data_report = {**self.splits.report, "examples_per_step": self.batches.step_size,
                            "dropped_per_epoch": len(self.splits.train) % self.batches.step_size}
        lengths = np.asarray(self.splits.validation["length"][:])
        self.val_order = np.argsort(-lengths, kind="stable")
        self.best = BestTracker(cfg.evaluation.metric, cfg.evaluation.mode, cfg.early_stopping.min_delta)
        self.step = 0
        self.offset = 0
        """Data position of step s: s - 1 + offset (rollbacks move it on, train/spikes.py)."""
        spikes = cfg.training.spikes
        self.spikes = SpikeGuard(spikes, ranks.rank, ranks.world_size, self.control_group) if spikes else None
        self.pruned: dict | None = None
        self.tracker: Tracker = NullTracker()
        if ranks.is_main:
            self.dir.write_config(redact(config_to_dict(cfg)), redact(self.ds_config))

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        self.start()
        stopped_early = self.pruned is not None  # told to stop at a rung before a requeue or kill
        started = time.perf_counter()
        while self.step < self.last_step and not stopped_early:
            stopped_early = self.advance()
        if self.cfg.output.export_last:
            self.export(self.dir.last, {}, LAST_INFO)
        result = {"steps": self.step, "stopped_early": stopped_early, "pruned": self.pruned,
                  "train_seconds": time.perf_counter() - started, "metric": self.best.metric,
                  "best_value": self.best.best, "best_step": self.best.best_step,
                  "best_dir": str(self.dir.best) if self.cfg.output.export_best else None, "data": self.data_report}
        if self.ranks.is_main:
            self.dir.write_result(result)
        self.tracker.close()
        return result

    def start(self) -> None:
        """Resume from the newest complete checkpoint, if any; open the trackers (rank 0)."""
        self.resume()
        if self.ranks.is_main:
            for _, line in data.report_lines(self.data_report, self.cfg.data.max_length):  # what reached the metric
                print(f"qarac_dist: {line}", file=sys.stderr, flush=True)
            # Rows after the resumed step are recomputed, so the file keeps only those before.
            self.metrics_file = metrics = MetricsFile(self.dir.metrics_file, keep_through_step=self.step)
            trackers: list[Tracker] = [metrics]
            if self.trial_run is not None:
                logger = self.trial_run.logger()
                # metrics.jsonl is the durable record: what an interrupted job had not yet sent
                # goes now (the logger drops the steps MLflow already holds).
                for row in self.dir.metrics() if logger.replays_record else []:
                    logger.log(row.pop("step"), row)
                trackers.append(logger)
                self.trial_run.log_dict(self.ds_config, "deepspeed_config.json")
                self.trial_run.log_params(flatten(self.data_report, "data_report"))
                self.trial_run.log_inputs(self.splits.inputs)
            self.tracker = Trackers(*trackers)
        self.window = Window(self.device)
        self.nonfinite = NonFinite(self.cfg.training.max_nonfinite_steps)
        self.data = self.batches.iterate(start_step=self.step + self.offset)
        self.pruned = rung_gate.recorded_stop(self.cfg.asha, self.ranks, self.control_group, self.context,
                                              self.dir.path.name, self.step) \
            if self.cfg.asha is not None and self.resume_tag is not None else None
        if self.spikes is not None and self.resume_tag is None:
            self.save_checkpoint()  # so that a spike before the first checkpoint has one to go back to
        signum = STOP.agreed(self.ranks.world_size, self.control_group)
        if signum:  # the warning came while starting up: nothing new to save
            self.tracker.close()
            raise Preempted(signum, self.step, saved=False)

    def advance(self, batch: tuple[int, list[np.ndarray]] | None = None) -> bool:
        """One optimizer step, then what falls due after it: a spike check (and rollback), log,
        validate (keep the best), checkpoint, honour a stop signal. True: stop (early, pruned)."""
        cfg, t = self.cfg, self.cfg.training
        position, micro_batches = batch or self.next_batch()
        lr_factor = self.spikes.lr_factor(self.step + 1) if self.spikes is not None else 1.0
        step_started, skipped_before = time.perf_counter(), self.engine.skipped_steps
        loss, tokens = self.train_step(micro_batches, position, lr_factor)
        self.step += 1
        faults.after_step(self.step, self.ranks.rank, self.dir.path)
        stop = None  # the stop signal any rank got (0: none), when the spike check gathered it
        if self.spikes is None:
            self.nonfinite.check(self.step, float(loss))
        else:
            spike, stop = self.spikes.check(self.step, position, float(loss), grad_norm(self.engine, skipped_before),
                                            STOP.signum or 0)
            if spike is not None:
                return self.roll_back(spike)
        self.window.add(loss, tokens, time.perf_counter() - step_started)
        if self.step % t.log_every == 0 or self.step == self.last_step:
            metrics = self.window.flush(self.engine, self.scheduler)
            self.tracker.log(self.step, {**metrics, **({"lr_factor": lr_factor} if lr_factor != 1 else {})})
        due = self.step % cfg.evaluation.every_steps == 0 or self.step == t.max_steps  # (a retraining never validates)
        stop_early = due and self.context.retrain_steps is None and self.validate_and_keep_best()
        # After validation, so a resumed job knows this step's best metric.
        checkpointed = bool(cfg.checkpointing.every_steps) and self.step % cfg.checkpointing.every_steps == 0
        if checkpointed:
            self.save_checkpoint()
        signum = STOP.agreed(self.ranks.world_size, self.control_group) if stop is None else stop
        if signum:
            # SLURM's warning signal (preemption or time limit) or SIGTERM, on any rank: every
            # rank has finished this step; save, then let the caller requeue or exit.
            if not checkpointed:
                self.save_checkpoint()
            self.tracker.close()
            raise Preempted(signum, self.step, saved=True)
        return stop_early

    def next_batch(self) -> tuple[int, list[np.ndarray]]:
        """This rank's micro batches for the next step, with their data position."""
        while True:
            position, micro_batches = self.step + self.offset, next(self.data)
            if not faults.dropped(position):
                return position, micro_batches
            self.offset += 1  # test hook: this batch is not in the data

    def train_step(self, micro_batches: list[np.ndarray], position: int | None = None,
                   lr_factor: float = 1.0) -> tuple[torch.Tensor, int]:
        """Forward, backward and (at the accumulation boundary) optimizer step."""
        if lr_factor != 1:  # the scheduler sets each step's rate afresh at the end of the step
            for group in self.scheduler.optimizer.param_groups:
                group["lr"] *= lr_factor
        fault = 1.0 if position is None else faults.loss_factor(position, self.ranks.rank)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for indices in micro_batches:
            batch = self.to_device(self.collate(self.splits.train[indices.tolist()]))
            loss = models.output_value(self.engine(**batch), "loss")
            if fault != 1:
                loss = loss * fault
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
            tokens += int(batch["attention_mask"].sum())
        return loss_sum / len(micro_batches), tokens

    def validate_and_keep_best(self) -> bool:
        """Validate; export the model if it is the best so far; at a successive-halving rung,
        record the metric and learn whether to go on (a seed: whether its configuration was
        stopped, at any validation). True if training should stop."""
        metrics = evaluate(self.engine, self.splits, self.collate, self.val_order, self.ranks, self.cfg,
                           self.to_device)
        self.tracker.log(self.step, {f"val_{k}": v for k, v in metrics.items()})
        if self.best.update(self.step, metrics[self.cfg.evaluation.metric]) and self.cfg.output.export_best:
            self.export(self.dir.best, metrics)
        if self.cfg.asha is not None:
            self.pruned = rung_gate.stop_at(self.cfg.asha, self.ranks, self.control_group, self.context,
                                            self.dir.path.name, self.step, metrics)
            if self.pruned is not None:
                return True
        return self.best.should_stop(self.cfg.early_stopping.patience)

    # ------------------------------------------------------------------ pieces
    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def export(self, target, metrics: dict[str, float], info_file: str = BEST_INFO) -> None:
        export(self.engine, self.cfg.deepspeed.zero_stage, self.ranks.is_main, self.splits.tokenizer, target, info_file,
               {"step": self.step, "metric": self.best.metric, "metrics": metrics})

    def best_module(self):
        """The exported best model as a CPU module for MLflow (None for a transformers model)."""
        return reload_module(self.cfg, self.engine, self.splits.num_labels, self.splits.tokenizer, self.dir.best)

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "best": vars(self.best).copy(), "world_size": self.ranks.world_size,
                 "mlflow_run_id": self.trial_run.run_id if self.trial_run else None, "data_offset": self.offset,
                 "rollbacks": self.spikes.rollbacks if self.spikes else 0}
        self.checkpointer.save(self.engine, self.step, state, self.best.best_step)

    def load(self, tag: str) -> dict:
        """Load a checkpoint: the engine, the step, the best so far; returns our saved state."""
        state = self.checkpointer.load(self.engine, tag)
        self.step = state["step"]
        for key, value in state["best"].items():
            setattr(self.best, key, value)
        self.offset = state.get("data_offset", 0)
        return state

    def roll_back(self, spike: Spike) -> bool:
        """Every rank goes back to the newest checkpoint and on past the spike's data. Rollbacks
        spent: True (stop, pruned) under successive halving, else SpikesExhausted."""
        exhausted = self.spikes.exhausted(spike)
        if exhausted is not None:
            if self.cfg.asha is None:
                raise SpikesExhausted(exhausted)
            self.pruned = {"rung": None, "step": self.step, "reason": exhausted}
            return True
        offset, started, exported = self.offset, time.perf_counter(), self.best.best_step
        self.load(self.checkpointer.newest(at_most=self.step - 1))
        if self.cfg.asha is not None:
            rung_gate.withdraw_after(self.cfg.asha, self.ranks, self.context.sweep, self.dir.path.name, self.step)
        if exported is not None and exported > self.step and self.cfg.output.export_best:
            self.revalidate(exported)
        rollback = self.spikes.rolled_back(spike, self.step, offset, time.perf_counter() - started)
        self.offset = rollback["offset"]
        self.window = Window(self.device)  # the losses since the last log are of undone steps
        self.data = self.batches.iterate(start_step=self.step + self.offset)
        if self.ranks.is_main:
            announce(spike, rollback, self.spikes.line(spike, rollback), self.dir, self.metrics_file, self.tracker,
                     self.trial_run)
        return False

    def revalidate(self, undone: int) -> None:
        """best/ held a model the rollback undid: the restored one is validated and is the best
        from here (the best before it is gone with the model that best/ held)."""
        metrics = evaluate(self.engine, self.splits, self.collate, self.val_order, self.ranks, self.cfg,
                           self.to_device)
        if self.ranks.is_main:
            print(f"qarac_dist: best/ held step {undone}, which the rollback undid: the model of step {self.step} is "
                  f"validated again and is the best from here", file=sys.stderr, flush=True)
        self.best.best, self.best.best_step, self.best.bad_validations = None, None, 0
        self.best.update(self.step, metrics[self.cfg.evaluation.metric])
        self.export(self.dir.best, metrics)
        if self.ranks.is_main and not any(r.get("step") == self.step and f"val_{self.best.metric}" in r
                                          for r in self.dir.metrics()):
            self.tracker.log(self.step, {f"val_{k}": v for k, v in metrics.items()})

    def resume(self) -> None:
        if self.resume_tag is None:
            return
        state = self.load(self.resume_tag)
        if self.spikes is not None:
            self.offset = self.spikes.resume(state, self.dir)
        if self.ranks.is_main:  # a resume is visible: in the job's log, state.json and MLflow
            print(f"qarac_dist: resumed from checkpoint {self.resume_tag} at step {self.step} (attempt "
                  f"{self.context.attempt or 1})", file=sys.stderr, flush=True)
            self.dir.update(resumed_from=self.step)
            if self.trial_run is not None:
                self.trial_run.set_tags({"resumed_from_step": self.step})
