"""The load of a trial's own node, logged by its rank 0 as MLflow system metrics (`system/...`,
MLflow's names) in the rows the trial already logs: utilisation and memory of the GPUs in its
CUDA_VISIBLE_DEVICES, CPU utilisation and host memory.

Why not MLflow's own monitor (`log_system_metrics`): it samples devices 0 to
`nvmlDeviceGetCount() - 1`, every GPU of the node, a neighbour's included (mlflow#13398), and
sends from a thread of its own, outside the trial's batches. NVML numbers GPUs physically and
ignores CUDA_VISIBLE_DEVICES, so the trial's devices are mapped: UUIDs (`GPU-...`, `MIG-...`)
by UUID, indices by NVML index (CUDA's order on a node of one GPU model; set
CUDA_DEVICE_ORDER=PCI_BUS_ID where models are mixed). No NVML (no driver, no GPU): CPU and
memory only, without an error.

A sample is taken with a logged row once `every_s` has passed since the last (not with the
rows a resumed job replays at its start), at that row's step: at most one per row, so with
rows further apart than `every_s`, as often as the rows.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

_MB = 1 << 20


class Sampler:
    def __init__(self, every_s: float, environ=os.environ):
        import psutil

        self.every_s, self.psutil = every_s, psutil
        self.due = time.monotonic() + every_s
        self.nvml, self.gpus = _visible_gpus(environ.get("CUDA_VISIBLE_DEVICES"))
        psutil.cpu_percent(None)  # the first call starts the measuring interval

    def sample(self) -> dict:
        """The node's load now, when a sample is due; else {}."""
        now = time.monotonic()
        if now < self.due:
            return {}
        self.due = now + self.every_s
        memory = self.psutil.virtual_memory()
        out = {"system/cpu_utilization_percentage": self.psutil.cpu_percent(None),
               "system/system_memory_usage_megabytes": (memory.total - memory.available) / _MB,
               "system/system_memory_usage_percentage": memory.percent}
        for index, handle in enumerate(self.gpus):
            # Each query alone: a MIG instance has no utilisation (NotSupported) but has memory;
            # a GPU fallen off the bus has neither, and its neighbours are still sampled.
            with contextlib.suppress(self.nvml.NVMLError):
                out[f"system/gpu_{index}_utilization_percentage"] = \
                    self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            with contextlib.suppress(self.nvml.NVMLError):
                used = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"system/gpu_{index}_memory_usage_megabytes"] = used.used / _MB
                out[f"system/gpu_{index}_memory_usage_percentage"] = 100 * used.used / used.total
        return out


class SampledLogger:
    """A run's metric logger whose rows also carry the node's load when a sample is due."""

    def __init__(self, logger, sampler: Sampler):
        self.logger, self.sampler = logger, sampler
        self.replays_record = logger.replays_record

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, {**metrics, **self.sampler.sample()})

    def close(self) -> None:
        self.logger.close()


def sampled(logger, every_s: float):
    """`logger`, sampling the node's load every `every_s` seconds (0: not at all)."""
    return SampledLogger(logger, Sampler(every_s)) if every_s > 0 else logger


def _visible_gpus(visible: Optional[str]) -> tuple[object, list]:
    """NVML (the nvidia-ml-py module) and handles of the devices CUDA_VISIBLE_DEVICES names (all
    of the node's when it is unset), or (None, []) without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount() if visible is None else 0
    except Exception:  # noqa: BLE001 - no package, no driver, no device: CPU and memory only
        return None, []
    if visible is None:
        names = [str(i) for i in range(count)]
    else:
        names = [name.strip() for name in visible.split(",") if name.strip()]
    handles = []
    for name in names:
        try:
            handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(name)) if name.isdigit()
                           else pynvml.nvmlDeviceGetHandleByUUID(name))
        except pynvml.NVMLError:  # a name CUDA also skips (CUDA stops at the first it cannot use)
            break
    return pynvml, handles
