"""How a driver stops what it started here: within `signals()`, SIGINT (Ctrl-C), SIGTERM and
SIGHUP raise `Stopped`; `halt` asks local jobs to save and stop, as on SLURM's warning, waits
for them (bounded; a second signal ends the wait) and stops those left at once. Nothing a
driver started on this machine outlives it unseen."""

from __future__ import annotations

import contextlib
import signal
import time

SAVE_WAIT_S = 120
"""How long a stopped driver waits for its local jobs to save before it stops them at once."""


class Stopped(BaseException):
    """The driver got SIGINT, SIGTERM or SIGHUP (never an error that a handler of errors may pass over)."""


@contextlib.contextmanager
def _handled(handler):
    """Within the block, `handler` takes SIGINT, SIGTERM and SIGHUP; then what took them before."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def signals():
    """Within the block, SIGINT (Ctrl-C), SIGTERM and SIGHUP raise `Stopped` in the driver."""
    def stopped(_signum, _frame):
        raise Stopped()

    return _handled(stopped)


@contextlib.contextmanager
def held():
    """Within the block, SIGINT, SIGTERM and SIGHUP are held back: noted in the list it gives,
    for the caller to act on once it knows what the block started."""
    got: list[int] = []
    with _handled(lambda signum, _frame: got.append(signum)):
        yield got


def halt(executor, jobs: list[str]) -> None:
    """Ask the local `jobs` of `executor` (submit/executors.py) to save and stop, wait for them,
    and stop those left after SAVE_WAIT_S, or at a second signal, at once."""
    executor.cancel(jobs)
    try:
        with signals():
            deadline = time.monotonic() + SAVE_WAIT_S
            while any(executor.alive(job) for job in jobs) and time.monotonic() < deadline:
                time.sleep(0.2)
    except Stopped:
        pass
    left = [job for job in jobs if executor.alive(job)]
    if left:
        executor.cancel(left, at_once=True)
