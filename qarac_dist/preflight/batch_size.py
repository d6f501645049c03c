"""The largest micro batch that fits, found with real training steps on the trial's hardware.

    python -m qarac_dist.preflight SWEEP.yaml --find-batch-size

For each distinct memory shape of the sweep's trials (model, sequence length, precision,
DeepSpeed settings) one job runs on one GPU of the sweep's resources, through submitit (or on
this machine when the sweep's executor is local). It builds the real trial, runs two optimizer
steps on a micro batch of the training set's longest examples, and measures the peak: CUDA's
max_memory_allocated on a GPU (an out-of-memory error is "does not fit"), the growth of the
process's RSS on CPU. Micro batches are doubled until one does not fit, then bisected, up to the
training set's size (a step cannot take more examples than the set holds). The budget is
`resources.gpu_memory_gb` less a 10% margin.

The answers go to `<runs_dir>/<sweep>/micro_batch.json`; the sweep plans with them from then on
(trial ids change with the micro batch). Where the config sets `training.global_batch_size`,
the micro batch is the largest fitting one that divides it, and accumulation makes up the rest;
otherwise accumulation is left alone and the global batch grows with the micro batch.

The search runs on one GPU: with a ZeRO stage that partitions states over several GPUs, a
trial on several GPUs has more room than the search saw.
"""

from __future__ import annotations


HEADROOM = 0.9


# ---------------------------------------------------------------- the search (in the job)

def measure(cfg, micro: int) -> tuple[int | None, int]:
    """Peak bytes of two real optimizer steps at this micro batch (None if it ran out of memory),
    and the number of training examples. The trial is built with a micro batch of one (which any
    set can fill) and stepped with `micro` examples."""
    import contextlib
    import dataclasses
    import gc
    import tempfile

    import numpy as np
    import torch

    from ..train.loop import Trainer
    from ..train.memory import RssGrowth
    from ..train.ranks import export_from_environment

    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(
            cfg, training=dataclasses.replace(cfg.training, micro_batch_size=1, gradient_accumulation_steps=1,
                                              global_batch_size=None),
            output=dataclasses.replace(cfg.output, dir=out, export_best=False, export_last=False),
            tracking=dataclasses.replace(cfg.tracking, uri=None),
            checkpointing=dataclasses.replace(cfg.checkpointing, every_steps=None))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            _return_freed_memory()
        rss = RssGrowth(interval_s=0.002)
        trainer, examples = None, 0
        try:
            with contextlib.nullcontext() if cuda else rss:
                trainer = Trainer(cfg, export_from_environment())
                lengths = np.asarray(trainer.splits.train["length"][:])
                examples = len(lengths)
                longest = np.resize(np.argsort(-lengths, kind="stable"), micro)  # repeats if the set is small
                for _ in range(2):  # the first step also allocates the optimizer's states
                    trainer.train_step([longest])
            if cuda:
                torch.cuda.synchronize()
                return int(torch.cuda.max_memory_allocated()), examples
            return rss.bytes, examples
        except torch.cuda.OutOfMemoryError:
            return None, examples
        finally:
            del trainer
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def search(config: dict, budget_bytes: int, max_micro: int = 512) -> dict:
    """Double, then bisect, for the largest micro batch whose peak fits in the budget."""
    import os

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from ..config import config_from_dict

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..train.ranks import export_from_environment

    export_from_environment()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False,
                               verbose=False)
    cfg = config_from_dict(config, "the trial's config")
    tried: dict[int, int | None] = {}

    def fits(micro: int) -> bool:
        tried[micro] = measure(cfg, micro)[0]
        return tried[micro] is not None and tried[micro] <= budget_bytes

    # Warm-up, not counted: data preparation, imports and lazy initialisation happen once.
    examples = measure(cfg, 1)[1]
    max_micro = min(max_micro, examples)
    best, bad = 0, None
    micro = 1
    while micro <= max_micro and fits(micro):
        best, micro = micro, micro * 2
    if best:
        bad = min(micro, max_micro + 1)  # the first that did not fit, or just past the cap
        while bad - best > 1:
            middle = (best + bad) // 2
            best, bad = (middle, bad) if fits(middle) else (best, middle)
    torch.distributed.destroy_process_group()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"micro_batch_size": best, "peak_bytes": tried.get(best), "budget_bytes": budget_bytes, "device": device,
            "tried": {str(k): v for k, v in sorted(tried.items())}, "training_examples": examples,
            "capped_by_training_set": best == examples}


def _return_freed_memory() -> None:
    """On CPU, make RSS follow live memory: glibc keeps freed blocks, so a later measurement in
    this process would reuse them and see little growth. Large blocks are mmapped (and so
    returned when freed) from now on, and what is free now is handed back."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


# ---------------------------------------------------------------- the driver (here)

def find(spec, trials: list, executor_kind: str, layout) -> dict:
    """One search job per distinct memory key, submitted through the sweep's executor on one GPU
    of its resources; returns and writes {key: result}."""
    import dataclasses
    import functools

    from ..config import UserError
    from ..plan.micro_batch import memory_key
    from ..submit.environment import launch
    from ..submit.executors import make_executor
    from ..submit.sbatch import job_name
    from ..submit.sweep_dir import read_micro_batches, write_micro_batches

    if not spec.resources.gpu_memory_gb:
        raise UserError("resources.gpu_memory_gb: --find-batch-size needs the memory of one GPU")
    budget = int(spec.resources.gpu_memory_gb * 2**30 * HEADROOM)
    shapes: dict[str, dict] = {}
    for trial in trials:
        shapes.setdefault(memory_key(trial.config), trial.config)
    one_gpu = dataclasses.replace(spec.resources, nodes=1, tasks_per_node=1,
                                  gpus_per_node=min(1, spec.resources.gpus_per_node))
    run = launch(spec.environment, [str(layout.root), *{str(c["data"]["cache_dir"]) for c in shapes.values()}])
    executor = make_executor(executor_kind, layout.batch_size_submitit, one_gpu, job_name(f"{spec.name}-batch-size"),
                             max_requeues=0, env=spec.environment, run=run)
    submitted = executor.submit([functools.partial(search, config, budget) for config in shapes.values()])
    results = {}
    for key, job in zip(shapes, submitted):
        try:
            results[key] = job.result()
        except Exception:  # noqa: BLE001 - the job's own error, reported in one line
            errors = [line.removeprefix("[rank0]: ") for line in (job.stderr() or "").splitlines()
                      if "Error" in line and not line.lstrip().startswith("File")]
            raise UserError(f"--find-batch-size: job {job.job_id} failed: {errors[-1] if errors else 'no error line'} "
                            f"(log: {job.paths.stderr})") from None
    found = read_micro_batches(layout.root) or {}
    found.update(results)
    write_micro_batches(layout.root, found)
    return results
