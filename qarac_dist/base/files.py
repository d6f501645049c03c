"""JSON records on a filesystem that may be shared, slow, or lose the last file written.

What this relies on: `os.replace` is atomic on one filesystem (POSIX; NFS and Lustre keep it
for a rename within a directory), so a reader sees the old file or the new one, never half of
one; the data is fsynced before the rename, so a crash leaves the old file rather than an
empty new one. A file that is there but does not parse is reported as damaged, never taken for
a missing one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from .errors import UserError


# Files are made readable as the umask allows (mkstemp makes them private), so that people who
# share a sweep on a cluster's filesystem can read its records. Read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class DamagedFile(UserError):
    """A record exists but cannot be read as what it should be."""


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`; None when there is no file; DamagedFile when it does not parse
    or is not an object."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        kind = "empty" if not text.strip() else f"not valid JSON ({err.__class__.__name__}: {err})"
        raise DamagedFile(f"{path}: {kind}; it was truncated or overwritten") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
