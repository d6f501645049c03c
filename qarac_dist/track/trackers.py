"""Where a training job's metrics go: anything with `log(step, metrics)` and `close()`.

Global rank 0 holds the real ones (metrics.jsonl, the MLflow sender); other ranks hold
`NullTracker`.
"""

from __future__ import annotations

from typing import Protocol


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class Trackers:
    """Several trackers as one."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
