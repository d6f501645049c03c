"""Stale torch-extension build locks. DeepSpeed builds its ops on first use (on CPU: the shm
all-reduce; on GPU: fused optimizers and others) under `$TORCH_EXTENSIONS_DIR` or
`~/.cache/torch_extensions`, behind an empty `lock` file (torch's FileBaton): whoever creates it
builds, everyone else waits until it is gone, with no bound. A build killed mid-way (preemption,
scancel, a time limit) leaves the file, and every later trial on every node sharing that home
waits on it forever, silently, burning its allocation (pytorch #189245).

A trial therefore waits for build locks itself, before DeepSpeed starts, and takes one for dead
when both hold:
- no process of this host has it open (the builder keeps the file open until it removes it,
  so a live build on this host is always seen: /proc/<pid>/fd), and
- nothing in its build directory has changed for IDLE_S: a live build on another node is not
  in this host's /proc, but it writes there as it goes (each object file, ninja's log, the
  library). The longest quiet stretch measured here is one compile step: 98 s for DeepSpeed's
  shm op on 2 loaded cores (its ninja log). CUDA ops compile longer per file, so IDLE_S is
  10 minutes: a dead lock costs a trial at most that, a live build is never broken.
A lock taken for dead is removed (renamed aside first, so of trials that judge it together one
removes it, and a new build's lock taken under that name meanwhile is given back), with its path
and age in the trial's log; the wait then goes on, so two trials that meet an empty cache
together still build once (torch's lock decides). What this cannot see: a build that dies after
this wait, while DeepSpeed's own wait is on (a trial that starts later clears it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

IDLE_S = 600.0
POLL_S = 1.0


def extensions_root() -> Path:
    """Where torch builds extensions for this interpreter (its default, or TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _held_here(lock: Path) -> bool:
    """Whether a process of this host has `lock` open (the kernel names an open file by its real
    path: a root reached through a symlink is resolved first)."""
    real = os.path.realpath(lock)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == real:
                    return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def _last_change(directory: Path) -> float:
    times = []
    for path in directory.iterdir():
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def stale(lock: Path, now: float, idle_s: float = IDLE_S) -> Optional[os.stat_result]:
    """The lock's stat when it is dead by the rule above, else None."""
    try:
        found = lock.stat()
    except FileNotFoundError:
        return None
    if now - _last_change(lock.parent) < idle_s or _held_here(lock):
        return None
    return found


def _remove(lock: Path, judged: os.stat_result) -> bool:
    """Remove the lock judged dead, and only that one: it is first renamed aside (one remover
    wins), and given back if a build took a new lock under that name meanwhile."""
    aside = lock.with_name(f"{lock.name}.dead-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:  # another trial removed it first
        return False
    now = aside.stat()
    if (now.st_ino, now.st_mtime_ns) != (judged.st_ino, judged.st_mtime_ns):  # a new build's lock: back
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
        aside.unlink()
        return False
    aside.unlink()
    return True


def wait_for_builds(root: Optional[Path] = None, idle_s: float = IDLE_S, clock: Callable[[], float] = time.time,
                    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> list[Path]:
    """Wait until no build lock is left under `root`, removing each dead one (said in a line);
    returns those removed."""
    root = extensions_root() if root is None else root
    removed: list[Path] = []
    while locks := [p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file()]:
        for lock in locks:
            judged = stale(lock, clock(), idle_s)
            if judged is None or not _remove(lock, judged):
                continue
            removed.append(lock)
            say(f"qarac_dist: removed a torch-extension build lock that no build holds: {lock} (left "
                f"{clock() - judged.st_mtime:.0f} s ago, nothing built in its directory for {idle_s:.0f} s, no "
                f"process of this host has it open)")
        if any(p.exists() for p in locks):
            time.sleep(POLL_S)
    return removed
