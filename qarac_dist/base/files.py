"""JSON records on a filesystem that may be shared, slow, or lose the last file written.

What this relies on: `os.replace` is atomic on one filesystem (POSIX; NFS and Lustre keep it
for a rename within a directory), so a reader sees the old file or the new one, never half of
one; the data is fsynced before the rename, so a crash leaves the old file rather than an
empty new one. A file that is there but does not parse is reported as damaged, never taken for
a missing one. A write that fails for lack of space or quota is one line naming the file
(`DiskFull`), and leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import UserError


# Files are made readable as the umask allows (mkstemp makes them private), so that people who
# share a sweep on a cluster's filesystem can read its records. Read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class DamagedFile(UserError):
    """A record exists but cannot be read as what it should be."""


class DiskFull(UserError):
    """A write failed for lack of space or quota: one line naming the path."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Within the block, a write that fails for lack of space or quota is `DiskFull` naming
    `path` (an OSError from a write to an open file names no path of its own)."""
    try:
        yield
    except OSError as err:
        if err.errno in _NO_SPACE:
            raise DiskFull(f"{path}: {os.strerror(err.errno)}; free space (or raise the quota), then run the same "
                           f"command again to resume") from None
        raise


@contextlib.contextmanager
def writing_folder(path: Path, low_bytes: int = 2**20) -> Iterator[None]:
    """A folder written by another library (a checkpoint, an exported model), which may fail
    for lack of space without saying so (torch.save's "file write failed"): a failure with less
    than `low_bytes` left free on its filesystem is `DiskFull` naming the folder, and the part
    written is removed, to give the space back. Other failures leave the part as it is (it has
    no COMPLETE marker, so it is never loaded)."""
    try:
        with writing(path):
            yield
    except Exception as err:
        try:
            full = isinstance(err, DiskFull) or shutil.disk_usage(Path(path).parent).free < low_bytes
        except OSError:
            full = False
        if not full:
            raise
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, DiskFull):
            raise
        raise DiskFull(f"{path}: {os.strerror(errno.ENOSPC)} (the part written is removed); free space (or raise "
                       f"the quota), then run the same command again to resume") from None


def write_json(path: Path, obj, compact: bool = False) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one.
    `compact`: on one line, by json's C encoder (a 1,000-trial manifest: 4 MB, 8 times faster)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(obj, separators=(",", ":"), default=str) if compact else
                        json.dumps(obj, indent=2, default=str))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


NOT_A_RECORD = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)
"""What parsing a line of a JSON-lines record raises when the line is no record (bad JSON, a
field missing or of another type, a number past float's range, nesting past the parser's)."""


def append_line(f, whole: int, line: str) -> None:
    """Append `line` to an append-only record held locked in `f` (opened "a+" or "a+b", read
    through): the tail past its `whole` bytes, a line cut short by a killed writer, is dropped
    first; the new line is on disk (fsync) when this returns."""
    if whole != f.tell():
        f.truncate(whole)
    f.write((line + "\n").encode() if "b" in f.mode else line + "\n")
    f.flush()
    os.fsync(f.fileno())


def replace_with(path: Path, fill: Callable[[Path], None]) -> None:
    """Write `path` whole: `fill` writes a temporary file beside it, renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fill(tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`; None when there is no file; DamagedFile when it does not parse
    or is not an object."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # nested past Python's stack
        kind = "empty" if not text.strip() else f"not valid JSON ({err.__class__.__name__}: {err})"
        raise DamagedFile(f"{path}: {kind}; it was truncated or overwritten") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def first_missing(directory: Path) -> Path | None:
    """The outermost folder of `directory`'s path that does not exist yet (None: it exists)."""
    missing = None
    for folder in [directory, *directory.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing
