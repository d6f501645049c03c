"""`--cancel`: stop a sweep's active jobs and record them CANCELLED, beside a driver that
follows the sweep or without one."""

from __future__ import annotations

from typing import Optional

from ..base.layout import SweepLayout
from ..base.secrets import redact_text
from ..config import UserError
from ..track.trial_dir import TrialState
from . import final, tracking
from .states import refresh
from .submission import attach
from .sweep_dir import FINAL_CANCELS, Manifest, SweepLock, record_cancels


def cancel(layout: SweepLayout) -> int:
    """Cancel the sweep's active jobs and record them CANCELLED."""
    manifest = Manifest.load(layout.root)
    if manifest is None:
        raise UserError(f"{layout.root}: no sweep here")
    lock: Optional[SweepLock] = SweepLock(layout.root)
    try:
        lock.acquire()
    except UserError:  # a driver follows the sweep: it records the cancellation itself
        lock = None
    try:
        executor = attach(manifest.executor, layout)
        refresh(manifest, executor.states, layout)
        active = [r for r in manifest.trials.values() if r.active]
        record_cancels(layout.root, {r.id: r.attempt for r in active})  # for a driver that follows
        jobs = sorted({job for r in active for job in r.jobs})
        # The test split's look and its retrainings: on what a cancelled sweep left, not wanted.
        named = final.jobs(manifest)
        live = executor.live(named) if named else set()
        evaluation = [job for job in named if job in live]
        record_cancels(layout.root, {FINAL_CANCELS: evaluation} if evaluation else {})  # for a driver that retrains
        executor.cancel(jobs + evaluation)
        for r in active:
            r.state = TrialState.CANCELLED.value
        if lock is not None:
            manifest.save(layout.root)
        tracking.end_runs(manifest, active, "KILLED")
    finally:
        if lock is not None:
            lock.release()
    print(f"cancelled {len(active)} trial(s) of {redact_text(manifest.sweep)}"
          + (f" and the job(s) of its evaluation of the test split: {', '.join(evaluation)}" if evaluation else ""))
    return 0
