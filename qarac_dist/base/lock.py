"""The one exclusive-lock helper: `fcntl.lockf` on a file, for every lock a sweep takes (the
driver's lock, the successive-halving records, the parent run's updates, a new sqlite store).

lockf (POSIX record locks) is honoured across machines on NFS (NLM or NFSv4 locks) and on
Lustre mounted with `-o flock` (with `localflock` it holds only within one node). The kernel
drops a lock when its holder dies, however it dies, so no lock outlives a killed process and
none needs breaking. Hazard of POSIX locks: closing any descriptor of the locked file in the
holding process drops the lock, so each lock file is opened by one holder only.

One error policy: a filesystem that has no locks is one line saying what to mount; a lock held
by another process either is waited for, or (`wait=False`) raises `LockHeld` for the caller to
word.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import time
from pathlib import Path
from typing import IO, Iterator

from .errors import UserError

_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class LockHeld(UserError):
    """Another process holds the lock (only with `wait=False`)."""


def lock(path: Path, mode: str = "a+", wait: bool = True) -> IO:
    """Open `path` (made with its folders if missing) and lock it exclusively; closing the
    returned file releases the lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, mode)
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as err:
        f.close()
        if err.errno in (errno.EACCES, errno.EAGAIN) and not wait:
            raise LockHeld(f"{path}: locked by another process") from None
        if err.errno in _NO_LOCKS:
            raise UserError(f"{path}: cannot lock ({err.strerror}); the sweep's filesystem must support fcntl locks "
                            f"across nodes (NFS: mount without -o nolock; Lustre: mount with -o flock)") from None
        raise
    return f


def hold(path: Path, holder: str) -> IO:
    """Lock `path` without waiting and write `holder` (who this is) into it, for the message of
    whoever comes next; closing the returned file releases it. When another process holds it:
    LockHeld, carrying what that holder wrote about itself."""
    try:
        f = lock(path, wait=False)
    except LockHeld:
        raise LockHeld(_written(Path(path))) from None
    f.seek(0)
    f.truncate()
    f.write(holder + "\n")
    f.flush()
    return f


def _written(path: Path) -> str:
    """What a holder wrote about itself. It writes just after it locks, so wait a moment for the
    whole line (bounded: a holder that never writes is shown as what there is, maybe nothing)."""
    text = ""
    for _ in range(40):
        try:
            text = path.read_text()
        except OSError:
            text = ""
        if text.endswith("\n"):
            break
        time.sleep(0.05)
    return text.strip()


@contextlib.contextmanager
def locked(path: Path, mode: str = "a+") -> Iterator[IO]:
    """`lock(path, mode)` for the length of a `with` block."""
    f = lock(path, mode)
    try:
        yield f
    finally:
        f.close()
