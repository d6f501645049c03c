"""This process's memory: the metrics a step logs, and the RSS sampler that `--find-batch-size`
and bench/memory.py measure a step with on CPU."""

from __future__ import annotations

import os
import resource
import threading
import time

import torch


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
        self.interval_s, self.stop = interval_s, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.before = self.peak = self.bytes = 0

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssGrowth":
        self.before = self.peak = rss_bytes()
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        self.thread.join()
        self.bytes = max(self.peak, rss_bytes()) - self.before
