"""Where each trial of a sweep stands now: its record's state from the scheduler, the current
attempt's own files and the cancels recorded beside the manifest (made while a driver held it).
Read by the driver as it follows, by status and --cancel, and by the final evaluation's job,
which runs once every job it waited for has ended and asks no scheduler (submit/final.py)."""

from __future__ import annotations

from typing import Callable

from ..base.layout import SweepLayout
from . import pack
from .sweep_dir import FAILED, QUIET, Manifest, job_error, own_error, read_cancels, resolve_state

Scheduler = Callable[[list[str]], dict[str, str]]
"""Job ids -> the scheduler's state of each it still knows (an executor's `states`)."""


def refresh(manifest: Manifest, scheduler: Scheduler, layout: SweepLayout) -> None:
    """Update every record's state from `scheduler`, the current attempt's own files, and the
    cancels recorded beside the manifest."""
    records = list(manifest.trials.values())
    ended = pack.follow_claims(records, layout)
    known = scheduler(sorted({job for r in records for job in r.jobs}))
    cancelled = read_cancels(layout.root)
    for r in records:
        if cancelled.get(r.id) == r.attempt and r.state != "QUEUED":
            r.state = "CANCELLED"
        r.state = pack.state_of(r, ended, known) if r.pack_jobs else resolve_state(r, known.get(r.job_id))
        if r.state in FAILED:
            r.error = own_error(r) or r.error or (job_error(layout, r) if r.state not in QUIET else None)
