"""One training job from start to end: torch.distributed from the environment, the trial's
state.json kept by global rank 0, the MLflow run, the loop, and what a stop signal means.

On a stop signal the loop saves a checkpoint and raises `Preempted`; here rank 0 decides
whether the job is requeued (submit/executors.py hands it to submitit) or the trial fails with
a reason: its requeue budget is spent, or two jobs in a row ended before their first step.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..base.files import DiskFull
from ..base.secrets import redact_text
from ..config import TrainConfig, UserError, config_to_dict
from ..config.rules import batch_on_ranks
from ..track.code_record import changed_since
from ..track.job_context import JobContext
from ..track.mlflow_runs import open_run
from ..track.sweep_runs import trial_params
from ..track.trial_dir import TrialDir, TrialState, TrialStatus, WriterHeld
from ..track.usage import Clock
from .build_locks import wait_for_builds
from .loop import Trainer
from .runtime import runtime_record
from .stop import STOP, STOP_SIGNALS, Preempted
from .ranks import export_from_environment

IDLE_STARTS_LIMIT = 2


class RequeueRefused(UserError):
    """A preempted job is not requeued: the trial fails with this reason."""


def slurm_job_id(environ=os.environ) -> Optional[str]:
    """The job id as squeue and sacct show it: `<array>_<task>` for an array element."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def run(cfg: TrainConfig, context: JobContext = JobContext(), max_requeues: Optional[int] = None) -> dict:
    """Set up torch.distributed from the environment, train, tear down. Returns the result.
    `context` is what a sweep hands the job (nothing, for a config run on its own)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ranks = export_from_environment()
    for problem in batch_on_ranks(cfg, ranks.world_size):  # what no rank can know before it starts
        raise UserError(problem)
    wait_for_builds()  # DeepSpeed builds its ops behind locks a killed build leaves behind
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False, verbose=False)
    if not sys.stderr.isatty():  # progress bars only clutter job logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    trial = TrialDir(cfg.output.dir)
    writer = _hold_writer(trial, ranks, context)  # before anything in the directory is written
    trial_run, status, finished, clock = None, None, False, None
    STOP.install(STOP_SIGNALS)
    try:
        if ranks.is_main:
            status = trial.begin(context.attempt, pid=os.getpid(), host=socket.gethostname(),
                                 world_size=ranks.world_size, started=time.time(),
                                 job_id=context.step or slurm_job_id(),
                                 nodes=os.environ.get("SLURM_JOB_NODELIST"))
            if context.sweep_dir is not None:  # what the job holds, and for how long (track/usage.py)
                # A local trial holds the GPUs it can use; on SLURM, what the job was given.
                gpus = min(context.gpus, torch.cuda.device_count()) if context.tags.get("executor") == "local" \
                    else context.gpus
                clock = Clock(trial.usage_file, status.job_id or str(os.getpid()), gpus, context.cpus,
                              context.attempt).start()
            if (context.tracking_uri or cfg.tracking.uri) is not None:
                trial_run = open_run(cfg.tracking, context, cfg.name, trial_params(config_to_dict(cfg)), trial.path,
                                     run_tags={"slurm_job_id": status.job_id, "restarts": status.starts - 1,
                                               "attempt": context.attempt, "nodes": status.nodes or status.host,
                                               "world_size": ranks.world_size, **changed_since(context.tags)})
                trial_run.log_dict(runtime_record(context.sweep, status.job_id), "environment.json")
        trainer = Trainer(cfg, ranks, trial_run, context)
        result = trainer.train()
        finished = True
        if ranks.is_main:
            pruned = result["pruned"]
            # Pruned at a rung, or by its loss spikes (rollbacks spent) under successive halving.
            trial.update(state=TrialState.PRUNED if pruned else TrialState.COMPLETED, step=result["steps"],
                         rung=pruned["rung"] if pruned else None, error=pruned.get("reason") if pruned else None)
            if trial_run is not None:
                if pruned:
                    trial_run.set_tags({"asha.stopped_at_step": pruned["step"], "asha.rung": pruned["rung"],
                                        **({"asha.stopped_by": pruned["reason"]} if "reason" in pruned else {})})
                best = trial.best if cfg.output.export_best and trial.best.exists() else None
                trial_run.finish("FINISHED", best, module=trainer.best_module() if best else None)
        return result
    except Preempted as stop:
        if ranks.is_main:
            refusal = _requeue_or_refuse(trial, status, stop, max_requeues)
            if refusal is not None:
                if trial_run is not None:
                    trial_run.finish("FAILED", trial.best if trial.best.exists() else None, refusal)
                raise RequeueRefused(refusal) from None
        raise  # the MLflow run stays RUNNING: the requeued job continues it
    except BaseException as err:
        if ranks.is_main:
            error = _one_line(err, trial)
            killed = isinstance(err, KeyboardInterrupt)
            try:
                trial.update(state=TrialState.CANCELLED if killed else TrialState.FAILED, error=error)
            except DiskFull as full:  # the verdict cannot be written either: the sweep sees the job
                print(f"qarac_dist: {error}; could not record it: {full}", file=sys.stderr)  # gone, LOST
            if trial_run is not None:
                trial_run.finish("KILLED" if killed else "FAILED", trial.best if trial.best.exists() else None, error)
        raise
    finally:
        STOP.restore()
        if clock is not None:
            clock.stop()
        if finished and ranks.world_size > 1:
            # No rank tears down its process groups while a peer may still be in a collective
            # (after a failure the peers may be gone: then no barrier).
            dist.barrier()
        dist.destroy_process_group()
        if writer is not None:
            writer.close()


def _hold_writer(trial: TrialDir, ranks, context: JobContext):
    """Global rank 0 becomes the trial directory's one writer for the job's life; when another
    live process is, every rank refuses alike (WriterHeld), and nothing is written."""
    writer, refusal = None, [None]
    if ranks.is_main:
        job = context.step or slurm_job_id()
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        try:
            writer = trial.hold_writer(f"pid {os.getpid()} on {socket.gethostname()}"
                                       f"{f', job {job}' if job else ''}, since {since}")
        except WriterHeld as held:
            refusal[0] = str(held)
    if ranks.world_size > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        dist.destroy_process_group()
        raise WriterHeld(refusal[0])
    return writer


def _one_line(err: BaseException, trial: TrialDir) -> str:
    """The trial's error as one line. A write that failed for lack of space or quota names the
    file (or the trial's directory, where the writer did not say) and the cause."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"DiskFull: {err.filename or trial.path}: {os.strerror(err.errno)}"
    line = redact_text((str(err).strip().splitlines() or [""])[-1])
    return f"{type(err).__name__}: {line}"


def _requeue_or_refuse(trial: TrialDir, status: TrialStatus, stop: Preempted,
                       max_requeues: Optional[int]) -> Optional[str]:
    """Record the stop; the reason the trial fails instead of being requeued, or None."""
    idle = 0 if stop.saved else status.idle_starts + 1
    refusal = None
    if idle >= IDLE_STARTS_LIMIT:
        refusal = (f"no training step in {idle} jobs in a row: each was stopped by SLURM's warning before its first "
                   f"step (resuming at step {stop.step}); raise resources.time_min")
    elif max_requeues is not None and status.starts > max_requeues:
        refusal = (f"stopped at step {stop.step} after {status.starts} jobs, its requeue budget (max_requeues "
                   f"{max_requeues}) spent; raise max_requeues or resources.time_min, or re-run the sweep to resume")
    if refusal is not None:
        trial.update(state=TrialState.FAILED, step=stop.step, idle_starts=idle, error=f"RequeueRefused: {refusal}")
    else:
        trial.update(state=TrialState.PREEMPTED, step=stop.step, idle_starts=idle)
    return refusal
