"""The one writer of a sweep's sqlite store: it copies what the trials kept in their outboxes
(track/outbox.py) into the store, each metric point once, however often it is run or killed.

Who runs it: the driver while it follows a sweep, `status`, and `python -m qarac_dist.ui`,
which keeps importing while the MLflow UI is open. One process at a time: a lock on
`<store>.writer` beside the sqlite file (base/lock.py: fcntl locks, honoured across the nodes
of NFS and of Lustre with `flock`). SQLite's own lock is then only ever asked for on one host:
the importer's, and the UI server's reads.

What makes a point land once: the store itself. For each run and metric, MLflow keeps the
latest step in `latest_metrics`; the importer inserts points of a later step, and of an earlier
step the run does not hold (read from the store for that metric), in the same transaction that
moves the latest step on. A transaction is whole or absent after a kill, so a restart, by any
process, goes on where the store is. Points of a step the store holds already (a resumed job
recomputing the steps after its checkpoint) are those MLflow kept before: the first. How far
each outbox was read (`mlflow_imported.json`) only spares re-reading.

Events are written with SQL too, in the points' transaction (track/store_sql.py), or, those
it does not take on (a model to log, an artifact), through MLflow's client, made safe to replay:
the end of a run logs its best metrics and its model once per best step
(mlflow_runs.complete_run). A store whose tables are not those this code knows (MLflow pinned
in constraints.txt) gets all of it through MLflow's client, at about a fifth of the speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..base.files import NOT_A_RECORD, DamagedFile, read_json, write_json
from ..base.lock import lock
from ..base.secrets import redact_text
from .mlflow_client import client, dataset_inputs
from .outbox import MODULE, OUTBOX, is_local_store
from .store_sql import INT64, StoreWriter, ms, name_ok

_CHUNK = 50_000
"""Points per transaction: a kill loses at most one chunk's work, which the next import redoes."""
_READ = 16 << 20
"""Bytes of one outbox read at a time."""
_NUL_WAIT_S = 300
"""How long a line with NUL bytes is waited on: an NFS client may show a range another host
appended as zeros until that host's client has written it back (seconds, mostly)."""
_EVENTS = {"tags", "status", "params", "dict", "finish", "inputs"}


@dataclass(frozen=True)
class Entry:
    trial_id: str
    directory: Path
    run_id: Optional[str]


@dataclass
class Imported:
    points: int = 0
    events: int = 0
    trials: int = 0
    points_s: float = 0.0
    """Time spent reading the outboxes and writing the points (the rest: events through MLflow's client)."""

    def __str__(self) -> str:
        return f"imported {self.points} metric points and {self.events} events of {self.trials} trials"


def writer_lock(uri: str, wait: bool = True):
    """The store's one-writer lock (LockHeld when another process imports and `wait` is False)."""
    return lock(Path(f"{_db(uri)}.writer"), wait=wait)


@contextlib.contextmanager
def one_writer(uri: str):
    """Within the block this process is the store's one writer (a sqlite store: the lock is
    waited for; a server writes its own database: nothing to hold). Not nested: closing a
    second descriptor of the lock file would drop the first's lock (base/lock.py)."""
    if not is_local_store(uri):
        yield
        return
    held = writer_lock(uri)
    try:
        yield
    finally:
        held.close()


def import_outboxes(uri: str, state: Path, entries: list[Entry], wait: bool = True, again: bool = False) -> Imported:
    """Import what is new in the trials' outboxes; `state` keeps how far each was read. `again`:
    every line from the start (status --sync: what a run deleted then restored, or an event a
    passing error kept out, missed); the store keeps each point and event once still."""
    done = Imported()
    seen = {} if again else _read_offsets(state)  # once, not once a trial: a following driver asks every poll
    if not any(_grown(entry, seen.get(entry.trial_id)) for entry in entries):
        return done  # asked each few seconds: answered without the lock, the store or MLflow
    held = writer_lock(uri, wait)
    try:
        if not _db(uri).exists():  # made with the sweep's runs: gone, it is not made anew, empty
            raise FileNotFoundError(f"{_db(uri)}: the sweep's MLflow store is not there; nothing imported")
        mlflow_client = client(uri)
        offsets = {} if again else _read_offsets(state)
        more = True
        while more:  # a backlog is read _READ bytes of a trial at a time: memory stays bounded
            more = False
            with StoreWriter(_db(uri), mlflow_client) as points:
                pending: list[tuple[Entry, list, dict]] = []
                for entry in entries:
                    started = time.perf_counter()
                    new = _new_lines(entry, offsets.get(entry.trial_id))
                    done.points_s += time.perf_counter() - started
                    if new is None:
                        continue
                    items, position, capped = new
                    before = offsets.get(entry.trial_id)
                    # (a capped read that found no whole line, a line over _READ, is not read on)
                    more = more or (capped and position["offset"] > (before.get("offset", 0) if
                                                                     isinstance(before, dict) else 0))
                    pending.append((entry, points.add(entry.run_id, _current(items)), position))
                    if points.size >= _CHUNK:
                        _commit(points, mlflow_client, pending, offsets, state, done)
                        pending = []
                _commit(points, mlflow_client, pending, offsets, state, done)
        return done
    finally:
        held.close()


def _commit(points: StoreWriter, mlflow_client, pending: list, offsets: dict, state: Path, done: Imported) -> None:
    """The chunk's points and the events SQL takes in one transaction, then each trial's other
    events in order, the parents of the runs that ended, then how far each outbox was read: a
    kill anywhere redoes only what the store does not hold."""
    from .mlflow_runs import update_parents

    started = time.perf_counter()
    written, events, ends = points.flush()
    done.points += written
    done.events += events
    done.points_s += time.perf_counter() - started
    for entry, rest, position in pending:
        try:
            done.events += _apply(mlflow_client, entry, rest, ends)
        except Exception as err:  # noqa: BLE001 - one trial's record; the others go on, this one next time
            print(f"qarac_dist: trial {entry.trial_id}: its MLflow events were not imported ({type(err).__name__}: "
                  f"{redact_text(str(err))[:300]}); the next import tries again", file=sys.stderr)
            continue
        offsets[entry.trial_id] = position
        done.trials += 1
    update_parents(mlflow_client, ends)
    if pending:
        write_json(state, offsets, compact=True)


def _grown(entry: Entry, saved: Optional[dict]) -> bool:
    """Whether the trial's outbox changed since it was last read (a last line cut short and
    never ended counts once)."""
    try:
        stat = os.stat(entry.directory / OUTBOX)
    except OSError:
        return False
    return entry.run_id is not None and (not isinstance(saved, dict) or saved.get("inode") != stat.st_ino or
                                         saved.get("size") != stat.st_size or "zeros_at" in saved)


def _new_lines(entry: Entry, saved: Optional[dict]) -> Optional[tuple[list, dict, bool]]:
    """The whole lines written to the outbox since `saved` (all of it when the file is another
    one than the one read), at most _READ bytes, split into points and events; where reading
    stopped; whether there is more to read. None if there is no run to import into, or the file
    cannot be read (said in one line)."""
    path = entry.directory / OUTBOX
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            start = _start(f, stat.st_ino, saved)
            f.seek(start)
            data = f.read(_READ)
            while len(data) == _READ and b"\n" not in data and (end := _past_long_line(f, path, start)) > start:
                start = end
                f.seek(start)
                data = f.read(_READ)
    except FileNotFoundError:
        return None
    except OSError as err:  # a directory in its place, no permission: this trial waits, the others go on
        print(f"qarac_dist: {path}: {err.strerror or err}; its records are not imported", file=sys.stderr)
        return None
    if entry.run_id is None:
        return None
    capped = len(data) == _READ
    data = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next import
    data, zeros = _before_zeros(data, start, saved, path)
    position = {"inode": stat.st_ino, "offset": start + len(data), "size": stat.st_size, **zeros}
    items = []
    for number, line in enumerate(data.split(b"\n")[:-1]):
        try:
            items.append(_item(json.loads(line)))
        except NOT_A_RECORD:
            print(f"qarac_dist: {path}: a line after byte {start} ({number + 1} of those read now) is no MLflow "
                  f"record; passed over", file=sys.stderr)
    return items, position, capped


def _before_zeros(data: bytes, start: int, saved: Optional[dict], path: Path) -> tuple[bytes, dict]:
    """The lines before the first that holds NUL bytes, and where and since when that line has
    been waited on; after _NUL_WAIT_S, all of them (the line is then passed over with a word)."""
    at = data.find(b"\0")
    if at < 0:
        return data, {}
    line = data.rfind(b"\n", 0, at) + 1
    since = saved.get("zeros_since") if isinstance(saved, dict) and saved.get("zeros_at") == start + line else None
    since = since if isinstance(since, float) and since <= time.time() else time.time()
    if time.time() - since < _NUL_WAIT_S:
        return data[:line], {"zeros_at": start + line, "zeros_since": since}
    print(f"qarac_dist: {path}: the line at byte {start + line} has held NUL bytes for {_NUL_WAIT_S} s (not an NFS "
          f"client's view of a write still on its way)", file=sys.stderr)
    return data, {}


def _past_long_line(f, path: Path, start: int) -> int:
    """After the line at `start`, longer than _READ bytes, once it has ended (said in one line:
    no record MLflow takes is that long); `start` while it is still being written."""
    f.seek(start + _READ)
    position = start + _READ
    while chunk := f.read(_READ):
        if (at := chunk.find(b"\n")) >= 0:
            print(f"qarac_dist: {path}: the line at byte {start} is over {_READ:,} bytes: no MLflow record; passed "
                  f"over", file=sys.stderr)
            return position + at + 1
        position += len(chunk)
    return start


def _start(f, inode: int, saved: Optional[dict]) -> int:
    """Where the last import stopped in this file: the end of a line in it, or else its start."""
    start = saved.get("offset") if isinstance(saved, dict) and saved.get("inode") == inode else 0
    if not isinstance(start, int) or isinstance(start, bool) or start <= 0:
        return 0
    f.seek(start - 1)
    return start if f.read(1) == b"\n" else 0


def _item(item):
    """A point as (key, value, timestamp, step), or an event as it is; anything else: ValueError."""
    if isinstance(item, list):
        key, value, timestamp, step = item
        if not name_ok(key) or isinstance(value, bool) or not isinstance(value, (int, float)) or \
                ms(timestamp) is None or not (isinstance(step, int) and not isinstance(step, bool) and
                                              -INT64 <= step < INT64):
            raise ValueError(item)  # what MLflow's own checks and SQLite's integers refuse
        return key, float(value), timestamp, step
    kinds = item.keys() & _EVENTS if isinstance(item, dict) else set()
    if len(kinds) == 1 and isinstance(item[next(iter(kinds))], {"status": str, "inputs": list}.get(next(iter(kinds)),
                                                                                                   dict)):
        return _utf8(item)
    raise ValueError(item)


def _utf8(event: dict) -> dict:
    """The event with text SQLite and MLflow can store: a lone surrogate (a valid JSON escape, no
    UTF-8) becomes `?`."""
    text = json.dumps(event, ensure_ascii=False)
    try:
        text.encode()
        return event
    except UnicodeEncodeError:
        return json.loads(text.encode(errors="replace"))


def _current(items: list) -> list:
    """The lines read, less the starts of the run (RUNNING) before its last end in them: they
    change nothing."""
    last_end = max((i for i, item in enumerate(items) if isinstance(item, dict) and "finish" in item), default=-1)
    return [item for i, item in enumerate(items) if not (i < last_end and isinstance(item, dict) and "status" in item)]


def _apply(mlflow_client, entry: Entry, events: list, ends: list) -> int:
    """Set, in order, the trial's events that MLflow's client writes; the ends of runs join
    `ends`. An event MLflow refuses is said in one line and passed over, as a job writing the
    run itself would have: it never holds up the events after it. Any other error (a store
    locked by a reader, a full disk) may pass: it is raised, and the trial's events are set again
    by the next import. Returns the number of events."""
    state: dict = {}
    for item in events:
        try:
            _event(mlflow_client, entry, item, state, ends)
        except Exception as err:  # noqa: BLE001 - MLflow refused this event: the rest go on
            if not _refused(err):
                raise
            print(f"qarac_dist: trial {entry.trial_id}: an MLflow {next(iter(item.keys() & _EVENTS))} event was not "
                  f"taken ({type(err).__name__}: {redact_text(str(err))[:300]}); passed over", file=sys.stderr)
    return len(events)


_REFUSALS = {"INVALID_PARAMETER_VALUE", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
             "BAD_REQUEST"}
"""MLflow's error codes for what it will never take (OperationalError, a locked store, is
TEMPORARILY_UNAVAILABLE)."""


def _refused(err: Exception) -> bool:
    """Whether the event itself was refused (by MLflow, or as no event this code takes)."""
    code = getattr(err, "error_code", None)
    return code in _REFUSALS if code is not None else isinstance(err, NOT_A_RECORD)


def _event(mlflow_client, entry: Entry, item: dict, state: dict, ends: list) -> None:
    from mlflow.entities import Param, RunTag

    from .mlflow_runs import complete_run

    run_id = entry.run_id
    if "tags" in item:
        tags = [RunTag(str(k), str(v)[:5000]) for k, v in item["tags"].items()]
        for start in range(0, len(tags), 100):
            mlflow_client.log_batch(run_id, tags=tags[start:start + 100])
    elif "status" in item:
        ended, at = mlflow_client.get_run(run_id).info.end_time, ms(item.get("time"))
        if not (ended and at is not None and at <= ended):  # not over a later end
            mlflow_client.update_run(run_id, status=str(item["status"]))  # (--cancel's KILLED)
    elif "params" in item:  # a param keeps its first value: only those the run lacks
        if "have" not in state:
            state["have"] = set(mlflow_client.get_run(run_id).data.params)
        params = [Param(str(k), str(v)[:6000]) for k, v in item["params"].items() if str(k) not in state["have"]]
        state["have"].update(p.key for p in params)
        for start in range(0, len(params), 100):
            mlflow_client.log_batch(run_id, params=params[start:start + 100])
    elif "inputs" in item:  # MLflow keeps one input per dataset and run: a replay adds nothing
        mlflow_client.log_inputs(run_id, datasets=dataset_inputs(item["inputs"]))
    elif "dict" in item:
        name = str(item.get("name", ""))
        if not re.fullmatch(r"[\w.-]{1,200}", name) or name.startswith("."):
            raise ValueError(f"artifact name {name[:100]!r}: expected a plain file name")
        mlflow_client.log_dict(run_id, item["dict"], name)
    else:  # the job's pickled best model, if any, is the one in its own directory, never a path it names
        finish = {k: v for k, v in item["finish"].items() if k != "module"}
        finish["end_time"] = ms(finish.get("end_time"))
        if (entry.directory / MODULE).exists() and item["finish"].get("module"):
            finish["module"] = str(entry.directory / MODULE)
        ends.append({**finish, "uri": mlflow_client.tracking_uri, "run_id": run_id})
        complete_run(mlflow_client, ends[-1], parent=False)


def _db(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def _read_offsets(state: Path) -> dict:
    try:
        offsets = read_json(state)
    except (DamagedFile, OSError):  # an aid, not a record: a damaged one is read again from the start
        offsets = None
    return offsets if isinstance(offsets, dict) else {}
